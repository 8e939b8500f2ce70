//! The in-flight window of a SYN scan: which recently sent positions have
//! been answered, when each block may be retried, and when it is final.
//!
//! Positions are sent in blocks, in order. A ring of slots holds the
//! answered-bits of blocks not yet final, so memory is bounded by the
//! window (rate x timeout), never by the number of targets. Ownership is
//! split so no lock is needed:
//! - a block's send thread initialises its slot, sends and resends it, and
//!   marks it final when its attempts are spent;
//! - the receive thread sets answered-bits, marks a fully answered block
//!   final at once (the scan never waits on probes already answered), and
//!   retires final blocks in order - which is what moves the checkpoint.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Largest block: 16 words of answered-bits.
pub const MAX_BLOCK: u64 = 1024;
const WORDS: usize = (MAX_BLOCK / 64) as usize;
const EMPTY: u64 = u64::MAX;

struct Slot {
    block: AtomicU64,
    bits: [AtomicU64; WORDS],
    answered: AtomicU32,
    /// Attempt number being sent or awaited (1 = first).
    attempt: AtomicU32,
    /// When the current attempt started and finished sending (ns since
    /// the window's epoch).
    started_ns: AtomicU64,
    sent_ns: AtomicU64,
    /// 0 until final; then the time from which it may be retired.
    final_ns: AtomicU64,
}

impl Slot {
    fn new() -> Self {
        Self {
            block: AtomicU64::new(EMPTY),
            bits: std::array::from_fn(|_| AtomicU64::new(0)),
            answered: AtomicU32::new(0),
            attempt: AtomicU32::new(0),
            started_ns: AtomicU64::new(0),
            sent_ns: AtomicU64::new(0),
            final_ns: AtomicU64::new(0),
        }
    }
}

/// What a reply meant to the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// First answer for this position; `rtt` when it answered a first
    /// attempt (Karn: retried probes give no RTT sample).
    New {
        rtt: Option<Duration>,
    },
    Duplicate,
    /// The position's block is already final and retired.
    Late,
    /// Not a position in flight (never sent).
    Unknown,
}

/// A retired block's tally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retired {
    pub block: u64,
    pub unanswered: u64,
}

pub struct Window {
    start: u64,
    end: u64,
    block_len: u64,
    nblocks: u64,
    slots: Box<[Slot]>,
    next_block: AtomicU64,
    retired: AtomicU64,
    epoch: Instant,
    srtt_ns: AtomicU64,
    rttvar_ns: AtomicU64,
    min_timeout_ns: u64,
    max_timeout_ns: u64,
}

