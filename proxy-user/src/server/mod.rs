//! The daemon: binds the public ports, accepts, connects each client to its service's
//! backend, hands the pair to the data plane, and on SIGINT/SIGTERM stops accepting, lets
//! live connections finish for the grace period, then closes the rest.

mod admin;
mod connection;
mod listen;
mod terminate;

pub use listen::worker_index;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::{
    balance::{Demand, Pool, QueuePolicy},
    config::{AutoStop, Config, ProxyProtoVersion},
    dataplane::{DataplaneChoice, Phase, Plane, kernel::LoadError, sockmap},
    machines::Managed,
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
    /// Whether an `sk_msg` program counts every byte entering a spliced socket's send path.
    pub egress_audit: bool,
    /// TCP congestion control of connections to machines; `None`: the host's default.
    pub backend_congestion: Option<String>,
    /// Where the certificates of TLS ports are (`--certs`); `None`: self-signed ones.
    pub certs: Option<PathBuf>,
    /// How long a client may take over its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How long a machine may take to send the head of its response to an HTTP request.
    pub http_response_timeout: Duration,
    /// Threads that accept and serve connections, each with listeners of its own.
    pub workers: usize,
    /// Start and stop timings of the machines spliced runs.
    pub machines: crate::machines::Timing,
    /// How often the stop rule looks at idle machines.
    pub autostop_interval: Duration,
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
    /// TLS handshakes completed on `tls` and `pg_tls` ports.
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed or timed out; the client is closed.
    pub tls_failed: AtomicU64,
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
    stats: ConnStats,
    opts: RunOptions,
    /// One per service, in service order.
    pools: Vec<Arc<Pool>>,
    /// Signalled when the last live connection ends (`stats.active` falls to zero).
    none_live: Notify,
    http: Arc<crate::http::HttpStats>,
    /// The machines spliced runs, in config order.
    managed: Vec<Arc<Managed>>,
}

impl Shared {
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

/// Runs the daemon until a stop signal and the end of the grace period.
#[expect(clippy::too_many_lines, reason = "start, serve, drain: one sequence")]
pub async fn run(config: Config, opts: RunOptions) -> Result<(), StartError> {
    let settings = sockmap::Settings {
        max_buffer: opts.max_buffer,
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
    let managed = managed_machines(&config, opts.machines);
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
            let runs = machines
                .iter()
                .map(|(id, _)| managed.iter().find(|m| &m.spec.id == id).cloned())
                .collect();
            let limits = service.concurrency;
            let demand = Demand {
                auto_start: service.auto_start_machines.unwrap_or(true),
                auto_stop: service.auto_stop_machines.unwrap_or(AutoStop::Off),
                min_running: service.min_machines_running.unwrap_or(0),
            };
            Arc::new(
                Pool::new(
                    service.name.clone(),
                    machines,
                    limits.and_then(|c| c.soft_limit),
                    limits.and_then(|c| c.hard_limit),
                    opts.queue,
                )
                .with_demand(demand, runs),
            )
        })
        .collect();
    for pool in &pools {
        pool.start_kept();
    }
    let _autostop = (!managed.is_empty()).then(|| {
        let (pools, every) = (pools.clone(), opts.autostop_interval);
        AbortOnDrop(tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                ticks.tick().await;
                for pool in &pools {
                    pool.stop_idle(&pools);
                }
            }
        }))
    });
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
    let mut certs = None;
    let workers = opts.workers.max(1);
    // Per worker thread: its own listener of every public address (SO_REUSEPORT).
    let mut listeners: Vec<Vec<(std::net::TcpListener, Arc<Route>)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for (service, port) in config.public_ports() {
        let pool = Arc::clone(&pools[service.id as usize]);
        if pool.machines.is_empty() {
            tracing::warn!(port = port.port, service = %service.name, "no machine serves this port: its connections will be refused");
        }
        let tls = tls_port(&config, port, &opts, &mut certs)?;
        let http = http_port(&config, port, &opts, workers)?;
        let route = Arc::new(Route {
            service: service.id,
            pool,
            proxy_proto: port.proxy_proto,
            tls,
            http,
        });
        for ip in &listen_addrs {
            let addr = SocketAddr::new(*ip, port.port);
            for set in &mut listeners {
                let listener =
                    listen::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
                set.push((listener, Arc::clone(&route)));
            }
            tracing::info!(
                %addr,
                service = %service.name,
                internal_port = service.internal_port,
                proxy_proto = ?port.proxy_proto,
                workers,
                "listening"
            );
        }
    }
    if listeners[0].is_empty() {
        // An app without services (a worker, a VPN node) is valid: Fly routes nothing to it.
        tracing::warn!("the config has no public port: spliced listens on nothing");
    }

    let shared = Arc::new(Shared {
        plane,
        stats: ConnStats::default(),
        opts,
        pools,
        none_live: Notify::new(),
        http: Arc::default(),
        managed,
    });
    // Dropped (which stops every check) when the daemon returns.
    let _health = crate::health::start(&config.services, &shared.pools);
    let _certs = certs
        .filter(|c: &Arc<crate::tls::CertStore>| c.dir().is_some())
        .map(|c| AbortOnDrop(crate::tls::watch(c)));
    let (phase_tx, phase_rx) = watch::channel(Phase::Serve);
    let mut threads = Vec::new();
    for (index, set) in listeners.into_iter().enumerate() {
        let (shared, phase) = (Arc::clone(&shared), phase_rx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("spliced-w{index}"))
            .spawn(move || listen::worker(index, set, &shared, phase))?;
        threads.push(thread);
    }

    let admin = match &shared.opts.admin_socket {
        Some(path) => Some(admin::start_admin(path, Arc::clone(&shared))?),
        None => None,
    };
    tracing::info!("spliced is serving");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }

    let live = shared.stats.active.load(Ordering::Acquire);
    tracing::info!(live, grace = ?shared.opts.grace, "stopping: no longer accepting");
    // Each worker closes its listeners at once and serves its connections to their end.
    phase_tx.send_replace(Phase::Drain);
    let drained = tokio::time::timeout(shared.opts.grace, shared.all_ended()).await;
    if drained.is_err() {
        tracing::warn!(
            left = shared.stats.active.load(Ordering::Acquire),
            "grace period over: closing live connections"
        );
        phase_tx.send_replace(Phase::Abort);
        shared.all_ended().await;
    }
    let joined = tokio::task::spawn_blocking(move || {
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    });
    joined.await.ok();
    stop_machines(&shared.managed, shared.opts.machines.stop_grace).await;
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(path) = &shared.opts.admin_socket {
        std::fs::remove_file(path).ok();
    }
    tracing::info!(stats = %serde_json::to_string(&admin::snapshot(&shared)).unwrap_or_default(), "stopped");
    Ok(())
}

