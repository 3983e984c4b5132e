//! The `spliced` command line: `run` serves a fly.toml, `check` validates one and prints its
//! routing table.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use proxy_user::{
    balance::QueuePolicy,
    config::{Config, ConfigError},
    dataplane::DataplaneChoice,
    server::{self, RunOptions},
};

/// Per-thread heaps: each request and connection allocates on its worker's thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spliced",
    version,
    about = "Edge TCP proxy whose bytes move through a BPF sockmap"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the services of a fly.toml.
    Run(Box<RunArgs>),
    /// Validate a fly.toml and print what spliced would serve; with --kernel, print what this
    /// host's kernel supports of what the sockmap data plane needs.
    Check(CheckArgs),
    /// Read and change the registry edges follow (`--registry`): apps' fly.toml files and
    /// their machines.
    Registry(Box<RegistryCommand>),
    /// Print a running daemon's live connections (client, service, machine, data plane, state,
    /// age, bytes each way) and per-service totals, from its admin socket.
    Status(StatusArgs),
}

/// Where the registry is and how to reach it.
#[derive(clap::Args, Clone)]
struct RegistryArgs {
    /// The etcd registry: etcd://HOST:PORT[,HOST:PORT...]/PREFIX. Each app's fly.toml is
    /// under PREFIX/apps/APP/config, each of its machines (JSON) under
    /// PREFIX/apps/APP/machines/ID; changes are served as they come.
    #[arg(long, value_name = "URL")]
    registry: Option<String>,
    /// CA certificate (PEM) of etcd's members; talks TLS to them.
    #[arg(long, value_name = "PATH")]
    registry_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, value_name = "PATH", requires = "registry_key")]
    registry_cert: Option<PathBuf>,
    /// Key (PEM) of --registry-cert.
    #[arg(long, value_name = "PATH", requires = "registry_cert")]
    registry_key: Option<PathBuf>,
    /// etcd user; the password is read from `SPLICED_REGISTRY_PASSWORD`.
    #[arg(long, value_name = "NAME")]
    registry_user: Option<String>,
}

impl RegistryArgs {
    fn settings(&self) -> anyhow::Result<Option<proxy_user::registry::Settings>> {
        let Some(url) = &self.registry else {
            return Ok(None);
        };
        let user = match &self.registry_user {
            Some(name) => {
                let password = std::env::var("SPLICED_REGISTRY_PASSWORD").map_err(|_| {
                    anyhow::anyhow!("--registry-user {name}: set SPLICED_REGISTRY_PASSWORD")
                })?;
                Some((name.clone(), password))
            }
            None => None,
        };
        Ok(Some(proxy_user::registry::Settings {
            url: url.parse()?,
            access: proxy_user::registry::Access {
                ca: self.registry_ca.clone(),
                cert: self.registry_cert.clone(),
                key: self.registry_key.clone(),
                user,
            },
        }))
    }
}

/// `spliced registry`.
#[derive(clap::Args)]
struct RegistryCommand {
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(subcommand)]
    op: RegistryOp,
}

