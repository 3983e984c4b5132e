//! The userspace data plane: tokio copies bytes between the two sockets. It is the fallback
//! where the kernel programs cannot load, and the reference the sockmap plane is tested
//! against. Each direction holds at most one buffer of `COPY_BUFFER` bytes in the daemon, so
//! a slow reader holds its sender back through TCP flow control.

use std::time::Duration;

use tokio::{net::TcpStream, sync::watch};

use super::{Outcome, Phase, SpliceError};

/// Bytes buffered in the daemon per direction.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Copies both ways until both directions end, one side fails, or the grace period ends.
/// An end of stream on one side becomes a shutdown of the other side's writing half once
/// every byte before it was written.
pub async fn run(
    mut client: TcpStream,
    mut backend: TcpStream,
    mut phase: watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError> {
    let result = {
        let copy = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut backend,
            COPY_BUFFER,
            COPY_BUFFER,
        );
        tokio::pin!(copy);
        loop {
            if *phase.borrow() == Phase::Abort {
                break Ok(Outcome::Aborted);
            }
            tokio::select! {
                r = &mut copy => break r.map(|_| Outcome::Completed).map_err(classify),
                _ = phase.changed() => {}
            }
        }
    };
    if !matches!(result, Ok(Outcome::Completed)) {
        for s in [&client, &backend] {
            socket2::SockRef::from(s)
                .set_linger(Some(Duration::ZERO))
                .ok();
        }
    }
    result
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
