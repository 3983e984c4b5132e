//! One client's connection: a slot on a machine of its service, a connection to it (the next
//! machine when one fails), the PROXY protocol header, and the data plane until both
//! directions end.

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpSocket, TcpStream},
    sync::watch,
};

use super::{Route, Shared, live::Carrier, upgrade::Handed};
use crate::{
    balance::{Lease, Refusal},
    dataplane::{
        self, Outcome, Phase, Plane, SpliceError,
        copy::{self, Copied, CopyPair},
        sockmap::{Sockets, Spliced},
    },
};

/// Where a client connects from, and its socket's cookie: the key of its entry among the
/// live connections and, once spliced, in every per-socket map.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer {
    pub addr: SocketAddr,
    pub cookie: u64,
}

/// One client's connection from accept to close, counted in the daemon's stats.
pub(super) async fn serve(
    shared: Arc<Shared>,
    client: TcpStream,
    addr: SocketAddr,
    route: Arc<Route>,
    phase: watch::Receiver<Phase>,
) {
    let share = shared.budget.enter();
    let (result, tracked) = match crate::sys::socket_cookie(client.as_fd()) {
        Ok(cookie) => {
            let tracked = shared.live.track(cookie, addr, &route.pool.service);
            let peer = Peer { addr, cookie };
            let result = match (&route.tls, &route.http) {
                (Some(tls), _) => {
                    super::terminate::serve(&shared, client, peer, &route, tls, phase).await
                }
                (None, Some(http)) => {
                    serve_plain_http(&shared, client, peer, &route, http, phase).await
                }
                (None, None) => {
                    connect_and_splice(&shared, client, peer, &route, phase, None).await
                }
            };
            (result, Some(tracked))
        }
        Err(e) => (Err(SpliceError::Internal(e)), None),
    };
    count_outcome(&shared, addr, &result);
    drop((tracked, share));
    ended(&shared);
}

/// Counts how a connection ended. Called before it stops counting as active
/// ([`ended`]), so that a snapshot that sees none active sees every outcome.
pub(super) fn count_outcome(
    shared: &Shared,
    addr: SocketAddr,
    result: &Result<Outcome, SpliceError>,
) {
    let stats = &shared.stats;
    match result {
        Ok(Outcome::Completed) => {
            stats.completed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %addr, "connection completed");
        }
        Ok(Outcome::Aborted) => {
            stats.aborted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %addr, "connection closed at end of grace period");
        }
        Ok(Outcome::Idle) => {
            stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %addr, "idle connection closed");
        }
        Ok(Outcome::HandedOver) => {
            stats.handed_over.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %addr, "connection handed to the new process");
        }
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
        }
    }
}

/// A connection no longer counts as active.
pub(super) fn ended(shared: &Shared) {
    if shared.stats.active.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared.none_live.notify_waiters();
    }
}

