//! The kernel half of spliced.
//!
//! `spliced_verdict` (sk_skb stream verdict, attached to `RECV`) hands every byte a spliced
//! socket receives to its peer socket's egress, counts it, and tells userspace when the bytes
//! buffered for one direction may have reached the configured bound. `spliced_msg` (sk_msg,
//! attached to `SOCKS`) counts every byte that enters a spliced socket's send path.
//! `spliced_hold` (sock_ops, attached to the daemon's cgroup) takes a socket out of `RECV`
//! under its socket lock when the daemon asks, which is how a sender is held back.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, sk_action,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_map_delete_elem},
    macros::{map, sk_msg, sock_ops, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use proxy_common::{
    EVENTS_BYTES, Flow, FlowEvent, Link, MAX_SERVICES, MAX_SOCKETS, PORT_BACKEND, PORT_PUBLIC,
    SIDE_CLIENT, ServiceCounters, UserTx, hold_port_key,
};

// ---------------------------------------------------------------------------------------------
// Maps (see proxy_common::names for what each one holds and who writes it).
// ---------------------------------------------------------------------------------------------

#[map]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static RECV: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static LINKS: HashMap<u64, Link> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static SERVICE_STATS: PerCpuArray<ServiceCounters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
static USER_TX: PerCpuArray<UserTx> = PerCpuArray::with_max_entries(1, 0);

#[map]
static HOLD_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

// ---------------------------------------------------------------------------------------------
// sk_skb stream verdict
// ---------------------------------------------------------------------------------------------

#[stream_verdict]
pub fn spliced_verdict(ctx: SkBuffContext) -> u32 {
    match try_spliced_verdict(&ctx) {
        Ok(verdict) => verdict,
        Err(_) => sk_action::SK_DROP,
    }
}

fn try_spliced_verdict(ctx: &SkBuffContext) -> Result<u32, i64> {
    let len = ctx.len();
    // A FIN arrives as an empty skb. Redirecting it would make the peer's backlog worker see
    // a zero-length send, which it treats as a broken pipe and stops all further transmission
    // on that socket. There are no bytes to lose: drop it. Userspace sees the FIN itself
    // (EPOLLRDHUP) and shuts the peer down once every byte before it has left.
    if len == 0 {
        return Ok(sk_action::SK_DROP);
    }
    // SAFETY: the helper only reads the socket of the skb in the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(link) = (unsafe { LINKS.get(&cookie) }) else {
        // Userspace puts a socket in RECV only after its link exists, and takes it out of
        // RECV before deleting the link, so this cannot happen while a connection lives.
        warn!(ctx, "spliced: no link for socket {}", cookie);
        return Ok(sk_action::SK_DROP);
    };
    let mut link = *link;

    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        warn!(ctx, "spliced: no flow for socket {}", cookie);
        return Ok(sk_action::SK_DROP);
    };
    let counters = SERVICE_STATS.get_ptr_mut(link.service);
    // SAFETY: map values stay valid for the whole program run; only this socket's verdict
    // writes this flow, and the kernel runs it for one socket at a time.
    let flow = unsafe { &mut *flow };
    // SAFETY: the helper has no arguments and no side effects.
    flow.last_active_ns = unsafe { bpf_ktime_get_coarse_ns() };

    let received = len;
    if flow.failed != 0 {
        // The stream already has a hole: pass nothing after it (userspace is aborting).
        flow.failed += u64::from(received);
        return Ok(sk_action::SK_DROP);
    }
    let len = match in_sequence(ctx, flow, received) {
        Ok(len) => len,
        Err(fault) => {
            if let Some(c) = counters {
                // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
                unsafe { (*c).stream_faults += 1 };
            }
            warn!(ctx, "spliced: socket {}: {}", cookie, fault);
            drop_batch(flow, cookie, received.into());
            return Ok(sk_action::SK_DROP);
        }
    };
    if len != received
        && let Some(c) = counters
    {
        // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
        let c = unsafe { &mut *c };
        c.overlaps += 1;
        c.overlap_bytes += u64::from(received - len);
    }
    if len == 0 {
        // Nothing new in this batch (cut to nothing, so the kernel's count of consumed bytes
        // does not move either).
        return Ok(sk_action::SK_DROP);
    }
    let len = u64::from(len);

    let verdict = SOCKS.redirect_skb(ctx, &mut link.peer_cookie, 0) as u32;
    if verdict != sk_action::SK_PASS {
        drop_batch(flow, cookie, len);
        if let Some(c) = counters {
            // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
            unsafe { (*c).redirect_failures += 1 };
        }
        warn!(
            ctx,
            "spliced: redirect of {} bytes from socket {} refused", len, cookie
        );
        return Ok(sk_action::SK_DROP);
    }

    flow.redirected += len;
    let mut event_state = 0u8;
    if flow.redirected >= link.check_at && flow.notified_at != link.check_at {
        flow.notified_at = link.check_at;
        let event = FlowEvent {
            cookie,
            redirected: flow.redirected,
        };
        event_state = if EVENTS.output(&event, 0).is_ok() {
            1
        } else {
            2
        };
    }

    if let Some(c) = counters {
        // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
        let c = unsafe { &mut *c };
        if link.side == SIDE_CLIENT {
            c.bytes_to_backend += len;
        } else {
            c.bytes_to_client += len;
        }
        c.segments += 1;
        match event_state {
            1 => c.flow_events += 1,
            2 => c.events_lost += 1,
            _ => {}
        }
    }
    Ok(verdict)
}

