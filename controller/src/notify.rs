//! Cross-controller signals over Postgres LISTEN/NOTIFY on the channel
//! `portfleet`. Whatever controller a change happens on, every controller
//! hears it: a new scan wakes every scheduler, a cancelled scan reaches
//! the agents wherever their sessions are, new results reach every
//! WatchScan. Notifications are hints: consumers re-read the database, and
//! after a lost connection get `Resync` to re-check everything.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const CHANNEL: &str = "portfleet";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    ScanCreated(Uuid),
    /// A scan changed state (started, completed, cancelled, failed).
    ScanChanged(Uuid),
    /// New results for a scan were committed.
    Results(Uuid),
    /// A running scan gained leases: its shares split differently.
    Leases(Uuid),
    /// An operator asked this agent to drain.
    AgentDrain(Uuid),
    /// Notifications may have been missed: re-check.
    Resync,
}

impl Notice {
    /// Parses a payload: `c:`, `s:`, `l:`, `r:` or `d:` and a UUID.
    pub fn parse(payload: &str) -> Option<Self> {
        let (kind, id) = payload.split_once(':')?;
        let id = Uuid::try_parse(id).ok()?;
        Some(match kind {
            "c" => Self::ScanCreated(id),
            "s" => Self::ScanChanged(id),
            "l" => Self::Leases(id),
            "r" => Self::Results(id),
            "d" => Self::AgentDrain(id),
            _ => return None,
        })
    }
}

/// The fan-out of notifications inside one controller.
#[derive(Clone, Debug)]
pub struct Notifier {
    tx: broadcast::Sender<Notice>,
}

impl Notifier {
    /// Starts listening on a connection of its own (reconnecting with
    /// backoff) until `cancel`.
    pub fn start(pool: PgPool, cancel: CancellationToken, tracker: &tokio_util::task::TaskTracker) -> Self {
        // Slow receivers lag and then resync; memory stays bounded.
        let (tx, _) = broadcast::channel(4096);
        tracker.spawn(listen(pool, tx.clone(), cancel));
        Self { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.tx.subscribe()
    }

    /// Delivers a notice to this controller's own subscribers at once (the
    /// database will echo it too; consumers are idempotent).
    pub fn local(&self, notice: Notice) {
        let _ = self.tx.send(notice);
    }
}

async fn listen(pool: PgPool, tx: broadcast::Sender<Notice>, cancel: CancellationToken) {
    let mut delay = Duration::from_millis(200);
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = cancel.cancelled() => return,
            l = connected => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot listen for notifications");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        delay = Duration::from_millis(200);
        let _ = tx.send(Notice::Resync);
        loop {
            let got = tokio::select! {
                _ = cancel.cancelled() => return,
                got = listener.try_recv() => got,
            };
            match got {
                Ok(Some(n)) => {
                    if let Some(notice) = Notice::parse(n.payload()) {
                        let _ = tx.send(notice);
                    }
                }
                // The connection dropped; sqlx reconnects on the next call.
                Ok(None) => {
                    let _ = tx.send(Notice::Resync);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_payloads() {
        let id = Uuid::now_v7();
        assert_eq!(Notice::parse(&format!("c:{id}")), Some(Notice::ScanCreated(id)));
        assert_eq!(Notice::parse(&format!("r:{id}")), Some(Notice::Results(id)));
        assert_eq!(Notice::parse("x:y"), None);
        assert_eq!(Notice::parse("garbage"), None);
    }
}
