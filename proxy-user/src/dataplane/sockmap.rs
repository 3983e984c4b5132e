//! One spliced connection on the sockmap data plane: set-up, the life of the pair, and
//! tear-down. While bytes flow, userspace neither reads nor writes them; it only reacts to
//! what the kernel reports.
//!
//! What the kernel does not do by itself, and how this module makes up for it:
//! - Bytes queued before a socket enters the map wait for the next arrival: after insertion
//!   each socket is poked (`SO_RCVLOWAT`), which runs the verdict over its queue.
//! - A FIN is not forwarded. On `EPOLLRDHUP` from one side, the task waits until every byte
//!   that side received has passed the verdict and been written into the peer's send queue
//!   (flow counters against `TCP_INFO` and `SIOCOUTQ`), and only then shuts the peer's
//!   writing half. The other direction flows on until it ends the same way.
//! - No backpressure: the verdict takes each batch off the socket's queue at once and
//!   uncharges it, so the sender's window stays open while the bytes wait in the peer's
//!   backlog for as long as the peer's reader is slow. The verdict program counts what it
//!   redirected and raises an event at a check point; if the peer's reader has then not
//!   acknowledged more than `max_buffer` of them (the peer's backlog plus its send queue), the
//!   receiving socket is *held*: its link says so, and the `sock_ops`
//!   program takes it out of the verdict map at its next acknowledgement, under its socket
//!   lock and with its queue empty, so no verdict is part-way through a batch. Its bytes then
//!   stay in its receive queue, charged to its receive buffer, TCP closes the window, and the
//!   sender waits, as behind any proxy that stops reading. Once that is down to half the
//!   bound the socket goes back into the map and is poked, and the kernel moves what
//!   waited. Userspace moves no byte for this.
//!   While held, the socket's queue can outgrow its receive buffer (the window it offered
//!   while the verdict took every byte at once assumed less overhead per byte than the peer's
//!   segments then carried). The kernel then drops a segment for memory and offers a zero
//!   window behind the peer's last sent byte, and from then on drops every segment the peer
//!   sends, acknowledgements included, until its queue is read: this kernel does not honour a
//!   window it retracted (RFC 7323, section 2.4). Whatever the socket itself sends then
//!   never drains, and when that is what the other direction's hold waits for, neither
//!   direction moves again (a full-duplex echo stalled until the idle timeout). So a held
//!   socket whose queue has outgrown its buffer while it has bytes in flight gets a larger
//!   buffer, within a limit, and offers the window that opens ([`Pair::relieve`]).
//! - The kernel's worker that sends redirected bytes sleeps a whole scheduler tick when it
//!   finds the send queue full: each spliced socket's send buffer is set to the bound, which
//!   holds keep it from filling.
//!   (Taking the socket out of the map from userspace instead stops its verdict without the
//!   socket lock, and the batch being read at that moment is dropped: seen here as 64 KiB
//!   holes in a stream.)
//! - A socket whose writing half is already shut leaves the maps by itself when its FIN
//!   arrives (`FIN_WAIT2` -> `TIME_WAIT`), before the verdict reads the data that came with that
//!   FIN; and a socket map takes only established sockets, so one that received FIN before
//!   it was inserted cannot enter (the task moves what is left in its queue), and one that
//!   half-closed while it was held cannot go back (the task moves the rest of that direction).
//!   A pair that cannot enter the maps at all is handed back to the caller, which copies it.
//! - A reset on either side is passed on as a reset on the other.
//! - A retransmission that overlaps bytes already received reaches the verdict whole; the
//!   verdict cuts the old head off. A batch it cannot place in the stream, or whose redirect
//!   the kernel refuses, is dropped with everything after it, and the task aborts the
//!   connection with a reset on both sides rather than end a damaged stream as if complete.
//!
//! The bytes userspace moves in these cases are counted (`moved_bytes`).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::{AsFd, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use proxy_common::{Flow, Link, SIDE_BACKEND, SIDE_CLIENT};
use tokio::sync::{mpsc, watch};

