//! Labels (`key=value` pairs on agents and scans) and the one rule set
//! every place that accepts them applies: enrollment tokens, the agent's
//! `--labels`, its Hello, a scan's labels and `agent_selector`, the CLI.
//! A label one of them accepts can therefore always be matched by another.

use std::collections::BTreeMap;

use crate::text;

/// Most labels on one agent or scan.
pub const MAX_LABELS: usize = 64;
/// Longest key, in bytes.
pub const MAX_KEY: usize = 63;
/// Longest value, in bytes.
pub const MAX_VALUE: usize = 255;

/// A label that breaks the rules, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("more than {MAX_LABELS} labels")]
    TooMany,
    #[error("key {}: keys are 1-{MAX_KEY} characters of letters, digits, '-', '_', '.', '/'", text::echo(.0))]
    Key(String),
    #[error("value of {key}: {reason}")]
    Value { key: String, reason: text::TextError },
    #[error("{}: not key=value", text::echo(.0))]
    Syntax(String),
}

/// Checks one label.
pub fn check(key: &str, value: &str) -> Result<(), LabelError> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if !key_ok {
        return Err(LabelError::Key(key.to_string()));
    }
    text::check(value, MAX_VALUE).map_err(|reason| LabelError::Value { key: key.to_string(), reason })
}

/// Checks a whole set of labels.
pub fn check_all<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<(), LabelError> {
    let mut n = 0;
    for (k, v) in labels {
        n += 1;
        if n > MAX_LABELS {
            return Err(LabelError::TooMany);
        }
        check(k, v)?;
    }
    Ok(())
}

/// Parses `key=value` (as `--labels` and `agent_selector` flags take
/// them), trimmed, and checks it.
pub fn parse(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s.split_once('=').ok_or_else(|| LabelError::Syntax(s.to_string()))?;
    let (k, v) = (k.trim(), v.trim());
    check(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// Parses a comma-separated `k=v,k=v` list.
pub fn parse_list(s: &str) -> Result<BTreeMap<String, String>, LabelError> {
    let labels: BTreeMap<String, String> =
        s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(parse).collect::<Result<_, _>>()?;
    check_all(&labels)?;
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_set() {
        assert_eq!(parse(" site = lab-1 "), Ok(("site".into(), "lab-1".into())));
        assert_eq!(parse("k8s.io/zone=eu west"), Ok(("k8s.io/zone".into(), "eu west".into())));
        assert!(matches!(parse("bad key=v"), Err(LabelError::Key(_))));
        assert!(matches!(parse("=v"), Err(LabelError::Key(_))));
        assert!(matches!(parse("novalue"), Err(LabelError::Syntax(_))));
        assert!(matches!(parse("k=a\0b"), Err(LabelError::Value { .. })));
        assert!(matches!(parse("k=line\nforged"), Err(LabelError::Value { .. })));
        assert!(matches!(check("k", &"v".repeat(256)), Err(LabelError::Value { .. })));
        assert_eq!(parse_list("a=1, b=2,").unwrap().len(), 2);
        let many: String = (0..65).map(|i| format!("k{i}=v,")).collect();
        assert_eq!(parse_list(&many), Err(LabelError::TooMany));
    }

    #[test]
    fn errors_echo_escaped() {
        let e = parse("k\u{1b}[31m=v").unwrap_err().to_string();
        assert!(!e.chars().any(char::is_control), "{e}");
    }
}
