//! The `portfleet` command-line client as a user runs it, against a real
//! controller and Postgres. The agents are the harness's test doubles
//! (`FakeAgent`), which report made-up results and never send a packet;
//! a terminal is a pseudo-terminal from `script(1)`.

use std::{
    net::IpAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use portfleet_controller::ControllerConfig;
use portfleet_core::policy::parse_cidrs;
use portfleet_proto::v1::controller_message::Frame as In;
use portfleet_tests::{TestController, TestDb, fake_agent::FakeAgent};
use tokio::io::AsyncReadExt;

/// Erases the terminal line: what the progress line is drawn and taken
/// away with.
const ERASE: &str = "\x1b[2K";

struct Cli {
    url: String,
    token: String,
}

impl Cli {
    fn of(c: &TestController) -> Self {
        Cli { url: c.url(), token: c.token.clone() }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(portfleet_tests::binary("portfleet"));
        cmd.args(["--controller", &self.url]).args(args).env("PORTFLEET_TOKEN", &self.token).kill_on_drop(true);
        cmd
    }

    /// Runs `portfleet ARGS`; returns the exit code, stdout and stderr.
    async fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = self.command(args).output().await.expect("run portfleet");
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args).await;
        assert_eq!(code, Some(0), "portfleet {args:?} failed: {err}");
        out
    }

    async fn fails(&self, args: &[&str], why: &str) {
        let (code, _, err) = self.run(args).await;
        assert!(
            code != Some(0) && err.contains(why),
            "portfleet {args:?}: expected a failure naming {why:?}, got: {err}"
        );
    }
}

