//! Config files (`--config FILE`) of the real `portfleet-controller` and
//! `portfleet-agent` binaries: precedence file < env < flag as
//! `config check` reports it, unknown keys and bad values exit 2 naming the
//! key, `config print-default`'s output passes `config check`, secrets are
//! never printed, and `serve`/`tokens` really run on a file's settings.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use portfleet_tests::{TestDb, binary};

/// A binary with an empty environment: only what a test sets applies.
fn bin(name: &str) -> Command {
    let mut cmd = Command::new(binary(name));
    cmd.env_clear();
    cmd
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let Output { status, stdout, stderr } = cmd.stdin(Stdio::null()).output().expect("run the binary");
    (status.code(), String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The `key = value  # source` line `config check` prints for `key`.
#[track_caller]
fn setting<'a>(shown: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} = ");
    shown.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {key} in:\n{shown}"))
}

#[test]
fn controller_settings_come_from_file_then_env_then_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "controller.toml",
        r#"
database-url = "postgres://portfleet:filepassword@127.0.0.1:5432/portfleet"
max-scan-probes = 1000
max-scan-targets = 500
lease-ttl = "20s"
insecure = true
allow = ["192.0.2.0/24", "198.51.100.7"]

[amqp]
exchange = "from-file"
"#,
    );
    let f = file.display().to_string();
    let by_flag = run(bin("portfleet-controller")
        .args(["config", "check", "--config", &f, "--max-scan-targets", "600"])
        .env("PORTFLEET_LEASE_TTL", "30s")
        .env("PORTFLEET_MAX_SCAN_TARGETS", "550")
        .env("AMQP_URL", "amqp://guest:amqppassword@127.0.0.1:5672/%2f"));
    // The file named by the environment instead of the flag.
    let by_env = run(bin("portfleet-controller")
        .args(["config", "check", "--max-scan-targets", "600"])
        .env("PORTFLEET_CONFIG", &file)
        .env("PORTFLEET_LEASE_TTL", "30s")
        .env("PORTFLEET_MAX_SCAN_TARGETS", "550")
        .env("AMQP_URL", "amqp://guest:amqppassword@127.0.0.1:5672/%2f"));
    for (code, shown, stderr) in [by_flag, by_env] {
        assert_eq!(code, Some(0), "{stderr}");
        assert!(shown.contains(&format!("(config file: {f})")), "{shown}");
        assert_eq!(setting(&shown, "max-scan-probes"), format!("max-scan-probes = 1000  # file {f}"));
        assert_eq!(setting(&shown, "max-scan-targets"), "max-scan-targets = 600  # flag");
        assert_eq!(setting(&shown, "lease-ttl"), "lease-ttl = \"30s\"  # env PORTFLEET_LEASE_TTL");
        assert_eq!(setting(&shown, "insecure"), format!("insecure = true  # file {f}"));
        assert_eq!(setting(&shown, "allow"), format!("allow = \"192.0.2.0/24,198.51.100.7\"  # file {f}"));
        assert_eq!(setting(&shown, "amqp-exchange"), format!("amqp-exchange = \"from-file\"  # file {f}"));
        assert_eq!(setting(&shown, "listen"), "listen = \"0.0.0.0:50051\"  # default");
        assert!(shown.contains(&format!("# database-url = (set; secret, not shown)  # file {f}\n")), "{shown}");
        assert!(shown.contains("# amqp-url = (set; secret, not shown)  # env AMQP_URL\n"), "{shown}");
        for secret in ["filepassword", "amqppassword"] {
            assert!(!shown.contains(secret) && !stderr.contains(secret), "{secret} printed:\n{shown}\n{stderr}");
        }
    }
}

#[test]
fn agent_settings_come_from_file_then_env_then_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "agent.toml",
        r#"
