//! The kernel half of spliced.
//!
//! `spliced_verdict` (sk_skb stream verdict, attached to `RECV`) hands every byte a spliced
//! socket receives to its peer socket's egress, counts it, and tells userspace when the bytes
//! buffered for one direction may have reached the configured bound. `spliced_msg` (sk_msg,
//! attached to `SOCKS`) counts every byte that enters a spliced socket's send path.
//! `spliced_hold` (sock_ops, attached to the daemon's cgroup) takes a socket out of `RECV`
//! under its socket lock when the daemon asks, which is how a sender is held back; as an
//! upstream socket to a machine on this host connects, it records the application's side of
//! that connection in `BYPASS`. `spliced_pair` (sock_ops, attached to the cgroup the
//! applications run in) pairs the application's socket as it is established.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, bpf_sock, sk_action,
    },
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_map_delete_elem, bpf_map_lookup_elem,
        bpf_sk_release, bpf_skc_to_tcp_sock,
    },
    macros::{map, sk_msg, sock_ops, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use proxy_common::{
    BYPASS_PAIRED, BYPASS_PASSED, BYPASS_REFUSED, BYPASS_VIA_TCP, BYPASS_WAITING, Bypass,
    EVENTS_BYTES, Flow, FlowEvent, Link, MAX_SERVICES, MAX_SOCKETS, PORT_BACKEND, PORT_PUBLIC,
    Pairing, ROLE_APP, ROLE_UPSTREAM, SIDE_CLIENT, ServiceCounters, TcpSockLayout, Tuple, UserTx,
    V4_MAPPED_WORD, hold_port_key,
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
static UPSTREAMS: HashMap<u64, Pairing> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static BYPASS: HashMap<Tuple, Bypass> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Non-zero when the daemon pairs same-host connections (`--same-host-bypass on`), set at
/// load. Without it no socket has a `BYPASS` entry and nothing reads `Flow::acked` or
/// `Flow::written`, so the `sk_msg` program skips its lookup and public sockets skip those
/// reports: connections that are not paired pay nothing for the bypass.
#[unsafe(no_mangle)]
static SAME_HOST: Global<u32> = Global::new(0);

/// Where this kernel keeps the `struct tcp_sock` fields [`written`] reads, set at load with
/// the bypass on (see `proxy_common::TcpSockLayout`).
#[unsafe(no_mangle)]
static TCP_SOCK: Global<TcpSockLayout> = Global::new(TcpSockLayout {
    write_seq: 0,
    snd_una: 0,
    bytes_acked: 0,
    rmem_alloc: 0,
    copied_seq: 0,
    rcvbuf: 0,
});

/// The daemon's `--max-buffer`, set at load: see `proxy_common::Flow::app_unread`.
#[unsafe(no_mangle)]
static UNREAD_LIMIT: Global<u64> = Global::new(0);

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
    if link.app_cookie != 0 {
        // For the upstream's `sk_msg` program, which runs when these bytes reach it (see
        // `Flow::app_unread`). What it put into the queue up to here is counted before the
        // queue is read, so none of it is missed.
        let ingressed = flow.ingressed;
        if let Some(app) = app_reading(link.app_cookie) {
            flow.ingressed_seen = ingressed;
            flow.app_unread = app.unread;
            flow.app_rcvbuf = app.rcvbuf;
            flow.app_copied_seq = app.copied_seq;
        }
    }

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

/// How far an application socket is in reading (see `proxy_common::Flow::app_unread`).
struct AppReading {
    /// `sk_rmem_alloc`: what it holds unread, in its queue and its TCP receive queue.
    unread: u32,
    /// `sk_rcvbuf`.
    rcvbuf: u32,
    /// `copied_seq`.
    copied_seq: u32,
}

/// How far the application socket `app` (a key of `SOCKS`) is in reading. What the upstream's
/// `sk_msg` program puts into its queue has no TCP window to stop it, so this is what bounds
/// it. `None`: the socket is gone.
fn app_reading(mut app: u64) -> Option<AppReading> {
    if SAME_HOST.load() == 0 {
        return None;
    }
    // SAFETY: SOCKS is a map of this object (SockHash is a transparent wrapper of its
    // definition) and the key a u64 on the stack; a socket found is held until released.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::addr_of!(SOCKS).cast_mut().cast::<c_void>(),
            core::ptr::addr_of_mut!(app).cast::<c_void>(),
        )
    };
    if sk.is_null() {
        return None;
    }
    let reading = tcp_sock(sk.cast()).map(|tp| {
        let layout = TCP_SOCK.load();
        // SAFETY: two ints and a u32 of `struct tcp_sock` (see `tcp_sock_field`).
        unsafe {
            AppReading {
                unread: u32::try_from(tcp_sock_field::<i32>(tp, layout.rmem_alloc)).unwrap_or(0),
                rcvbuf: u32::try_from(tcp_sock_field::<i32>(tp, layout.rcvbuf)).unwrap_or(0),
                copied_seq: tcp_sock_field::<u32>(tp, layout.copied_seq),
            }
        }
    });
    // SAFETY: releases the socket the lookup took.
    unsafe { bpf_sk_release(sk) };
    reading
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

/// Runs on every message that enters the send path of a socket in `SOCKS`: what a process
/// writes, and also every batch the verdict program redirected there, since the kernel's
/// backlog worker sends redirected bytes through the socket's `sendmsg`. It counts them all
/// (so that the egress total can be checked against the verdict's redirect counters plus the
/// bytes the daemon moved itself), and it carries the two legs of a same-host connection
/// (`BYPASS`):
/// - on the daemon's upstream socket, what would go to the application over loopback TCP is
///   put straight into the application socket's receive queue. This runs under the upstream
///   socket's lock and the kernel queues the bytes before `sendmsg` returns, so when the
///   verdict's backlog for the upstream is empty every byte is in the application's queue,
///   and a FIN sent after that reaches the application after them.
/// - on the application's socket, what it writes goes straight into the client socket's send
///   queue, also before its `sendmsg` returns, while the client has at most `limit` bytes
///   unacknowledged; beyond that the application's bytes take its TCP path (to the upstream
///   socket, whose verdict and holds bound what waits) until everything it sent either way
///   is in the client's send queue, so that no byte overtakes another. Both counts come from
///   the TCP stacks (see [`written`]), not from this program, which the kernel skips for the
///   rest of a send it cut short. The bound keeps the client's send queue from filling: a
///   full one would block or fail the application's write on a queue its own socket cannot
///   wait for.
#[sk_msg]
pub fn spliced_msg(ctx: SkMsgContext) -> u32 {
    let size = ctx.size();
    if let Some(tx) = USER_TX.get_ptr_mut(0) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
        let tx = unsafe { &mut *tx };
        tx.messages += 1;
        tx.bytes += u64::from(size);
    }
    if SAME_HOST.load() == 0 {
        return sk_action::SK_PASS;
    }
    let tuple = msg_tuple(&ctx);
    let Some(entry) = BYPASS.get_ptr_mut(&tuple) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: the value stays valid for the run; only this socket's sends write it, under its
    // lock.
    let entry = unsafe { &mut *entry };
    let size = u64::from(size);
    if entry.role == ROLE_UPSTREAM {
        if entry.state != BYPASS_PAIRED && entry.state != BYPASS_VIA_TCP {
            return sk_action::SK_PASS;
        }
        // No flow: the connection is ending; the TCP path is always safe.
        let Some(flow) = FLOWS.get_ptr_mut(&entry.client_cookie) else {
            return sk_action::SK_PASS;
        };
        // SAFETY: the map value stays valid for the run. The verdict of the client's socket
        // may update its reading meanwhile (stale values only keep the bytes on TCP longer);
        // this program alone writes `ingressed`, under the upstream socket's lock.
        let flow = unsafe { &mut *flow };
        if upstream_on_tcp(&ctx, entry, no_room(flow, size), flow.app_copied_seq) {
            return sk_action::SK_PASS;
        }
        let mut app = entry.app_cookie;
        if SOCKS.redirect_msg(&ctx, &mut app, u64::from(BPF_F_INGRESS)) as u32 != sk_action::SK_PASS
        {
            // The application closed its socket (which takes it out of the map): the bytes
            // take the TCP path, where the closed socket answers with a reset, as it would
            // without the bypass.
            return sk_action::SK_PASS;
        }
        entry.bytes += size;
        flow.ingressed = entry.bytes;
        count(entry.service, |c| c.ingress_bytes += size);
        return sk_action::SK_PASS;
    }
    if entry.state != BYPASS_PAIRED && entry.state != BYPASS_VIA_TCP {
        return sk_action::SK_PASS;
    }
    // SAFETY: the map value stays valid for the run (another CPU may update it meanwhile; a
    // stale count only errs towards the TCP path).
    let (acked, queued) =
        unsafe { FLOWS.get(&entry.client_cookie) }.map_or((0, 0), |f| (f.acked, f.written));
    // What the application has put on its own TCP path so far, counted by its TCP stack (under
    // this socket's lock): exact even when a send was cut short, whose rest the kernel then
    // sends without running this program again.
    // SAFETY: a field of the context the kernel filled.
    let Some(via_tcp) = written(unsafe { (*ctx.msg).__bindgen_anon_3.sk }) else {
        return sk_action::SK_PASS;
    };
    if entry.state == BYPASS_VIA_TCP {
        // Every byte the application sent, either way, is in the client's send queue: what it
        // sends next cannot overtake any.
        if queued < entry.bytes + via_tcp {
            return sk_action::SK_PASS;
        }
        entry.state = BYPASS_PAIRED;
    }
    if (entry.bytes + via_tcp + size).saturating_sub(acked) > entry.limit {
        entry.state = BYPASS_VIA_TCP;
        count(entry.service, |c| c.via_tcp += 1);
        return sk_action::SK_PASS;
    }
    let mut client = entry.client_cookie;
    if SOCKS.redirect_msg(&ctx, &mut client, 0) as u32 != sk_action::SK_PASS {
        // The daemon closed the client's socket: the connection is ending.
        entry.state = BYPASS_PASSED;
        return sk_action::SK_PASS;
    }
    entry.bytes += size;
    count(entry.service, |c| c.direct_bytes += size);
    sk_action::SK_PASS
}

