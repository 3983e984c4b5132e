//! One spliced connection's state: its two sockets, each with the direction of the bytes it
//! receives ([`SideState`]), and the accounting both the holds and the end of stream rely on.

use std::{
    net::TcpStream,
    os::fd::{AsFd, BorrowedFd},
    time::Duration,
};

use proxy_common::{Flow, Link};

use super::{SpliceError, Splicer, pending::Pending};
use crate::{
    sys::{self, TcpCounters, ev},
    watch::{LocalWatch, Side},
};

/// One socket of a pair, and the direction of the bytes it receives.
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts about one direction"
)]
pub(super) struct SideState<'a> {
    pub(super) sock: &'a TcpStream,
    /// Its key in every per-socket map.
    pub(super) cookie: u64,
    /// Its entry in `LINKS` as last written.
    pub(super) link: Link,
    /// Bytes written into it before splicing: a PROXY protocol header into the backend's,
    /// and on a connection that was HTTP before it was upgraded, what the HTTP exchange wrote.
    pub(super) preface: u64,
    /// Bytes of its input read before splicing (an upgraded connection's HTTP exchange):
    /// received, and never the verdict's.
    pub(super) read_before: u64,
    /// The receiving side got FIN.
    pub(super) eof: bool,
    /// The FIN was passed on.
    pub(super) done: bool,
    /// The receiving side was asked to be held (its link says so): the `sock_ops` program
    /// takes it out of `RECV` at its next acknowledgement, until its peer has drained.
    pub(super) held: bool,
    /// Times it was put back into `RECV` after the kernel took it out (against `Flow::holds`).
    pub(super) released: u64,
    /// What the peer had not acknowledged at the last look while held ([`Pair::unacked`]).
    pub(super) held_unacked: u64,
    /// The receiving side is not in `RECV` and cannot go back (it received FIN before it could
    /// be inserted, or it was no longer fully established when it was to be put back after a
    /// hold): userspace moves the rest.
    pub(super) outside: bool,
    /// Bytes userspace took from this side.
    pub(super) moved: u64,
    /// Bytes userspace wrote into the other side.
    pub(super) sent: u64,
    /// Taken, not yet written.
    pub(super) pending: Pending,
    /// What the carry of its bytes waits for, when userspace carries them.
    pub(super) waits: Waits,
    /// The readiness its socket is watched for besides FIN and errors (`sys::ev` bits).
    pub(super) interest: u32,
    /// The receive buffer the receiving side gets back when its hold ends: the one it had
    /// before this hold first raised it ([`Pair::relieve_squeeze`]), or the one a new bound
    /// gave it meanwhile ([`Pair::set_bound`]).
    pub(super) buffer_before_squeeze: Option<u64>,
    /// This hold has raised it as far as it may.
    pub(super) squeeze_refused: bool,
    /// The receiving side's dropped packets when it was last looked at while held.
    pub(super) drops_seen: u64,
}

impl<'a> SideState<'a> {
    pub(super) fn new(
        sock: &'a TcpStream,
        cookie: u64,
        link: Link,
        preface: u64,
        read_before: u64,
    ) -> Self {
        Self {
            sock,
            cookie,
            link,
            preface,
            read_before,
            eof: false,
            done: false,
            held: false,
            released: 0,
            held_unacked: 0,
            outside: false,
            moved: 0,
            sent: 0,
            pending: Pending::default(),
            waits: Waits::Nothing,
            interest: 0,
            buffer_before_squeeze: None,
            squeeze_refused: false,
            drops_seen: 0,
        }
    }
}

/// What the carry of a direction stopped for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Waits {
    /// Nothing a socket reports: the next tick looks again.
    Nothing,
    /// Bytes to read from the side.
    Input,
    /// Room in the peer's send queue.
    Room,
}

pub(super) struct Pair<'a> {
    pub(super) splicer: &'a Splicer,
    /// Indexed by [`Side::index`].
    pub(super) sides: [SideState<'a>; 2],
    /// The bound its links and socket buffers are set for ([`Pair::set_bound`]).
    pub(super) bound: u64,
    /// The largest bound it was set for: the windows its sockets offered then may still be
    /// open, and a held queue may fill them ([`Pair::relieve_squeeze`]).
    pub(super) largest_bound: u64,
    /// [`sys::monotonic_coarse_ns`] when the pair was spliced.
    pub(super) started_ns: u64,
    /// A held side's peer drained since the last tick: look again soon.
    pub(super) draining: bool,
}

