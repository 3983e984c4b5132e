//! The two data planes and what they share: `sockmap` (the kernel moves the bytes) and
//! `copy` (tokio moves them), chosen once at start-up.

pub mod budget;
pub mod cgroup;
pub mod copy;
mod events;
pub mod gate;
pub mod kernel;
pub mod probe;
pub mod sockmap;

use crate::watch::Side;

/// The data plane in place, shared by every connection.
pub enum Plane {
    /// The kernel moves the bytes.
    Sockmap(Box<sockmap::Splicer>),
    /// Userspace moves the bytes.
    Copy,
}

impl Plane {
    /// Puts the data plane `choice` in place. The kernel is probed first ([`probe::Support`]):
    /// a missing feature is named in one message. `Auto` then falls back to copy, with a
    /// warning, as it does when the programs cannot load; `Sockmap` fails.
    pub fn start(
        choice: DataplaneChoice,
        settings: sockmap::Settings,
    ) -> Result<Self, kernel::LoadError> {
        let load = || {
            let support = probe::Support::probe(false);
            tracing::debug!(?support, "kernel probed");
            support
                .sockmap_ready()
                .map_err(kernel::LoadError::Unsupported)?;
            sockmap::Splicer::load(settings)
        };
        match choice {
            DataplaneChoice::Copy => {
                tracing::info!("copy data plane chosen: userspace moves every byte");
                Ok(Self::Copy)
            }
            DataplaneChoice::Sockmap => load().map(|s| Self::Sockmap(Box::new(s))),
            DataplaneChoice::Auto => match load() {
                Ok(splicer) => Ok(Self::Sockmap(Box::new(splicer))),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "!!! the sockmap data plane cannot run here: FALLING BACK TO THE COPY \
                         DATA PLANE. Userspace will move every byte; use --dataplane sockmap to \
                         fail instead, `spliced check --kernel` for what this kernel supports !!!"
                    );
                    Ok(Self::Copy)
                }
            },
        }
    }

    /// The send buffer, in bytes of payload, of each proxied socket on this plane. On the copy
    /// plane, half the bound, as the receive buffer. On the sockmap plane, the whole bound: the
    /// kernel's redirect worker sleeps a scheduler tick whenever it finds the socket not
    /// writable (less than half its send buffer free), and holds keep what the peer has not
    /// acknowledged near the bound, so a send buffer of the bound is seldom found so
    /// (docs/design.md).
    pub fn send_buffer(&self, bound: u64) -> u64 {
        match self {
            Self::Sockmap(_) => bound,
            Self::Copy => bound / 2,
        }
    }

    /// `sockmap` or `copy`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sockmap(_) => "sockmap",
            Self::Copy => "copy",
        }
    }
}

/// Sets what every proxied socket needs once established, on both planes:
/// - no Nagle delay: bytes are forwarded as they come;
/// - the send buffer fixed at `send_buffer` bytes of payload ([`Plane::send_buffer`]);
/// - the receive buffer fixed at [`receive_buffer`] bytes of kernel memory (`SO_RCVBUF`,
///   which also stops the kernel's autotuning of it): bytes a sender pushes while their
///   reader is slow wait there, so the host's `tcp_rmem` must not set how many (up to 32 MiB
///   on some hosts).
///
/// Called once the socket is established, never on a listener or before `connect`
/// (docs/design.md says why).
pub fn tune_socket(
    s: &impl std::os::fd::AsFd,
    bound: u64,
    send_buffer: u64,
) -> std::io::Result<()> {
    let fd = s.as_fd();
    crate::sys::set_no_delay(fd)?;
    set_buffers(fd, bound, send_buffer)
}

/// Sets a proxied socket's send buffer at `send_buffer` bytes of payload and its receive
/// buffer at [`receive_buffer`]`(bound)` of kernel memory: at set-up ([`tune_socket`]) and
/// when the buffer budget changes the bound of the live connections.
pub fn set_buffers(
    fd: std::os::fd::BorrowedFd<'_>,
    bound: u64,
    send_buffer: u64,
) -> std::io::Result<()> {
    crate::sys::set_send_buffer(fd, send_buffer)?;
    // The kernel doubles the value for its overhead.
    crate::sys::set_receive_buffer(fd, receive_buffer(bound) / 2)
}

/// Sets a live connection's socket for a new bound: its send buffer at once, its receive
/// buffer as [`set_receive_when_room`] does. Returns whether the receive buffer was set.
pub fn retune(
    fd: std::os::fd::BorrowedFd<'_>,
    bound: u64,
    send_buffer: u64,
) -> std::io::Result<bool> {
    crate::sys::set_send_buffer(fd, send_buffer)?;
    set_receive_when_room(fd, bound)
}

/// Sets a live socket's receive buffer for `bound` when it grows, or when what its queue
/// holds is within a quarter of the smaller one. A queue past its buffer drops what arrives,
/// and the kernel then retracts the window it offered (docs/design.md), so a socket whose
/// reader has stopped keeps its buffer until it has read. Returns whether it was set.
pub fn set_receive_when_room(fd: std::os::fd::BorrowedFd<'_>, bound: u64) -> std::io::Result<bool> {
    let buffer = receive_buffer(bound);
    let memory = crate::sys::receive_memory(fd)?;
    if buffer < memory.buffer && memory.held > buffer / 4 {
        return Ok(false);
    }
    crate::sys::set_receive_buffer(fd, buffer / 2)?;
    Ok(true)
}

/// Kernel memory of every proxied socket's receive buffer: half as much again as the bound.
/// TCP offers a window of what the buffer holds at the payload-to-memory ratio it last
/// measured; segments that carry more overhead than that (merged segments on veth, a mix of
/// sizes) fill the buffer before the window, and the last ones are dropped for memory, which
/// costs the sender a retransmission timeout. The extra half takes that difference.
pub fn receive_buffer(bound: u64) -> u64 {
    bound + bound / 2
}

/// Which data plane the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneChoice {
    /// sockmap when the kernel programs load, else copy with a warning.
    Auto,
    /// sockmap or nothing.
    Sockmap,
    /// userspace copy.
    Copy,
}

/// The life stage of the daemon, as connection tasks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Normal operation.
    Serve,
    /// Not accepting: an upgrade's new process serves. Each connection on the sockmap plane
    /// stops where it is and is handed to it; the others may finish here.
    HandOver,
    /// Not accepting; live connections may finish.
    Drain,
    /// The grace period is over: close what is left.
    Abort,
}

/// How a connection ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions ended with FIN after their last byte.
    Completed,
    /// Closed by the daemon at the end of the grace period.
    Aborted,
    /// Closed by the daemon after no byte moved either way for the idle timeout.
    Idle,
    /// Handed, open, to the process that took over at an upgrade.
    HandedOver,
}

/// Why a connection ended with an error, by where the error came from.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("client: {0}")]
    Client(#[source] std::io::Error),
    #[error("backend: {0}")]
    Backend(#[source] std::io::Error),
    #[error("peer reset: {0}")]
    Peer(#[source] std::io::Error),
    #[error("{0} closed without end of stream")]
    Closed(&'static str),
    #[error("the kernel dropped {bytes} bytes received from the {side} (stream fault)")]
    Dropped { side: &'static str, bytes: u64 },
    #[error("kernel map: {0}")]
    Map(#[source] kernel::MapOpError),
    #[error("internal: {0}")]
    Internal(#[source] std::io::Error),
}

impl SpliceError {
    pub fn closed(side: Side) -> Self {
        Self::Closed(side.name())
    }
}
