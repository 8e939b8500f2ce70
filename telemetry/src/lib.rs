//! Logging for the portfleet binaries (controller, agent): one setup, so
//! both write the same formats with the same guarantees.
//!
//! - `plain` lines for people, `json` lines for log pipelines;
//! - colour only when stderr is a terminal and `NO_COLOR` is unset, so
//!   files and the journal never carry escape codes;
//! - in plain lines every field value and message has its control
//!   characters escaped (CR/LF in a caller's name cannot forge a line, ESC
//!   cannot drive a terminal) and is cut after [`MAX_FIELD_CHARS`]
//!   characters (JSON escapes control characters by itself).

#![forbid(unsafe_code)]

use std::{fmt, io::IsTerminal};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    EnvFilter,
    field::{MakeVisitor, VisitFmt, VisitOutput},
    fmt::format::Writer,
};

/// Longest field value a plain log line repeats, in characters.
pub const MAX_FIELD_CHARS: usize = 1000;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Whether log lines on stderr should be coloured.
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: `RUST_LOG` filters (else
/// `default_filter`), lines on stderr.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.with_ansi(colour()).fmt_fields(SafeFields).init(),
        LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).init(),
    }
}

/// Formats fields as `name=value`, escaped and truncated (see the module
/// docs); the message goes first, bare.
#[derive(Clone, Copy, Debug, Default)]
pub struct SafeFields;

impl<'w> MakeVisitor<Writer<'w>> for SafeFields {
    type Visitor = SafeVisitor<'w>;

    fn make_visitor(&self, target: Writer<'w>) -> Self::Visitor {
        SafeVisitor { writer: target, first: true, result: Ok(()) }
    }
}

pub struct SafeVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl SafeVisitor<'_> {
    fn record(&mut self, field: &Field, value: &str) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{sep}{}", Escaped(value))
        } else {
            write!(self.writer, "{sep}{}={}", field.name(), Escaped(value))
        };
    }
}

impl Visit for SafeVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, &format!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for SafeVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for SafeVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// A value with its control characters escaped, cut after
/// [`MAX_FIELD_CHARS`] characters.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(MAX_FIELD_CHARS) {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        if let Some((at, _)) = chars.next() {
            write!(f, "... ({} more bytes)", self.0.len() - at)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn caller_input_cannot_forge_lines_or_drive_terminals() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).fmt_fields(SafeFields).with_writer(move || out.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            let name = "evil\n2026-01-01T00:00:00Z ERROR forged line\r\u{1b}[2J";
            tracing::warn!(name, shown = %name, debug = ?name, "refused {name}");
            tracing::info!(big = %"x".repeat(5000), "long");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines.iter().all(|l| !l.chars().any(char::is_control)), "{text:?}");
        assert!(lines[0].contains(r"refused evil\n2026-01-01T00:00:00Z ERROR forged line\r\u{1b}[2J"), "{}", lines[0]);
        assert!(lines[0].contains(r"name=evil\n"), "{}", lines[0]);
        assert!(lines[1].len() < 1200 && lines[1].contains("(4000 more bytes)"), "{}", lines[1]);
    }
}