impl Window {
    /// A window over positions `[start, end)` in blocks of `block_len`
    /// (at most [`MAX_BLOCK`]), with `capacity` slots. The retry timeout
    /// adapts to measured round trips within `[min_timeout, max_timeout]`
    /// and is `max_timeout` until the first reply.
    pub fn new(
        start: u64,
        end: u64,
        block_len: u64,
        capacity: usize,
        min_timeout: Duration,
        max_timeout: Duration,
    ) -> Self {
        let block_len = block_len.clamp(1, MAX_BLOCK);
        let max_timeout_ns = max_timeout.as_nanos() as u64;
        Self {
            start,
            end,
            block_len,
            nblocks: (end - start).div_ceil(block_len),
            slots: (0..capacity.max(1)).map(|_| Slot::new()).collect(),
            next_block: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            epoch: Instant::now(),
            srtt_ns: AtomicU64::new(0),
            rttvar_ns: AtomicU64::new(0),
            min_timeout_ns: (min_timeout.as_nanos() as u64).min(max_timeout_ns),
            max_timeout_ns,
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn nblocks(&self) -> u64 {
        self.nblocks
    }

    fn slot(&self, block: u64) -> &Slot {
        &self.slots[(block % self.slots.len() as u64) as usize]
    }

    /// Positions `[lo, hi)` of a block.
    pub fn block_positions(&self, block: u64) -> (u64, u64) {
        let lo = self.start + block * self.block_len;
        (lo, (lo + self.block_len).min(self.end))
    }

    /// Claims the next unsent block for a send thread.
    pub fn claim(&self) -> Option<u64> {
        let b = self.next_block.fetch_add(1, Ordering::Relaxed);
        (b < self.nblocks).then_some(b)
    }

    /// Whether the slot for `block` is free (the block that used it last
    /// has been retired).
    pub fn slot_free(&self, block: u64) -> bool {
        block < self.retired.load(Ordering::Acquire) + self.slots.len() as u64
    }

    /// Starts the first attempt of a claimed block whose slot is free.
    pub fn begin(&self, block: u64) {
        let s = self.slot(block);
        for w in &s.bits {
            w.store(0, Ordering::Relaxed);
        }
        s.answered.store(0, Ordering::Relaxed);
        s.attempt.store(1, Ordering::Relaxed);
        s.final_ns.store(0, Ordering::Relaxed);
        s.sent_ns.store(u64::MAX, Ordering::Relaxed);
        s.started_ns.store(self.now_ns(), Ordering::Relaxed);
        // Publishes the reset fields to the receive thread.
        s.block.store(block, Ordering::Release);
    }

    /// Whether `block` is in flight and not yet final.
    pub fn live(&self, block: u64) -> bool {
        let s = self.slot(block);
        s.block.load(Ordering::Acquire) == block && s.final_ns.load(Ordering::Acquire) == 0
    }

    pub fn is_answered(&self, pos: u64) -> bool {
        let rel = pos - self.start;
        let s = self.slot(rel / self.block_len);
        let bit = rel % self.block_len;
        s.bits[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
    }

    /// Records that an attempt finished sending now.
    pub fn sent(&self, block: u64) {
        self.slot(block).sent_ns.store(self.now_ns(), Ordering::Release);
    }

    /// Starts attempt `attempt` (a resend) of a live block.
    pub fn retry(&self, block: u64, attempt: u32) {
        let s = self.slot(block);
        s.attempt.store(attempt, Ordering::Relaxed);
        s.sent_ns.store(u64::MAX, Ordering::Relaxed);
        s.started_ns.store(self.now_ns(), Ordering::Release);
    }

    /// When the current attempt of `block` times out (ns), if it has
    /// finished sending.
    pub fn due_ns(&self, block: u64) -> u64 {
        self.slot(block).sent_ns.load(Ordering::Acquire).saturating_add(self.timeout_ns())
    }

    pub fn attempt(&self, block: u64) -> u32 {
        self.slot(block).attempt.load(Ordering::Relaxed)
    }

    /// Marks a block final: its attempts are spent.
    pub fn finish(&self, block: u64) {
        let _ =
            self.slot(block).final_ns.compare_exchange(0, self.now_ns().max(1), Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Receive thread: records an answer for `pos`.
    pub fn mark(&self, pos: u64) -> Mark {
        if pos < self.start || pos >= self.end {
            return Mark::Unknown;
        }
        let rel = pos - self.start;
        let block = rel / self.block_len;
        if block < self.retired.load(Ordering::Relaxed) {
            return Mark::Late;
        }
        let s = self.slot(block);
        if s.block.load(Ordering::Acquire) != block {
            return Mark::Unknown;
        }
        let bit = rel % self.block_len;
        let mask = 1u64 << (bit % 64);
        if s.bits[(bit / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask != 0 {
            return Mark::Duplicate;
        }
        let now = self.now_ns();
        let answered = s.answered.fetch_add(1, Ordering::AcqRel) + 1;
        let (lo, hi) = self.block_positions(block);
        if u64::from(answered) == hi - lo {
            let _ = s.final_ns.compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Relaxed);
        }
        let rtt = (s.attempt.load(Ordering::Relaxed) == 1)
            .then(|| Duration::from_nanos(now.saturating_sub(s.started_ns.load(Ordering::Acquire))));
        if let Some(rtt) = rtt {
            self.sample_rtt(rtt);
        }
        Mark::New { rtt }
    }

    /// Send thread: settles a position without probing it (a denied
    /// address), so its block can complete. Not an answer.
    pub fn skip(&self, pos: u64) {
        let rel = pos - self.start;
        let block = rel / self.block_len;
        let s = self.slot(block);
        let bit = rel % self.block_len;
        let mask = 1u64 << (bit % 64);
        if s.bits[(bit / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask == 0 {
            let answered = s.answered.fetch_add(1, Ordering::AcqRel) + 1;
            let (lo, hi) = self.block_positions(block);
            if u64::from(answered) == hi - lo {
                let _ = s.final_ns.compare_exchange(0, self.now_ns().max(1), Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// Receive thread: retires final blocks in order, calling `f` for each.
    /// Returns whether any was retired.
    pub fn retire_ready(&self, mut f: impl FnMut(Retired)) -> bool {
        let now = self.now_ns();
        let mut any = false;
        loop {
            let r = self.retired.load(Ordering::Relaxed);
            if r >= self.nblocks {
                return any;
            }
            let s = self.slot(r);
            if s.block.load(Ordering::Acquire) != r {
                return any;
            }
            let fin = s.final_ns.load(Ordering::Acquire);
            if fin == 0 || fin > now {
                return any;
            }
            let (lo, hi) = self.block_positions(r);
            let answered = u64::from(s.answered.load(Ordering::Acquire));
            f(Retired { block: r, unanswered: (hi - lo).saturating_sub(answered) });
            self.retired.store(r + 1, Ordering::Release);
            any = true;
        }
    }

    pub fn all_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire) >= self.nblocks
    }

    /// Every position below this is final.
    pub fn checkpoint(&self) -> u64 {
        let r = self.retired.load(Ordering::Acquire);
        (self.start + r.saturating_mul(self.block_len)).min(self.end)
    }

    /// The retry timeout now: smoothed RTT plus four deviations, clamped.
    pub fn timeout_ns(&self) -> u64 {
        let srtt = self.srtt_ns.load(Ordering::Relaxed);
        if srtt == 0 {
            return self.max_timeout_ns;
        }
        let var = self.rttvar_ns.load(Ordering::Relaxed);
        srtt.saturating_add(4 * var).clamp(self.min_timeout_ns, self.max_timeout_ns)
    }

    fn sample_rtt(&self, rtt: Duration) {
        // Only the receive thread writes these.
        let s = (rtt.as_nanos() as u64).max(1);
        let srtt = self.srtt_ns.load(Ordering::Relaxed);
        if srtt == 0 {
            self.srtt_ns.store(s, Ordering::Relaxed);
            self.rttvar_ns.store(s / 2, Ordering::Relaxed);
            return;
        }
        let var = self.rttvar_ns.load(Ordering::Relaxed);
        self.rttvar_ns.store((3 * var + srtt.abs_diff(s)) / 4, Ordering::Relaxed);
        self.srtt_ns.store((7 * srtt + s) / 8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: u64, end: u64) -> Window {
        Window::new(start, end, 4, 2, Duration::from_millis(10), Duration::from_millis(100))
    }

    #[test]
    fn fully_answered_blocks_retire_at_once_and_in_order() {
        let w = window(100, 110);
        assert_eq!(w.nblocks(), 3);
        let b0 = w.claim().unwrap();
        let b1 = w.claim().unwrap();
        assert!(w.slot_free(b0) && w.slot_free(b1));
        w.begin(b0);
        w.begin(b1);
        // Block 2 has to wait for a slot.
        let b2 = w.claim().unwrap();
        assert!(!w.slot_free(b2));
        assert_eq!(w.claim(), None);
        for pos in 104..108 {
            assert!(matches!(w.mark(pos), Mark::New { .. }));
        }
        assert_eq!(w.mark(104), Mark::Duplicate);
        // Block 1 is final but block 0 is not: nothing retires yet.
        assert!(!w.retire_ready(|_| {}));
        assert_eq!(w.checkpoint(), 100);
        w.mark(100);
        w.finish(b0);
        let mut retired = Vec::new();
        assert!(w.retire_ready(|r| retired.push(r)));
        assert_eq!(retired, [Retired { block: 0, unanswered: 3 }, Retired { block: 1, unanswered: 0 }]);
        assert_eq!(w.checkpoint(), 108);
        assert_eq!(w.mark(101), Mark::Late);
        assert!(w.slot_free(b2));
        w.begin(b2);
        assert_eq!(w.block_positions(b2), (108, 110));
        w.mark(108);
        w.mark(109);
        w.retire_ready(|_| {});
        assert!(w.all_retired());
        assert_eq!(w.checkpoint(), 110);
        assert_eq!(w.mark(99), Mark::Unknown);
    }

    #[test]
    fn timeout_adapts_within_bounds_and_ignores_retries() {
        let w = window(0, 8);
        assert_eq!(w.timeout_ns(), 100_000_000);
        let b = w.claim().unwrap();
        w.begin(b);
        assert!(matches!(w.mark(0), Mark::New { rtt: Some(_) }));
        // A fast reply pulls the timeout down to the floor.
        assert_eq!(w.timeout_ns(), 10_000_000);
        w.retry(b, 2);
        assert_eq!(w.mark(1), Mark::New { rtt: None });
        assert_eq!(w.attempt(b), 2);
    }
}
