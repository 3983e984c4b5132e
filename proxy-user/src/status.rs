//! `spliced status`: asks a running daemon's admin socket for its live connections and prints
//! them as a table, one line per connection, then one per service (as `ss` lists sockets, and
//! `show sess` on a stats socket lists sessions).

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde_json::Value;

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("admin socket {path}: {source} (is spliced running with --admin-socket {path}?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path} answered what is not JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the daemon says: {0}")]
    Daemon(String),
}

/// The daemon's answer to `request` on the admin socket at `path`.
pub fn ask(path: &Path, request: &str) -> Result<Value, StatusError> {
    let shown = path.display().to_string();
    let io = |source| StatusError::Io {
        path: shown.clone(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| StatusError::Connect {
        path: shown.clone(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.write_all(format!("{request}\n").as_bytes()).map_err(io)?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).map_err(io)?;
    let value: Value = serde_json::from_slice(&body).map_err(|source| StatusError::Json {
        path: shown.clone(),
        source,
    })?;
    match value.get("error").and_then(Value::as_str) {
        Some(e) => Err(StatusError::Daemon(e.to_owned())),
        None => Ok(value),
    }
}

/// The live connections and per-service totals of a `connections` answer, as text.
pub fn render(report: &Value) -> String {
    let none = Vec::new();
    let conns = report["connections"].as_array().unwrap_or(&none);
    let mut rows = vec![row(&[
        "CLIENT",
        "SERVICE",
        "MACHINE",
        "PLANE",
        "STATE",
        "AGE",
        "FROM CLIENT",
        "FROM MACHINE",
        "TCP",
    ])];
    for c in conns {
        let machine = match (c["machine"].as_str(), c["machine_addr"].as_str()) {
            (Some(id), Some(addr)) if id != addr => format!("{id} {addr}"),
            (_, Some(addr)) => addr.to_owned(),
            _ => "-".to_owned(),
        };
        rows.push(row(&[
            text(&c["client"]),
            text(&c["service"]),
            &machine,
            text(&c["plane"]),
            text(&c["state"]),
            &age(c["age_ms"].as_u64().unwrap_or(0)),
            &bytes(c["bytes_from_client"].as_u64().unwrap_or(0)),
            &bytes(c["bytes_from_machine"].as_u64().unwrap_or(0)),
            &format!("{}/{}", text(&c["client_tcp"]), text(&c["machine_tcp"])),
        ]));
    }
    let mut out = table(&rows);
    out.push('\n');
    let mut rows = vec![row(&[
        "SERVICE",
        "LIVE",
        "FROM CLIENT",
        "FROM MACHINE",
        "STATES",
    ])];
    if let Some(services) = report["services"].as_object() {
        for (name, s) in services {
            let states = s["states"].as_object().map_or_else(String::new, |m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            rows.push(row(&[
                name,
                &s["connections"].as_u64().unwrap_or(0).to_string(),
                &bytes(s["bytes_from_client"].as_u64().unwrap_or(0)),
                &bytes(s["bytes_from_machine"].as_u64().unwrap_or(0)),
                &states,
            ]));
        }
    }
    out.push_str(&table(&rows));
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// Rows in columns as wide as their widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `1h2m`, `3m4s`, `5.6s`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{}.{}s", s, (ms % 1000) / 100),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.0 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_ages_read_as_ss_would_print_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(age(5_600), "5.6s");
        assert_eq!(age(184_000), "3m4s");
        assert_eq!(age(3_720_000), "1h2m");
    }

    #[test]
    fn a_report_renders_one_line_per_connection_and_per_service() {
        let report = serde_json::json!({
            "connections": [{
                "client": "192.0.2.1:4000", "service": "web", "machine": "m1",
                "machine_addr": "10.0.0.2:8080", "plane": "sockmap", "state": "held",
                "age_ms": 65_000, "bytes_from_client": 2048, "bytes_from_machine": 0,
                "client_tcp": "ESTAB", "machine_tcp": "ESTAB"
            }],
            "services": {"web": {"connections": 1, "bytes_from_client": 2048,
                "bytes_from_machine": 0, "states": {"held": 1}}}
        });
        let out = render(&report);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("CLIENT"), "{out}");
        assert!(
            lines[1].contains("192.0.2.1:4000")
                && lines[1].contains("m1 10.0.0.2:8080")
                && lines[1].contains("held")
                && lines[1].contains("1m5s")
                && lines[1].contains("2.0 KiB")
                && lines[1].contains("ESTAB/ESTAB"),
            "{out}"
        );
        assert!(lines[3].starts_with("SERVICE"), "{out}");
        assert!(
            lines[4].starts_with("web") && lines[4].contains("held 1"),
            "{out}"
        );
    }
}
