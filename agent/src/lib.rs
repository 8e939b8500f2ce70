//! The portfleet agent. The scan engine and the controller session arrive
//! in their own modules; this crate links `portfleet-core` and the wire
//! contract, never the controller.

#![forbid(unsafe_code)]
