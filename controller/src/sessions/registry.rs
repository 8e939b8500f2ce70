//! The agents whose sessions live on this controller, with their leases as
//! this controller last knew them. Postgres stays the authority (every
//! frame is fenced there); the registry is for deciding whom to give work
//! and whom to tell about changes. Short critical sections, no awaits
//! under the lock.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::wire::{SentAt, ToAgent};
use crate::store::{AgentClass, Beat, LeaseEpoch, ShardId};

/// What the controller says to one agent, in order; its session turns it
/// into frames.
pub type Outbound = mpsc::Sender<ToAgent>;

#[derive(Clone, Debug)]
pub struct LeaseInfo {
    pub lease_epoch: LeaseEpoch,
    pub scan_id: Uuid,
    pub rate: u32,
}

#[derive(Debug)]
struct Entry {
    generation: i64,
    tx: Outbound,
    class: AgentClass,
    max_shards: u32,
    max_rate: u32,
    draining: bool,
    /// Counts the drains asked of this session, so that ending a drain
    /// can tell whether another came in meanwhile ([`Registry::undrain`]).
    drains: u64,
    /// The agent is shutting down: its drain can never end.
    leaving: bool,
    leases: HashMap<ShardId, LeaseInfo>,
    beat: Option<Beat>,
    /// `sent_at` of the agent's latest heartbeat, echoed back once its
    /// leases have been extended after it.
    last_sent_at: Option<SentAt>,
    closer: CancellationToken,
}

/// A connected agent as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub agent_id: Uuid,
    pub class: AgentClass,
    pub free: u32,
    pub max_rate: u32,
    pub max_shards: u32,
    pub tx: Outbound,
}

/// A lease held by a local agent.
#[derive(Clone, Debug)]
pub struct HeldLease {
    pub agent_id: Uuid,
    pub shard_id: ShardId,
    pub info: LeaseInfo,
    pub max_rate: u32,
    pub max_shards: u32,
    pub tx: Outbound,
}

/// What a new session registers.
pub struct NewSession {
    pub agent_id: Uuid,
    pub generation: i64,
    pub tx: Outbound,
    pub class: AgentClass,
    pub max_shards: u32,
    pub max_rate: u32,
    pub leases: HashMap<ShardId, LeaseInfo>,
    pub closer: CancellationToken,
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<Uuid, Entry>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session; an older session of the same agent is closed.
    pub fn insert(&self, s: NewSession) {
        let old = self.lock().insert(
            s.agent_id,
            Entry {
                generation: s.generation,
                tx: s.tx,
                class: s.class,
                max_shards: s.max_shards,
                max_rate: s.max_rate,
                draining: false,
                drains: 0,
                leaving: false,
                leases: s.leases,
                beat: None,
                last_sent_at: None,
                closer: s.closer,
            },
        );
        metrics::gauge!("portfleet_agents_connected").set(self.lock().len() as f64);
        if let Some(old) = old {
            old.closer.cancel();
        }
    }

