//! A service's public ports: `port = N` or `[[services.ports]]`, their handlers, TLS and
//! PROXY protocol options.

use super::{
    DeValue, Handler, PORT_KEYS, Protocol, ProxyProtoVersion, PublicPort, Reader, TLS_KEYS, Table,
    TlsOptions, Value, did_you_mean,
};

pub(super) fn read_handlers(
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
pub(super) fn read_ports(
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
pub(super) fn read_proxy_proto(
    r: &mut Reader<'_>,
    t: Table<'_, '_>,
    handlers: &[Handler],
) -> Option<ProxyProtoVersion> {
    let mut version = handlers
        .contains(&Handler::ProxyProto)
        .then_some(ProxyProtoVersion::V1);
    let Some(v) = t.get("proxy_proto_options") else {
        return version;
    };
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

pub(super) fn read_tls(r: &mut Reader<'_>, v: &Value<'_>, field: &str) -> Option<TlsOptions> {
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

pub(super) fn to_json(v: &Value<'_>) -> serde_json::Value {
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
