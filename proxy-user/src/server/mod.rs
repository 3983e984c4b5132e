//! The daemon: binds the public ports, accepts, connects each client to its service's
//! backend, hands the pair to the data plane; on SIGHUP serves the config read again
//! ([`generation`]); on SIGINT/SIGTERM stops accepting, lets live connections finish for the
//! grace period, then closes the rest and stops the machines it runs.

mod admin;
mod connection;
mod generation;
mod listen;
mod live;
mod metrics;
mod source;
mod terminate;
mod upgrade;

pub use listen::worker_index;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, mpsc, watch},
};

use crate::{
    balance::{Pool, QueuePolicy},
    config::{Config, ProxyProtoVersion},
    dataplane::{
        DataplaneChoice, Phase, Plane,
        budget::{Budget, MEMORY_PER_BOUND},
        kernel::LoadError,
        sockmap,
    },
    machines::Managed,
};
use generation::{Generation, Ports};

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
    /// Kernel memory the proxied sockets of all connections may hold
    /// ([`crate::dataplane::budget`]); `None`: half the host's TCP memory pressure threshold.
    pub buffer_budget: Option<u64>,
    /// How long to wait for a backend to accept.
    pub connect_timeout: Duration,
    /// Where to serve a JSON snapshot of counters, one per connection.
    pub admin_socket: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`/metrics`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Connections that may wait, per service, for a machine under its hard limit, and for
    /// how long.
    pub queue: QueuePolicy,
    /// Machines tried per connection, at most, before the client is reset.
    pub connect_attempts: usize,
    /// A connection with no byte either way for this long is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Whether an `sk_msg` program counts every byte entering a spliced socket's send path.
    pub egress_audit: bool,
    /// TCP congestion control of connections to machines; `None`: the host's default.
    pub backend_congestion: Option<String>,
    /// Where the certificates of TLS ports are (`--certs`); `None`: self-signed ones.
    pub certs: Option<PathBuf>,
    /// How long a client may take over its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Whether TLS ports that forward plaintext hand their sessions to kernel TLS where the
    /// kernel has it.
    pub kernel_tls: bool,
    /// How long a machine may take to send the head of its response to an HTTP request.
    pub http_response_timeout: Duration,
    /// Threads that accept and serve connections, each with listeners of its own.
    pub workers: usize,
    /// Start and stop timings of the machines spliced runs.
    pub machines: crate::machines::Timing,
    /// How often the stop rule looks at idle machines.
    pub autostop_interval: Duration,
    /// The config file, read again on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// The registry whose apps are served, followed live.
    pub registry: Option<crate::registry::Settings>,
    /// The user the daemon becomes once its programs are loaded and its ports bound.
    pub user: Option<(String, crate::sys::Identity)>,
}

