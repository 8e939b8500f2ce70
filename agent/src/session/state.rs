//! The agent's files in its state directory: `agent-<name>.<ext>`, so
//! several agents on one host stay distinct. `id` holds the agent's UUID;
//! enrollment adds `key`, `crt`, `ca.pem` and `labels`; `lock` is held by
//! the one process that uses them ([`lock`]) and names its pid.

use std::{
    collections::BTreeMap,
    fs::{File, TryLockError},
    io::{Read, Seek, Write},
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

/// Proof that this process alone uses an agent's state files: an
/// exclusive advisory lock on `agent-<name>.lock`, released when this is
/// dropped or the process dies (so a crashed agent leaves no stale lock).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Takes the lock on the state files of the agent named `name`, or says
/// which process holds it. Two daemons with one name would share one agent
/// id, and each new session would knock the other's off the controller.
pub fn lock(dir: &Path, name: &str) -> Result<StateLock, SessionError> {
    let path = state_path(dir, name, "lock");
    let err = |source| SessionError::State { path: path.clone(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    // Not truncated on open: until the lock is ours, the pid in it is the
    // holder's.
    let mut file = File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            // The holder may not have written its pid yet: then it is unknown.
            let pid = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
            return Err(SessionError::AlreadyRunning { name: name.to_string(), pid });
        }
        Err(TryLockError::Error(e)) => return Err(err(e)),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(err)?;
    Ok(StateLock { _file: file })
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
    fn one_process_at_a_time_holds_an_agent_s_state_and_its_pid_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path(), "scanner-1").unwrap();
        let pid = std::fs::read_to_string(dir.path().join("agent-scanner-1.lock")).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // flock conflicts between open files even within one process.
        match lock(dir.path(), "scanner-1") {
            Err(e @ SessionError::AlreadyRunning { pid: Some(p), .. }) => {
                assert_eq!(p, std::process::id());
                assert_eq!(e.to_string(), format!("agent scanner-1 is already running, pid {p}"));
            }
            other => panic!("a second lock: {other:?}"),
        }
        // Another name is another agent.
        let _other = lock(dir.path(), "scanner-2").unwrap();
        drop(held);
        lock(dir.path(), "scanner-1").expect("free once the holder is gone");
    }

    #[test]
    fn stored_labels_read_back_under_the_same_rules() {
        let labels: Labels = "site=lab,k8s.io/zone=eu west".parse().unwrap();
        assert_eq!(read_labels(&write_labels(&labels)).unwrap(), labels);
        assert_eq!(read_labels("").unwrap(), Labels::default());
        assert!(read_labels("bad key=x\n").is_err());
    }
}
