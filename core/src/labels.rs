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

/// A validated set of labels: every key and value follows the rules
/// above, and there are at most [`MAX_LABELS`]. What one part of the
/// system accepts, every other part accepts and can match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Checks `map` against the rules.
    pub fn new(map: BTreeMap<String, String>) -> Result<Self, LabelError> {
        check_all(&map)?;
        Ok(Self(map))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0
    }

    /// These labels with `other`'s on top (`other` wins on a key).
    pub fn merged(&self, other: &Labels) -> Result<Self, LabelError> {
        let mut map = self.0.clone();
        map.extend(other.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        Self::new(map)
    }

    /// Whether every label of `selector` is one of these (an empty
    /// selector matches everything).
    pub fn matches(&self, selector: &Labels) -> bool {
        selector.0.iter().all(|(k, v)| self.0.get(k) == Some(v))
    }
}

impl std::str::FromStr for Labels {
    type Err = LabelError;

    /// `k=v,k=v`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_list(s).map(Self)
    }
}

impl std::fmt::Display for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (k, v) in &self.0 {
            write!(f, "{}{k}={v}", if first { "" } else { "," })?;
            first = false;
        }
        Ok(())
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = LabelError;

    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        Self::new(map)
    }
}

impl TryFrom<std::collections::HashMap<String, String>> for Labels {
    type Error = LabelError;

    fn try_from(map: std::collections::HashMap<String, String>) -> Result<Self, Self::Error> {
        if map.len() > MAX_LABELS {
            return Err(LabelError::TooMany);
        }
        Self::new(map.into_iter().collect())
    }
}

impl<'de> serde::Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        Self::new(map).map_err(serde::de::Error::custom)
    }
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
    fn a_set_matches_selectors_under_the_same_rules() {
        let agent: Labels = "site=lab-1,k8s.io/zone=eu-west".parse().unwrap();
        assert!(agent.matches(&"site=lab-1".parse().unwrap()));
        assert!(agent.matches(&Labels::default()));
        assert!(!agent.matches(&"site=lab-2".parse().unwrap()));
        assert_eq!(agent.to_string(), "k8s.io/zone=eu-west,site=lab-1");
        assert_eq!(agent.to_string().parse::<Labels>().unwrap(), agent);
        // What one place refuses, every place refuses.
        assert!("bad key=x".parse::<Labels>().is_err());
        let map: BTreeMap<String, String> = [("bad key".to_string(), "x".to_string())].into();
        assert!(Labels::new(map).is_err());
        assert!(serde_json::from_str::<Labels>(r#"{"bad key":"x"}"#).is_err());
        let merged = agent.merged(&"site=lab-2".parse().unwrap()).unwrap();
        assert_eq!(merged.get("site"), Some("lab-2"));
    }

    #[test]
    fn errors_echo_escaped() {
        let e = parse("k\u{1b}[31m=v").unwrap_err().to_string();
        assert!(!e.chars().any(char::is_control), "{e}");
    }
}
