//! A connection to a `tls` or `pg_tls` port: the TLS handshake (after PostgreSQL's
//! `SSLRequest` on `pg_tls`), then a machine, the PROXY protocol header, and the plaintext
//! copied both ways: by the daemon through rustls, or, where the port hands its sessions to
//! kernel TLS, between the client's socket, which the kernel encrypts, and the machine's. The
//! handshake comes first, so a client that never completes one takes no machine's slot.

use std::{os::fd::AsFd as _, sync::atomic::Ordering, time::Duration};

use tokio::{net::TcpStream, sync::watch};

use super::{
    Route, Shared,
    connection::{self, Machine, Peer},
    live::Carrier,
};
use crate::{
    dataplane::{self, Outcome, Phase, Plane, SpliceError, copy},
    tls::{Records, TlsPort, kernel, postgres},
};

/// Serves one client of a TLS port from accept to close.
pub(super) async fn serve(
    shared: &Shared,
    mut client: TcpStream,
    peer: Peer,
    route: &Route,
    tls: &TlsPort,
    phase: watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError> {
    let mut abort = phase.clone();
    let timeout = shared.opts.tls_handshake_timeout;
    let stats = &shared.stats;
    let handshake = async {
        if tls.postgres {
            match postgres::negotiate(&mut client).await? {
                postgres::Start::Tls => {}
                postgres::Start::Plain(early) => return Ok(Err((client, early))),
            }
        }
        let records = Records::new(client, tls.kernel);
        tls.acceptor.accept(records).await.map(Ok)
    };
    let done = tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => r,
        _ = abort.wait_for(|p| *p == Phase::Abort) => return Ok(Outcome::Aborted),
    };
    let stream = match done {
        Ok(Ok(Ok(stream))) => stream,
        Ok(Ok(Err((client, early)))) => {
            stats.pg_plaintext.fetch_add(1, Ordering::Relaxed);
            return connection::connect_and_splice(
                shared,
                client,
                peer,
                route,
                phase,
                Some(&early),
            )
            .await;
        }
        Ok(Err(e)) => {
            stats.tls_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer.addr, error = %e, "TLS handshake failed");
            return Err(SpliceError::Peer(e));
        }
        Err(_) => {
            stats.tls_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer.addr, ?timeout, "TLS handshake timed out");
            return Err(SpliceError::Peer(std::io::ErrorKind::TimedOut.into()));
        }
    };
    stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    if let Some(http) = &route.http {
        let bound = shared.budget.bound();
        dataplane::tune_socket(
            stream.get_ref().0.get_ref(),
            bound,
            Plane::Copy.send_buffer(bound),
        )
        .map_err(SpliceError::Internal)?;
        let side = crate::http::ClientSide {
            peer: peer.addr,
            tls: true,
            join: None,
        };
        shared.live.carried(peer.cookie, Carrier::Http);
        let protocol = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => crate::http::Protocol::Http2,
            Some(_) => crate::http::Protocol::Http1,
            None => crate::http::Protocol::Either,
        };
        return connection::serve_http(shared, stream, protocol, route, http, side, phase).await;
    }
    if tls.kernel {
        return serve_kernel_tls(shared, stream, peer, route, phase).await;
    }
    let tcp = stream.get_ref().0.get_ref();
    let Some(Machine {
        stream: mut backend,
        lease: _lease,
        ..
    }) = connection::backend_or_reset(shared, route, tcp, peer, &phase).await?
    else {
        return Ok(Outcome::Aborted);
    };
    let bound = shared.budget.bound();
    for s in [tcp, &backend] {
        dataplane::tune_socket(s, bound, Plane::Copy.send_buffer(bound))
            .map_err(SpliceError::Internal)?;
    }
    let header = connection::proxy_header(route, tcp, peer.addr)?;
    connection::write_preface(tcp, &mut backend, &header).await?;
    shared.live.carried(peer.cookie, Carrier::Tls);
    let tuned = shared.tuned(bound);
    copy::run_stream(stream, backend, phase, shared.opts.idle_timeout, tuned).await
}

/// Hands the session to kernel TLS, then moves the plaintext between the client's socket and
/// a machine's; a session the kernel refuses is reset.
async fn serve_kernel_tls(
    shared: &Shared,
    stream: tokio_rustls::server::TlsStream<Records<TcpStream>>,
    peer: Peer,
    route: &Route,
    phase: watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError> {
    let raw = stream.get_ref().0.get_ref().as_fd().try_clone_to_owned();
    // The rest of a record the handshake began to read comes within the handshake's time.
    let timeout = shared.opts.tls_handshake_timeout;
    let handed = tokio::time::timeout(timeout, kernel::hand_over(stream))
        .await
        .unwrap_or(Err(kernel::HandoverError::TimedOut));
    let (client, early) = match handed {
        Ok(handed) => handed,
        Err(e) => {
            shared.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %peer.addr, error = %e, "TLS session not handed to the kernel; reset");
            if let Ok(fd) = raw {
                socket2::SockRef::from(&fd)
                    .set_linger(Some(Duration::ZERO))
                    .ok();
            }
            return Err(SpliceError::Internal(std::io::Error::other(e)));
        }
    };
    drop(raw);
    shared.stats.tls_kernel.fetch_add(1, Ordering::Relaxed);
    let Some(Machine {
        stream: mut backend,
        lease: _lease,
        ..
    }) = connection::backend_or_reset(shared, route, &client, peer, &phase).await?
    else {
        return Ok(Outcome::Aborted);
    };
    let bound = shared.budget.bound();
    for s in [&client, &backend] {
        dataplane::tune_socket(s, bound, Plane::Copy.send_buffer(bound))
            .map_err(SpliceError::Internal)?;
    }
    let mut header = connection::proxy_header(route, &client, peer.addr)?;
    header.extend_from_slice(&early);
    connection::write_preface(&client, &mut backend, &header).await?;
    shared.live.carried(peer.cookie, Carrier::KernelTls);
    let pair = copy::CopyPair::kernel_tls(client, backend);
    connection::copy_pair(shared, pair, peer.cookie, phase, bound).await
}