use super::{
    Outcome, Phase, SpliceError,
    kernel::{Kernel, MapOpError},
};
use crate::{
    sys::{self, TcpCounters, ev},
    watch::{Registry, Side, SockEvent, Watcher},
};

/// Shared by every spliced connection.
pub struct Splicer {
    pub kernel: Kernel,
    pub registry: Arc<Registry>,
    pub watcher: Watcher,
    /// Bound on bytes of one direction of one connection that the kernel has taken from the
    /// sender and the receiver has not acknowledged (the redirect backlog and the send queue).
    pub max_buffer: u64,
    /// Bytes userspace moved itself (the ends of streams described above).
    pub moved_bytes: AtomicU64,
    /// Times a socket was held because its peer was slow.
    pub holds: AtomicU64,
    /// Times a held socket's receive buffer was raised because its queue had outgrown it
    /// (see [`Pair::relieve`]), and times that was refused at its limit.
    pub squeezes_relieved: AtomicU64,
    pub squeezes_refused: AtomicU64,
    /// A connection with no byte received on either socket for this long is closed.
    pub idle_timeout: Option<Duration>,
}

/// What became of a pair handed to [`Splicer::run`].
pub enum Spliced {
    /// The connection was spliced and has ended.
    Done(Result<Outcome, SpliceError>),
    /// The kernel would not take the sockets (one had already received FIN); nothing was
    /// forwarded, and the caller should copy them.
    Refused(TcpStream, TcpStream),
}

/// First and last wait between checks while a direction is held or ending.
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(20);
/// Largest read when userspace moves bytes.
const MOVE_CHUNK: usize = 256 * 1024;

/// One direction, named by the side that receives its bytes.
#[derive(Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts about one direction"
)]
struct Direction {
    /// The receiving side got FIN.
    eof: bool,
    /// The FIN was passed on.
    done: bool,
    /// The receiving side was asked to be held (its link says so): the `sock_ops` program
    /// takes it out of `RECV` at its next acknowledgement, until its peer has drained.
    held: bool,
    /// Times it was put back into `RECV` after the kernel took it out (against `Flow::holds`).
    released: u64,
    /// What the peer had not acknowledged at the last look while held ([`Pair::unacked`]).
    held_unacked: u64,
    /// The receiving side is not in `RECV` and cannot go back (it received FIN before it could
    /// be inserted, or it was no longer fully established when it was to be put back after a
    /// hold): userspace moves the rest.
    outside: bool,
    /// Bytes userspace took from this side.
    moved: u64,
    /// Bytes userspace wrote into the other side.
    sent: u64,
    /// Taken, not yet written.
    pending: Vec<u8>,
    /// The receiving side's receive buffer before this hold first raised it ([`Pair::relieve`]).
    relieved_from: Option<u64>,
    /// This hold has raised it as far as it may.
    relief_refused: bool,
    /// The receiving side's dropped packets when it was last looked at while held.
    drops_seen: u64,
}

struct Pair<'a> {
    splicer: &'a Splicer,
    socks: [&'a TcpStream; 2],
    cookies: [u64; 2],
    links: [Link; 2],
    /// Bytes userspace wrote into each socket before splicing (a PROXY protocol header into the
    /// backend's).
    preface: [u64; 2],
    dirs: [Direction; 2],
    /// [`sys::monotonic_coarse_ns`] when the pair was spliced.
    started_ns: u64,
    /// A held side's peer drained since the last tick: look again soon.
    draining: bool,
}