/// The capabilities a daemon that changed user keeps, found by running the integration
/// checks as that user: `CAP_NET_ADMIN` (12) for socket buffers past `net.core.rmem_max` and
/// `wmem_max` (`SO_RCVBUFFORCE`, `SO_SNDBUFFORCE`) and for a congestion control the host
/// does not allow everyone; `CAP_NET_BIND_SERVICE` (10) for a port below 1024 that a reload
/// adds; `CAP_BPF` (39) and `CAP_PERFMON` (38) for the programs and maps the new process of
/// an upgrade loads, which passes them on to it. The maps in use need none (the kernel
/// checks capabilities when a map is made or a program loaded, not when an open map is
/// read or written).
pub const KEPT_CAPABILITIES: u64 = (1 << 39) | (1 << 38) | (1 << 12) | (1 << 10);

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
    #[error("--metrics-addr {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path}: {source}")]
    Admin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--backend-congestion {name}: the kernel refuses it ({source}); the host offers: {available}"
    )]
    Congestion {
        name: String,
        available: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "port {port}: {others} listening socket(s) of another process on it already (another spliced?); refusing to share the port"
    )]
    Shared { port: u16, others: usize },
    #[error("port {port}: cannot tell which sockets listen on it: {source}")]
    PortCheck {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--buffer-budget not given, and neither the host's TCP memory limits (net.ipv4.tcp_mem) nor its memory (/proc/meminfo) can be read: {0}"
    )]
    BufferBudget(#[source] std::io::Error),
    #[error("upgrade: receiving the sockets of the process before: {0}")]
    Upgrade(#[source] std::io::Error),
    #[error(
        "--registry {0}: cannot be read, and a process started by an upgrade serves no less than the one before it; that one goes on serving"
    )]
    RegistryAway(String),
    #[error("--user {name}: cannot switch to it: {source}")]
    User {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--certs: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Certs(Vec<crate::tls::CertError>),
    #[error("port {port}: TLS: {source}")]
    Tls {
        port: u16,
        #[source]
        source: crate::tls::TlsConfigError,
    },
    #[error("port {port}: {source}")]
    Http {
        port: u16,
        #[source]
        source: crate::http::OptionsError,
    },
    #[error("telling the hold program which ports to watch: {0}")]
    HoldPorts(#[source] std::io::Error),
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
    /// Spliced connections handed, open, to the new process at an upgrade.
    pub handed_over: AtomicU64,
    /// Spliced connections this process took over from the one it upgraded.
    pub taken_over: AtomicU64,
    /// TLS handshakes completed on `tls` and `pg_tls` ports.
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed or timed out; the client is closed.
    pub tls_failed: AtomicU64,
    /// TLS sessions handed to the kernel after their handshake.
    pub tls_kernel: AtomicU64,
    /// Clients of `pg_tls` ports that did not ask for TLS, passed on in plain text.
    pub pg_plaintext: AtomicU64,
}

/// Where the connections of one public port go.
struct Route {
    /// The service's id: the kernel counts bytes per id.
    service: u32,
    /// The service's machines at its internal port, with their load.
    pool: Arc<Pool>,
    /// The PROXY protocol header to send each backend first, if any.
    proxy_proto: Option<ProxyProtoVersion>,
    /// TLS termination (`tls`, `pg_tls`), if the port has it.
    tls: Option<crate::tls::TlsPort>,
    /// The `http` handler, if the port has it: the pool's machines per request.
    http: Option<Arc<crate::http::HttpPort>>,
}

struct Shared {
    plane: Plane,
    /// The kernel memory every connection's sockets share; each live connection holds a
    /// part ([`crate::dataplane::budget::Share`]) and keeps its bound.
    budget: Arc<Budget>,
    stats: ConnStats,
    opts: RunOptions,
    /// Signalled when the last live connection ends (`stats.active` falls to zero).
    none_live: Notify,
    http: Arc<crate::http::HttpStats>,
    /// What the config last read serves; a reload replaces it whole.
    current: RwLock<Arc<Generation>>,
    reloads: ReloadStats,
    /// The live connections, for `spliced status`.
    live: live::Live,
    /// The way to the process an upgrade started, once it serves: the spliced connections
    /// and their kernel go to it.
    successor: std::sync::Mutex<Option<std::os::fd::OwnedFd>>,
    /// The copy plane's connections an upgrade may hand over (not TLS's nor HTTP's).
    copy_handover: crate::dataplane::gate::Gate,
    /// The splicers over kernels taken over at an upgrade, while connections on them live.
    adopted: std::sync::Mutex<Vec<std::sync::Weak<upgrade::Adopted>>>,
    /// Per service, the kernel counters of adopted kernels that are gone (their last
    /// connection ended), so that the totals only grow.
    retired: std::sync::Mutex<std::collections::HashMap<u32, proxy_common::ServiceCounters>>,
    /// What this edge knows of the registry, when it follows one.
    registry: Option<Arc<crate::registry::Status>>,
}

/// SIGHUP reloads: served, and refused (invalid config, a port that cannot be bound).
#[derive(Default, Debug, Serialize)]
pub struct ReloadStats {
    pub done: AtomicU64,
    pub failed: AtomicU64,
    /// SIGUSR2s that left this process serving (refused, or the new process did not serve).
    pub upgrades_failed: AtomicU64,
}

impl Shared {
    /// A copied connection's buffers, set for `bound`, following the budget from now on.
    fn tuned(&self, bound: u64) -> crate::dataplane::copy::Tuned {
        crate::dataplane::copy::Tuned {
            bound: self.budget.watch(),
            set_for: bound,
        }
    }

    /// A service's kernel counters, summed over CPUs: this process's kernel's and those of
    /// the kernels taken over at an upgrade while connections run on them.
    fn service_totals(&self, service: u32) -> proxy_common::ServiceCounters {
        let mut sum = match &self.plane {
            Plane::Sockmap(s) => s.kernel.service_totals(service),
            Plane::Copy => proxy_common::ServiceCounters::default(),
        };
        let adopted = self.adopted.lock().unwrap_or_else(PoisonError::into_inner);
        for splicer in adopted.iter().filter_map(std::sync::Weak::upgrade) {
            sum.add(&splicer.kernel.service_totals(service));
        }
        drop(adopted);
        let retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(gone) = retired.get(&service) {
            sum.add(gone);
        }
        sum
    }

    fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits until no connection is live.
    async fn all_ended(&self) {
        loop {
            // Made before the count is read, so that an end between the two still wakes it.
            let ended = self.none_live.notified();
            if self.stats.active.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// The buffer budget `--buffer-budget` sets, or half the host's TCP memory pressure threshold
/// ([`Budget::host_default`]).
fn buffer_budget(opts: &RunOptions) -> Result<Arc<Budget>, StartError> {
    let (total, source) = match opts.buffer_budget {
        Some(total) => (total, "--buffer-budget"),
        None => Budget::host_default().map_err(StartError::BufferBudget)?,
    };
    tracing::info!(
        budget = total,
        from = source,
        connections_at_max_buffer = total / (MEMORY_PER_BOUND * opts.max_buffer),
        "buffer budget: each connection's bound shrinks from --max-buffer as more are live"
    );
    Ok(Budget::new(total, opts.max_buffer))
}

/// Runs the daemon until a stop signal and the end of the grace period, serving `config` (the
/// `--config` file) and the apps of `--registry`; SIGHUP re-reads the file, and each change
/// of the registry is served as it comes (see [`generation`]).
pub async fn run(config: Option<Config>, opts: RunOptions) -> Result<(), StartError> {
    let mut inherited = upgrade::Inherited::receive().map_err(StartError::Upgrade)?;
    let budget = buffer_budget(&opts)?;
    let settings = sockmap::Settings {
        budget: Arc::clone(&budget),
        idle_timeout: opts.idle_timeout,
        egress_audit: opts.egress_audit,
    };
    if let Some(name) = &opts.backend_congestion {
        check_congestion(name)?;
    }
    let plane = Plane::start(opts.dataplane, settings).map_err(StartError::Sockmap)?;
    tracing::info!(dataplane = plane.name(), "data plane ready");

    let listen_addrs = if opts.listen_addrs.is_empty() {
        vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]
    } else {
        opts.listen_addrs.clone()
    };
    let mut certs = None;
    let mut source = source::Source::start(config, &opts, inherited.is_upgrade()).await?;
    let first = Generation::build(source.compose(None), &opts, None, &mut certs)?;
    watch_ports(&plane, &first)?;
    let workers = opts.workers.max(1);
    let (worker_tx, worker_rx): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
    let mut ports = Ports::new(
        listen_addrs,
        worker_tx,
        std::mem::take(&mut inherited.listeners),
    );
    ports.apply(&first.routes)?;
    if first.routes.is_empty() {
        // An app without services (a worker, a VPN node) is valid: Fly routes nothing to it.
        tracing::warn!("the config has no public port: spliced listens on nothing");
    }

    let shared = Arc::new(Shared {
        plane,
        budget,
        stats: ConnStats::default(),
        opts,
        none_live: Notify::new(),
        http: Arc::default(),
        current: RwLock::new(Arc::new(first)),
        reloads: ReloadStats::default(),
        live: live::Live::default(),
        successor: std::sync::Mutex::default(),
        copy_handover: crate::dataplane::gate::Gate::default(),
        adopted: std::sync::Mutex::default(),
        retired: std::sync::Mutex::default(),
        registry: source.status(),
    });
    let endpoints = endpoints(&shared, &mut inherited).await?;
    // Before the workers and the machines start, which then begin as the user.
    become_user(&shared.opts)?;
    shared.current().start(None);
    let _autostop = autostop(Arc::clone(&shared));
    let _certs = certs
        .clone()
        .filter(|c: &Arc<crate::tls::CertStore>| c.dir().is_some())
        .map(|c| AbortOnDrop(crate::tls::watch(c)));
    let (phase_tx, phase_rx) = watch::channel(Phase::Serve);
    let mut threads = Vec::new();
    for (index, rx) in worker_rx.into_iter().enumerate() {
        let (shared, phase) = (Arc::clone(&shared), phase_rx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("spliced-w{index}"))
            .spawn(move || listen::worker(index, rx, &shared, &phase))?;
        threads.push(thread);
    }

    tracing::info!("spliced is serving");
    // The programs are loaded and every port is bound.
    crate::sys::notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    inherited.serving(&shared, &phase_rx);
    let successor = serve_signals(&shared, &mut ports, &mut certs, &mut source, &endpoints).await?;
    let stopping = Stopping {
        phase: phase_tx,
        threads,
        ports,
        endpoints,
        successor,
    };
    stopping.finish(&shared).await;
    Ok(())
}

/// Handles signals until one stops the daemon: SIGINT or SIGTERM, or SIGUSR2 once a new
/// process serves in this one's place (its pid). Serves each new state of the registry.
async fn serve_signals(
    shared: &Arc<Shared>,
    ports: &mut Ports,
    certs: &mut Option<Arc<crate::tls::CertStore>>,
    source: &mut source::Source,
    endpoints: &Endpoints,
) -> Result<Option<u32>, StartError> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigusr2 = signal(SignalKind::user_defined2())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(None),
            _ = sigterm.recv() => return Ok(None),
            _ = sighup.recv() => reload(shared, ports, certs, source),
            () = source.changed() => {
                let old = shared.current();
                let config = source.compose(Some(&old.config));
                if let Err(e) = serve(shared, ports, certs, config) {
                    for line in e.lines() {
                        tracing::error!("registry change refused, still serving the state before: {line}");
                    }
                }
            }
            _ = sigusr2.recv() => {
                if let Some(pid) = upgrade::on_signal(shared, ports, endpoints).await {
                    return Ok(Some(pid));
                }
            }
        }
    }
}

