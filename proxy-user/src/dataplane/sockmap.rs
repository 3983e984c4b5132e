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
//! - No backpressure: a redirected byte is acknowledged to its sender at once and waits in
//!   the peer's backlog for as long as the peer's reader is slow. The verdict program counts
//!   what it redirected and raises an event at a check point; if more than `max_buffer`
//!   bytes then wait in the peer's backlog, the receiving socket is *parked*: the verdict
//!   passes its bytes to its own receive path, charged to its receive buffer, so TCP closes
//!   the window and the sender is held back. Once the backlog is empty the task moves the
//!   parked bytes (at most about one receive buffer) into the peer and unparks. Taking the
//!   socket out of the verdict map instead would be simpler, but the kernel stops a verdict
//!   without the socket lock, and a batch read at that moment is dropped: seen here as 64 KiB
//!   holes in a stream.
//! - A socket whose writing half is already shut leaves the maps by itself when its FIN
//!   arrives (`FIN_WAIT2` -> `TIME_WAIT`), before the verdict reads the data that came with that
//!   FIN; and a socket map takes only established sockets, so one that received FIN before
//!   it was inserted cannot enter. In both cases the task moves what is left in the queue.
//!   A pair that cannot enter the maps at all is handed back to the caller, which copies it.
//! - A reset on either side is passed on as a reset on the other.
//!
//! The bytes userspace moves in these cases are counted (`moved_bytes`): zero while readers
//! keep up.

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
    /// Bound on bytes waiting in the kernel's backlog for one direction of one connection.
    pub max_buffer: u64,
    /// Bytes userspace moved itself (parked bytes, and the ends of streams described above).
    pub moved_bytes: AtomicU64,
    /// Times a socket was parked.
    pub parks: AtomicU64,
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

/// First and last wait between checks while a direction is parked or ending.
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
    /// Userspace asked the kernel to park this side.
    parked: bool,
    /// This side is not in `RECV` (it received FIN before it could be inserted).
    outside: bool,
    /// Bytes userspace took from this side.
    moved: u64,
    /// Bytes userspace wrote into the other side.
    sent: u64,
    /// Taken, not yet written.
    pending: Vec<u8>,
}

