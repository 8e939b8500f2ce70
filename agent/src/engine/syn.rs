//! Stateless SYN scanning on dedicated threads: one or more send threads
//! walk the range block by block under a token bucket, one receive thread
//! validates replies by their cookie, marks them in the window, reports
//! open ports and retires blocks (which moves the checkpoint).

use std::{
    collections::VecDeque,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    EngineError, Event, Finding, LiveCounts, ScanJob, Summary,
    cookie::CookieKey,
    rate::TokenBucket,
    window::{MAX_BLOCK, Mark, Window},
};
use crate::net::{self, NetError, NetPlan, Receiver, Sender, sys::MAX_BATCH};

/// Probes per second one send thread sustains on a small machine (veth,
/// target answering); more than this asks for a second thread.
const PER_THREAD_RATE: u32 = 150_000;
/// Floor of the adaptive retry timeout.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// Pause when the ring had nothing new.
const RECV_IDLE: Duration = Duration::from_micros(200);

/// Everything the threads share.
struct Shared {
    job: ScanJob,
    window: Window,
    key: CookieKey,
    src_port: u16,
    counts: Arc<LiveCounts>,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, e: impl ToString) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| e.to_string());
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A SYN engine with its sockets open, ready to run.
pub struct SynEngine {
    shared: Arc<Shared>,
    plan: NetPlan,
    receiver: Receiver,
    senders: Vec<Sender>,
    /// Holds the source port so no local connection takes it meanwhile.
    port_guard: socket2::Socket,
}

/// Binds a TCP socket (without listening) to reserve a source port: the
/// kernel then never gives it to another connection, and still answers
/// our SYN-ACKs with RST since nothing listens.
fn reserve_port() -> Result<(socket2::Socket, u16), NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |source| NetError::Io { context: "reserve a source port".into(), source };
    let dual = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok(s)
    });
    let sock = match dual {
        Ok(s) => s,
        // No IPv6 on this host.
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(io)?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into()).map_err(io)?;
            s
        }
    };
    let port = sock.local_addr().map_err(io)?.as_socket().map(|a| a.port()).unwrap_or(0);
    Ok((sock, port))
}

