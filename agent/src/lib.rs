//! The portfleet agent: the scan engine ([`engine`]) over raw packet I/O
//! ([`net`]), the standalone `scan` command, and (with a controller) the
//! agent session. It links `portfleet-core` and the wire contract, never
//! the controller's database or broker code.
//!
//! Unsafe code lives only in [`net::sys`], which wraps socket syscalls.

#![deny(unsafe_code)]

pub mod engine;
pub mod enroll_cmd;
pub mod identify;
pub mod identify_args;
pub mod metrics;
pub mod net;
pub mod run_cmd;
pub mod scan_cmd;
pub mod session;