/// The machines spliced runs: each `[[machines]]` entry with a `command`, given the config's
/// `[env]` and `PORT`, the `internal_port` of the first service it serves, where it must
/// accept to be started. A machine that serves no service is never started.
fn managed_machines(config: &Config, timing: crate::machines::Timing) -> Vec<Arc<Managed>> {
    let runtime = tokio::runtime::Handle::current();
    let mut out = Vec::new();
    for m in &config.machines {
        let Some(command) = &m.command else {
            continue;
        };
        let Some(service) = config.services.iter().find(|s| s.machines.contains(&m.id)) else {
            tracing::warn!(machine = %m.id, "the machine serves no service: spliced never starts it");
            continue;
        };
        let mut env: Vec<(String, String)> = config
            .env
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect();
        env.push(("PORT".to_owned(), service.internal_port.to_string()));
        let spec = crate::machines::Spec {
            id: m.id.clone(),
            command: command.clone(),
            dir: m.dir.as_ref().map(PathBuf::from),
            env,
            ready: SocketAddr::new(m.address, service.internal_port),
        };
        out.push(Managed::new(spec, timing, runtime.clone()));
    }
    out
}

/// Stops every machine spliced runs and waits for their processes to end (SIGKILL after
/// the grace period, then a second more).
async fn stop_machines(machines: &[Arc<Managed>], grace: Duration) {
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
    let tls =
        tls::TlsPort::new(&options, postgres, store, fallback, provider).map_err(|source| {
            StartError::Tls {
                port: port.port,
                source,
            }
        })?;
    tracing::info!(
        port = port.port,
        alpn = ?options.alpn,
        versions = ?options.versions,
        self_signed,
        postgres,
        "TLS terminates here, in userspace: this kernel path does not carry TLS"
    );
    Ok(Some(tls))
}

/// The `http` handler of `port`, if it has one.
fn http_port(
    config: &Config,
    port: &crate::config::PublicPort,
    opts: &RunOptions,
    workers: usize,
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
    let http =
        crate::http::HttpPort::new(port, config.primary_region.as_deref(), settings, workers)
            .map_err(|source| StartError::Http {
                port: port.port,
                source,
            })?;
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
