//! `[[services]]` and `[http_service]`: a service, its public ports, handlers and options.

use super::{
    AutoStop, Config, DEFAULT_INTERNAL_PORT, DeValue, Exposure, HTTP_SERVICE_KEYS, Handler,
    Protocol, PublicPort, Reader, SERVICE_KEYS, Service, Sites, Table, read_concurrency,
    read_http_check, read_ports, read_tcp_check, read_tls, show, to_json,
};

/// The settings `[[services]]` and `[http_service]` share.
pub(super) fn read_common(
    r: &mut Reader<'_>,
    block: Table<'_, '_>,
    service: &mut Service,
) -> Vec<usize> {
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

pub(super) fn new_service(name: String) -> Service {
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
        region: None,
    }
}

pub(super) fn push_service(
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

pub(super) fn read_service(
    r: &mut Reader<'_>,
    block: Table<'_, '_>,
    config: &mut Config,
    sites: &mut Sites,
) {
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

pub(super) fn read_http_service(
    r: &mut Reader<'_>,
    t: Table<'_, '_>,
    config: &mut Config,
    sites: &mut Sites,
) {
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
