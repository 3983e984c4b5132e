//! The userspace data plane: tokio copies bytes between the two sockets. It is the fallback
//! where the kernel programs cannot load, and the reference the sockmap plane is tested
//! against. Each direction holds at most one buffer of `COPY_BUFFER` bytes in the daemon, so
//! a slow reader holds its sender back through TCP flow control; and it holds that buffer
//! only while bytes flow: a direction whose socket has nothing to read gives it back, so an
//! idle connection costs no buffer.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Interest},
    net::TcpStream,
    sync::watch,
    time::Instant,
};

use super::{Outcome, Phase, SpliceError, gate::Running};
use crate::{
    faults::{self, Fault},
    sys::ktls,
};

/// Bytes buffered in the daemon per direction.
pub const COPY_BUFFER: usize = 64 * 1024;

/// What a copied connection's socket buffers were set for, and the bound the buffer budget
/// gives from then on ([`super::budget`]): each change sets them again ([`super::retune`]).
pub struct Tuned {
    pub bound: watch::Receiver<u64>,
    /// The bound the sockets were set for; 0 when not known (a connection taken over in an
    /// upgrade), which sets them at once.
    pub set_for: u64,
}

/// How soon a socket whose receive buffer could not shrink yet is looked at again, first and
/// at most (the wait doubles: a reader may stay stopped for long).
const RETUNE_RETRY: Duration = Duration::from_millis(100);
const RETUNE_RETRY_MAX: Duration = Duration::from_secs(5);

/// A connection the copy plane carries: its two sockets and the state of each direction,
/// client to backend first. Between two awaits of its copy the state is whole, so the copy
/// can stop at any of them and go on from the state, here or in the process an upgrade
/// starts ([`Self::snapshot`], [`Self::resume`]).
pub struct CopyPair {
    pub client: TcpStream,
    pub backend: TcpStream,
    /// How the client's stream is read and ended.
    client_framing: Framing,
    directions: [Direction; 2],
}

/// One direction: the bytes read and not yet written, and how far its end got.
#[derive(Default)]
struct Direction {
    /// The bytes read; `buf[start..end]` are not yet written. Given back while the
    /// direction waits for input, so an idle connection costs no buffer.
    buf: Option<Vec<u8>>,
    start: usize,
    end: usize,
    /// The stream read ended.
    eof: bool,
    /// And its end was passed on.
    done: bool,
    faulty: FaultyStream,
}

/// A direction's state as an upgrade hands it over, without its bytes.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy)]
pub struct DirectionSnapshot {
    /// Bytes read and not yet written, sent after the record.
    pub pending: usize,
    pub eof: bool,
    pub done: bool,
}

impl CopyPair {
    pub fn new(client: TcpStream, backend: TcpStream) -> Self {
        Self {
            client,
            backend,
            client_framing: Framing::Bytes,
            directions: Default::default(),
        }
    }

    /// A pair whose client socket carries kernel TLS: its plaintext is read and written as
    /// on a bare socket; TLS's `close_notify` (or a FIN) ends its stream, and the end of the
    /// backend's is `close_notify` then FIN. Any other alert, or a record of the handshake (a
    /// key update, which the kernel cannot take), fails the connection.
    pub fn kernel_tls(client: TcpStream, backend: TcpStream) -> Self {
        Self {
            client_framing: Framing::KernelTls,
            ..Self::new(client, backend)
        }
    }

    /// Whether its client socket carries kernel TLS (the session's state is the socket's, so
    /// it goes where the socket goes).
    pub fn is_kernel_tls(&self) -> bool {
        matches!(self.client_framing, Framing::KernelTls)
    }

    /// A pair stopped as [`Self::snapshot`] describes it, with the bytes it held; `kernel_tls`
    /// as [`Self::is_kernel_tls`] said.
    pub fn resume(
        (client, backend): (TcpStream, TcpStream),
        kernel_tls: bool,
        snapshots: [DirectionSnapshot; 2],
        pending: [Vec<u8>; 2],
    ) -> Self {
        let mut pending = pending.into_iter();
        let directions = snapshots.map(|s| {
            let bytes = pending.next().unwrap_or_default();
            Direction {
                start: 0,
                end: bytes.len(),
                buf: (!bytes.is_empty()).then_some(bytes),
                eof: s.eof,
                done: s.done,
                faulty: FaultyStream::default(),
            }
        });
        let client_framing = if kernel_tls {
            Framing::KernelTls
        } else {
            Framing::Bytes
        };
        Self {
            client,
            backend,
            client_framing,
            directions,
        }
    }

