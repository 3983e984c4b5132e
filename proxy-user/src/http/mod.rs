//! The `http` handler: HTTP/1.1 and HTTP/2 from clients (hyper; HTTP/2 by ALPN over TLS or by
//! its preface in the clear), each request balanced on its own over the service's machines,
//! with Fly's forwarding headers, through keep-alive pools to the machines (HTTP/1.1, or
//! HTTP/2 with `http_options.h2_backend`). Bodies stream both ways with backpressure and are
//! never held whole. A request's slot on its machine is held until its response has been
//! sent, so concurrency limits count requests in flight.

pub mod options;
mod proxy;
mod upstream;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::combinators::BoxBody;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
};

use crate::{
    balance::Pool,
    config::PublicPort,
    dataplane::{Outcome, Phase, SpliceError},
};
pub use options::{HttpOptions, OptionsError};

/// The bodies passed on: the client's or the machine's, or one of spliced's own answers.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// What the handler counted, over every http port.
#[derive(Default, Debug, Serialize)]
pub struct HttpStats {
    pub requests: AtomicU64,
    /// Requests hyper could not parse, answered 400 by it.
    pub bad_requests: AtomicU64,
    /// No machine reachable, or the machine's answer broken: 502.
    pub bad_gateway: AtomicU64,
    /// Every machine at its hard limit for the whole queue wait, or none serves: 503.
    pub unavailable: AtomicU64,
    /// No response head within `--http-response-timeout`: 504.
    pub gateway_timeout: AtomicU64,
    /// Plain HTTP answered with a redirect to HTTPS (`force_https`).
    pub redirects: AtomicU64,
    /// Connections switched to another protocol (WebSocket) and tunnelled.
    pub upgrades: AtomicU64,
}

/// What every http port shares, from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// How long a machine may take to send its response head.
    pub response_timeout: Duration,
    pub connect_attempts: usize,
    /// How long a client connection may wait for its next request, unless the port says.
    pub idle_timeout: Option<Duration>,
}

/// One http port: its settings and its pool of connections to the machines.
pub struct HttpPort {
    pub public_port: u16,
    pub force_https: bool,
    pub options: HttpOptions,
    /// `Fly-Region`: the config's `primary_region`.
    region: Option<HeaderValue>,
    /// The public port, as `X-Forwarded-Port` and `Fly-Forwarded-Port` give it.
    port_value: HeaderValue,
    settings: Settings,
    /// The connections to the machines.
    upstreams: upstream::Upstreams,
}

impl HttpPort {
    pub fn new(
        port: &PublicPort,
        region: Option<&str>,
        settings: Settings,
        workers: usize,
    ) -> Result<Self, OptionsError> {
        let options = HttpOptions::read(port.http_options.as_ref())?;
        Ok(Self {
            public_port: port.port,
            force_https: port.force_https,
            region: region.and_then(|r| HeaderValue::from_str(r).ok()),
            port_value: HeaderValue::from(port.port),
            upstreams: upstream::Upstreams::new(
                workers,
                settings.connect_timeout,
                options.h2_backend,
            ),
            options,
            settings,
        })
    }

    /// How long a client connection may wait for its next request.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.options.idle_timeout.or(self.settings.idle_timeout)
    }
}

