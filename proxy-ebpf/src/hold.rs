//! Holds: how a sender is held back. A socket is held when its peer's receiver has left more
//! than the bound of its bytes unacknowledged (`proxy_common::Link::max_unacked`, checked
//! here at every packet the socket sends) or when the daemon asks (`proxy_common::Link::hold`);
//! this takes the socket out of `RECV` at the right moment.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::{bpf_get_socket_cookie, bpf_map_delete_elem},
    programs::SockOpsContext,
};
use proxy_common::{Flow, FlowEvent, Link, PortRole, hold_port_key};

use crate::{
    counters::count,
    maps::{EVENTS, FLOWS, HOLD_PORTS, LINKS, RECV},
};

/// Holds a socket over its bound or whose link asks for it: takes it out of `RECV`, so that
/// its bytes stay in its receive queue and TCP holds the sender back.
///
/// Leaving the verdict map stops the socket's verdict at once, and a verdict part-way through
/// the socket's queue would drop the rest of the batch. So the socket leaves only from here:
/// in the header-options callback of a packet the socket sends, which the kernel runs under
/// the socket's lock, and only when the verdict has taken every byte the socket received, so
/// no batch is left in its queue. An acknowledgement sent from inside the verdict's run (the
/// kernel acknowledges as it consumes) then ends that run: the queue is empty.
///
/// Its release is signalled from here too: the acknowledgements of the held socket's peer run
/// the RTT callback ([`drained`]), which tells userspace the moment the peer's receiver has
/// drained to half the bound, so that the held socket goes back without waiting for a poll.
///
/// The connections of the daemon's cgroup that could be spliced (accepted on a public port, or
/// made to a backend port: `HOLD_PORTS`) get the header-options and RTT callbacks turned on as
/// they are established; the first reserves no option space, so their packets are unchanged.
/// Others are left alone, and so are sockets without a link.
pub fn on_sock_ops(ctx: &SockOpsContext) {
    let key = match ctx.op() {
        // local_port is in host order.
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            Some(hold_port_key(PortRole::Public, ctx.local_port() as u16))
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            Some(hold_port_key(PortRole::Backend, remote_port(ctx)))
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            hold(ctx);
            None
        }
        BPF_SOCK_OPS_RTT_CB => {
            drained(ctx);
            None
        }
        _ => None,
    };
    // SAFETY: the map value stays valid for the whole run.
    if let Some(key) = key
        && unsafe { HOLD_PORTS.get(&key) }.is_some()
    {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG;
        // A failure leaves the socket without holds; the daemon sees it never held.
        let _ = ctx.set_cb_flags(flags as i32);
    }
}

/// The remote port of the context's socket, in host order.
fn remote_port(ctx: &SockOpsContext) -> u16 {
    port_from_context(ctx.remote_port())
}

/// A remote port as a program context holds it (network order, shifted into the upper half on
/// little-endian machines: a quirk kept for compatibility), in host order.
fn port_from_context(raw: u32) -> u16 {
    let raw = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(raw as u16)
}

fn hold(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket of the context.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map values stay valid for the whole run.
    let Some(link) = (unsafe { LINKS.get(&cookie) }) else {
        return;
    };
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: the kernel runs this under the socket lock, as it does the verdict, the only
    // other writer of this flow.
    let flow = unsafe { &mut *flow };
    let asked = link.hold != 0;
    if !asked && !over_bound(link, flow) {
        return;
    }
    // SAFETY: a field of the context the kernel filled.
    let received = unsafe { (*ctx.ops).bytes_received };
    if flow.redirected + flow.failed != received {
        // Bytes wait in the queue (or the verdict is part-way through it): not now.
        return;
    }
    // SAFETY: RECV is a map of this object (SockHash is a transparent wrapper of its
    // definition), and the key is a u64 on the stack.
    let removed = unsafe {
        bpf_map_delete_elem(
            core::ptr::addr_of!(RECV).cast_mut().cast::<c_void>(),
            core::ptr::addr_of_mut!(cookie).cast::<c_void>(),
        )
    };
    if removed == 0 {
        flow.holds += 1;
        count(link.service, |c| c.holds += 1);
        if !asked {
            // Userspace learns of the hold it did not ask for, and watches its release. A
            // full ring leaves it to the connection's next look at the flow.
            let event = FlowEvent {
                cookie,
                redirected: flow.redirected,
            };
            if EVENTS.output(&event, 0).is_ok() {
                count(link.service, |c| c.flow_events += 1);
            } else {
                count(link.service, |c| c.events_lost += 1);
            }
        }
    }
}

/// Whether the peer's receiver has left more than the bound of this socket's bytes
/// unacknowledged (see `proxy_common::Link::max_unacked`).
fn over_bound(link: &Link, flow: &Flow) -> bool {
    if link.max_unacked == 0 {
        return false;
    }
    // SAFETY: map values stay valid for the whole run.
    let Some(peer) = (unsafe { FLOWS.get(&link.peer_cookie) }) else {
        return false;
    };
    // The peer's program writes it under the peer's lock: an aligned 64-bit load sees the
    // old or the new count, and the count only grows.
    // SAFETY: a valid, aligned field of a map value.
    let acked = unsafe { core::ptr::read_volatile(&raw const peer.acked) };
    link.owed_base + flow.redirected > acked + link.max_unacked
}

/// On an acknowledgement of new bytes: records the socket's acknowledged bytes in its flow
/// (for its peer's bound, [`over_bound`]), and once they reach its link's `drained_at`,
/// tells userspace, once per value, that the held peer may flow again.
fn drained(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket of the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map values stay valid for the whole run.
    let Some(link) = (unsafe { LINKS.get(&cookie) }) else {
        return;
    };
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: the kernel runs this under the socket lock, as it does the verdict and the
    // hold, the other writers of this flow.
    let flow = unsafe { &mut *flow };
    // SAFETY: a field of the context the kernel filled.
    let acked = unsafe { (*ctx.ops).bytes_acked };
    // SAFETY: a valid, aligned field of a map value; the peer's program reads it.
    unsafe { core::ptr::write_volatile(&raw mut flow.acked, acked) };
    if link.drained_at == 0 || acked < link.drained_at {
        return;
    }
    if flow.drain_notified_at == link.drained_at {
        return;
    }
    flow.drain_notified_at = link.drained_at;
    let event = FlowEvent {
        cookie: link.peer_cookie,
        redirected: 0,
    };
    // A full ring leaves the release to userspace's next poll.
    if EVENTS.output(&event, 0).is_ok() {
        count(link.service, |c| c.drain_events += 1);
    } else {
        count(link.service, |c| c.events_lost += 1);
    }
}