/// Whether the application's queue has no room for `size` more bytes: what it held unread
/// when the verdict last looked, plus what went into it since (`Flow::ingressed` against the
/// verdict's snapshot), plus `size`, would pass `UNREAD_LIMIT` or half its receive buffer
/// (see `proxy_common::Flow::app_unread`).
fn no_room(flow: &Flow, size: u64) -> bool {
    let limit = UNREAD_LIMIT.load().min(u64::from(flow.app_rcvbuf / 2));
    let unread = u64::from(flow.app_unread) + flow.ingressed.saturating_sub(flow.ingressed_seen);
    unread + size > limit
}

/// Whether the upstream socket of `entry` sends this message over its TCP path rather than into
/// the application's queue, given whether the queue has room for it (`full`) and the
/// application's `copied_seq`. It goes over TCP while the queue is full; it comes back only
/// once the application has read every byte sent over TCP: the application reads its queue
/// before its TCP stream, so a byte put into the queue earlier would overtake them.
fn upstream_on_tcp(ctx: &SkMsgContext, entry: &mut Bypass, full: bool, copied_seq: u32) -> bool {
    if entry.state == BYPASS_PAIRED {
        if !full {
            return false;
        }
        entry.state = BYPASS_VIA_TCP;
        count(entry.service, |c| c.unread_stops += 1);
        return true;
    }
    if full {
        return true;
    }
    // SAFETY: a field of the context the kernel filled.
    let Some(tp) = tcp_sock(unsafe { (*ctx.msg).__bindgen_anon_3.sk }) else {
        return true;
    };
    // SAFETY: a u32 of `struct tcp_sock` (see `tcp_sock_field`).
    if unsafe { tcp_sock_field::<u32>(tp, TCP_SOCK.load().write_seq) } != copied_seq {
        return true;
    }
    entry.state = BYPASS_PAIRED;
    false
}

