//! The `portfleet` command-line client as a user runs it, against a real
//! controller and Postgres (no agent: scans stay pending).

use portfleet_controller::ControllerConfig;
use portfleet_core::policy::parse_cidrs;
use portfleet_tests::{TestController, TestDb};

struct Cli {
    url: String,
    token: String,
}

impl Cli {
    /// Runs `portfleet ARGS`; returns success, stdout and stderr.
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(portfleet_tests::binary("portfleet"))
            .args(["--controller", &self.url])
            .args(args)
            .env("PORTFLEET_TOKEN", &self.token)
            .output()
            .expect("run portfleet");
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "portfleet {args:?} failed: {err}");
        out
    }

    #[track_caller]
    fn fails(&self, args: &[&str], why: &str) {
        let (ok, _, err) = self.run(args);
        assert!(!ok && err.contains(why), "portfleet {args:?}: expected a failure naming {why:?}, got: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_works_and_errors_are_clear() {
    let db = TestDb::create().await;
    let mut config = ControllerConfig::new(db.options());
    config.policy.allow = parse_cidrs("198.51.100.0/24").unwrap();
    let c = TestController::start(config).await;
    let cli = Cli { url: c.url(), token: c.token.clone() };

    let id = cli.ok(&["scan", "198.51.100.0/30", "-p", "80,443", "--no-wait", "--request-id", "k1"]);
    let id = id.trim().to_string();
    assert_eq!(id.len(), 36, "a scan id: {id:?}");
    let again = cli.ok(&["scan", "198.51.100.0/30", "-p", "80,443", "--no-wait", "--request-id", "k1"]);
    assert_eq!(again.trim(), id, "the same request id, the same scan");
    let got = cli.ok(&["get", &id]);
    assert!(got.contains(&id) && got.contains("pending") && got.contains("0/8"), "{got}");
    assert!(cli.ok(&["list"]).contains(&id));
    assert!(cli.ok(&["list", "--state", "completed"]).trim().is_empty());
    assert!(cli.ok(&["results", &id]).trim().is_empty(), "no agent, no results");
    assert!(cli.ok(&["cancel", &id]).contains("cancelled"));
    assert!(cli.ok(&["get", &id]).contains("cancelled"));
    assert!(cli.ok(&["add-targets", "198.51.100.7", "--group", "web"]).contains("1 targets stored"));
    assert!(cli.ok(&["targets", "--group", "web"]).contains("198.51.100.7"));
    assert!(cli.ok(&["agents"]).trim().is_empty());
    assert!(cli.ok(&["policy"]).contains("198.51.100.0/24"));

    cli.fails(&["scan", "203.0.113.1", "-p", "80", "--no-wait"], "PermissionDenied");
    cli.fails(&["scan", "198.51.100.1", "-p", "99999", "--no-wait"], "InvalidArgument");
    cli.fails(&["get", "not-a-scan-id"], "InvalidArgument");
    cli.fails(&["cancel", "01a2263b-2a3c-7376-81d1-2722c461f3bc"], "NotFound");
    let anonymous = Cli { url: c.url(), token: String::new() };
    anonymous.fails(&["list"], "Unauthenticated");
    let nowhere = Cli { url: "http://127.0.0.1:1".into(), token: c.token.clone() };
    nowhere.fails(&["list"], "cannot reach the controller");
}
