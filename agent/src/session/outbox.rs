//! A lease's frames that the controller has not acknowledged yet. They are
//! kept (bounded) and sent again after a reconnect; the controller applies
//! each sequence number once, so a resend never duplicates anything.

use std::collections::VecDeque;

use portfleet_proto::v1::AgentMessage;

/// One queued frame; `seq` is `None` for frames that are never acked
/// (ShardFailed, ShardReleased): they leave once written to a stream.
#[derive(Clone, Debug)]
pub struct Queued {
    pub seq: Option<u64>,
    pub msg: AgentMessage,
}

#[derive(Debug)]
pub struct Outbox {
    frames: VecDeque<Queued>,
    /// Frames before this index were written to the current stream.
    sent: usize,
    next_seq: u64,
    capacity: usize,
}

impl Outbox {
    /// A new lease's outbox; sequence numbers start after `acked`.
    pub fn new(acked: u64, capacity: usize) -> Self {
        Self { frames: VecDeque::new(), sent: 0, next_seq: acked + 1, capacity: capacity.max(2) }
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
    pub fn push_seq(&mut self, build: impl FnOnce(u64) -> AgentMessage) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.frames.push_back(Queued { seq: Some(seq), msg: build(seq) });
    }

    /// Queues a frame that is not acked.
    pub fn push_final(&mut self, msg: AgentMessage) {
        self.frames.push_back(Queued { seq: None, msg });
    }

    /// Frames not yet written to the current stream, marked written.
    /// Unacked-by-design frames are dropped once taken.
    pub fn take_unsent(&mut self) -> Vec<AgentMessage> {
        let out: Vec<AgentMessage> = self.frames.iter().skip(self.sent).map(|q| q.msg.clone()).collect();
        self.sent = self.frames.len();
        // Frames that are never acked are done once written.
        self.frames.retain(|q| q.seq.is_some());
        self.sent = self.frames.len();
        out
    }

    /// Drops every frame up to and including `seq`.
    pub fn ack(&mut self, seq: u64) {
        while self.frames.front().is_some_and(|q| q.seq.is_some_and(|s| s <= seq)) {
            self.frames.pop_front();
            self.sent = self.sent.saturating_sub(1);
        }
    }

    /// After a reconnect everything still queued goes out again.
    pub fn rewind(&mut self) {
        self.sent = 0;
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use portfleet_proto::v1::{Progress, agent_message::Frame};

    use super::*;

    fn progress(seq: u64) -> AgentMessage {
        AgentMessage { frame: Some(Frame::Progress(Progress { seq, ..Default::default() })) }
    }

    fn seqs(msgs: &[AgentMessage]) -> Vec<u64> {
        msgs.iter()
            .map(|m| match &m.frame {
                Some(Frame::Progress(p)) => p.seq,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn resends_only_what_is_unacked_after_a_reconnect() {
        let mut o = Outbox::new(0, 4);
        for _ in 0..3 {
            o.push_seq(progress);
        }
        assert_eq!(seqs(&o.take_unsent()), [1, 2, 3]);
        assert!(o.take_unsent().is_empty());
        o.ack(1);
        o.push_seq(progress);
        assert_eq!(seqs(&o.take_unsent()), [4]);
        o.rewind();
        assert_eq!(seqs(&o.take_unsent()), [2, 3, 4]);
        o.ack(4);
        assert!(o.is_empty());
    }

    #[test]
    fn bounded_and_resumes_numbering() {
        let mut o = Outbox::new(7, 2);
        o.push_seq(progress);
        assert!(o.has_room());
        o.push_seq(progress);
        assert!(!o.has_room());
        assert_eq!(seqs(&o.take_unsent()), [8, 9]);
        o.push_final(AgentMessage::default());
        assert_eq!(o.take_unsent().len(), 1);
        assert_eq!(o.len(), 2);
    }
}
