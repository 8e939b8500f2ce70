//! Free text from callers: what may be stored, and how it is echoed back.
//!
//! Postgres cannot store NUL in `text`, and control characters in names,
//! labels and ids forge log lines and terminal output. Every field a caller
//! fills in is checked with [`check`] where it enters (gRPC, AMQP, the
//! agent's Hello, the CLI); values echoed in errors and logs go through
//! [`echo`], which quotes, escapes and truncates them.

use std::fmt;

/// How many characters of a value errors and logs repeat.
pub const ECHO_CHARS: usize = 120;

/// Why a free-text value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("longer than {max} bytes ({len})")]
    TooLong { len: usize, max: usize },
    #[error("contains a control character ({found:?} at byte {at})")]
    Control { found: char, at: usize },
}

/// Refuses values longer than `max` bytes or containing any control
/// character (NUL, CR, LF, TAB, ESC, DEL, C1...).
pub fn check(value: &str, max: usize) -> Result<(), TextError> {
    if value.len() > max {
        return Err(TextError::TooLong { len: value.len(), max });
    }
    match value.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, found)) => Err(TextError::Control { found, at }),
        None => Ok(()),
    }
}

/// `value` quoted with control characters escaped and cut after
/// [`ECHO_CHARS`] characters, for error messages and logs.
pub fn echo(value: &str) -> Echo<'_> {
    Echo(value)
}

pub struct Echo<'a>(&'a str);

impl fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(ECHO_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        match chars.next() {
            Some((at, _)) => write!(f, "\"... ({} more bytes)", self.0.len() - at),
            None => f.write_str("\""),
        }
    }
}

impl fmt::Debug for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Text an agent or peer reports (a failure reason, say) made storable
/// and loggable: control characters become spaces, and it is cut to at
/// most `max` bytes on a character boundary.
pub fn sanitize(value: &str, max: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max));
    for c in value.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn refuses_nul_and_controls() {
        assert_eq!(check("ok-name_1.2", 64), Ok(()));
        assert_eq!(check("a\0b", 64), Err(TextError::Control { found: '\0', at: 1 }));
        assert!(check("line\r\nforged", 64).is_err());
        assert!(check("\u{1b}[31mred", 64).is_err());
        assert!(check("\u{85}", 64).is_err());
        assert_eq!(check("abcd", 3), Err(TextError::TooLong { len: 4, max: 3 }));
        assert_eq!(check("naïve ünïcode", 64), Ok(()));
    }

    #[test]
    fn echoes_quoted_escaped_and_short() {
        assert_eq!(echo("10.0.0.300").to_string(), "\"10.0.0.300\"");
        assert_eq!(echo("a\nb\0").to_string(), "\"a\\nb\\0\"");
        let long = "x".repeat(10_000);
        let shown = echo(&long).to_string();
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.ends_with("\"... (9880 more bytes)"), "{shown}");
    }

    #[test]
    fn sanitizes() {
        assert_eq!(sanitize("a\r\nb", 100), "a  b");
        assert_eq!(sanitize("ééé", 5), "éé");
    }

    proptest! {
        #[test]
        fn echo_never_carries_a_control_character(s in any::<String>()) {
            let shown = echo(&s).to_string();
            prop_assert!(!shown.chars().any(char::is_control));
            prop_assert!(shown.chars().count() <= ECHO_CHARS * 10 + 40);
        }

        #[test]
        fn checked_text_has_no_controls(s in any::<String>()) {
            if check(&s, usize::MAX).is_ok() {
                prop_assert!(!s.chars().any(char::is_control));
            }
            let clean = sanitize(&s, 64);
            prop_assert!(clean.len() <= 64 && check(&clean, 64).is_ok());
        }
    }
}
