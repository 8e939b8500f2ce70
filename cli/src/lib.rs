//! `portfleet`: a command-line client of the ScanService, for people and
//! shell scripts. Everything it does is a plain gRPC call that grpcurl
//! could make too.
//!
//! This crate is a client and nothing more: it links `portfleet-proto`,
//! `portfleet-core` (the label rules the controller applies too, and the
//! result line the agent prints too) and tonic, never the controller's
//! database or broker crates. [`run`] connects and hands each subcommand
//! to its own function; `show` formats answers, `watch` follows a scan,
//! `export` and `nmap` print results in other tools' formats, `inventory`
//! asks about the network memory (hosts, changes, diffs), `webhooks` and
//! `retention` manage what the controller sends and keeps, and `args`
//! parses the flag values several subcommands share.
//!
//! `--agent-label` is checked here with the shared label rules
//! ([`Labels`]); everything else is validated by the controller, which
//! answers `InvalidArgument` naming the field.
//!
//! Scripts: results and tables go to stdout, everything else to stderr;
//! output never depends on whether stdout is a terminal (no colour, fixed
//! columns; `--no-headers` drops the header rows). Only `scan` draws a
//! progress line, on stderr, and only when stderr is a terminal.

#![forbid(unsafe_code)]

mod args;
mod export;
mod inventory;
mod nmap;
mod retention;
mod schedules;
mod show;
mod watch;
mod webhooks;

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant, SystemTime},
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use portfleet_core::labels::Labels;
use portfleet_proto::{
    auth::{self, ApiClient, Bearer},
    v1::{self as pb, watch_scan_response::Event},
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::show::{Table, count};
pub use crate::{
    args::{ChangeKindArg, ListFormat, PortStateArg, ResultsFormat, ViewFormat},
    export::ResultsArgs,
    inventory::{ChangesArgs, DiffArgs, HostsArgs},
    retention::RetentionCommand,
    schedules::SchedulesCommand,
    webhooks::WebhooksCommand,
};

/// The exit status of `scan --timeout` when time runs out (as timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;
/// The exit status of `scan` stopped by Ctrl-C (128 + SIGINT, as shells).
pub const EXIT_INTERRUPTED: i32 = 130;

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
    /// Tables and CSV without their header row (for scripts).
    #[arg(long, global = true)]
    pub no_headers: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a scan and print its open ports as they are found.
    ///
    /// Open ports go to stdout as `ip:port` lines (or JSON Lines with
    /// --json); on stderr, a progress line when stderr is a terminal, and
    /// why the scan waits when it stays pending for a few seconds.
    /// Exits 0 when the scan completed, 1 when it failed or was cancelled,
    /// 124 when --timeout ran out, 130 on Ctrl-C; the last two leave the
    /// scan running.
    Scan(ScanArgs),
    /// Show one scan: every field, one `field: value` per line.
    Get { id: String },
    /// List scans, newest first.
    List {
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// At most this many scans.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print a scan's open ports, sorted by address (IPv4 first) and port.
    ///
    /// --format text (the default) prints `ip:port` lines, jsonl the schema
    /// of `portfleet-agent scan --json`, csv a header row and a record per
    /// port, nmap-xml nmap's XML output (-oX, for tools that import nmap
    /// scans), masscan masscan's list output (-oL). The filters are applied
    /// by the controller.
    Results(ResultsArgs),
    /// Cancel a scan.
    Cancel { id: String },
    /// Delete finished scans.
    ///
    /// A completed, cancelled or failed scan is gone from every list at
    /// once; its results are removed in the background. The inventory keeps
    /// what it found. A pending or running scan is refused: cancel it
    /// first. Stops at the first refusal (the scans before it are deleted).
    Delete {
        /// Scan ids, as `list` shows them.
        #[arg(required = true, value_name = "SCAN_ID")]
        ids: Vec<String>,
    },
    /// List the hosts any scan found open (the inventory), by address.
    ///
    /// One row per host: its names, how many ports are open now, when it
    /// was first and last seen open; jsonl and csv add its target groups.
    Hosts(HostsArgs),
    /// Show one address from the inventory: its ports and latest changes.
    ///
    /// Every port any scan found open on it (open now, or closed since a
    /// later scan probed it), and its latest changes, newest first.
    Host {
        /// The address.
        ip: String,
        /// Output format: text, or one JSON object with its ports and
        /// changes.
        #[arg(long, value_enum, default_value_t = ViewFormat::Text)]
        format: ViewFormat,
    },
    /// List what opened, closed or changed service, newest first.
    ///
    /// A change is only recorded where a later scan really probed the port:
    /// a port a scan did not cover has not closed.
    Changes(ChangesArgs),
    /// Compare two scans: what opened and closed from A to B.
    ///
    /// Compared over the ports both scans finished probing. Prints the
    /// counts, then every entry: `+ ip:port opened`, `- ip:port closed`,
    /// `? ip:port only in A` (open in A, never probed by B) or `only in B`.
    Diff(DiffArgs),
    /// Manage webhooks (an admin token).
    ///
    /// The controller POSTs each event to the URL, at least once, signed
    /// with the webhook's secret.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Recurring scans: create, list, show, change, pause, resume, delete.
    ///
    /// Each run is a normal scan labelled `portfleet.schedule=ID`; `get`
    /// shows the next run and the last runs with their scans' states.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Show how long finished scans are kept; `retention set` changes it.
    ///
    /// An admin token. `retention set 90d` deletes finished scans 90 days
    /// after they ended; `retention set forever` (or 0) keeps them. Shared
    /// by every controller; a change applies within a minute.
    Retention {
        #[command(subcommand)]
        command: Option<RetentionCommand>,
    },
    /// List agents.
    Agents,
    /// Ask an agent to finish its shards and take no new ones.
    ///
    /// AGENT is an id or a name (a name that several connected agents
    /// share is refused, listing their ids). `undrain` ends the drain.
    ///
    /// A drain lasts for the agent's current session: it is stored in
    /// Postgres with the agent, so every controller honours it, but the
    /// agent's next session - after the agent or its controller restarts,
    /// or the connection drops - starts undrained. Drain again then, or
    /// stop the agent.
    Drain {
        /// The agent's id or name.
        agent: String,
    },
    /// End an agent's drain: it takes new shards again (within a second).
    ///
    /// AGENT is an id or a name, as for `drain`.
    Undrain {
        /// The agent's id or name.
        agent: String,
    },
    /// Store targets (addresses, CIDR blocks, ranges, hostnames) and list
    /// them.
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
    /// Delete stored targets by id (see `targets`).
    DeleteTarget {
        /// Target ids, as `targets` lists them.
        #[arg(required = true)]
        ids: Vec<String>,
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
    #[command(flatten)]
    pub spec: ScanSpec,
    /// Idempotency key: the same key returns the same scan.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Cancel the scan, keeping what it found, if it is still running at
    /// this time: RFC 3339 (2026-12-07T18:00:00Z) or a duration from now
    /// (2h, 30m).
    #[arg(long, value_parser = deadline)]
    pub deadline: Option<prost_types::Timestamp>,
    /// Print what the scan would do (addresses after resolution and
    /// exclusions, probes, shards, the scope policy's verdict, the agents
    /// that could run it, the estimated duration) without creating it.
    #[arg(long)]
    pub dry_run: bool,
    /// Create the scan and print its id, without waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// Results as JSON Lines, the schema of `portfleet-agent scan --json`.
    #[arg(long)]
    pub json: bool,
    /// Stop waiting after this long (30s, 5m, 1h) and exit 124, naming the
    /// scan's state. The scan is not cancelled: it goes on, and `get`,
    /// `results` or `cancel` reach it later.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// What a scan is of and how it runs: `scan`'s and `schedules create`'s.
#[derive(Args, Debug, Clone)]
pub struct ScanSpec {
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
    /// Discovery only: do not identify what answers on open ports.
    #[arg(long = "no-identify")]
    pub no_identify: bool,
    /// A host with more open ports than this answers everything (a SYN
    /// proxy or tarpit). 0: no limit. Default: the controller's, 100.
    #[arg(long = "port-threshold", visible_alias = "pts")]
    pub port_threshold: Option<u32>,
    /// Weight of the scan's share of the agents among running scans, 1
    /// (least) to 10 (most). Default: 5.
    #[arg(long)]
    pub priority: Option<u32>,
    /// At most this many agents work on the scan at once (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_agents: u32,
    /// At most this many of its shards run at once (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_parallel_shards: u32,
    /// Never probe these addresses, CIDR blocks or ranges (comma-separated
    /// or repeated).
    #[arg(long, value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Never probe these ports (80,443,8000-8100).
    #[arg(long)]
    pub exclude_ports: Option<String>,
    /// Which addresses of a hostname: 4, 6 or both (default both).
    #[arg(long, value_enum)]
    pub ip_version: Option<IpVersionArg>,
    /// Only the first address of each hostname (per family), as naabu
    /// without -sa; default every address.
    #[arg(long)]
    pub first_ip: bool,
    /// Addresses of CDN and WAF providers: all (every port, the default),
    /// web (80 and 443 only, naabu's -ec) or skip.
    #[arg(long, value_enum)]
    pub cdn: Option<CdnArg>,
    /// Only agents with these labels (key=value).
    #[arg(long = "agent-label")]
    pub agent_labels: Vec<Labels>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum IpVersionArg {
    #[value(name = "4")]
    V4,
    #[value(name = "6")]
    V6,
    Both,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum CdnArg {
    All,
    Web,
    Skip,
}

impl ScanSpec {
    /// The request it stands for (no idempotency key, deadline or dry run).
    pub fn request(&self) -> Result<pb::CreateScanRequest, String> {
        let selector = selector(&self.agent_labels)?;
        Ok(pb::CreateScanRequest {
            targets: self.targets.clone(),
            target_group: self.group.clone().unwrap_or_default(),
            ports: self.ports.clone(),
            scan_type: match self.scan_type {
                TypeArg::Syn => pb::ScanType::Syn,
                TypeArg::Connect => pb::ScanType::Connect,
            } as i32,
            rate: self.rate,
            retries: self.retries,
            request_id: String::new(),
            labels: Default::default(),
            agent_selector: selector.into_map().into_iter().collect(),
            allow_connect_fallback: self.allow_connect_fallback,
            identify: self.no_identify.then_some(false),
            port_threshold: self.port_threshold,
            priority: self.priority,
            max_agents: self.max_agents,
            max_parallel_shards: self.max_parallel_shards,
            exclude: self.exclude.clone(),
            exclude_ports: self.exclude_ports.clone().unwrap_or_default(),
            ip_version: match self.ip_version {
                None => pb::IpVersion::Unspecified,
                Some(IpVersionArg::V4) => pb::IpVersion::IpVersion4,
                Some(IpVersionArg::V6) => pb::IpVersion::IpVersion6,
                Some(IpVersionArg::Both) => pb::IpVersion::Both,
            } as i32,
            scan_all_ips: self.first_ip.then_some(false),
            cdn_policy: match self.cdn {
                None => pb::CdnPolicy::Unspecified,
                Some(CdnArg::All) => pb::CdnPolicy::All,
                Some(CdnArg::Web) => pb::CdnPolicy::WebPorts,
                Some(CdnArg::Skip) => pb::CdnPolicy::Skip,
            } as i32,
            deadline: None,
            validate_only: false,
        })
    }
}

/// `--deadline`: an RFC 3339 time, or a duration from now.
fn deadline(s: &str) -> Result<prost_types::Timestamp, String> {
    let t = match chrono::DateTime::parse_from_rfc3339(s) {
        Ok(t) => t.to_utc(),
        Err(_) => {
            let d = humantime::parse_duration(s)
                .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration (2h, 30m)"))?;
            chrono::Utc::now() + chrono::Duration::from_std(d).map_err(|e| e.to_string())?
        }
    };
    Ok(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
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
    let headers = !cli.no_headers;
    match cli.command {
        Command::Scan(a) => scan(&mut c, a).await,
        Command::Get { id } => get(&mut c, id).await,
        Command::List { state, limit } => list(&mut c, state, limit, headers).await,
        Command::Results(a) => export::results(&mut c, a, headers).await,
        Command::Cancel { id } => cancel(&mut c, id).await,
        Command::Delete { ids } => retention::delete_scans(&mut c, ids).await,
        Command::Hosts(a) => inventory::hosts(&mut c, a, headers).await,
        Command::Host { ip, format } => inventory::host(&mut c, ip, format, headers).await,
        Command::Changes(a) => inventory::changes(&mut c, a, headers).await,
        Command::Diff(a) => inventory::diff(&mut c, a).await,
        Command::Webhooks(w) => webhooks::run(&mut c, w, headers).await,
        Command::Schedules(s) => schedules::run(&mut c, s, headers).await,
        Command::Retention { command } => retention::retention(&mut c, command).await,
        Command::Agents => agents(&mut c, headers).await,
        Command::Drain { agent } => drain(&mut c, &agent, Drain::On).await,
        Command::Undrain { agent } => drain(&mut c, &agent, Drain::Off).await,
        Command::AddTargets { values, group, disabled } => add_targets(&mut c, values, group, disabled, headers).await,
        Command::Targets { group } => targets(&mut c, group, headers).await,
        Command::DeleteTarget { ids } => delete_targets(&mut c, ids).await,
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
pub(crate) fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), show::clean(s.message()))
}

/// The largest page the controller serves for agents, targets, hosts,
/// changes and webhooks.
pub(crate) const PAGE: u32 = 1000;

/// `scan`: creates the scan, then (unless `--no-wait`) watches it and
/// prints open ports as they land; exits 0 only if it completed.
async fn scan(c: &mut ApiClient, a: ScanArgs) -> Result<i32, String> {
    let request = pb::CreateScanRequest {
        request_id: a.request_id.clone().unwrap_or_default(),
        deadline: a.deadline,
        validate_only: a.dry_run,
        ..a.spec.request()?
    };
    let scan = c.create_scan(request).await.map_err(status)?.into_inner();
    if a.dry_run {
        show::plan(&mut std::io::stdout().lock(), &scan).map_err(|e| e.to_string())?;
        return Ok(0);
    }
    if a.no_wait {
        println!("{}", scan.id);
        return Ok(0);
    }
    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + t);
    let id = scan.id.clone();
    eprintln!(
        "scan {id} created: {} in {}",
        count(scan.probes_planned, "probe"),
        count(u64::from(scan.shard_count), "shard")
    );
    let mut events = c.watch_scan(pb::WatchScanRequest { id: id.clone() }).await.map_err(status)?.into_inner();
    let tty = std::io::stderr().is_terminal();
    let mut view = watch::View::new(std::io::stdout(), std::io::stderr(), tty, a.json, scan, Instant::now());
    // Redraws the progress line and times the waiting reason between
    // events.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = events.next() => match event {
                None => break,
                Some(Err(e)) => {
                    view.erase();
                    return Err(format!("watching scan {id}: {}", status(e)));
                }
                Some(Ok(pb::WatchScanResponse { event: Some(Event::Results(r)) })) => {
                    view.on_results(&r.results, Instant::now());
                    if view.closed() {
                        // stdout's reader left (`| head`): done, quietly.
                        view.erase();
                        return Ok(0);
                    }
                }
                Some(Ok(pb::WatchScanResponse { event: Some(Event::Scan(s)) })) => view.on_scan(s, Instant::now()),
                Some(Ok(_)) => {}
            },
            _ = tick.tick() => view.tick(Instant::now()),
            _ = tokio::signal::ctrl_c() => {
                view.say(&format!(
                    "interrupted: scan {id} goes on (`portfleet cancel {id}` stops it)"
                ));
                return Ok(EXIT_INTERRUPTED);
            }
            () = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                if deadline.is_some() =>
            {
                let s = view.scan().clone();
                let waiting = if s.waiting_reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", show::clean(&s.waiting_reason))
                };
                view.say(&format!(
                    "timed out after {}: scan {id} is {}{waiting}, {}; it was not cancelled \
                     (`portfleet cancel {id}` stops it)",
                    show::duration(a.timeout.unwrap_or_default()),
                    show::state_name(s.state),
                    show::progress(&s),
                ));
                return Ok(EXIT_TIMEOUT);
            }
        }
    }
    let last = view.scan().clone();
    view.say(&show::summary(&last));
    Ok(if last.state == pb::ScanState::Completed as i32 { 0 } else { 1 })
}