impl SynEngine {
    /// Opens sockets and plans the route. Blocking (may ARP).
    pub fn setup(job: ScanJob, counts: Arc<LiveCounts>) -> Result<Self, EngineError> {
        let plan = net::plan(job.space.addresses(), &job.net)?;
        let (guard, src_port) = reserve_port()?;
        // Listen before the first probe leaves.
        let receiver = Receiver::open(plan.recv_ifindex, src_port, job.recv_ring_bytes)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rate = job.control.rate();
        let threads = job.send_threads.unwrap_or(rate.div_ceil(PER_THREAD_RATE) as usize).clamp(1, cores.max(1));
        let senders = (0..threads).map(|_| Sender::open(&plan, src_port)).collect::<Result<Vec<_>, _>>()?;
        // Blocks of ~20 ms of sending: fine-grained checkpoints at any rate.
        let block_len = (u64::from(rate) / 50).clamp(16, MAX_BLOCK);
        let window_probes = f64::from(rate) * job.wait.as_secs_f64() * f64::from(job.retries + 2);
        let capacity = ((window_probes / block_len as f64).ceil() as usize + 64).clamp(64, 16_384);
        let window = Window::new(job.range.start, job.range.end, block_len, capacity, MIN_TIMEOUT, job.wait);
        let shared = Arc::new(Shared {
            job,
            window,
            key: CookieKey::random(),
            src_port,
            counts,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        Ok(Self { shared, plan, receiver, senders, port_guard: guard })
    }

    /// Runs on dedicated threads; the result goes to `done`.
    pub fn run(
        self,
        events: mpsc::Sender<Event>,
        cancel: CancellationToken,
        done: oneshot::Sender<Result<Summary, EngineError>>,
    ) {
        let Self { shared, plan, mut receiver, senders, port_guard } = self;
        let started = Instant::now();
        let finished = CancellationToken::new();
        {
            // Cancellation reaches the threads through the stop flag.
            let (shared, finished, cancel) = (shared.clone(), finished.clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => shared.stop.store(true, Ordering::Relaxed),
                    _ = finished.cancelled() => {}
                }
            });
        }
        let threads = senders.len() as u32;
        let handles: Vec<_> = senders
            .into_iter()
            .enumerate()
            .map(|(i, mut sender)| {
                let shared = shared.clone();
                std::thread::Builder::new().name(format!("pf-send-{i}")).spawn(move || {
                    if let Err(e) = send_loop(&shared, &mut sender, threads) {
                        shared.fail(format!("send: {e}"));
                    }
                })
            })
            .collect();
        let method = format!("syn: {}", plan.describe());
        let spawn = std::thread::Builder::new().name("pf-recv".into()).spawn(move || {
            let _port_guard = port_guard;
            let handles: Vec<_> = handles.into_iter().filter_map(Result::ok).collect();
            recv_loop(&shared, &mut receiver, &events);
            shared.stop.store(true, Ordering::Relaxed);
            for h in handles {
                let _ = h.join();
            }
            finished.cancel();
            let error = shared.error.lock().unwrap_or_else(|p| p.into_inner()).take();
            let result = match error {
                Some(e) => Err(EngineError::Thread(e)),
                None => Ok(Summary {
                    counts: shared.counts.snapshot(),
                    checkpoint: shared.window.checkpoint(),
                    cancelled: !shared.window.all_retired(),
                    elapsed: started.elapsed(),
                    method,
                    recv_buffer: receiver.buffer_bytes(),
                }),
            };
            let _ = done.send(result);
        });
        if let Err(e) = spawn {
            tracing::error!(error = %e, "cannot start the receive thread");
        }
    }
}

/// Each of `threads` send threads takes an equal part of the job's rate.
fn send_loop(shared: &Shared, sender: &mut Sender, threads: u32) -> std::io::Result<()> {
    let w = &shared.window;
    let control = &shared.job.control;
    let share = || control.rate().div_ceil(threads).max(1);
    let epoch = Instant::now();
    let mut bucket = TokenBucket::new(share(), Duration::ZERO);
    let mut credit = 0u32;
    let mut fifo: VecDeque<u64> = VecDeque::new();
    let mut pending: Option<u64> = None;
    let mut exhausted = false;
    let mut send = |block: u64, only_unanswered: bool, credit: &mut u32| -> std::io::Result<()> {
        let (lo, hi) = w.block_positions(block);
        let mut pos = lo;
        while pos < hi {
            if shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            while *credit == 0 {
                while control.probing_held() && !shared.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if f64::from(share()) != bucket.rate() {
                    bucket.set_rate(share());
                }
                // Any send thread pays for the identification stage's
                // connections: one rate for probes and connections.
                bucket.charge(control.take_charged());
                match bucket.take(epoch.elapsed(), MAX_BATCH as u32) {
                    Ok(n) => *credit = n,
                    Err(wait) => {
                        if shared.stop.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        std::thread::sleep(wait.min(Duration::from_millis(5)));
                    }
                }
            }
            while *credit > 0 && pos < hi {
                let this = pos;
                pos += 1;
                if only_unanswered && w.is_answered(this) {
                    continue;
                }
                let (ip, port) = shared.job.space.probe_at(this);
                // A CDN edge's other ports: done without a probe.
                if !shared.job.space.is_probed(ip, port) {
                    w.skip(this);
                    continue;
                }
                if shared.job.deny.contains(ip) {
                    shared.counts.denied.fetch_add(1, Ordering::Relaxed);
                    w.skip(this);
                    continue;
                }
                let Some(src) = sender.source_for(ip) else {
                    w.skip(this);
                    continue;
                };
                let seq = shared.key.seq(src, ip, shared.src_port, port);
                let n = sender.push(ip, port, seq)?;
                shared.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
                *credit -= 1;
            }
            let n = sender.flush()?;
            shared.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    };
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(&b) = fifo.front() {
            if !w.live(b) {
                fifo.pop_front();
                continue;
            }
            if w.now_ns() >= w.due_ns(b) {
                fifo.pop_front();
                let attempt = w.attempt(b);
                if attempt > shared.job.retries {
                    w.finish(b);
                } else {
                    w.retry(b, attempt + 1);
                    send(b, true, &mut credit)?;
                    w.sent(b);
                    fifo.push_back(b);
                }
                continue;
            }
        }
        if pending.is_none() && !exhausted {
            pending = w.claim();
            exhausted = pending.is_none();
        }
        if let Some(b) = pending
            && w.slot_free(b)
        {
            pending = None;
            w.begin(b);
            send(b, false, &mut credit)?;
            w.sent(b);
            fifo.push_back(b);
            continue;
        }
        if exhausted && fifo.is_empty() {
            return Ok(());
        }
        let idle = fifo
            .front()
            .map(|&b| Duration::from_nanos(w.due_ns(b).saturating_sub(w.now_ns())))
            .unwrap_or(Duration::from_millis(1));
        std::thread::sleep(idle.clamp(Duration::from_micros(100), Duration::from_millis(1)));
    }
}

