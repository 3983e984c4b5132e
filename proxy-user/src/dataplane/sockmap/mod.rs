//! One spliced connection on the sockmap data plane: set-up, the life of the pair, and
//! tear-down. While bytes flow, userspace neither reads nor writes them; it reacts to what the
//! kernel reports and makes up for what the kernel does not do by itself (`docs/design.md`
//! says why each is needed):
//! - bytes queued before a socket enters the map: each socket is poked once it is in;
//! - FIN: passed on once every byte before it is in the peer's send queue ([`end`]);
//! - backpressure: a side whose peer has more than the bound unacknowledged is held
//!   ([`hold`]);
//! - the redirect worker's tick-long sleep on a full send queue: each spliced socket's send
//!   buffer is the bound ([`super::Plane::send_buffer`]), which holds keep from filling;
//! - a side that cannot enter, or go back into, the maps: userspace moves the rest of its
//!   direction, counted in `moved_bytes`;
//! - resets are passed on as resets, and a stream the kernel damaged is aborted with resets
//!   on both sides, never ended as if complete.

mod drive;
mod end;
pub mod handover;
mod hold;
mod pair;
mod pending;

use std::{
    net::TcpStream,
    os::fd::AsFd,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use proxy_common::Link;
use tokio::sync::{mpsc, watch};

use self::{
    end::write_all,
    pair::{Pair, SideState},
};
use super::{
    Outcome, Phase, SpliceError,
    budget::Budget,
    gate::{Gate, Running},
    kernel::{Kernel, MapOpError},
};
use crate::{
    faults::{self, Fault},
    sys,
    watch::{LocalWatch, Registry, Side, SockEvent, Watcher},
};

/// Shared by every spliced connection.
pub struct Splicer {
    /// Unique across an upgrade chain's processes ([`handover::PairSnapshot::kernel`]).
    id: u64,
    handover: Gate,
    pub kernel: Kernel,
    pub registry: Arc<Registry>,
    pub watcher: Watcher,
    /// The bound on bytes of one direction of one connection that the kernel has taken from
    /// the sender and the receiver has not acknowledged (the redirect backlog and the send
    /// queue), as the buffer budget sets it for the connections live ([`Pair::set_bound`]).
    pub budget: Arc<Budget>,
    /// Bytes userspace moved itself (the ends of streams described above).
    pub moved_bytes: AtomicU64,
    /// Times a socket was held because its peer was slow.
    pub holds: AtomicU64,
    /// Times a held socket's receive buffer was raised because its queue had outgrown it
    /// (see [`Pair::relieve_squeeze`]), and times that was refused at its limit.
    pub squeezes_relieved: AtomicU64,
    pub squeezes_refused: AtomicU64,
    /// A connection with no byte received on either socket for this long is closed.
    pub idle_timeout: Option<Duration>,
}

/// What the operator sets for the sockmap plane.
#[derive(Clone, Debug)]
pub struct Settings {
    /// See [`Splicer::budget`].
    pub budget: Arc<Budget>,
    /// See [`Splicer::idle_timeout`].
    pub idle_timeout: Option<Duration>,
    /// Whether the `sk_msg` program counts what enters each spliced socket's send path.
    pub egress_audit: bool,
}

impl Splicer {
    /// Loads the kernel programs and starts the reader of kernel events; each thread that
    /// splices starts its watcher of socket events at its first connection.
    pub fn load(settings: Settings) -> Result<Self, super::kernel::LoadError> {
        let egress_audit = settings.egress_audit;
        let registry = Arc::new(Registry::default());
        let kernel = Kernel::load(Arc::clone(&registry), egress_audit)?;
        let watcher = Watcher::new(Arc::clone(&registry));
        Ok(Self::with_kernel(
            settings,
            handover::new_id(),
            kernel,
            registry,
            watcher,
        ))
    }

    fn with_kernel(
        settings: Settings,
        id: u64,
        kernel: Kernel,
        registry: Arc<Registry>,
        watcher: Watcher,
    ) -> Self {
        Self {
            id,
            handover: Gate::default(),
            kernel,
            registry,
            watcher,
            budget: settings.budget,
            moved_bytes: AtomicU64::new(0),
            holds: AtomicU64::new(0),
            squeezes_relieved: AtomicU64::new(0),
            squeezes_refused: AtomicU64::new(0),
            idle_timeout: settings.idle_timeout,
        }
    }
}

/// A client's socket and its machine's, connected, handed to [`Splicer::run`].
pub struct Sockets {
    pub client: TcpStream,
    pub backend: TcpStream,
    /// Their cookies, client first.
    pub cookies: [u64; 2],
    /// Neither was read from or written to before: what each carried before the splice is
    /// nothing, and the kernel is not asked.
    pub fresh: bool,
}

/// What became of a pair handed to [`Splicer::run`].
pub enum Spliced {
    /// The connection was spliced and has ended.
    Done(Result<Outcome, SpliceError>),
    /// The kernel would not take the sockets (one had already received FIN, or the kernel
    /// is being handed over); nothing was forwarded, and the caller should copy them.
    Refused(TcpStream, TcpStream),
    /// Stopped for an upgrade's new process, which the caller hands it to.
    HandedOver(Box<handover::HandedPair>),
}

/// How a pair's loop ended, as [`Splicer::finish`] leaves it.
enum Finished {
    HandOver(Box<handover::PairSnapshot>, [Vec<u8>; 2]),
    Close(Result<Outcome, SpliceError>),
}

/// First and last wait between checks while a direction is held or ending.
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(20);
/// Largest read when userspace moves bytes, and the size asked of the pipe they go through
/// (`fs.pipe-max-size`'s default).
const MOVE_CHUNK: usize = 1024 * 1024;

impl Splicer {
    /// Splices `client` and `backend` until both directions end, one side fails, or the
    /// daemon's grace period runs out.
    pub async fn run(
        &self,
        sockets: Sockets,
        service: u32,
        preface: &[u8],
        mut phase: watch::Receiver<Phase>,
    ) -> Spliced {
        let Some(running) = self.handover.enter() else {
            return Spliced::Refused(sockets.client, sockets.backend);
        };
        let cookies = sockets.cookies;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut pair = match self.pair(&sockets, service, preface.len() as u64) {
            Ok(pair) => pair,
            Err(e) => return Spliced::Done(Err(SpliceError::Internal(e))),
        };
        let watch = match self.watcher.local() {
            Ok(watch) => watch,
            Err(e) => return Spliced::Done(Err(SpliceError::Internal(e))),
        };
        let mut refused = false;
        let result = async {
            if !self.enter(&mut pair, &watch, preface, &tx).await? {
                refused = true;
                return Ok(Outcome::Completed);
            }
            drive::drive(&mut pair, &watch, &mut rx, &mut phase).await
        }
        .await;
        if refused {
            drop(pair);
            for cookie in cookies {
                self.registry.remove(cookie);
            }
            let Sockets {
                client, backend, ..
            } = sockets;
            for s in [&client, &backend] {
                watch.delete(s.as_fd()).ok();
            }
            self.kernel.forget(&cookies);
            return Spliced::Refused(client, backend);
        }
        let finished = self.finish(pair, &watch, result, service);
        let Sockets {
            client, backend, ..
        } = sockets;
        self.close(finished, client, backend, cookies, running)
    }

    /// After a pair's loop: its state when it stopped to be handed over; else, with resets
    /// unless it ended cleanly, the end of its sockets' registrations.
    fn finish(
        &self,
        mut pair: Pair<'_>,
        watch: &LocalWatch,
        mut result: Result<Outcome, SpliceError>,
        service: u32,
    ) -> Finished {
        let cookies = pair.sides.each_ref().map(|s| s.cookie);
        for cookie in cookies {
            self.registry.remove(cookie);
        }
        if let Ok(Outcome::HandedOver) = result {
            // The sockets stay open and in the maps: the new process holds them next. A pair
            // whose carried bytes cannot be read back is reset instead.
            match pair.snapshot(self.id, service) {
                Ok((snapshot, pending)) => {
                    for side in [Side::Client, Side::Backend] {
                        watch.delete(pair.fd(side)).ok();
                    }
                    return Finished::HandOver(Box::new(snapshot), pending);
                }
                Err(e) => result = Err(SpliceError::Internal(e)),
            }
        }
        if !matches!(result, Ok(Outcome::Completed | Outcome::Idle))
            && !faults::active(Fault::FinNotReset)
        {
            // Abortive close: the peers see a reset, not a clean end of a truncated stream.
            for side in [Side::Client, Side::Backend] {
                socket2::SockRef::from(&pair.fd(side))
                    .set_linger(Some(Duration::ZERO))
                    .ok();
            }
        }
        Finished::Close(result)
    }

    /// Hands the sockets on with the pair's state, or closes them (which takes them out of
    /// the socket maps and the watcher's epoll) and removes the pair's other entries.
    /// `running`: the pair's count among this splicer's, kept by a pair handed on until it
    /// is sent.
    fn close(
        &self,
        finished: Finished,
        client: TcpStream,
        backend: TcpStream,
        cookies: [u64; 2],
        running: Running,
    ) -> Spliced {
        match finished {
            Finished::HandOver(snapshot, pending) => {
                Spliced::HandedOver(Box::new(handover::HandedPair {
                    client,
                    backend,
                    snapshot: *snapshot,
                    pending,
                    _counted: Some(running),
                }))
            }
            Finished::Close(result) => {
                drop((client, backend));
                let forget = if faults::active(Fault::LeakEntry) {
                    &cookies[1..]
                } else {
                    &cookies[..]
                };
                self.kernel.forget_closed(forget);
                Spliced::Done(result)
            }
        }
    }

    /// The state of a pair about to enter the maps; `preface`: the length of what is written
    /// into the backend's socket before the client's bytes.
    fn pair<'a>(
        &'a self,
        sockets: &'a Sockets,
        service: u32,
        preface: u64,
    ) -> std::io::Result<Pair<'a>> {
        // Bytes each socket had written and read before the splice: nothing on a fresh
        // connection; on an upgraded one, the HTTP exchange that precedes the stream the
        // kernel moves.
        let before = |s: &TcpStream| -> std::io::Result<(u64, u64)> {
            if sockets.fresh {
                return Ok((0, 0));
            }
            Ok((sys::bytes_written(s.as_fd())?, sys::bytes_read(s.as_fd())?))
        };
        let (client_before, backend_before) = (before(&sockets.client)?, before(&sockets.backend)?);
        let backend_written = backend_before.0 + preface;
        let bound = self.budget.bound();
        let link = |peer, side: Side| Link {
            peer_cookie: peer,
            // No check point: the hold program keeps the bound by itself (`max_unacked`) and
            // tells of each hold it makes, so a flow that stays within it wakes nobody.
            check_at: u64::MAX,
            max_unacked: if faults::active(Fault::NoBound) {
                0
            } else {
                bound
            },
            // What is in each peer's send queue ahead of this socket's bytes (the header).
            owed_base: match side {
                Side::Client => backend_written,
                Side::Backend => client_before.0,
            },
            service,
            side: match side {
                Side::Client => proxy_common::Side::CLIENT,
                Side::Backend => proxy_common::Side::BACKEND,
            },
            ..Link::default()
        };
        let cookies = sockets.cookies;
        Ok(Pair {
            splicer: self,
            sides: [
                SideState::new(
                    &sockets.client,
                    cookies[0],
                    link(cookies[1], Side::Client),
                    client_before.0,
                    client_before.1,
                ),
                SideState::new(
                    &sockets.backend,
                    cookies[1],
                    link(cookies[0], Side::Backend),
                    backend_written,
                    backend_before.1,
                ),
            ],
            bound,
            largest_bound: bound,
            started_ns: sys::monotonic_coarse_ns(),
            draining: false,
        })
    }

    /// Puts a pair's sockets in the maps and lets their bytes flow, the PROXY protocol header
    /// first. Returns `false`, having forwarded nothing, when the kernel would not take a
    /// socket (it had already received FIN).
    async fn enter(
        &self,
        pair: &mut Pair<'_>,
        watch: &LocalWatch,
        preface: &[u8],
        tx: &mpsc::UnboundedSender<SockEvent>,
    ) -> Result<bool, SpliceError> {
        let cookies = pair.sides.each_ref().map(|s| s.cookie);
        for side in [Side::Client, Side::Backend] {
            let cookie = cookies[side.index()];
            self.registry.add(cookie, side, tx.clone());
            watch
                .add(pair.fd(side), cookie)
                .map_err(SpliceError::Internal)?;
        }
        self.kernel
            .add_links(pair.sides.each_ref().map(|s| (s.cookie, s.link)))?;
        for side in [Side::Client, Side::Backend] {
            match self.kernel.add_socket(cookies[side.index()], pair.fd(side)) {
                Ok(()) => {}
                Err(e) if e.is_state_refusal() => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        // Before the client's socket enters RECV: ahead of every byte of the client.
        write_all(pair.side(Side::Backend).sock, preface).await?;
        for side in [Side::Client, Side::Backend] {
            match self
                .kernel
                .start_receive(cookies[side.index()], pair.fd(side))
            {
                Ok(()) => sys::poke_receive(pair.fd(side)).map_err(SpliceError::Internal)?,
                // FIN arrived since the socket entered SOCKS: userspace carries its rest.
                Err(e) if e.is_state_refusal() => pair.side_mut(side).outside = true,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

impl From<MapOpError> for SpliceError {
    fn from(e: MapOpError) -> Self {
        Self::Map(e)
    }
}
