//! The closed sets of values the tables hold as text (states, actions,
//! origins, events), decoded at the store edge: the rest of the controller
//! sees enums, never strings. A value the code does not know is a corrupt
//! row (`StoreError::Corrupt` naming the table, column and value), never a
//! silent default.

use std::fmt;

/// A column value no variant matches.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {table}.{column} value {value:?}")]
pub struct UnknownValue {
    pub table: &'static str,
    pub column: &'static str,
    pub value: String,
}

/// An enum stored as text in `table.column`: `as_str` encodes it,
/// `TryFrom<String>` (what `#[sqlx(try_from = "String")]` uses) decodes it.
macro_rules! text_enum {
    ($(#[$meta:meta])* pub enum $name:ident in $table:literal . $column:literal {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// Decodes a stored value.
            pub fn parse(value: &str) -> Result<Self, UnknownValue> {
                match value {
                    $($text => Ok(Self::$variant),)+
                    other => Err(UnknownValue { table: $table, column: $column, value: other.to_string() }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownValue;

            fn try_from(value: String) -> Result<Self, UnknownValue> {
                Self::parse(&value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

text_enum! {
    pub enum ScanState in "scans"."state" {
        Pending = "pending",
        Running = "running",
        Completed = "completed",
        Cancelled = "cancelled",
        Failed = "failed",
    }
}

impl ScanState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Failed)
    }

    /// Pending or running: agents may still work on it.
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }
}

text_enum! {
    pub enum ShardState in "shards"."state" {
        Pending = "pending",
        Leased = "leased",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

text_enum! {
    /// An inventory change (`inventory_changes.kind`).
    pub enum ChangeKind in "inventory_changes"."kind" {
        Opened = "opened",
        Closed = "closed",
        ServiceChanged = "service_changed",
    }
}

text_enum! {
    /// Where a webhook delivery stands (`webhook_deliveries.state`).
    pub enum DeliveryState in "webhook_deliveries"."state" {
        Pending = "pending",
        Delivered = "delivered",
        Failed = "failed",
    }
}

text_enum! {
    pub enum AgentState in "agents"."state" {
        Connected = "connected",
        Draining = "draining",
        Gone = "gone",
    }
}

text_enum! {
    pub enum PortState in "results"."state" {
        Open = "open",
        Closed = "closed",
        Filtered = "filtered",
    }
}

text_enum! {
    /// Whether a scope rule allows or denies its block.
    pub enum ScopeAction in "scope_rules"."action" {
        Allow = "allow",
        Deny = "deny",
    }
}

text_enum! {
    /// Where a scan request came from.
    #[derive(Default)]
    pub enum Origin in "scans"."origin" {
        #[default]
        Api = "api",
        Amqp = "amqp",
        NaabuM8 = "naabum8",
        /// A run of a schedule.
        Schedule = "schedule",
    }
}

text_enum! {
    /// A lifecycle event in the outbox (`scan_events`).
    pub enum ScanEvent in "scan_events"."event" {
        Created = "created",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled",
        /// What the scan changed in the inventory (`payload`: one page).
        Changes = "changes",
        /// A schedule started this scan (`payload`: schedule id, due time).
        ScheduleFired = "schedule_fired",
    }
}

impl ScanEvent {
    /// Its name on the events exchange and in webhooks.
    pub fn wire_name(self) -> String {
        match self {
            Self::ScheduleFired => "schedule.fired".into(),
            other => format!("scan.{other}"),
        }
    }

    /// The event ends its scan.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

text_enum! {
    /// What a schedule does with a run due while the previous one is still
    /// pending or running (`schedules.overlap`).
    pub enum Overlap in "schedules"."overlap" {
        /// Record the run as skipped.
        Skip = "skip",
        /// Start it when the previous one ends.
        Queue = "queue",
        /// Cancel the previous one and start it.
        Cancel = "cancel",
    }
}

text_enum! {
    /// What became of a schedule's due time (`schedule_runs.outcome`).
    pub enum RunOutcome in "schedule_runs"."outcome" {
        Started = "started",
        Skipped = "skipped",
        Failed = "failed",
    }
}

text_enum! {
    /// How a lease ended (`shard_leases.outcome`).
    pub enum LeaseOutcome in "shard_leases"."outcome" {
        Done = "done",
        Released = "released",
        Undelivered = "undelivered",
        Expired = "expired",
        Failed = "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_and_unknown_ones_name_their_column() {
        for s in ScanState::ALL {
            assert_eq!(ScanState::parse(s.as_str()), Ok(*s));
        }
        for s in ShardState::ALL {
            assert_eq!(ShardState::try_from(s.to_string()), Ok(*s));
        }
        for s in AgentState::ALL {
            assert_eq!(AgentState::parse(s.as_str()), Ok(*s));
        }
        for o in Overlap::ALL {
            assert_eq!(Overlap::parse(o.as_str()), Ok(*o));
        }
        for o in RunOutcome::ALL {
            assert_eq!(RunOutcome::parse(o.as_str()), Ok(*o));
        }
        let e = AgentState::parse("asleep").unwrap_err();
        assert_eq!(e.to_string(), r#"unknown agents.state value "asleep""#);
        assert!(ScanState::Failed.is_terminal() && ScanState::Pending.is_active());
    }
}
