//! `portfleet`: a command-line client of the ScanService, for people and
//! shell scripts. Everything it does is a plain gRPC call that grpcurl
//! could make too.

use std::{collections::BTreeMap, io::Write, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use portfleet_proto::{
    auth::{self, ApiClient, Bearer},
    v1::{self as pb, watch_scan_response::Event},
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "portfleet", version, about = "Command-line client of a portfleet controller.")]
pub struct Cli {
    /// The controller's gRPC address.
    #[arg(long, env = "PORTFLEET_CONTROLLER", default_value = "http://127.0.0.1:50051", global = true)]
    pub controller: String,
    /// PEM CA that signed the controller's certificate (https:// URLs).
    #[arg(long, env = "PORTFLEET_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// API token (`portfleet-controller tokens create`).
    #[arg(long, env = "PORTFLEET_TOKEN", hide_env_values = true, default_value = "", global = true)]
    pub token: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a scan and print its open ports as they are found.
    Scan(ScanArgs),
    /// Show one scan.
    Get { id: String },
    /// List scans, newest first.
    List {
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print a scan's results.
    Results {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a scan.
    Cancel { id: String },
    /// List agents.
    Agents,
    /// Ask an agent to finish its shards and take no new ones.
    Drain { id: String },
    /// Store targets (addresses, CIDR blocks, ranges, hostnames).
    AddTargets {
        values: Vec<String>,
        #[arg(long, default_value = "")]
        group: String,
        #[arg(long)]
        disabled: bool,
    },
    /// List stored targets.
    Targets {
        #[arg(long)]
        group: Option<String>,
    },
    /// Show the scope policy and politeness caps; with options, change
    /// them (an admin token; pending and running scans put out of scope
    /// fail).
    Policy(PolicyArgs),
}

#[derive(Args, Debug)]
pub struct PolicyArgs {
    /// Allow these CIDR blocks (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Deny these CIDR blocks (deny wins).
    #[arg(long, value_delimiter = ',')]
    pub deny: Vec<String>,
    /// Remove these allow rules.
    #[arg(long = "remove-allow", value_delimiter = ',')]
    pub remove_allow: Vec<String>,
    /// Remove these deny rules.
    #[arg(long = "remove-deny", value_delimiter = ',')]
    pub remove_deny: Vec<String>,
    /// Probes per second one address may receive from all scans together
    /// (0: no cap).
    #[arg(long = "max-rate-per-host")]
    pub max_rate_per_host: Option<u32>,
    /// Probes per second one /24 (IPv6 /64) may receive (0: no cap).
    #[arg(long = "max-rate-per-block")]
    pub max_rate_per_block: Option<u32>,
}

impl PolicyArgs {
    fn changes(&self) -> bool {
        !(self.allow.is_empty() && self.deny.is_empty() && self.remove_allow.is_empty() && self.remove_deny.is_empty())
            || self.max_rate_per_host.is_some()
            || self.max_rate_per_block.is_some()
    }
}

fn describe_policy(p: &pb::ScopePolicy) -> String {
    let list = |v: &[String]| if v.is_empty() { "(none)".to_string() } else { v.join(", ") };
    let cap = |n: u32| if n == 0 { "no cap".to_string() } else { format!("{n} probes/s") };
    format!(
        "allow     {}\ndeny      {}\nbuilt-in  {}\nper host  {}\nper block {} (IPv4 /24, IPv6 /64)",
        list(&p.allow),
        list(&p.deny),
        list(&p.builtin_deny),
        cap(p.max_rate_per_host),
        cap(p.max_rate_per_block)
    )
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// Addresses, CIDR blocks, ranges and hostnames.
    pub targets: Vec<String>,
    /// Scan every enabled target of this group too.
    #[arg(long)]
    pub group: Option<String>,
    /// Ports: 80,443,8000-8100, top-100, top-1000, full.
    #[arg(short = 'p', long, default_value = "top-100")]
    pub ports: String,
    /// Probes per second for the whole scan.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    #[arg(long)]
    pub retries: Option<u32>,
    #[arg(long = "type", value_enum, default_value_t = TypeArg::Syn)]
    pub scan_type: TypeArg,
    /// Let agents without raw sockets run a SYN scan as a connect scan.
    #[arg(long)]
    pub allow_connect_fallback: bool,
    /// Idempotency key: the same key returns the same scan.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Only agents with these labels (key=value).
    #[arg(long = "agent-label", value_parser = parse_kv)]
    pub agent_labels: Vec<(String, String)>,
    /// Create the scan and print its id, without waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// Results as JSON Lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum TypeArg {
    Syn,
    Connect,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum StateArg {
    Pending,
    Running,
    Completed,
    Cancelled,
    Failed,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not key=value"))
}

fn state_name(state: i32) -> &'static str {
    match pb::ScanState::try_from(state) {
        Ok(pb::ScanState::Pending) => "pending",
        Ok(pb::ScanState::Running) => "running",
        Ok(pb::ScanState::Completed) => "completed",
        Ok(pb::ScanState::Cancelled) => "cancelled",
        Ok(pb::ScanState::Failed) => "failed",
        _ => "unknown",
    }
}

fn result_line(r: &pb::Result, json: bool) -> String {
    if json {
        let mut v = serde_json::json!({ "ip": r.ip, "port": r.port, "protocol": "tcp" });
        if !r.hostname.is_empty() {
            v["host"] = serde_json::Value::String(r.hostname.clone());
        }
        return v.to_string();
    }
    match r.ip.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, r.port as u16).to_string(),
        Err(_) => format!("{}:{}", r.ip, r.port),
    }
}

