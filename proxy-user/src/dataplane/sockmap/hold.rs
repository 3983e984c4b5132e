//! Holds: a direction whose receiver is slow has its sending side taken out of the verdict
//! map (by the kernel's hold program, at the daemon's request), so that TCP holds the sender
//! back; it goes back once the receiver has drained half the bound.

use std::{os::fd::AsFd, sync::atomic::Ordering};

use proxy_common::Flow;

use super::{SpliceError, pair::Pair};
use crate::{
    faults::{self, Fault},
    sys,
    watch::Side,
};

impl Pair<'_> {
    /// Reacts to a kernel event: a fault (see [`Self::intact`]), or a hold the kernel set by
    /// itself (see [`proxy_common::Link::max_unacked`]), which is then watched for release.
    /// A side found over the bound and not yet taken out (a pair taken over in an upgrade,
    /// looked at once) is asked to be held.
    pub(super) fn on_pressure(&mut self, side: Side) -> Result<(), SpliceError> {
        let i = side.index();
        let flow = self.flow(side)?;
        Self::intact(side, &flow)?;
        if self.sides[i].held || self.sides[i].outside {
            return Ok(());
        }
        let unacked = self.unacked(side, &flow)?;
        let taken_out = self.out_for_hold(side, &flow);
        if !taken_out {
            if unacked <= self.bound || faults::active(Fault::NoBound) {
                return Ok(());
            }
            self.sides[i].link.hold = 1;
            self.set_link(side)?;
        }
        self.sides[i].drops_seen = sys::receive_memory(self.fd(side))
            .map_err(SpliceError::Internal)?
            .drops;
        self.arm_drain(side, &flow)?;
        self.sides[i].held_unacked = unacked;
        self.sides[i].held = true;
        self.splicer.holds.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(?side, unacked, taken_out, "held: the peer is slow");
        Ok(())
    }

    /// Sets the pair for the bound the buffer budget now gives each connection: both links'
    /// bound (the hold program keeps it from the next packet on) and both sockets' buffers.
    /// A held socket keeps its receive buffer until it is released (its queue may hold more
    /// than a smaller buffer would, and a queue past its buffer takes no acknowledgement) and
    /// has its drain point moved to half the new bound.
    pub(super) fn set_bound(&mut self, bound: u64) -> Result<(), SpliceError> {
        if bound == self.bound {
            return Ok(());
        }
        self.bound = bound;
        self.largest_bound = self.largest_bound.max(bound);
        for side in [Side::Client, Side::Backend] {
            let i = side.index();
            if !faults::active(Fault::NoBound) {
                self.sides[i].link.max_unacked = bound;
                self.set_link(side)?;
            }
            let fd = self.fd(side);
            if self.sides[i].held {
                sys::set_send_buffer(fd, bound).map_err(SpliceError::Internal)?;
                self.sides[i].buffer_before_squeeze = Some(crate::dataplane::receive_buffer(bound));
                let flow = self.flow(side)?;
                self.arm_drain(side, &flow)?;
            } else {
                crate::dataplane::set_buffers(fd, bound, bound).map_err(SpliceError::Internal)?;
            }
        }
        tracing::trace!(bound, "bound set by the buffer budget");
        Ok(())
    }

    /// Asks the kernel to say when held `side` may flow again: when its peer's receiver has
    /// acknowledged all but half the bound of what `side` owes it
    /// ([`proxy_common::Link::drained_at`]). Writes the peer's link only when that point
    /// moved.
    fn arm_drain(&mut self, side: Side, flow: &Flow) -> Result<(), SpliceError> {
        let at = self.owed(side, flow).saturating_sub(self.bound / 2).max(1);
        let peer = side.other();
        if self.side(peer).link.drained_at == at {
            return Ok(());
        }
        self.side_mut(peer).link.drained_at = at;
        self.set_link(peer)
    }

    /// Whether the kernel has taken `side` out of `RECV` for a hold and it has not been put
    /// back.
    pub(super) fn out_for_hold(&self, side: Side, flow: &Flow) -> bool {
        flow.holds > self.side(side).released
    }

    /// Lets a held side flow again once its peer's backlog is down to half the bound: the
    /// link stops asking for the hold, and if the kernel took the socket out it goes back into
    /// `RECV` and is poked, so the verdict runs over what waited in its queue (past the bound
    /// it is held again at its next packet). Returns whether it flows again; false also when
    /// it never can (it half-closed meanwhile), and the ticks that follow then move the rest
    /// of its stream.
    pub(super) fn release(&mut self, side: Side) -> Result<bool, SpliceError> {
        if faults::active(Fault::HoldForever) {
            return Ok(false);
        }
        let i = side.index();
        let flow = self.flow(side)?;
        if self.out_for_hold(side, &flow) {
            self.relieve_squeeze(side)?;
        }
        let unacked = self.unacked(side, &flow)?;
        // The peer is taking bytes: look again at the shortest interval, so that the socket
        // is back before the pipe runs dry. A peer that has stopped reading is looked at
        // less and less often.
        self.draining |= unacked < self.sides[i].held_unacked;
        self.sides[i].held_unacked = unacked;
        if unacked > self.bound / 2 {
            self.arm_drain(side, &flow)?;
            return Ok(false);
        }
        self.sides[i].link.hold = 0;
        self.set_link(side)?;
        self.sides[i].held = false;
        // Putting it back takes the socket lock, as the hold does, so the two cannot cross:
        // either the socket was taken out before this, or it stays in (busy).
        match self
            .splicer
            .kernel
            .start_receive(self.sides[i].cookie, self.fd(side))
        {
            Ok(()) => {
                self.sides[i].released += 1;
                self.sides[i].squeeze_refused = false;
                if let Some(buffer) = self.sides[i].buffer_before_squeeze.take() {
                    // The verdict empties the queue: back to the buffer it had.
                    sys::set_receive_buffer(self.fd(side), buffer / 2)
                        .map_err(SpliceError::Internal)?;
                }
                sys::poke_receive(self.fd(side)).map_err(SpliceError::Internal)?;
                tracing::trace!(?side, unacked, "released");
            }
            Err(e) if e.is_busy() => tracing::trace!(?side, unacked, "released before held"),
            Err(e) if e.is_state_refusal() => {
                self.sides[i].released += 1;
                self.sides[i].outside = true;
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
    /// in. A hold raises it to at most twice the bound (or the buffer of a larger bound the
    /// pair had, whose window may still be open); past that the connection waits for
    /// its idle timeout, so a peer that sends and never reads cannot make it grow further.
    pub(super) fn relieve_squeeze(&mut self, side: Side) -> Result<(), SpliceError> {
        const MARGIN: u64 = 256 * 1024;
        let i = side.index();
        let sock = self.sides[i].sock;
        let memory = sys::receive_memory(sock.as_fd()).map_err(SpliceError::Internal)?;
        // A segment dropped for memory is what makes the kernel retract its window, and that
        // happens once the queue plus the arriving segment would pass the buffer: so a drop
        // since the last look with the queue within `MARGIN` (several segments) of it.
        let dropped = memory.drops > std::mem::replace(&mut self.sides[i].drops_seen, memory.drops);
        if !dropped
            || memory.held + MARGIN < memory.buffer
            || sys::send_queue(sock.as_fd()).map_err(SpliceError::Internal)? == 0
        {
            return Ok(());
        }
        let dir = &mut self.sides[i];
        let from = *dir.buffer_before_squeeze.get_or_insert(memory.buffer);
        // A window offered under a larger bound may still be open.
        let limit = (2 * self.bound)
            .max(from)
            .max(crate::dataplane::receive_buffer(self.largest_bound));
        let buffer = (memory.held + memory.held / 8 + MARGIN).min(limit);
        if buffer <= memory.buffer {
            if !dir.squeeze_refused {
                dir.squeeze_refused = true;
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
}