/// Adds to this CPU's counters of `service`.
fn count(service: u32, add: impl FnOnce(&mut ServiceCounters)) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
        add(unsafe { &mut *c });
    }
}

/// The [`Tuple`] of the socket of an `sk_msg` context.
fn msg_tuple(ctx: &SkMsgContext) -> Tuple {
    let md = ctx.msg;
    // SAFETY: reads of fields of the context the kernel filled.
    unsafe {
        tuple_from(
            (*md).family,
            [(*md).local_ip4, (*md).remote_ip4],
            [&raw const (*md).local_ip6, &raw const (*md).remote_ip6],
            (*md).local_port,
            (*md).remote_port,
        )
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
///
/// With the same-host bypass on, public sockets also report what their client acknowledged
/// (`Flow::acked`), at every packet they send and every RTT sample (each acknowledgement of
/// new data): the `sk_msg` program bounds what an application sends straight into a client
/// socket with it.
#[sock_ops]
pub fn spliced_hold(ctx: SockOpsContext) -> u32 {
    let same_host = SAME_HOST.load() != 0;
    let (key, more) = match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => (
            // local_port is in host order.
            Some(hold_port_key(PORT_PUBLIC, ctx.local_port() as u16)),
            if same_host {
                BPF_SOCK_OPS_RTT_CB_FLAG
            } else {
                0
            },
        ),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if same_host {
                publish_upstream(&ctx);
            }
            (Some(hold_port_key(PORT_BACKEND, remote_port(&ctx))), 0)
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            if same_host {
                record_acked(&ctx);
            }
            hold(&ctx);
            (None, 0)
        }
        BPF_SOCK_OPS_RTT_CB => {
            record_acked(&ctx);
            (None, 0)
        }
        _ => (None, 0),
    };
    // SAFETY: the map value stays valid for the whole run.
    if let Some(key) = key
        && unsafe { HOLD_PORTS.get(&key) }.is_some()
    {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | more;
        // A failure leaves the socket without holds; the daemon sees it never held.
        let _ = ctx.set_cb_flags(flags as i32);
    }
    1
}