controller = "http://127.0.0.1:1"
max_rate = 100
max-shards = 3
labels = ["site=file", "zone=a"]
no-identify = true
state-dir = "/nonexistent/portfleet-state"
"#,
    );
    let f = file.display().to_string();
    let (code, shown, stderr) = run(bin("portfleet-agent")
        .args(["config", "check", "--config", &f, "--max-rate", "200"])
        .env("PORTFLEET_AGENT_MAX_SHARDS", "4"));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(setting(&shown, "controller"), format!("controller = \"http://127.0.0.1:1\"  # file {f}"));
    assert_eq!(setting(&shown, "max-rate"), "max-rate = 200  # flag");
    assert_eq!(setting(&shown, "max-shards"), "max-shards = 4  # env PORTFLEET_AGENT_MAX_SHARDS");
    assert_eq!(setting(&shown, "labels"), format!("labels = [\"site=file\", \"zone=a\"]  # file {f}"));
    assert_eq!(setting(&shown, "no-identify"), format!("no-identify = true  # file {f}"));
    assert_eq!(setting(&shown, "wait"), "wait = 1000  # default");
    // A bad value from the environment still beats (and fails) the file's.
    let (code, _, stderr) =
        run(bin("portfleet-agent").args(["config", "check", "--config", &f]).env("PORTFLEET_AGENT_MAX_SHARDS", "0"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--max-shards"), "{stderr}");
    // `enroll` reads the controller from `run`'s file (and refuses it
    // before any connection: enrollment needs https://).
    let (code, _, stderr) = run(bin("portfleet-agent").args(["enroll", "--config", &f, "--token", "t", "--ca", &f]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--controller \"http://127.0.0.1:1\": enrollment needs https://"), "{stderr}");
}

#[test]
fn unknown_keys_and_bad_values_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = "postgres://postgres@127.0.0.1:5432/x";
    for (binary, subcommand, text, needle) in [
        (
            "portfleet-controller",
            "serve",
            "insecure = true\nmax-scan-probs = 5\n",
            ":2: `max-scan-probs`: unknown key (did you mean `max-scan-probes`?)",
        ),
        (
            "portfleet-controller",
            "check",
            "[amqp]\nqueue-name = \"q\"\n",
            ":2: `amqp.queue-name`: unknown key (did you mean `amqp-queue`?)",
        ),
        (
            "portfleet-controller",
            "check",
            "max-scan-probes = \"lots\"\n",
            ":1: `max-scan-probes`: invalid value 'lots' for '--max-scan-probes <MAX_SCAN_PROBES>'",
        ),
        (
            "portfleet-controller",
            "check",
            "lease-ttl = \"soon\"\n",
            ":1: `lease-ttl`: invalid value 'soon' for '--lease-ttl <LEASE_TTL>'",
        ),
        ("portfleet-controller", "check", "no-health = \"yes\"\n", ":1: `no-health`: expected true or false"),
        (
            "portfleet-controller",
            "check",
            "DATABASE_URL = \"postgres://x\"\n",
            "`DATABASE_URL`: unknown key (did you mean `database-url`?)",
        ),
        ("portfleet-controller", "migrate", "max-scan-probs = 5\n", "`max-scan-probs`: unknown key"),
        ("portfleet-agent", "run", "max-rat = 5\n", ":1: `max-rat`: unknown key (did you mean `max-rate`?)"),
        (
            "portfleet-agent",
            "check",
            "max-shards = 100\n",
            ":1: `max-shards`: invalid value '100' for '--max-shards <MAX_SHARDS>'",
        ),
        (
            "portfleet-agent",
            "check",
            "allow = [\"10.0.0.0/8\", \"example.com\"]\n",
            ":1: `allow`: invalid value '10.0.0.0/8,example.com'",
        ),
    ] {
        let file = write(&dir, "bad.toml", text);
        let mut cmd = bin(binary);
        match (binary, subcommand) {
            ("portfleet-controller", "check") => cmd.args(["config", "check", "--database-url", db, "--insecure"]),
            ("portfleet-controller", "serve") => cmd.args(["serve", "--database-url", db]),
            ("portfleet-controller", other) => cmd.args([other, "--database-url", db]),
            (_, "check") => cmd.args(["config", "check", "--controller", "http://127.0.0.1:1"]),
            (_, other) => cmd.args([other, "--controller", "http://127.0.0.1:1"]),
        };
        let (code, _, stderr) = run(cmd.arg("--config").arg(&file));
        assert_eq!(code, Some(2), "{binary} {subcommand} {text:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{}{needle}",
                if needle.starts_with(':') { file.display().to_string() } else { String::new() }
            )),
            "{binary} {subcommand} {text:?}: {needle:?} not in {stderr}"
        );
    }
    let (code, _, stderr) = run(bin("portfleet-controller").args(["serve", "--config", "/nonexistent/c.toml"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read config file /nonexistent/c.toml"), "{stderr}");
    // What `serve` would refuse, `config check` refuses.
    let file = write(&dir, "no-tls.toml", &format!("database-url = \"{db}\"\n"));
    let (code, _, stderr) = run(bin("portfleet-controller").args(["config", "check", "--config"]).arg(&file));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no TLS: give --tls-cert"), "{stderr}");
}

/// `print-default` as it is (all comments) and with every default
/// uncommented passes `config check`, which then shows the same values.
fn check_default_file(binary: &str, required: &[&str], dir: &Path) {
    let (code, text, stderr) = run(bin(binary).args(["config", "print-default"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(text.lines().all(|l| l.is_empty() || l.starts_with('#')), "{binary}: a setting is not commented out");
    assert!(text.contains("--config FILE"), "{text}");
    let file = dir.join(format!("{binary}.toml"));
    std::fs::write(&file, &text).unwrap();
    let check = |file: &Path| {
        let (code, shown, stderr) = run(bin(binary).args(["config", "check"]).args(required).arg("--config").arg(file));
        assert_eq!(code, Some(0), "{binary} config check --config {}: {stderr}", file.display());
        shown
    };
    let plain = check(&file);
    // The uncommented defaults, each through the real flag parsers.
    let mut uncommented = String::new();
    let mut has_default = true;
    for line in text.lines() {
        if line.is_empty() {
            has_default = true;
        } else if line.contains("Not set by default.") || line.contains("Required.") {
            has_default = false;
        } else if let Some(setting) = line.strip_prefix("# ").filter(|l| l.contains(" = ") && has_default) {
            uncommented.push_str(setting);
            uncommented.push('\n');
        }
    }
    assert!(uncommented.lines().count() > 10, "{uncommented}");
    let full = dir.join(format!("{binary}-uncommented.toml"));
    std::fs::write(&full, &uncommented).unwrap();
    let values = |shown: &str| -> Vec<String> {
        shown.lines().skip(2).map(|l| l.split("  # ").next().unwrap().to_string()).collect()
    };
    assert_eq!(values(&check(&full)), values(&plain), "{binary}: the defaults, uncommented, differ from the defaults");
    // Every key of the default file is a setting check knows.
    for line in uncommented.lines() {
        let key = line.split(" = ").next().unwrap();
        assert!(plain.contains(&format!("\n{key} = ")) || plain.contains(&format!("\n# {key}")), "{key}");
    }
}

#[test]
fn print_default_output_passes_config_check() {
    let dir = tempfile::tempdir().unwrap();
    check_default_file(
        "portfleet-controller",
        &["--database-url", "postgres://postgres@127.0.0.1:5432/x", "--insecure"],
        dir.path(),
    );
    let state = dir.path().join("state").display().to_string();
    check_default_file("portfleet-agent", &["--controller", "http://127.0.0.1:1", "--state-dir", &state], dir.path());
}

#[tokio::test]
async fn serve_and_tokens_run_on_the_file_s_settings() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let file = write(
        &dir,
        "controller.toml",
        &format!(
            "database-url = \"{}\"\nlisten = \"127.0.0.1:{port}\"\ninsecure = true\nallow = [\"127.0.0.1/32\"]\n\
             log-format = \"json\"\n",
            db.url()
        ),
    );
    // `tokens` takes the database from the same file.
    let (code, token, stderr) =
        run(bin("portfleet-controller").args(["tokens", "create", "--scope", "read", "--config"]).arg(&file));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(token.trim().starts_with("pft_"), "{token}");
    let mut child = bin("portfleet-controller")
        .args(["serve", "--config"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    portfleet_tests::wait_serving(&url, "controller serving on the file's --listen").await;
    let status = portfleet_tests::terminate(&mut child).await;
    assert!(status.success(), "{status:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    // log-format = "json" from the file.
    assert!(stderr.lines().next().is_some_and(|l| l.starts_with('{')), "{stderr}");
}
