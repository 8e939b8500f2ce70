//! The `portfleet.v1` wire contract shared by the controller, the agent and
//! clients. Generated from `proto/portfleet/v1/*.proto` at build time; wire
//! types stop at the edge of each crate, which converts them into validated
//! domain types.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("portfleet.v1");
}

/// The encoded `FileDescriptorSet` of every portfleet proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/portfleet_descriptor.bin"));

/// Agent protocol versions this build speaks (see docs/protocol.md).
pub const PROTOCOL_VERSION_MIN: u32 = 1;
pub const PROTOCOL_VERSION_MAX: u32 = 1;
