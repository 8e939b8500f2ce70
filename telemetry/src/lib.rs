//! Logging for the portfleet binaries (controller, agent): one setup, so
//! both write the same formats with the same guarantees.
//!
//! - `plain` lines for people, `json` lines for log pipelines;
//! - colour only when stderr is a terminal and `NO_COLOR` is unset, so
//!   files and the journal never carry escape codes;
//! - in plain lines every field value and message has its control
//!   characters escaped (CR/LF in a caller's name cannot forge a line, ESC
//!   cannot drive a terminal) and is cut after [`MAX_FIELD_CHARS`]
//!   characters (JSON escapes control characters by itself);
//! - errors logged with their causes ([`ErrorChain`]), never as a bare
//!   "transport error".
//!
//! Config files ([`config_file`]): a TOML file of settings read through
//! the binaries' own clap definitions, flags and environment over it.
//!
//! Traces ([`otel`]): opt-in OpenTelemetry export over OTLP, bridged from
//! the same `tracing` spans; without an endpoint nothing is exported.

#![forbid(unsafe_code)]

pub mod config_file;
pub mod metrics;
pub mod otel;

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

/// Where a binary's traces go: `otlp_endpoint` (`--otlp-endpoint`), or
/// nowhere; `service_name` is OpenTelemetry's `service.name`.
#[derive(Clone, Debug)]
pub struct Traces<'a> {
    pub otlp_endpoint: Option<&'a str>,
    pub service_name: &'static str,
}

pub use otel::TelemetryGuard;

/// Installs the global subscriber: `RUST_LOG` filters (else
/// `default_filter`), lines on stderr; with an OTLP endpoint, also the
/// trace exporter (its own filter: [`otel::ExportFilter`]). Call inside a
/// Tokio runtime (`Runtime::enter`) and keep the guard until the end.
pub fn init(format: LogFormat, default_filter: &str, traces: &Traces<'_>) -> Result<TelemetryGuard, otel::OtelError> {
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let Some(endpoint) = traces.otlp_endpoint else {
        // No exporter: the subscriber is only the log lines, as it always was.
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        match format {
            LogFormat::Plain => builder.with_ansi(colour()).fmt_fields(SafeFields).init(),
            LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).init(),
        }
        return Ok(TelemetryGuard::default());
    };
    let pipeline = otel::pipeline(endpoint, traces.service_name)?;
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Plain => lines.with_ansi(colour()).fmt_fields(SafeFields).boxed(),
        LogFormat::Json => lines.with_ansi(false).json().flatten_event(true).boxed(),
    };
    let spans = tracing_opentelemetry::layer().with_tracer(pipeline.tracer).with_filter(otel::ExportFilter);
    tracing_subscriber::registry().with(lines.with_filter(filter)).with(spans).init();
    Ok(TelemetryGuard::exporting(pipeline.provider))
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
        // `otel.*` fields steer the trace exporter; they are not news.
        if self.result.is_err() || field.name().starts_with("log.") || field.name().starts_with("otel.") {
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

/// An error and its causes, `outer: inner: root`, for log fields: most
/// errors' own text is generic ("transport error") and the cause is what a
/// reader needs. A cause whose text the previous one already ends with
/// (errors that print their source themselves) is not repeated.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_chain(f, self.0.to_string(), self.0.source())
    }
}

/// `text` followed by the causes from `source` on, as [`ErrorChain`] shows
/// them: for errors whose own text is not their `Display` (a gRPC status's
/// message).
pub fn with_causes(text: &str, source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_chain(&mut out, text.to_string(), source);
    out
}

fn write_chain(
    f: &mut dyn fmt::Write,
    mut shown: String,
    mut cause: Option<&(dyn std::error::Error + 'static)>,
) -> fmt::Result {
    f.write_str(&shown)?;
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !shown.ends_with(&text) {
            write!(f, ": {text}")?;
        }
        shown = text;
        cause = e.source();
    }
    Ok(())
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

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chains_name_every_cause_once() {
        let refused = Layer("connection refused (os error 111)", None);
        let e = Layer("transport error", Some(Box::new(Layer("tcp connect error", Some(Box::new(refused))))));
        assert_eq!(ErrorChain(&e).to_string(), "transport error: tcp connect error: connection refused (os error 111)");
        // A layer that already printed its cause does not get it twice.
        let e = Layer("dns error: no such host", Some(Box::new(Layer("no such host", None))));
        assert_eq!(ErrorChain(&e).to_string(), "dns error: no such host");
        assert_eq!(ErrorChain(&Layer("alone", None)).to_string(), "alone");
        let status_source = Layer("error reading a body from connection", Some(Box::new(Layer("broken pipe", None))));
        assert_eq!(
            with_causes("h2 protocol error: error reading a body from connection", Some(&status_source)),
            "h2 protocol error: error reading a body from connection: broken pipe"
        );
    }

    /// `otel.*` fields (span kinds, statuses for the exporter) are not
    /// printed in plain lines.
    #[test]
    fn exporter_fields_stay_out_of_plain_lines() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).fmt_fields(SafeFields).with_writer(move || out.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("shard", otel.kind = "consumer", shard_id = 3);
            let _in = span.enter();
            tracing::info!(otel.status_code = "error", "inside");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("shard{shard_id=3}") && text.contains("inside"), "{text}");
        assert!(!text.contains("otel"), "{text}");
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