/// Serves HTTP to a client on a bare socket: HTTP/1.1, or HTTP/2 when it starts with
/// HTTP/2's preface; an upgraded connection is handed to the data plane.
async fn serve_plain_http(
    shared: &Arc<Shared>,
    client: TcpStream,
    peer: Peer,
    route: &Route,
    http: &Arc<crate::http::HttpPort>,
    phase: watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError> {
    let bound = shared.budget.bound();
    dataplane::tune_socket(&client, bound, Plane::Copy.send_buffer(bound))
        .map_err(SpliceError::Internal)?;
    let join = Arc::new(PlaneJoin {
        shared: Arc::clone(shared),
        service: route.service,
        client_cookie: peer.cookie,
    });
    let side = crate::http::ClientSide {
        peer: peer.addr,
        tls: false,
        join: Some(join),
    };
    shared.live.carried(peer.cookie, Carrier::Http);
    let sniffed = match http.idle_timeout() {
        Some(idle) => tokio::time::timeout(idle, crate::http::sniff(&client)).await,
        None => Ok(crate::http::sniff(&client).await),
    };
    match sniffed {
        Ok(Ok(protocol)) => serve_http(shared, client, protocol, route, http, side, phase).await,
        Ok(Err(e)) => Err(SpliceError::Peer(e)),
        Err(_) => Ok(Outcome::Idle),
    }
}

/// Serves HTTP on `io` (the client's socket, or its TLS stream), whose requests go to the
/// route's machines one by one.
pub(super) async fn serve_http<I>(
    shared: &Shared,
    io: I,
    protocol: crate::http::Protocol,
    route: &Route,
    http: &Arc<crate::http::HttpPort>,
    side: crate::http::ClientSide,
    phase: watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    crate::http::serve(
        io,
        protocol,
        Arc::clone(http),
        Arc::clone(&route.pool),
        Arc::clone(&shared.http),
        side,
        phase,
    )
    .await
}

/// The daemon's data plane for upgraded HTTP connections of one service.
struct PlaneJoin {
    shared: Arc<Shared>,
    service: u32,
    client_cookie: u64,
}

impl crate::http::Join for PlaneJoin {
    fn join(
        &self,
        client: TcpStream,
        machine: TcpStream,
        to_machine: bytes::Bytes,
        phase: watch::Receiver<Phase>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        let (shared, service) = (Arc::clone(&self.shared), self.service);
        let client_cookie = self.client_cookie;
        Box::pin(async move {
            let machine_cookie = match crate::sys::socket_cookie(machine.as_fd()) {
                Ok(cookie) => cookie,
                Err(e) => {
                    tracing::debug!(error = %e, "upgraded connection not joined");
                    return;
                }
            };
            // The HTTP exchange chose the machine; its id is not known here, its address is.
            if let Ok(addr) = machine.peer_addr() {
                shared
                    .live
                    .connected(client_cookie, &addr.to_string(), addr, machine_cookie);
            }
            let joined = Joined {
                client,
                backend: machine,
                cookies: [client_cookie, machine_cookie],
                fresh: false,
            };
            let ended = splice_pair(&shared, joined, service, &to_machine, phase).await;
            tracing::debug!(?ended, "upgraded connection ended");
        })
    }
}

/// Why no backend connection was made.
enum NoBackend {
    Refused(Refusal),
    Unreachable(std::io::Error),
}

/// A slot on the best machine of the route's service, and a connection to it. A machine that
/// refuses or does not answer in time is skipped for the next best, each tried at most once.
async fn connect_backend(shared: &Shared, route: &Route) -> Result<(TcpStream, Lease), NoBackend> {
    let mut lease = route.pool.acquire().await.map_err(NoBackend::Refused)?;
    let mut tried = Vec::new();
    loop {
        let addr = lease.addr();
        let connect = connect(addr, shared.opts.backend_congestion.as_deref());
        let started = std::time::Instant::now();
        let error = match tokio::time::timeout(shared.opts.connect_timeout, connect).await {
            Ok(Ok(b)) => {
                lease.connected(started.elapsed());
                return Ok((b, lease));
            }
            Ok(Err(e)) => e,
            Err(_) => std::io::ErrorKind::TimedOut.into(),
        };
        tracing::debug!(%addr, %error, service = %route.pool.service, "machine unreachable; trying the next");
        lease.connect_failed();
        tried.push(lease.index());
        drop(lease);
        if tried.len() >= shared.opts.connect_attempts {
            return Err(NoBackend::Unreachable(error));
        }
        lease = route
            .pool
            .retry(&tried)
            .ok_or(NoBackend::Unreachable(error))?;
    }
}

/// A connection to `addr`, with the congestion control asked for set before the handshake.
async fn connect(addr: SocketAddr, congestion: Option<&str>) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(name) = congestion {
        crate::sys::set_congestion(socket.as_fd(), name)?;
    }
    socket.connect(addr).await
}

/// A connection to a machine, its socket's cookie, and the slot it holds on the machine.
pub(super) struct Machine {
    pub stream: TcpStream,
    pub cookie: u64,
    /// Held until the connection ends: it is the machine's count of live connections.
    pub lease: Lease,
}