#[derive(Subcommand)]
enum RegistryOp {
    /// Write APP's fly.toml, once it reads as one.
    PutConfig { app: String, file: PathBuf },
    /// Write machine ID of APP. With --lease, the machine stays only while this command runs
    /// and keeps its lease alive (as a host agent would): it goes when the command stops, and
    /// when the command's host dies, once the lease expires.
    PutMachine {
        app: String,
        id: String,
        /// Where the app's services accept, at their `internal_port`.
        #[arg(long)]
        address: IpAddr,
        /// A process group the machine runs; repeat for several. Default: every group.
        #[arg(long = "process", value_name = "GROUP")]
        processes: Vec<String>,
        #[arg(long)]
        region: Option<String>,
        /// Time to live of the machine's lease.
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        lease: Option<Duration>,
    },
    /// Remove machine ID of APP.
    RemoveMachine { app: String, id: String },
    /// Remove APP: its fly.toml and its machines.
    RemoveApp { app: String },
    /// Print every app and machine.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

/// `spliced status`.
#[derive(clap::Args)]
struct StatusArgs {
    /// The daemon's `--admin-socket`.
    #[arg(long, value_name = "PATH", default_value = "/run/spliced/admin.sock")]
    admin_socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// `spliced run`. Durations are written as in fly.toml (`"500ms"`, `"5s"`, `"1m30s"`); a bare
/// number is seconds.
#[derive(clap::Args)]
struct RunArgs {
    /// Path of the fly.toml; with --registry, one more app beside the registry's.
    #[arg(long, required_unless_present = "registry")]
    config: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Address to listen on; repeat for several. Default: every IPv4 and IPv6 address.
    #[arg(long = "listen-addr", value_name = "IP")]
    listen_addrs: Vec<IpAddr>,
    /// Who moves the bytes: the kernel (sockmap), userspace (copy), or sockmap when it loads
    /// and copy otherwise (auto).
    #[arg(long, value_enum, default_value_t = DataplaneChoice::Auto)]
    dataplane: DataplaneChoice,
    /// How long live connections may take to finish after SIGINT or SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    grace: Duration,
    /// Bytes the kernel may buffer per direction of a connection before the sender is held
    /// back (sockmap data plane); at least 65536.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    max_buffer: u64,
    /// Kernel memory the proxied sockets of all connections may hold together: as more
    /// connections are live, each one's bound shrinks from --max-buffer (to 16 KiB at
    /// least) so that stalled connections cannot push the host into TCP memory pressure.
    /// Default: half the pressure threshold of `net.ipv4.tcp_mem`.
    #[arg(long, value_name = "BYTES")]
    buffer_budget: Option<u64>,
    /// How long to wait for a backend to accept a connection.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    connect_timeout: Duration,
    /// Unix socket that answers each connection with a JSON snapshot of the counters.
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Log lines as text, or as one JSON object each (for a log pipeline).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    log_format: Format,
    /// Serve Prometheus metrics on ADDR, at `/metrics` (the text format).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Connections that may wait, per service, while every machine is at its hard limit; one
    /// more is closed at once.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    queue_limit: usize,
    /// How long a connection may wait for a machine under its hard limit before it is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    queue_timeout: Duration,
    /// Machines tried per connection, at most, when connects are refused or time out.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    connect_attempts: u16,
    /// How long a connection may go without a byte in either direction before it is closed;
    /// 0 turns this off.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    idle_timeout: Duration,
    /// Count every byte that enters a spliced socket's send path with an `sk_msg` program
    /// (`user_tx_bytes` in the admin snapshot). The kernel then copies every byte it redirects
    /// once more: for audits and tests, not for speed.
    #[arg(long)]
    egress_audit: bool,
    /// TCP congestion control of connections to machines (one of
    /// `/proc/sys/net/ipv4/tcp_allowed_congestion_control`); default: the host's. On a host that
    /// paces its clients with BBR, `cubic` lets machines on this host or its LAN be fed
    /// at the speed of memory.
    #[arg(long, value_name = "ALGO")]
    backend_congestion: Option<String>,
    /// Pair connections to machines on this host with the application's own socket. `on` is
    /// refused: no pairing keeps every application's stream exact on this kernel (see
    /// docs/same-host-bypass.md).
    #[arg(long, value_enum, default_value_t = Toggle::Off)]
    same_host_bypass: Toggle,
    /// Directory of PEM certificates for `tls` and `pg_tls` ports, chosen by the client's SNI
    /// (exact name, then wildcard, then the file named `default`), each with its key after it
    /// or in a file of the same name ending `.key`; re-read when it changes. Without it, TLS
    /// ports serve a self-signed certificate.
    #[arg(long, value_name = "DIR")]
    certs: Option<PathBuf>,
    /// How long a client may take over its TLS handshake.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    tls_handshake_timeout: Duration,
    /// After the handshake, hand each TLS session of a port that forwards plaintext (`tls`,
    /// `pg_tls` without `http`) to the kernel, which then encrypts and decrypts its records:
    /// `auto` where the kernel has TLS (`CONFIG_TLS`), `off` to keep TLS in userspace.
    #[arg(long, value_enum, default_value_t = Auto::Auto)]
    kernel_tls: Auto,
    /// How long a machine may take to send the head of its response to an HTTP request before
    /// the client is answered 504.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    http_response_timeout: Duration,
    /// Threads that accept and serve connections, each with a listener of its own on every
    /// public address (`SO_REUSEPORT`); default: one per CPU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
    /// Once the programs are loaded and the ports bound, run as this user (and its groups),
    /// keeping only `CAP_NET_ADMIN` (socket buffers past the host's caps, a congestion control
    /// the host does not allow everyone), `CAP_NET_BIND_SERVICE` (ports below 1024 that a
    /// reload adds), `CAP_BPF` and `CAP_PERFMON` (the programs an upgrade's new process
    /// loads). Machines spliced starts run as this user too, with no capability.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// How long a connection that finds no machine running waits for one of the machines
    /// spliced runs (`[[machines]]` with `command`) to start and accept.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    start_timeout: Duration,
    /// How often idle machines are looked at for `auto_stop_machines`.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
    autostop_interval: Duration,
    /// How long a machine spliced stops has between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    machine_stop_grace: Duration,
}

/// `spliced check`.
#[derive(clap::Args)]
struct CheckArgs {
    /// Path of the fly.toml.
    #[arg(long, required_unless_present = "kernel")]
    config: Option<PathBuf>,
    /// Probe this host's kernel instead (root): every map type, program type and helper the
    /// BPF programs use, cgroup v2, and a trial load and attach. Exits 1 when the sockmap data
    /// plane cannot run here.
    #[arg(long, conflicts_with = "config")]
    kernel: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Auto {
    Auto,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Toggle {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// Why `--same-host-bypass on` is refused.
const SAME_HOST_REFUSAL: &str = "--same-host-bypass on is refused: pairing puts the \
application's own socket into a socket map before the application accepts it, and every socket \
in a socket map reads through the kernel's tcp_bpf_recvmsg. Bytes the map puts into its queue \
are invisible to splice(2) (Go's io.Copy, HAProxy), and a blocking read there returns EAGAIN \
when it is woken without data (the application's own FIN acknowledged, a write-space wake-up, \
a signal). Connections to machines on this host take the verdict path like any other; see \
docs/same-host-bypass.md";

/// A duration as fly.toml writes one (`"1m30s"`), or a bare number of seconds.
fn duration(s: &str) -> Result<Duration, String> {
    proxy_user::config::parse_duration(s)
        .or_else(|| {
            s.parse::<f64>()
                .ok()
                .and_then(|v| Duration::try_from_secs_f64(v).ok())
        })
        .ok_or_else(|| format!("{s:?} is not a duration (such as 500ms, 5s, 1m30s, or seconds)"))
}

impl TryFrom<&RunArgs> for RunOptions {
    type Error = anyhow::Error;

    fn try_from(a: &RunArgs) -> anyhow::Result<Self> {
        anyhow::ensure!(a.same_host_bypass == Toggle::Off, "{SAME_HOST_REFUSAL}");
        anyhow::ensure!(
            a.max_buffer >= 64 * 1024,
            "--max-buffer: at least 65536 bytes"
        );
        Ok(Self {
            listen_addrs: a.listen_addrs.clone(),
            dataplane: a.dataplane,
            grace: a.grace,
            max_buffer: a.max_buffer,
            buffer_budget: a.buffer_budget,
            connect_timeout: a.connect_timeout,
            admin_socket: a.admin_socket.clone(),
            metrics_addr: a.metrics_addr,
            queue: QueuePolicy {
                limit: a.queue_limit,
                max_wait: a.queue_timeout,
            },
            connect_attempts: usize::from(a.connect_attempts),
            idle_timeout: Some(a.idle_timeout).filter(|d| !d.is_zero()),
            egress_audit: a.egress_audit,
            backend_congestion: a.backend_congestion.clone(),
            certs: a.certs.clone(),
            tls_handshake_timeout: a.tls_handshake_timeout,
            kernel_tls: a.kernel_tls == Auto::Auto,
            http_response_timeout: a.http_response_timeout,
            workers: a.workers.map_or_else(
                || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                usize::from,
            ),
            machines: proxy_user::machines::Timing {
                start_timeout: a.start_timeout,
                stop_grace: a.machine_stop_grace,
            },
            autostop_interval: a.autostop_interval,
            config_path: a.config.clone(),
            registry: a.registry.settings()?,
            user: a
                .user
                .as_ref()
                .map(|name| {
                    proxy_user::sys::lookup_user(name)
                        .map(|id| (name.clone(), id))
                        .map_err(|e| anyhow::anyhow!("--user {name}: {e}"))
                })
                .transpose()?,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Run(a) if matches!(a.log_format, Format::Json));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        // Colours for a terminal only: a log file or journal gets plain text.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli.command {
        Command::Check(a) => match &a.config {
            Some(config) => check(config, a.format),
            None => check_kernel(a.format),
        },
        Command::Run(a) => run(&a),
        Command::Registry(a) => registry(&a),
        Command::Status(a) => status(&a),
    }
}

/// `spliced status`: the daemon's `connections` answer, as a table or as it came.
fn status(args: &StatusArgs) -> ExitCode {
    match proxy_user::status::ask(&args.admin_socket, "connections") {
        Ok(report) => {
            match args.format {
                Format::Text => print!("{}", proxy_user::status::render(&report)),
                Format::Json => println!("{report}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spliced: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `spliced run`: options, then the config, then the daemon until it stops.
fn run(args: &RunArgs) -> ExitCode {
    let opts = match RunOptions::try_from(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("spliced: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match &args.config {
        Some(path) => match load_servable(path) {
            Some(c) => Some(c),
            None => return ExitCode::from(2),
        },
        None => None,
    };
    raise_fd_limit();
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(server::run(config, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime `builder` makes, timers and I/O enabled; `None` (said on stderr) if it cannot.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .map_err(|e| eprintln!("spliced: cannot start the runtime: {e}"))
        .ok()
}

/// The config at `path` if `spliced run` can serve it; else `None`, every reason printed.
fn load_servable(path: &std::path::Path) -> Option<Config> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return None;
        }
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let unservable = config.unservable();
    if !unservable.is_empty() {
        for problem in unservable {
            eprintln!("{}: {problem}", path.display());
        }
        eprintln!("spliced: refusing to start; `spliced check` shows what each port needs");
        return None;
    }
    Some(config)
}

/// `spliced registry`: one operation on the registry; 0 when done, 1 when etcd failed it,
/// 2 when the input is wrong.
fn registry(args: &RegistryCommand) -> ExitCode {
    use proxy_user::registry::{MachineRecord, RegistryError, ops};
    let settings = match args.registry.settings() {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!(
                "spliced registry: --registry etcd://HOST:PORT[,HOST:PORT...]/PREFIX is needed"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("spliced registry: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    let done: Result<(), RegistryError> = runtime.block_on(async {
        match &args.op {
            RegistryOp::PutConfig { app, file } => {
                let revision = ops::put_config(&settings, app, file).await?;
                println!(
                    "{}: written at revision {revision}",
                    settings.config_key(app)
                );
            }
            RegistryOp::PutMachine {
                app,
                id,
                address,
                processes,
                region,
                lease,
            } => {
                let record = MachineRecord {
                    address: *address,
                    processes: processes.clone(),
                    region: region.clone(),
                };
                ops::put_machine(&settings, app, id, &record, *lease, stop_signal()).await?;
                if lease.is_none() {
                    println!("{}: written", settings.machine_key(app, id));
                }
            }
            RegistryOp::RemoveMachine { app, id } => {
                let key = settings.machine_key(app, id);
                if ops::remove_machine(&settings, app, id).await? {
                    println!("{key}: removed");
                } else {
                    println!("{key}: was not there");
                }
            }
            RegistryOp::RemoveApp { app } => {
                let n = ops::remove_app(&settings, app).await?;
                println!("app {app}: {n} key(s) removed");
            }
            RegistryOp::List { format } => {
                let listing = ops::list(&settings).await?;
                match format {
                    Format::Text => print!("{}", listing.render()),
                    Format::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&listing).unwrap_or_default()
                    ),
                }
            }
        }
        Ok(())
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(
            e
            @ (RegistryError::Invalid(_) | RegistryError::Url { .. } | RegistryError::File { .. }),
        ) => {
            eprintln!("spliced registry: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("spliced registry: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves at SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            tokio::signal::ctrl_c().await.ok();
        }
    }
}

/// Each connection holds two sockets: take every descriptor the kernel allows a process
/// (`fs.nr_open`) where this process may raise its hard limit (root), else every one the
/// hard limit allows. Only ever raised; the limit stays after `--user`.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit reads only into the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return;
    }
    let before = lim.rlim_cur;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(0);
    let set = |cur, max| {
        let want = libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        // SAFETY: setrlimit reads only the struct passed.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const want) == 0 }
    };
    let raised = if nr_open > lim.rlim_max && set(nr_open, nr_open) {
        nr_open
    } else if lim.rlim_cur < lim.rlim_max && set(lim.rlim_max, lim.rlim_max) {
        lim.rlim_max
    } else {
        before
    };
    if raised > before {
        tracing::info!(from = before, to = raised, "raised the open-file limit");
    } else if raised < lim.rlim_max {
        tracing::warn!("cannot raise the open-file limit to {}", lim.rlim_max);
    }
}

/// `spliced check --kernel`: 0 when the sockmap data plane can run on this kernel, else 1.
fn check_kernel(format: Format) -> ExitCode {
    let support = proxy_user::dataplane::probe::Support::probe(true);
    let ready = support.sockmap_ready();
    match format {
        Format::Text => print!("{}", support.render_text()),
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "kernel": support.kernel,
                "checks": support.checks,
                "sockmap": match &ready {
                    Ok(()) => serde_json::json!({ "available": true }),
                    Err(why) => serde_json::json!({ "available": false, "why": why }),
                },
            })
        ),
    }
    if ready.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `spliced check`: 0 and the routing table when valid, 2 and every error otherwise.
fn check(path: &std::path::Path, format: Format) -> ExitCode {
    match (Config::load(path), format) {
        (Ok(c), Format::Text) => {
            print!("{}", proxy_user::check::render_text(&c));
            eprint!("{}", proxy_user::check::render_warnings(&c));
            ExitCode::SUCCESS
        }
        (Ok(c), Format::Json) => {
            let report = proxy_user::check::Report::new(&c);
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("the report serializes")
            );
            ExitCode::SUCCESS
        }
        (Err(e), Format::Text) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        (Err(e), Format::Json) => {
            let errors = match &e {
                ConfigError::Invalid(d) => serde_json::to_value(d).unwrap_or_default(),
                ConfigError::Read { .. } => serde_json::json!([{ "message": e.to_string() }]),
            };
            println!(
                "{}",
                serde_json::json!({ "valid": false, "errors": errors })
            );
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = [&["spliced", "run", "--config", "fly.toml"], extra].concat();
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Run(a) => *a,
            Command::Check(_) | Command::Status(_) | Command::Registry(_) => {
                unreachable!("run was parsed")
            }
        })
    }

    #[test]
    fn durations_as_in_the_config_or_seconds() {
        let a = run_args(&[
            "--grace",
            "1m30s",
            "--queue-timeout",
            "500ms",
            "--idle-timeout",
            "2",
        ])
        .expect("parses");
        let o = RunOptions::try_from(&a).expect("valid");
        assert_eq!(o.grace, Duration::from_secs(90));
        assert_eq!(o.queue.max_wait, Duration::from_millis(500));
        assert_eq!(o.idle_timeout, Some(Duration::from_secs(2)));
        assert_eq!(o.connect_timeout, Duration::from_secs(5), "the default");
        let off = run_args(&["--idle-timeout", "0"]).expect("parses");
        assert_eq!(
            RunOptions::try_from(&off).expect("valid").idle_timeout,
            None
        );
        let bad = run_args(&["--grace", "soon"]).err().expect("refused");
        assert!(bad.to_string().contains("is not a duration"), "{bad}");
    }

    #[test]
    fn invalid_options_are_refused_with_the_flag() {
        let small = run_args(&["--max-buffer", "1000"]).expect("parses");
        let e = RunOptions::try_from(&small).expect_err("refused");
        assert!(e.to_string().contains("--max-buffer"), "{e}");
        let bypass = run_args(&["--same-host-bypass", "on"]).expect("parses");
        let e = RunOptions::try_from(&bypass).expect_err("refused");
        assert!(e.to_string().contains("splice(2)"), "{e}");
    }
}
