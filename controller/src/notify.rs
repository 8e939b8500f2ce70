//! Cross-controller signals over Postgres LISTEN/NOTIFY on the channel
//! `portfleet`. Whatever controller a change happens on, every controller
//! hears it: a new scan wakes every scheduler, a cancelled scan reaches
//! the agents wherever their sessions are, new results reach every
//! WatchScan. Notifications are hints: consumers re-read the database, and
//! after a lost connection get `Resync` to re-check everything.

use std::time::Duration;

use portfleet_core::backoff::Backoff;
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

/// The kinds of notice that carry an id, and how a payload spells each.
/// SQL that notifies for many rows at once binds [`NoticeKind::prefix`]
/// and appends the id (`pg_notify($1, $2 || id)`): this is the only place
/// the encoding is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    ScanCreated,
    ScanChanged,
    Results,
    Leases,
    AgentDrain,
}

impl NoticeKind {
    const ALL: [Self; 5] = [Self::ScanCreated, Self::ScanChanged, Self::Results, Self::Leases, Self::AgentDrain];

    pub fn prefix(self) -> &'static str {
        match self {
            Self::ScanCreated => "c:",
            Self::ScanChanged => "s:",
            Self::Results => "r:",
            Self::Leases => "l:",
            Self::AgentDrain => "d:",
        }
    }

    fn notice(self, id: Uuid) -> Notice {
        match self {
            Self::ScanCreated => Notice::ScanCreated(id),
            Self::ScanChanged => Notice::ScanChanged(id),
            Self::Results => Notice::Results(id),
            Self::Leases => Notice::Leases(id),
            Self::AgentDrain => Notice::AgentDrain(id),
        }
    }
}

impl Notice {
    /// Parses a payload: a kind's prefix and a UUID.
    pub fn parse(payload: &str) -> Option<Self> {
        let kind = NoticeKind::ALL.into_iter().find(|k| payload.starts_with(k.prefix()))?;
        let id = Uuid::try_parse(&payload[kind.prefix().len()..]).ok()?;
        Some(kind.notice(id))
    }

    /// The payload this notice travels as; `None` for [`Notice::Resync`],
    /// which only the listener makes.
    pub fn encode(&self) -> Option<String> {
        let (kind, id) = match self {
            Self::ScanCreated(id) => (NoticeKind::ScanCreated, id),
            Self::ScanChanged(id) => (NoticeKind::ScanChanged, id),
            Self::Results(id) => (NoticeKind::Results, id),
            Self::Leases(id) => (NoticeKind::Leases, id),
            Self::AgentDrain(id) => (NoticeKind::AgentDrain, id),
            Self::Resync => return None,
        };
        Some(format!("{}{id}", kind.prefix()))
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
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
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
                    let retry_in = backoff.next_delay();
                    tracing::warn!(error = %e, ?retry_in, "cannot listen for notifications");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                    continue;
                }
            },
        };
        backoff.reset();
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
    fn payloads_round_trip() {
        let id = Uuid::now_v7();
        for kind in NoticeKind::ALL {
            let notice = kind.notice(id);
            let payload = notice.encode().unwrap();
            assert_eq!(payload, format!("{}{id}", kind.prefix()));
            assert_eq!(Notice::parse(&payload), Some(notice));
        }
        assert_eq!(Notice::parse(&format!("c:{id}")), Some(Notice::ScanCreated(id)));
        assert_eq!(Notice::Resync.encode(), None);
        assert_eq!(Notice::parse("x:y"), None);
        assert_eq!(Notice::parse("garbage"), None);
    }
}
