//! TCP connect scanning: needs no privilege. A full handshake means open,
//! a refusal means closed, silence (timeout) after every attempt means
//! filtered. Connections are bounded by a semaphore and paced by the same
//! token bucket as SYN probes.

use std::{
    collections::BTreeSet,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    net::TcpStream,
    sync::{Semaphore, mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{EngineError, Event, Finding, LiveCounts, ScanJob, Summary, rate::AsyncRateLimiter};

const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

enum Outcome {
    Open,
    Closed,
    Filtered,
}

/// Errors that say "this host is out of resources", not "the port is
/// filtered": wait and try the same attempt again.
fn local_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL | libc::ENOBUFS | libc::EAGAIN))
}

async fn probe(
    ip: std::net::IpAddr,
    port: u16,
    job: &ScanJob,
    limiter: &AsyncRateLimiter,
    counts: &LiveCounts,
    cancel: &CancellationToken,
) -> Outcome {
    let mut attempt = 0;
    while attempt <= job.retries {
        if attempt > 0 {
            limiter.acquire().await;
        }
        // Held (controller silent, outbox full, identification behind):
        // no attempt goes out.
        while job.control.probing_held() && !cancel.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if cancel.is_cancelled() {
            return Outcome::Filtered;
        }
        counts.sent.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(job.wait, TcpStream::connect((ip, port))).await {
            Ok(Ok(_stream)) => return Outcome::Open,
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return Outcome::Closed,
            Ok(Err(e)) if local_exhaustion(&e) => {
                counts.sent.fetch_sub(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            // Timeouts, unreachable hosts and networks: try again.
            Ok(Err(_)) | Err(_) => attempt += 1,
        }
    }
    Outcome::Filtered
}

pub async fn run(
    job: ScanJob,
    counts: Arc<LiveCounts>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
    done: oneshot::Sender<Result<Summary, EngineError>>,
) {
    let started = Instant::now();
    let job = Arc::new(job);
    let limiter = Arc::new(AsyncRateLimiter::new(job.control.clone()));
    let permits = Arc::new(Semaphore::new(job.concurrency.max(1)));
    // Positions still being probed: the checkpoint is the lowest of them.
    let in_flight = Arc::new(Mutex::new(BTreeSet::<u64>::new()));
    let next = Arc::new(AtomicU64::new(job.range.start));
    let mut tasks = JoinSet::new();
    let mut last_checkpoint = Instant::now();
    let mut reported = job.range.start;
    let checkpoint = |in_flight: &Mutex<BTreeSet<u64>>, next: &AtomicU64| {
        let lowest = in_flight.lock().unwrap_or_else(|p| p.into_inner()).first().copied();
        lowest.unwrap_or_else(|| next.load(Ordering::Acquire))
    };

    for pos in job.range.start..job.range.end {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = limiter.acquire() => {}
        }
        let (ip, port) = job.space.probe_at(pos);
        if !job.space.is_probed(ip, port) {
            next.store(pos + 1, Ordering::Release);
            continue;
        }
        if job.deny.contains(ip) {
            counts.denied.fetch_add(1, Ordering::Relaxed);
            next.store(pos + 1, Ordering::Release);
            continue;
        }
        in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(pos);
        next.store(pos + 1, Ordering::Release);
        let (job2, limiter2, counts2, events2, cancel2, in_flight2) =
            (job.clone(), limiter.clone(), counts.clone(), events.clone(), cancel.clone(), in_flight.clone());
        tasks.spawn(async move {
            let outcome = probe(ip, port, &job2, &limiter2, &counts2, &cancel2).await;
            match outcome {
                Outcome::Open => {
                    counts2.open.fetch_add(1, Ordering::Relaxed);
                    let finding = Finding { ip, port, position: pos, observed_at: SystemTime::now() };
                    // Sent before this position leaves the in-flight set, so
                    // before any checkpoint that covers it.
                    let _ = events2.send(Event::Open(finding)).await;
                }
                Outcome::Closed => {
                    counts2.closed.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Filtered if cancel2.is_cancelled() => {}
                Outcome::Filtered => {
                    counts2.filtered.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !cancel2.is_cancelled() {
                in_flight2.lock().unwrap_or_else(|p| p.into_inner()).remove(&pos);
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            let cp = checkpoint(&in_flight, &next);
            if cp > reported {
                reported = cp;
                last_checkpoint = Instant::now();
                if events.send(Event::Checkpoint { position: cp, counts: counts.snapshot() }).await.is_err() {
                    cancel.cancel();
                }
            }
        }
    }
    // Let the last connections finish, or stop them on cancel.
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
            joined = tasks.join_next() => if joined.is_none() { break },
        }
    }
    let cp = checkpoint(&in_flight, &next);
    let cancelled = cancel.is_cancelled() && cp < job.range.end;
    if cp > reported {
        let _ = events.send(Event::Checkpoint { position: cp, counts: counts.snapshot() }).await;
    }
    let _ = done.send(Ok(Summary {
        counts: counts.snapshot(),
        checkpoint: cp,
        cancelled,
        elapsed: started.elapsed(),
        method: "connect".into(),
        recv_buffer: 0,
    }));
}
