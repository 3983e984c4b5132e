//! The stream verdict: hands every batch a spliced socket receives to its peer socket's
//! egress, in order and once, counts it, and tells userspace when the bytes buffered for one
//! direction may have reached the bound.

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns},
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use proxy_common::{Flow, FlowEvent, Side};

use crate::maps::{EVENTS, FLOWS, LINKS, SERVICE_STATS, SOCKS};

/// A batch dropped for a reason worth a log line: the stream its peer gets is damaged, and
/// userspace aborts the connection (it is told through the flow).
pub enum Dropped {
    /// The socket has no link: userspace puts a socket in RECV only after its link exists,
    /// and takes it out of RECV before deleting the link, so this cannot happen while a
    /// connection lives.
    NoLink { cookie: u64 },
    /// The socket has no flow (as above).
    NoFlow { cookie: u64 },
    /// The batch does not continue the stream ([`in_sequence`]).
    Fault { cookie: u64, fault: StreamFault },
    /// The kernel refused to redirect the batch to the peer.
    Refused { cookie: u64, len: u64 },
}

impl Dropped {
    pub fn log(&self, ctx: &SkBuffContext) {
        match *self {
            Self::NoLink { cookie } => warn!(ctx, "spliced: no link for socket {}", cookie),
            Self::NoFlow { cookie } => warn!(ctx, "spliced: no flow for socket {}", cookie),
            Self::Fault { cookie, fault } => warn!(ctx, "spliced: socket {}: {}", cookie, fault),
            Self::Refused { cookie, len } => warn!(
                ctx,
                "spliced: redirect of {} bytes from socket {} refused", len, cookie
            ),
        }
    }
}

/// The verdict on one received batch: `SK_PASS` once it is redirected, `SK_DROP` for a batch
/// with nothing to pass on, [`Dropped`] for one that had to be dropped.
pub fn try_verdict(ctx: &SkBuffContext) -> Result<u32, Dropped> {
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
    // SAFETY: the map value stays valid for the whole run.
    let Some(link) = (unsafe { LINKS.get(&cookie) }) else {
        return Err(Dropped::NoLink { cookie });
    };
    let mut link = *link;

    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return Err(Dropped::NoFlow { cookie });
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
            drop_batch(flow, cookie, received.into());
            return Err(Dropped::Fault { cookie, fault });
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
        return Err(Dropped::Refused { cookie, len });
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
        if link.side == Side::CLIENT {
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
pub type StreamFault = &'static str;
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
