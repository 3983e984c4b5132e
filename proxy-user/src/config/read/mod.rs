//! Reads each section of a fly.toml into the checked model, keeping the positions that
//! routing needs for its own messages.

use std::{net::IpAddr, time::Duration};

use toml::de::DeValue;

mod checks;
mod machines;
mod ports;
mod service;

use self::{
    checks::{read_concurrency, read_http_check, read_tcp_check},
    machines::read_machine,
    ports::{read_ports, read_tls, to_json},
    service::{read_http_service, read_service},
};
use super::{
    AutoStop, Concurrency, ConcurrencyKind, Config, ConfigError, DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT, DEFAULT_INTERNAL_PORT, DEFAULT_PROCESS_GROUP, EnvVar, Exposure, Handler,
    Header, HttpCheck, KILL_SIGNALS, Machine, Protocol, ProxyProtoVersion, PublicPort, Service,
    TcpCheck, TlsOptions,
    source::{Reader, Table, Value, scalar_text, show},
    words::did_you_mean,
};

/// Top-level keys spliced acts on.
const OWNED: &[&str] = &[
    "app",
    "primary_region",
    "env",
    "processes",
    "services",
    "http_service",
    "machines",
    "kill_signal",
    "kill_timeout",
];
/// Top-level keys of fly.toml that an L4 edge proxy has no use for: accepted and listed.
pub(super) const FLY_SECTIONS: &[&str] = &[
    "swap_size_mb",
    "console_command",
    "host_dedication_id",
    "build",
    "deploy",
    "experimental",
    "mounts",
    "mount",
    "vm",
    "compute",
    "checks",
    "machine_checks",
    "statics",
    "metrics",
    "restart",
    "files",
];
pub(super) const SERVICE_KEYS: &[&str] = &[
    "internal_port",
    "protocol",
    "processes",
    "auto_stop_machines",
    "auto_start_machines",
    "min_machines_running",
    "auto_deploy",
    "port",
    "ports",
    "concurrency",
    "tcp_checks",
    "http_checks",
    "machine_checks",
    "script_checks",
];
pub(super) const HTTP_SERVICE_KEYS: &[&str] = &[
    "internal_port",
    "processes",
    "force_https",
    "auto_stop_machines",
    "auto_start_machines",
    "min_machines_running",
    "concurrency",
    "checks",
    "machine_checks",
    "tls_options",
    "http_options",
];
pub(super) const PORT_KEYS: &[&str] = &[
    "port",
    "start_port",
    "end_port",
    "handlers",
    "force_https",
    "tls_options",
    "http_options",
    "proxy_proto_options",
];
pub(super) const CONCURRENCY_KEYS: &[&str] = &["type", "hard_limit", "soft_limit"];
pub(super) const TCP_CHECK_KEYS: &[&str] =
    &["interval", "timeout", "grace_period", "restart_limit"];
pub(super) const HTTP_CHECK_KEYS: &[&str] = &[
    "interval",
    "timeout",
    "grace_period",
    "restart_limit",
    "method",
    "path",
    "protocol",
    "tls_skip_verify",
    "tls_server_name",
    "headers",
];
pub(super) const TLS_KEYS: &[&str] = &["alpn", "versions", "default_self_signed"];
pub(super) const MACHINE_KEYS: &[&str] =
    &["id", "address", "processes", "region", "command", "dir"];

/// Where things were written, for the messages routing gives after reading.
#[derive(Default)]
pub(super) struct Sites {
    /// Per service (same order as `Config::services`): where it is declared.
    pub services: Vec<usize>,
    /// Per service: where each public port is declared, and its field path.
    pub ports: Vec<Vec<(usize, String)>>,
    /// Per service: where `processes` names each group.
    pub service_processes: Vec<Vec<usize>>,
    /// Per machine: where `processes` names each group.
    pub machine_processes: Vec<Vec<usize>>,
    /// Whether the file declares its process groups in `[processes]`.
    pub groups_declared: bool,
}

