//! The scan engine: probes one contiguous range of a scan's permuted index
//! space - a whole scan for the standalone command, a leased shard under a
//! controller - and reports open ports as they are found.
//!
//! Two engines share this interface: stateless raw-socket SYN scanning
//! ([`syn`], dedicated send and receive threads) and TCP connect scanning
//! ([`connect`], async, for hosts without CAP_NET_RAW). Both emit, on one
//! ordered channel, [`Event::Open`] findings and [`Event::Checkpoint`]s; a
//! checkpoint is only sent after every finding below it, which is what lets
//! a controller resume a shard from it without losing a result.

pub mod connect;
pub mod cookie;
pub mod rate;
pub mod syn;
pub mod window;

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use portfleet_core::{AddressSet, ScanSpace, ScanType, ShardRange};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::net::{NetError, NetOptions};

/// One unit of work for the engine.
#[derive(Clone, Debug)]
pub struct ScanJob {
    pub space: Arc<ScanSpace>,
    /// Positions to probe; the whole space for a standalone scan.
    pub range: ShardRange,
    pub scan_type: ScanType,
    /// Rate (probes per second, retries included) and pause, adjustable
    /// while the engine runs.
    pub control: Arc<EngineControl>,
    /// Extra probes for a port that did not answer.
    pub retries: u32,
    /// Longest wait for a reply after a probe (connect: per-attempt
    /// timeout). SYN scans wait less once replies show the round trip.
    pub wait: Duration,
    pub net: NetOptions,
    /// SYN send threads; `None` picks from the rate.
    pub send_threads: Option<usize>,
    /// Connect scans: connections in flight at once.
    pub concurrency: usize,
    /// SYN scans: bytes of the receive ring. Too small and replies are
    /// dropped at speed (counted in `Counts::dropped`).
    pub recv_ring_bytes: usize,
    /// Addresses the engine refuses to probe whatever the job says: checked
    /// again for every probe, after the space was built.
    pub deny: Arc<AddressSet>,
}

impl ScanJob {
    pub fn new(space: Arc<ScanSpace>, scan_type: ScanType, rate: u32) -> Self {
        let range = ShardRange { start: 0, end: space.len() };
        Self {
            space,
            range,
            scan_type,
            control: Arc::new(EngineControl::new(rate)),
            retries: 1,
            wait: Duration::from_secs(1),
            net: NetOptions::default(),
            send_threads: None,
            concurrency: 512,
            recv_ring_bytes: crate::net::DEFAULT_RING_BYTES,
            deny: Arc::new(AddressSet::default()),
        }
    }
}

/// Knobs a running engine reads between batches: the session lowers a
/// lease's rate when its scan gains agents, pauses probing while the
/// controller is not taking results (so backpressure slows the scan rather
/// than piling results up), and holds it while the controller is silent.
#[derive(Debug)]
pub struct EngineControl {
    rate: AtomicU32,
    paused: AtomicBool,
    /// The controller has been silent so long that the lease may have
    /// lapsed there: no probe until it is heard again.
    offline: AtomicBool,
    /// More open ports wait for identification than its queue holds: no
    /// new probe until it drains. Only probing stops; identification and
    /// replies to probes already sent go on.
    backlog: AtomicBool,
    /// Connections the identification stage opened under this rate, not
    /// yet paid for by the send loops: probes and identification
    /// connections share one rate.
    charged: AtomicU32,
}

impl EngineControl {
    pub fn new(rate: u32) -> Self {
        Self {
            rate: AtomicU32::new(rate.max(1)),
            paused: AtomicBool::new(false),
            offline: AtomicBool::new(false),
            backlog: AtomicBool::new(false),
            charged: AtomicU32::new(0),
        }
    }

    /// Counts `n` packets sent outside the engine against its rate.
    pub fn charge(&self, n: u32) {
        self.charged.fetch_add(n, Ordering::Relaxed);
    }

    /// What was charged since the last call; the caller pays it.
    pub fn take_charged(&self) -> u32 {
        if self.charged.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.charged.swap(0, Ordering::Relaxed)
    }