/// What is left to stop once the daemon stops accepting.
struct Stopping {
    phase: watch::Sender<Phase>,
    threads: Vec<std::thread::JoinHandle<()>>,
    ports: Ports,
    endpoints: Endpoints,
    /// The process that took over, after an upgrade.
    successor: Option<u32>,
}

impl Stopping {
    async fn finish(self, shared: &Arc<Shared>) {
        match self.successor {
            Some(pid) => {
                // The admin socket and the metrics listener are the new process's alone
                // before anyone is told it is the service.
                for task in &self.endpoints.tasks {
                    task.abort();
                }
                // The service manager follows the new process; this one is no longer it.
                crate::sys::notify(&format!("MAINPID={pid}"));
                tracing::info!(
                    successor = pid,
                    "upgraded: no longer accepting, serving the connections left"
                );
            }
            None => crate::sys::notify("STOPPING=1"),
        }
        // The copies of the listeners go first: a listener stays open, and takes connections
        // nobody accepts, while any descriptor of it is.
        drop(self.ports);
        if self.successor.is_some() {
            upgrade::hand_over(shared, &self.phase).await;
        }
        drain(shared, &self.phase).await;
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a worker thread panicked");
                }
            }
        });
        joined.await.ok();
        stop_machines(&shared.current().managed).await;
        for task in self.endpoints.tasks {
            task.abort();
        }
        // After an upgrade the path leads to the new process's socket.
        if self.successor.is_none()
            && let Some(path) = &shared.opts.admin_socket
        {
            std::fs::remove_file(path).ok();
        }
        tracing::info!(stats = %serde_json::to_string(&admin::snapshot(shared)).unwrap_or_default(), "stopped");
    }
}