/// The agent selector: repeated `--agent-label`s add up, a later one
/// winning on a key.
fn selector(labels: &[Labels]) -> Result<Labels, String> {
    labels.iter().try_fold(Labels::default(), |all, more| all.merged(more)).map_err(|e| format!("--agent-label: {e}"))
}

/// `get`: the whole scan, `field: value` lines.
async fn get(c: &mut ApiClient, id: String) -> Result<i32, String> {
    let s = c.get_scan(pb::GetScanRequest { id }).await.map_err(status)?.into_inner();
    let _ = show::fields(&mut std::io::stdout().lock(), &show::scan_fields(&s, SystemTime::now()));
    Ok(0)
}

/// Most characters of a scan's targets `list` shows.
const TARGETS_COLUMN: usize = 48;

/// `list`: up to `limit` scans, newest first, optionally in one state,
/// page by page.
async fn list(c: &mut ApiClient, state: Option<StateArg>, limit: u32, headers: bool) -> Result<i32, String> {
    let state = state.map_or(0, |s| match s {
        StateArg::Pending => pb::ScanState::Pending,
        StateArg::Running => pb::ScanState::Running,
        StateArg::Completed => pb::ScanState::Completed,
        StateArg::Cancelled => pb::ScanState::Cancelled,
        StateArg::Failed => pb::ScanState::Failed,
    } as i32);
    let mut out = std::io::stdout().lock();
    let mut table = Table::new(&["ID", "STATE", "CREATED", "PROBES", "OPEN", "TARGETS"], headers);
    let (mut left, mut token) = (limit, String::new());
    while left > 0 {
        let page = c
            .list_scans(pb::ListScansRequest { state, page_size: left.min(PAGE), page_token: token })
            .await
            .map_err(status)?
            .into_inner();
        let rows: Vec<Vec<String>> = page.scans.iter().take(left as usize).map(scan_row).collect();
        left = left.saturating_sub(rows.len() as u32);
        let _ = table.page(&mut out, &rows);
        if page.next_page_token.is_empty() || rows.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if table.rows() == 0 {
        eprintln!("no scans");
    }
    Ok(0)
}

fn scan_row(s: &pb::Scan) -> Vec<String> {
    let r = s.request.clone().unwrap_or_default();
    let mut what = r.targets.join(" ");
    if !r.target_group.is_empty() {
        what = format!("{what} group={}", r.target_group).trim_start().to_string();
    }
    let mut what = show::or_dash(&what);
    if what.chars().count() > TARGETS_COLUMN {
        what = what.chars().take(TARGETS_COLUMN - 3).collect::<String>() + "...";
    }
    vec![
        s.id.clone(),
        show::state_name(s.state).into(),
        show::time(s.create_time.as_ref()),
        format!("{}/{}", s.probes_done, s.probes_planned),
        s.open_ports.to_string(),
        what,
    ]
}

/// `cancel`: cancels a scan and shows it.
async fn cancel(c: &mut ApiClient, id: String) -> Result<i32, String> {
    let s = c.cancel_scan(pb::CancelScanRequest { id }).await.map_err(status)?.into_inner();
    let _ = writeln!(std::io::stdout().lock(), "{}", show::summary(&s));
    Ok(0)
}

/// Every agent, page by page.
async fn all_agents(c: &mut ApiClient) -> Result<Vec<pb::Agent>, String> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_agents(pb::ListAgentsRequest { state: 0, page_size: PAGE, page_token: token })
            .await
            .map_err(status)?
            .into_inner();
        all.extend(page.agents);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

/// `agents`: a table of every agent, page by page.
async fn agents(c: &mut ApiClient, headers: bool) -> Result<i32, String> {
    let mut out = std::io::stdout().lock();
    let mut table =
        Table::new(&["ID", "NAME", "STATE", "PROBES", "SHARDS", "RATE", "CONNECTED", "CONTROLLER", "LABELS"], headers);
    let mut token = String::new();
    loop {
        let page = c
            .list_agents(pb::ListAgentsRequest { state: 0, page_size: PAGE, page_token: token })
            .await
            .map_err(status)?
            .into_inner();
        let rows: Vec<Vec<String>> = page
            .agents
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    show::or_dash(&a.name),
                    show::agent_state_name(a.state).into(),
                    if a.raw_socket { "syn" } else { "connect-only" }.into(),
                    format!("{}/{}", a.active_shards, a.max_shards),
                    format!("{}/s", a.current_rate),
                    show::time(a.connect_time.as_ref()),
                    show::or_dash(&a.controller_id),
                    show::labels(&a.labels),
                ]
            })
            .collect();
        let _ = table.page(&mut out, &rows);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if table.rows() == 0 {
        eprintln!("no agents");
    }
    Ok(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    On,
    Off,
}