/// Stores what the socket's peer acknowledged and what has been written into its send queue
/// in its flow, if it has one.
fn record_acked(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket of the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: a field of the context the kernel filled.
    let Some(queued) = written(unsafe { (*ctx.ops).__bindgen_anon_2.sk }) else {
        return;
    };
    // SAFETY: the kernel runs this under the socket lock, as it does the verdict, the only
    // other writer of this flow; a field of the context the kernel filled.
    unsafe {
        (*flow).acked = (*ctx.ops).bytes_acked;
        (*flow).written = queued;
    }
}

/// Bytes written into the send queue of TCP socket `sk` over its life: what its peer
/// acknowledged plus what is queued and not acknowledged (`bytes_acked` + `write_seq` -
/// `snd_una`), read through the kernel's own `struct tcp_sock`, which no program context
/// carries. `None` for a socket that is not a full TCP socket.
fn written(sk: *mut bpf_sock) -> Option<u64> {
    let tp = tcp_sock(sk)?;
    let layout = TCP_SOCK.load();
    // SAFETY: two u32 and a u64 of `struct tcp_sock` (see `tcp_sock_field`).
    unsafe {
        let write_seq = tcp_sock_field::<u32>(tp, layout.write_seq);
        let snd_una = tcp_sock_field::<u32>(tp, layout.snd_una);
        let acked = tcp_sock_field::<u64>(tp, layout.bytes_acked);
        Some(acked + u64::from(write_seq.wrapping_sub(snd_una)))
    }
}

/// The kernel's `struct tcp_sock` of `sk`; `None` for a null pointer or a socket that is not
/// a full TCP socket.
fn tcp_sock(sk: *mut bpf_sock) -> Option<*const u8> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper checks the socket it is given and returns null if it is not TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    (!tp.is_null()).then(|| tp.cast::<u8>().cast_const())
}

