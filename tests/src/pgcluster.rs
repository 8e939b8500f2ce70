//! A private Postgres cluster that a test starts, stops and starts again:
//! a real database outage without touching the shared server on 5432.
//!
//! `initdb` into a temporary directory, then `pg_ctl` on a free port of
//! 127.0.0.1 with the Unix socket in that directory too. As root, both run
//! as the `postgres` user (Postgres refuses to run as root) and the
//! directory is handed to that user. Anything missing is a panic naming it:
//! tests that need a cluster fail, they never skip.
//!
//! ```no_run
//! # async fn f() {
//! let pg = portfleet_tests::pgcluster::PgCluster::start().await;
//! let options = pg.options(); // postgres://postgres@127.0.0.1:PORT/postgres
//! pg.stop().await; // as in a crash: `pg_ctl stop -m immediate`
//! pg.start_again().await; // same port, same data
//! # }
//! // Dropping it stops the server and removes the directory.
//! ```

use std::{
    path::{Path, PathBuf},
    process::Output,
    str::FromStr,
    time::Duration,
};

use sqlx::postgres::PgConnectOptions;

/// How `pg_ctl stop` stops the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// SIGQUIT: every backend dies at once, nothing is flushed - a crash or
    /// a pulled cable as clients see it.
    Immediate,
    /// Clients are disconnected, then a clean shutdown.
    Fast,
}

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Run the binaries as `postgres` (we are root).
    as_postgres: bool,
}

/// The directory of `initdb` and `pg_ctl`: Debian's
/// /usr/lib/postgresql/<newest>/bin, else wherever PATH has them.
fn bin_dir() -> PathBuf {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v);
    if let Some((_, bin)) = debian {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    on_path.unwrap_or_else(|| {
        panic!(
            "PgCluster needs Postgres's initdb and pg_ctl: none in /usr/lib/postgresql/*/bin or on PATH \
             (Debian: apt-get install postgresql)"
        )
    })
}

/// `id -u postgres` and `id -g postgres`.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = std::process::Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap_or_else(|e| panic!("PgCluster: run `id {flag} postgres`: {e}"));
        assert!(
            out.status.success(),
            "PgCluster runs Postgres as the `postgres` user when the tests run as root, and there is none: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a numeric id")
    };
    (id("-u"), id("-g"))
}

impl PgCluster {
    /// Creates a cluster (trust authentication, superuser `postgres`) and
    /// starts it on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        let bin = bin_dir();
        let as_postgres = crate::is_root();
        // Under /tmp, not $TMPDIR: the `postgres` user must reach it.
        let mut builder = tempfile::Builder::new();
        builder.prefix("pf-pgcluster-");
        let dir = if as_postgres { builder.tempdir_in("/tmp") } else { builder.tempdir() };
        let dir = dir.expect("temporary directory");
        if as_postgres {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the cluster directory");
        }
        let port = crate::procs::free_port([127, 0, 0, 1].into());
        let this = Self { dir, bin, port, as_postgres };
        let data = this.data_dir();
        let out = this
            .run(
                "initdb",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "--auth=trust".as_ref(),
                    "--encoding=UTF8".as_ref(),
                    "--no-sync".as_ref(),
                    "--no-instructions".as_ref(),
                ],
            )
            .await;
        assert!(
            out.status.success(),
            "PgCluster: initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        this.start_again().await;
        this
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    async fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Output {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            tokio::process::Command::new(&program)
        };
        cmd.args(args).current_dir(self.dir.path()).kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("PgCluster: cannot run {}: {e}", program.display()),
            Err(_) => panic!("PgCluster: {} did not finish within 60 s", program.display()),
        }
    }

    /// Starts the (stopped) server again, on the same port with the same
    /// data; returns once it accepts connections.
    pub async fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c full_page_writes=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let (data, log) = (self.data_dir(), self.log_file());
        let out = self
            .run(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-o".as_ref(),
                    options.as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "30".as_ref(),
                    "start".as_ref(),
                ],
            )
            .await;
        assert!(
            out.status.success(),
            "PgCluster: pg_ctl start on port {} failed: {}{}\n{}",
            self.port,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Stops the server as in a crash (`pg_ctl stop -m immediate`).
    pub async fn stop(&self) {
        self.stop_with(StopMode::Immediate).await;
    }

    pub async fn stop_with(&self, mode: StopMode) {
        let mode = match mode {
            StopMode::Immediate => "immediate",
            StopMode::Fast => "fast",
        };
        let data = self.data_dir();
        let out = self
            .run(
                "pg_ctl",
                &["-D".as_ref(), data.as_os_str(), "-m".as_ref(), mode.as_ref(), "-w".as_ref(), "stop".as_ref()],
            )
            .await;
        assert!(
            out.status.success(),
            "PgCluster: pg_ctl stop -m {mode} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops (as in a crash) and starts again on the same port.
    pub async fn restart(&self) {
        self.stop().await;
        self.start_again().await;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.url()).expect("cluster url")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Synchronously: Drop may run outside a runtime. Errors are ignored
        // (it may be stopped already); the directory goes with `dir`.
        let pg_ctl = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            std::process::Command::new(&pg_ctl)
        };
        let _ = cmd
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("----- last lines of the private Postgres's log ({}) -----", self.dir.path().display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
