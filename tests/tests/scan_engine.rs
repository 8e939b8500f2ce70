//! The real `portfleet-agent scan` binary, run inside a scanner namespace
//! against listeners in a target namespace: the found set must be exactly
//! the open set - no misses, no extras, nothing twice. Only addresses in
//! the test's own namespaces (and the scanner namespace's loopback) are
//! probed; the namespaces have no default route.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use portfleet_tests::{
    binary,
    netns::{DEAD_V4, DEAD_V6, LIVE_V4, LIVE_V6, NetTopology, random_open_set},
};

fn agent(topo: &NetTopology) -> Command {
    let mut cmd = topo.in_scanner(binary("portfleet-agent"));
    cmd.arg("scan");
    cmd
}

/// Distinct random ports, avoiding the low range the scans also sweep.
fn random_ports(n: usize) -> Vec<u16> {
    let mut ports = BTreeSet::new();
    while ports.len() < n {
        ports.insert(rand::random_range(2000..=65535u16));
    }
    ports.into_iter().collect()
}

fn port_spec(base: &str, extra: &[u16]) -> String {
    let mut spec = base.to_string();
    for p in extra {
        spec += &format!(",{p}");
    }
    spec
}

/// Parses `ip:port` lines; a line reported twice fails the test.
fn found(out: &Output) -> BTreeSet<SocketAddr> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scan failed: {:?}\n{stderr}", out.status);
    let mut set = BTreeSet::new();
    for line in stdout.lines() {
        let addr: SocketAddr = line.parse().unwrap_or_else(|_| panic!("not ip:port: {line:?}"));
        assert!(set.insert(addr), "{addr} reported twice");
    }
    set
}

#[track_caller]
fn assert_exact(found: &BTreeSet<SocketAddr>, open: &BTreeSet<SocketAddr>, stderr: &[u8]) {
    let missed: Vec<_> = open.difference(found).collect();
    let extra: Vec<_> = found.difference(open).collect();
    assert!(
        missed.is_empty() && extra.is_empty(),
        "missed {missed:?}, extra {extra:?}\n{}",
        String::from_utf8_lossy(stderr)
    );
}

async fn syn_scan_is_exact(v6: bool, rate: u32, base_ports: &str) {
    let Some(topo) = NetTopology::create() else { return };
    let ports = random_ports(6);
    let open = random_open_set(24, v6, &ports);
    let _listeners = topo.listen(&open.iter().copied().collect::<Vec<_>>());
    let (live, dead) = if v6 { (LIVE_V6, DEAD_V6) } else { (LIVE_V4, DEAD_V4) };
    let out = agent(&topo)
        .args([live, dead, "-p", &port_spec(base_ports, &ports), "--scan-type", "syn"])
        .args(["--rate", &rate.to_string(), "--wait", "500"])
        .output()
        .unwrap();
    assert_exact(&found(&out), &open, &out.stderr);
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains(&format!("{} open", open.len())), "{summary}");
    // The silent block's probes were retried and then counted filtered.
    assert!(!summary.contains(" 0 filtered"), "{summary}");
}

#[tokio::test]
async fn syn_ipv4_exact_at_10k_pps() {
    syn_scan_is_exact(false, 10_000, "1-60").await;
}

#[tokio::test]
async fn syn_ipv4_exact_at_100k_pps() {
    syn_scan_is_exact(false, 100_000, "1-1000").await;
}

#[tokio::test]
async fn syn_ipv6_exact_at_10k_pps() {
    syn_scan_is_exact(true, 10_000, "1-60").await;
}

#[tokio::test]
async fn syn_ipv6_exact_at_100k_pps() {
    syn_scan_is_exact(true, 100_000, "1-1000").await;
}