/// Counts a batch the verdict drops (the stream the peer gets is then damaged) and, for the
/// first one, tells userspace, which aborts the connection.
fn drop_batch(flow: &mut Flow, cookie: u64, len: u64) {
    if flow.failed == 0 {
        // A full ring only delays the abort to the end of the stream, where userspace looks
        // at the flow again.
        let _ = EVENTS.output(
            &FlowEvent {
                cookie,
                redirected: flow.redirected,
            },
            0,
        );
    }
    flow.failed += len;
}

/// Largest head `bpf_skb_adjust_room` cuts off an `sk_skb` in one call.
const TRIM_STEP: u32 = 0xfff;
/// Calls allowed for one batch: 1 MiB, more than a receive batch holds.
const TRIM_STEPS: u32 = 256;

/// Why a batch cannot be passed on as it is: it starts after the next expected byte (the
/// kernel skipped bytes), or its repeated head could not be cut off.
type StreamFault = &'static str;
const FAULT_GAP: StreamFault = "bytes missing before a received batch";
const FAULT_TRIM: StreamFault = "could not cut a repeated head off a received batch";

/// Cuts off the head of a batch that repeats bytes already passed on, and returns the
/// length left.
///
/// TCP queues a segment that overlaps what it already received as a whole (a retransmission
/// that starts before the receive point, seen after a window closed and reopened), and
/// leaves it to the reader to skip the old head. `recvmsg` does; the path that hands whole
/// batches to this program (`tcp_read_skb`) does not, so without this cut the peer gets those
/// bytes twice, and the kernel's count of consumed bytes runs ahead of the stream, which later
/// costs as many bytes when a full receive queue is collapsed. The sequence number of each
/// batch is in its control block (`cb[0]`, the start of `struct tcp_skb_cb`, which the
/// `sk_skb` context maps there); the flow remembers where the previous batch ended.
fn in_sequence(ctx: &SkBuffContext, flow: &mut Flow, len: u32) -> Result<u32, StreamFault> {
    let seq = ctx.cb()[0];
    let end = seq.wrapping_add(len);
    if flow.seq_known == 0 {
        // The first batch is where the stream starts for the verdict.
        flow.seq_known = 1;
        flow.next_seq = seq;
    }
    // Serial-number arithmetic: positive when the batch starts before the expected byte.
    let overlap = flow.next_seq.wrapping_sub(seq) as i32;
    if overlap < 0 {
        return Err(FAULT_GAP);
    }
    let overlap = (overlap as u32).min(len);
    let mut left = overlap;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            break;
        }
        let step = left.min(TRIM_STEP);
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return Err(FAULT_TRIM);
        }
        left -= step;
    }
    if left != 0 {
        return Err(FAULT_TRIM);
    }
    // A batch wholly repeated leaves the expected byte where it was.
    if overlap < len {
        flow.next_seq = end;
    }
    Ok(len - overlap)
}

// ---------------------------------------------------------------------------------------------
// sk_msg
// ---------------------------------------------------------------------------------------------

/// Runs on every message that enters the send path of a socket in `SOCKS`: what the daemon
/// writes itself, and also every batch the verdict program redirected there, since the
/// kernel's backlog worker sends redirected bytes through the socket's `sendmsg`. It counts
/// them all, so that the egress total can be checked against the verdict's redirect counters
/// plus the bytes the daemon moved itself.
#[sk_msg]
pub fn spliced_msg(ctx: SkMsgContext) -> u32 {
    let size = ctx.size();
    if let Some(tx) = USER_TX.get_ptr_mut(0) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
        let tx = unsafe { &mut *tx };
        tx.messages += 1;
        tx.bytes += u64::from(size);
    }
    sk_action::SK_PASS
}

/// Adds to this CPU's counters of `service`.
fn count(service: u32, add: impl FnOnce(&mut ServiceCounters)) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
        add(unsafe { &mut *c });
    }
}

// ---------------------------------------------------------------------------------------------
// sock_ops: hold
// ---------------------------------------------------------------------------------------------

/// Holds a socket whose link asks for it (see `proxy_common::Link::hold`): takes it out of
/// `RECV`, so that its bytes stay in its receive queue and TCP holds the sender back.
///
/// Leaving the verdict map stops the socket's verdict at once, and a verdict part-way through
/// the socket's queue would drop the rest of the batch. So the socket leaves only from here:
/// in the header-options callback of a packet the socket sends, which the kernel runs under
/// the socket's lock, and only when the verdict has taken every byte the socket received, so
/// no batch is left in its queue. An acknowledgement sent from inside the verdict's run (the
/// kernel acknowledges as it consumes) then ends that run: the queue is empty.
///
/// The connections of the daemon's cgroup that could be spliced (accepted on a public port, or
/// made to a backend port: `HOLD_PORTS`) get the header-options callback turned on as they are
/// established; it reserves no option space, so their packets are unchanged. Others are left
/// alone, and so are sockets without a link.
#[sock_ops]
pub fn spliced_hold(ctx: SockOpsContext) -> u32 {
    let key = match ctx.op() {
        // local_port is in host order.
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            Some(hold_port_key(PORT_PUBLIC, ctx.local_port() as u16))
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => Some(hold_port_key(PORT_BACKEND, remote_port(&ctx))),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            hold(&ctx);
            None
        }
        _ => None,
    };
    // SAFETY: the map value stays valid for the whole run.
    if let Some(key) = key
        && unsafe { HOLD_PORTS.get(&key) }.is_some()
    {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
        // A failure leaves the socket without holds; the daemon sees it never held.
        let _ = ctx.set_cb_flags(flags as i32);
    }
    1
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
    if link.hold == 0 {
        return;
    }
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: the kernel runs this under the socket lock, as it does the verdict, the only
    // other writer of this flow.
    let flow = unsafe { &mut *flow };
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
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
