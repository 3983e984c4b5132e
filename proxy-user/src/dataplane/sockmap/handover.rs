//! Handing spliced connections to the process that takes over at an upgrade: each stops
//! between two events of its loop ([`super::Phase::HandOver`]), and its sockets, the state of
//! both directions and the bytes userspace held of them go to the new process, which resumes
//! it on the same maps ([`Splicer::adopt`], [`Splicer::resume`]). docs/design.md says why
//! the kernel's objects go with them, and in which order.

use std::{
    net::TcpStream,
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{
    Settings, SpliceError, Splicer, drive,
    pair::{Pair, SideState},
    pending::Pending,
};
use crate::{
    dataplane::{
        Phase,
        gate::Running,
        kernel::{Kernel, KernelFds, LoadError},
    },
    sys,
    watch::{Registry, Side, Watcher},
};

/// One direction's state, as [`SideState`] keeps it, without the bytes userspace holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts about one direction, as in SideState"
)]
pub struct SideSnapshot {
    preface: u64,
    read_before: u64,
    eof: bool,
    done: bool,
    held: bool,
    released: u64,
    held_unacked: u64,
    outside: bool,
    moved: u64,
    sent: u64,
    /// Bytes userspace holds, sent after the record.
    pub pending: usize,
    buffer_before_squeeze: Option<u64>,
    squeeze_refused: bool,
    drops_seen: u64,
}

/// A spliced connection's state: everything but its sockets and the bytes userspace holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PairSnapshot {
    /// The splicer it ran on ([`Splicer::id`]): the new process resumes it on that kernel.
    pub kernel: u64,
    pub cookies: [u64; 2],
    pub service: u32,
    started_ns: u64,
    pub sides: [SideSnapshot; 2],
}

/// A connection stopped for a handover: its sockets, its state, and the bytes userspace held
/// of each direction. Counted among its splicer's pairs until dropped (once sent).
pub struct HandedPair {
    pub client: TcpStream,
    pub backend: TcpStream,
    pub snapshot: PairSnapshot,
    pub pending: [Vec<u8>; 2],
    pub(super) _counted: Option<Running>,
}