/// Where an upgraded connection goes when both its sides are bare sockets: the daemon's data
/// plane, which then moves its bytes as those of any TCP connection.
pub trait Join: Send + Sync {
    /// Moves bytes between `client` and `machine` until both directions end; `to_machine`
    /// (what the client sent after its request) reaches the machine first.
    fn join(
        &self,
        client: TcpStream,
        machine: TcpStream,
        to_machine: Bytes,
        phase: watch::Receiver<Phase>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Who the client is.
pub struct ClientSide {
    pub peer: SocketAddr,
    /// Whether the client came over TLS.
    pub tls: bool,
    /// For a client on a bare socket: the data plane that takes over after an upgrade.
    pub join: Option<Arc<dyn Join>>,
}

/// One client connection's context, shared by its requests.
struct Conn {
    port: Arc<HttpPort>,
    pool: Arc<Pool>,
    stats: Arc<HttpStats>,
    client: ClientSide,
    /// The client's address, as `Fly-Client-IP` gives it.
    client_ip: HeaderValue,
    /// The tunnels of upgraded requests, which outlive the HTTP connection.
    tunnels: Mutex<Vec<JoinHandle<()>>>,
    phase: watch::Receiver<Phase>,
}

/// Which HTTP a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Unknown: told by the first bytes (a TLS client that named no ALPN protocol).
    Either,
}

/// HTTP/2's connection preface, which only an HTTP/2 client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which HTTP a client on a bare socket speaks, from its first bytes, left unread.
pub async fn sniff(stream: &TcpStream) -> std::io::Result<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || !H2_PREFACE.starts_with(&buf[..n]) {
            return Ok(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        // Part of the preface: the rest is on its way.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves HTTP (`protocol`) on `io` until the client closes, the grace period ends
/// (in-flight requests finish first; keep-alive connections are closed), or the connection
/// sits idle for the port's idle timeout between requests. HTTP/1 is served by hyper's own
/// connection, on the socket itself, so that an upgraded connection can be handed on whole.
pub async fn serve<I>(
    io: I,
    protocol: Protocol,
    port: Arc<HttpPort>,
    pool: Arc<Pool>,
    stats: Arc<HttpStats>,
    client: ClientSide,
    phase: watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle = port.idle_timeout();
    let client_ip = HeaderValue::from_str(&client.peer.ip().to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    let conn = Arc::new(Conn {
        port,
        pool,
        stats,
        client,
        client_ip,
        tunnels: Mutex::new(Vec::new()),
        phase: phase.clone(),
    });
    let per_request = Arc::clone(&conn);
    let service = service_fn(move |req| proxy::handle(req, Arc::clone(&per_request)));
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http1 => {
            let mut h1 = hyper::server::conn::http1::Builder::new();
            h1.timer(TokioTimer::new()).keep_alive(true);
            if let Some(idle) = idle {
                h1.header_read_timeout(idle);
            }
            let serving = h1.serve_connection(io, service).with_upgrades();
            drive(
                serving,
                hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown,
                &conn,
                phase,
            )
            .await
        }
        Protocol::Http2 => {
            let serving = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, service);
            drive(
                serving,
                hyper::server::conn::http2::Connection::graceful_shutdown,
                &conn,
                phase,
            )
            .await
        }
        Protocol::Either => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            let mut h1 = builder.http1();
            h1.timer(TokioTimer::new()).keep_alive(true);
            if let Some(idle) = idle {
                h1.header_read_timeout(idle);
            }
            builder.http2().timer(TokioTimer::new());
            let serving = builder.serve_connection_with_upgrades(io, service);
            drive(
                serving,
                auto::UpgradeableConnection::graceful_shutdown,
                &conn,
                phase,
            )
            .await
        }
    };
    let Some(result) = result else {
        for t in conn
            .tunnels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
        return Ok(Outcome::Aborted);
    };
    let tunnels = std::mem::take(&mut *conn.tunnels.lock().unwrap_or_else(PoisonError::into_inner));
    for t in tunnels {
        let _ = t.await;
    }
    match result {
        Ok(()) => Ok(Outcome::Completed),
        Err(e)
            if e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout) =>
        {
            Ok(Outcome::Idle)
        }
        Err(e) => {
            let parse = e
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_parse);
            if parse {
                conn.stats
                    .bad_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::debug!(peer = %conn.client.peer, error = %e, "HTTP connection ended with an error");
            Err(SpliceError::Peer(std::io::Error::other(e)))
        }
    }
}

/// The connection's result when it ended by itself (`None`: at the end of the grace
/// period). At the start of the grace period, `shutdown` lets in-flight requests finish.
async fn drive<F, E>(
    serving: F,
    shutdown: impl Fn(Pin<&mut F>),
    conn: &Conn,
    phase: watch::Receiver<Phase>,
) -> Option<Result<(), Box<dyn std::error::Error + Send + Sync>>>
where
    F: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(serving);
    let (mut drain, mut abort) = (phase.clone(), phase);
    let mut draining = false;
    loop {
        tokio::select! {
            r = serving.as_mut() => return Some(r.map_err(Into::into)),
            _ = drain.wait_for(|p| *p != Phase::Serve), if !draining => {
                draining = true;
                tracing::debug!(peer = %conn.client.peer, "draining: no request after those in flight");
                shutdown(serving.as_mut());
            }
            _ = abort.wait_for(|p| *p == Phase::Abort) => return None,
        }
    }
}