    /// Removes the agent's entry if it still belongs to this session.
    pub fn remove(&self, agent_id: Uuid, generation: i64) {
        let mut map = self.lock();
        if map.get(&agent_id).is_some_and(|e| e.generation == generation) {
            map.remove(&agent_id);
        }
        metrics::gauge!("portfleet_agents_connected").set(map.len() as f64);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Agents with room for more shards, least loaded first.
    pub fn candidates(&self) -> Vec<Candidate> {
        let map = self.lock();
        let mut out: Vec<Candidate> = map
            .iter()
            .filter(|(_, e)| !e.draining && (e.leases.len() as u32) < e.max_shards)
            .map(|(id, e)| Candidate {
                agent_id: *id,
                class: e.class.clone(),
                free: e.max_shards - e.leases.len() as u32,
                max_rate: e.max_rate,
                max_shards: e.max_shards,
                tx: e.tx.clone(),
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.free));
        out
    }

    pub fn add_lease(&self, agent_id: Uuid, shard_id: ShardId, info: LeaseInfo) {
        if let Some(e) = self.lock().get_mut(&agent_id) {
            e.leases.insert(shard_id, info);
        }
    }

    pub fn remove_lease(&self, agent_id: Uuid, shard_id: ShardId) -> Option<LeaseInfo> {
        self.lock().get_mut(&agent_id).and_then(|e| e.leases.remove(&shard_id))
    }

    pub fn set_lease_rate(&self, agent_id: Uuid, shard_id: ShardId, rate: u32) {
        if let Some(l) = self.lock().get_mut(&agent_id).and_then(|e| e.leases.get_mut(&shard_id)) {
            l.rate = rate;
        }
    }

    /// The scan a local lease belongs to.
    pub fn lease_scan(&self, agent_id: Uuid, shard_id: ShardId) -> Option<Uuid> {
        self.lock().get(&agent_id).and_then(|e| e.leases.get(&shard_id)).map(|l| l.scan_id)
    }

    /// Every lease held by local agents.
    pub fn leases(&self) -> Vec<HeldLease> {
        let map = self.lock();
        map.iter()
            .flat_map(|(id, e)| {
                e.leases.iter().map(move |(shard, info)| HeldLease {
                    agent_id: *id,
                    shard_id: *shard,
                    info: info.clone(),
                    max_rate: e.max_rate,
                    max_shards: e.max_shards,
                    tx: e.tx.clone(),
                })
            })
            .collect()
    }

    pub fn record_beat(&self, beat: Beat, sent_at: Option<SentAt>) {
        if let Some(e) = self.lock().get_mut(&beat.agent_id) {
            e.beat = Some(beat);
            e.last_sent_at = sent_at.or(e.last_sent_at);
        }
    }

    /// Tells each of `agents` that its leases were extended after the
    /// latest heartbeat it sent (echoing that heartbeat's `sent_at`): the
    /// agent keeps probing only while such echoes keep coming.
    pub fn echo_heartbeats(&self, agents: &[Uuid]) {
        let map = self.lock();
        for id in agents {
            let Some(e) = map.get(id) else { continue };
            let Some(sent_at) = e.last_sent_at else { continue };
            // A full queue skips one echo; the next comes within a second.
            let _ = e.tx.try_send(ToAgent::Echo(sent_at));
        }
    }

    /// The heartbeats since the last call, and every local agent.
    pub fn take_beats(&self) -> (Vec<Beat>, Vec<Uuid>) {
        let mut map = self.lock();
        let agents = map.keys().copied().collect();
        let beats = map.values_mut().filter_map(|e| e.beat.take()).collect();
        (beats, agents)
    }

    pub fn generations(&self) -> Vec<(Uuid, i64)> {
        self.lock().iter().map(|(id, e)| (*id, e.generation)).collect()
    }

    /// The token that closes the agent's current session.
    pub fn closer(&self, agent_id: Uuid) -> Option<CancellationToken> {
        self.lock().get(&agent_id).map(|e| e.closer.clone())
    }

    /// Closes a session (superseded, revoked).
    pub fn close(&self, agent_id: Uuid) {
        if let Some(e) = self.lock().get(&agent_id) {
            e.closer.cancel();
        }
    }

    /// Marks an agent draining; returns its outbound channel to tell it.
    pub fn drain(&self, agent_id: Uuid) -> Option<Outbound> {
        let mut map = self.lock();
        let e = map.get_mut(&agent_id)?;
        e.draining = true;
        e.drains += 1;
        Some(e.tx.clone())
    }

    /// Marks an agent that is shutting down draining, for good.
    pub fn leave(&self, agent_id: Uuid) -> Option<Outbound> {
        let mut map = self.lock();
        let e = map.get_mut(&agent_id)?;
        e.draining = true;
        e.drains += 1;
        e.leaving = true;
        Some(e.tx.clone())
    }

    /// The drain an operator may end: its count, while the agent drains
    /// and is not leaving. Read it before reading the database, and pass
    /// it to [`Registry::undrain`].
    pub fn drain_mark(&self, agent_id: Uuid) -> Option<u64> {
        self.lock().get(&agent_id).filter(|e| e.draining && !e.leaving).map(|e| e.drains)
    }

    /// Ends the drain `mark` names; false if the agent was drained again
    /// since (the database read may predate that drain) or is leaving.
    pub fn undrain(&self, agent_id: Uuid, mark: u64) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(&agent_id).filter(|e| e.draining && !e.leaving && e.drains == mark) else {
            return false;
        };
        e.draining = false;
        true
    }

    pub fn is_draining(&self, agent_id: Uuid) -> bool {
        self.lock().get(&agent_id).is_some_and(|e| e.draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_with(agent_id: Uuid) -> Registry {
        let r = Registry::default();
        let (tx, _rx) = mpsc::channel(1);
        r.insert(NewSession {
            agent_id,
            generation: 1,
            tx,
            class: AgentClass { raw_socket: true, ipv6: false, labels: Default::default() },
            max_shards: 1,
            max_rate: 1000,
            leases: HashMap::new(),
            closer: CancellationToken::new(),
        });
        r
    }

    #[test]
    fn an_undrain_ends_only_the_drain_it_read_and_never_a_leave() {
        let id = Uuid::new_v4();
        let r = registry_with(id);
        assert_eq!(r.drain_mark(id), None, "not draining");
        r.drain(id);
        let mark = r.drain_mark(id).unwrap();
        // Drained again after the mark was read (the database read may
        // predate it): that drain stays.
        r.drain(id);
        assert!(!r.undrain(id, mark));
        assert!(r.is_draining(id));
        let mark = r.drain_mark(id).unwrap();
        assert!(r.undrain(id, mark));
        assert!(!r.is_draining(id) && r.candidates().len() == 1);
        r.leave(id);
        assert_eq!(r.drain_mark(id), None, "a leaving agent's drain cannot end");
        assert!(!r.undrain(id, mark + 2));
    }
}