/// The field of `struct tcp_sock` `tp` at byte offset `at` (a [`TcpSockLayout`] offset).
///
/// # Safety
/// `tp` comes from [`tcp_sock`], and this kernel's `struct tcp_sock` has a field of type `T` at
/// `at`: userspace found it in the kernel's BTF, and the verifier checks the read against the
/// same BTF (the offset is in read-only data, so it sees a constant).
unsafe fn tcp_sock_field<T>(tp: *const u8, at: u32) -> T {
    // SAFETY: as the caller promises.
    unsafe { core::ptr::read_volatile(tp.add(at as usize).cast::<T>()) }
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

const AF_INET6: u32 = 10;

/// The context's socket's [`Tuple`].
fn tuple_of(ctx: &SockOpsContext) -> Tuple {
    let ops = ctx.ops;
    // SAFETY: reads of fields of the context the kernel filled.
    unsafe {
        tuple_from(
            (*ops).family,
            [(*ops).local_ip4, (*ops).remote_ip4],
            [&raw const (*ops).local_ip6, &raw const (*ops).remote_ip6],
            (*ops).local_port,
            (*ops).remote_port,
        )
    }
}

/// A [`Tuple`] from the socket fields of a program context: the IPv4 addresses (local,
/// remote), pointers to the IPv6 ones, the local port (host order) and the remote port as the
/// context holds it (see [`remote_port`]).
///
/// # Safety
/// The pointers point into the program's context.
unsafe fn tuple_from(
    family: u32,
    ip4: [u32; 2],
    ip6: [*const [u32; 4]; 2],
    local_port: u32,
    remote_port: u32,
) -> Tuple {
    // One word at a time: the access the verifier accepts for the context's address arrays.
    let word = |a: *const [u32; 4], i: usize| {
        // SAFETY: within the array the caller's pointer points to.
        unsafe { core::ptr::read_volatile(a.cast::<u32>().add(i)) }
    };
    let addr = |i: usize| {
        if family == AF_INET6 {
            [
                word(ip6[i], 0),
                word(ip6[i], 1),
                word(ip6[i], 2),
                word(ip6[i], 3),
            ]
        } else {
            [0, 0, V4_MAPPED_WORD, ip4[i]]
        }
    };
    Tuple {
        local: addr(0),
        remote: addr(1),
        local_port,
        remote_port: u32::from(port_from_context(remote_port)),
    }
}

/// As an upstream socket that userspace registered in `UPSTREAMS` connects, records both of
/// its connection's sides in `BYPASS`, waiting for the application's socket. This runs when
/// the SYN-ACK arrives, so before the application's socket can exist: that socket is made
/// from the ACK this one sends next.
fn publish_upstream(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket of the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the map value stays valid for the whole run.
    let Some(pairing) = (unsafe { UPSTREAMS.get(&cookie) }) else {
        return;
    };
    let upstream = Bypass {
        upstream_cookie: cookie,
        client_cookie: pairing.client_cookie,
        app_cookie: 0,
        bytes: 0,
        limit: pairing.limit,
        state: BYPASS_WAITING,
        role: ROLE_UPSTREAM,
        service: pairing.service,
        _pad: 0,
    };
    let tuple = tuple_of(ctx);
    // A full map leaves the connection unpaired; userspace stops waiting and uses the
    // verdict path.
    let _ = BYPASS.insert(&tuple, &upstream, 0);
    let app = Bypass {
        role: ROLE_APP,
        ..upstream
    };
    let _ = BYPASS.insert(&tuple.reversed(), &app, 0);
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

// ---------------------------------------------------------------------------------------------
// sock_ops: pair
// ---------------------------------------------------------------------------------------------

/// Pairs an application's socket with the client of the daemon's upstream connection it
/// accepted: as the socket is established, if `BYPASS` waits for it, it is put into `SOCKS`,
/// and both sides' entries say so.
///
/// The pairing is claimed by deleting the upstream's `UPSTREAMS` entry; userspace deletes the
/// same entry when it stops waiting, so a pairing happens either fully before userspace looks
/// or not at all. Every other socket of the cgroup costs one hash lookup, once.
///
/// The kernel queues a new socket for `accept` just before it runs this, under the socket's
/// lock; an application that accepts and writes in that instant gets its first bytes onto its
/// own TCP path (its `sendmsg` was chosen before the socket entered the map, and waits for the
/// lock). Those bytes must not be overtaken, so a paired socket reports every data segment it
/// sends; one sent while the pair is still direct makes its side `BYPASS_PASSED`, before the
/// application's next `sendmsg` can run (both run under the socket lock).
#[sock_ops]
pub fn spliced_pair(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => pair(&ctx),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => early_write(&ctx),
        _ => {}
    }
    1
}

fn early_write(ctx: &SockOpsContext) {
    // SAFETY: a field of the context the kernel filled: the length of the segment's data.
    if unsafe { (*ctx.ops).skb_len } == 0 {
        return;
    }
    let Some(entry) = BYPASS.get_ptr_mut(&tuple_of(ctx)) else {
        return;
    };
    // SAFETY: the value stays valid for the run; its writers run under this socket's lock.
    let entry = unsafe { &mut *entry };
    if entry.role == ROLE_APP && entry.state == BYPASS_PAIRED {
        entry.state = BYPASS_PASSED;
        count(entry.service, |c| c.early_writes += 1);
    }
}

fn pair(ctx: &SockOpsContext) {
    let tuple = tuple_of(ctx);
    let Some(entry) = BYPASS.get_ptr_mut(&tuple) else {
        return;
    };
    // SAFETY: the value stays valid for the whole run; the socket is being established under
    // its lock, and nothing else writes this entry until userspace deletes it.
    let entry = unsafe { &mut *entry };
    if entry.role != ROLE_APP || entry.state != BYPASS_WAITING {
        return;
    }
    if UPSTREAMS.remove(&entry.upstream_cookie).is_err() {
        // Userspace stopped waiting for this one.
        return;
    }
    // SAFETY: the helper only reads the socket of the context.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the context is the kernel's for this run.
    let ops = unsafe { &mut *ctx.ops };
    let state = if SOCKS
        .update(&mut cookie, ops, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        BYPASS_PAIRED
    } else {
        BYPASS_REFUSED
    };
    entry.app_cookie = cookie;
    entry.state = state;
    if state == BYPASS_PAIRED {
        // See `early_write`. It reserves no option space: the packets are unchanged.
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
    }
    if let Some(upstream) = BYPASS.get_ptr_mut(&tuple.reversed()) {
        // SAFETY: as above.
        let upstream = unsafe { &mut *upstream };
        upstream.app_cookie = cookie;
        upstream.state = state;
    }
    count(entry.service, |c| {
        if state == BYPASS_PAIRED {
            c.paired += 1;
        } else {
            c.pair_refused += 1;
        }
    });
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
