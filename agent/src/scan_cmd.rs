//! `portfleet-agent scan`: the engine as a standalone scanner, like naabu or
//! masscan. Results go to stdout as they are found (`ip:port`, or naabu's
//! JSON Lines); progress and the summary go to stderr.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use clap::{Args, ValueEnum};
use portfleet_core::{
    AddrRange, PlanInput, PortSet, ResolvedTarget, ScanType, ShardPolicy, TargetSpec, permutation::Permutation, plan,
    targets::parse_cidr_list,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    engine::{self, Event, ScanJob, Summary},
    identify::{Gate, Item, Pipeline},
    identify_args::IdentifyArgs,
    net::{self, NetOptions},
};

#[derive(Args, Debug, Clone)]
pub struct ScanArgs {
    /// Addresses, CIDR blocks, ranges (10.0.0.1-10.0.0.9) or hostnames.
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
    /// Read more targets from a file, one per line ("-" for stdin).
    #[arg(short = 'l', long = "list", value_name = "FILE")]
    pub list: Option<PathBuf>,
    /// Ports in naabu syntax: 80,443,8000-8100, top-100, top-1000, full.
    #[arg(short = 'p', long = "ports", conflicts_with = "top_ports")]
    pub ports: Option<String>,
    /// nmap's N most frequent ports: 100, 1000 or full. Default: 100.
    #[arg(long = "top-ports", value_name = "N")]
    pub top_ports: Option<String>,
    /// Probes per second, retries included.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub rate: u32,
    /// Extra probes for a port that did not answer.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub retries: u32,
    /// Longest wait for a reply, in milliseconds (also the connect timeout).
    /// SYN scans stop sooner once every probe is answered.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub wait: u64,
    /// syn needs CAP_NET_RAW; without this flag the scan falls back to
    /// connect when the privilege is missing.
    #[arg(long = "scan-type", value_enum)]
    pub scan_type: Option<ScanTypeArg>,
    /// Never probe these addresses or CIDR blocks (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub exclude: Vec<String>,
    /// Send and receive on this interface.
    #[arg(short = 'i', long)]
    pub interface: Option<String>,
    /// Source address for probes (default: the kernel's choice).
    #[arg(long = "source-ip")]
    pub source_ip: Option<IpAddr>,
    /// SYN send threads (default: one per 150k probes/s, at most one per core).
    #[arg(long = "send-threads", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub send_threads: Option<u32>,
    /// Connect scans: connections in flight at once.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub concurrency: u32,
    /// SYN receive ring in KiB; replies beyond it are dropped and counted.
    #[arg(long = "recv-ring-kb", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(4..=1_048_576))]
    pub recv_ring_kb: u32,
    /// JSON Lines with naabu's field names.
    #[arg(long)]
    pub json: bool,
    /// Also write results to this file.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// No progress bar or summary.
    #[arg(long)]
    pub silent: bool,
    /// Identify what answers on each open port (service, version, TLS,
    /// HTTP), like naabu's and nmap's -sV.
    #[arg(long = "service-version", visible_alias = "sV")]
    pub service_version: bool,
    /// A host with more open ports than this answers everything (a SYN
    /// proxy or tarpit): its ports are reported once marked, not
    /// identified. 0: no limit. naabu's -pts.
    #[arg(long = "port-threshold", visible_alias = "pts", default_value_t = 100)]
    pub port_threshold: u32,
    #[command(flatten)]
    pub identify: IdentifyArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanTypeArg {
    Syn,
    Connect,
}

/// Exit statuses: 0 done, 1 could not scan, 2 bad input, 130 interrupted.
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;

struct Failure(i32, String);

fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure(EXIT_USAGE, msg.to_string())
}

pub async fn run(args: ScanArgs) -> i32 {
    match scan(args).await {
        Ok(code) => code,
        Err(Failure(code, msg)) => {
            eprintln!("error: {msg}");
            code
        }
    }
}

async fn read_targets(args: &ScanArgs) -> Result<Vec<String>, Failure> {
    let mut targets = args.targets.clone();
    if let Some(path) = &args.list {
        let text = if path.as_os_str() == "-" {
            tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin()))
                .await
                .map_err(|e| Failure(EXIT_FAILURE, e.to_string()))?
        } else {
            tokio::fs::read_to_string(path).await
        }
        .map_err(|e| usage(format!("--list {}: {e}", path.display())))?;
        targets.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
    }
    if targets.is_empty() {
        return Err(usage("no targets: give addresses, CIDR blocks or hostnames (or --list FILE)"));
    }
    Ok(targets)
}