/// Stops accepting, lets live connections finish for the grace period, then closes the
/// rest and waits until none is left.
async fn drain(shared: &Shared, phase_tx: &watch::Sender<Phase>) {
    let live = shared.stats.active.load(Ordering::Acquire);
    tracing::info!(live, grace = ?shared.opts.grace, "stopping: no longer accepting");
    // Each worker closes its listeners at once and serves its connections to their end.
    phase_tx.send_replace(Phase::Drain);
    shared.live.set_draining();
    let drained = tokio::time::timeout(shared.opts.grace, shared.all_ended()).await;
    if drained.is_err() {
        tracing::warn!(
            left = shared.stats.active.load(Ordering::Acquire),
            "grace period over: closing live connections"
        );
        phase_tx.send_replace(Phase::Abort);
        shared.all_ended().await;
    }
}

/// Switches the daemon to `--user`, if given, keeping [`KEPT_CAPABILITIES`].
fn become_user(opts: &RunOptions) -> Result<(), StartError> {
    let Some((name, who)) = &opts.user else {
        return Ok(());
    };
    // SAFETY: getuid has no preconditions.
    if who.uid != 0 && unsafe { libc::getuid() } == who.uid {
        // The new process of an upgrade, started by one that already changed.
        tracing::info!(user = %name, uid = who.uid, "running as an unprivileged user already, with the capabilities passed on");
        return Ok(());
    }
    crate::sys::become_user(who, KEPT_CAPABILITIES).map_err(|source| StartError::User {
        name: name.clone(),
        source,
    })?;
    tracing::info!(user = %name, uid = who.uid, "running as an unprivileged user, with CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_BPF and CAP_PERFMON");
    Ok(())
}

