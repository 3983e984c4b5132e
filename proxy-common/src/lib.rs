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
    /// Hash map, cookie of an upstream socket (the daemon's connection to a machine on this
    /// host) -> [`crate::Pairing`]: the upstream sockets whose peer, the application's socket,
    /// is to be paired with the client. Written by userspace before the upstream connects;
    /// the `sock_ops` program that pairs takes the entry (deletes it) as its claim, and so does
    /// userspace when it gives up, so exactly one of them acts.
    pub const UPSTREAMS: &str = "UPSTREAMS";
    /// Hash map, [`crate::Tuple`] of a socket -> [`crate::Bypass`]: the application's side and
    /// the upstream side of each same-host connection, created by the hold program as the
    /// upstream connects and completed by the pair program as the application's socket is
    /// established. Deleted by userspace when the connection ends.
    pub const BYPASS: &str = "BYPASS";
    /// The `sock_ops` program that pairs an application's socket (attached to the cgroup the
    /// applications run in: the root by default).
    pub const PAIR_PROG: &str = "spliced_pair";
    /// Global `u32`, set at load: non-zero when the daemon pairs same-host connections.
    pub const SAME_HOST: &str = "SAME_HOST";
    /// Global [`crate::TcpSockLayout`], set at load with the bypass on: where this kernel
    /// keeps the `struct tcp_sock` fields the programs read.
    pub const TCP_SOCK: &str = "TCP_SOCK";
    /// Global `u64`, set at load: the daemon's `--max-buffer`. A paired application's queue
    /// takes no more than this (nor more than half its receive buffer); past it, its client's
    /// bytes take the upstream's TCP path (see [`crate::Flow::app_unread`]).
    pub const UNREAD_LIMIT: &str = "UNREAD_LIMIT";
}

/// Byte offsets of fields of the running kernel's `struct tcp_sock`, read by userspace from
/// the kernel's BTF and set into the programs at load. The programs read these fields through
/// the socket pointer `bpf_skc_to_tcp_sock` gives them; the verifier checks each read
/// against the same BTF (the offsets are in read-only data, so it sees them as constants).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSockLayout {
    /// `u32 write_seq`: the sequence number after the last byte written into the send queue.
    pub write_seq: u32,
    /// `u32 snd_una`: the first byte not yet acknowledged.
    pub snd_una: u32,
    /// `u64 bytes_acked`: bytes of the stream the peer acknowledged.
    pub bytes_acked: u32,
    /// `int sk_backlog.rmem_alloc.counter` of the `struct sock` inside: bytes charged to the
    /// socket's receive side, which includes what a `sk_msg` program put into its queue and
    /// its reader has not read.
    pub rmem_alloc: u32,
    /// `u32 copied_seq`: the sequence number after the last byte its reader read.
    pub copied_seq: u32,
    /// `int sk_rcvbuf` of the `struct sock` inside: the most its receive side may hold.
    pub rcvbuf: u32,
}

/// One socket's own view of its connection: its address and port, and its peer's. Addresses
/// are IPv6, IPv4 ones mapped (`::ffff:a.b.c.d`), each word in network byte order as the
/// kernel stores it; ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}

impl Tuple {
    /// The same connection seen from the other socket.
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// The third word of an IPv4-mapped IPv6 address (`0000:ffff`), as stored.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An upstream socket waiting for its peer to be paired. Key: the upstream socket's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pairing {
    /// Cookie of the client's socket.
    pub client_cookie: u64,
    /// [`Bypass::limit`] of the connection.
    pub limit: u64,
    /// Index into [`names::SERVICE_STATS`].
    pub service: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a kernel ABI struct"
    )]
    pub _pad: u32,
}

/// [`Bypass::role`] of the application's socket.
pub const ROLE_APP: u32 = 0;
/// [`Bypass::role`] of the daemon's upstream socket.
pub const ROLE_UPSTREAM: u32 = 1;
/// [`Bypass::state`]: the upstream is connected; the application's socket is not paired yet.
pub const BYPASS_WAITING: u32 = 0;
/// [`Bypass::state`]: the application's socket is in [`names::SOCKS`].
pub const BYPASS_PAIRED: u32 = 1;
/// [`Bypass::state`]: the pair program claimed the pairing, but the kernel would not take the
/// application's socket into [`names::SOCKS`]; the connection uses the verdict path.
pub const BYPASS_REFUSED: u32 = 2;
/// [`Bypass::state`]: this side's bytes take its TCP path for a while. The application's side:
/// its client has more than [`Bypass::limit`] unacknowledged, so what the application sends
/// goes through the upstream socket and the verdict, which hold it back, until every byte it
/// sent either way is in the client's send queue. The upstream's side: the application has
/// no room in its queue ([`Flow::app_unread`]), so the client's bytes go to it over TCP,
/// which holds them back, until it is no longer behind and has read every byte sent that way.
/// Then the side goes [`BYPASS_PAIRED`] again.
pub const BYPASS_VIA_TCP: u32 = 3;
/// [`Bypass::state`] of the application's side: the application sent on its own TCP path
/// before its socket was paired (it wrote in the instant between accepting the socket and the
/// pairing), so what it sends takes that path for good, behind those bytes.
pub const BYPASS_PASSED: u32 = 4;

