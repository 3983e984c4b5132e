//! The one place where the kernel programs and the daemon agree on memory layout: map names,
//! keys, values and ring-buffer events. Every type is `#[repr(C)]`, built from fixed-width
//! integers with explicit padding, and its size is asserted at compile time.
#![no_std]

/// Map and program names. They equal the ELF symbol names in `proxy-ebpf`.
pub mod names {
    /// Sockhash of every spliced socket, for the whole life of its connection. It is the
    /// redirect target of the verdict program, and the `sk_msg` program is attached to it.
    pub const SOCKS: &str = "SOCKS";
    /// Sockhash of the sockets whose received bytes pass the stream verdict, which is
    /// attached here. A socket leaves it while it is *held* (see [`crate::Link::hold`]), and
    /// then only from the `sock_ops` program, under the socket's lock and with its receive queue
    /// empty: a socket that leaves the map while the verdict is part-way through its queue has
    /// the rest of that batch dropped by the kernel.
    pub const RECV: &str = "RECV";
    /// Hash map, socket cookie -> [`crate::Link`]. Written only by userspace.
    pub const LINKS: &str = "LINKS";
    /// Hash map, socket cookie -> [`crate::Flow`]. Written only by the kernel after creation.
    pub const FLOWS: &str = "FLOWS";
    /// Per-CPU array indexed by service number -> [`crate::ServiceCounters`].
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// Per-CPU array with one [`crate::UserTx`] slot.
    pub const USER_TX: &str = "USER_TX";
    /// Ring buffer of [`crate::FlowEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// The `sk_skb` stream verdict program.
    pub const VERDICT_PROG: &str = "spliced_verdict";
    /// The `sk_msg` program.
    pub const MSG_PROG: &str = "spliced_msg";
    /// The `sock_ops` program that holds a socket.
    pub const HOLD_PROG: &str = "spliced_hold";
    /// Hash map, [`hold_port_key`] -> 1: the connections the hold program watches (accepted on
    /// a public port, or connected to a backend port). Written by userspace at start.
    pub const HOLD_PORTS: &str = "HOLD_PORTS";
}

/// [`names::HOLD_PORTS`] key of the local port of connections accepted on a public port.
pub const PORT_PUBLIC: u32 = 1;
/// [`names::HOLD_PORTS`] key of the remote port of connections the daemon makes to backends.
pub const PORT_BACKEND: u32 = 2;

/// The [`names::HOLD_PORTS`] key of `port` (host order) in role [`PORT_PUBLIC`] or
/// [`PORT_BACKEND`].
#[must_use]
pub const fn hold_port_key(role: u32, port: u16) -> u32 {
    (role << 16) | port as u32
}

/// Capacity of the socket maps: two sockets per connection.
pub const MAX_SOCKETS: u32 = 131_072;
/// Number of service slots in [`names::SERVICE_STATS`].
pub const MAX_SERVICES: u32 = 256;
/// Size in bytes of the [`names::EVENTS`] ring buffer.
pub const EVENTS_BYTES: u32 = 1 << 20;

/// [`Link::side`] of the socket accepted from a client: its bytes go to the backend.
pub const SIDE_CLIENT: u32 = 0;
/// [`Link::side`] of the socket connected to a backend: its bytes go to the client.
pub const SIDE_BACKEND: u32 = 1;

/// How the kernel forwards the bytes one socket receives. Key: that socket's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Cookie of the socket the bytes are redirected to (its key in [`names::SOCKS`]).
    pub peer_cookie: u64,
    /// When [`Flow::redirected`] reaches this many bytes the verdict program emits one
    /// [`FlowEvent`], and userspace checks how much is buffered in the kernel.
    pub check_at: u64,
    /// Index into [`names::SERVICE_STATS`].
    pub service: u32,
    /// [`SIDE_CLIENT`] or [`SIDE_BACKEND`].
    pub side: u32,
    /// Non-zero: hold this socket. The `sock_ops` program takes it out of [`names::RECV`] at
    /// the next packet it sends (an acknowledgement, typically) once the verdict has taken
    /// every byte it received: that runs under the socket's lock, so no verdict is part-way
    /// through its queue. The socket's bytes then stay in its receive queue, charged to its
    /// receive buffer, and TCP holds the sender back until the daemon puts it back.
    pub hold: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a kernel ABI struct"
    )]
    pub _pad: u32,
}

/// What the kernel has done with the bytes one socket received. Key: that socket's cookie.
///
/// Only the verdict and `sock_ops` programs of that socket write it, and the kernel runs both
/// under the socket lock, so plain 64-bit adds are exact without atomics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Bytes handed to the peer socket's egress.
    pub redirected: u64,
    /// Bytes whose redirect the kernel refused (they are dropped; the connection is aborted).
    pub failed: u64,
    /// The [`Link::check_at`] for which an event was last emitted.
    pub notified_at: u64,
    /// `bpf_ktime_get_coarse_ns` of the last received bytes.
    pub last_active_ns: u64,
    /// Times the `sock_ops` program took the socket out of [`names::RECV`] (see [`Link::hold`]).
    pub holds: u64,
    /// TCP sequence number of the next byte the verdict expects, once
    /// [`Flow::seq_known`] is set.
    pub next_seq: u32,
    /// Non-zero once the verdict has seen a batch of this socket.
    pub seq_known: u32,
}

/// Per-service counters kept by the kernel, one copy per CPU; userspace sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Bytes from clients redirected to backends.
    pub bytes_to_backend: u64,
    /// Bytes from backends redirected to clients.
    pub bytes_to_client: u64,
    /// Receive batches (skbs) redirected.
    pub segments: u64,
    /// Redirects the kernel refused.
    pub redirect_failures: u64,
    /// Flow-control events emitted to userspace.
    pub flow_events: u64,
    /// Flow-control events lost because the ring buffer was full.
    pub events_lost: u64,
    /// Times a socket was held because its peer was slow.
    pub holds: u64,
    /// Received batches whose head repeated bytes already passed on (trimmed).
    pub overlaps: u64,
    /// Bytes trimmed off such batches.
    pub overlap_bytes: u64,
    /// Holes found between batches, and batches that could not be trimmed; each aborts its
    /// connection.
    pub stream_faults: u64,
}

/// Bytes that entered the send path of spliced sockets (redirected by the verdict program or
/// written by the daemon), counted by the `sk_msg` program. (The name predates finding that
/// the kernel sends redirected bytes through `sendmsg` too.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserTx {
    /// `sendmsg` calls.
    pub messages: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Emitted when [`Flow::redirected`] of a socket reaches its [`Link::check_at`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Cookie of the receiving socket.
    pub cookie: u64,
    /// Its [`Flow::redirected`] at the time.
    pub redirected: u64,
}

const _: () = {
    assert!(core::mem::size_of::<Link>() == 32);
    assert!(core::mem::size_of::<Flow>() == 48);
    assert!(core::mem::size_of::<ServiceCounters>() == 80);
    assert!(core::mem::size_of::<UserTx>() == 16);
    assert!(core::mem::size_of::<FlowEvent>() == 16);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `repr(C)`, made only of integers, and has no padding (sizes asserted
    // above), so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::Link {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UserTx {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
}
