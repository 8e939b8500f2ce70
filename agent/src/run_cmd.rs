//! `portfleet-agent run`: the daemon that takes work from a controller.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::{
    net::NetOptions,
    session::{self, AgentConfig, ClientTls},
};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The controller's gRPC address, e.g. http://controller:50051
    #[arg(long, env = "PORTFLEET_CONTROLLER")]
    pub controller: String,
    /// This agent's name (default: the host name). Agents with different
    /// names on one host are distinct agents.
    #[arg(long, env = "PORTFLEET_AGENT_NAME")]
    pub name: Option<String>,
    /// Labels scans can select agents by, e.g. region=eu,dc=fra1
    #[arg(long, env = "PORTFLEET_AGENT_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Probes per second over all shards (0: no limit of the agent's own).
    #[arg(long = "max-rate", env = "PORTFLEET_AGENT_MAX_RATE", default_value_t = 0)]
    pub max_rate: u32,
    /// Shards worked on at once.
    #[arg(long = "max-shards", env = "PORTFLEET_AGENT_MAX_SHARDS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_shards: u32,
    /// Where the agent keeps its id (default: /var/lib/portfleet as root,
    /// else ~/.local/state/portfleet).
    #[arg(long = "state-dir", env = "PORTFLEET_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Send and receive probes on this interface.
    #[arg(short = 'i', long, env = "PORTFLEET_AGENT_INTERFACE")]
    pub interface: Option<String>,
    /// Source address for probes.
    #[arg(long = "source-ip", env = "PORTFLEET_AGENT_SOURCE_IP")]
    pub source_ip: Option<IpAddr>,
    /// Longest wait for a reply to a probe, in milliseconds.
    #[arg(long, env = "PORTFLEET_AGENT_WAIT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub wait: u64,
    /// Only ever probe these CIDRs, whatever the controller assigns
    /// (default: every address but loopback, link-local and multicast,
    /// which need an explicit allow inside them, e.g. 127.0.0.1/32).
    #[arg(long, env = "PORTFLEET_AGENT_ALLOW", value_parser = parse_nets, default_value = "")]
    pub allow: Nets,
    /// PEM CA that signed the controller's certificate (https:// URLs).
    #[arg(long, env = "PORTFLEET_AGENT_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mTLS (with --key).
    #[arg(long, env = "PORTFLEET_AGENT_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "PORTFLEET_AGENT_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Never probe these CIDRs (wins over --allow).
    #[arg(long, env = "PORTFLEET_AGENT_DENY", value_parser = parse_nets, default_value = "")]
    pub deny: Nets,
}

/// A comma-separated list of CIDR blocks.
#[derive(Clone, Debug, Default)]
pub struct Nets(pub Vec<ipnet::IpNet>);

fn parse_nets(s: &str) -> Result<Nets, String> {
    portfleet_core::policy::parse_cidrs(s).map(Nets)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value"))?;
    let k = k.trim();
    if k.is_empty() || k.len() > 63 || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)) {
        return Err(format!("label key {k:?}: 1-63 letters, digits, '-', '_', '.', '/'"));
    }
    Ok((k.to_string(), v.trim().to_string()))
}

pub fn default_state_dir() -> PathBuf {
    // SAFETY-free check: root's home is not where daemons keep state.
    let root = std::env::var("USER").is_ok_and(|u| u == "root") || std::env::var("HOME").is_ok_and(|h| h == "/root");
    if root {
        return PathBuf::from("/var/lib/portfleet");
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) => PathBuf::from(dir).join("portfleet"),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/state/portfleet"))
            .unwrap_or_else(|| PathBuf::from(".portfleet")),
    }
}

/// The default agent name: this host's.
pub fn host_name() -> String {
    portfleet_core::host_name().unwrap_or_else(|| "agent".into())
}

pub async fn run(args: RunArgs) -> i32 {
    if !(args.controller.starts_with("http://") || args.controller.starts_with("https://")) {
        eprintln!("error: --controller {:?}: expected http://HOST:PORT or https://HOST:PORT", args.controller);
        return 2;
    }
    let name = args.name.clone().unwrap_or_else(host_name);
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let (tls, enrolled_labels) = match client_tls(&args, &state_dir, &name) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    // Labels the enrollment token gave; explicit --labels win.
    let mut labels = enrolled_labels;
    labels.extend(args.labels.iter().cloned());
    let config = AgentConfig {
        controller: args.controller,
        name,
        labels,
        max_rate: args.max_rate,
        max_shards: args.max_shards,
        state_dir,
        net: NetOptions { interface: args.interface, source_ip: args.source_ip },
        wait: Duration::from_millis(args.wait),
        shutdown_timeout: Duration::from_secs(10),
        policy: std::sync::Arc::new(portfleet_core::ScopePolicy::for_agent(&args.allow.0, &args.deny.0)),
        tls,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    match session::run(config, shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// TLS material: `--ca/--cert/--key`, else what `enroll` stored in the
/// state directory; and the labels enrollment gave.
fn client_tls(
    args: &RunArgs,
    dir: &std::path::Path,
    name: &str,
) -> Result<(Option<ClientTls>, BTreeMap<String, String>), String> {
    let read = |what: &str, p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()));
    let stored = |ext: &str| Some(session::state_path(dir, name, ext)).filter(|p| p.exists());
    let mut labels = BTreeMap::new();
    if let Some(p) = stored("labels") {
        let text = String::from_utf8_lossy(&read("labels", &p)?).to_string();
        labels.extend(text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())));
    }
    // Only an enrolled identity (in the state dir) is renewed; files given
    // with --cert/--key belong to whoever issued them.
    let (cert, key, renewable) = match (&args.cert, &args.key) {
        (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone()), false),
        _ => (stored("crt"), stored("key"), true),
    };
    let Some(ca) = args.ca.clone().or_else(|| cert.as_ref().and_then(|_| stored("ca.pem"))) else {
        return Ok((None, labels));
    };
    if renewable && let (Some(c), Some(k)) = (&cert, &key) {
        session::renew::recover(c, k);
    }
    let (identity, renew) = match (cert, key) {
        (Some(c), Some(k)) => (Some((read("--cert", &c)?, read("--key", &k)?)), renewable.then_some((c, k))),
        _ => (None, None),
    };
    Ok((Some(ClientTls { ca: read("--ca", &ca)?, identity, renew }), labels))
}

/// The first SIGINT/SIGTERM hands shards back and exits; a second exits at
/// once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal, exiting now");
    std::process::exit(130);
}
