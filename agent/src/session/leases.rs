//! The leases this agent holds, across connections.
//!
//! Each lease is one [`Lease`]: its outbox, its stop token and stop mode,
//! its engine's control knobs and live counts. The shard task that works a
//! lease owns an `Arc` of it and does everything through it - queueing
//! frames, waiting for room, pausing its engine - without ever touching the
//! registry. The registry ([`Leases`]) is what the connection's reader and
//! writer, the watchdog and shutdown use to find leases by shard.
//!
//! Lock order: the registry's map, then a lease's state; a lease never
//! takes the map lock.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    outbox::Outbox,
    wire::{LeaseId, Seq, ShardFrame, ShardId},
};
use crate::engine::{EngineControl, LiveCounts};

/// What to do with a shard that is stopped before it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// The controller cancelled it, or it lapsed: forget it and its frames.
    Drop,
    /// This agent is shutting down: report the checkpoint, hand it back.
    Release,
}

#[derive(Debug)]
struct LeaseState {
    outbox: Outbox,
    /// The shard task has queued its last frame.
    finished: bool,
    /// Why the lease was stopped, if it was.
    stopped: Option<StopMode>,
}

/// One lease and everything its shard task needs to work it.
#[derive(Debug)]
pub struct Lease {
    id: LeaseId,
    state: Mutex<LeaseState>,
    /// Room appeared in the outbox (or the lease was dropped).
    room: Notify,
    /// Shared with every lease: something was queued for sending.
    outgoing: Arc<Notify>,
    stop: CancellationToken,
    control: Arc<EngineControl>,
    counts: OnceLock<Arc<LiveCounts>>,
}