struct Pair<'a> {
    splicer: &'a Splicer,
    socks: [&'a TcpStream; 2],
    cookies: [u64; 2],
    links: [Link; 2],
    /// Bytes userspace wrote into each socket before splicing (none yet; a PROXY header later).
    preface: [u64; 2],
    dirs: [Direction; 2],
    /// Most parked bytes seen waiting for userspace, per side (for the log).
    max_unread: [u64; 2],
    /// [`sys::monotonic_coarse_ns`] when the pair was spliced.
    started_ns: u64,
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
        let written = self.counters(side.other())?.bytes_written();
        Ok(self.owed(side, flow).saturating_sub(written))
    }

    fn set_link(&self, side: Side) -> Result<(), SpliceError> {
        let i = side.index();
        Ok(self
            .splicer
            .kernel
            .set_link(self.cookies[i], &self.links[i])?)
    }

    /// Places the next check point where the bound could first be exceeded.
    fn rearm(&mut self, side: Side, flow: &Flow, backlog: u64) -> Result<(), SpliceError> {
        let room = self.splicer.max_buffer.saturating_sub(backlog).max(1);
        self.links[side.index()].check_at = flow.redirected + room;
        self.set_link(side)
    }

    /// Reacts to a check point: park if too much waits in the peer's backlog, else move the
    /// check point.
    fn on_pressure(&mut self, side: Side) -> Result<(), SpliceError> {
        let i = side.index();
        if self.dirs[i].parked {
            return Ok(());
        }
        let flow = self.flow(side)?;
        if flow.parked != self.dirs[i].moved {
            // The kernel parked bytes after the last unpark (see `unpark`): carry them.
            self.dirs[i].parked = true;
            return Ok(());
        }
        let backlog = self.backlog(side, &flow)?;
        if backlog <= self.splicer.max_buffer {
            return self.rearm(side, &flow, backlog);
        }
        self.links[i].park = 1;
        self.set_link(side)?;
        self.dirs[i].parked = true;
        self.splicer.parks.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?side, backlog, "parked: the peer is slow");
        Ok(())
    }

    /// Moves bytes userspace must carry from `side` into its peer, as far as both sockets
    /// allow without blocking, until `total` bytes have been taken from `side` over the life
    /// of the connection: reads at most `max_buffer` ahead of what is written, and writes them
    /// once every byte the kernel redirected is in the peer's send queue. Reading does not wait
    /// for that: the bytes it frees may be what the kernel needs to make progress on the other
    /// direction. Returns whether all `total` bytes were moved.
    ///
    /// The total is exact, never "until end of stream": a parked batch can wait in the
    /// socket's psock queue behind bytes the kernel is still sending the other way, and a read
    /// meanwhile reports end of stream once the FIN is in; taking that for the end cut
    /// streams short.
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

    /// Moves the parked bytes of a parked side, and unparks it when they are all through.
    ///
    /// The verdict may park more bytes while this runs (the link still says park, or the
    /// bytes it parked are not all moved), so this loops until the kernel's parked count and
    /// the bytes moved agree after the link was updated. A verdict run that read the link
    /// before the update and counts after the last look here raises an event instead.
    fn unpark(&mut self, side: Side) -> Result<bool, SpliceError> {
        let i = side.index();
        loop {
            let parked = self.flow(side)?.parked;
            let unread = parked.saturating_sub(self.dirs[i].moved);
            if unread > self.max_unread[i] {
                self.max_unread[i] = unread;
                tracing::trace!(
                    ?side,
                    unread,
                    parked,
                    moved = self.dirs[i].moved,
                    pending = self.dirs[i].pending.len(),
                    "parked bytes not yet read"
                );
            }
            if unread > self.splicer.max_buffer.saturating_mul(8) {
                // Parked bytes are charged to the socket's receive buffer, so this can only
                // grow past it when the kernel queues them behind a stalled write on the
                // same socket: both peers have stopped reading while sending. Give up.
                return Err(SpliceError::Stalled);
            }
            if !self.carry(side, parked)? {
                return Ok(false);
            }
            let moved = self.dirs[i].moved;
            if self.links[i].park != 0 || self.links[i].parked_moved != moved {
                let flow = self.flow(side)?;
                // Parked because the peer is slow: stay parked until it has taken everything
                // the kernel redirected, or the sender is let go at once (nothing parked yet
                // is not the same as drained).
                if self.backlog(side, &flow)? > 0 {
                    return Ok(false);
                }
                self.links[i].park = 0;
                self.links[i].parked_moved = moved;
                self.rearm(side, &flow, 0)?;
                continue;
            }
            if self.flow(side)?.parked == moved {
                self.dirs[i].parked = false;
                tracing::debug!(?side, moved, "unparked");
                return Ok(true);
            }
        }
    }

    /// `side` received FIN: once every byte before it is in the peer's send queue, shut the
    /// peer's writing half, which queues the FIN after them.
    fn forward_fin(&mut self, side: Side) -> Result<bool, SpliceError> {
        let i = side.index();
        let flow = self.flow(side)?;
        let own = self.counters(side)?;
        // Userspace carries the rest when the verdict will not see it all: the side is parked
        // or has parked bytes, is outside RECV, or the kernel closed it.
        let carried = self.dirs[i].parked
            || self.dirs[i].outside
            || flow.parked > self.dirs[i].moved
            || own.state == sys::TCP_CLOSE;
        if carried {
            // Everything the socket received before its FIN (bytes_received counts the FIN's
            // sequence number as one byte) that the kernel did not redirect.
            let total = own
                .bytes_received
                .saturating_sub(1 + flow.redirected + flow.failed);
            if !self.carry(side, total)? {
                return Ok(false);
            }
        } else {
            // bytes_received counts the FIN's sequence number as one byte.
            let taken = flow.redirected + flow.parked + flow.failed + 1;
            if taken < own.bytes_received {
                return Ok(false);
            }
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
            } else if self.dirs[i].parked {
                waiting |= !self.unpark(side)?;
            }
        }
        Ok(waiting)
    }
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
        let link = |peer, side| Link {
            peer_cookie: peer,
            check_at: self.max_buffer,
            service,
            side,
            ..Link::default()
        };
        let mut pair = Pair {
            splicer: self,
            socks: [&client, &backend],
            cookies,
            links: [
                link(cookies[1], SIDE_CLIENT),
                link(cookies[0], SIDE_BACKEND),
            ],
            preface: [0, 0],
            dirs: Default::default(),
            max_unread: [0; 2],
            started_ns: sys::monotonic_coarse_ns(),
        };

        let mut refused = false;
        let result = async {
            for side in [Side::Client, Side::Backend] {
                let i = side.index();
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
            Some(SockEvent::Pressure(side)) => pair.on_pressure(side)?,
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
                    if !pair.dirs[side.index()].eof && pair.counters(side)?.state == sys::TCP_CLOSE
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
    }
}

impl From<MapOpError> for SpliceError {
    fn from(e: MapOpError) -> Self {
        Self::Map(e)
    }
}
