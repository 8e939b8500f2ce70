//! The agent's files in its state directory: `agent-<name>.<ext>`, so
//! several agents on one host stay distinct. `id` holds the agent's UUID;
//! enrollment adds `key`, `crt`, `ca.pem` and `labels`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use portfleet_core::labels::{LabelError, Labels};
use uuid::Uuid;

use super::SessionError;

/// A state file of the agent named `name`: `agent-<name>.<ext>`.
pub fn state_path(dir: &Path, name: &str, ext: &str) -> PathBuf {
    let safe: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    dir.join(format!("agent-{safe}.{ext}"))
}

/// Loads this agent's id from its state file, or creates one.
pub fn agent_id(dir: &Path, name: &str) -> Result<Uuid, SessionError> {
    let path = state_path(dir, name, "id");
    let err = |source| SessionError::State { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            Uuid::try_parse(text.trim()).map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(err)?;
            let id = Uuid::new_v4();
            std::fs::write(&path, format!("{id}\n")).map_err(err)?;
            Ok(id)
        }
        Err(e) => Err(err(e)),
    }
}

/// The labels `enroll` stored: `key=value` lines, checked by the rules a
/// scan's agent_selector is checked by.
pub fn read_labels(text: &str) -> Result<Labels, LabelError> {
    let map: BTreeMap<String, String> =
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Labels::new(map)
}

/// The stored form of `labels` (see [`read_labels`]); a value never holds
/// a line break.
pub fn write_labels(labels: &Labels) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_made_once_and_kept_per_name() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent_id(dir.path(), "a/b").unwrap();
        assert_eq!(agent_id(dir.path(), "a/b").unwrap(), a);
        assert_ne!(agent_id(dir.path(), "c").unwrap(), a);
        assert!(dir.path().join("agent-a_b.id").exists());
        std::fs::write(dir.path().join("agent-bad.id"), "not a uuid").unwrap();
        assert!(matches!(agent_id(dir.path(), "bad"), Err(SessionError::State { .. })));
    }

    #[test]
    fn stored_labels_read_back_under_the_same_rules() {
        let labels: Labels = "site=lab,k8s.io/zone=eu west".parse().unwrap();
        assert_eq!(read_labels(&write_labels(&labels)).unwrap(), labels);
        assert_eq!(read_labels("").unwrap(), Labels::default());
        assert!(read_labels("bad key=x\n").is_err());
    }
}