/// One side of a same-host connection. Key: that socket's [`Tuple`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bypass {
    /// Cookie of the daemon's upstream socket.
    pub upstream_cookie: u64,
    /// Cookie of the client's socket.
    pub client_cookie: u64,
    /// Cookie of the application's socket, once paired.
    pub app_cookie: u64,
    /// Bytes this socket sent that the `sk_msg` program redirected: the upstream's into the
    /// application's receive queue, the application's into the client's send queue.
    pub bytes: u64,
    /// The application's side: how many bytes the client may have unacknowledged before what
    /// the application sends takes its TCP path (the daemon's `--max-buffer`).
    pub limit: u64,
    /// [`BYPASS_WAITING`], [`BYPASS_PAIRED`], [`BYPASS_REFUSED`], [`BYPASS_VIA_TCP`] or
    /// [`BYPASS_PASSED`].
    pub state: u32,
    /// [`ROLE_APP`] or [`ROLE_UPSTREAM`]: which socket of the connection this entry is for.
    pub role: u32,
    /// Index into [`names::SERVICE_STATS`].
    pub service: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a kernel ABI struct"
    )]
    pub _pad: u32,
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
    /// On a paired same-host connection, the client's link: cookie of the application's
    /// socket (its key in [`names::SOCKS`]); else 0.
    pub app_cookie: u64,
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
    /// The socket's `bytes_acked` (what its peer acknowledged of what it sent), as the
    /// `sock_ops` program last saw it: with the same-host bypass on, public sockets report it
    /// at every RTT sample and every packet they send.
    pub acked: u64,
    /// Bytes written into the socket's send queue over its life (`bytes_acked` plus what is
    /// queued and not acknowledged), as the `sock_ops` program last saw it, at the same
    /// moments as [`Flow::acked`].
    pub written: u64,
    /// A client socket of a paired same-host connection: what its application's socket holds
    /// unread (`sk_rmem_alloc`: its queue and its TCP receive queue), as the verdict last saw
    /// it, at each batch it passed on. Nothing in the kernel bounds what the upstream socket's
    /// `sk_msg` program puts into that queue, so the program does: it puts a message there
    /// only while this, plus what it put there since ([`Flow::ingressed`] less
    /// [`Flow::ingressed_seen`]), plus the message, stays within `UNREAD_LIMIT` and half of
    /// [`Flow::app_rcvbuf`]. Otherwise the client's bytes take the upstream's TCP path, where
    /// the application's receive window holds them back. The half keeps that window open:
    /// the queue's bytes count against the same receive memory, and an application that reads
    /// only its queue sends no window update, so a window they closed would reopen only at
    /// TCP's backed-off zero-window probes.
    pub app_unread: u32,
    /// The application's `copied_seq` (in the upstream socket's sequence space), as the
    /// verdict last saw it: once it equals the upstream's `write_seq`, the application has
    /// read every byte sent over TCP, and new bytes may go into its queue again without
    /// overtaking any.
    pub app_copied_seq: u32,
    /// Bytes the upstream's `sk_msg` program put into the application's queue, written by it:
    /// the upstream's [`Bypass::bytes`], kept here too for the verdict, which has no key to
    /// that entry.
    pub ingressed: u64,
    /// [`Flow::ingressed`] when the verdict last read [`Flow::app_unread`] (read before it).
    pub ingressed_seen: u64,
    /// The application socket's `sk_rcvbuf`, as the verdict last saw it.
    pub app_rcvbuf: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a kernel ABI struct"
    )]
    pub _pad: u32,
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
    /// Application sockets paired with a client's socket (same-host connections).
    pub paired: u64,
    /// Pairings claimed whose application socket the kernel would not take into the map.
    pub pair_refused: u64,
    /// Bytes put straight into an application's receive queue (client -> application).
    pub ingress_bytes: u64,
    /// Bytes an application sent that went straight into its client's send queue.
    pub direct_bytes: u64,
    /// Times an application's side went [`BYPASS_VIA_TCP`].
    pub via_tcp: u64,
    /// Application sockets that sent on their TCP path before they were paired
    /// ([`BYPASS_PASSED`]).
    pub early_writes: u64,
    /// Times a paired application had more than the bound unread, so that its client's bytes
    /// went over the upstream's TCP path for a while ([`Flow::app_unread`]).
    pub unread_stops: u64,
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
    assert!(core::mem::size_of::<Link>() == 40);
    assert!(core::mem::size_of::<Flow>() == 96);
    assert!(core::mem::size_of::<ServiceCounters>() == 136);
    assert!(core::mem::size_of::<Tuple>() == 40);
    assert!(core::mem::size_of::<Pairing>() == 24);
    assert!(core::mem::size_of::<Bypass>() == 56);
    assert!(core::mem::size_of::<UserTx>() == 16);
    assert!(core::mem::size_of::<FlowEvent>() == 16);
    assert!(core::mem::size_of::<TcpSockLayout>() == 24);
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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Tuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Pairing {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Bypass {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TcpSockLayout {}
}
