//! A lease's frames that the controller has not acknowledged yet. They are
//! kept (bounded) and sent again after a reconnect; the controller applies
//! each sequence number once, so a resend never duplicates anything.

use std::collections::VecDeque;

use super::wire::{Seq, ShardFrame};

/// A lease's queue of frames. Sequenced frames stay until acked; frames
/// that are never acked (ShardFailed, ShardReleased) leave once written
/// to a stream.
#[derive(Debug)]
pub struct Outbox {
    frames: VecDeque<ShardFrame>,
    /// Frames before this index were written to the current stream.
    sent: usize,
    next_seq: Seq,
    capacity: usize,
}

impl Outbox {
    /// A new lease's outbox; its first frame is numbered [`Seq::FIRST`].
    pub fn new(capacity: usize) -> Self {
        Self::starting_at(Seq::FIRST, capacity)
    }

    /// An outbox whose next frame is numbered `next_seq`.
    pub fn starting_at(next_seq: Seq, capacity: usize) -> Self {
        Self { frames: VecDeque::new(), sent: 0, next_seq, capacity: capacity.max(2) }
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(2);
    }

    /// Whether a frame may be queued now.
    pub fn has_room(&self) -> bool {
        self.frames.len() < self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Queues a frame carrying the next sequence number; `build` gets it.
    pub fn push_seq(&mut self, build: impl FnOnce(Seq) -> ShardFrame) {
        let seq = self.next_seq;
        self.next_seq = seq.next();
        self.frames.push_back(build(seq));
    }

    /// Queues a frame that is not acked.
    pub fn push_final(&mut self, frame: ShardFrame) {
        self.frames.push_back(frame);
    }

    /// Frames not yet written to the current stream, marked written.
    /// Frames that are never acked are dropped once taken.
    pub fn take_unsent(&mut self) -> Vec<ShardFrame> {
        let out: Vec<ShardFrame> = self.frames.iter().skip(self.sent).cloned().collect();
        self.frames.retain(|f| f.seq().is_some());
        self.sent = self.frames.len();
        out
    }

    /// Drops every frame up to and including `seq`.
    pub fn ack(&mut self, seq: Seq) {
        while self.frames.front().is_some_and(|f| f.seq().is_some_and(|s| s <= seq)) {
            self.frames.pop_front();
            self.sent = self.sent.saturating_sub(1);
        }
    }

    /// After a reconnect everything still queued goes out again.
    pub fn rewind(&mut self) {
        self.sent = 0;
    }

    /// Frames queued, sent or not, that are not acked yet.
    pub fn len(&self) -> usize {
        self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engine::Counts,
        session::wire::{LeaseEpoch, LeaseId, ShardId},
    };

    fn lease() -> LeaseId {
        LeaseId { shard: ShardId::try_from(1).unwrap(), epoch: LeaseEpoch::try_from(1).unwrap() }
    }

    fn progress(seq: Seq) -> ShardFrame {
        ShardFrame::Progress { lease: lease(), seq, checkpoint: 0, counts: Counts::default() }
    }

    fn seq(n: u64) -> Seq {
        Seq::try_from(n).unwrap()
    }

    fn seqs(frames: &[ShardFrame]) -> Vec<u64> {
        frames.iter().map(|f| f.seq().map_or(0, Seq::get)).collect()
    }

    #[test]
    fn resends_only_what_is_unacked_after_a_reconnect() {
        let mut o = Outbox::new(4);
        for _ in 0..3 {
            o.push_seq(progress);
        }
        assert_eq!(seqs(&o.take_unsent()), [1, 2, 3]);
        assert!(o.take_unsent().is_empty());
        o.ack(seq(1));
        o.push_seq(progress);
        assert_eq!(seqs(&o.take_unsent()), [4]);
        o.rewind();
        assert_eq!(seqs(&o.take_unsent()), [2, 3, 4]);
        o.ack(seq(4));
        assert!(o.is_empty());
    }

    #[test]
    fn bounded_and_resumes_numbering() {
        let mut o = Outbox::starting_at(seq(8), 2);
        o.push_seq(progress);
        assert!(o.has_room());
        o.push_seq(progress);
        assert!(!o.has_room());
        assert_eq!(seqs(&o.take_unsent()), [8, 9]);
        o.push_final(ShardFrame::Released { lease: lease(), agent_leaving: true });
        assert_eq!(o.take_unsent().len(), 1);
        assert_eq!(o.len(), 2);
    }
}
