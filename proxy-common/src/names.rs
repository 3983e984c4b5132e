//! Map and program names. They equal the ELF symbol names in `proxy-ebpf`.

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
/// Per-CPU array with one [`crate::SentBytes`] slot.
pub const SENT: &str = "SENT";
/// Ring buffer of [`crate::FlowEvent`].
pub const EVENTS: &str = "EVENTS";
/// The `sk_skb` stream verdict program.
pub const VERDICT_PROG: &str = "spliced_verdict";
/// The `sk_msg` program.
pub const MSG_PROG: &str = "spliced_msg";
/// The `sock_ops` program that holds a socket.
pub const HOLD_PROG: &str = "spliced_hold";
/// Hash map, [`crate::hold_port_key`] -> 1: the connections the hold program watches (accepted on
/// a public port, or connected to a backend port). Written by userspace at start.
pub const HOLD_PORTS: &str = "HOLD_PORTS";
