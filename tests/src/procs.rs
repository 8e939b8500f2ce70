//! The real binaries as child processes, with their logs kept: a failing
//! test prints the tail of every log it started.

use std::{
    fs::File,
    io::Read,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{binary, netns::NetTopology};

pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Runs `cmd` (built by the caller, e.g. wrapped in a namespace) with
    /// its stderr kept as this process's log.
    pub fn spawn_command(name: &str, cmd: Command, logs: &tempfile::TempDir) -> Self {
        Self::spawn(name, cmd, logs)
    }

    fn spawn(name: &str, mut cmd: Command, logs: &tempfile::TempDir) -> Self {
        let log = logs.path().join(format!("{name}.log"));
        let file = File::create(&log).expect("log file");
        cmd.stdout(Stdio::null()).stderr(file.try_clone().expect("log file")).env("RUST_LOG", "info");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { name: name.to_string(), child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no cleanup at all, like a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`): a process frozen in place,
    /// its sockets open and silent.
    pub fn set_running(&self, running: bool) {
        let signal = if running { "-CONT" } else { "-STOP" };
        let ok = Command::new("kill").args([signal, &self.child.id().to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} {}", self.name);
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- last lines of {} -----", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs the controller binary on `listen` against `database_url`.
pub fn controller(name: &str, database_url: &str, listen: &str, extra: &[&str], logs: &tempfile::TempDir) -> Proc {
    let mut cmd = Command::new(binary("portfleet-controller"));
    cmd.args(["serve", "--database-url", database_url, "--listen", listen]).args(extra);
    // Plaintext unless the test passes TLS settings.
    if !extra.contains(&"--tls-cert") {
        cmd.arg("--insecure");
    }
    cmd.env_remove("DATABASE_URL");
    Proc::spawn(name, cmd, logs)
}

/// Runs an agent daemon inside the scanner namespace.
pub fn agent(topo: &NetTopology, name: &str, controller_url: &str, extra: &[&str], logs: &tempfile::TempDir) -> Proc {
    let mut cmd = topo.in_scanner(binary("portfleet-agent"));
    let state = logs.path().join("state");
    cmd.args(["run", "--controller", controller_url, "--name", name, "--state-dir"]).arg(state).args(extra);
    Proc::spawn(name, cmd, logs)
}

/// Runs an agent daemon in this namespace, for tests of the daemon itself
/// that never scan (its lock, reconnects, logs), with its log kept as
/// `log_name` (several processes may run one agent name) and its state in
/// `logs/state`.
pub fn host_agent(
    log_name: &str,
    agent_name: &str,
    controller_url: &str,
    extra: &[&str],
    logs: &tempfile::TempDir,
) -> Proc {
    let mut cmd = Command::new(binary("portfleet-agent"));
    let state = logs.path().join("state");
    cmd.args(["run", "--controller", controller_url, "--name", agent_name, "--state-dir"]).arg(state).args(extra);
    Proc::spawn(log_name, cmd, logs)
}

/// A free TCP port on `ip` (bound and released: good enough for tests).
pub fn free_port(ip: std::net::IpAddr) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind for a free port");
    l.local_addr().expect("local addr").port()
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
