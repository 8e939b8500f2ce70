//! `portfleet`: a command-line client of the ScanService, for people and
//! shell scripts. Everything it does is a plain gRPC call that grpcurl
//! could make too.
//!
//! This crate is a client and nothing more: it links `portfleet-proto`,
//! `portfleet-core` (the label rules the controller applies too) and
//! tonic, never the controller's database or broker crates. [`run`]
//! connects and hands each subcommand to its own function.
//!
//! `--agent-label` is checked here with the shared label rules
//! ([`Labels`]); everything else is validated by the controller, which
//! answers `InvalidArgument` naming the field.

#![forbid(unsafe_code)]

use std::{io::Write, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use portfleet_core::labels::Labels;
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

/// The CIDR blocks go to the controller as typed: it parses them with
/// `portfleet_core::policy::parse_cidrs` and answers a bad one with
/// `InvalidArgument` naming the field, which scripts rely on.
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
    /// Whether any option asks for a change (otherwise `policy` only shows).
    fn changes(&self) -> bool {
        !(self.allow.is_empty() && self.deny.is_empty() && self.remove_allow.is_empty() && self.remove_deny.is_empty())
            || self.max_rate_per_host.is_some()
            || self.max_rate_per_block.is_some()
    }
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
    #[arg(long = "agent-label")]
    pub agent_labels: Vec<Labels>,
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

/// Runs the command; returns the process exit status.
pub async fn run(cli: Cli) -> Result<i32, String> {
    let mut c = connect(&cli).await?;
    match cli.command {
        Command::Scan(a) => scan(&mut c, a).await,
        Command::Get { id } => get(&mut c, id).await,
        Command::List { state, limit } => list(&mut c, state, limit).await,
        Command::Results { id, json } => results(&mut c, id, json).await,
        Command::Cancel { id } => cancel(&mut c, id).await,
        Command::Agents => agents(&mut c).await,
        Command::Drain { id } => drain(&mut c, id).await,
        Command::AddTargets { values, group, disabled } => add_targets(&mut c, values, group, disabled).await,
        Command::Targets { group } => targets(&mut c, group).await,
        Command::Policy(a) => policy(&mut c, a).await,
    }
}

/// Opens the channel (TLS with `--ca`) and wraps it in a client that sends
/// the token.
async fn connect(cli: &Cli) -> Result<ApiClient, String> {
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
    Ok(auth::client(channel, Bearer::new(&cli.token)?))
}

/// How a refused call is reported: the gRPC code and the server's message.
fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// `scan`: creates the scan, then (unless `--no-wait`) watches it and
/// prints open ports as they land; exits 0 only if it completed.
async fn scan(c: &mut ApiClient, a: ScanArgs) -> Result<i32, String> {
    let selector = selector(&a.agent_labels)?;
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
        agent_selector: selector.into_map().into_iter().collect(),
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

/// The agent selector: repeated `--agent-label`s add up, a later one
/// winning on a key.
fn selector(labels: &[Labels]) -> Result<Labels, String> {
    labels.iter().try_fold(Labels::default(), |all, more| all.merged(more)).map_err(|e| format!("--agent-label: {e}"))
}

/// `get`: one scan, one line.
async fn get(c: &mut ApiClient, id: String) -> Result<i32, String> {
    let s = c.get_scan(pb::GetScanRequest { id }).await.map_err(status)?.into_inner();
    let _ = writeln!(std::io::stdout().lock(), "{}", describe(&s));
    Ok(0)
}

/// `list`: the first `limit` scans, newest first, optionally in one state.
async fn list(c: &mut ApiClient, state: Option<StateArg>, limit: u32) -> Result<i32, String> {
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
    let mut out = std::io::stdout().lock();
    for s in r.scans {
        let _ = writeln!(out, "{}", describe(&s));
    }
    Ok(0)
}

/// `results`: every result of a scan, page by page.
async fn results(c: &mut ApiClient, id: String, json: bool) -> Result<i32, String> {
    let mut out = std::io::stdout().lock();
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
            return Ok(0);
        }
        token = page.next_page_token;
    }
}

/// `cancel`: cancels a scan and shows it.
async fn cancel(c: &mut ApiClient, id: String) -> Result<i32, String> {
    let s = c.cancel_scan(pb::CancelScanRequest { id }).await.map_err(status)?.into_inner();
    let _ = writeln!(std::io::stdout().lock(), "{}", describe(&s));
    Ok(0)
}

