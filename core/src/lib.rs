//! The scan domain that the controller and the agent share, and nothing
//! else: target and port specs with their parsers, address sets, the keyed
//! permutation of the (address x port) space, shard ranges and the planner.
//! The agent links this crate but never the controller (sqlx, lapin).

#![forbid(unsafe_code)]

pub mod addrs;
pub mod backoff;
pub mod cdn;
pub mod found;
pub mod labels;
pub mod permutation;
pub mod plan;
pub mod policy;
pub mod ports;
pub mod service;
pub mod shard;
pub mod space;
pub mod targets;
pub mod text;
mod top_ports;

pub use addrs::{AddrRange, AddressSet};
pub use addrs::{canonical_ip, canonical_net};
pub use cdn::CdnPolicy;
pub use found::Found;
pub use permutation::Permutation;
pub use plan::{Plan, PlanInput, ResolvedTarget, plan};
pub use policy::ScopePolicy;
pub use ports::PortSet;
pub use service::Service;
pub use shard::{ShardPolicy, ShardRange};
pub use space::ScanSpace;
pub use targets::{TargetKind, TargetSpec};

/// Why a target, port spec or scan plan is unacceptable. Messages name the
/// offending value so callers can pass them on as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `value` is what the caller wrote; messages echo it escaped and
    /// truncated ([`text::echo`]).
    #[error("{}: {reason}", text::echo(value))]
    Target { value: String, reason: String },
    #[error("{}: {reason}", text::echo(value))]
    Ports { value: String, reason: String },
    #[error("scan of {probes} probes exceeds the maximum of {max}")]
    TooLarge { probes: u128, max: u64 },
    #[error("{0}")]
    Empty(String),
}

/// This host's name (the kernel's), for default agent names and
/// controller ids; `None` when it cannot be read.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
}

/// How an agent probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanType {
    /// Stateless raw-socket SYN probes.
    #[default]
    Syn,
    /// Full TCP connect(): no privilege needed.
    Connect,
}

impl ScanType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Syn => "syn",
            Self::Connect => "connect",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "syn" => Some(Self::Syn),
            "connect" => Some(Self::Connect),
            _ => None,
        }
    }
}
