//! Opening a session: the first frame must be a valid Hello within the
//! deadline (claiming the agent its certificate names, with mTLS); the
//! session is then recorded with a new generation, the leases the agent
//! still holds are resumed, and Welcome goes out.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use portfleet_proto::v1::{self as pb, agent_message::Frame as In};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use uuid::Uuid;

use super::{
    Fleet,
    registry::{LeaseInfo, NewSession, Outbound},
    wire::{Hello, ToAgent, Welcome},
};
use crate::store::{AgentClass, LiveSession, SessionOpening};

/// An open session: the agent and the generation that fences it.
#[derive(Clone, Debug)]
pub struct Opened {
    pub agent_id: Uuid,
    pub generation: i64,
    /// The agent's name, for messages about it.
    pub name: String,
}

/// Reads the Hello. `identity`: the agent id the client certificate names
/// (mTLS), which the Hello must claim.
pub async fn hello(
    fleet: &Fleet,
    inbound: &mut Streaming<pb::AgentMessage>,
    identity: Option<Uuid>,
) -> Result<Hello, Status> {
    let timeout = fleet.config.hello_timeout;
    let first = tokio::time::timeout(timeout, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded(format!("no Hello within {timeout:?}")))??;
    let hello = match first.and_then(|m| m.frame) {
        Some(In::Hello(h)) => Hello::try_from(h)?,
        Some(_) => return Err(Status::invalid_argument("the first frame must be Hello")),
        None => return Err(Status::cancelled("stream ended before Hello")),
    };
    match identity {
        Some(id) if id != hello.intro.id => Err(Status::permission_denied(format!(
            "Hello claims agent {} but the certificate is agent {id}",
            hello.intro.id
        ))),
        _ => Ok(hello),
    }
}

fn millis(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Records the session, resumes held leases, sends Welcome and registers
/// the session with its `closer`. `None` when the agent went away first.
/// Refused (`ALREADY_EXISTS`) while another session of the agent, from
/// `peer` or elsewhere, is alive: the newcomer is the one that goes, so
/// two processes with one id cannot knock each other off.
pub async fn open(
    fleet: &Arc<Fleet>,
    hello: Hello,
    peer: Option<SocketAddr>,
    tx: &Outbound,
    closer: CancellationToken,
) -> Result<Option<Opened>, Status> {
    let cfg = &fleet.config;
    let agent_id = hello.intro.id;
    let store = |e| crate::api::store_status(e);
    let peer_text = peer.map(|p| p.to_string());
    let opening = fleet
        .store
        .open_agent_session(&hello.intro, &cfg.controller_id, peer_text.as_deref(), cfg.lease_ttl)
        .await
        .map_err(store)?;
    let generation = match opening {
        SessionOpening::Opened(generation) => generation,
        SessionOpening::Live(live) => return Err(already_live(agent_id, &hello.intro.name, &live, cfg.lease_ttl)),
    };
    let adopted =
        fleet.store.adopt_leases(agent_id, &cfg.controller_id, &hello.held, cfg.lease_ttl).await.map_err(store)?;
    let revoked = hello
        .held
        .iter()
        .filter(|(id, epoch)| !adopted.iter().any(|a| a.id == *id && a.lease_epoch == *epoch))
        .copied()
        .collect();
    let welcome = Welcome {
        version: hello.version,
        generation,
        heartbeat_interval_ms: millis(cfg.heartbeat_interval),
        max_batch_results: cfg.max_batch_results,
        max_unacked_frames: cfg.max_unacked_frames,
        lease_ttl_ms: millis(cfg.lease_ttl),
        disconnect_grace_ms: millis(cfg.disconnect_grace),
        controller_id: cfg.controller_id.clone(),
        revoked,
    };
    if tx.send(ToAgent::Welcome(welcome)).await.is_err() {
        return Ok(None);
    }
    let leases: HashMap<_, _> =
        adopted.iter().map(|a| (a.id, LeaseInfo { lease_epoch: a.lease_epoch, scan_id: a.scan_id, rate: 0 })).collect();
    fleet.registry.insert(NewSession {
        agent_id,
        generation,
        tx: tx.clone(),
        class: AgentClass {
            raw_socket: hello.intro.raw_socket,
            ipv6: hello.intro.ipv6,
            labels: hello.labels.into_map(),
        },
        max_shards: u32::try_from(hello.intro.max_shards).unwrap_or(1),
        max_rate: u32::try_from(hello.intro.max_rate).unwrap_or(0),
        leases,
        closer,
    });
    match peer {
        Some(peer) => tracing::info!(%agent_id, name = %hello.intro.name, generation, %peer, resumed = adopted.len(),
            "agent connected"),
        None => tracing::info!(%agent_id, name = %hello.intro.name, generation, resumed = adopted.len(),
            "agent connected"),
    }
    fleet.wake.notify_one();
    Ok(Some(Opened { agent_id, generation, name: hello.intro.name }))
}

/// The refusal of a second session while the first lives: names the
/// first, and when it would count as gone.
fn already_live(agent_id: Uuid, name: &str, live: &LiveSession, ttl: std::time::Duration) -> Status {
    let from = live.peer.as_deref().map(|p| format!(" from {p}")).unwrap_or_default();
    let on = live.controller_id.as_deref().map(|c| format!(" on controller {c}")).unwrap_or_default();
    Status::already_exists(format!(
        "agent {agent_id} ({name}) already has a live session{from}{on} (last heartbeat {:.1}s ago); \
         is another process running with the same agent id? A session silent for {ttl:?} gives way",
        live.silent_ms as f64 / 1000.0
    ))
}