    pub fn rate(&self) -> u32 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set_rate(&self, rate: u32) {
        self.rate.store(rate.max(1), Ordering::Relaxed);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed) || self.offline.load(Ordering::Relaxed)
    }

    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::Relaxed);
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn set_backlog(&self, backlog: bool) {
        self.backlog.store(backlog, Ordering::Relaxed);
    }

    /// Whether the send loops hold: paused, offline, or identification
    /// behind.
    pub fn probing_held(&self) -> bool {
        self.is_paused() || self.backlog.load(Ordering::Relaxed)
    }
}

/// Lowers the calling thread's CPU priority by `niceness` (Linux's
/// `setpriority(PRIO_PROCESS, 0)` applies to the calling thread only), so
/// the engine's own threads, which keep the process's priority, are
/// scheduled first when the CPU is short. Best effort: a failure only
/// leaves the priority as it was.
pub fn yield_to_probing(niceness: i32) {
    use rustix::process::{getpriority_process, setpriority_process};
    if let Ok(now) = getpriority_process(None) {
        let _ = setpriority_process(None, (now + niceness).min(19));
    }
}

/// An open port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub ip: IpAddr,
    pub port: u16,
    pub position: u64,
    pub observed_at: SystemTime,
}

/// Probe outcomes so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Probes sent, retries included.
    pub sent: u64,
    pub open: u64,
    pub closed: u64,
    /// Ports with no answer after every attempt.
    pub filtered: u64,
    /// Replies after their probe's window closed (not counted above).
    pub late: u64,
    /// Replies the kernel dropped because the receive buffer was full.
    pub dropped: u64,
    /// Probes skipped because the address is denied.
    pub denied: u64,
}

/// Live counters, readable while the engine runs (progress bars, rates).
#[derive(Debug, Default)]
pub struct LiveCounts {
    pub sent: AtomicU64,
    pub open: AtomicU64,
    pub closed: AtomicU64,
    pub filtered: AtomicU64,
    pub late: AtomicU64,
    pub dropped: AtomicU64,
    pub denied: AtomicU64,
}

impl LiveCounts {
    pub fn snapshot(&self) -> Counts {
        Counts {
            sent: self.sent.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            filtered: self.filtered.load(Ordering::Relaxed),
            late: self.late.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Open(Finding),
    /// Every position below `position` is final, and its findings were
    /// sent before this event.
    Checkpoint {
        position: u64,
        counts: Counts,
    },
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct Summary {
    pub counts: Counts,
    /// Equal to the range's end when the range was completed.
    pub checkpoint: u64,
    pub cancelled: bool,
    pub elapsed: Duration,
    /// What the engine used, e.g. "syn: ipv4 from 10.0.0.1 via eth0 (link)".
    pub method: String,
    /// Receive buffer granted by the kernel (SYN only).
    pub recv_buffer: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error("engine thread failed: {0}")]
    Thread(String),
}

/// A running engine.
pub struct EngineHandle {
    counts: Arc<LiveCounts>,
    done: tokio::sync::oneshot::Receiver<Result<Summary, EngineError>>,
}

impl EngineHandle {
    pub fn counts(&self) -> Arc<LiveCounts> {
        self.counts.clone()
    }

    /// Waits for the engine to finish (or to stop after cancellation).
    pub async fn wait(self) -> Result<Summary, EngineError> {
        self.done.await.unwrap_or_else(|_| Err(EngineError::Thread("engine stopped without a result".into())))
    }
}

/// Starts the job. Setup problems (privilege, routes) are returned here;
/// findings and checkpoints go to `events`; `cancel` stops sending within
/// 100 ms and the run ends with what was found.
pub async fn start(
    job: ScanJob,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) -> Result<EngineHandle, EngineError> {
    if job.range.start > job.range.end || job.range.end > job.space.len() {
        return Err(EngineError::InvalidJob(format!(
            "range {}..{} is outside the scan's {} positions",
            job.range.start,
            job.range.end,
            job.space.len()
        )));
    }
    let counts = Arc::new(LiveCounts::default());
    let (tx, done) = tokio::sync::oneshot::channel();
    match job.scan_type {
        ScanType::Syn => {
            let counts2 = counts.clone();
            let setup = tokio::task::spawn_blocking(move || syn::SynEngine::setup(job, counts2))
                .await
                .map_err(|e| EngineError::Thread(e.to_string()))??;
            setup.run(events, cancel, tx);
        }
        ScanType::Connect => {
            tokio::spawn(connect::run(job, counts.clone(), events, cancel, tx));
        }
    }
    Ok(EngineHandle { counts, done })
}