    /// Each direction's state and the bytes it read and has not written.
    pub fn snapshot(&self) -> ([DirectionSnapshot; 2], [Vec<u8>; 2]) {
        let pending = self.directions.each_ref().map(|d| {
            d.buf
                .as_ref()
                .map_or_else(Vec::new, |b| b[d.start..d.end].to_vec())
        });
        let snapshots = self.directions.each_ref().map(|d| DirectionSnapshot {
            pending: d.end - d.start,
            eof: d.eof,
            done: d.done,
        });
        (snapshots, pending)
    }

    /// Its two sockets, client first.
    pub fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 2] {
        [self.client.as_fd(), self.backend.as_fd()]
    }

    /// Makes the close of both sockets a reset.
    pub fn reset(&self) {
        crate::sys::reset_on_close(self.fds());
    }
}

/// How a copy ended: done, or stopped for an upgrade's handover.
pub enum Copied {
    Done(Result<Outcome, SpliceError>),
    /// Stopped whole between two awaits, to be sent to the new process; counted in the
    /// handover's gate until dropped.
    HandedOver(Box<CopyPair>, Running),
}

/// Copies both ways until both directions end, one side fails, the grace period ends, or no
/// byte has moved for `idle_timeout`. An end of stream on one side becomes a shutdown of the
/// other side's writing half once every byte before it was written. Each socket's buffers are
/// fixed ([`super::tune_socket`]): what waits for a slow reader stays within both and one
/// [`COPY_BUFFER`]. With `handover` (the pair counted in the upgrade's gate), the copy stops
/// at [`Phase::HandOver`] and the pair is given back; without, it goes on to its end.
pub async fn run(
    pair: CopyPair,
    phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
    handover: Option<Running>,
    tuned: Tuned,
) -> Copied {
    let mut pair = pair;
    let result = run_framed(&mut pair, phase, idle_timeout, handover.is_some(), tuned).await;
    match (result, handover) {
        (Ok(Outcome::HandedOver), Some(running)) => Copied::HandedOver(Box::new(pair), running),
        (result, _) => Copied::Done(result),
    }
}

/// [`run`] to the end, whatever an upgrade does (a pair it could not hand over).
pub async fn run_here(
    pair: CopyPair,
    phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
    tuned: Tuned,
) -> Result<Outcome, SpliceError> {
    let mut pair = pair;
    run_framed(&mut pair, phase, idle_timeout, false, tuned).await
}

/// [`run`], with `Outcome::HandedOver` when it stopped for the handover (only with
/// `hand_over`), the sockets left as they are.
async fn run_framed(
    pair: &mut CopyPair,
    phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
    hand_over: bool,
    tuned: Tuned,
) -> Result<Outcome, SpliceError> {
    let start = Instant::now();
    // Milliseconds after `start` of the last byte read from either side.
    let last_read = AtomicU64::new(0);
    let CopyPair {
        client,
        backend,
        client_framing,
        directions: [to_backend, to_client],
    } = pair;
    let (client_side, backend_side) = ((&*client, *client_framing), (&*backend, Framing::Bytes));
    let copy = async {
        tokio::try_join!(
            one_way(client_side, backend_side, to_backend, start, &last_read),
            one_way(backend_side, client_side, to_client, start, &last_read)
        )
        .map(|_| ())
    };
    let watching = Watching {
        phase,
        idle_timeout,
        hand_over,
        tuned,
        sockets: [client.as_fd(), backend.as_fd()],
    };
    let result = supervise(copy, watching, start, &last_read).await;
    reset_unless_ended(&result, [client, backend]);
    result
}

/// How a socket's stream is read and ended: as bytes, or as kernel TLS's records.
#[derive(Clone, Copy)]
enum Framing {
    Bytes,
    KernelTls,
}

impl Framing {
    /// Reads what is there without waiting: `Ok(0)` at the end of the stream.
    fn try_read(self, s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Bytes => s.try_read(buf),
            Self::KernelTls => s.try_io(Interest::READABLE, || read_records(s, buf)),
        }
    }

    /// Ends the stream written to `s`.
    async fn end(self, s: &TcpStream) -> io::Result<()> {
        if let Self::KernelTls = self {
            // close_notify: a warning alert (level 1), description 0.
            loop {
                s.writable().await?;
                let sent = s.try_io(Interest::WRITABLE, || {
                    ktls::send_record(s.as_fd(), ktls::RECORD_ALERT, &[1, 0])
                });
                match sent {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write)
    }
}

/// Reads application data from a kernel TLS socket: `Ok(0)` at `close_notify` or FIN; a
/// `user_canceled` warning is passed over.
fn read_records(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let (n, kind) = ktls::recv(s.as_fd(), buf)?;
        let alert = match (kind, &buf[..n]) {
            (ktls::RECORD_DATA, _) => return Ok(n),
            // close_notify
            (ktls::RECORD_ALERT, [_, 0]) => return Ok(0),
            // user_canceled, a warning
            (ktls::RECORD_ALERT, [_, 90]) => continue,
            (ktls::RECORD_ALERT, alert) => format!("the client sent TLS alert {alert:?}"),
            (kind, _) => format!(
                "the client sent a TLS record of type {kind} after the handshake (a key update \
                 or renegotiation), which kernel TLS does not take"
            ),
        };
        return Err(io::Error::new(io::ErrorKind::ConnectionReset, alert));
    }
}

