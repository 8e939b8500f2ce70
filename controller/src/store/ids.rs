//! The numbers that fence the agent protocol, as types: a shard's id, its
//! lease epoch (goes up with every lease) and a frame's sequence number in
//! a lease. They are `bigint` in the database and `uint64` on the wire;
//! converting from the wire is checked (`TryFrom<u64>`), so a value past
//! `i64::MAX` is a refused frame, never a wrapped one.

use std::fmt;

macro_rules! fence_number {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
        #[sqlx(transparent)]
        pub struct $name(pub i64);

        impl $name {
            pub fn get(self) -> i64 {
                self.0
            }

            /// For the wire. The database never holds a negative one
            /// (serials and counters from zero up).
            pub fn wire(self) -> u64 {
                u64::try_from(self.0).unwrap_or(0)
            }
        }

        impl TryFrom<u64> for $name {
            type Error = OutOfRange;

            fn try_from(v: u64) -> Result<Self, OutOfRange> {
                i64::try_from(v).map(Self).map_err(|_| OutOfRange { what: $what, value: v })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

/// A wire value past what the database can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value} out of range")]
pub struct OutOfRange {
    pub what: &'static str,
    pub value: u64,
}

fence_number!(
    /// `shards.id`.
    ShardId,
    "shard_id"
);
fence_number!(
    /// `shards.lease_epoch`.
    LeaseEpoch,
    "lease_epoch"
);
fence_number!(
    /// A frame's sequence number within its lease (`shards.acked_seq`).
    Seq,
    "seq"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_convert_checked() {
        assert_eq!(ShardId::try_from(7u64), Ok(ShardId(7)));
        assert_eq!(ShardId(7).wire(), 7);
        let e = Seq::try_from(u64::MAX).unwrap_err();
        assert_eq!(e.to_string(), format!("seq {} out of range", u64::MAX));
        assert!(LeaseEpoch::try_from(i64::MAX as u64).is_ok());
        assert!(LeaseEpoch::try_from(i64::MAX as u64 + 1).is_err());
    }
}
