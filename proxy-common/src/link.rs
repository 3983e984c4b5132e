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
    /// [`FlowEvent`], and userspace checks how much is buffered in the kernel. The daemon
    /// sets none (`u64::MAX`): the `sock_ops` program keeps the bound ([`Link::max_unacked`])
    /// and emits an event for each hold. Kept so that a kernel taken over in an upgrade
    /// reads its links as the process that loaded it wrote them.
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
    /// Non-zero: once this socket's receiver has acknowledged this many bytes
    /// (`tcp_sock.bytes_acked`), the `sock_ops` program emits one [`FlowEvent`] for the peer
    /// socket, which is held: its direction has drained to where it may flow again. Set by
    /// userspace while the peer is held; the event saves it from polling for that moment.
    pub drained_at: u64,
    /// Non-zero: the bound. The `sock_ops` program holds this socket by itself (as for
    /// [`Link::hold`]) once the peer's receiver has left more than this many of its bytes
    /// unacknowledged: [`Link::owed_base`] plus [`Flow::redirected`] of this socket, less
    /// [`Flow::acked`] of the peer. It acts within a packet.
    pub max_unacked: u64,
    /// Bytes of the peer's send queue written before this socket's first (the PROXY protocol
    /// header), counted in the peer's acknowledged bytes.
    pub owed_base: u64,
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
    /// The [`Link::drained_at`] for which an event was last emitted.
    pub drain_notified_at: u64,
    /// Bytes this socket's receiver has acknowledged (`tcp_sock.bytes_acked`), as of its
    /// last acknowledgement that brought an RTT sample; written by the `sock_ops` program.
    pub acked: u64,
}

/// Emitted when [`Flow::redirected`] of a socket reaches its [`Link::check_at`] (for that
/// socket), and when a socket's acknowledged bytes reach its [`Link::drained_at`] (for its
/// held peer, with `redirected` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Cookie of the receiving socket.
    pub cookie: u64,
    /// Its [`Flow::redirected`] at the time.
    pub redirected: u64,
}

const _: () = {
    assert!(core::mem::size_of::<Link>() == 56);
    assert!(core::mem::size_of::<Flow>() == 64);
    assert!(core::mem::size_of::<FlowEvent>() == 16);
};