/// Parses `text` and reads it into a [`Config`] whose routing is not resolved yet. A syntax
/// error ends reading at once; other problems are left in `r`.
pub(super) fn read(r: &mut Reader<'_>, text: &str) -> Result<(Config, Sites), ConfigError> {
    let root = toml::de::DeTable::parse(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        let mut message = e.message().trim_end().to_owned();
        // Name the key: the parser's message alone does not.
        if message == "duplicate key"
            && let Some(key) = e.span().and_then(|s| text.get(s))
        {
            message = format!("duplicate key `{}`", key.trim());
        }
        ConfigError::Invalid(vec![r.diagnostic(at, "", message)])
    })?;
    let top = Table::new("", root.get_ref(), root.span());
    let mut config = Config::empty();
    let mut sites = Sites::default();

    for (key, span) in top.keys() {
        if OWNED.contains(&key) {
            continue;
        }
        config.ignored.push(key.to_owned());
        if !FLY_SECTIONS.contains(&key)
            && let Some(s) = did_you_mean(key, OWNED)
        {
            r.warn(
                span.start,
                key,
                format!("not a section spliced knows, ignored; did you mean `{s}`?"),
            );
        }
    }
    if let Some(v) = top.get("app") {
        config.app = r.string(v, "app");
    }
    if let Some(v) = top.get("primary_region") {
        config.primary_region = r.string(v, "primary_region");
    }
    if let Some(v) = top.get("env") {
        config.env = read_env(r, v);
    }
    read_kill(r, top, &mut config);
    if let Some(v) = top.get("processes") {
        // `[[processes]]` (an array) is what fly's API returns for "none": ignored, as fly does.
        if let DeValue::Table(t) = v.get_ref() {
            sites.groups_declared = !t.is_empty();
            for (name, command) in t {
                let field = format!("processes.{}", name.get_ref());
                if name.get_ref().is_empty() {
                    r.error(name.span().start, &field, "a process group needs a name");
                }
                r.strings(command, &field);
                config.process_groups.push(name.get_ref().to_string());
            }
        }
    }
    if config.process_groups.is_empty() {
        config.process_groups.push(DEFAULT_PROCESS_GROUP.to_owned());
    }
    if let Some(v) = top.get("http_service")
        && let Some(t) = r.table(v, "http_service")
    {
        read_http_service(
            r,
            Table::new("http_service", t, v.span()),
            &mut config,
            &mut sites,
        );
    }
    if let Some(v) = top.get("services") {
        for (path, t, span) in r.tables(v, "services") {
            let block = Table::new(&path, t, span.clone());
            if block.is_empty() {
                // fly drops a service block without keys.
                r.warn(span.start, &path, "empty service block, ignored");
                continue;
            }
            read_service(r, block, &mut config, &mut sites);
        }
    }
    if let Some(v) = top.get("machines") {
        for (path, t, span) in r.tables(v, "machines") {
            read_machine(r, Table::new(&path, t, span), &mut config, &mut sites);
        }
    }
    Ok((config, sites))
}

fn read_env(r: &mut Reader<'_>, v: &Value<'_>) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> = Vec::new();
    // `[[env]]` tables are merged in order, as fly does.
    for (_, t, _) in r.tables(v, "env") {
        for (name, value) in t {
            let field = format!("env.{}", name.get_ref());
            let Some(text) = scalar_text(value) else {
                r.error(
                    value.span().start,
                    &field,
                    format!("expected a string, found {}", value.get_ref().type_str()),
                );
                continue;
            };
            env.retain(|e| e.name != name.get_ref().as_ref());
            env.push(EnvVar {
                name: name.get_ref().to_string(),
                value: text,
            });
        }
    }
    env
}

/// `kill_signal` (one of [`KILL_SIGNALS`]) and `kill_timeout` (whole seconds, as Fly reads an
/// integer, or a duration such as "30s").
fn read_kill(r: &mut Reader<'_>, top: Table<'_, '_>, config: &mut Config) {
    if let Some(v) = top.get("kill_signal")
        && let Some(name) = r.string(v, "kill_signal")
    {
        let upper = name.trim().to_ascii_uppercase();
        if KILL_SIGNALS.contains(&upper.as_str()) {
            config.kill_signal = Some(upper);
        } else {
            r.error(
                v.span().start,
                "kill_signal",
                format!(
                    "{name:?} is not a signal fly stops machines with; use one of {}",
                    KILL_SIGNALS.join(", ")
                ),
            );
        }
    }
    if let Some(v) = top.get("kill_timeout") {
        config.kill_timeout = match v.get_ref() {
            DeValue::Integer(i) => {
                if let Ok(secs @ 1..) = i64::from_str_radix(i.as_str(), i.radix()) {
                    Some(Duration::from_secs(secs.unsigned_abs()))
                } else {
                    r.error(
                        v.span().start,
                        "kill_timeout",
                        format!("{} is not a positive number of seconds", i.as_str()),
                    );
                    None
                }
            }
            _ => r.duration(v, "kill_timeout"),
        };
    }
}