/// `drain` / `undrain`: starts or ends an agent's drain.
async fn drain(c: &mut ApiClient, agent: &str, drain: Drain) -> Result<i32, String> {
    let id = resolve_agent(c, agent).await?;
    let a = match drain {
        Drain::On => c.drain_agent(pb::DrainAgentRequest { id }).await,
        Drain::Off => c.undrain_agent(pb::UndrainAgentRequest { id }).await,
    }
    .map_err(status)?
    .into_inner();
    let what = match (drain, pb::AgentState::try_from(a.state)) {
        (Drain::On, _) => "draining: finishing its shards, taking no new ones",
        (Drain::Off, Ok(pb::AgentState::Connected)) => "undrained: taking new shards again",
        // A leaving agent stays draining.
        (Drain::Off, _) => show::agent_state_name(a.state),
    };
    let _ = writeln!(std::io::stdout().lock(), "agent {} ({}) {what}", a.id, show::or_dash(&a.name));
    Ok(0)
}

/// An agent id as given, or the id of the one agent with that name:
/// connected agents first, so a name an agent had before it was
/// re-enrolled under a new id still names the live one.
async fn resolve_agent(c: &mut ApiClient, agent: &str) -> Result<String, String> {
    if uuid::Uuid::parse_str(agent).is_ok() {
        return Ok(agent.to_string());
    }
    let all = all_agents(c).await?;
    pick_agent(&all, agent)
}

