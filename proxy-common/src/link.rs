//! Per-socket state: how the kernel forwards what one socket receives ([`Link`], written by
//! userspace), what it has done with it ([`Flow`], written by the kernel), and the event that
//! tells userspace to look ([`FlowEvent`]).

/// Which socket of a spliced connection a [`Link`] is for.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Side(u32);

impl Side {
    /// The socket accepted from a client: its bytes go to the backend.
    pub const CLIENT: Self = Self(0);
    /// The socket connected to a backend: its bytes go to the client.
    pub const BACKEND: Self = Self(1);
}

/// How the kernel forwards the bytes one socket receives. Key: that socket's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Cookie of the socket the bytes are redirected to (its key in [`crate::names::SOCKS`]).
    pub peer_cookie: u64,
    /// When [`Flow::redirected`] reaches this many bytes the verdict program emits one
    /// [`FlowEvent`], and userspace checks how much is buffered in the kernel.
    pub check_at: u64,
    /// Index into [`crate::names::SERVICE_STATS`].
    pub service: u32,
    pub side: Side,
    /// Non-zero: hold this socket. The `sock_ops` program takes it out of [`crate::names::RECV`] at
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
    /// Times the `sock_ops` program took the socket out of [`crate::names::RECV`] (see [`Link::hold`]).
    pub holds: u64,
    /// TCP sequence number of the next byte the verdict expects, once
    /// [`Flow::seq_known`] is set.
    pub next_seq: u32,
    /// Non-zero once the verdict has seen a batch of this socket.
    pub seq_known: u32,
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
    assert!(core::mem::size_of::<FlowEvent>() == 16);
};