/// [`run`] for a client whose bytes are not the socket's own (TLS): the same ends, bound and
/// timeouts, through the stream's reads and writes. An end of the client's stream without
/// TLS's `close_notify` is an end of stream all the same, as for a bare socket.
pub async fn run_stream<S: OverTcp>(
    client: S,
    mut backend: TcpStream,
    phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
    tuned: Tuned,
) -> Result<Outcome, SpliceError> {
    let start = Instant::now();
    let last_read = AtomicU64::new(0);
    // Both sockets, for their buffers, while the streams over them are split.
    let sockets = [client.tcp().as_fd(), backend.as_fd()]
        .map(|fd| fd.try_clone_to_owned().map_err(SpliceError::Internal));
    let [client_socket, backend_socket] = sockets;
    let (client_socket, backend_socket) = (client_socket?, backend_socket?);
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let result = {
        let (mut from_backend, mut to_backend) = backend.split();
        let copy = async {
            tokio::try_join!(
                stream_one_way(&mut from_client, &mut to_backend, start, &last_read),
                stream_one_way(&mut from_backend, &mut to_client, start, &last_read)
            )
            .map(|_| ())
        };
        let watching = Watching {
            phase,
            idle_timeout,
            hand_over: false,
            tuned,
            sockets: [client_socket.as_fd(), backend_socket.as_fd()],
        };
        supervise(copy, watching, start, &last_read).await
    };
    let client = from_client.unsplit(to_client);
    reset_unless_ended(&result, [client.tcp(), &backend]);
    result
}

/// A client stream over a TCP socket, which is reset when the copy fails.
pub trait OverTcp: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for tokio_rustls::server::TlsStream<crate::tls::Records<TcpStream>> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }
}

/// What a copy's supervisor watches besides the copy.
struct Watching<'a> {
    phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
    /// Whether the copy stops at [`Phase::HandOver`].
    hand_over: bool,
    tuned: Tuned,
    /// The client's socket and the machine's, whose buffers follow the bound.
    sockets: [BorrowedFd<'a>; 2],
}

/// Sets `sockets` for the bound `tuned` follows, when it is not the one they were set for;
/// `deferred` says which receive buffers wait for their queue to drain ([`super::retune`]).
fn retune(tuned: &mut Tuned, sockets: [BorrowedFd<'_>; 2], deferred: &mut [bool; 2]) {
    let bound = *tuned.bound.borrow_and_update();
    if bound == tuned.set_for {
        return;
    }
    tuned.set_for = bound;
    for (fd, deferred) in sockets.into_iter().zip(deferred) {
        *deferred = match super::retune(fd, bound, super::Plane::Copy.send_buffer(bound)) {
            Ok(set) => !set,
            // The copy meets the socket's failure itself.
            Err(e) => {
                tracing::debug!(error = %e, "a copied socket's buffers were not set");
                false
            }
        };
    }
}

/// Sets the receive buffers [`retune`] left waiting, where their queues have drained now.
fn retune_waiting(tuned: &Tuned, sockets: [BorrowedFd<'_>; 2], deferred: &mut [bool; 2]) {
    for (fd, deferred) in sockets.into_iter().zip(deferred) {
        if *deferred {
            *deferred = !super::set_receive_when_room(fd, tuned.set_for).unwrap_or(true);
        }
    }
}

/// Runs `copy` until it ends, the grace period ends, the handover comes (when asked), or no
/// byte has moved for the idle timeout (`last_read`: milliseconds after `start` of the last
/// byte read).
async fn supervise(
    copy: impl Future<Output = io::Result<()>>,
    watching: Watching<'_>,
    start: Instant,
    last_read: &AtomicU64,
) -> Result<Outcome, SpliceError> {
    let Watching {
        mut phase,
        idle_timeout,
        hand_over,
        mut tuned,
        sockets,
    } = watching;
    tokio::pin!(copy);
    let idle = idle_timeout.unwrap_or_default();
    let mut idle_check = start + idle;
    let mut deferred = [false; 2];
    let mut retry = RETUNE_RETRY;
    retune(&mut tuned, sockets, &mut deferred);
    loop {
        match *phase.borrow() {
            Phase::Abort => return Ok(Outcome::Aborted),
            Phase::HandOver if hand_over => return Ok(Outcome::HandedOver),
            _ => {}
        }
        tokio::select! {
            r = &mut copy => return r.map(|()| Outcome::Completed).map_err(classify),
            _ = phase.changed() => {}
            Ok(()) = tuned.bound.changed() => {
                retune(&mut tuned, sockets, &mut deferred);
                retry = RETUNE_RETRY;
            }
            () = tokio::time::sleep(retry), if deferred.contains(&true) => {
                retune_waiting(&tuned, sockets, &mut deferred);
                retry = (retry * 2).min(RETUNE_RETRY_MAX);
            }
            () = tokio::time::sleep_until(idle_check), if idle_timeout.is_some() => {
                let last = start + Duration::from_millis(last_read.load(Ordering::Relaxed));
                if last.elapsed() >= idle {
                    return Ok(Outcome::Idle);
                }
                idle_check = last + idle;
            }
        }
    }
}

/// Makes the close of both sockets a reset unless the connection ended cleanly (or timed
/// out idle, which closes with FIN) or goes on in the process an upgrade started.
fn reset_unless_ended(result: &Result<Outcome, SpliceError>, sockets: [&TcpStream; 2]) {
    if !matches!(
        result,
        Ok(Outcome::Completed | Outcome::Idle | Outcome::HandedOver)
    ) && !faults::active(Fault::FinNotReset)
    {
        for s in sockets {
            socket2::SockRef::from(s)
                .set_linger(Some(Duration::ZERO))
                .ok();
        }
    }
}

/// Moves bytes from `from` to `to` through their streams until `from` ends, then ends `to`
/// (for TLS, `close_notify` then FIN). Each write is flushed: TLS may keep records back
/// otherwise.
async fn stream_one_way(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    start: Instant,
    last_read: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0; COPY_BUFFER];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        };
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_read.store(ms, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
    }
    to.shutdown().await
}