/// A slot and a connection for `client` (whose socket has `peer.cookie`), which is reset when
/// there is none; `None` when the grace period ended while it waited.
pub(super) async fn backend_or_reset(
    shared: &Shared,
    route: &Route,
    client: &TcpStream,
    peer: Peer,
    phase: &watch::Receiver<Phase>,
) -> Result<Option<Machine>, SpliceError> {
    let mut abort = phase.clone();
    let connected = tokio::select! {
        c = connect_backend(shared, route) => c,
        // A connection still waiting in the queue at the end of the grace period.
        _ = abort.wait_for(|p| *p == Phase::Abort) => {
            reset(client);
            return Ok(None);
        }
    };
    match connected {
        Ok((stream, lease)) => {
            let cookie = match crate::sys::socket_cookie(stream.as_fd()) {
                Ok(cookie) => cookie,
                Err(e) => {
                    reset(client);
                    return Err(SpliceError::Internal(e));
                }
            };
            shared
                .live
                .connected(peer.cookie, &lease.id(), lease.addr(), cookie);
            Ok(Some(Machine {
                stream,
                cookie,
                lease,
            }))
        }
        Err(NoBackend::Unreachable(e)) => {
            shared
                .stats
                .backend_unreachable
                .fetch_add(1, Ordering::Relaxed);
            reset(client);
            Err(SpliceError::Backend(e))
        }
        Err(NoBackend::Refused(why)) => {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            reset(client);
            Err(SpliceError::Backend(std::io::Error::other(why)))
        }
    }
}

/// The PROXY protocol header for `client`'s connection, if the route sends one.
pub(super) fn proxy_header(
    route: &Route,
    client: &TcpStream,
    peer: SocketAddr,
) -> Result<Vec<u8>, SpliceError> {
    Ok(match route.proxy_proto {
        Some(version) => {
            let local = client.local_addr().map_err(SpliceError::Internal)?;
            crate::proxy_proto::header(version, peer, local)
        }
        None => Vec::new(),
    })
}

/// Connects `client` to a machine and moves its bytes on the daemon's data plane. `early`:
/// when the daemon read from the client before (PostgreSQL's start), the bytes it read that
/// are the client's stream, passed on first (after the PROXY header); `None` when nothing
/// was read.
pub(super) async fn connect_and_splice(
    shared: &Shared,
    client: TcpStream,
    peer: Peer,
    route: &Route,
    phase: watch::Receiver<Phase>,
    early: Option<&[u8]>,
) -> Result<Outcome, SpliceError> {
    let Some(machine) = backend_or_reset(shared, route, &client, peer, &phase).await? else {
        return Ok(Outcome::Aborted);
    };
    // Written before any byte of the client, so it is the first thing the backend reads, once.
    let mut header = proxy_header(route, &client, peer.addr)?;
    header.extend_from_slice(early.unwrap_or_default());
    let joined = Joined {
        client,
        backend: machine.stream,
        cookies: [peer.cookie, machine.cookie],
        fresh: early.is_none(),
    };
    let ended = splice_pair(shared, joined, route.service, &header, phase).await;
    drop(machine.lease);
    ended
}

/// A client's connection and its machine's, connected, for the data plane.
pub(super) struct Joined {
    pub client: TcpStream,
    pub backend: TcpStream,
    /// The sockets' cookies, client first.
    pub cookies: [u64; 2],
    /// Neither socket was read from or written to before.
    pub fresh: bool,
}

