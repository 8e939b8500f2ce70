//! Shards: contiguous ranges of permuted positions. Because the permutation
//! spreads every range across all hosts, any shard loads the targets evenly,
//! and a checkpoint is just a position inside the range.

use serde::{Deserialize, Serialize};

/// Positions `[start, end)` of a scan's permuted index space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    pub start: u64,
    pub end: u64,
}

impl ShardRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// How finely a scan is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPolicy {
    /// No shard is smaller than this unless the whole scan is.
    pub min_shard_probes: u64,
    pub max_shards: u32,
}

impl Default for ShardPolicy {
    fn default() -> Self {
        Self { min_shard_probes: 16_384, max_shards: 4_096 }
    }
}

/// Cuts `[0, len)` into near-equal contiguous shards.
pub fn split(len: u64, policy: ShardPolicy) -> Vec<ShardRange> {
    if len == 0 {
        return Vec::new();
    }
    let count = len.div_ceil(policy.min_shard_probes.max(1)).clamp(1, u64::from(policy.max_shards.max(1)));
    let bound = |k: u64| (u128::from(len) * u128::from(k) / u128::from(count)) as u64;
    (0..count).map(|k| ShardRange { start: bound(k), end: bound(k + 1) }).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn shards_tile_the_space(len in 0u64..(1 << 40), min in 1u64..100_000, max in 1u32..5000) {
            let shards = split(len, ShardPolicy { min_shard_probes: min, max_shards: max });
            prop_assert!(shards.len() <= max as usize);
            let mut next = 0;
            for s in &shards {
                prop_assert_eq!(s.start, next);
                prop_assert!(!s.is_empty());
                next = s.end;
            }
            prop_assert_eq!(next, len);
        }
    }
}