/// The value of `field:` in `get`-style output.
fn field<'a>(out: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}:");
    out.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name:?} field in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_works_and_errors_are_clear() {
    let db = TestDb::create().await;
    let mut config = ControllerConfig::new(db.options());
    config.policy.allow = parse_cidrs("198.51.100.0/24").unwrap();
    let c = TestController::start(config).await;
    let cli = Cli::of(&c);

    let id = cli.ok(&["scan", "198.51.100.0/30", "-p", "80,443", "--no-wait", "--request-id", "k1"]).await;
    let id = id.trim().to_string();
    assert_eq!(id.len(), 36, "a scan id: {id:?}");
    let again = cli.ok(&["scan", "198.51.100.0/30", "-p", "80,443", "--no-wait", "--request-id", "k1"]).await;
    assert_eq!(again.trim(), id, "the same request id, the same scan");

    // `get`: the whole scan, a field per line.
    let got = cli.ok(&["get", &id]).await;
    assert_eq!(field(&got, "id"), id);
    assert_eq!(field(&got, "state"), "pending");
    assert_eq!(field(&got, "targets"), "198.51.100.0/30");
    assert_eq!(field(&got, "ports"), "80,443 (2 ports)");
    assert_eq!(field(&got, "request id"), "k1");
    assert_eq!(field(&got, "probes"), "0/8 (0.0%)");
    assert_eq!(field(&got, "shards"), "1 shard");
    assert_eq!(field(&got, "started"), "-");
    assert!(field(&got, "created").ends_with('Z'), "{got}");

    // `list`: a header row, then aligned rows with the creation time.
    let list = cli.ok(&["list"]).await;
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(lines[0].starts_with("ID ") && lines[0].contains("STATE") && lines[0].contains("CREATED"), "{list}");
    assert!(lines[1].starts_with(&id) && lines[1].contains("pending") && lines[1].contains("0/8"), "{list}");
    assert_eq!(lines[0].find("STATE"), lines[1].find("pending"), "aligned:\n{list}");
    assert_eq!(cli.ok(&["list", "--no-headers"]).await.lines().count(), 1);
    assert!(cli.ok(&["list", "--state", "completed"]).await.trim().is_empty());
    assert!(cli.ok(&["results", &id]).await.trim().is_empty(), "no agent, no results");
    assert!(cli.ok(&["cancel", &id]).await.contains("cancelled"));
    assert_eq!(field(&cli.ok(&["get", &id]).await, "state"), "cancelled");

    // Targets: stored, listed with headers and times, deleted.
    let added = cli.ok(&["add-targets", "198.51.100.7", "--group", "web"]).await;
    assert!(added.starts_with("ID ") && added.contains("198.51.100.7"), "{added}");
    let (_, _, said) = cli.run(&["add-targets", "198.51.100.8", "198.51.100.9", "--group", "web"]).await;
    assert!(said.contains("2 targets stored"), "{said}");
    let (_, _, said) = cli.run(&["add-targets", "198.51.100.10", "--group", "web"]).await;
    assert!(said.contains("1 target stored"), "{said}");
    let listed = cli.ok(&["targets", "--group", "web"]).await;
    let header = listed.lines().next().unwrap();
    assert!(header.contains("GROUP") && header.contains("CREATED") && header.contains("VALUE"), "{listed}");
    let row = listed.lines().find(|l| l.ends_with("198.51.100.7")).expect("the target");
    let target_id = row.split_whitespace().next().unwrap().to_string();
    assert!(cli.ok(&["delete-target", &target_id]).await.contains(&target_id));
    assert!(!cli.ok(&["targets", "--group", "web"]).await.lines().any(|l| l.ends_with("198.51.100.7")));
    cli.fails(&["delete-target", &target_id], "NotFound").await;

    assert!(cli.ok(&["agents"]).await.trim().is_empty());

    // The policy: the operator's rules, then the built-in list and this
    // host's addresses apart, each entry once.
    let policy = cli.ok(&["policy"]).await;
    assert_eq!(field(&policy, "allow"), "198.51.100.0/24");
    let builtin: Vec<&str> = field(&policy, "built-in deny").split(", ").collect();
    let host: Vec<&str> = field(&policy, "this host").split(", ").collect();
    assert!(builtin.contains(&"127.0.0.0/8") && builtin.contains(&"fe80::/10"), "{policy}");
    assert!(!host.contains(&"127.0.0.1/32") && !host.contains(&"::1/128"), "covered by the built-ins:\n{policy}");
    let mut all = [builtin.clone(), host.clone()].concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), builtin.len() + host.len(), "an entry twice:\n{policy}");

    // A dry run: the plan, nothing stored.
    let plan = cli
        .ok(&[
            "scan",
            "--dry-run",
            "198.51.100.0/28",
            "-p",
            "22,80,8080",
            "--exclude",
            "198.51.100.0/30",
            "--exclude-ports",
            "8080",
            "--rate",
            "10",
            "--retries",
            "0",
        ])
        .await;
    assert_eq!(field(&plan, "verdict"), "allowed");
    assert!(field(&plan, "addresses").starts_with("12 ("), "{plan}");
    assert_eq!(field(&plan, "excluded"), "4 addresses");
    assert_eq!(field(&plan, "probes"), "24");
    assert_eq!(field(&plan, "capable agents"), "none connected");
    assert_eq!(field(&plan, "estimated"), "at most 2s");
    let refused = cli.ok(&["scan", "--dry-run", "203.0.113.1", "-p", "80"]).await;
    assert!(field(&refused, "verdict").starts_with("refused: 203.0.113.1"), "{refused}");
    assert_eq!(cli.ok(&["list", "--no-headers"]).await.lines().count(), 1, "a dry run stored a scan");
    cli.fails(&["scan", "198.51.100.1", "-p", "80", "--exclude", "198.51.100.0/24", "--no-wait"], "exclude").await;
    cli.fails(&["scan", "198.51.100.1", "-p", "80", "--deadline", "soon", "--no-wait"], "--deadline").await;

    // Schedules: created, listed, shown, changed, paused, resumed, deleted.
    let made = cli
        .ok(&[
            "schedules",
            "create",
            "--name",
            "nightly",
            "--cron",
            "0 3 * * *",
            "--tz",
            "Europe/Paris",
            "--overlap",
            "queue",
            "-p",
            "80",
            "--priority",
            "8",
            "198.51.100.9",
        ])
        .await;
    let sid = field(&made, "id").to_string();
    assert!(field(&made, "next run").ends_with('Z'), "{made}");
    let listed = cli.ok(&["schedules", "list"]).await;
    assert!(listed.lines().nth(1).is_some_and(|l| l.starts_with(&sid) && l.contains("queue")), "{listed}");
    let shown = cli.ok(&["schedules", "get", &sid]).await;
    assert_eq!(field(&shown, "when"), "cron \"0 3 * * *\" Europe/Paris");
    assert_eq!(field(&shown, "priority"), "8");
    assert_eq!(field(&shown, "targets"), "198.51.100.9");
    let changed = cli.ok(&["schedules", "update", &sid, "--every", "2h"]).await;
    assert_eq!(field(&changed, "when"), "every 2h");
    assert_eq!(field(&changed, "targets"), "198.51.100.9", "the template kept");
    let changed = cli.ok(&["schedules", "update", &sid, "--template", "-p", "443", "198.51.100.10"]).await;
    assert_eq!(field(&changed, "targets"), "198.51.100.10");
    assert!(cli.ok(&["schedules", "pause", &sid]).await.starts_with("paused"));
    assert_eq!(field(&cli.ok(&["schedules", "get", &sid]).await, "paused"), "true");
    assert!(cli.ok(&["schedules", "resume", &sid]).await.starts_with("resumed"));
    cli.fails(&["schedules", "create", "--cron", "0 3 * *", "198.51.100.9"], "schedule.cron").await;
    cli.fails(&["schedules", "create", "--every", "10s", "198.51.100.9"], "schedule.interval").await;
    cli.fails(&["schedules", "create", "--every", "1h", "203.0.113.1"], "PermissionDenied").await;
    assert!(cli.ok(&["schedules", "delete", &sid]).await.contains(&sid));
    cli.fails(&["schedules", "get", &sid], "NotFound").await;

    cli.fails(&["scan", "203.0.113.1", "-p", "80", "--no-wait"], "PermissionDenied").await;
    cli.fails(&["scan", "198.51.100.1", "-p", "99999", "--no-wait"], "InvalidArgument").await;
    cli.fails(&["get", "not-a-scan-id"], "InvalidArgument").await;
    cli.fails(&["cancel", "01a2263b-2a3c-7376-81d1-2722c461f3bc"], "NotFound").await;
    cli.fails(&["drain", "no-such-agent"], "no agent is named \"no-such-agent\"").await;
    let anonymous = Cli { url: c.url(), token: String::new() };
    anonymous.fails(&["list"], "Unauthenticated").await;
    let nowhere = Cli { url: "http://127.0.0.1:1".into(), token: c.token.clone() };
    nowhere.fails(&["list"], "cannot reach the controller").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_no_agent_can_take_says_why_and_times_out_naming_its_state() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let cli = Cli::of(&c);
    let started = Instant::now();
    let (code, out, err) = cli.run(&["scan", "198.51.100.1", "-p", "80", "--timeout", "5s"]).await;
    let took = started.elapsed();
    assert_eq!(code, Some(124), "exits as timeout(1) does: {err}");
    assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(15), "{took:?}");
    assert!(out.is_empty(), "nothing on stdout: {out:?}");
    // Whole lines only: no progress line without a terminal.
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines[0].starts_with("scan ") && lines[0].ends_with("created: 1 probe in 1 shard"), "{err}");
    let id = lines[0].split_whitespace().nth(1).unwrap();
    let waiting: Vec<&&str> = lines.iter().filter(|l| l.contains("is waiting: ")).collect();
    assert_eq!(waiting.len(), 1, "said once: {err}");
    assert!(waiting[0].contains("no agent"), "the controller's reason: {err}");
    let last = lines.last().unwrap();
    assert!(
        last.starts_with(&format!("timed out after 5s: scan {id} is pending")) && last.contains("not cancelled"),
        "{err}"
    );
    // Not cancelled: still pending.
    assert_eq!(field(&cli.ok(&["get", id]).await, "state"), "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_prints_its_results_and_results_sorts_them_by_address() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let cli = Cli::of(&c);
    let mut agent = FakeAgent::connect(&c, "edge-1").await;
    let scan = cli
        .command(&["scan", "198.51.100.0/28", "2001:db8::/126", "-p", "80,443", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portfleet scan");
    let assign = agent.assigned(Duration::from_secs(10)).await.expect("the scan's shard");
    // Reported out of order, and in an order where text and numbers differ.
    let found: Vec<(IpAddr, u16)> = [
        ("198.51.100.10", 80),
        ("2001:db8::1", 443),
        ("198.51.100.9", 443),
        ("198.51.100.9", 80),
        ("198.51.100.2", 443),
    ]
    .iter()
    .map(|(ip, port)| (ip.parse().unwrap(), *port))
    .collect();
    agent.finish(&assign, &found).await;
    let out = tokio::time::timeout(Duration::from_secs(20), scan.wait_with_output())
        .await
        .expect("the scan ends")
        .expect("portfleet scan");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "completed: {stderr}");
    assert!(stderr.contains("created: 40 probes in 1 shard"), "{stderr}");
    assert!(stderr.contains("completed: ") && stderr.trim_end().ends_with(", 5 open ports"), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    for l in &lines {
        assert_eq!(l["protocol"], "tcp");
        assert!(l["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
    }
    let id = stderr.split_whitespace().nth(1).unwrap().to_string();

    let sorted = ["198.51.100.2:443", "198.51.100.9:80", "198.51.100.9:443", "198.51.100.10:80", "[2001:db8::1]:443"];
    assert_eq!(cli.ok(&["results", &id]).await.lines().collect::<Vec<_>>(), sorted);
    let json = cli.ok(&["results", &id, "--json"]).await;
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!((first["ip"].as_str(), first["port"].as_u64()), (Some("198.51.100.2"), Some(443)));
    // The schema of `portfleet-agent scan --json`.
    let mut keys: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["ip", "port", "protocol", "timestamp"]);

    let got = cli.ok(&["get", &id]).await;
    assert_eq!(field(&got, "state"), "completed");
    assert_eq!(field(&got, "open ports"), "5");
    assert_eq!(field(&got, "addresses"), "20");
    assert!(field(&got, "ended").ends_with('Z') && field(&got, "duration") != "-", "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_takes_a_name_and_undrain_gives_the_agent_work_again() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let cli = Cli::of(&c);
    let mut agent = FakeAgent::connect(&c, "edge-1").await;

    let said = cli.ok(&["drain", "edge-1"]).await;
    assert!(said.contains(&agent.id) && said.contains("draining"), "{said}");
    assert!(matches!(agent.next().await, In::Drain(_)));
    let agents = cli.ok(&["agents"]).await;
    assert!(agents.starts_with("ID ") && agents.contains("CONNECTED"), "{agents}");
    let row = agents.lines().find(|l| l.starts_with(&agent.id)).expect("the agent");
    assert!(row.contains("edge-1") && row.contains("draining"), "{agents}");

    cli.ok(&["scan", "198.51.100.1", "-p", "80", "--no-wait"]).await;
    assert!(agent.assigned(Duration::from_secs(2)).await.is_none(), "drained: no new work");
    let said = cli.ok(&["undrain", "edge-1"]).await;
    assert!(said.contains("undrained"), "{said}");
    assert!(agent.assigned(Duration::from_secs(5)).await.is_some(), "undrained: work again");
    assert!(cli.ok(&["agents"]).await.lines().any(|l| l.starts_with(&agent.id) && l.contains("connected")));
    // By id too; undraining an agent that is not draining changes nothing.
    assert!(cli.ok(&["undrain", &agent.id]).await.contains("undrained"));

    // A name two connected agents share names neither.
    let twin = FakeAgent::connect(&c, "edge-1").await;
    let (code, _, err) = cli.run(&["drain", "edge-1"]).await;
    assert_ne!(code, Some(0));
    assert!(
        err.contains("2 agents are named \"edge-1\"") && err.contains(&agent.id) && err.contains(&twin.id),
        "{err}"
    );
}

/// Reads what the terminal shows until `marker` appears (or `wait` ends).
async fn read_until(from: &mut tokio::process::ChildStdout, seen: &mut String, marker: &str, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while !seen.contains(marker) {
        match tokio::time::timeout_at(deadline, from.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => panic!("no {marker:?} on the terminal; it shows:\n{seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_progress_is_drawn_in_place_and_never_glued_to_a_line() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "script(1) (util-linux) is needed for the terminal test");
        eprintln!("skipped: no script(1) to make a terminal with");
        return;
    }
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let cli = Cli::of(&c);
    // stdout and stderr both on one pseudo-terminal, as in a shell.
    let line = format!(
        "'{}' --controller '{}' scan 198.51.100.1 198.51.100.2 -p 80 --timeout 60s",
        portfleet_tests::binary("portfleet").display(),
        cli.url
    );
    let mut term = tokio::process::Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .env("PORTFLEET_TOKEN", &cli.token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn script");
    let mut shown = term.stdout.take().unwrap();
    let mut seen = String::new();
    // No agent yet: the progress line, then the reason on a line of its own.
    read_until(&mut shown, &mut seen, "is waiting: ", Duration::from_secs(15)).await;
    assert!(seen.contains("pending  0/2 (0.0%)"), "{seen:?}");
    let mut agent = FakeAgent::connect(&c, "edge-1").await;
    let assign = agent.assigned(Duration::from_secs(10)).await.expect("the scan's shard");
    let found: Vec<(IpAddr, u16)> = vec![("198.51.100.2".parse().unwrap(), 80), ("198.51.100.1".parse().unwrap(), 80)];
    agent.finish(&assign, &found).await;
    read_until(&mut shown, &mut seen, "completed: ", Duration::from_secs(20)).await;
    let status = tokio::time::timeout(Duration::from_secs(10), term.wait()).await.expect("exits").expect("script");
    assert_eq!(status.code(), Some(0), "{seen:?}");
    // Every line printed starts at the left edge: right after the progress
    // line was erased, or after another line.
    let id = seen.split("scan ").nth(1).and_then(|s| s.split_whitespace().next()).expect("the created line");
    for (what, prefix) in [
        ("198.51.100.1:80", String::new()),
        ("198.51.100.2:80", String::new()),
        ("is waiting: ", format!("scan {id} ")),
        ("completed: ", format!("scan {id} ")),
    ] {
        let at = seen.find(what).unwrap_or_else(|| panic!("no {what:?} in {seen:?}"));
        let line_start = seen[..at].rfind(['\n', '\r']).map_or(0, |i| i + 1);
        let before = &seen[line_start..at];
        assert_eq!(before.strip_prefix(ERASE).unwrap_or(before), prefix, "{what:?} glued to {before:?} in {seen:?}");
    }
}
