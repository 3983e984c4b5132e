//! The userspace data plane: tokio copies bytes between the two sockets. It is the fallback
//! where the kernel programs cannot load, and the reference the sockmap plane is tested
//! against. Each direction holds at most one buffer of `COPY_BUFFER` bytes in the daemon, so
//! a slow reader holds its sender back through TCP flow control.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
    time::Instant,
};

use super::{Outcome, Phase, SpliceError};

/// Bytes buffered in the daemon per direction.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Copies both ways until both directions end, one side fails, the grace period ends, or no
/// byte has moved for `idle_timeout`. An end of stream on one side becomes a shutdown of the
/// other side's writing half once every byte before it was written.
pub async fn run(
    mut client: TcpStream,
    mut backend: TcpStream,
    mut phase: watch::Receiver<Phase>,
    idle_timeout: Option<Duration>,
) -> Result<Outcome, SpliceError> {
    let start = Instant::now();
    // Milliseconds after `start` of the last byte read from either side.
    let last_read = AtomicU64::new(0);
    let result = {
        let mut c = Stamped {
            inner: &mut client,
            start,
            last_read: &last_read,
        };
        let mut b = Stamped {
            inner: &mut backend,
            start,
            last_read: &last_read,
        };
        let copy =
            tokio::io::copy_bidirectional_with_sizes(&mut c, &mut b, COPY_BUFFER, COPY_BUFFER);
        tokio::pin!(copy);
        let idle = idle_timeout.unwrap_or_default();
        let mut idle_check = start + idle;
        loop {
            if *phase.borrow() == Phase::Abort {
                break Ok(Outcome::Aborted);
            }
            tokio::select! {
                r = &mut copy => break r.map(|_| Outcome::Completed).map_err(classify),
                _ = phase.changed() => {}
                () = tokio::time::sleep_until(idle_check), if idle_timeout.is_some() => {
                    let last = start + Duration::from_millis(last_read.load(Ordering::Relaxed));
                    if last.elapsed() >= idle {
                        break Ok(Outcome::Idle);
                    }
                    idle_check = last + idle;
                }
            }
        }
    };
    if !matches!(result, Ok(Outcome::Completed | Outcome::Idle)) {
        for s in [&client, &backend] {
            socket2::SockRef::from(s)
                .set_linger(Some(Duration::ZERO))
                .ok();
        }
    }
    result
}

/// A stream that notes when it last read bytes.
struct Stamped<'a> {
    inner: &'a mut TcpStream,
    start: Instant,
    last_read: &'a AtomicU64,
}

impl AsyncRead for Stamped<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(this.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.last_read.store(ms, Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncWrite for Stamped<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `copy_bidirectional` does not say which side failed; the error kind does well enough for
/// the log (both sides are reset either way).
fn classify(e: std::io::Error) -> SpliceError {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
            SpliceError::Peer(e)
        }
        _ => SpliceError::Internal(e),
    }
}