impl Pair<'_> {
    fn fd(&self, side: Side) -> BorrowedFd<'_> {
        self.socks[side.index()].as_fd()
    }

    fn counters(&self, side: Side) -> Result<TcpCounters, SpliceError> {
        sys::tcp_counters(self.fd(side)).map_err(SpliceError::Internal)
    }

    fn flow(&self, side: Side) -> Result<Flow, SpliceError> {
        Ok(self.splicer.kernel.flow(self.cookies[side.index()])?)
    }

    /// Bytes received on `side` that should be in the peer's send queue by now.
    fn owed(&self, side: Side, flow: &Flow) -> u64 {
        self.preface[side.other().index()] + flow.redirected + self.dirs[side.index()].sent
    }

    /// Bytes of `side` the kernel has redirected and not yet written into the peer.
    fn backlog(&self, side: Side, flow: &Flow) -> Result<u64, SpliceError> {
        let peer = side.other();
        let written = self.counters(peer)?.bytes_written();
        Ok(self.owed(side, flow).saturating_sub(written))
    }

    /// Bytes of `side` the kernel has redirected that the peer's reader has not yet
    /// acknowledged: the peer's backlog plus its send queue. This is what the bound limits.
    fn unacked(&self, side: Side, flow: &Flow) -> Result<u64, SpliceError> {
        let acked = self.counters(side.other())?.bytes_acked;
        Ok(self.owed(side, flow).saturating_sub(acked))
    }

    fn set_link(&self, side: Side) -> Result<(), SpliceError> {
        let i = side.index();
        Ok(self
            .splicer
            .kernel
            .set_link(self.cookies[i], &self.links[i])?)
    }

    /// Places the next check point where the bound could first be exceeded.
    fn rearm(&mut self, side: Side, flow: &Flow, unacked: u64) -> Result<(), SpliceError> {
        let room = self.splicer.max_buffer.saturating_sub(unacked).max(1);
        self.links[side.index()].check_at = flow.redirected + room;
        self.set_link(side)
    }

    /// Fails when the kernel dropped bytes `side` received (a redirect it refused, or a batch
    /// the verdict found out of sequence): the stream the peer gets is damaged, so the
    /// connection is aborted rather than ended as if complete.
    fn intact(side: Side, flow: &Flow) -> Result<(), SpliceError> {
        if flow.failed == 0 {
            return Ok(());
        }
        Err(SpliceError::Dropped {
            side: side.name(),
            bytes: flow.failed,
        })
    }

    /// Reacts to a kernel event: a fault (see [`Self::intact`]), or a check point, where
    /// `side` is held if too much waits in the peer's backlog, else the check point moves.
    fn on_pressure(&mut self, side: Side) -> Result<(), SpliceError> {
        let i = side.index();
        let flow = self.flow(side)?;
        Self::intact(side, &flow)?;
        if self.dirs[i].held || self.dirs[i].outside {
            return Ok(());
        }
        let unacked = self.unacked(side, &flow)?;
        if unacked <= self.splicer.max_buffer {
            return self.rearm(side, &flow, unacked);
        }
        self.links[i].hold = 1;
        self.dirs[i].drops_seen = sys::receive_memory(self.fd(side))
            .map_err(SpliceError::Internal)?
            .drops;
        self.set_link(side)?;
        self.dirs[i].held_unacked = unacked;
        self.dirs[i].held = true;
        self.splicer.holds.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(?side, unacked, "held: the peer is slow");
        Ok(())
    }

    /// Whether the kernel has taken `side` out of `RECV` for a hold and it has not been put
    /// back.
    fn out_for_hold(&self, side: Side, flow: &Flow) -> bool {
        flow.holds > self.dirs[side.index()].released
    }

    /// Lets a held side flow again once its peer's backlog is down to half the bound: the
    /// link stops asking for the hold, and if the kernel took the socket out it goes back into
    /// `RECV` and is poked, so the verdict runs over what waited in its queue. Returns whether
    /// it flows again; false also when it never can (it half-closed meanwhile), and the ticks
    /// that follow then move the rest of its stream.
    fn release(&mut self, side: Side) -> Result<bool, SpliceError> {
        let i = side.index();
        let flow = self.flow(side)?;
        if self.out_for_hold(side, &flow) {
            self.relieve(side)?;
        }
        let unacked = self.unacked(side, &flow)?;
        // The peer is taking bytes: look again at the shortest interval, so that the socket
        // is back before the pipe runs dry. A peer that has stopped reading is looked at
        // less and less often.
        self.draining |= unacked < self.dirs[i].held_unacked;
        self.dirs[i].held_unacked = unacked;
        if unacked > self.splicer.max_buffer / 2 {
            return Ok(false);
        }
        self.links[i].hold = 0;
        self.rearm(side, &flow, unacked)?;
        self.dirs[i].held = false;
        // Putting it back takes the socket lock, as the hold does, so the two cannot cross:
        // either the socket was taken out before this, or it stays in (busy).
        match self
            .splicer
            .kernel
            .start_receive(self.cookies[i], self.fd(side))
        {
            Ok(()) => {
                self.dirs[i].released += 1;
                self.dirs[i].relief_refused = false;
                if let Some(buffer) = self.dirs[i].relieved_from.take() {
                    // The verdict empties the queue: back to the buffer it had.
                    sys::set_receive_buffer(self.fd(side), buffer / 2)
                        .map_err(SpliceError::Internal)?;
                }
                sys::poke_receive(self.fd(side)).map_err(SpliceError::Internal)?;
                tracing::trace!(?side, unacked, "released");
            }
            Err(e) if e.is_busy() => tracing::trace!(?side, unacked, "released before held"),
            Err(e) if e.is_state_refusal() => {
                self.dirs[i].released += 1;
                self.dirs[i].outside = true;
                tracing::debug!(
                    ?side,
                    "held side can no longer enter the verdict map; userspace moves the rest"
                );
                // Still waiting: the next ticks move its bytes.
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(true)
    }

    /// Keeps a held `side` taking acknowledgements (see the module's notes): when its queue
    /// has outgrown its receive buffer while bytes it sent wait for acknowledgement, raises
    /// the buffer to an eighth above what the queue holds (the kernel offers no window while
    /// less than a sixteenth of the buffer is free) and makes the socket offer the window
    /// that opens, which the peer's next retransmission, carrying its acknowledgement, fits
    /// in. A hold raises it to at most half as much again as it was; past that the
    /// connection waits for its idle timeout, so a peer that sends and never reads cannot
    /// make it grow further.
    fn relieve(&mut self, side: Side) -> Result<(), SpliceError> {
        const MARGIN: u64 = 256 * 1024;
        let i = side.index();
        let sock = self.socks[i];
        let memory = sys::receive_memory(sock.as_fd()).map_err(SpliceError::Internal)?;
        // A segment dropped for memory is what makes the kernel retract its window, and that
        // happens once the queue plus the arriving segment would pass the buffer: so a drop
        // since the last look with the queue within `MARGIN` (several segments) of it.
        let dropped = memory.drops > std::mem::replace(&mut self.dirs[i].drops_seen, memory.drops);
        if !dropped || memory.held + MARGIN < memory.buffer || self.counters(side)?.outq == 0 {
            return Ok(());
        }
        let dir = &mut self.dirs[i];
        let from = *dir.relieved_from.get_or_insert(memory.buffer);
        let limit = from + from / 2;
        let buffer = (memory.held + memory.held / 8 + MARGIN).min(limit);
        if buffer <= memory.buffer {
            if !dir.relief_refused {
                dir.relief_refused = true;
                self.splicer
                    .squeezes_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    ?side,
                    held = memory.held,
                    buffer = memory.buffer,
                    "a held socket's queue outgrew its raised receive buffer: it takes no \
                     acknowledgement until it is read"
                );
            }
            return Ok(());
        }
        sys::set_receive_buffer(sock.as_fd(), buffer / 2).map_err(SpliceError::Internal)?;
        sys::offer_window(sock.as_fd()).map_err(SpliceError::Internal)?;
        self.splicer
            .squeezes_relieved
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            ?side,
            held = memory.held,
            from = memory.buffer,
            to = buffer,
            "raised a held socket's receive buffer"
        );
        Ok(())
    }

    /// Moves bytes userspace must carry from `side` into its peer, as far as both sockets
    /// allow without blocking, until `total` bytes have been taken from `side` over the life
    /// of the connection: reads at most `max_buffer` ahead of what is written, and writes them
    /// once every byte the kernel redirected is in the peer's send queue. Reading does not wait
    /// for that: the bytes it frees may be what the kernel needs to make progress on the other
    /// direction. Returns whether all `total` bytes were moved.
    ///
    /// The total is exact, never "until end of stream": a read that finds nothing reports end
    /// of stream once the FIN is in, also while bytes before it are still on their way to
    /// the socket's queue; taking that for the end cut streams short.
    fn carry(&mut self, side: Side, total: u64) -> Result<bool, SpliceError> {
        let i = side.index();
        let flow = self.flow(side)?;
        let clear = self.backlog(side, &flow)? == 0;
        let cap = self.splicer.max_buffer as usize;
        let (from, to) = (self.socks[i], self.socks[side.other().index()]);
        let mut buf = vec![0; MOVE_CHUNK];
        loop {
            let dir = &mut self.dirs[i];
            let mut progress = false;
            if clear && !dir.pending.is_empty() {
                match (&*to).write(&dir.pending) {
                    Ok(n) => {
                        dir.pending.drain(..n);
                        dir.sent += n as u64;
                        self.splicer
                            .moved_bytes
                            .fetch_add(n as u64, Ordering::Relaxed);
                        progress = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(side_error(side.other(), e)),
                }
            }
            let want = total
                .saturating_sub(dir.moved)
                .min(MOVE_CHUNK as u64)
                .min(cap.saturating_sub(dir.pending.len()) as u64) as usize;
            if want > 0 {
                match (&*from).read(&mut buf[..want]) {
                    // Not readable yet (see above); a later tick tries again.
                    Ok(0) => {}
                    Ok(n) => {
                        dir.moved += n as u64;
                        dir.pending.extend_from_slice(&buf[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(side_error(side, e)),
                }
            }
            if dir.moved >= total && dir.pending.is_empty() {
                return Ok(true);
            }
            if !progress {
                return Ok(false);
            }
        }
    }

    /// Bytes `side` has received that the kernel did not redirect (userspace moves them when
    /// the verdict will not see them). `bytes_received` counts a received FIN's sequence
    /// number as one byte.
    fn not_redirected(&self, side: Side, own: &TcpCounters, flow: &Flow) -> u64 {
        let fin = u64::from(self.dirs[side.index()].eof);
        own.bytes_received
            .saturating_sub(fin + flow.redirected + flow.failed)
    }

    /// `side` received FIN: once every byte before it is in the peer's send queue, shut the
    /// peer's writing half, which queues the FIN after them.
    fn forward_fin(&mut self, side: Side) -> Result<bool, SpliceError> {
        let i = side.index();
        let flow = self.flow(side)?;
        Self::intact(side, &flow)?;
        let own = self.counters(side)?;
        // Userspace carries the rest when the verdict will not see it all: the side was taken
        // out for a hold or is outside RECV (a socket that got FIN cannot go back in), or the
        // kernel closed it. A side only asked to be held is taken out only with an empty queue.
        let carried =
            self.out_for_hold(side, &flow) || self.dirs[i].outside || own.state == sys::TCP_CLOSE;
        let left = self.not_redirected(side, &own, &flow);
        if carried {
            if !self.carry(side, left)? {
                return Ok(false);
            }
        } else if left > 0 {
            // The verdict has not taken it all yet.
            return Ok(false);
        }
        // Whichever way the bytes went, every byte the kernel redirected must be in the
        // peer's send queue before the FIN: the shutdown fails what still waits in the
        // peer's backlog.
        let flow = self.flow(side)?;
        if self.backlog(side, &flow)? > 0 {
            return Ok(false);
        }
        match self.socks[side.other().index()].shutdown(std::net::Shutdown::Write) {
            // NotConnected: the peer already went away; its own event ends the connection.
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {}
            Err(e) => return Err(SpliceError::Internal(e)),
        }
        tracing::trace!(?side, "end of stream passed on");
        Ok(true)
    }

    /// How long until the pair has been idle for `timeout`: zero when it has. The verdict
    /// stamps each socket's flow with the time of its last received bytes, on the same clock.
    fn idle_left(&self, timeout: Duration) -> Result<Duration, SpliceError> {
        let mut last = self.started_ns;
        for side in [Side::Client, Side::Backend] {
            last = last.max(self.flow(side)?.last_active_ns);
        }
        let idle = Duration::from_nanos(sys::monotonic_coarse_ns().saturating_sub(last));
        Ok(timeout.saturating_sub(idle))
    }

    /// Whatever a timer tick can move forward. Returns whether something still waits.
    fn on_tick(&mut self) -> Result<bool, SpliceError> {
        let mut waiting = false;
        for side in [Side::Client, Side::Backend] {
            let i = side.index();
            if self.dirs[i].done {
                continue;
            }
            if self.dirs[i].eof {
                self.dirs[i].done = self.forward_fin(side)?;
                waiting |= !self.dirs[i].done;
            } else if self.dirs[i].outside {
                // It cannot go back into RECV (a socket only enters a socket map while fully
                // established, and this one has half-closed since it was held): userspace
                // moves what it receives until its FIN.
                let (own, flow) = (self.counters(side)?, self.flow(side)?);
                self.carry(side, self.not_redirected(side, &own, &flow))?;
                waiting = true;
            } else if self.dirs[i].held {
                waiting |= !self.release(side)?;
            }
        }
        Ok(waiting)
    }
}

/// Writes `bytes` into a non-blocking socket, waiting while its send buffer is full.
async fn write_all(mut s: &TcpStream, mut bytes: &[u8]) -> Result<(), SpliceError> {
    while !bytes.is_empty() {
        match s.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(POLL_MIN).await;
            }
            Err(e) => return Err(SpliceError::Backend(e)),
        }
    }
    Ok(())
}

fn side_error(side: Side, e: std::io::Error) -> SpliceError {
    match side {
        Side::Client => SpliceError::Client(e),
        Side::Backend => SpliceError::Backend(e),
    }
}

impl Splicer {
    /// Splices `client` and `backend` until both directions end, one side fails, or the
    /// daemon's grace period runs out.
    pub async fn run(
        &self,
        client: TcpStream,
        backend: TcpStream,
        service: u32,
        preface: &[u8],
        mut phase: watch::Receiver<Phase>,
    ) -> Spliced {
        let cookies = match (
            sys::socket_cookie(client.as_fd()),
            sys::socket_cookie(backend.as_fd()),
        ) {
            (Ok(c), Ok(b)) => [c, b],
            (Err(e), _) | (_, Err(e)) => return Spliced::Done(Err(SpliceError::Internal(e))),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let link = |peer, side: Side| Link {
            peer_cookie: peer,
            check_at: self.max_buffer,
            service,
            side: match side {
                Side::Client => SIDE_CLIENT,
                Side::Backend => SIDE_BACKEND,
            },
            ..Link::default()
        };
        let mut pair = Pair {
            splicer: self,
            socks: [&client, &backend],
            cookies,
            links: [
                link(cookies[1], Side::Client),
                link(cookies[0], Side::Backend),
            ],
            preface: [0, preface.len() as u64],
            dirs: Default::default(),
            started_ns: sys::monotonic_coarse_ns(),
            draining: false,
        };

        let mut refused = false;
        let result = async {
            for side in [Side::Client, Side::Backend] {
                let i = side.index();
                // The kernel's worker that sends redirected bytes waits a whole scheduler tick
                // (4 ms at 250 Hz) after it finds the send queue full, whatever frees space
                // meanwhile: an autotuned send buffer (4 MiB at most by default) then runs dry
                // within each wait, which cut bulk throughput by half. A send buffer of the
                // bound never fills, since holds keep what the peer has not acknowledged under
                // the bound, so this costs no memory beyond it.
                sys::set_send_buffer(pair.fd(side), self.max_buffer)
                    .map_err(SpliceError::Internal)?;
                self.registry.add(cookies[i], side, tx.clone());
                self.watcher
                    .add(pair.fd(side), cookies[i])
                    .map_err(SpliceError::Internal)?;
                self.kernel.add_link(cookies[i], &pair.links[i])?;
                match self.kernel.add_socket(cookies[i], pair.fd(side)) {
                    Ok(()) => {}
                    Err(e) if e.is_state_refusal() => {
                        refused = true;
                        return Ok(Outcome::Completed);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // Before the client's socket enters RECV: ahead of every byte of the client.
            write_all(&backend, preface).await?;
            for side in [Side::Client, Side::Backend] {
                match self
                    .kernel
                    .start_receive(cookies[side.index()], pair.fd(side))
                {
                    Ok(()) => sys::poke_receive(pair.fd(side)).map_err(SpliceError::Internal)?,
                    // FIN arrived since the socket entered SOCKS: userspace carries its rest.
                    Err(e) if e.is_state_refusal() => pair.dirs[side.index()].outside = true,
                    Err(e) => return Err(e.into()),
                }
            }
            drive(&mut pair, &mut rx, &mut phase).await
        }
        .await;

        if !refused && !matches!(result, Ok(Outcome::Completed | Outcome::Idle)) {
            // Abortive close: the peers see a reset, not a clean end of a truncated stream.
            for s in [&client, &backend] {
                socket2::SockRef::from(s)
                    .set_linger(Some(Duration::ZERO))
                    .ok();
            }
        }
        for side in [Side::Client, Side::Backend] {
            let i = side.index();
            self.watcher.delete(pair.fd(side)).ok();
            self.registry.remove(cookies[i]);
            self.kernel.forget(cookies[i]);
        }
        if refused {
            return Spliced::Refused(client, backend);
        }
        Spliced::Done(result)
    }
}

async fn drive(
    pair: &mut Pair<'_>,
    rx: &mut mpsc::UnboundedReceiver<SockEvent>,
    phase: &mut watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError> {
    let mut delay = POLL_MIN;
    let mut waiting = false;
    let idle = pair.splicer.idle_timeout;
    let mut idle_check = tokio::time::Instant::now() + idle.unwrap_or_default();
    loop {
        if pair.dirs.iter().all(|d| d.done) {
            return Ok(Outcome::Completed);
        }
        if *phase.borrow() == Phase::Abort {
            return Ok(Outcome::Aborted);
        }
        let event = tokio::select! {
            e = rx.recv() => e,
            () = tokio::time::sleep(delay), if waiting => None,
            _ = phase.changed() => continue,
            () = tokio::time::sleep_until(idle_check), if idle.is_some() => {
                let left = pair.idle_left(idle.unwrap_or_default())?;
                if left.is_zero() {
                    return Ok(Outcome::Idle);
                }
                idle_check = tokio::time::Instant::now() + left;
                continue;
            }
        };
        match event {
            Some(SockEvent::Pressure(side)) => {
                pair.on_pressure(side)?;
                delay = POLL_MIN;
            }
            Some(SockEvent::Epoll(side, bits)) => {
                if bits & ev::RDHUP != 0 {
                    pair.dirs[side.index()].eof = true;
                }
                if bits & (ev::ERR | ev::HUP) != 0 {
                    if let Some(err) =
                        sys::take_error(pair.fd(side)).map_err(SpliceError::Internal)?
                    {
                        return Err(side_error(side, err));
                    }
                    // Closed, but not by the end of both ways (its other way ends with the FIN
                    // this task sends on it): a reset whose error was taken already.
                    if pair.counters(side)?.state == sys::TCP_CLOSE
                        && !(pair.dirs[side.index()].eof && pair.dirs[side.other().index()].done)
                    {
                        return Err(SpliceError::closed(side));
                    }
                    pair.dirs[side.index()].eof = true;
                }
                delay = POLL_MIN;
            }
            None => delay = (delay * 2).min(POLL_MAX),
        }
        waiting = pair.on_tick()?;
        if std::mem::take(&mut pair.draining) {
            delay = POLL_MIN;
        }
    }
}

impl From<MapOpError> for SpliceError {
    fn from(e: MapOpError) -> Self {
        Self::Map(e)
    }
}