fn recv_loop(shared: &Shared, receiver: &mut Receiver, events: &mpsc::Sender<Event>) {
    let w = &shared.window;
    let c = &shared.counts;
    let space = &shared.job.space;
    let mut last_checkpoint = Instant::now();
    let mut reported = w.checkpoint();
    let emit = |event: Event| {
        if events.blocking_send(event).is_err() {
            // Nobody listens any more: stop probing.
            shared.stop.store(true, Ordering::Relaxed);
        }
    };
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed);
        let got = receiver.recv(|reply| {
            if reply.dst_port != shared.src_port || !(reply.is_syn_ack() || reply.is_rst()) {
                return;
            }
            if !shared.key.validates(reply.dst, reply.src, reply.dst_port, reply.src_port, reply.ack) {
                return;
            }
            let Some(pos) = space.position_of(reply.src, reply.src_port) else { return };
            let open = reply.is_syn_ack();
            let report = match w.mark(pos) {
                Mark::New { .. } => true,
                // A genuine open port answering after its window: still
                // reported (a duplicate is harmless, a miss is not).
                Mark::Late => {
                    c.late.fetch_add(1, Ordering::Relaxed);
                    open
                }
                Mark::Duplicate | Mark::Unknown => false,
            };
            if !report {
                return;
            }
            if open {
                c.open.fetch_add(1, Ordering::Relaxed);
                emit(Event::Open(Finding {
                    ip: reply.src,
                    port: reply.src_port,
                    position: pos,
                    observed_at: SystemTime::now(),
                }));
            } else {
                c.closed.fetch_add(1, Ordering::Relaxed);
            }
        });

        let drops = receiver.take_drops();
        if drops > 0 {
            c.dropped.fetch_add(drops, Ordering::Relaxed);
        }
        w.retire_ready(|r| {
            c.filtered.fetch_add(r.unanswered, Ordering::Relaxed);
        });
        let checkpoint = w.checkpoint();
        let all_done = w.all_retired();
        if checkpoint > reported && (all_done || last_checkpoint.elapsed() >= CHECKPOINT_EVERY) {
            reported = checkpoint;
            last_checkpoint = Instant::now();
            emit(Event::Checkpoint { position: checkpoint, counts: c.snapshot() });
        }
        if all_done || stopping {
            return;
        }
        if got == 0 {
            // Let replies gather (see Receiver::recv).
            std::thread::sleep(RECV_IDLE);
        }
    }
}