/// `agents`: one line per agent.
async fn agents(c: &mut ApiClient) -> Result<i32, String> {
    let r = c.list_agents(pb::ListAgentsRequest::default()).await.map_err(status)?.into_inner();
    let mut out = std::io::stdout().lock();
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
    Ok(0)
}

/// `drain`: asks an agent to finish its shards and take no new ones.
async fn drain(c: &mut ApiClient, id: String) -> Result<i32, String> {
    let a = c.drain_agent(pb::DrainAgentRequest { id }).await.map_err(status)?.into_inner();
    let _ = writeln!(std::io::stdout().lock(), "{} draining", a.id);
    Ok(0)
}

/// `add-targets`: stores the values in one group.
async fn add_targets(c: &mut ApiClient, values: Vec<String>, group: String, disabled: bool) -> Result<i32, String> {
    let targets = values
        .into_iter()
        .map(|value| pb::Target { value, group: group.clone(), enabled: Some(!disabled), ..Default::default() })
        .collect();
    let r = c.create_targets(pb::CreateTargetsRequest { targets }).await.map_err(status)?.into_inner();
    let _ = writeln!(std::io::stdout().lock(), "{} targets stored", r.targets.len());
    Ok(0)
}

/// `targets`: every stored target (of a group), page by page.
async fn targets(c: &mut ApiClient, group: Option<String>) -> Result<i32, String> {
    let mut out = std::io::stdout().lock();
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
            return Ok(0);
        }
        token = page.next_page_token;
    }
}

/// `policy`: shows the scope policy, or changes it when any option is
/// given and shows the result and the scans the change failed.
async fn policy(c: &mut ApiClient, a: PolicyArgs) -> Result<i32, String> {
    let mut out = std::io::stdout().lock();
    if !a.changes() {
        let p = c.get_scope_policy(pb::GetScopePolicyRequest {}).await.map_err(status)?.into_inner();
        let _ = writeln!(out, "{}", describe_policy(&p));
        return Ok(0);
    }
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
    Ok(0)
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

/// One result as `ip:port` (`[v6]:port`), or a JSON line with naabu's
/// field names.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_labels_follow_the_shared_rules_and_add_up() {
        let cli = Cli::try_parse_from([
            "portfleet",
            "scan",
            "10.0.0.1",
            "--agent-label",
            "site=lab",
            "--agent-label",
            "dc=fra1",
            "--agent-label",
            "site = lab-2",
        ])
        .unwrap();
        let Command::Scan(a) = cli.command else { panic!("scan") };
        assert_eq!(selector(&a.agent_labels).unwrap().to_string(), "dc=fra1,site=lab-2");
        assert!(Cli::try_parse_from(["portfleet", "scan", "--agent-label", "bad key=x"]).is_err());
        assert!(Cli::try_parse_from(["portfleet", "scan", "--agent-label", "novalue"]).is_err());
    }

    #[test]
    fn policy_changes_only_with_options() {
        let cli =
            Cli::try_parse_from(["portfleet", "policy", "--allow", "10.0.0.0/8,192.0.2.1", "--deny", "x"]).unwrap();
        let Command::Policy(a) = cli.command else { panic!("policy") };
        assert!(a.changes());
        assert_eq!((a.allow.len(), a.deny.len()), (2, 1), "split here, parsed by the controller");
        let cli = Cli::try_parse_from(["portfleet", "policy", "--max-rate-per-block", "0"]).unwrap();
        let Command::Policy(a) = cli.command else { panic!("policy") };
        assert!(a.changes());
        let Command::Policy(a) = Cli::try_parse_from(["portfleet", "policy"]).unwrap().command else {
            panic!("policy")
        };
        assert!(!a.changes());
    }

    #[test]
    fn results_print_as_naabu_does() {
        let r = pb::Result { ip: "2001:db8::1".into(), port: 443, ..Default::default() };
        assert_eq!(result_line(&r, false), "[2001:db8::1]:443");
        let r = pb::Result { ip: "192.0.2.1".into(), port: 80, hostname: "web".into(), ..Default::default() };
        assert_eq!(result_line(&r, true), r#"{"host":"web","ip":"192.0.2.1","port":80,"protocol":"tcp"}"#);
    }
}
