//! A connection to a `tls` or `pg_tls` port: the TLS handshake (after PostgreSQL's
//! `SSLRequest` on `pg_tls`), then a machine, the PROXY protocol header, and the plaintext
//! copied both ways. The handshake comes first, so a client that never completes one takes
//! no machine's slot.

use std::{net::SocketAddr, sync::atomic::Ordering};

use tokio::{net::TcpStream, sync::watch};

use super::{Route, Shared, connection};
use crate::{
    dataplane::{self, Outcome, Phase, Plane, SpliceError, copy},
    tls::{TlsPort, postgres},
};

/// Serves one client of a TLS port from accept to close.
pub(super) async fn serve(
    shared: &Shared,
    mut client: TcpStream,
    peer: SocketAddr,
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
        tls.acceptor.accept(client).await.map(Ok)
    };
    let done = tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => r,
        _ = abort.wait_for(|p| *p == Phase::Abort) => return Ok(Outcome::Aborted),
    };
    let stream = match done {
        Ok(Ok(Ok(stream))) => stream,
        Ok(Ok(Err((client, early)))) => {
            stats.pg_plaintext.fetch_add(1, Ordering::Relaxed);
            return connection::connect_and_splice(shared, client, peer, route, phase, &early)
                .await;
        }
        Ok(Err(e)) => {
            stats.tls_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return Err(SpliceError::Peer(e));
        }
        Err(_) => {
            stats.tls_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, ?timeout, "TLS handshake timed out");
            return Err(SpliceError::Peer(std::io::ErrorKind::TimedOut.into()));
        }
    };
    stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    if let Some(http) = &route.http {
        let max_buffer = shared.opts.max_buffer;
        dataplane::tune_socket(
            stream.get_ref().0,
            max_buffer,
            Plane::Copy.send_buffer(max_buffer),
        )
        .map_err(SpliceError::Internal)?;
        let side = crate::http::ClientSide {
            peer,
            tls: true,
            join: None,
        };
        let protocol = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => crate::http::Protocol::Http2,
            Some(_) => crate::http::Protocol::Http1,
            None => crate::http::Protocol::Either,
        };
        return connection::serve_http(shared, stream, protocol, route, http, side, phase).await;
    }
    let tcp = stream.get_ref().0;
    let Some((mut backend, _lease)) =
        connection::backend_or_reset(shared, route, tcp, &phase).await?
    else {
        return Ok(Outcome::Aborted);
    };
    let max_buffer = shared.opts.max_buffer;
    for s in [tcp, &backend] {
        dataplane::tune_socket(s, max_buffer, Plane::Copy.send_buffer(max_buffer))
            .map_err(SpliceError::Internal)?;
    }
    let header = connection::proxy_header(route, tcp, peer)?;
    connection::write_preface(tcp, &mut backend, &header).await?;
    copy::run_stream(stream, backend, phase, shared.opts.idle_timeout).await
}
