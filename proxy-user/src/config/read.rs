//! Reads each section of a fly.toml into the checked model, keeping the positions that
//! routing needs for its own messages.

use std::net::IpAddr;

use toml::de::DeValue;

use super::{
    AutoStop, Concurrency, ConcurrencyKind, Config, ConfigError, DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT, DEFAULT_INTERNAL_PORT, DEFAULT_PROCESS_GROUP, EnvVar, Exposure, Handler,
    Header, HttpCheck, Machine, Protocol, ProxyProtoVersion, PublicPort, Service, TcpCheck,
    TlsOptions,
    source::{Reader, Table, Value, did_you_mean, scalar_text, show},
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
];
/// Top-level keys of fly.toml that an L4 edge proxy has no use for: accepted and listed.
const FLY_SECTIONS: &[&str] = &[
    "kill_signal",
    "kill_timeout",
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
const SERVICE_KEYS: &[&str] = &[
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
const HTTP_SERVICE_KEYS: &[&str] = &[
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
const PORT_KEYS: &[&str] = &[
    "port",
    "start_port",
    "end_port",
    "handlers",
    "force_https",
    "tls_options",
    "http_options",
    "proxy_proto_options",
];
const CONCURRENCY_KEYS: &[&str] = &["type", "hard_limit", "soft_limit"];
const TCP_CHECK_KEYS: &[&str] = &["interval", "timeout", "grace_period", "restart_limit"];
const HTTP_CHECK_KEYS: &[&str] = &[
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
const TLS_KEYS: &[&str] = &["alpn", "versions", "default_self_signed"];
const MACHINE_KEYS: &[&str] = &["id", "address", "processes", "region"];

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
    let mut config = Config {
        app: None,
        primary_region: None,
        env: Vec::new(),
        process_groups: Vec::new(),
        services: Vec::new(),
        machines: Vec::new(),
        ignored: Vec::new(),
        warnings: Vec::new(),
    };
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

/// The settings `[[services]]` and `[http_service]` share.
fn read_common(r: &mut Reader<'_>, block: Table<'_, '_>, service: &mut Service) -> Vec<usize> {
    if let Some(v) = block.get("internal_port") {
        service.internal_port = r
            .port(v, &block.field("internal_port"))
            .unwrap_or(DEFAULT_INTERNAL_PORT);
    }
    let mut process_sites = Vec::new();
    if let Some(v) = block.get("processes")
        && let Some(list) = r.strings(v, &block.field("processes"))
    {
        for p in list {
            process_sites.push(p.span().start);
            service.processes.push(p.into_inner());
        }
    }
    if let Some(v) = block.get("auto_stop_machines") {
        let field = block.field("auto_stop_machines");
        service.auto_stop_machines = match v.get_ref() {
            DeValue::Boolean(true) => Some(AutoStop::Stop),
            DeValue::Boolean(false) => Some(AutoStop::Off),
            DeValue::String(s) => match s.as_ref() {
                "off" => Some(AutoStop::Off),
                "stop" => Some(AutoStop::Stop),
                "suspend" => Some(AutoStop::Suspend),
                _ => {
                    r.error(
                        v.span().start,
                        &field,
                        format!(
                            "{} is not one of true, false, \"off\", \"stop\", \"suspend\"",
                            show(v)
                        ),
                    );
                    None
                }
            },
            _ => {
                r.error(
                    v.span().start,
                    &field,
                    format!(
                        "expected true, false, \"off\", \"stop\" or \"suspend\", found {}",
                        v.get_ref().type_str()
                    ),
                );
                None
            }
        };
    }
    if let Some(v) = block.get("auto_start_machines") {
        service.auto_start_machines = r.bool(v, &block.field("auto_start_machines"));
    }
    if let Some(v) = block.get("min_machines_running") {
        service.min_machines_running = r.count(v, &block.field("min_machines_running"), 0);
    }
    if let Some(v) = block.get("concurrency") {
        service.concurrency = read_concurrency(r, v, &block.field("concurrency"));
    }
    process_sites
}

fn new_service(name: String) -> Service {
    Service {
        id: 0,
        name,
        protocol: Protocol::Tcp,
        internal_port: DEFAULT_INTERNAL_PORT,
        processes: Vec::new(),
        exposure: Exposure::Declared,
        ports: Vec::new(),
        concurrency: None,
        tcp_checks: Vec::new(),
        http_checks: Vec::new(),
        auto_stop_machines: None,
        auto_start_machines: None,
        min_machines_running: None,
        auto_deploy: None,
        machines: Vec::new(),
    }
}

fn push_service(
    config: &mut Config,
    sites: &mut Sites,
    (mut s, at): (Service, usize),
    ports: Vec<(usize, String)>,
    processes: Vec<usize>,
) {
    s.id = config.services.len() as u32;
    config.services.push(s);
    sites.services.push(at);
    sites.ports.push(ports);
    sites.service_processes.push(processes);
}

fn read_service(r: &mut Reader<'_>, block: Table<'_, '_>, config: &mut Config, sites: &mut Sites) {
    r.unknown_keys(block, SERVICE_KEYS);
    let mut s = new_service(block.path.to_owned());
    for key in ["machine_checks", "script_checks"] {
        if block.get(key).is_some() {
            config.ignored.push(block.field(key));
        }
    }
    if let Some(v) = block.get("protocol") {
        let field = block.field("protocol");
        match r.string(v, &field).as_deref() {
            Some("tcp") | None => {}
            Some("udp") => s.protocol = Protocol::Udp,
            Some(other) => r.error(
                v.span().start,
                &field,
                format!("{other:?} is not a protocol (tcp or udp)"),
            ),
        }
    }
    let processes = read_common(r, block, &mut s);
    if let Some(v) = block.get("auto_deploy") {
        s.auto_deploy = r.bool(v, &block.field("auto_deploy"));
    }
    let mut port_sites = Vec::new();
    if let Some(v) = block.get("port")
        && let Some(port) = r.port(v, &block.field("port"))
    {
        let (line, _) = r.position(v.span().start);
        s.ports.push(PublicPort::raw(port, line));
        port_sites.push((v.span().start, block.field("port")));
    }
    if let Some(v) = block.get("ports") {
        for (path, t, span) in r.tables(v, &block.field("ports")) {
            read_ports(
                r,
                Table::new(&path, t, span),
                s.protocol,
                &mut s.ports,
                &mut port_sites,
            );
        }
    }
    for (key, http) in [("tcp_checks", false), ("http_checks", true)] {
        let Some(v) = block.get(key) else { continue };
        for (path, t, span) in r.tables(v, &block.field(key)) {
            let check = Table::new(&path, t, span);
            if http {
                s.http_checks.push(read_http_check(r, check));
            } else {
                s.tcp_checks.push(read_tcp_check(r, check));
            }
        }
    }
    push_service(config, sites, (s, block.span.0), port_sites, processes);
}

fn read_handlers(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    field: &str,
    protocol: Protocol,
) -> Vec<Handler> {
    let Some(list) = r.strings(v, field) else {
        return Vec::new();
    };
    let names: Vec<&str> = Handler::ALL.iter().map(|(n, _)| *n).collect();
    let mut out = Vec::new();
    for (i, h) in list.iter().enumerate() {
        if let Some((_, handler)) = Handler::ALL.iter().find(|(n, _)| *n == h.get_ref()) {
            out.push(*handler);
        } else {
            let hint = did_you_mean(h.get_ref(), &names)
                .map(|s| format!("; did you mean {s:?}?"))
                .unwrap_or_default();
            r.error(
                h.span().start,
                &format!("{field}[{i}]"),
                format!(
                    "{:?} is not a handler ({}){hint}",
                    h.get_ref(),
                    names.join(", ")
                ),
            );
        }
    }
    if protocol == Protocol::Udp && !list.is_empty() {
        r.error(v.span().start, field, "UDP services take no handlers");
    }
    out
}

/// One `[[services.ports]]` entry: a port or a range, with what applies to each of them.
fn read_ports(
    r: &mut Reader<'_>,
    t: Table<'_, '_>,
    protocol: Protocol,
    out: &mut Vec<PublicPort>,
    sites: &mut Vec<(usize, String)>,
) {
    r.unknown_keys(t, PORT_KEYS);
    let mut template = PublicPort::raw(0, r.position(t.span.0).0);
    if let Some(v) = t.get("handlers") {
        template.handlers = read_handlers(r, v, &t.field("handlers"), protocol);
    }
    if let Some(v) = t.get("force_https") {
        let field = t.field("force_https");
        template.force_https = r.bool(v, &field).unwrap_or(false);
        if template.force_https && !template.handlers.contains(&Handler::Http) {
            r.error(
                v.span().start,
                &field,
                "force_https needs the http handler on this port",
            );
        }
    }
    template.proxy_proto = read_proxy_proto(r, t, &template.handlers);
    if let Some(v) = t.get("tls_options") {
        template.tls_options = read_tls(r, v, &t.field("tls_options"));
        if !template
            .handlers
            .iter()
            .any(|h| matches!(h, Handler::Tls | Handler::PgTls))
        {
            r.warn(
                v.span().start,
                &t.field("tls_options"),
                "has no effect without the tls or pg_tls handler",
            );
        }
    }
    if let Some(v) = t.get("http_options") {
        template.http_options = Some(to_json(v));
        if !template
            .handlers
            .iter()
            .any(|h| matches!(h, Handler::Http | Handler::EdgeHttp))
        {
            r.warn(
                v.span().start,
                &t.field("http_options"),
                "has no effect without the http or edge_http handler",
            );
        }
    }
    let field = |k: &str| t.field(k);
    match (t.get("port"), t.get("start_port"), t.get("end_port")) {
        (Some(v), None, None) => {
            if let Some(port) = r.port(v, &field("port")) {
                out.push(PublicPort { port, ..template });
                sites.push((v.span().start, field("port")));
            }
        }
        (None, Some(start), Some(end)) => {
            let first = r.port(start, &field("start_port"));
            let last = r.port(end, &field("end_port"));
            if let (Some(first), Some(last)) = (first, last) {
                if last < first {
                    r.error(
                        end.span().start,
                        &field("end_port"),
                        format!("{last} is below start_port {first}"),
                    );
                }
                for port in first..=last {
                    out.push(PublicPort {
                        port,
                        ..template.clone()
                    });
                    sites.push((start.span().start, field("start_port")));
                }
            }
        }
        (Some(v), _, _) => r.error(
            v.span().start,
            &field("port"),
            "give either port, or start_port and end_port, not both",
        ),
        (None, Some(v), None) | (None, None, Some(v)) => r.error(
            v.span().start,
            t.path,
            "a port range needs both start_port and end_port",
        ),
        (None, None, None) => r.error(t.span.0, t.path, "needs port, or start_port and end_port"),
    }
}

/// The PROXY protocol version of a port: v1 unless `proxy_proto_options` says v2; `None`
/// without the `proxy_proto` handler.
fn read_proxy_proto(
    r: &mut Reader<'_>,
    t: Table<'_, '_>,
    handlers: &[Handler],
) -> Option<ProxyProtoVersion> {
    let mut version = handlers
        .contains(&Handler::ProxyProto)
        .then_some(ProxyProtoVersion::V1);
    let v = t.get("proxy_proto_options")?;
    let field = t.field("proxy_proto_options");
    let opts = Table::new(&field, r.table(v, &field)?, v.span());
    r.unknown_keys(opts, &["version"]);
    if let Some(given) = opts.get("version") {
        let vf = opts.field("version");
        let parsed = match r.string(given, &vf).as_deref() {
            Some("v1") => Some(ProxyProtoVersion::V1),
            Some("v2") => Some(ProxyProtoVersion::V2),
            Some(other) => {
                r.error(
                    given.span().start,
                    &vf,
                    format!("{other:?} is not a PROXY protocol version (v1 or v2)"),
                );
                None
            }
            None => None,
        };
        if version.is_some() {
            version = parsed.or(version);
        }
    }
    if version.is_none() {
        r.warn(
            v.span().start,
            &field,
            "has no effect without the proxy_proto handler",
        );
    }
    version
}

fn read_tls(r: &mut Reader<'_>, v: &Value<'_>, field: &str) -> Option<TlsOptions> {
    let t = Table::new(field, r.table(v, field)?, v.span());
    r.unknown_keys(t, TLS_KEYS);
    let mut tls = TlsOptions::default();
    if let Some(v) = t.get("alpn")
        && let Some(list) = r.strings(v, &t.field("alpn"))
    {
        tls.alpn = list.into_iter().map(toml::Spanned::into_inner).collect();
    }
    if let Some(v) = t.get("versions")
        && let Some(list) = r.strings(v, &t.field("versions"))
    {
        for (i, version) in list.into_iter().enumerate() {
            if !matches!(version.get_ref().as_str(), "TLSv1.2" | "TLSv1.3") {
                r.error(
                    version.span().start,
                    &format!("{}[{i}]", t.field("versions")),
                    format!(
                        "{:?} is not a TLS version (TLSv1.2 or TLSv1.3)",
                        version.get_ref()
                    ),
                );
            }
            tls.versions.push(version.into_inner());
        }
    }
    if let Some(v) = t.get("default_self_signed") {
        tls.default_self_signed = r.bool(v, &t.field("default_self_signed"));
    }
    Some(tls)
}

fn to_json(v: &Value<'_>) -> serde_json::Value {
    use serde_json::Value as J;
    match v.get_ref() {
        DeValue::String(s) => J::String(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).map_or(J::Null, J::from),
        DeValue::Float(f) => f.as_str().parse::<f64>().map_or(J::Null, J::from),
        DeValue::Boolean(b) => J::Bool(*b),
        DeValue::Datetime(d) => J::String(d.to_string()),
        DeValue::Array(items) => J::Array(items.iter().map(to_json).collect()),
        DeValue::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| (k.get_ref().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

fn read_concurrency(r: &mut Reader<'_>, v: &Value<'_>, field: &str) -> Option<Concurrency> {
    let at = v.span().start;
    let c = match v.get_ref() {
        // fly's old form: "soft,hard", counting requests.
        DeValue::String(s) => {
            let Some((soft, hard)) = s.split_once(',').and_then(|(a, b)| {
                Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?))
            }) else {
                r.error(
                    at,
                    field,
                    format!("{} is not the old \"soft,hard\" limits form", show(v)),
                );
                return None;
            };
            Concurrency {
                kind: ConcurrencyKind::Requests,
                hard_limit: Some(hard),
                soft_limit: Some(soft),
            }
        }
        DeValue::Table(table) => {
            let t = Table::new(field, table, v.span());
            r.unknown_keys(t, CONCURRENCY_KEYS);
            let mut c = Concurrency {
                kind: ConcurrencyKind::Connections,
                hard_limit: None,
                soft_limit: None,
            };
            if let Some(v) = t.get("type") {
                let tf = t.field("type");
                match r.string(v, &tf).as_deref() {
                    Some("connections") | None => {}
                    Some("requests") => c.kind = ConcurrencyKind::Requests,
                    Some(other) => r.error(
                        v.span().start,
                        &tf,
                        format!("{other:?} is not a concurrency type (connections or requests)"),
                    ),
                }
            }
            if let Some(v) = t.get("hard_limit") {
                c.hard_limit = r.count(v, &t.field("hard_limit"), 1);
            }
            if let Some(v) = t.get("soft_limit") {
                c.soft_limit = r.count(v, &t.field("soft_limit"), 1);
            }
            if let (Some(soft), Some(hard)) = (c.soft_limit, c.hard_limit)
                && soft > hard
                && let Some(v) = t.get("soft_limit")
            {
                r.error(
                    v.span().start,
                    &t.field("soft_limit"),
                    format!("{soft} is above hard_limit {hard}"),
                );
            }
            c
        }
        _ => {
            r.error(
                at,
                field,
                format!(
                    "expected a table with type, hard_limit and soft_limit (or the old \"soft,hard\" string), found {}",
                    v.get_ref().type_str()
                ),
            );
            return None;
        }
    };
    Some(c)
}

/// Interval, timeout and grace period, with fly's defaults.
fn check_timing(
    r: &mut Reader<'_>,
    t: Table<'_, '_>,
) -> (
    std::time::Duration,
    std::time::Duration,
    Option<std::time::Duration>,
) {
    let mut get = |key: &str| t.get(key).and_then(|v| r.duration(v, &t.field(key)));
    let interval = get("interval").unwrap_or(DEFAULT_CHECK_INTERVAL);
    let timeout = get("timeout").unwrap_or(DEFAULT_CHECK_TIMEOUT);
    let grace = get("grace_period");
    if let Some(v) = t.get("restart_limit") {
        r.count(v, &t.field("restart_limit"), 0);
    }
    (interval, timeout, grace)
}

fn read_tcp_check(r: &mut Reader<'_>, t: Table<'_, '_>) -> TcpCheck {
    r.unknown_keys(t, TCP_CHECK_KEYS);
    let (interval, timeout, grace_period) = check_timing(r, t);
    TcpCheck {
        interval,
        timeout,
        grace_period,
    }
}

fn read_http_check(r: &mut Reader<'_>, t: Table<'_, '_>) -> HttpCheck {
    r.unknown_keys(t, HTTP_CHECK_KEYS);
    let (interval, timeout, grace_period) = check_timing(r, t);
    let mut check = HttpCheck {
        interval,
        timeout,
        grace_period,
        method: "GET".to_owned(),
        path: "/".to_owned(),
        protocol: "http".to_owned(),
        tls_skip_verify: false,
        tls_server_name: None,
        headers: Vec::new(),
    };
    if let Some(v) = t.get("method")
        && let Some(m) = r.string(v, &t.field("method"))
    {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
            r.error(
                v.span().start,
                &t.field("method"),
                format!("{m:?} is not an HTTP method"),
            );
        }
        check.method = m.to_ascii_uppercase();
    }
    if let Some(v) = t.get("path")
        && let Some(p) = r.string(v, &t.field("path"))
    {
        if !p.starts_with('/')
            || p.bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            r.error(
                v.span().start,
                &t.field("path"),
                format!("{p:?} is not a request path (it starts with / and has no spaces)"),
            );
        }
        check.path = p;
    }
    if let Some(v) = t.get("protocol")
        && let Some(p) = r.string(v, &t.field("protocol"))
    {
        if !matches!(p.as_str(), "http" | "https") {
            r.error(
                v.span().start,
                &t.field("protocol"),
                format!("{p:?} is not http or https"),
            );
        }
        check.protocol = p;
    }
    if let Some(v) = t.get("tls_skip_verify") {
        check.tls_skip_verify = r.bool(v, &t.field("tls_skip_verify")).unwrap_or(false);
    }
    if let Some(v) = t.get("tls_server_name") {
        check.tls_server_name = r.string(v, &t.field("tls_server_name"));
    }
    if let Some(v) = t.get("headers") {
        check.headers = read_headers(r, v, &t.field("headers"));
    }
    check
}

/// Headers as a table (`name = value`) or, in fly's old form, an array of `{name, value}`.
fn read_headers(r: &mut Reader<'_>, v: &Value<'_>, field: &str) -> Vec<Header> {
    let mut out = Vec::new();
    let mut push = |r: &mut Reader<'_>, name: &str, value: &Value<'_>, at: &str| {
        let values: Vec<&Value<'_>> = match value.get_ref() {
            DeValue::Array(items) => items.iter().collect(),
            _ => vec![value],
        };
        for value in values {
            match scalar_text(value) {
                Some(text) if !text.contains(['\r', '\n']) => out.push(Header {
                    name: name.to_owned(),
                    value: text,
                }),
                _ => r.error(value.span().start, at, "a header value is one line of text"),
            }
        }
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            r.error(
                value.span().start,
                at,
                format!("{name:?} is not a header name"),
            );
        }
    };
    match v.get_ref() {
        DeValue::Table(t) => {
            for (name, value) in t {
                push(
                    r,
                    name.get_ref(),
                    value,
                    &format!("{field}.{}", name.get_ref()),
                );
            }
        }
        DeValue::Array(_) => {
            for (path, t, span) in r.tables(v, field) {
                let entry = Table::new(&path, t, span.clone());
                r.unknown_keys(entry, &["name", "value"]);
                match (entry.get("name"), entry.get("value")) {
                    (Some(n), Some(value)) => {
                        if let Some(name) = r.string(n, &entry.field("name")) {
                            push(r, &name, value, &entry.field("value"));
                        }
                    }
                    _ => r.error(span.start, &path, "a header needs name and value"),
                }
            }
        }
        _ => r.error(
            v.span().start,
            field,
            format!(
                "expected a table of headers, found {}",
                v.get_ref().type_str()
            ),
        ),
    }
    out
}

fn read_http_service(r: &mut Reader<'_>, t: Table<'_, '_>, config: &mut Config, sites: &mut Sites) {
    r.unknown_keys(t, HTTP_SERVICE_KEYS);
    if t.get("machine_checks").is_some() {
        config.ignored.push(t.field("machine_checks"));
    }
    let mut s = new_service("http_service".to_owned());
    let processes = read_common(r, t, &mut s);
    let force_https = t
        .get("force_https")
        .and_then(|v| r.bool(v, &t.field("force_https")))
        .unwrap_or(false);
    let tls_options = t
        .get("tls_options")
        .and_then(|v| read_tls(r, v, &t.field("tls_options")));
    let http_options = t.get("http_options").map(to_json);
    if let Some(v) = t.get("checks") {
        for (path, check, span) in r.tables(v, &t.field("checks")) {
            s.http_checks
                .push(read_http_check(r, Table::new(&path, check, span)));
        }
    }
    let line = r.position(t.span.0).0;
    let port = |port, handlers: Vec<Handler>, force_https| PublicPort {
        port,
        handlers,
        force_https,
        proxy_proto: None,
        tls_options: tls_options.clone(),
        http_options: http_options.clone(),
        line,
    };
    s.ports = vec![
        port(80, vec![Handler::Http], force_https),
        port(443, vec![Handler::Tls, Handler::Http], false),
    ];
    let at = (t.span.0, "http_service".to_owned());
    push_service(
        config,
        sites,
        (s, t.span.0),
        vec![at.clone(), at],
        processes,
    );
}

fn read_machine(r: &mut Reader<'_>, t: Table<'_, '_>, config: &mut Config, sites: &mut Sites) {
    r.unknown_keys(t, MACHINE_KEYS);
    let id = machine_id(r, t);
    if let Some(id) = &id
        && config.machines.iter().any(|m| &m.id == id)
        && let Some(v) = t.get("id")
    {
        r.error(
            v.span().start,
            &t.field("id"),
            format!("machine id {id:?} is used twice"),
        );
    }
    let address = machine_address(r, t);
    let mut processes = Vec::new();
    let mut process_sites = Vec::new();
    if let Some(v) = t.get("processes")
        && let Some(list) = r.strings(v, &t.field("processes"))
    {
        for p in list {
            process_sites.push(p.span().start);
            processes.push(p.into_inner());
        }
    }
    let region = t
        .get("region")
        .and_then(|v| r.string(v, &t.field("region")));
    if let (Some(id), Some(address)) = (id, address) {
        config.machines.push(Machine {
            id,
            address,
            processes,
            region,
        });
        sites.machine_processes.push(process_sites);
    }
}

fn machine_id(r: &mut Reader<'_>, t: Table<'_, '_>) -> Option<String> {
    let Some(v) = t.get("id") else {
        r.error(t.span.0, t.path, "a machine needs an id");
        return None;
    };
    let id = r.string(v, &t.field("id"))?;
    if id.is_empty() || id.contains(char::is_whitespace) {
        r.error(
            v.span().start,
            &t.field("id"),
            format!("{id:?} is not a machine id"),
        );
        return None;
    }
    Some(id)
}

fn machine_address(r: &mut Reader<'_>, t: Table<'_, '_>) -> Option<IpAddr> {
    let Some(v) = t.get("address") else {
        r.error(t.span.0, t.path, "a machine needs an address");
        return None;
    };
    let a = r.string(v, &t.field("address"))?;
    let parsed = a.parse::<IpAddr>().ok();
    if parsed.is_none() {
        r.error(
            v.span().start,
            &t.field("address"),
            format!("{a:?} is not an IP address (the port is the service's internal_port)"),
        );
    }
    parsed
}
