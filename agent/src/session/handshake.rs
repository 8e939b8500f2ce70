//! The start of every session: Hello (with the leases still in hand) and
//! the controller's Welcome, whose terms apply to the whole agent - lease
//! limits, revoked leases, how long leases are sure to last.

use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;

use super::{
    Agent,
    connection::SessionEnd,
    wire::{self, FrameSink, FrameSource, Hello, Inbound, Welcome},
};

/// Longest wait for the Welcome after the Hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends Hello on a new stream and waits for the Welcome; applies it.
pub async fn run(agent: &Agent, channel: Channel) -> Result<(FrameSink, FrameSource, Welcome), SessionEnd> {
    let hello = Hello {
        agent_id: agent.id,
        name: agent.config.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: agent.capabilities,
        labels: agent.config.labels.clone(),
        max_rate: agent.config.max_rate,
        max_shards: agent.config.max_shards,
        held: agent.leases.held(),
    };
    let hello_sent = Instant::now();
    let (sink, mut source) = wire::open(channel, hello).await.map_err(SessionEnd::Refused)?;
    let first = tokio::time::timeout(WELCOME_TIMEOUT, source.next())
        .await
        .map_err(|_| SessionEnd::NoWelcome)?
        .map_err(SessionEnd::Refused)?;
    let Some(Ok(Inbound::Welcome(welcome))) = first else {
        return Err(SessionEnd::NotWelcome);
    };
    accept(agent, &welcome, hello_sent);
    Ok((sink, source, welcome))
}

/// Applies a Welcome's terms: drops revoked leases, resends every other
/// lease's unacked frames under the new limits, and counts the leases as
/// fresh from the Hello (the controller adopted or revoked each of them).
fn accept(agent: &Agent, welcome: &Welcome, hello_sent: Instant) {
    agent.set_limits(welcome.limits);
    for &lease in &welcome.revoked {
        tracing::warn!(
            shard_id = lease.shard.get(),
            epoch = lease.epoch.get(),
            "lease lapsed while disconnected; dropping it"
        );
        agent.leases.drop_lease(lease);
    }
    agent.contact.welcomed(hello_sent, welcome.lapse, welcome.echoes);
    for lease in agent.leases.all() {
        lease.resume(welcome.limits.max_unacked);
    }
}
