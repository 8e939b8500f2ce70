//! An agent test double that speaks the session protocol by hand and never
//! sends a packet: it takes Assigns and reports whatever results a test
//! makes up, so scans of TEST-NET addresses complete with known results.
//! A background task heartbeats, so the session outlives slow test steps.

use std::time::Duration;

use portfleet_proto::v1::{
    self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient, controller_message::Frame as In,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::TestController;

pub struct FakeAgent {
    pub id: String,
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: Streaming<pb::ControllerMessage>,
    beats: JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.beats.abort();
    }
}

impl FakeAgent {
    /// Opens a session as a new agent named `name` (raw sockets, IPv6, one
    /// shard at a time) and waits for the Welcome.
    pub async fn connect(c: &TestController, name: &str) -> Self {
        Self::connect_channel(c.channel().await, name).await
    }

    /// [`FakeAgent::connect`] over `channel` (a controller binary's).
    pub async fn connect_channel(channel: tonic::transport::Channel, name: &str) -> Self {
        let id = uuid::Uuid::new_v4().to_string();
        let hello = pb::Hello {
            agent_id: id.clone(),
            name: name.into(),
            version: "test".into(),
            min_protocol_version: 1,
            max_protocol_version: 1,
            capabilities: Some(pb::Capabilities { raw_socket: true, ipv6: true }),
            max_shards: 1,
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel(64);
        tx.send(pb::AgentMessage { frame: Some(Out::Hello(hello)) }).await.expect("queue Hello");
        let mut client = AgentServiceClient::new(channel);
        let mut rx = client.session(ReceiverStream::new(rx)).await.expect("session").into_inner();
        match rx.message().await.expect("Welcome").and_then(|m| m.frame) {
            Some(In::Welcome(_)) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
        let beats = {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(300));
                loop {
                    every.tick().await;
                    let beat = pb::AgentMessage { frame: Some(Out::Heartbeat(pb::Heartbeat::default())) };
                    if tx.send(beat).await.is_err() {
                        return;
                    }
                }
            })
        };
        Self { id, tx, rx, beats }
    }

    pub async fn send(&self, f: Out) {
        self.tx.send(pb::AgentMessage { frame: Some(f) }).await.expect("session open");
    }

    /// The next frame that is not a heartbeat echo, within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<In> {
        tokio::time::timeout(wait, async {
            loop {
                let m = self.rx.message().await.expect("stream alive").expect("stream open");
                match m.frame {
                    Some(In::Heartbeat(_)) | None => {}
                    Some(f) => return f,
                }
            }
        })
        .await
        .ok()
    }

    /// The next frame that is not a heartbeat echo (10 s at most).
    pub async fn next(&mut self) -> In {
        self.next_within(Duration::from_secs(10)).await.expect("a frame within 10 s")
    }

    /// Waits for an Assign, skipping other frames.
    pub async fn assigned(&mut self, wait: Duration) -> Option<pb::Assign> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await? {
                In::Assign(a) => return Some(a),
                _ => continue,
            }
        }
    }

    /// Reports `results` (open) for an assigned shard and completes it.
    pub async fn finish(&self, a: &pb::Assign, results: &[(std::net::IpAddr, u16)]) {
        let results = results
            .iter()
            .map(|(ip, port)| pb::PortResult {
                ip: match ip {
                    std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                    std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
                },
                port: u32::from(*port),
                state: pb::PortState::Open as i32,
                observed_at: None,
                ..Default::default()
            })
            .collect();
        let (shard_id, lease_epoch) = (a.shard_id, a.lease_epoch);
        self.send(Out::Results(pb::ResultBatch { shard_id, lease_epoch, seq: 1, results, trace_parent: None })).await;
        self.send(Out::Complete(pb::ShardComplete { shard_id, lease_epoch, seq: 2, counts: None })).await;
    }
}

/// The scan space an Assign names, built as a real agent builds it (for
/// results at positions of its shard).
pub fn space_of(a: &pb::Assign) -> portfleet_core::ScanSpace {
    let p = a.scan.as_ref().expect("scan parameters");
    portfleet_core::ScanSpace::new(
        portfleet_core::AddressSet::parse_ranges(&p.address_ranges).expect("address ranges"),
        portfleet_core::PortSet::parse(&p.ports).expect("ports"),
        p.seed,
        u64::MAX,
    )
    .expect("the Assign's space")
}
