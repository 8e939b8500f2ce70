//! `AgentService.Session`: the controller's side of the agent protocol
//! (docs/protocol.md). One task per stream: the handshake
//! (`handshake.rs`), then frames applied in order, each in its own fenced
//! transaction and acked after commit (`frames.rs`). `wire.rs` is the only
//! place session frames are read or written; the registry and the
//! scheduler speak its domain values. Problems inside a live stream travel
//! as `Refused` frames; a `Status` only refuses a handshake or ends a
//! session.

mod frames;
mod handshake;
pub mod registry;
pub mod wire;

use std::{net::SocketAddr, pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use portfleet_proto::v1 as pb;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Status, Streaming};
use tracing::Instrument;
use uuid::Uuid;

use self::{frames::Session, wire::ToAgent};
pub use self::{
    frames::SessionEnd,
    registry::{LeaseInfo, Registry},
};
use crate::{config::FleetConfig, notify::Notifier, plans::ScanPlans, store::Store};

/// What sessions and the scheduler share.
#[derive(Debug)]
pub struct Fleet {
    pub store: Store,
    pub registry: Registry,
    /// Stored scans' plans: their spaces map every reported port to its
    /// position (and so prove it belongs to the scan).
    pub plans: ScanPlans,
    pub config: FleetConfig,
    pub notifier: Notifier,
    /// Wakes the scheduler (capacity freed, agent connected).
    pub wake: Notify,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Signs enrolling agents' certificates, when configured.
    pub agent_ca: Option<Arc<crate::enroll::AgentCa>>,
}

/// What a session sends, as the gRPC response stream.
pub type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

/// Starts a session task on `inbound` from `peer`; `identity` is the agent
/// id the client certificate names (mTLS), which the Hello must claim.
pub fn accept(
    fleet: &Arc<Fleet>,
    inbound: Streaming<pb::AgentMessage>,
    identity: Option<Uuid>,
    peer: Option<SocketAddr>,
) -> SessionStream {
    // Bounded: a slow agent slows its own session, nothing else.
    let (tx, rx) = mpsc::channel(256);
    let fleet_ = fleet.clone();
    fleet.tracker.spawn(async move { run(fleet_, inbound, tx, identity, peer).await });
    Box::pin(ReceiverStream::new(rx).map(ToAgent::into_wire))
}

async fn run(
    fleet: Arc<Fleet>,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: mpsc::Sender<ToAgent>,
    identity: Option<Uuid>,
    peer: Option<SocketAddr>,
) {
    let hello = tokio::select! {
        _ = fleet.shutdown.cancelled() => return,
        h = handshake::hello(&fleet, &mut inbound, identity) => h,
    };
    let hello = match hello {
        Ok(h) => h,
        Err(status) => {
            tracing::info!(code = ?status.code(), message = status.message(), "agent handshake refused");
            let _ = tx.send(ToAgent::End(status)).await;
            return;
        }
    };
    let closer = CancellationToken::new();
    let opened = match handshake::open(&fleet, hello, peer, &tx, closer.clone()).await {
        Ok(Some(opened)) => opened,
        Ok(None) => return,
        Err(status) => {
            if status.code() == tonic::Code::AlreadyExists {
                tracing::warn!(message = status.message(), "second session of a live agent refused");
            }
            let _ = tx.send(ToAgent::End(status)).await;
            return;
        }
    };
    let span = tracing::info_span!("session", agent_id = %opened.agent_id, generation = opened.generation);
    Session { fleet, opened, tx }.serve(inbound, closer).instrument(span).await;
}
