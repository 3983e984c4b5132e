//! Connections to the machines, kept per worker thread (a connection's task runs on the
//! thread that opened it).
//!
//! HTTP/1.1: a request takes its machine's most recently used idle connection, or opens one.
//! A connection goes back only once its response's body has been read to the end; one the
//! machine closed while idle, or idle longer than [`IDLE_LIMIT`], is dropped at the next
//! checkout. At most [`MAX_IDLE`] idle connections are kept per worker; past that the oldest
//! is closed. HTTP/2 (`h2_backend`): one connection per machine and worker carries every
//! request, replaced when it closes.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, Uri, Version, header::HOST, uri::Scheme};
use http_body_util::{BodyExt as _, Empty};
use hyper::{
    body::{Body as _, Incoming},
    client::conn::{TrySendError, http1::SendRequest, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::ProxyBody;

/// How long an idle connection is kept for reuse.
pub const IDLE_LIMIT: Duration = Duration::from_secs(90);
/// Idle connections kept per worker, over every machine.
pub const MAX_IDLE: usize = 512;

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to the machine could be made: the request was not sent and comes back.
    #[error("connecting: {0}")]
    Connect(std::io::Error, Box<Request<ProxyBody>>),
    /// The request was sent, or began to be, and no response head came.
    #[error(transparent)]
    Broken(hyper::Error),
}

/// A connection in use, to give back once its response has been read whole.
pub struct Checkout {
    machine: SocketAddr,
    worker: usize,
    /// An HTTP/1.1 connection, reused once the response has been read whole.
    sender: Option<SendRequest<ProxyBody>>,
}

struct Idle {
    machine: SocketAddr,
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

/// An HTTP/2 connection to a machine, shared by the requests to it.
struct H2 {
    machine: SocketAddr,
    id: u64,
    sender: http2::SendRequest<ProxyBody>,
}

/// How many HTTP/2 connections one request may be tried on.
const H2_ATTEMPTS: usize = 3;

/// One worker's connections.
#[derive(Default)]
struct Worker {
    /// Oldest first.
    idle: VecDeque<Idle>,
    h2: Vec<H2>,
}

/// Every worker's connections.
pub struct Upstreams {
    workers: Vec<Mutex<Worker>>,
    connect_timeout: Duration,
    h2: bool,
    next_h2: AtomicU64,
}

impl Upstreams {
    pub fn new(workers: usize, connect_timeout: Duration, h2: bool) -> Self {
        Self {
            workers: (0..workers.max(1))
                .map(|_| Mutex::new(Worker::default()))
                .collect(),
            connect_timeout,
            h2,
            next_h2: AtomicU64::new(0),
        }
    }

    fn worker(&self, worker: usize) -> std::sync::MutexGuard<'_, Worker> {
        self.workers[worker % self.workers.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection to `machine` on this worker, dropping those
    /// idle too long. One the machine closed is found out by the caller (it is never ready).
    fn take(&self, worker: usize, machine: SocketAddr) -> Option<SendRequest<ProxyBody>> {
        let idle = &mut self.worker(worker).idle;
        let now = Instant::now();
        // Oldest first: those idle too long are at the front.
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= IDLE_LIMIT)
        {
            idle.pop_front();
        }
        let at = idle.iter().rposition(|i| i.machine == machine)?;
        idle.remove(at).map(|i| i.sender)
    }

    /// Keeps `used` for the next request to its machine.
    pub fn give_back(&self, used: Checkout) {
        let Some(sender) = used.sender.filter(|s| !s.is_closed()) else {
            return;
        };
        let idle = &mut self.worker(used.worker).idle;
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle {
            machine: used.machine,
            sender,
            since: Instant::now(),
        });
    }

    /// Sends `req` to `machine` on an idle connection or a new one; a request an idle
    /// connection could not take (the machine had closed it) goes on the next one.
    pub async fn send(
        &self,
        machine: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Checkout), SendError> {
        let worker = crate::server::worker_index();
        if self.h2 {
            return self.send_h2(worker, machine, req).await;
        }
        if !req.headers().contains_key(HOST)
            && let Ok(host) = HeaderValue::from_str(&machine.to_string())
        {
            req.headers_mut().insert(HOST, host);
        }
        while let Some(mut sender) = self.take(worker, machine) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let used = Checkout {
                        machine,
                        worker,
                        sender: Some(sender),
                    };
                    return Ok((resp, used));
                }
                Err(e) => match split(e) {
                    (_, Some(back)) => req = back,
                    (error, None) => return Err(SendError::Broken(error)),
                },
            }
        }
        let mut sender = match self.connect(machine).await {
            Ok(s) => s,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((
                resp,
                Checkout {
                    machine,
                    worker,
                    sender: Some(sender),
                },
            )),
            Err(e) => Err(unsent(e)),
        }
    }

    /// [`Self::send`] over the machine's HTTP/2 connection on this worker. HTTP/2 carries
    /// the host in `:authority`: the request's `Host`, or else the machine's address. A
    /// request the machine left unprocessed (its connection going away, or its stream
    /// refused: RFC 9113, 8.7) goes again on a new connection when it has no body to replay.
    async fn send_h2(
        &self,
        worker: usize,
        machine: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Checkout), SendError> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        let host = req.headers_mut().remove(HOST);
        parts.authority = host
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .or_else(|| machine.to_string().parse().ok());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
        *req.version_mut() = Version::HTTP_2;
        let replay = req.body().is_end_stream().then(|| head_of(&req));
        for attempt in 1..=H2_ATTEMPTS {
            let open = {
                let conns = &mut self.worker(worker).h2;
                conns.retain(|c| !c.sender.is_closed());
                conns
                    .iter()
                    .find(|c| c.machine == machine)
                    .map(|c| (c.id, c.sender.clone()))
            };
            let (id, mut sender, fresh) = match open {
                Some((id, s)) => (id, s, false),
                None => match self.connect_h2(machine).await {
                    Ok(sender) => {
                        let id = self.next_h2.fetch_add(1, Ordering::Relaxed);
                        let conn = H2 {
                            machine,
                            id,
                            sender: sender.clone(),
                        };
                        self.worker(worker).h2.push(conn);
                        (id, sender, true)
                    }
                    Err(e) => return Err(SendError::Connect(e, Box::new(req))),
                },
            };
            let (error, back) = match sender.ready().await {
                Ok(()) => match sender.try_send_request(req).await {
                    Ok(resp) => {
                        let used = Checkout {
                            machine,
                            worker,
                            sender: None,
                        };
                        return Ok((resp, used));
                    }
                    Err(e) => split(e),
                },
                Err(e) => (e, Some(req)),
            };
            // This connection takes no more requests.
            self.worker(worker).h2.retain(|c| c.id != id);
            req = match back {
                Some(back) if !fresh => back,
                Some(back) => {
                    return Err(SendError::Connect(
                        std::io::Error::other(error),
                        Box::new(back),
                    ));
                }
                None => match &replay {
                    Some(head) if unprocessed(&error) && attempt < H2_ATTEMPTS => {
                        tracing::debug!(%machine, %error, "request left unprocessed: sent again");
                        replayed(head)
                    }
                    _ => return Err(SendError::Broken(error)),
                },
            };
        }
        Err(SendError::Connect(
            std::io::Error::other("every HTTP/2 connection to the machine went away"),
            Box::new(req),
        ))
    }

    /// A connected socket to `machine`, within the connect timeout.
    async fn socket(&self, machine: SocketAddr) -> std::io::Result<TokioIo<TcpStream>> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(machine))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        stream.set_nodelay(true)?;
        Ok(TokioIo::new(stream))
    }

    /// A new HTTP/2 connection to `machine`, its task running on this worker.
    async fn connect_h2(
        &self,
        machine: SocketAddr,
    ) -> std::io::Result<http2::SendRequest<ProxyBody>> {
        let io = self.socket(machine).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%machine, error = %e, "HTTP/2 connection to a machine ended with an error");
            }
        });
        Ok(sender)
    }

    /// A new connection to `machine`, its task running on this worker until the machine or
    /// spliced closes it (or, after a switch of protocols, until the tunnel takes it).
    async fn connect(&self, machine: SocketAddr) -> std::io::Result<SendRequest<ProxyBody>> {
        let io = self.socket(machine).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%machine, error = %e, "connection to a machine ended with an error");
            }
        });
        Ok(sender)
    }
}

/// A request that did not go: back to be sent elsewhere when the connection took none of it.
fn unsent(e: TrySendError<Request<ProxyBody>>) -> SendError {
    match split(e) {
        (error, Some(back)) => SendError::Connect(std::io::Error::other(error), Box::new(back)),
        (error, None) => SendError::Broken(error),
    }
}

fn split<T>(mut e: TrySendError<T>) -> (hyper::Error, Option<T>) {
    let back = e.take_message();
    (e.into_error(), back)
}

/// Whether the machine's HTTP/2 connection says it did not process the request: its stream
/// refused, or beyond the last one a graceful going away lets finish.
fn unprocessed(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = e.source();
    }
    false
}

/// A request without a body, kept to be sent again.
fn head_of(req: &Request<ProxyBody>) -> Request<()> {
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    head
}

fn replayed(head: &Request<()>) -> Request<ProxyBody> {
    head.clone()
        .map(|()| Empty::new().map_err(|never| match never {}).boxed())
}