/// Moves bytes from `from` to `to` until `from` ends its stream, then ends `to`'s (each
/// side read and ended as its framing says), keeping its state in `dir` (whole at every
/// await, so the copy may stop at any). Notes in `last_read` (milliseconds after `start`)
/// when it last read bytes.
async fn one_way(
    (from, from_framing): (&TcpStream, Framing),
    (to, to_framing): (&TcpStream, Framing),
    dir: &mut Direction,
    start: Instant,
    last_read: &AtomicU64,
) -> io::Result<()> {
    loop {
        if let (true, Some(b)) = (dir.start < dir.end, &dir.buf) {
            to.writable().await?;
            match to.try_write(&b[dir.start..dir.end]) {
                Ok(w) => dir.start += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        if dir.done {
            return Ok(());
        }
        if dir.eof {
            to_framing.end(to).await?;
            dir.done = true;
            return Ok(());
        }
        from.readable().await?;
        let b = dir.buf.get_or_insert_with(Vec::new);
        // A fault may have left it another size.
        b.resize(COPY_BUFFER, 0);
        match from_framing.try_read(from, b) {
            Ok(0) => dir.eof = true,
            Ok(n) => {
                let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                last_read.store(ms, Ordering::Relaxed);
                (dir.start, dir.end) = (0, n);
                if let Some(altered) = dir.faulty.pass(&b[..n]) {
                    dir.end = altered.len();
                    *b = altered;
                }
            }
            // Drained: give the buffer back until there is more to read.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dir.buf = None,
            Err(e) => return Err(e),
        }
    }
}

/// The faults injected into one direction of the copy plane (a test build only).
#[derive(Default)]
struct FaultyStream {
    /// The last byte read, held back from the peer ([`Fault::DropLastByte`]): written with
    /// the next batch, dropped at the end of stream.
    held: Option<u8>,
    /// Whether a batch was already passed on ([`Fault::DuplicateBatch`]).
    passed: bool,
}

impl FaultyStream {
    /// What to write for `read` when a fault changes it; `None` (always, without faults)
    /// writes `read` as it is.
    fn pass(&mut self, read: &[u8]) -> Option<Vec<u8>> {
        let first = !std::mem::replace(&mut self.passed, true);
        if faults::active(Fault::DuplicateBatch) && first {
            return Some([read, read].concat());
        }
        if faults::active(Fault::DropLastByte) {
            let (last, rest) = read.split_last()?;
            let out = self.held.iter().chain(rest).copied().collect();
            self.held = Some(*last);
            return Some(out);
        }
        None
    }
}

/// The error kind says enough for the log (both sides are reset either way); which direction
/// failed is not kept.
fn classify(e: std::io::Error) -> SpliceError {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
            SpliceError::Peer(e)
        }
        _ => SpliceError::Internal(e),
    }
}