/// The admin socket and the metrics endpoint serving, and a copy of each one's listener for
/// an upgrade to hand over.
struct Endpoints {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    admin: Option<std::os::fd::OwnedFd>,
    metrics: Option<std::os::fd::OwnedFd>,
}

/// The admin socket and the metrics endpoint, those asked for, serving: on the listeners
/// handed over by an upgrade when there are.
async fn endpoints(
    shared: &Arc<Shared>,
    inherited: &mut upgrade::Inherited,
) -> Result<Endpoints, StartError> {
    let mut out = Endpoints {
        tasks: Vec::new(),
        admin: None,
        metrics: None,
    };
    if let Some(path) = &shared.opts.admin_socket {
        let (task, copy) = admin::start_admin(path, Arc::clone(shared), inherited.admin.take())?;
        out.tasks.push(task);
        out.admin = Some(copy);
    }
    if let Some(addr) = shared.opts.metrics_addr {
        let (task, copy) =
            metrics::start_metrics(addr, Arc::clone(shared), inherited.metrics.take()).await?;
        out.tasks.push(task);
        out.metrics = Some(copy);
    }
    Ok(out)
}

/// The stop rule, every `--autostop-interval`, on the services of the config of the moment.
fn autostop(shared: Arc<Shared>) -> AbortOnDrop {
    let every = shared.opts.autostop_interval;
    AbortOnDrop(tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            ticks.tick().await;
            let current = shared.current();
            for pool in &current.pools {
                pool.stop_idle(&current.pools, every);
            }
        }
    }))
}

