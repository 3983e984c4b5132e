//! The userspace data plane: tokio copies bytes between the two sockets. It is the fallback
//! where the kernel programs cannot load, and the reference the sockmap plane is tested
//! against. Each direction holds at most one buffer of `COPY_BUFFER` bytes in the daemon, so
//! a slow reader holds its sender back through TCP flow control; and it holds that buffer
//! only while bytes flow: a direction whose socket has nothing to read gives it back, so an
//! idle connection costs no buffer.

use std::{
    io,
    os::fd::AsFd as _,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Interest},
    net::TcpStream,
    sync::watch,
    time::Instant,
};

use super::{Outcome, Phase, SpliceError};
use crate::{
    faults::{self, Fault},
    sys::ktls,
};

/// Bytes buffered in the daemon per direction.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Copies both ways until both directions end, one side fails, the grace period ends, or no
/// byte has moved for `idle_timeout`. An end of stream on one side becomes a shutdown of the
/// other side's writing half once every byte before it was written. Each socket's buffers are
/// fixed ([`super::tune_socket`]): what waits for a slow reader stays within both and one
/// [`COPY_BUFFER`].
pub async fn run(
    client: TcpStream,
    backend: TcpStream,
    phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
) -> Result<Outcome, SpliceError> {
    run_framed((client, Framing::Bytes), backend, phase, idle_timeout).await
}

/// [`run`] for a client whose socket carries kernel TLS: its plaintext is read and written
/// as on a bare socket; TLS's `close_notify` (or a FIN) ends its stream, and the end of the
/// backend's is `close_notify` then FIN. Any other alert, or a record of the handshake (a key
/// update, which the kernel cannot take), fails the connection.
pub async fn run_kernel_tls(
    client: TcpStream,
    backend: TcpStream,
    phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
) -> Result<Outcome, SpliceError> {
    run_framed((client, Framing::KernelTls), backend, phase, idle_timeout).await
}

/// [`run`] with the client's stream read and ended as `framing` says.
async fn run_framed(
    (client, framing): (TcpStream, Framing),
    backend: TcpStream,
    phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
) -> Result<Outcome, SpliceError> {
    let start = Instant::now();
    // Milliseconds after `start` of the last byte read from either side.
    let last_read = AtomicU64::new(0);
    let (client_side, backend_side) = ((&client, framing), (&backend, Framing::Bytes));
    let copy = async {
        tokio::try_join!(
            one_way(client_side, backend_side, start, &last_read),
            one_way(backend_side, client_side, start, &last_read)
        )
        .map(|_| ())
    };
    let result = supervise(copy, phase, idle_timeout, start, &last_read).await;
    reset_unless_ended(&result, [&client, &backend]);
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
) -> Result<Outcome, SpliceError> {
    let start = Instant::now();
    let last_read = AtomicU64::new(0);
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
        supervise(copy, phase, idle_timeout, start, &last_read).await
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

/// Runs `copy` until it ends, the grace period ends, or no byte has moved for
/// `idle_timeout` (`last_read`: milliseconds after `start` of the last byte read).
async fn supervise(
    copy: impl Future<Output = io::Result<()>>,
    mut phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
    start: Instant,
    last_read: &AtomicU64,
) -> Result<Outcome, SpliceError> {
    tokio::pin!(copy);
    let idle = idle_timeout.unwrap_or_default();
    let mut idle_check = start + idle;
    loop {
        if *phase.borrow() == Phase::Abort {
            return Ok(Outcome::Aborted);
        }
        tokio::select! {
            r = &mut copy => return r.map(|()| Outcome::Completed).map_err(classify),
            _ = phase.changed() => {}
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
/// out idle, which closes with FIN).
fn reset_unless_ended(result: &Result<Outcome, SpliceError>, sockets: [&TcpStream; 2]) {
    if !matches!(result, Ok(Outcome::Completed | Outcome::Idle))
        && !faults::active(Fault::FinNotReset)
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
/// side read and ended as its framing says). Notes in `last_read` (milliseconds after
/// `start`) when it last read bytes.
async fn one_way(
    (from, from_framing): (&TcpStream, Framing),
    (to, to_framing): (&TcpStream, Framing),
    start: Instant,
    last_read: &AtomicU64,
) -> io::Result<()> {
    let mut buf: Option<Vec<u8>> = None;
    let mut faulty = FaultyStream::default();
    loop {
        from.readable().await?;
        let b = buf.get_or_insert_with(|| vec![0; COPY_BUFFER]);
        let n = match from_framing.try_read(from, b) {
            Ok(0) => return to_framing.end(to).await,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained: give the buffer back until there is more to read.
                buf = None;
                continue;
            }
            Err(e) => return Err(e),
        };
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_read.store(ms, Ordering::Relaxed);
        let bytes = faulty.pass(&b[..n]);
        let bytes = bytes.as_deref().unwrap_or(&b[..n]);
        let mut sent = 0;
        while sent < bytes.len() {
            to.writable().await?;
            match to.try_write(&bytes[sent..]) {
                Ok(w) => sent += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
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
