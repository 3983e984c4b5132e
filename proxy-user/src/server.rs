//! The daemon: binds the public ports, accepts, connects each client to its service's
//! backend, hands the pair to the data plane, and on SIGINT/SIGTERM stops accepting, lets
//! live connections finish for the grace period, then closes the rest.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinSet,
};

use crate::{
    balance::{Lease, Pool, PoolStats, QueuePolicy, Refusal},
    config::{Config, ProxyProtoVersion},
    dataplane::{
        DataplaneChoice, Outcome, Phase, SpliceError, copy,
        kernel::{Kernel, LoadError},
        sockmap::{Spliced, Splicer},
    },
    watch::{Registry, Watcher},
};

/// Everything `spliced run` takes besides the config.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Addresses to bind each public port on. Empty: every IPv4 and IPv6 address.
    pub listen_addrs: Vec<IpAddr>,
    pub dataplane: DataplaneChoice,
    /// How long live connections may take to finish after a stop signal.
    pub grace: Duration,
    /// Bound on bytes buffered in the kernel per direction of a connection.
    pub max_buffer: u64,
    /// How long to wait for a backend to accept.
    pub connect_timeout: Duration,
    /// Where to serve a JSON snapshot of counters, one per connection.
    pub admin_socket: Option<PathBuf>,
    /// Connections that may wait, per service, for a machine under its hard limit, and for
    /// how long.
    pub queue: QueuePolicy,
    /// Machines tried per connection, at most, before the client is reset.
    pub connect_attempts: usize,
    /// A connection with no byte either way for this long is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--dataplane sockmap: the BPF programs could not be loaded: {0}")]
    Sockmap(#[source] LoadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the config has no public port to listen on")]
    NothingToServe,
    #[error("admin socket {path}: {source}")]
    Admin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("telling the hold program which ports to watch: {0}")]
    HoldPorts(#[source] aya::maps::MapError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Counters kept in userspace; the kernel keeps the byte counters.
#[derive(Default, Debug, Serialize)]
pub struct ConnStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub completed: AtomicU64,
    pub aborted: AtomicU64,
    pub failed: AtomicU64,
    /// Every machine tried refused or did not answer in time.
    pub backend_unreachable: AtomicU64,
    /// Closed without a machine: none serves the service, or all stayed at their hard limit.
    pub refused: AtomicU64,
    /// Closed after the idle timeout.
    pub idle_closed: AtomicU64,
    /// Connections the kernel would not take (a side had already sent FIN), copied instead.
    pub copied_fallback: AtomicU64,
}

/// Where the connections of one public port go.
struct Route {
    /// The service's id: the kernel counts bytes per id.
    service: u32,
    /// The service's machines at its internal port, with their load.
    pool: Arc<Pool>,
    /// The PROXY protocol header to send each backend first, if any.
    proxy_proto: Option<ProxyProtoVersion>,
}

enum Plane {
    Sockmap(Box<Splicer>),
    Copy,
}

impl Plane {
    fn name(&self) -> &'static str {
        match self {
            Self::Sockmap(_) => "sockmap",
            Self::Copy => "copy",
        }
    }
}

struct Shared {
    plane: Plane,
    stats: ConnStats,
    opts: RunOptions,
    /// One per service, in service order.
    pools: Vec<Arc<Pool>>,
}