/// Moves the bytes of a joined pair on the daemon's data plane until both directions end;
/// `header` goes to the backend before any byte of the client.
pub(super) async fn splice_pair(
    shared: &Shared,
    joined: Joined,
    service: u32,
    header: &[u8],
    phase: watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError> {
    let Joined {
        client,
        mut backend,
        cookies,
        fresh,
    } = joined;
    let bound = shared.budget.bound();
    for s in [&client, &backend] {
        dataplane::tune_socket(s, bound, shared.plane.send_buffer(bound))
            .map_err(SpliceError::Internal)?;
    }
    let carrier = match &shared.plane {
        Plane::Copy => Carrier::Copy,
        Plane::Sockmap(_) => Carrier::Sockmap,
    };
    shared.live.carried(cookies[0], carrier);
    match &shared.plane {
        Plane::Copy => {
            write_preface(&client, &mut backend, header).await?;
            copy_pair(
                shared,
                CopyPair::new(client, backend),
                cookies[0],
                phase,
                bound,
            )
            .await
        }
        Plane::Sockmap(splicer) => {
            // The verdict takes whole queued segments, however much of one was read before
            // (the kernel's tcp_read_skb ignores it): a socket already read from (an upgraded
            // connection, the bytes pg_tls reads) has its queue taken here, passed on ahead.
            let mut client = client;
            let mut header = header.to_vec();
            if !fresh {
                let to_client = take_queued_if_read(&backend).map_err(SpliceError::Internal)?;
                if let Err(e) = client.write_all(&to_client).await {
                    reset(&backend);
                    return Err(SpliceError::Peer(e));
                }
                header.extend(take_queued_if_read(&client).map_err(SpliceError::Internal)?);
            }
            let header = &header[..];
            let sockets = Sockets {
                client: client.into_std().map_err(SpliceError::Internal)?,
                backend: backend.into_std().map_err(SpliceError::Internal)?,
                cookies,
                fresh,
            };
            let splicing = splicer.run(sockets, service, header, phase.clone());
            match splicing.await {
                Spliced::Done(result) => result,
                Spliced::HandedOver(handed) => super::upgrade::send_connection(shared, &handed),
                Spliced::Refused(client, backend) => {
                    shared.stats.copied_fallback.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        "socket already half-closed before splicing: copying this connection"
                    );
                    let send_buffer = Plane::Copy.send_buffer(bound);
                    for s in [&client, &backend] {
                        crate::sys::set_send_buffer(s.as_fd(), send_buffer)
                            .map_err(SpliceError::Internal)?;
                    }
                    shared.live.carried(cookies[0], Carrier::Copy);
                    let client = TcpStream::from_std(client).map_err(SpliceError::Internal)?;
                    let mut backend =
                        TcpStream::from_std(backend).map_err(SpliceError::Internal)?;
                    write_preface(&client, &mut backend, header).await?;
                    let pair = CopyPair::new(client, backend);
                    copy_pair(shared, pair, cookies[0], phase, bound).await
                }
            }
        }
    }
}

/// Copies a pair's bytes until both directions end; one that an upgrade stops is sent to
/// the new process. `cookie`: its client socket's; `bound`: the one its sockets' buffers were
/// set for (0: not known).
pub(super) async fn copy_pair(
    shared: &Shared,
    pair: CopyPair,
    cookie: u64,
    phase: watch::Receiver<Phase>,
    bound: u64,
) -> Result<Outcome, SpliceError> {
    let counted = shared.copy_handover.enter();
    let idle = shared.opts.idle_timeout;
    match copy::run(pair, phase.clone(), idle, counted, shared.tuned(bound)).await {
        Copied::Done(result) => result,
        Copied::HandedOver(pair, counted) => {
            match super::upgrade::send_copied(shared, &pair, cookie)? {
                Handed::Sent => Ok(Outcome::HandedOver),
                Handed::Kept => {
                    drop(counted);
                    // Its sockets are as the copy left them.
                    let bound = shared.budget.bound();
                    copy::run_here(*pair, phase, idle, shared.tuned(bound)).await
                }
            }
        }
    }
}

/// Every byte queued on `s` when some of its input was read before; none otherwise.
fn take_queued_if_read(s: &TcpStream) -> std::io::Result<Vec<u8>> {
    let mut taken = Vec::new();
    if crate::sys::bytes_read(s.as_fd())? == 0 {
        return Ok(taken);
    }
    let mut buf = vec![0; 64 * 1024];
    loop {
        match s.try_read(&mut buf) {
            // FIN: the splice refuses the socket and the copy plane carries on.
            Ok(0) => return Ok(taken),
            Ok(n) => taken.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(taken),
            Err(e) => return Err(e),
        }
    }
}

/// Writes the PROXY protocol header (if any) into the backend connection.
pub(super) async fn write_preface(
    client: &TcpStream,
    backend: &mut TcpStream,
    header: &[u8],
) -> Result<(), SpliceError> {
    if let Err(e) = backend.write_all(header).await {
        reset(client);
        return Err(SpliceError::Backend(e));
    }
    Ok(())
}

/// Makes the close of `s` a reset.
pub(super) fn reset(s: &TcpStream) {
    if crate::faults::active(crate::faults::Fault::FinNotReset) {
        return;
    }
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .ok();
}
