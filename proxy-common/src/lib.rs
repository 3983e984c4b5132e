//! The one place where the kernel programs and the daemon agree on memory layout: map names,
//! keys, values and ring-buffer events. Every type is `#[repr(C)]` (or a transparent `u32`),
//! built from fixed-width integers with explicit padding, and its size is asserted at compile
//! time.
#![no_std]

mod counters;
mod link;
pub mod names;

pub use counters::{SentBytes, ServiceCounters};
pub use link::{Flow, FlowEvent, Link, Side};

/// Capacity of the socket maps: two sockets per connection.
pub const MAX_SOCKETS: u32 = 131_072;
/// Number of service slots in [`names::SERVICE_STATS`].
pub const MAX_SERVICES: u32 = 256;
/// Size in bytes of the [`names::EVENTS`] ring buffer.
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Which connections of the daemon a [`names::HOLD_PORTS`] entry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PortRole {
    /// Accepted on this local port: a public port.
    Public = 1,
    /// Connected to this remote port: a backend's port.
    Backend = 2,
}

/// The [`names::HOLD_PORTS`] key of `port` (host order) in `role`.
#[must_use]
pub const fn hold_port_key(role: PortRole, port: u16) -> u32 {
    ((role as u32) << 16) | port as u32
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `repr(C)` or a transparent `u32`, made only of integers, and has no
    // padding (sizes asserted), so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::Link {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SentBytes {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
}