/// Tells the hold program the public and machine ports of `g` (added to those it knows).
fn watch_ports(plane: &Plane, g: &Generation) -> Result<(), StartError> {
    if let Plane::Sockmap(splicer) = plane {
        splicer
            .kernel
            .watch_ports(g.routes.keys().copied(), g.backend_ports())
            .map_err(StartError::HoldPorts)?;
    }
    Ok(())
}

/// SIGHUP: reads the config file again and serves it, or, if it is invalid or cannot be
/// served, logs why and keeps serving the one before. Counted either way; the service manager
/// hears `RELOADING=1` before and `READY=1` after.
fn reload(
    shared: &Arc<Shared>,
    ports: &mut Ports,
    certs: &mut Option<Arc<crate::tls::CertStore>>,
    source: &mut source::Source,
) {
    crate::sys::notify("RELOADING=1");
    let outcome = source.reread().map_err(|e| e.to_string()).and_then(|()| {
        let old = shared.current();
        serve(shared, ports, certs, source.compose(Some(&old.config)))
    });
    match outcome {
        Ok(next) => {
            shared.reloads.done.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                ports = next.routes.len(),
                services = next.pools.len(),
                machines = next.config.machines.len(),
                "config reloaded"
            );
        }
        Err(e) => {
            shared.reloads.failed.fetch_add(1, Ordering::Relaxed);
            for line in e.lines() {
                tracing::error!("reload refused, still serving the config before: {line}");
            }
        }
    }
    crate::sys::notify("READY=1");
}

/// Serves `config` in place of the config of the moment: its ports bound and its pools
/// ready before it replaces the one before, which keeps serving if any of that fails.
fn serve(
    shared: &Arc<Shared>,
    ports: &mut Ports,
    certs: &mut Option<Arc<crate::tls::CertStore>>,
    config: Config,
) -> Result<Arc<Generation>, String> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let old = shared.current();
    let next =
        Generation::build(config, &shared.opts, Some(&old), certs).map_err(|e| e.to_string())?;
    watch_ports(&shared.plane, &next).map_err(|e| e.to_string())?;
    ports.apply(&next.routes).map_err(|e| e.to_string())?;
    let next = Arc::new(next);
    *shared
        .current
        .write()
        .unwrap_or_else(PoisonError::into_inner) = Arc::clone(&next);
    next.start(Some(&old));
    Ok(next)
}

