//! WatchScan: the scan as it changes and its results as they land, driven
//! by database notifications from whichever controller took the results,
//! with a periodic re-read so a missed notification only delays.

use std::time::Duration;

use portfleet_proto::v1::{self as pb, watch_scan_response::Event};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use super::status::store_status;
use crate::{
    notify::{Notice, Notifier},
    store::{ScanRecord, ScanState, Store},
};

/// Batches read per query: at most a few thousand rows in memory.
const BATCHES_PER_READ: i32 = 2;
const REREAD: Duration = Duration::from_millis(500);

pub type Sender = mpsc::Sender<Result<pb::WatchScanResponse, Status>>;

fn changed(a: &ScanRecord, b: &ScanRecord) -> bool {
    (&a.state, a.probes_done, a.open_ports, &a.waiting_reason, &a.error)
        != (&b.state, b.probes_done, b.open_ports, &b.waiting_reason, &b.error)
}

fn terminal(s: &ScanRecord) -> bool {
    ScanState::parse(&s.state).is_ok_and(ScanState::is_terminal)
}

/// Streams `first` and everything after it to `tx` until the scan ends,
/// the client goes away, or the controller shuts down.
pub async fn stream(store: Store, notifier: Notifier, shutdown: CancellationToken, first: ScanRecord, tx: Sender) {
    let id: Uuid = first.id;
    // Subscribed before the first read, so nothing falls in between.
    let mut notices = notifier.subscribe();
    let send = |event: Event| {
        let tx = tx.clone();
        async move { tx.send(Ok(pb::WatchScanResponse { event: Some(event) })).await.is_ok() }
    };
    if !send(Event::Scan(first.clone().into())).await {
        return;
    }
    let mut last = first;
    // The last batch seen per shard (see migrations/0002).
    let mut cursors: std::collections::HashMap<i64, i32> = std::collections::HashMap::new();
    loop {
        let heads = match store.result_heads(id).await {
            Ok(h) => h,
            Err(e) => {
                let _ = tx.send(Err(store_status(e))).await;
                return;
            }
        };
        for (shard, head) in heads {
            let cursor = cursors.entry(shard).or_insert(0);
            while *cursor < head {
                let upto = head.min(*cursor + BATCHES_PER_READ);
                let rows = match store.shard_results(shard, *cursor, upto).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        let _ = tx.send(Err(store_status(e))).await;
                        return;
                    }
                };
                *cursor = upto;
                if !rows.is_empty() {
                    let results = rows.into_iter().map(Into::into).collect();
                    if !send(Event::Results(pb::ResultsFound { results })).await {
                        return;
                    }
                }
            }
        }
        if terminal(&last) {
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("controller shutting down"))).await;
                return;
            }
            _ = tokio::time::sleep(REREAD) => {}
            _ = async {
                loop {
                    match notices.recv().await {
                        Ok(Notice::Results(s) | Notice::ScanChanged(s)) if s == id => return,
                        Ok(Notice::Resync) | Err(RecvError::Lagged(_)) => return,
                        Err(RecvError::Closed) => std::future::pending::<()>().await,
                        Ok(_) => {}
                    }
                }
            } => {}
        }
        match store.get_scan(id).await {
            Ok(Some(scan)) => {
                if changed(&last, &scan) && !send(Event::Scan(scan.clone().into())).await {
                    return;
                }
                last = scan;
            }
            Ok(None) => {
                let _ = tx.send(Err(Status::not_found(format!("scan {id} was deleted")))).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(store_status(e))).await;
                return;
            }
        }
    }
}
