//! A service's limits and health checks: `[services.concurrency]`, `tcp_checks`, `http_checks`.

use super::{
    CONCURRENCY_KEYS, Concurrency, ConcurrencyKind, DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT,
    DeValue, HTTP_CHECK_KEYS, Header, HttpCheck, Reader, TCP_CHECK_KEYS, Table, TcpCheck, Value,
    scalar_text, show,
};

pub(super) fn read_concurrency(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    field: &str,
) -> Option<Concurrency> {
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
pub(super) fn check_timing(
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

pub(super) fn read_tcp_check(r: &mut Reader<'_>, t: Table<'_, '_>) -> TcpCheck {
    r.unknown_keys(t, TCP_CHECK_KEYS);
    let (interval, timeout, grace_period) = check_timing(r, t);
    TcpCheck {
        interval,
        timeout,
        grace_period,
    }
}

pub(super) fn read_http_check(r: &mut Reader<'_>, t: Table<'_, '_>) -> HttpCheck {
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
pub(super) fn read_headers(r: &mut Reader<'_>, v: &Value<'_>, field: &str) -> Vec<Header> {
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