impl Lease {
    fn new(id: LeaseId, max_unacked: usize, rate: u32, outgoing: Arc<Notify>) -> Self {
        Self {
            id,
            state: Mutex::new(LeaseState { outbox: Outbox::new(max_unacked), finished: false, stopped: None }),
            room: Notify::new(),
            outgoing,
            stop: CancellationToken::new(),
            control: Arc::new(EngineControl::new(rate)),
            counts: OnceLock::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// The engine's rate and pause knobs.
    pub fn control(&self) -> &Arc<EngineControl> {
        &self.control
    }

    /// Cancelled when the lease is stopped (see [`Lease::stop_mode`]).
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    pub fn stop_mode(&self) -> Option<StopMode> {
        self.state().stopped
    }

    /// The running engine's counters, for the heartbeat's rate.
    /// Frames queued or sent and not yet acked.
    pub fn unacked(&self) -> usize {
        self.state().outbox.len()
    }

    pub fn set_counts(&self, counts: Arc<LiveCounts>) {
        let _ = self.counts.set(counts);
    }

    /// Probes sent so far, once the engine runs.
    pub fn probes_sent(&self) -> Option<u64> {
        self.counts.get().map(|c| c.sent.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Queues a sequenced frame, waiting while the outbox is full (pausing
    /// the engine meanwhile). Returns false if the lease was dropped.
    pub async fn push(&self, build: impl FnOnce(Seq) -> ShardFrame) -> bool {
        let mut build = Some(build);
        loop {
            let room = self.room.notified();
            {
                let mut state = self.state();
                if state.stopped == Some(StopMode::Drop) {
                    return false;
                }
                if state.outbox.has_room() {
                    if let Some(b) = build.take() {
                        state.outbox.push_seq(b);
                    }
                    drop(state);
                    self.control.set_paused(false);
                    self.outgoing.notify_one();
                    return true;
                }
            }
            self.control.set_paused(true);
            room.await;
        }
    }

    /// Queues the lease's last, un-acked frame (nothing if it was dropped).
    pub fn push_final(&self, frame: ShardFrame) {
        {
            let mut state = self.state();
            if state.stopped == Some(StopMode::Drop) {
                return;
            }
            state.outbox.push_final(frame);
            state.finished = true;
        }
        self.outgoing.notify_one();
    }

    /// The shard task has queued its last frame.
    pub fn finish(&self) {
        self.state().finished = true;
        self.outgoing.notify_one();
    }

    /// Stops the shard task; `Drop` also forgets the lease's frames.
    fn stop(&self, mode: StopMode) {
        {
            let mut state = self.state();
            state.stopped = Some(mode);
            if mode == StopMode::Drop {
                state.outbox = Outbox::new(0);
            }
        }
        self.stop.cancel();
        self.room.notify_waiters();
    }

    /// Every frame up to `seq` is committed.
    pub fn ack(&self, seq: Seq) {
        self.state().outbox.ack(seq);
        self.room.notify_waiters();
    }

    /// Frames not yet written to the current stream.
    pub fn take_unsent(&self) -> Vec<ShardFrame> {
        let frames = self.state().outbox.take_unsent();
        self.room.notify_waiters();
        frames
    }

    /// A new stream: everything unacked goes out again, under the new
    /// session's limit.
    pub fn resume(&self, max_unacked: usize) {
        {
            let mut state = self.state();
            state.outbox.set_capacity(max_unacked);
            state.outbox.rewind();
        }
        self.room.notify_waiters();
    }

    pub fn is_finished(&self) -> bool {
        self.state().finished
    }

    /// Work over and every frame out: nothing left to do for this lease.
    fn is_done(&self) -> bool {
        let state = self.state();
        state.finished && state.outbox.is_empty()
    }
}

/// The registry of leases, by shard.
#[derive(Debug, Default)]
pub struct Leases {
    map: Mutex<HashMap<ShardId, Arc<Lease>>>,
    outgoing: Arc<Notify>,
}

impl Leases {
    fn map(&self) -> MutexGuard<'_, HashMap<ShardId, Arc<Lease>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notified when any lease queued a frame.
    pub fn outgoing(&self) -> &Notify {
        &self.outgoing
    }

    /// Registers a new lease; an older lease of the same shard is dropped.
    pub fn open(&self, id: LeaseId, max_unacked: usize, rate: u32) -> Arc<Lease> {
        let lease = Arc::new(Lease::new(id, max_unacked, rate, self.outgoing.clone()));
        if let Some(old) = self.map().insert(id.shard, lease.clone()) {
            old.stop(StopMode::Drop);
        }
        lease
    }

    /// The lease `id`, if this agent holds it at that epoch.
    pub fn get(&self, id: LeaseId) -> Option<Arc<Lease>> {
        self.map().get(&id.shard).filter(|l| l.id == id).cloned()
    }

    /// Stops and forgets the lease `id`; false if it is not held.
    pub fn drop_lease(&self, id: LeaseId) -> bool {
        let mut map = self.map();
        if map.get(&id.shard).is_none_or(|l| l.id != id) {
            return false;
        }
        if let Some(lease) = map.remove(&id.shard) {
            lease.stop(StopMode::Drop);
        }
        true
    }

    /// Asks every shard task to hand its lease back (shutdown).
    pub fn release_all(&self) {
        for lease in self.map().values() {
            lease.stop(StopMode::Release);
        }
        self.outgoing.notify_one();
    }

    /// Stops and forgets every lease (the daemon is exiting).
    pub fn drop_all(&self) {
        for (_, lease) in self.map().drain() {
            lease.stop(StopMode::Drop);
        }
    }

    /// Leases in hand, for a Hello.
    pub fn held(&self) -> Vec<LeaseId> {
        self.map().values().map(|l| l.id).collect()
    }

    /// Every lease, to work on outside the registry's lock.
    pub fn all(&self) -> Vec<Arc<Lease>> {
        self.map().values().cloned().collect()
    }

    /// Forgets leases whose work is over and whose frames are all out.
    pub fn reap(&self) {
        self.map().retain(|_, l| !l.is_done());
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// The leases' gauges for the metrics sampler.
    pub fn gauges(&self) -> crate::metrics::LeaseGauges {
        let map = self.map();
        crate::metrics::LeaseGauges {
            held: map.len(),
            assigned_rate: map.values().map(|l| u64::from(l.control.rate())).sum(),
            unacked: map.values().map(|l| l.unacked()).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{engine::Counts, session::wire::LeaseEpoch};

    fn id(shard: u64, epoch: u64) -> LeaseId {
        LeaseId { shard: ShardId::try_from(shard).unwrap(), epoch: LeaseEpoch::try_from(epoch).unwrap() }
    }

    fn progress(lease: LeaseId) -> impl FnOnce(Seq) -> ShardFrame {
        move |seq| ShardFrame::Progress { lease, seq, checkpoint: 0, counts: Counts::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_pauses_the_engine_until_an_ack_makes_room() {
        let leases = Leases::default();
        let lease = leases.open(id(1, 1), 2, 100);
        assert!(lease.push(progress(lease.id())).await);
        assert!(lease.push(progress(lease.id())).await);
        let blocked = tokio::spawn({
            let lease = lease.clone();
            async move { lease.push(progress(lease.id())).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(lease.control().is_paused() && !blocked.is_finished());
        leases.get(id(1, 1)).unwrap().ack(Seq::FIRST);
        assert!(blocked.await.unwrap());
        assert!(!lease.control().is_paused());
        assert_eq!(lease.take_unsent().len(), 2, "seq 2 and 3");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_lease_wakes_and_fails_its_task_and_forgets_its_frames() {
        let leases = Leases::default();
        let lease = leases.open(id(1, 1), 2, 100);
        assert!(lease.push(progress(lease.id())).await);
        assert!(lease.push(progress(lease.id())).await);
        let blocked = tokio::spawn({
            let lease = lease.clone();
            async move { lease.push(progress(lease.id())).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Another epoch of the same shard names another lease.
        assert!(!leases.drop_lease(id(1, 2)));
        assert!(leases.drop_lease(id(1, 1)));
        assert!(!blocked.await.unwrap());
        assert!(lease.stop_token().is_cancelled() && lease.stop_mode() == Some(StopMode::Drop));
        assert!(lease.take_unsent().is_empty() && leases.is_empty());
    }

    #[tokio::test]
    async fn a_new_epoch_replaces_the_old_lease_and_finished_leases_are_reaped_once_out() {
        let leases = Leases::default();
        let old = leases.open(id(1, 1), 4, 100);
        let new = leases.open(id(1, 2), 4, 100);
        assert_eq!(old.stop_mode(), Some(StopMode::Drop));
        assert!(!old.push(progress(old.id())).await, "the old task's frames go nowhere");
        assert!(leases.get(id(1, 1)).is_none() && leases.get(id(1, 2)).is_some());
        assert_eq!(leases.held(), [id(1, 2)]);
        new.push_final(ShardFrame::Failed { lease: new.id(), reason: "no".into() });
        leases.reap();
        assert!(!leases.is_empty(), "the failure is not out yet");
        assert_eq!(new.take_unsent().len(), 1);
        leases.reap();
        assert!(leases.is_empty());
    }

    #[tokio::test]
    async fn release_keeps_the_lease_so_its_task_can_hand_it_back() {
        let leases = Leases::default();
        let lease = leases.open(id(3, 1), 4, 100);
        leases.release_all();
        assert!(lease.stop_token().is_cancelled() && lease.stop_mode() == Some(StopMode::Release));
        assert!(lease.push(progress(lease.id())).await);
        lease.push_final(ShardFrame::Released { lease: lease.id(), agent_leaving: true });
        assert_eq!(lease.take_unsent().len(), 2);
        leases.reap();
        assert!(!leases.is_empty(), "the progress is not acked yet");
        lease.ack(Seq::FIRST);
        leases.reap();
        assert!(leases.is_empty());
    }
}