fn pick_agent(all: &[pb::Agent], name: &str) -> Result<String, String> {
    let named: Vec<&pb::Agent> = all.iter().filter(|a| a.name == name).collect();
    let live: Vec<&pb::Agent> = named.iter().copied().filter(|a| a.state != pb::AgentState::Gone as i32).collect();
    let candidates = if live.is_empty() { named } else { live };
    match candidates.as_slice() {
        [] => Err(format!("no agent is named {} (see `portfleet agents`)", portfleet_core::text::echo(name))),
        [one] => Ok(one.id.clone()),
        many => Err(format!(
            "{} are named {}: {}; give one's id",
            count(many.len() as u64, "agent"),
            portfleet_core::text::echo(name),
            many.iter()
                .map(|a| format!("{} ({})", a.id, show::agent_state_name(a.state)))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

const TARGET_HEADERS: &[&str] = &["ID", "GROUP", "KIND", "ENABLED", "CREATED", "VALUE"];

fn target_row(t: &pb::Target) -> Vec<String> {
    let kind = match pb::TargetKind::try_from(t.kind) {
        Ok(pb::TargetKind::Address) => "address",
        Ok(pb::TargetKind::Cidr) => "cidr",
        Ok(pb::TargetKind::Range) => "range",
        Ok(pb::TargetKind::Hostname) => "hostname",
        _ => "unknown",
    };
    vec![
        t.id.clone(),
        show::or_dash(&t.group),
        kind.into(),
        if t.enabled.unwrap_or(true) { "yes" } else { "no" }.into(),
        show::time(t.create_time.as_ref()),
        show::clean(&t.value),
    ]
}

/// `add-targets`: stores the values in one group and lists them as
/// stored (normalised).
async fn add_targets(
    c: &mut ApiClient,
    values: Vec<String>,
    group: String,
    disabled: bool,
    headers: bool,
) -> Result<i32, String> {
    let targets = values
        .into_iter()
        .map(|value| pb::Target { value, group: group.clone(), enabled: Some(!disabled), ..Default::default() })
        .collect();
    let r = c.create_targets(pb::CreateTargetsRequest { targets }).await.map_err(status)?.into_inner();
    let rows: Vec<Vec<String>> = r.targets.iter().map(target_row).collect();
    let _ = Table::new(TARGET_HEADERS, headers).page(&mut std::io::stdout().lock(), &rows);
    eprintln!("{} stored", count(r.targets.len() as u64, "target"));
    Ok(0)
}

/// `targets`: every stored target (of a group), page by page.
async fn targets(c: &mut ApiClient, group: Option<String>, headers: bool) -> Result<i32, String> {
    let mut out = std::io::stdout().lock();
    let mut table = Table::new(TARGET_HEADERS, headers);
    let mut token = String::new();
    loop {
        let page = c
            .list_targets(pb::ListTargetsRequest {
                group: group.clone(),
                enabled_only: false,
                page_size: PAGE,
                page_token: token,
            })
            .await
            .map_err(status)?
            .into_inner();
        let rows: Vec<Vec<String>> = page.targets.iter().map(target_row).collect();
        let _ = table.page(&mut out, &rows);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if table.rows() == 0 {
        eprintln!("no targets");
    }
    Ok(0)
}

/// `delete-target`: deletes each id in turn; stops at the first refusal,
/// naming it (those before it are deleted, and said so).
async fn delete_targets(c: &mut ApiClient, ids: Vec<String>) -> Result<i32, String> {
    let mut out = std::io::stdout().lock();
    for id in ids {
        c.delete_target(pb::DeleteTargetRequest { id: id.clone() })
            .await
            .map_err(|e| format!("target {}: {}", portfleet_core::text::echo(&id), status(e)))?;
        let _ = writeln!(out, "deleted {id}");
    }
    Ok(0)
}

/// `policy`: shows the scope policy, or changes it when any option is
/// given and shows the result and the scans the change failed.
async fn policy(c: &mut ApiClient, a: PolicyArgs) -> Result<i32, String> {
    let mut out = std::io::stdout().lock();
    if !a.changes() {
        let p = c.get_scope_policy(pb::GetScopePolicyRequest {}).await.map_err(status)?.into_inner();
        let _ = show::fields(&mut out, &policy_fields(&p));
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
    let _ = show::fields(&mut out, &policy_fields(&r.policy.unwrap_or_default()));
    for id in r.failed_scan_ids {
        let _ = writeln!(out, "failed (now out of scope): {id}");
    }
    Ok(0)
}

/// The policy as labelled lists, each entry once: the built-in entries
/// apart from this controller's own addresses (a controller that does not
/// tell them apart shows them all as built-in).
fn policy_fields(p: &pb::ScopePolicy) -> Vec<(&'static str, String)> {
    fn list<'a>(v: impl Iterator<Item = &'a String>) -> String {
        let mut seen: Vec<&str> = Vec::new();
        for s in v {
            if !seen.contains(&s.as_str()) {
                seen.push(s);
            }
        }
        if seen.is_empty() { "(none)".into() } else { show::clean(&seen.join(", ")) }
    }
    let cap = |n: u32| if n == 0 { "no cap".to_string() } else { format!("{n} probes/s") };
    vec![
        ("allow", list(p.allow.iter())),
        ("deny", list(p.deny.iter())),
        ("built-in deny", list(p.builtin_deny.iter().filter(|d| !p.host_addresses.contains(d)))),
        ("this host", list(p.host_addresses.iter())),
        ("per host", cap(p.max_rate_per_host)),
        ("per block", format!("{} (IPv4 /24, IPv6 /64)", cap(p.max_rate_per_block))),
    ]
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
        assert_eq!(selector(&a.spec.agent_labels).unwrap().to_string(), "dc=fra1,site=lab-2");
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
    fn results_print_as_the_agent_does_with_their_timestamp() {
        let at = prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 };
        let r = pb::Result { ip: "2001:db8::1".into(), port: 443, observed_at: Some(at), ..Default::default() };
        assert_eq!(watch::found(&r).unwrap().to_string(), "[2001:db8::1]:443");
        let r = pb::Result {
            ip: "192.0.2.1".into(),
            port: 80,
            hostname: "web".into(),
            observed_at: Some(at),
            ..Default::default()
        };
        assert_eq!(
            watch::found(&r).unwrap().to_json(),
            r#"{"host":"web","ip":"192.0.2.1","port":80,"protocol":"tcp","timestamp":"2023-11-14T22:13:20.000000000Z"}"#
        );
    }

    #[test]
    fn timeout_takes_human_durations() {
        let cli = Cli::try_parse_from(["portfleet", "scan", "192.0.2.1", "--timeout", "1m 30s"]).unwrap();
        let Command::Scan(a) = cli.command else { panic!("scan") };
        assert_eq!(a.timeout, Some(Duration::from_secs(90)));
        assert!(Cli::try_parse_from(["portfleet", "scan", "192.0.2.1", "--timeout", "soon"]).is_err());
    }

    #[test]
    fn an_agent_name_names_one_live_agent_or_is_refused_with_the_ids() {
        let agent = |id: &str, name: &str, state: pb::AgentState| pb::Agent {
            id: id.into(),
            name: name.into(),
            state: state as i32,
            ..Default::default()
        };
        let all = [
            agent("a1", "web-1", pb::AgentState::Gone),
            agent("a2", "web-1", pb::AgentState::Connected),
            agent("a3", "db", pb::AgentState::Gone),
            agent("a4", "twin", pb::AgentState::Connected),
            agent("a5", "twin", pb::AgentState::Draining),
        ];
        assert_eq!(pick_agent(&all, "web-1").unwrap(), "a2", "the live one");
        assert_eq!(pick_agent(&all, "db").unwrap(), "a3", "gone, the server says so");
        let err = pick_agent(&all, "twin").unwrap_err();
        assert!(err.contains("2 agents") && err.contains("a4 (connected)") && err.contains("a5 (draining)"), "{err}");
        assert!(pick_agent(&all, "nope").unwrap_err().contains("no agent is named \"nope\""));
    }

    #[test]
    fn the_policy_shows_built_ins_and_host_addresses_apart_and_once() {
        let p = pb::ScopePolicy {
            builtin_deny: vec!["127.0.0.0/8".into(), "10.1.2.3/32".into(), "127.0.0.0/8".into()],
            host_addresses: vec!["10.1.2.3/32".into(), "10.1.2.3/32".into()],
            ..Default::default()
        };
        let f = policy_fields(&p);
        let get = |k: &str| f.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("built-in deny"), "127.0.0.0/8");
        assert_eq!(get("this host"), "10.1.2.3/32");
        assert_eq!(get("allow"), "(none)");
    }
}