/// Runs the daemon until a stop signal and the end of the grace period.
#[expect(clippy::too_many_lines, reason = "start, serve, drain: one sequence")]
pub async fn run(config: Config, opts: RunOptions) -> Result<(), StartError> {
    let plane = choose_plane(&opts)?;
    tracing::info!(dataplane = plane.name(), "data plane ready");

    let listen_addrs = if opts.listen_addrs.is_empty() {
        vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]
    } else {
        opts.listen_addrs.clone()
    };
    let pools: Vec<Arc<Pool>> = config
        .services
        .iter()
        .map(|service| {
            let machines: Vec<(String, SocketAddr)> = config
                .machines_of(service)
                .map(|m| {
                    (
                        m.id.clone(),
                        SocketAddr::new(m.address, service.internal_port),
                    )
                })
                .collect();
            let limits = service.concurrency;
            Arc::new(Pool::new(
                service.name.clone(),
                machines,
                limits.and_then(|c| c.soft_limit),
                limits.and_then(|c| c.hard_limit),
                opts.queue,
            ))
        })
        .collect();
    if let Plane::Sockmap(splicer) = &plane {
        let public = config.public_ports().map(|(_, port)| port.port);
        let backend = pools
            .iter()
            .flat_map(|pool| pool.machines.iter().map(|m| m.addr.port()));
        splicer
            .kernel
            .watch_ports(public, backend)
            .map_err(StartError::HoldPorts)?;
    }
    let mut listeners = Vec::new();
    for (service, port) in config.public_ports() {
        let pool = Arc::clone(&pools[service.id as usize]);
        if pool.machines.is_empty() {
            tracing::warn!(port = port.port, service = %service.name, "no machine serves this port: its connections will be refused");
        }
        let route = Arc::new(Route {
            service: service.id,
            pool,
            proxy_proto: port.proxy_proto,
        });
        for ip in &listen_addrs {
            let addr = SocketAddr::new(*ip, port.port);
            let listener = bind(addr).map_err(|source| StartError::Bind { addr, source })?;
            tracing::info!(
                %addr,
                service = %service.name,
                internal_port = service.internal_port,
                proxy_proto = ?port.proxy_proto,
                "listening"
            );
            listeners.push((listener, Arc::clone(&route)));
        }
    }
    if listeners.is_empty() {
        return Err(StartError::NothingToServe);
    }

    let shared = Arc::new(Shared {
        plane,
        stats: ConnStats::default(),
        opts,
        pools,
    });
    // Dropped (which stops every check) when the daemon returns.
    let _health = crate::health::start(&config.services, &shared.pools);
    let (phase_tx, phase_rx) = watch::channel(Phase::Serve);
    let mut conns = JoinSet::new();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();

    let mut acceptors = JoinSet::new();
    for (listener, route) in listeners {
        let conn_tx = conn_tx.clone();
        acceptors.spawn(accept_loop(listener, route, conn_tx));
    }
    drop(conn_tx);

    let admin = match &shared.opts.admin_socket {
        Some(path) => Some(start_admin(path, Arc::clone(&shared))?),
        None => None,
    };
    tracing::info!("spliced is serving");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some((client, peer, route)) = conn_rx.recv() => {
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                shared.stats.active.fetch_add(1, Ordering::Relaxed);
                conns.spawn(serve(Arc::clone(&shared), client, peer, route, phase_rx.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }

    let live = conns.len();
    tracing::info!(live, grace = ?shared.opts.grace, "stopping: no longer accepting");
    acceptors.shutdown().await;
    drop(conn_rx);
    phase_tx.send_replace(Phase::Drain);
    let deadline = tokio::time::sleep(shared.opts.grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            () = &mut deadline => {
                tracing::warn!(left = conns.len(), "grace period over: closing live connections");
                phase_tx.send_replace(Phase::Abort);
                while conns.join_next().await.is_some() {}
                break;
            }
        }
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(path) = &shared.opts.admin_socket {
        std::fs::remove_file(path).ok();
    }
    tracing::info!(stats = %serde_json::to_string(&snapshot(&shared)).unwrap_or_default(), "stopped");
    Ok(())
}

fn choose_plane(opts: &RunOptions) -> Result<Plane, StartError> {
    let load = || -> Result<Splicer, LoadError> {
        let registry = Arc::new(Registry::default());
        let kernel = Kernel::load(Arc::clone(&registry))?;
        let watcher = Watcher::start(Arc::clone(&registry))?;
        Ok(Splicer {
            kernel,
            registry,
            watcher,
            max_buffer: opts.max_buffer,
            moved_bytes: AtomicU64::new(0),
            holds: AtomicU64::new(0),
            squeezes_relieved: AtomicU64::new(0),
            squeezes_refused: AtomicU64::new(0),
            idle_timeout: opts.idle_timeout,
        })
    };
    match opts.dataplane {
        DataplaneChoice::Copy => {
            tracing::info!("copy data plane chosen: userspace moves every byte");
            Ok(Plane::Copy)
        }
        DataplaneChoice::Sockmap => load()
            .map(|s| Plane::Sockmap(Box::new(s)))
            .map_err(StartError::Sockmap),
        DataplaneChoice::Auto => match load() {
            Ok(splicer) => Ok(Plane::Sockmap(Box::new(splicer))),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "!!! BPF programs could not be loaded: FALLING BACK TO THE COPY DATA PLANE. \
                     Userspace will move every byte; use --dataplane sockmap to fail instead !!!"
                );
                Ok(Plane::Copy)
            }
        },
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            // The IPv4 wildcard gets its own socket, so both can be bound side by side.
            socket2::SockRef::from(&s).set_only_v6(true)?;
            s
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

type Accepted = (TcpStream, SocketAddr, Arc<Route>);

async fn accept_loop(
    listener: TcpListener,
    route: Arc<Route>,
    out: tokio::sync::mpsc::UnboundedSender<Accepted>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if out.send((stream, peer, Arc::clone(&route))).is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: log, back off briefly, keep serving.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    phase: watch::Receiver<Phase>,
) {
    let result = connect_and_splice(&shared, client, peer, &route, phase).await;
    let stats = &shared.stats;
    stats.active.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(Outcome::Completed) => {
            stats.completed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection completed");
        }
        Ok(Outcome::Aborted) => {
            stats.aborted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection closed at end of grace period");
        }
        Ok(Outcome::Idle) => {
            stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "idle connection closed");
        }
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
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
        let connect = TcpStream::connect(addr);
        let error = match tokio::time::timeout(shared.opts.connect_timeout, connect).await {
            Ok(Ok(b)) => return Ok((b, lease)),
            Ok(Err(e)) => e,
            Err(_) => std::io::ErrorKind::TimedOut.into(),
        };
        tracing::debug!(%addr, %error, service = %route.pool.service, "machine unreachable; trying the next");
        route.pool.machines[lease.index()]
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
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

async fn connect_and_splice(
    shared: &Shared,
    client: TcpStream,
    peer: SocketAddr,
    route: &Route,
    phase: watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError> {
    let mut abort = phase.clone();
    let connected = tokio::select! {
        c = connect_backend(shared, route) => c,
        // A connection still waiting in the queue at the end of the grace period.
        _ = abort.wait_for(|p| *p == Phase::Abort) => {
            reset(&client);
            return Ok(Outcome::Aborted);
        }
    };
    // Held until the connection ends: it is the machine's count of live connections.
    let (mut backend, _lease) = match connected {
        Ok(b) => b,
        Err(NoBackend::Unreachable(e)) => {
            shared
                .stats
                .backend_unreachable
                .fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return Err(SpliceError::Backend(e));
        }
        Err(NoBackend::Refused(why)) => {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return Err(SpliceError::Backend(std::io::Error::other(why)));
        }
    };
    // Written before any byte of the client, so it is the first thing the backend reads, once.
    let header = match route.proxy_proto {
        Some(version) => {
            let local = client.local_addr().map_err(SpliceError::Internal)?;
            crate::proxy_proto::header(version, peer, local)
        }
        None => Vec::new(),
    };
    for s in [&client, &backend] {
        s.set_nodelay(true).map_err(SpliceError::Internal)?;
    }
    let idle = shared.opts.idle_timeout;
    match &shared.plane {
        Plane::Copy => {
            write_preface(&client, &mut backend, &header).await?;
            copy::run(client, backend, phase, idle).await
        }
        Plane::Sockmap(splicer) => {
            let client = client.into_std().map_err(SpliceError::Internal)?;
            let backend = backend.into_std().map_err(SpliceError::Internal)?;
            let splicing = splicer.run(client, backend, route.service, &header, phase.clone());
            match splicing.await {
                Spliced::Done(result) => result,
                Spliced::Refused(client, backend) => {
                    shared.stats.copied_fallback.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        "socket already half-closed before splicing: copying this connection"
                    );
                    let client = TcpStream::from_std(client).map_err(SpliceError::Internal)?;
                    let mut backend =
                        TcpStream::from_std(backend).map_err(SpliceError::Internal)?;
                    write_preface(&client, &mut backend, &header).await?;
                    copy::run(client, backend, phase, idle).await
                }
            }
        }
    }
}

/// Writes the PROXY protocol header (if any) into the backend connection.
async fn write_preface(
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
fn reset(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .ok();
}

/// The counters served on the admin socket and logged at exit.
#[derive(Serialize)]
struct Snapshot<'a> {
    dataplane: &'static str,
    connections: &'a ConnStats,
    /// Per service: its machines' load and its queue.
    services: Vec<PoolSnapshot<'a>>,
    kernel: Option<KernelSnapshot>,
}

#[derive(Serialize)]
struct PoolSnapshot<'a> {
    name: &'a str,
    machines: &'a [crate::balance::MachineStats],
    queue: &'a PoolStats,
}