impl<'a> Pair<'a> {
    pub(super) fn side(&self, side: Side) -> &SideState<'a> {
        &self.sides[side.index()]
    }

    pub(super) fn side_mut(&mut self, side: Side) -> &mut SideState<'a> {
        &mut self.sides[side.index()]
    }

    pub(super) fn fd(&self, side: Side) -> BorrowedFd<'_> {
        self.side(side).sock.as_fd()
    }

    pub(super) fn counters(&self, side: Side) -> Result<TcpCounters, SpliceError> {
        sys::tcp_counters(self.fd(side)).map_err(SpliceError::Internal)
    }

    pub(super) fn flow(&self, side: Side) -> Result<Flow, SpliceError> {
        Ok(self.splicer.kernel.flow(self.side(side).cookie)?)
    }

    /// Bytes received on `side` that should be in the peer's send queue by now.
    pub(super) fn owed(&self, side: Side, flow: &Flow) -> u64 {
        self.side(side.other()).preface + flow.redirected + self.side(side).sent
    }

    /// Bytes of `side` the kernel has redirected and not yet written into the peer.
    pub(super) fn backlog(&self, side: Side, flow: &Flow) -> Result<u64, SpliceError> {
        let peer = side.other();
        let written = sys::bytes_written(self.fd(peer)).map_err(SpliceError::Internal)?;
        Ok(self.owed(side, flow).saturating_sub(written))
    }

    /// Bytes of `side` the kernel has redirected that the peer's reader has not yet
    /// acknowledged: the peer's backlog plus its send queue. This is what the bound limits.
    pub(super) fn unacked(&self, side: Side, flow: &Flow) -> Result<u64, SpliceError> {
        let acked = self.counters(side.other())?.bytes_acked;
        Ok(self.owed(side, flow).saturating_sub(acked))
    }

    pub(super) fn set_link(&self, side: Side) -> Result<(), SpliceError> {
        let i = side.index();
        Ok(self
            .splicer
            .kernel
            .set_link(self.sides[i].cookie, &self.sides[i].link)?)
    }

    /// Fails when the kernel dropped bytes `side` received (a redirect it refused, or a batch
    /// the verdict found out of sequence): the stream the peer gets is damaged, so the
    /// connection is aborted rather than ended as if complete.
    pub(super) fn intact(side: Side, flow: &Flow) -> Result<(), SpliceError> {
        if flow.failed == 0 {
            return Ok(());
        }
        Err(SpliceError::Dropped {
            side: side.name(),
            bytes: flow.failed,
        })
    }

    /// How long until the pair has been idle for `timeout`: zero when it has. The verdict
    /// stamps each socket's flow with the time of its last received bytes, on the same clock.
    pub(super) fn idle_left(&self, timeout: Duration) -> Result<Duration, SpliceError> {
        let mut last = self.started_ns;
        for side in [Side::Client, Side::Backend] {
            last = last.max(self.flow(side)?.last_active_ns);
        }
        let idle = Duration::from_nanos(sys::monotonic_coarse_ns().saturating_sub(last));
        Ok(timeout.saturating_sub(idle))
    }

    /// Whatever a timer tick can move forward. Returns whether something still waits.
    pub(super) fn on_tick(&mut self) -> Result<bool, SpliceError> {
        let mut waiting = false;
        for side in [Side::Client, Side::Backend] {
            let i = side.index();
            if self.sides[i].done {
                continue;
            }
            if self.sides[i].eof {
                self.sides[i].done = self.forward_fin(side)?;
                waiting |= !self.sides[i].done;
            } else if self.sides[i].outside {
                // It cannot go back into RECV (a socket only enters a socket map while fully
                // established, and this one has half-closed since it was held): userspace
                // moves what it receives until its FIN.
                let (own, flow) = (self.counters(side)?, self.flow(side)?);
                if self.carry(side, self.not_redirected(side, &own, &flow))? {
                    // All it received so far is moved: the next bytes wake the carry.
                    self.sides[i].waits = Waits::Input;
                }
                waiting = true;
            } else if self.sides[i].held {
                waiting |= !self.release(side)?;
            }
        }
        Ok(waiting)
    }

    /// Watches each socket for what a carry waits for: input on one whose bytes userspace
    /// carries and holds none of, room on one whose peer's carry holds bytes it could not
    /// write. Room is asked again after every stop: the kernel reports room only to a socket
    /// a write or a poll found full, and the carry's writes stop short of that.
    pub(super) fn watch_carries(&mut self, watch: &LocalWatch) -> Result<(), SpliceError> {
        for side in [Side::Client, Side::Backend] {
            let mut want = 0;
            if self.side(side).waits == Waits::Input {
                want |= ev::IN;
            }
            if self.side(side.other()).waits == Waits::Room {
                want |= ev::OUT;
            }
            let s = &self.sides[side.index()];
            if want != s.interest || want & ev::OUT != 0 {
                watch
                    .modify(s.sock.as_fd(), s.cookie, want)
                    .map_err(SpliceError::Internal)?;
                self.sides[side.index()].interest = want;
            }
        }
        Ok(())
    }
}