impl HandedPair {
    /// Its two sockets, client first, as they are sent.
    pub fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 2] {
        [self.client.as_fd(), self.backend.as_fd()]
    }

    /// Makes the close of both sockets a reset: a pair that could not be handed over.
    pub fn reset(&self) {
        sys::reset_on_close(self.fds());
    }

    /// A pair received from the process that handed it over.
    pub fn new(
        client: TcpStream,
        backend: TcpStream,
        snapshot: PairSnapshot,
        pending: [Vec<u8>; 2],
    ) -> Self {
        Self {
            client,
            backend,
            snapshot,
            pending,
            _counted: None,
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A splicer's id, unique across the processes of an upgrade chain (the pid in the upper
/// half).
pub(super) fn new_id() -> u64 {
    (u64::from(std::process::id()) << 32) | NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl SideState<'_> {
    fn snapshot(&mut self) -> std::io::Result<(SideSnapshot, Vec<u8>)> {
        let pending = self.pending.take_bytes()?;
        Ok((
            SideSnapshot {
                preface: self.preface,
                read_before: self.read_before,
                eof: self.eof,
                done: self.done,
                held: self.held,
                released: self.released,
                held_unacked: self.held_unacked,
                outside: self.outside,
                moved: self.moved,
                sent: self.sent,
                pending: pending.len(),
                buffer_before_squeeze: self.buffer_before_squeeze,
                squeeze_refused: self.squeeze_refused,
                drops_seen: self.drops_seen,
            },
            pending,
        ))
    }
}

impl<'a> SideState<'a> {
    fn restore(
        sock: &'a TcpStream,
        cookie: u64,
        link: proxy_common::Link,
        s: &SideSnapshot,
        pending: Vec<u8>,
    ) -> Self {
        let mut side = Self::new(sock, cookie, link, s.preface, s.read_before);
        side.eof = s.eof;
        side.done = s.done;
        side.held = s.held;
        side.released = s.released;
        side.held_unacked = s.held_unacked;
        side.outside = s.outside;
        side.moved = s.moved;
        side.sent = s.sent;
        side.pending = Pending::from_bytes(pending);
        side.buffer_before_squeeze = s.buffer_before_squeeze;
        side.squeeze_refused = s.squeeze_refused;
        side.drops_seen = s.drops_seen;
        side
    }
}

impl Pair<'_> {
    pub(super) fn snapshot(
        &mut self,
        kernel: u64,
        service: u32,
    ) -> std::io::Result<(PairSnapshot, [Vec<u8>; 2])> {
        let cookies = self.sides.each_ref().map(|s| s.cookie);
        let [a, b] = self.sides.each_mut().map(SideState::snapshot);
        let ((a, pa), (b, pb)) = (a?, b?);
        Ok((
            PairSnapshot {
                kernel,
                cookies,
                service,
                started_ns: self.started_ns,
                sides: [a, b],
            },
            [pa, pb],
        ))
    }
}

impl Splicer {
    /// This splicer's id, which a handed pair names ([`PairSnapshot::kernel`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Refuses new pairs from now on; those refused are copied by the caller.
    pub fn stop_taking(&self) {
        self.handover.close();
    }

    /// Pairs in their loop now, or stopped and not yet sent.
    pub fn running(&self) -> usize {
        self.handover.running()
    }

    /// Once no pair runs: stops reading the ring buffer, and gives copies of the kernel's
    /// descriptors; the programs stay attached when this process exits.
    pub async fn give_kernel(&self) -> std::io::Result<KernelFds> {
        self.kernel.stop_events().await;
        let fds = self.kernel.handover_fds()?;
        self.kernel.leave_attached();
        Ok(fds)
    }

    /// A splicer over the kernel another process handed over ([`Self::give_kernel`]), with
    /// the id it had there.
    pub fn adopt(settings: Settings, id: u64, fds: KernelFds) -> Result<Self, LoadError> {
        let registry = Arc::new(Registry::default());
        let kernel = Kernel::adopt(fds, Arc::clone(&registry))?;
        let watcher = Watcher::new(Arc::clone(&registry));
        Ok(Self::with_kernel(settings, id, kernel, registry, watcher))
    }

    /// Serves a pair another process handed over until both directions end, as
    /// [`Self::run`] does after set-up. Events of its sockets may have gone to nobody while
    /// it changed hands, so both flows are looked at once first.
    pub async fn resume(
        &self,
        handed: HandedPair,
        mut phase: watch::Receiver<Phase>,
    ) -> super::Spliced {
        let HandedPair {
            client,
            backend,
            snapshot,
            pending,
            ..
        } = handed;
        let cookies = snapshot.cookies;
        let [pa, pb] = pending;
        let link = |c| self.kernel.link(c).map_err(SpliceError::from);
        let (la, lb) = match (link(cookies[0]), link(cookies[1])) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return super::Spliced::Done(Err(e)),
        };
        let watch = match self.watcher.local() {
            Ok(watch) => watch,
            Err(e) => return super::Spliced::Done(Err(SpliceError::Internal(e))),
        };
        let running = self.handover.count();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bound = match la.max_unacked {
            0 => self.budget.bound(),
            set => set,
        };
        let mut pair = Pair {
            splicer: self,
            sides: [
                SideState::restore(&client, cookies[0], la, &snapshot.sides[0], pa),
                SideState::restore(&backend, cookies[1], lb, &snapshot.sides[1], pb),
            ],
            // The bound the old process set; `drive` sets this process's.
            bound,
            largest_bound: bound,
            started_ns: snapshot.started_ns,
            draining: false,
        };
        let result = async {
            for side in [Side::Client, Side::Backend] {
                self.registry.add(cookies[side.index()], side, tx.clone());
                watch
                    .add(pair.fd(side), cookies[side.index()])
                    .map_err(SpliceError::Internal)?;
            }
            for side in [Side::Client, Side::Backend] {
                if !pair.side(side).eof {
                    pair.on_pressure(side)?;
                }
            }
            drive::drive(&mut pair, &watch, &mut rx, &mut phase).await
        }
        .await;
        let finished = self.finish(pair, &watch, result, snapshot.service);
        self.close(finished, client, backend, cookies, running)
    }
}

/// The bytes of `pending` sent after a connection's record, in records of at most this.
pub const PENDING_CHUNK: usize = 60 * 1024;

/// Sends `pending`'s bytes on `sock` in records of [`PENDING_CHUNK`].
pub fn send_pending(
    sock: std::os::fd::BorrowedFd<'_>,
    pending: &[Vec<u8>; 2],
) -> std::io::Result<()> {
    for bytes in pending {
        for chunk in bytes.chunks(PENDING_CHUNK) {
            sys::send_record(sock, chunk, &[])?;
        }
    }
    Ok(())
}

/// Receives the bytes [`send_pending`] sent, `lengths` of them each way.
pub fn recv_pending(
    sock: std::os::fd::BorrowedFd<'_>,
    lengths: [usize; 2],
) -> std::io::Result<[Vec<u8>; 2]> {
    let mut out = [Vec::new(), Vec::new()];
    let mut buf = vec![0u8; PENDING_CHUNK];
    for (i, length) in lengths.into_iter().enumerate() {
        while out[i].len() < length {
            let (n, _) = sys::recv_record(sock, &mut buf)?;
            if n == 0 {
                return Err(std::io::Error::other(
                    "the old process went away mid-connection",
                ));
            }
            out[i].extend_from_slice(&buf[..n]);
        }
    }
    Ok(out)
}