#[derive(Serialize)]
struct KernelSnapshot {
    userspace_moved_bytes: u64,
    holds: u64,
    /// Held sockets whose receive buffer was raised because their queue had outgrown it, and
    /// raises refused at their limit (see `dataplane::sockmap`).
    squeezes_relieved: u64,
    squeezes_refused: u64,
    services: Vec<ServiceSnapshot>,
    user_tx_bytes: u64,
    user_tx_messages: u64,
    map_entries: std::collections::BTreeMap<&'static str, usize>,
    watched_sockets: usize,
}

#[derive(Serialize)]
struct ServiceSnapshot {
    service: u32,
    bytes_to_backend: u64,
    bytes_to_client: u64,
    segments: u64,
    redirect_failures: u64,
    flow_events: u64,
    events_lost: u64,
    kernel_holds: u64,
    /// Received batches whose head repeated bytes already passed on, and the bytes cut off.
    overlaps: u64,
    overlap_bytes: u64,
    /// Connections aborted because the kernel skipped bytes or could not cut a batch.
    stream_faults: u64,
}

fn snapshot(shared: &Shared) -> Snapshot<'_> {
    let kernel = match &shared.plane {
        Plane::Copy => None,
        Plane::Sockmap(s) => {
            let services = (0..proxy_common::MAX_SERVICES)
                .map(|i| (i, s.kernel.service_totals(i)))
                .filter(|(_, t)| {
                    t.segments != 0 || t.redirect_failures != 0 || t.stream_faults != 0
                })
                .map(|(service, t)| ServiceSnapshot {
                    service,
                    bytes_to_backend: t.bytes_to_backend,
                    bytes_to_client: t.bytes_to_client,
                    segments: t.segments,
                    redirect_failures: t.redirect_failures,
                    flow_events: t.flow_events,
                    events_lost: t.events_lost,
                    kernel_holds: t.holds,
                    overlaps: t.overlaps,
                    overlap_bytes: t.overlap_bytes,
                    stream_faults: t.stream_faults,
                })
                .collect();
            let tx = s.kernel.user_tx();
            Some(KernelSnapshot {
                userspace_moved_bytes: s.moved_bytes.load(Ordering::Relaxed),
                holds: s.holds.load(Ordering::Relaxed),
                squeezes_relieved: s.squeezes_relieved.load(Ordering::Relaxed),
                squeezes_refused: s.squeezes_refused.load(Ordering::Relaxed),
                services,
                user_tx_bytes: tx.bytes,
                user_tx_messages: tx.messages,
                map_entries: s.kernel.entry_counts().into_iter().collect(),
                watched_sockets: s.registry.len(),
            })
        }
    };
    Snapshot {
        dataplane: shared.plane.name(),
        connections: &shared.stats,
        services: shared
            .pools
            .iter()
            .map(|p| PoolSnapshot {
                name: &p.service,
                machines: &p.machines,
                queue: &p.stats,
            })
            .collect(),
        kernel,
    }
}

fn start_admin(
    path: &Path,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    std::fs::remove_file(path).ok();
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| StartError::Admin {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = serde_json::to_vec(&snapshot(&shared)).unwrap_or_default();
            tokio::spawn(async move {
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
        }
    }))
}