/// Stops every machine spliced runs and waits for their processes to end (SIGKILL after
/// each one's grace period, then a second more).
async fn stop_machines(machines: &[Arc<Managed>]) {
    let grace = machines
        .iter()
        .map(|m| m.spec.stop_grace)
        .max()
        .unwrap_or_default();
    for m in machines {
        m.stop();
    }
    let all = async {
        for m in machines {
            m.stopped().await;
        }
    };
    if tokio::time::timeout(grace + Duration::from_secs(1), all)
        .await
        .is_err()
    {
        tracing::error!("a machine's process outlived its SIGKILL");
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The TLS side of `port` when it terminates TLS. `certs` is the store every port shares,
/// read on first need. A port that asks for a self-signed certificate, or any port when no
/// `--certs` is given, gets one for the app's names, served when no certificate matches.
fn tls_port(
    config: &Config,
    port: &crate::config::PublicPort,
    opts: &RunOptions,
    certs: &mut Option<Arc<crate::tls::CertStore>>,
) -> Result<Option<crate::tls::TlsPort>, StartError> {
    use crate::{config::Handler, tls};
    let postgres = port.handlers.contains(&Handler::PgTls);
    if !postgres && !port.handlers.contains(&Handler::Tls) {
        return Ok(None);
    }
    let provider = tls::provider();
    if certs.is_none() {
        let s = tls::CertStore::open(opts.certs.as_deref(), Arc::clone(&provider))
            .map_err(StartError::Certs)?;
        tracing::info!(dir = ?opts.certs, names = s.len(), "certificates loaded");
        *certs = Some(Arc::new(s));
    }
    let store = certs.as_ref().map(Arc::clone).expect("read above");
    let mut options = port.tls_options.clone().unwrap_or_default();
    if options.alpn.is_empty() && port.handlers.contains(&Handler::Http) {
        options.alpn = vec!["h2".to_owned(), "http/1.1".to_owned()];
    }
    let self_signed = options.default_self_signed == Some(true) || store.dir().is_none();
    let fallback = if self_signed {
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        if let Some(app) = &config.app {
            names.insert(0, format!("{app}.fly.dev"));
        }
        if store.dir().is_none() {
            tracing::warn!(
                port = port.port,
                ?names,
                "no --certs: this port serves a self-signed certificate"
            );
        }
        Some(tls::certs::self_signed(names, &provider).map_err(|e| StartError::Certs(vec![e]))?)
    } else {
        None
    };
    // Kernel TLS carries a stream of plaintext; the `http` handler reads through rustls.
    let kernel = if port.handlers.contains(&Handler::Http) {
        Err("the http handler reads requests through rustls")
    } else if !opts.kernel_tls {
        Err("--kernel-tls off")
    } else {
        tls::kernel::unavailable().map_or(Ok(()), Err)
    };
    let tls = tls::TlsPort::new(
        &options,
        postgres,
        kernel.is_ok(),
        store,
        fallback,
        provider,
    )
    .map_err(|source| StartError::Tls {
        port: port.port,
        source,
    })?;
    let said = match kernel {
        Ok(()) => "TLS handshakes here, in userspace; then kernel TLS encrypts and decrypts".into(),
        Err(why) => format!("TLS terminates here, in userspace: no kernel TLS ({why})"),
    };
    tracing::info!(
        port = port.port,
        alpn = ?options.alpn,
        versions = ?options.versions,
        self_signed,
        postgres,
        "{said}"
    );
    Ok(Some(tls))
}

/// The `http` handler of `port` of `service`, if it has one; `Fly-Region` is the service's
/// app's `primary_region` (see [`Config::merge`]), else the config's.
fn http_port(
    service: &crate::config::Service,
    config: &Config,
    port: &crate::config::PublicPort,
    opts: &RunOptions,
) -> Result<Option<Arc<crate::http::HttpPort>>, StartError> {
    if !port.handlers.contains(&crate::config::Handler::Http) {
        return Ok(None);
    }
    let settings = crate::http::Settings {
        connect_timeout: opts.connect_timeout,
        response_timeout: opts.http_response_timeout,
        connect_attempts: opts.connect_attempts,
        idle_timeout: opts.idle_timeout,
    };
    let region = service
        .region
        .as_deref()
        .or(config.primary_region.as_deref());
    let http = crate::http::HttpPort::new(port, region, settings, opts.workers.max(1)).map_err(
        |source| StartError::Http {
            port: port.port,
            source,
        },
    )?;
    tracing::info!(
        port = port.port,
        force_https = http.force_https,
        h2_backend = http.options.h2_backend,
        "HTTP handled here: requests are balanced one by one"
    );
    Ok(Some(Arc::new(http)))
}

/// Refuses, at start, a congestion control this kernel will not give a socket, naming the ones
/// it offers; a connection to a machine then never fails for it.
fn check_congestion(name: &str) -> Result<(), StartError> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    crate::sys::set_congestion(std::os::fd::AsFd::as_fd(&probe), name).map_err(|source| {
        StartError::Congestion {
            name: name.to_owned(),
            available: std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
                .map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned()),
            source,
        }
    })?;
    tracing::info!(
        congestion = name,
        "connections to machines use this congestion control"
    );
    Ok(())
}
