//! What `spliced check` prints: the resolved routing table (each public port with its
//! protocol, handlers, service, internal port, machines, limits and checks), the
//! internal-only services, the ignored sections and the warnings; as text for people and as
//! JSON for tools.

#![forbid(unsafe_code)]

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::{
    Concurrency, ConcurrencyKind, Config, Exposure, Handler, Protocol, PublicPort, Service,
};

/// The JSON form: the whole checked model plus the run-time verdict per port.
#[derive(Serialize)]
pub struct Report<'c> {
    pub valid: bool,
    /// Empty when `spliced run` can serve every port.
    pub unservable: Vec<String>,
    pub config: &'c Config,
}

impl<'c> Report<'c> {
    pub fn new(config: &'c Config) -> Self {
        Self {
            valid: true,
            unservable: config.unservable(),
            config,
        }
    }
}

/// Consecutive ports of one service with the same settings, shown as one row.
struct PortRun<'c> {
    service: &'c Service,
    first: &'c PublicPort,
    last: u16,
}

fn same_settings(a: &PublicPort, b: &PublicPort) -> bool {
    a.handlers == b.handlers
        && a.force_https == b.force_https
        && a.proxy_proto == b.proxy_proto
        && a.tls_options == b.tls_options
        && a.http_options == b.http_options
}

fn port_runs(config: &Config) -> Vec<PortRun<'_>> {
    let mut runs: Vec<PortRun<'_>> = Vec::new();
    for (service, port) in config.public_ports() {
        if let Some(run) = runs.last_mut()
            && run.service.id == service.id
            && run.last.checked_add(1) == Some(port.port)
            && same_settings(run.first, port)
        {
            run.last = port.port;
            continue;
        }
        runs.push(PortRun {
            service,
            first: port,
            last: port.port,
        });
    }
    runs
}

fn handlers(p: &PublicPort) -> String {
    if p.handlers.is_empty() {
        return "raw tcp".to_owned();
    }
    let mut names: Vec<String> = p
        .handlers
        .iter()
        .map(|h| match (h, p.proxy_proto) {
            (Handler::ProxyProto, Some(v)) => format!("proxy_proto {}", serde_plain(&v)),
            _ => h.name().to_owned(),
        })
        .collect();
    if p.force_https {
        names.push("force_https".to_owned());
    }
    names.join(",")
}

fn serde_plain<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn limits(c: Option<&Concurrency>) -> String {
    let Some(c) = c else {
        return "-".to_owned();
    };
    let kind = match c.kind {
        ConcurrencyKind::Connections => "conns",
        ConcurrencyKind::Requests => "reqs",
    };
    let n = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    format!("{kind} {}/{}", n(c.soft_limit), n(c.hard_limit))
}

fn secs(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn checks(s: &Service) -> String {
    let mut out: Vec<String> = s
        .tcp_checks
        .iter()
        .map(|c| format!("tcp every {}", secs(c.interval)))
        .collect();
    out.extend(s.http_checks.iter().map(|c| {
        // TLS checks are parsed but not run yet (see `health`).
        let not_run = if c.protocol == "http" {
            ""
        } else {
            " (not run)"
        };
        format!(
            "{} {} {}/{}{not_run}",
            c.protocol,
            c.method,
            c.path,
            secs(c.interval)
        )
    }));
    if out.is_empty() {
        "-".to_owned()
    } else {
        out.join(", ")
    }
}

fn verdict(s: &Service, p: &PublicPort) -> String {
    if s.protocol == Protocol::Udp {
        return "refused: udp".to_owned();
    }
    let missing = p.unimplemented_handlers();
    if missing.is_empty() {
        "serve".to_owned()
    } else {
        let names: Vec<&str> = missing.iter().map(|h| h.name()).collect();
        format!("refused: {}", names.join(","))
    }
}

/// Lays out rows in columns two spaces apart; the last column is not padded.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == cols {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The text form of the report.
#[expect(
    clippy::too_many_lines,
    reason = "one section after the other, in print order"
)]
pub fn render_text(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "app: {}{}",
        config.app.as_deref().unwrap_or("(unnamed)"),
        config
            .primary_region
            .as_deref()
            .map(|r| format!(" (primary region {r})"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "process groups: {}", config.process_groups.join(", "));
    out.push('\n');

    let mut rows = vec![
        [
            "PORT", "SERVICE", "INTERNAL", "HANDLERS", "MACHINES", "LIMITS", "CHECKS", "RUN",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for run in port_runs(config) {
        let s = run.service;
        let proto = if s.protocol == Protocol::Udp {
            "udp"
        } else {
            "tcp"
        };
        let ports = if run.last == run.first.port {
            format!("{}/{proto}", run.first.port)
        } else {
            format!("{}-{}/{proto}", run.first.port, run.last)
        };
        let service = if s.exposure == Exposure::DefaultPorts {
            format!("{} (default ports)", s.name)
        } else {
            s.name.clone()
        };
        rows.push(vec![
            ports,
            service,
            s.internal_port.to_string(),
            handlers(run.first),
            machines(s),
            limits(s.concurrency.as_ref()),
            checks(s),
            verdict(s, run.first),
        ]);
    }
    if rows.len() == 1 {
        out.push_str("public ports: none\n");
    } else {
        out.push_str(&table(&rows));
    }

    let internal: Vec<&Service> = config
        .services
        .iter()
        .filter(|s| s.exposure == Exposure::InternalOnly)
        .collect();
    if !internal.is_empty() {
        out.push_str("\ninternal-only services (never bound on a public address):\n");
        let mut rows = vec![
            ["SERVICE", "INTERNAL", "MACHINES", "LIMITS", "CHECKS"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for s in internal {
            rows.push(vec![
                s.name.clone(),
                s.internal_port.to_string(),
                machines(s),
                limits(s.concurrency.as_ref()),
                checks(s),
            ]);
        }
        out.push_str(&table(&rows));
    }

    out.push_str("\nmachines:\n");
    let mut rows = vec![
        ["ID", "ADDRESS", "PROCESSES", "REGION", "RUN BY SPLICED"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for m in &config.machines {
        rows.push(vec![
            m.id.clone(),
            m.address.to_string(),
            if m.processes.is_empty() {
                "all".to_owned()
            } else {
                m.processes.join(",")
            },
            m.region.clone().unwrap_or_else(|| "-".to_owned()),
            m.command
                .as_ref()
                .map_or_else(|| "-".to_owned(), |c| c.join(" ")),
        ]);
    }
    out.push_str(&table(&rows));

    if !config.env.is_empty() {
        let names: Vec<&str> = config.env.iter().map(|e| e.name.as_str()).collect();
        let _ = writeln!(
            out,
            "\nenv (kept for launched processes): {}",
            names.join(", ")
        );
    }
    if !config.ignored.is_empty() {
        let _ = writeln!(
            out,
            "\nignored (not an L4 proxy's job): {}",
            config.ignored.join(", ")
        );
    }
    out
}

fn machines(s: &Service) -> String {
    if s.machines.is_empty() {
        "none".to_owned()
    } else {
        s.machines.join(",")
    }
}

/// Warnings, one per line, as `spliced check` prints them on stderr.
pub fn render_warnings(config: &Config) -> String {
    let mut out = String::new();
    for w in &config.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