fn describe(s: &pb::Scan) -> String {
    let mut line = format!(
        "{}  {:<9}  {}/{} probes  {} open",
        s.id,
        state_name(s.state),
        s.probes_done,
        s.probes_planned,
        s.open_ports
    );
    if !s.waiting_reason.is_empty() {
        line += &format!("  waiting: {}", s.waiting_reason);
    }
    if !s.error.is_empty() {
        line += &format!("  error: {}", s.error);
    }
    line
}

/// Runs the command; returns the process exit status.
pub async fn run(cli: Cli) -> Result<i32, String> {
    let mut endpoint = Channel::from_shared(cli.controller.clone())
        .map_err(|e| format!("--controller {}: {e}", cli.controller))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &cli.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        endpoint = endpoint.tls_config(auth::client_tls(&pem, None)).map_err(|e| format!("--ca: {e}"))?;
    } else if cli.controller.starts_with("https://") {
        return Err("an https:// controller needs --ca (the CA that signed its certificate)".into());
    }
    let channel =
        endpoint.connect().await.map_err(|e| format!("cannot reach the controller at {}: {e}", cli.controller))?;
    let mut c = auth::client(channel, Bearer::new(&cli.token)?);
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Scan(a) => return scan(&mut c, a).await,
        Command::Get { id } => {
            let s = c.get_scan(pb::GetScanRequest { id }).await.map_err(status)?.into_inner();
            let _ = writeln!(out, "{}", describe(&s));
        }
        Command::List { state, limit } => {
            let state = state.map_or(0, |s| match s {
                StateArg::Pending => pb::ScanState::Pending,
                StateArg::Running => pb::ScanState::Running,
                StateArg::Completed => pb::ScanState::Completed,
                StateArg::Cancelled => pb::ScanState::Cancelled,
                StateArg::Failed => pb::ScanState::Failed,
            } as i32);
            let r = c
                .list_scans(pb::ListScansRequest { state, page_size: limit, page_token: String::new() })
                .await
                .map_err(status)?
                .into_inner();
            for s in r.scans {
                let _ = writeln!(out, "{}", describe(&s));
            }
        }
        Command::Results { id, json } => {
            let mut token = String::new();
            loop {
                let page = c
                    .list_results(pb::ListResultsRequest { scan_id: id.clone(), page_size: 10_000, page_token: token })
                    .await
                    .map_err(status)?
                    .into_inner();
                for r in &page.results {
                    let _ = writeln!(out, "{}", result_line(r, json));
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        Command::Cancel { id } => {
            let s = c.cancel_scan(pb::CancelScanRequest { id }).await.map_err(status)?.into_inner();
            let _ = writeln!(out, "{}", describe(&s));
        }
        Command::Agents => {
            let r = c.list_agents(pb::ListAgentsRequest::default()).await.map_err(status)?.into_inner();
            for a in r.agents {
                let state = match pb::AgentState::try_from(a.state) {
                    Ok(pb::AgentState::Connected) => "connected",
                    Ok(pb::AgentState::Draining) => "draining",
                    Ok(pb::AgentState::Gone) => "gone",
                    _ => "unknown",
                };
                let _ = writeln!(
                    out,
                    "{}  {:<20}  {:<9}  {}  shards {}  {} probes/s  {}",
                    a.id,
                    a.name,
                    state,
                    if a.raw_socket { "syn" } else { "connect-only" },
                    a.active_shards,
                    a.current_rate,
                    a.controller_id
                );
            }
        }
        Command::Policy(a) if a.changes() => {
            let r = c
                .update_scope_policy(pb::UpdateScopePolicyRequest {
                    add_allow: a.allow,
                    add_deny: a.deny,
                    remove_allow: a.remove_allow,
                    remove_deny: a.remove_deny,
                    max_rate_per_host: a.max_rate_per_host,
                    max_rate_per_block: a.max_rate_per_block,
                })
                .await
                .map_err(status)?
                .into_inner();
            let _ = writeln!(out, "{}", describe_policy(&r.policy.unwrap_or_default()));
            for id in r.failed_scan_ids {
                let _ = writeln!(out, "failed (now out of scope): {id}");
            }
        }
        Command::Policy(_) => {
            let p = c.get_scope_policy(pb::GetScopePolicyRequest {}).await.map_err(status)?.into_inner();
            let _ = writeln!(out, "{}", describe_policy(&p));
        }
        Command::Drain { id } => {
            let a = c.drain_agent(pb::DrainAgentRequest { id }).await.map_err(status)?.into_inner();
            let _ = writeln!(out, "{} draining", a.id);
        }
        Command::AddTargets { values, group, disabled } => {
            let targets = values
                .into_iter()
                .map(|value| pb::Target { value, group: group.clone(), enabled: Some(!disabled), ..Default::default() })
                .collect();
            let r = c.create_targets(pb::CreateTargetsRequest { targets }).await.map_err(status)?.into_inner();
            let _ = writeln!(out, "{} targets stored", r.targets.len());
        }
        Command::Targets { group } => {
            let mut token = String::new();
            loop {
                let page = c
                    .list_targets(pb::ListTargetsRequest {
                        group: group.clone(),
                        enabled_only: false,
                        page_size: 1000,
                        page_token: token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                for t in &page.targets {
                    let enabled = if t.enabled.unwrap_or(true) { "" } else { "  (disabled)" };
                    let _ = writeln!(out, "{}  {:<12}  {}{enabled}", t.id, t.group, t.value);
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
    }
    Ok(0)
}

async fn scan(c: &mut ApiClient, a: ScanArgs) -> Result<i32, String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let request = pb::CreateScanRequest {
        targets: a.targets,
        target_group: a.group.unwrap_or_default(),
        ports: a.ports,
        scan_type: match a.scan_type {
            TypeArg::Syn => pb::ScanType::Syn,
            TypeArg::Connect => pb::ScanType::Connect,
        } as i32,
        rate: a.rate,
        retries: a.retries,
        request_id: a.request_id.unwrap_or_default(),
        labels: Default::default(),
        agent_selector: a.agent_labels.into_iter().collect::<BTreeMap<_, _>>().into_iter().collect(),
        allow_connect_fallback: a.allow_connect_fallback,
    };
    let scan = c.create_scan(request).await.map_err(status)?.into_inner();
    if a.no_wait {
        println!("{}", scan.id);
        return Ok(0);
    }
    eprintln!("scan {} created: {} probes in {} shards", scan.id, scan.probes_planned, scan.shard_count);
    let mut events = c.watch_scan(pb::WatchScanRequest { id: scan.id.clone() }).await.map_err(status)?.into_inner();
    let mut out = std::io::stdout().lock();
    let mut last = scan;
    let mut said_waiting = String::new();
    while let Some(event) = events.next().await {
        match event.map_err(status)?.event {
            Some(Event::Results(r)) => {
                for r in &r.results {
                    if writeln!(out, "{}", result_line(r, a.json)).and_then(|()| out.flush()).is_err() {
                        return Ok(0);
                    }
                }
            }
            Some(Event::Scan(s)) => {
                if !s.waiting_reason.is_empty() && s.waiting_reason != said_waiting {
                    eprintln!("waiting: {}", s.waiting_reason);
                    said_waiting = s.waiting_reason.clone();
                }
                last = s;
            }
            None => {}
        }
    }
    eprintln!("{}", describe(&last));
    Ok(if last.state == pb::ScanState::Completed as i32 { 0 } else { 1 })
}
