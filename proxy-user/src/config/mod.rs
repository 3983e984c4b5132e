//! The fly.toml service model. A file is parsed into a span-carrying TOML tree, read section
//! by section into the checked types below (`read`), and resolved into a routing table
//! (`route`): which service owns each public port and which machines serve each service.
//! Every problem names the file, line, column and field path; one run reports all of them.
//! Sections an L4 edge proxy does not act on are accepted and listed in [`Config::ignored`].

mod fleet;
mod read;
mod route;
mod source;
mod words;

use std::{net::IpAddr, path::Path, time::Duration};

use serde::{Serialize, Serializer};

pub use fleet::Merged;
pub use route::LOCAL_MACHINE;
pub use source::Diagnostic;
pub use words::parse_duration;

/// The signals fly.toml's `kill_signal` may name, as Fly accepts them.
pub const KILL_SIGNALS: [&str; 7] = [
    "SIGINT", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGSTOP",
];

/// Ports given to the first service that declares no public port, as fly does.
pub const DEFAULT_PUBLIC_PORTS: [u16; 2] = [80, 443];
/// `internal_port` when a service does not give one, as fly's.
pub const DEFAULT_INTERNAL_PORT: u16 = 8080;
/// Interval of a health check that gives none, as fly's.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(15);
/// Timeout of a health check that gives none, as fly's.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// The process group of an app whose file has no `[processes]`.
pub const DEFAULT_PROCESS_GROUP: &str = "app";

/// A checked configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// `app`: the application's name, if given.
    pub app: Option<String>,
    /// `primary_region`, if given.
    pub primary_region: Option<String>,
    /// `[env]`, in file order, values as text. Kept for processes spliced may launch.
    pub env: Vec<EnvVar>,
    /// Names of the process groups: the keys of `[processes]`, or `app` without one.
    pub process_groups: Vec<String>,
    /// Services in file order: `[http_service]` first when present, then `[[services]]`.
    pub services: Vec<Service>,
    /// The backends: `[[machines]]`, or one implicit local machine.
    pub machines: Vec<Machine>,
    /// `kill_signal`: the signal that stops the machines spliced runs, as Fly stops a
    /// machine (`SIGINT`, `SIGTERM`...); `None`: SIGTERM.
    pub kill_signal: Option<String>,
    /// `kill_timeout`: how long a stopping machine has before SIGKILL; `None`: the
    /// `--machine-stop-grace` flag.
    #[serde(serialize_with = "opt_millis")]
    pub kill_timeout: Option<Duration>,
    /// Top-level sections accepted but not acted on, and owned keys spliced leaves alone.
    pub ignored: Vec<String>,
    /// Things worth fixing that do not stop the file from being served.
    pub warnings: Vec<Diagnostic>,
}

/// One `[env]` variable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// One service: a `[[services]]` block or the `[http_service]` shorthand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Index in [`Config::services`]; the kernel's counters are kept per id.
    pub id: u32,
    /// Where it comes from: `services[N]` (N counts the file's blocks) or `http_service`.
    pub name: String,
    pub protocol: Protocol,
    /// Port of the application on each machine. Default 8080.
    pub internal_port: u16,
    /// Process groups that run it; empty means every group.
    pub processes: Vec<String>,
    /// How the service got its public ports.
    pub exposure: Exposure,
    /// Public ports, in file order; empty when internal-only.
    pub ports: Vec<PublicPort>,
    pub concurrency: Option<Concurrency>,
    pub tcp_checks: Vec<TcpCheck>,
    pub http_checks: Vec<HttpCheck>,
    /// `auto_stop_machines`; fly's bool form `true` is `stop`.
    pub auto_stop_machines: Option<AutoStop>,
    pub auto_start_machines: Option<bool>,
    pub min_machines_running: Option<u32>,
    pub auto_deploy: Option<bool>,
    /// Ids of the machines that serve it (those running one of its process groups).
    pub machines: Vec<String>,
    /// `primary_region` of the app it belongs to, when several apps are served together
    /// (see [`Config::merge`]); `None`: the config's own.
    #[serde(skip)]
    pub region: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// How a service got its public ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exposure {
    /// It declares them (`port`, `[[services.ports]]`, or `[http_service]`).
    Declared,
    /// The first service without a public port: 80 and 443, those no other service claims.
    DefaultPorts,
    /// A later service without a public port: never bound on a public address.
    InternalOnly,
}

/// A public port of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublicPort {
    pub port: u16,
    /// Handlers in order; empty means raw TCP.
    pub handlers: Vec<Handler>,
    /// Redirect plain HTTP to HTTPS (needs the `http` handler).
    pub force_https: bool,
    /// The PROXY protocol version written to the backend when `proxy_proto` is a handler.
    pub proxy_proto: Option<ProxyProtoVersion>,
    /// `tls_options`, checked and kept for the TLS handler.
    pub tls_options: Option<TlsOptions>,
    /// `http_options`, kept for the HTTP handler as written (keys in file order).
    pub http_options: Option<serde_json::Value>,
    /// Line in the file where this port is declared (0 for ports given by default).
    pub line: usize,
}

impl PublicPort {
    /// A raw TCP port (no handler) declared at `line` (0: given by default).
    pub fn raw(port: u16, line: usize) -> Self {
        Self {
            port,
            handlers: Vec::new(),
            force_https: false,
            proxy_proto: None,
            tls_options: None,
            http_options: None,
            line,
        }
    }