/// Resolves hostnames; returns the targets and each named address's names.
async fn resolve(specs: Vec<TargetSpec>) -> Result<(Vec<ResolvedTarget>, HashMap<IpAddr, Vec<String>>), Failure> {
    let mut out = Vec::new();
    let mut names = HashMap::new();
    for spec in specs {
        match spec {
            TargetSpec::Hostname(host) => {
                let addrs = tokio::time::timeout(Duration::from_secs(10), tokio::net::lookup_host((host.as_str(), 0)))
                    .await
                    .map_err(|_| usage(format!("hostname {host:?} did not resolve within 10s")))?
                    .map_err(|e| usage(format!("hostname {host:?} does not resolve: {e}")))?;
                for a in addrs {
                    let names: &mut Vec<String> = names.entry(a.ip()).or_default();
                    if !names.contains(&host) {
                        names.push(host.clone());
                    }
                    out.push(ResolvedTarget { range: AddrRange::single(a.ip()), hostname: Some(host.clone()) });
                }
            }
            other => out.extend(other.range().map(|range| ResolvedTarget { range, hostname: None })),
        }
    }
    Ok((out, names))
}

async fn scan(args: ScanArgs) -> Result<i32, Failure> {
    let targets = read_targets(&args).await?;
    let specs = targets
        .iter()
        .map(|t| TargetSpec::parse(t).map_err(|e| usage(format!("bad target {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = match (&args.ports, &args.top_ports) {
        (Some(p), _) => PortSet::parse(p),
        (None, Some(n)) => PortSet::top(n),
        (None, None) => PortSet::parse("top-100"),
    }
    .map_err(|e| usage(format!("bad ports {e}")))?;
    let exclude = parse_cidr_list(&args.exclude).map_err(|e| usage(format!("bad --exclude {e}")))?;
    let (resolved, hostnames) = resolve(specs).await?;
    let plan = plan(PlanInput {
        targets: resolved,
        ports,
        exclude,
        seed: rand::random(),
        max_probes: Permutation::MAX_LEN,
        shards: ShardPolicy { min_shard_probes: u64::MAX, max_shards: 1 },
        limited: None,
    })
    .map_err(usage)?;

    let privileged = net::has_raw_privilege();
    let scan_type = match args.scan_type {
        Some(ScanTypeArg::Syn) if !privileged => {
            return Err(Failure(EXIT_FAILURE, net::NetError::NoPrivilege.to_string()));
        }
        Some(ScanTypeArg::Syn) => ScanType::Syn,
        Some(ScanTypeArg::Connect) => ScanType::Connect,
        None if privileged => ScanType::Syn,
        None => {
            if !args.silent {
                eprintln!(
                    "note: no CAP_NET_RAW, falling back to a connect scan (--scan-type syn needs the capability)"
                );
            }
            ScanType::Connect
        }
    };
    let space = Arc::new(plan.space);
    let total = space.len();
    let mut job = ScanJob::new(space, scan_type, args.rate);
    job.retries = args.retries;
    job.wait = Duration::from_millis(args.wait);
    job.net = NetOptions { interface: args.interface.clone(), source_ip: args.source_ip };
    job.send_threads = args.send_threads.map(|n| n as usize);
    job.concurrency = args.concurrency as usize;
    job.recv_ring_bytes = args.recv_ring_kb as usize * 1024;
    let control = job.control.clone();
    let hostnames = Arc::new(hostnames);
    let mut pipeline = if args.service_version {
        let identifier = args.identify.identifier().map_err(|e| usage(e.to_string()))?;
        if !args.silent {
            eprintln!("identifying services with {}", identifier.describe());
        }
        let gate = Arc::new(Gate::new(job.deny.clone(), control));
        Pipeline::identifying(Arc::new(identifier), gate, hostnames.clone(), args.port_threshold)
    } else {
        Pipeline::plain()
    };

    let mut file = match &args.output {
        Some(path) => Some(std::fs::File::create(path).map_err(|e| usage(format!("-o {}: {e}", path.display())))?),
        None => None,
    };
    let cancel = CancellationToken::new();
    let interrupted = CancellationToken::new();
    {
        let (cancel, interrupted) = (cancel.clone(), interrupted.clone());
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.cancel();
                cancel.cancel();
            }
        });
    }
    let (tx, mut rx) = mpsc::channel(4096);
    let handle = engine::start(job, tx, cancel.clone()).await.map_err(|e| Failure(EXIT_FAILURE, e.to_string()))?;
    let progress = (!args.silent && std::io::stderr().is_terminal()).then(|| progress_bar(total, handle.counts()));
    // Results on the bar's terminal would land after the bar's text on its
    // line: the bar steps aside (clears its line) while they are written.
    let bar_in_the_way = progress.as_ref().map(|(bar, _)| bar).filter(|_| std::io::stdout().is_terminal());

    let mut stdout = std::io::stdout().lock();
    let mut engine_done = false;
    let mut lines = portfleet_core::found::TextLines::default();
    loop {
        if engine_done && pipeline.is_empty() {
            break;
        }
        let mut items = Vec::new();
        tokio::select! {
            ev = rx.recv(), if !engine_done => match ev {
                Some(ev) => {
                    // Whatever else is queued goes in with it (a bounded
                    // number, so output keeps flowing).
                    let mut next = Some(ev);
                    let mut taken = 0;
                    while let Some(ev) = next {
                        match ev {
                            Event::Open(f) => pipeline.push_open(f),
                            Event::Checkpoint { position, counts } => pipeline.push_checkpoint(position, counts),
                        }
                        taken += 1;
                        next = if taken < 4096 { rx.try_recv().ok() } else { None };
                    }
                }
                None => engine_done = true,
            },
            item = pipeline.next(), if !pipeline.is_empty() => items.extend(item),
            // Interrupted while identifying: what is identified is printed.
            _ = interrupted.cancelled(), if engine_done => break,
        }
        // Ready items go out together: one write (and one redraw of the
        // bar) per batch, not per result.
        items.extend(pipeline.ready());
        let mut text = String::new();
        for item in items {
            if let Item::Found(found) = item {
                let found = *found;
                let f = found.finding;
                let host = hostnames.get(&f.ip).map(|n| n.join(","));
                // One schema with `portfleet scan` / `results` (core's `Found`).
                let line = portfleet_core::Found::tcp(f.ip, f.port, Some(f.observed_at), host)
                    .with_service(found.service, found.answers_everything);
                let line = if args.json { Some(line.to_json()) } else { lines.line(&line) };
                if let Some(line) = line {
                    text += &line;
                    text.push('\n');
                }
            }
        }
        if text.is_empty() {
            continue;
        }
        let mut write = || stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
        let written = match bar_in_the_way {
            Some(bar) => bar.suspend(write),
            None => write(),
        };
        // A closed stdout (e.g. `| head`) ends the scan quietly.
        if written.is_err() {
            cancel.cancel();
            break;
        }
        if let Some(file) = &mut file {
            file.write_all(text.as_bytes()).map_err(|e| Failure(EXIT_FAILURE, format!("writing output file: {e}")))?;
        }
    }
    drop(pipeline);
    // The engine's last events, so that it can finish.
    while rx.recv().await.is_some() {}
    let summary = handle.wait().await.map_err(|e| Failure(EXIT_FAILURE, e.to_string()))?;
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    if !args.silent {
        eprintln!("{}", summary_line(&summary, total));
    }
    Ok(if interrupted.is_cancelled() { EXIT_INTERRUPTED } else { 0 })
}

fn summary_line(s: &Summary, total: u64) -> String {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let c = &s.counts;
    let mut line = format!(
        "{} probes ({} positions) in {:.2}s, {:.0} probes/s: {} open, {} closed, {} filtered",
        c.sent,
        total,
        secs,
        c.sent as f64 / secs,
        c.open,
        c.closed,
        c.filtered
    );
    if c.late > 0 {
        line += &format!(", {} late replies (raise --wait)", c.late);
    }
    line += &format!(", {} replies dropped by the kernel", c.dropped);
    if s.cancelled {
        line += &format!(" - interrupted at {} of {}", s.checkpoint, total);
    }
    line + &format!(" [{}]", s.method)
}

fn progress_bar(total: u64, counts: Arc<engine::LiveCounts>) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} probes, {per_sec}, {msg}, eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            b.set_position(counts.sent.load(Ordering::Relaxed).min(total));
            b.set_message(format!("{} open", counts.open.load(Ordering::Relaxed)));
        }
    });
    (bar, ticker)
}
