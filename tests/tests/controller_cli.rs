//! The real `portfleet-controller` binary: config errors, `migrate`, and a
//! graceful stop on SIGTERM.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portfleet_tests::{TestDb, binary};

fn controller() -> Command {
    let mut cmd = Command::new(binary("portfleet-controller"));
    cmd.env_remove("DATABASE_URL").env_remove("PORTFLEET_LISTEN");
    cmd
}

#[track_caller]
fn assert_config_error(args: &[&str], needle: &str) {
    let out = controller().args(args).output().expect("run controller");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
}

#[test]
fn bad_config_exits_non_zero_naming_the_setting() {
    assert_config_error(&["serve"], "--database-url");
    assert_config_error(&["serve", "--database-url", "mysql://root@localhost/x"], "--database-url");
    assert_config_error(
        &["serve", "--database-url", "postgres://postgres@127.0.0.1/x", "--listen", "nowhere"],
        "--listen",
    );
    assert_config_error(
        &["serve", "--database-url", "postgres://postgres@127.0.0.1/x", "--db-pool-size", "0"],
        "--db-pool-size",
    );
    assert_config_error(
        &["serve", "--database-url", "postgres://postgres@127.0.0.1/x", "--shutdown-timeout", "soon"],
        "--shutdown-timeout",
    );
    // Plaintext only when asked for.
    assert_config_error(&["serve", "--database-url", "postgres://postgres@127.0.0.1/x"], "--insecure");
    assert_config_error(
        &["serve", "--database-url", "postgres://postgres@127.0.0.1/x", "--tls-cert", "c.pem"],
        "--tls-key",
    );
    assert_config_error(
        &["serve", "--database-url", "postgres://postgres@127.0.0.1/x", "--allow", "192.0.2.0/33"],
        "--allow",
    );
    let out = controller()
        .args(["serve", "--listen", "x"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1/x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn migrate_then_serve_then_stop_on_sigterm() {
    let db = TestDb::create().await;
    let out = controller().args(["migrate", "--database-url", db.url()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut conn = db.connect().await;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables
         WHERE table_name IN ('targets', 'scans', 'shards', 'agents', 'results', 'scan_hosts')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(tables, 6);

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = controller()
        .args(["serve", "--insecure", "--listen", &format!("127.0.0.1:{port}"), "--log-format", "json"])
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    portfleet_tests::wait_serving(&url, "controller binary serving").await;
    let started = Instant::now();
    let status = portfleet_tests::terminate(&mut child).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(12));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("\"controller stopped\""), "{stderr}");
    assert!(!stderr.contains("postgres://"), "the database URL leaked into the logs");
}

#[tokio::test]
async fn tokens_are_created_listed_and_revoked_from_the_command_line() {
    let db = TestDb::create().await;
    let run = |args: &[&str]| {
        let out = controller().args(["tokens", "--database-url", db.url()]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (token, note) = run(&["create", "--scope", "admin", "--name", "ops"]);
    let token = token.trim().to_string();
    assert!(token.starts_with("pft_") && note.contains("scope admin"), "{token} / {note}");
    let id = token.split('_').nth(1).unwrap().to_string();
    let (listed, _) = run(&["list"]);
    let secret = token.rsplit('_').next().unwrap();
    assert!(!listed.contains(secret), "the secret was listed");
    let line = listed.lines().find(|l| l.replace('-', "").contains(&id)).expect("listed");
    assert!(line.contains("admin") && line.contains("active") && line.contains("ops"), "{line}");
    let uuid = line.split_whitespace().next().unwrap().to_string();
    run(&["revoke", &uuid]);
    let (listed, _) = run(&["list"]);
    assert!(listed.lines().any(|l| l.starts_with(&uuid) && l.contains("revoked")), "{listed}");
    let out = controller().args(["tokens", "--database-url", db.url(), "create", "--scope", "root"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad scope is a usage error");
}

/// A token's lifetime is checked before anything is written: zero, or
/// more than the calendar (or the documented maximum) holds, is a usage
/// error naming `--ttl`, never a panic or an already-expired token.
#[tokio::test]
async fn token_lifetimes_are_checked() {
    let db = TestDb::create().await;
    let create = |ttl: &str| {
        controller()
            .args(["tokens", "--database-url", db.url(), "create", "--scope", "read", "--ttl", ttl])
            .output()
            .unwrap()
    };
    for (ttl, needle) in [("1000000000d", "maximum"), ("0s", "zero"), ("3651d", "maximum")] {
        let out = create(ttl);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {stderr}");
        assert!(stderr.contains("--ttl") && stderr.contains(needle), "--ttl {ttl}: {stderr}");
        assert!(!stderr.contains("panicked") && out.stdout.is_empty(), "--ttl {ttl}: {stderr}");
    }
    let out = create("3650d");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let year = (chrono::Utc::now() + chrono::Duration::days(3650)).format("expires %Y-").to_string();
    assert!(String::from_utf8_lossy(&out.stderr).contains(&year), "{}", String::from_utf8_lossy(&out.stderr));
    let out =
        controller().args(["agents", "--database-url", db.url(), "enroll-token", "--ttl", "0s"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let mut conn = db.connect().await;
    let tokens: i64 = sqlx::query_scalar("SELECT count(*) FROM api_tokens").fetch_one(&mut conn).await.unwrap();
    assert_eq!(tokens, 1, "only the valid token was stored");
}

/// Labels follow one rule set everywhere: what enrollment refuses, a
/// scan's selector refuses too, and what it accepts a selector can match.
#[tokio::test]
async fn enrollment_labels_follow_the_selector_rules() {
    let db = TestDb::create().await;
    let enroll = |labels: &str| {
        controller().args(["agents", "--database-url", db.url(), "enroll-token", "--labels", labels]).output().unwrap()
    };
    for bad in ["bad key=x", "k=a\u{1b}[2Jb", "novalue"] {
        let out = enroll(bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains("--labels"), "{bad:?}: {stderr}");
    }
    let out = enroll("site=lab-1,k8s.io/zone=eu-west");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The same labels as a scan's agent_selector are accepted; the refused
    // ones are refused there too.
    let c = portfleet_tests::TestController::start(portfleet_tests::controller_config(db.options())).await;
    let mut api = c.client().await;
    let scan = |k: &str, v: &str| portfleet_proto::v1::CreateScanRequest {
        targets: vec!["198.51.100.1".into()],
        ports: "80".into(),
        agent_selector: [(k.to_string(), v.to_string())].into(),
        ..Default::default()
    };
    api.create_scan(scan("site", "lab-1")).await.unwrap();
    api.create_scan(scan("k8s.io/zone", "eu-west")).await.unwrap();
    let err = api.create_scan(scan("bad key", "x")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let stored: String =
        sqlx::query_scalar("SELECT labels::text FROM enroll_tokens").fetch_one(&mut db.connect().await).await.unwrap();
    assert!(stored.contains("k8s.io/zone") && stored.contains("lab-1"), "{stored}");
}

/// Shared options work before or after the subcommand (`tokens create
/// --database-url X` as well as `tokens --database-url X create`), and a
/// missing URL is a usage error naming both its flag and its variable.
#[tokio::test]
async fn database_options_go_before_or_after_the_subcommand() {
    let db = TestDb::create().await;
    let url = db.url();
    for args in [
        &["tokens", "create", "--scope", "read", "--database-url", url][..],
        &["tokens", "--database-url", url, "create", "--scope", "read"],
        &["tokens", "list", "--log-format", "json", "--database-url", url, "--db-pool-size", "2"],
        &["agents", "enroll-token", "--database-url", url],
        &["agents", "--database-url", url, "enroll-token", "--ttl", "1h"],
        &["migrate", "--database-url", url],
    ] {
        let out = controller().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = controller().args(["tokens", "list"]).env("DATABASE_URL", url).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for args in [&["tokens", "create", "--scope", "read"][..], &["agents", "enroll-token"], &["migrate"], &["serve"]] {
        assert_config_error(args, "--database-url or DATABASE_URL is required");
    }
}

/// Boolean flags with an environment fallback take the usual spellings
/// (`PORTFLEET_INSECURE=1` was refused: only true/false were).
#[test]
fn boolean_environment_variables_take_the_usual_spellings() {
    // Taken: the controller gets past its settings and fails to bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let serve = |var: &str, value: &str| {
        controller()
            .args(["serve", "--database-url", "postgres://postgres@127.0.0.1/x", "--listen", &listen])
            .env(var, value)
            .output()
            .unwrap()
    };
    for yes in ["1", "yes", "on", "true", "TRUE", "y"] {
        let out = serve("PORTFLEET_INSECURE", yes);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("--listen {listen}")), "PORTFLEET_INSECURE={yes}: {stderr}");
    }
    for no in ["0", "no", "off", "false"] {
        let out = serve("PORTFLEET_INSECURE", no);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "PORTFLEET_INSECURE={no}: {stderr}");
        assert!(stderr.contains("no TLS"), "PORTFLEET_INSECURE={no}: {stderr}");
    }
    let out = serve("PORTFLEET_INSECURE", "maybe");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"), "the setting is named");
    for (var, value) in [("PORTFLEET_NO_HEALTH", "1"), ("PORTFLEET_NO_REFLECTION", "yes"), ("PORTFLEET_NAABUM8", "off")]
    {
        let out = controller()
            .args(["serve", "--insecure", "--database-url", "postgres://postgres@127.0.0.1/x", "--listen", &listen])
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("--listen {listen}")), "{var}={value}: {stderr}");
    }
}