    /// Handlers this build cannot serve yet; the port is refused by `spliced run`.
    pub fn unimplemented_handlers(&self) -> Vec<Handler> {
        self.handlers
            .iter()
            .copied()
            .filter(|h| {
                !matches!(
                    h,
                    Handler::ProxyProto
                        | Handler::Tls
                        | Handler::PgTls
                        | Handler::Http
                        | Handler::EdgeHttp
                )
            })
            .collect()
    }
}

/// What fly can do to a connection before it reaches the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Handler {
    Tls,
    Http,
    ProxyProto,
    PgTls,
    EdgeHttp,
}

impl Handler {
    pub const ALL: [(&'static str, Self); 5] = [
        ("tls", Self::Tls),
        ("http", Self::Http),
        ("proxy_proto", Self::ProxyProto),
        ("pg_tls", Self::PgTls),
        ("edge_http", Self::EdgeHttp),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, h)| *h == self)
            .map_or("?", |(n, _)| n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtoVersion {
    V1,
    V2,
}

/// `tls_options` of a port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TlsOptions {
    pub alpn: Vec<String>,
    pub versions: Vec<String>,
    pub default_self_signed: Option<bool>,
}

/// `[services.concurrency]`: what fly-proxy counts per machine and its limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Concurrency {
    #[serde(rename = "type")]
    pub kind: ConcurrencyKind,
    /// No new connection goes to a machine at this many.
    pub hard_limit: Option<u32>,
    /// Machines below this many are preferred.
    pub soft_limit: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyKind {
    Connections,
    Requests,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoStop {
    Off,
    Stop,
    Suspend,
}

/// `[[services.tcp_checks]]`: a machine passes when it accepts a connection on its
/// internal port within the timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TcpCheck {
    #[serde(serialize_with = "millis")]
    pub interval: Duration,
    #[serde(serialize_with = "millis")]
    pub timeout: Duration,
    #[serde(serialize_with = "opt_millis")]
    pub grace_period: Option<Duration>,
}

/// `[[services.http_checks]]`: a request that must get a 2xx within the timeout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpCheck {
    #[serde(serialize_with = "millis")]
    pub interval: Duration,
    #[serde(serialize_with = "millis")]
    pub timeout: Duration,
    #[serde(serialize_with = "opt_millis")]
    pub grace_period: Option<Duration>,
    /// Upper-case method; default GET.
    pub method: String,
    /// Default `/`.
    pub path: String,
    /// `http` (default) or `https`.
    pub protocol: String,
    pub tls_skip_verify: bool,
    pub tls_server_name: Option<String>,
    pub headers: Vec<Header>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A backend host: `[[machines]]`, our extension, or the implicit local machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub id: String,
    pub address: IpAddr,
    /// Process groups it runs; empty means every group.
    pub processes: Vec<String>,
    pub region: Option<String>,
    /// `command`: a machine spliced runs itself as a child process (program and arguments);
    /// `None` for a machine spliced only routes to.
    pub command: Option<Vec<String>>,
    /// `dir`: the working directory of the command.
    pub dir: Option<String>,
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

#[expect(clippy::ref_option, reason = "serde's serialize_with passes &Option")]
fn opt_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Every error found, in file order; the warnings found beside them are dropped.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// Checks `text`, naming `file` in messages.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(file, text, None)
    }

    /// [`Config::parse`]; with `registry`, the file is one app of a registry, served by those
    /// machines (besides its own, if it lists any) and by no implicit local machine.
    fn parse_with(
        file: &str,
        text: &str,
        registry: Option<Vec<Machine>>,
    ) -> Result<Self, ConfigError> {
        let mut r = source::Reader::new(file, text);
        let (mut config, sites) = read::read(&mut r, text)?;
        let implicit_local = registry.is_none();
        if let Some(machines) = registry {
            fleet::add_machines(&mut r, &mut config, machines);
        }
        route::resolve(&mut r, &mut config, &sites, implicit_local);
        let by_place = |d: &Diagnostic| (d.line, d.column);
        if !r.errors.is_empty() {
            r.errors.sort_by_key(by_place);
            return Err(ConfigError::Invalid(r.errors));
        }
        r.warnings.sort_by_key(by_place);
        config.warnings = r.warnings;
        Ok(config)
    }

    /// Every (service, public port) pair, in file order.
    pub fn public_ports(&self) -> impl Iterator<Item = (&Service, &PublicPort)> {
        self.services
            .iter()
            .flat_map(|s| s.ports.iter().map(move |p| (s, p)))
    }

    /// The machines serving `service`.
    pub fn machines_of<'c>(&'c self, service: &'c Service) -> impl Iterator<Item = &'c Machine> {
        self.machines
            .iter()
            .filter(|m| service.machines.contains(&m.id))
    }

    /// Why `spliced run` cannot serve this config, one message per port; empty when it can.
    pub fn unservable(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (s, p) in self.public_ports() {
            if s.protocol == Protocol::Udp {
                out.push(format!(
                    "port {}/udp ({}): UDP services are not implemented yet",
                    p.port, s.name
                ));
                continue;
            }
            if p.handlers.contains(&Handler::EdgeHttp) {
                out.push(format!(
                    "port {} ({}): edge_http is a handler of Fly's own edge, not one an app's ports can use; use http",
                    p.port, s.name
                ));
                continue;
            }
            let missing = p.unimplemented_handlers();
            if !missing.is_empty() {
                let names: Vec<&str> = missing.iter().map(|h| h.name()).collect();
                let (noun, verb) = if names.len() == 1 {
                    ("handler", "is")
                } else {
                    ("handlers", "are")
                };
                out.push(format!(
                    "port {} ({}): {noun} {} {verb} not implemented yet; spliced serves raw TCP, tls, pg_tls, http and proxy_proto",
                    p.port,
                    s.name,
                    names.join(", ")
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
