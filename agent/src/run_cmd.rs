//! `portfleet-agent run`: the daemon that takes work from a controller.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::Args;
use portfleet_core::{labels::Labels, policy::CidrList};
use tokio_util::sync::CancellationToken;

use crate::{
    identify_args::IdentifyArgs,
    net::NetOptions,
    session::{self, AgentConfig, ClientTls},
};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// A TOML file of settings: the long flag names of `run` as keys
    /// (`config print-default` writes one); flags and environment
    /// variables override it. `enroll` reads its controller, ca, name and
    /// state-dir (docs/operations.md).
    #[arg(long = "config", env = "PORTFLEET_AGENT_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// The controller's gRPC address, e.g. http://controller:50051
    #[arg(long, env = "PORTFLEET_CONTROLLER")]
    pub controller: String,
    /// This agent's name (default: the host name). Agents with different
    /// names on one host are distinct agents.
    #[arg(long, env = "PORTFLEET_AGENT_NAME")]
    pub name: Option<String>,
    /// Labels scans can select agents by, e.g. region=eu,dc=fra1 (the
    /// rules of a scan's agent_selector; later ones win on a key).
    #[arg(long, env = "PORTFLEET_AGENT_LABELS", value_parser = parse_labels)]
    pub labels: Vec<Labels>,
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
    #[arg(long, env = "PORTFLEET_AGENT_ALLOW", value_parser = parse_cidrs, default_value = "")]
    pub allow: CidrList,
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
    #[arg(long, env = "PORTFLEET_AGENT_DENY", value_parser = parse_cidrs, default_value = "")]
    pub deny: CidrList,
    /// Never identify services, whatever a scan asks: report open ports
    /// only.
    #[arg(long = "no-identify", env = "PORTFLEET_AGENT_NO_IDENTIFY", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub no_identify: bool,
    /// Serve Prometheus metrics (`/metrics`) and HTTP health checks
    /// (`/healthz`; `/readyz` while a session with the controller is
    /// open) on this address, e.g. 127.0.0.1:9465 (docs/operations.md).
    /// Off unless given.
    #[arg(long = "metrics-listen", env = "PORTFLEET_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub identify: IdentifyArgs,
}

fn parse_cidrs(s: &str) -> Result<CidrList, String> {
    s.parse()
}

fn parse_labels(s: &str) -> Result<Labels, String> {
    s.parse().map_err(|e: portfleet_core::labels::LabelError| e.to_string())
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

fn check_controller(url: &str) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("--controller {url:?}: expected http://HOST:PORT or https://HOST:PORT"));
    }
    Ok(())
}

/// `config check`: what `run` validates before it connects, short of
/// the state directory (its lock and stored identity belong to a running
/// agent): the controller's URL, the TLS files given, the labels and the
/// identification rules. The message names the flag.
pub fn check(args: &RunArgs) -> Result<(), String> {
    check_controller(&args.controller)?;
    for (flag, path) in [("--ca", &args.ca), ("--cert", &args.cert), ("--key", &args.key)] {
        if let Some(p) = path {
            std::fs::File::open(p).map_err(|e| format!("{flag} {}: {e}", p.display()))?;
        }
    }
    args.labels
        .iter()
        .try_fold(Labels::default(), |labels, more| labels.merged(more))
        .map_err(|e| format!("--labels: {e}"))?;
    if !args.no_identify {
        args.identify.identifier().map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub async fn run(args: RunArgs) -> i32 {
    if let Err(e) = check_controller(&args.controller) {
        eprintln!("error: {e}");
        return 2;
    }
    let name = args.name.clone().unwrap_or_else(host_name);
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    // Before any state file is read or repaired, and held until exit.
    let _lock = match session::lock(&state_dir, &name) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let (tls, enrolled_labels) = match client_tls(&args, &state_dir, &name) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    // Labels the enrollment token gave; explicit --labels win.
    let labels = args.labels.iter().try_fold(enrolled_labels, |labels, more| labels.merged(more));
    let labels = match labels {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --labels: {e}");
            return 2;
        }
    };
    let identifier = if args.no_identify {
        None
    } else {
        match args.identify.identifier() {
            Ok(i) => {
                tracing::info!(rules = %i.describe(), "identifying services");
                Some(std::sync::Arc::new(i))
            }
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        }
    };
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
        policy: std::sync::Arc::new(portfleet_core::ScopePolicy::for_agent(&args.allow, &args.deny)),
        tls,
        identifier,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    // Serves until the process exits: health answers through shutdown.
    if let Some(addr) = args.metrics_listen {
        let served = async {
            let metrics = portfleet_telemetry::metrics::Metrics::install(env!("CARGO_PKG_VERSION"))?;
            let listener = portfleet_telemetry::metrics::bind(addr).await?;
            Ok::<_, portfleet_telemetry::metrics::MetricsError>((metrics, listener))
        };
        match served.await {
            Ok((metrics, listener)) => {
                let readiness = crate::metrics::readiness();
                tokio::spawn(portfleet_telemetry::metrics::serve(
                    listener,
                    metrics,
                    readiness,
                    CancellationToken::new(),
                ));
            }
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        }
    }
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
fn client_tls(args: &RunArgs, dir: &std::path::Path, name: &str) -> Result<(Option<ClientTls>, Labels), String> {
    let read = |what: &str, p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()));
    let stored = |ext: &str| Some(session::state_path(dir, name, ext)).filter(|p| p.exists());
    let labels = match stored("labels") {
        Some(p) => session::read_labels(&String::from_utf8_lossy(&read("labels", &p)?))
            .map_err(|e| format!("labels {}: {e} (enroll again)", p.display()))?,
        None => Labels::default(),
    };
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let base = ["agent", "--controller", "http://127.0.0.1:1"];
        Cli::try_parse_from(base.iter().chain(args)).map(|c| c.run)
    }

    #[test]
    fn labels_follow_the_selector_rules_and_later_ones_win() {
        let args = parse(&["--labels", "site=lab, zone=a", "--labels", "zone=b"]).unwrap();
        let labels = args.labels.iter().try_fold(Labels::default(), |l, more| l.merged(more)).unwrap();
        assert_eq!(labels.to_string(), "site=lab,zone=b");
        // What a scan's agent_selector would match.
        assert!(labels.matches(&"zone=b".parse().unwrap()));
        assert!(parse(&["--labels", "bad key=x"]).is_err());
        assert!(parse(&["--labels", "novalue"]).is_err());
        assert!(parse(&["--labels", &format!("k={}", "v".repeat(256))]).is_err());
    }

    #[test]
    fn allow_and_deny_are_cidr_lists() {
        let args = parse(&["--allow", "10.0.0.0/8, 192.0.2.1", "--deny", "10.9.0.0/16"]).unwrap();
        assert_eq!(args.allow.to_string(), "10.0.0.0/8,192.0.2.1/32");
        assert_eq!(args.deny.len(), 1);
        assert!(parse(&[]).unwrap().allow.is_empty());
        assert!(parse(&["--deny", "example.com"]).is_err());
    }
}
