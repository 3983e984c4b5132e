//! The end of a stream: the kernel does not pass a FIN on, so the daemon shuts the peer's
//! writing half once every byte before the FIN is in the peer's send queue, and moves itself
//! what the verdict will not see.

use std::{io::Write as _, net::TcpStream, os::fd::AsFd as _, sync::atomic::Ordering};

use proxy_common::Flow;

use super::{
    MOVE_CHUNK, POLL_MIN, SpliceError,
    pair::{Pair, Waits},
};
use crate::{
    faults::{self, Fault},
    sys::{self, TcpCounters},
    watch::Side,
};

impl Pair<'_> {
    /// Moves bytes userspace must carry from `side` into its peer (through a pipe, see
    /// [`super::pending::Pending`]), as far as both sockets allow without blocking, until
    /// `total` bytes have been taken from `side` over the life of the connection: reads at
    /// most the bound ahead of what is written (less when the pipe fills first), and writes
    /// them once every byte the kernel redirected is in the peer's send queue. Reading does
    /// not wait for that: the bytes it frees may be what the kernel needs to make progress on
    /// the other direction. Returns whether all `total` bytes were moved; when not, `waits`
    /// says what should wake it.
    ///
    /// The total is exact, never "until end of stream": a read that finds nothing reports end
    /// of stream once the FIN is in, also while bytes before it are still on their way to
    /// the socket's queue; taking that for the end cut streams short.
    pub(super) fn carry(&mut self, side: Side, total: u64) -> Result<bool, SpliceError> {
        let i = side.index();
        if self.sides[i].moved >= total && self.sides[i].pending.is_empty() {
            self.sides[i].waits = Waits::Nothing;
            return Ok(true);
        }
        let flow = self.flow(side)?;
        let clear = self.backlog(side, &flow)? == 0;
        let cap = self.bound as usize;
        let (from, to) = (self.sides[i].sock, self.side(side.other()).sock);
        let dir = &mut self.sides[i];
        // The socket reported the end of its stream with bytes still to come: it polls
        // readable from now on, so only a tick may look again.
        let mut ended = false;
        // The kernel refused a write the queue's free memory had room for (TCP's memory
        // pressure): a poll may still say writable, so only a tick may look again.
        let mut refused = false;
        loop {
            let mut progress = false;
            if clear && !dir.pending.is_empty() {
                // A write the send queue cannot take whole is cut short in the kernel after
                // the sk_msg program (the egress audit) counted all of it, and the program
                // then skips the next write: each write is kept to half the queue's free
                // memory, the other half for the kernel's overhead per segment. No room is
                // as a full queue: nothing written, no progress.
                let room = sys::send_room(to.as_fd()).map_err(|e| side_error(side.other(), e))?;
                let n = dir
                    .pending
                    .len()
                    .min(usize::try_from(room / 2).unwrap_or(usize::MAX));
                let written = if n == 0 {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    dir.pending.give(to, n)
                };
                match written {
                    Ok(n) => {
                        dir.sent += n as u64;
                        self.splicer
                            .moved_bytes
                            .fetch_add(n as u64, Ordering::Relaxed);
                        progress = n > 0;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => refused = n > 0,
                    Err(e) => return Err(side_error(side.other(), e)),
                }
            }
            let want = total
                .saturating_sub(dir.moved)
                .min(MOVE_CHUNK as u64)
                .min(cap.saturating_sub(dir.pending.len()) as u64) as usize;
            if want > 0 {
                match dir.pending.take(from, want) {
                    // Not readable yet (see above); a later tick tries again.
                    Ok(0) => ended = true,
                    Ok(n) => {
                        if faults::active(Fault::DuplicateBatch) && dir.moved == 0 {
                            let again = dir.pending.bytes[dir.pending.bytes.len() - n..].to_vec();
                            dir.pending.bytes.extend_from_slice(&again);
                        }
                        dir.moved += n as u64;
                        if faults::active(Fault::DropLastByte) && dir.moved >= total {
                            dir.pending.bytes.pop();
                        }
                        progress = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(side_error(side, e)),
                }
            }
            if dir.moved >= total && dir.pending.is_empty() {
                dir.waits = Waits::Nothing;
                return Ok(true);
            }
            if !progress {
                // What wakes this carry next: room in the peer once nothing redirected waits
                // ahead of what it holds; input once it holds nothing (then the pipe is not
                // full); else the next tick.
                dir.waits = if dir.pending.is_empty() && !ended {
                    Waits::Input
                } else if clear && !refused {
                    Waits::Room
                } else {
                    Waits::Nothing
                };
                return Ok(false);
            }
        }
    }

    /// Bytes `side` has received that the kernel did not redirect (userspace moves them when
    /// the verdict will not see them). `bytes_received` counts a received FIN's sequence
    /// number as one byte.
    pub(super) fn not_redirected(&self, side: Side, own: &TcpCounters, flow: &Flow) -> u64 {
        let fin = u64::from(self.side(side).eof);
        own.bytes_received
            .saturating_sub(self.side(side).read_before + fin + flow.redirected + flow.failed)
    }

    /// `side` received FIN: once every byte before it is in the peer's send queue, shut the
    /// peer's writing half, which queues the FIN after them.
    pub(super) fn forward_fin(&mut self, side: Side) -> Result<bool, SpliceError> {
        let i = side.index();
        let flow = self.flow(side)?;
        Self::intact(side, &flow)?;
        let own = self.counters(side)?;
        // Userspace carries the rest when the verdict will not see it all: the side was taken
        // out for a hold or is outside RECV (a socket that got FIN cannot go back in), or the
        // kernel closed it. A side only asked to be held is taken out only with an empty queue.
        let carried = self.out_for_hold(side, &flow)
            || self.sides[i].outside
            || own.state == sys::TcpState::Close;
        let left = self.not_redirected(side, &own, &flow);
        if faults::active(Fault::FinEarly) {
            return self.shut_peer(side);
        }
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
        // peer's backlog. Without a carry the flow is as read above: every byte before the
        // FIN had been taken by the verdict, and none comes after it.
        let flow = if carried { self.flow(side)? } else { flow };
        if self.backlog(side, &flow)? > 0 {
            return Ok(false);
        }
        self.shut_peer(side)
    }

    /// Shuts the writing half of `side`'s peer, which queues the FIN after what it holds.
    fn shut_peer(&self, side: Side) -> Result<bool, SpliceError> {
        match self
            .side(side.other())
            .sock
            .shutdown(std::net::Shutdown::Write)
        {
            // NotConnected: the peer already went away; its own event ends the connection.
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {}
            Err(e) => return Err(SpliceError::Internal(e)),
        }
        tracing::trace!(?side, "end of stream passed on");
        Ok(true)
    }
}

/// Writes `bytes` into a non-blocking socket, waiting while its send buffer is full.
pub(super) async fn write_all(mut s: &TcpStream, mut bytes: &[u8]) -> Result<(), SpliceError> {
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

pub(super) fn side_error(side: Side, e: std::io::Error) -> SpliceError {
    match side {
        Side::Client => SpliceError::Client(e),
        Side::Backend => SpliceError::Backend(e),
    }
}
