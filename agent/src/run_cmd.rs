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
    #[arg(long, env = "PORTFLEET_AGENT_CERT", requires_all = ["key", "ca"])]
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

fn default_state_dir() -> PathBuf {
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

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".into())
}

pub async fn run(args: RunArgs) -> i32 {
    if !(args.controller.starts_with("http://") || args.controller.starts_with("https://")) {
        eprintln!("error: --controller {:?}: expected http://HOST:PORT or https://HOST:PORT", args.controller);
        return 2;
    }
    let read = |flag: &str, p: &PathBuf| std::fs::read(p).map_err(|e| format!("--{flag} {}: {e}", p.display()));
    let tls = match (&args.ca, &args.cert, &args.key) {
        (None, _, _) => None,
        (Some(ca), cert, key) => {
            let loaded = (|| {
                let ca = read("ca", ca)?;
                let identity = match (cert, key) {
                    (Some(c), Some(k)) => Some((read("cert", c)?, read("key", k)?)),
                    _ => None,
                };
                Ok::<_, String>(ClientTls { ca, identity })
            })();
            match loaded {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("error: {e}");
                    return 2;
                }
            }
        }
    };
    let config = AgentConfig {
        controller: args.controller,
        name: args.name.unwrap_or_else(host_name),
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        max_rate: args.max_rate,
        max_shards: args.max_shards,
        state_dir: args.state_dir.unwrap_or_else(default_state_dir),
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