#[tokio::test]
async fn connect_scan_is_exact_for_both_families() {
    let Some(topo) = NetTopology::create() else { return };
    let ports = random_ports(4);
    let mut open = random_open_set(10, false, &ports);
    open.extend(random_open_set(10, true, &ports));
    let _listeners = topo.listen(&open.iter().copied().collect::<Vec<_>>());
    let out = agent(&topo)
        .args([LIVE_V4, LIVE_V6, DEAD_V4, "-p", &port_spec("1-10", &ports), "--scan-type", "connect"])
        .args(["--rate", "20000", "--concurrency", "2048", "--wait", "300"])
        .output()
        .unwrap();
    assert_exact(&found(&out), &open, &out.stderr);
}

#[tokio::test]
async fn hostnames_are_resolved_and_json_has_naabu_fields() {
    let Some(topo) = NetTopology::create() else { return };
    let port = random_ports(1)[0];
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _listeners = topo.listen_in(&topo.scanner, &[listen]);
    let open_v4: SocketAddr = format!("198.18.1.9:{port}").parse().unwrap();
    let _target = topo.listen(&[open_v4]);
    let out = agent(&topo)
        .args(["localhost", "198.18.1.9", "-p", &port.to_string(), "--json", "--wait", "300"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let local = lines.iter().find(|l| l["ip"] == "127.0.0.1").expect("loopback result");
    assert_eq!(local["host"], "localhost");
    assert_eq!(local["port"], u64::from(port));
    assert_eq!(local["protocol"], "tcp");
    assert!(local["timestamp"].as_str().is_some_and(|t| t.contains('T')));
    let remote = lines.iter().find(|l| l["ip"] == "198.18.1.9").expect("namespace result");
    assert!(remote.get("host").is_none(), "no host for a literal address");
}

/// An IPv4-mapped target is its IPv4 host: it is scanned (and reported)
/// as IPv4, and an exclusion written in IPv4 holds for it.
#[tokio::test]
async fn mapped_targets_are_ipv4_hosts_and_ipv4_exclusions_hold() {
    let Some(topo) = NetTopology::create() else { return };
    let port = random_ports(1)[0];
    let (excluded, kept): (SocketAddr, SocketAddr) =
        (format!("198.18.1.5:{port}").parse().unwrap(), format!("198.18.1.6:{port}").parse().unwrap());
    let _listeners = topo.listen(&[excluded, kept]);
    for scan_type in ["connect", "syn"] {
        let out = agent(&topo)
            .args(["::ffff:198.18.1.0/125", "-p", &port.to_string(), "--exclude", "198.18.1.5"])
            .args(["--scan-type", scan_type, "--wait", "300"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{scan_type}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(found(&out), [kept].into(), "{scan_type}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Target-side count of RSTs sent, one per SYN that hit a closed port.
fn target_out_rsts(topo: &NetTopology) -> u64 {
    let out = Command::new("ip").args(["netns", "exec", &topo.target, "cat", "/proc/net/snmp"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names.split_whitespace().position(|n| n == "OutRsts").unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

#[tokio::test]
async fn interrupt_stops_probing_at_once_and_reports_what_was_found() {
    let Some(topo) = NetTopology::create() else { return };
    let child = agent(&topo)
        .args([LIVE_V4, "-p", "full", "--rate", "20000", "--scan-type", "syn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until probes are arriving.
    let start = target_out_rsts(&topo);
    let deadline = Instant::now() + Duration::from_secs(10);
    while target_out_rsts(&topo) < start + 5000 {
        assert!(Instant::now() < deadline, "no probes reached the target");
        std::thread::sleep(Duration::from_millis(20));
    }
    // `ip netns exec` runs the agent as its own process: signal the agent.
    let pid = Command::new("pgrep").args(["-P", &child.id().to_string()]).output().unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    let target_pid = if pid.is_empty() { child.id().to_string() } else { pid };
    Command::new("kill").args(["-INT", &target_pid]).status().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let after = target_out_rsts(&topo);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(target_out_rsts(&topo), after, "probes kept arriving more than 100 ms after the interrupt");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupted at"), "{stderr}");
}

#[test]
fn bad_input_exits_2_naming_the_value() {
    let agent = || {
        let mut c = Command::new(binary("portfleet-agent"));
        c.arg("scan");
        c
    };
    for (args, needle) in [
        (&["192.0.2.300", "-p", "80"][..], "192.0.2.300"),
        (&["192.0.2.1", "-p", "80,70000"][..], "70000"),
        (&["192.0.2.1", "--top-ports", "7"][..], "7"),
        (&["192.0.2.1", "-p", "80", "--exclude", "nope/99"][..], "nope/99"),
        (&["-p", "80"][..], "no targets"),
        (&["192.0.2.1", "-p", "80", "--rate", "0"][..], "--rate"),
    ] {
        let out = agent().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn without_raw_privilege_syn_explains_and_the_default_falls_back_to_connect() {
    let Some(topo) = NetTopology::create() else { return };
    let unprivileged = |args: &[&str]| {
        topo.in_scanner("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
            .arg(binary("portfleet-agent"))
            .arg("scan")
            .args(args)
            .output()
            .unwrap()
    };
    let out = unprivileged(&["198.18.1.1", "-p", "80", "--scan-type", "syn"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("setcap cap_net_raw,cap_net_admin+ep"), "{stderr}");
    assert!(stderr.contains("--scan-type connect"), "{stderr}");

    let port = random_ports(1)[0];
    let open: SocketAddr = format!("198.18.1.20:{port}").parse().unwrap();
    let _listeners = topo.listen(&[open]);
    let out = unprivileged(&["198.18.1.16/29", "-p", &port.to_string(), "--wait", "300"]);
    assert_exact(&found(&out), &BTreeSet::from([open]), &out.stderr);
    assert!(String::from_utf8_lossy(&out.stderr).contains("falling back to a connect scan"));
}

/// On a terminal, results and the progress bar share the screen: every
/// result starts a line of its own (the bar steps aside first), never
/// glued to the bar's text (`...eta 2s198.18.1.7:4222`). Run under a
/// pseudo-terminal (`script`), stdout and stderr both on it.
#[tokio::test]
async fn results_on_a_terminal_never_share_a_line_with_the_progress_bar() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping: no `script` (util-linux) to run the scan on a terminal");
        return;
    }
    let Some(topo) = NetTopology::create() else { return };
    let ports = random_ports(4);
    let open = random_open_set(6, false, &ports);
    let _listeners = topo.listen(&open.iter().copied().collect::<Vec<_>>());
    let hosts: BTreeSet<String> = open.iter().map(|a| a.ip().to_string()).collect();
    // About three seconds of probing, so the bar is up when results come.
    let scan = format!(
        "ip netns exec {} {} scan {} -p {} --scan-type connect --rate 500 --wait 300",
        topo.scanner,
        binary("portfleet-agent").display(),
        hosts.into_iter().collect::<Vec<_>>().join(" "),
        port_spec("1-250", &ports),
    );
    let out = Command::new("script").args(["-qefc", &scan, "/dev/null"]).env_remove("NO_COLOR").output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen:?}");
    // What each line shows once the terminal has applied `\r` and "erase
    // line": the text after the last of them.
    let shown: Vec<&str> =
        screen.split('\n').map(|l| l.trim_end_matches('\r')).map(|l| l.rsplit(['\r']).next().unwrap_or(l)).collect();
    let shown: Vec<&str> = shown.iter().map(|l| l.rsplit("\u{1b}[2K").next().unwrap_or(l)).collect();
    assert!(screen.contains(" probes, "), "the progress bar was never drawn: {screen:?}");
    let mut found = BTreeSet::new();
    for line in shown.iter().filter(|l| open.iter().any(|a| l.contains(&a.to_string()))) {
        let addr: SocketAddr = line.parse().unwrap_or_else(|_| panic!("a result not on a line of its own: {line:?}"));
        assert!(found.insert(addr), "{addr} reported twice");
    }
    assert_exact(&found, &open, screen.as_bytes());
}
