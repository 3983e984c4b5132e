//! One request: `force_https`, a machine for it (the next one when a connect fails and the
//! request has no body to replay), the forwarding headers, the machine's response with the
//! port's header edits, and, for a switch of protocols, the tunnel that follows.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, PoisonError, atomic::Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{CONNECTION, HOST, LOCATION, TE, UPGRADE, VIA},
    request::Parts,
    uri::PathAndQuery,
};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use hyper::upgrade::OnUpgrade;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
};

use super::{
    Conn, HttpPort, Join, ProxyBody,
    options::HeaderEdit,
    upstream::{Checkout, SendError},
};
use crate::{
    balance::{Lease, Refusal},
    dataplane::Phase,
};

/// Headers that describe one hop, never passed on (RFC 9110, 7.6.1), besides those the
/// `Connection` header names.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(super) async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<Conn>,
) -> Result<Response<ProxyBody>, Infallible> {
    let stats = &conn.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if conn.port.force_https && !conn.client.tls {
        return Ok(redirect(&req, &conn));
    }
    let upgrade = wants_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut head, body) = req.into_parts();
    forward_headers(&mut head, &conn, upgrade);
    let mut req = to_machine(head, body.boxed());

    let mut lease = match conn.pool.acquire().await {
        Ok(l) => l,
        Err(why) => return Ok(refused(why, &conn)),
    };
    let mut tried = Vec::new();
    loop {
        let sent = tokio::time::timeout(
            conn.port.settings.response_timeout,
            conn.port.upstreams.send(lease.addr(), req),
        )
        .await;
        let (error, back) = match sent {
            Ok(Ok((resp, used))) => return Ok(respond(resp, lease, used, client_side, &conn)),
            Err(_) => {
                stats.gateway_timeout.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(machine = %lease.addr(), "no response head in time: 504");
                return Ok(answer(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the machine did not answer in time",
                ));
            }
            Ok(Err(SendError::Broken(error))) => {
                tracing::debug!(machine = %lease.addr(), %error, "request to a machine failed");
                stats.bad_gateway.fetch_add(1, Ordering::Relaxed);
                return Ok(answer(
                    StatusCode::BAD_GATEWAY,
                    "the machine's answer was broken",
                ));
            }
            Ok(Err(SendError::Connect(error, back))) => (error, back),
        };
        // Nothing of the request went out: it can go to the next machine whole.
        tracing::debug!(machine = %lease.addr(), %error, "connecting to a machine failed");
        lease.connect_failed();
        tried.push(lease.index());
        let next = (tried.len() < conn.port.settings.connect_attempts)
            .then(|| conn.pool.retry(&tried))
            .flatten();
        let Some(next) = next else {
            stats.bad_gateway.fetch_add(1, Ordering::Relaxed);
            return Ok(answer(
                StatusCode::BAD_GATEWAY,
                "no machine could be reached",
            ));
        };
        lease = next;
        req = *back;
    }
}

/// Whether the client asks to switch protocols (`Connection: upgrade` and `Upgrade`).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Whether `name` is one of [`HOP_BY_HOP`].
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Removes hop-by-hop headers; `upgrade` keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Those the `Connection` header names are there only with it.
    let mut hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    if hop.is_empty() {
        return;
    }
    // `keep-alive` and `close`, the usual tokens, name nothing more to remove.
    hop.extend(
        headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()),
    );
    let upgrade_to = headers.get(UPGRADE).cloned();
    let trailers = headers
        .get(TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in hop {
        headers.remove(name);
    }
    if trailers {
        // What gRPC needs: the machine may send trailers.
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade && let Some(to) = upgrade_to {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, to);
    }
}

const FLY_CLIENT_IP: HeaderName = HeaderName::from_static("fly-client-ip");
const FLY_FORWARDED_PORT: HeaderName = HeaderName::from_static("fly-forwarded-port");
const FLY_REGION: HeaderName = HeaderName::from_static("fly-region");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_SSL: HeaderName = HeaderName::from_static("x-forwarded-ssl");

/// The headers Fly's proxy sets on each request, over whatever the client sent as them.
fn forward_headers(head: &mut Parts, conn: &Conn, upgrade: bool) {
    let headers = &mut head.headers;
    if !headers.contains_key(HOST)
        && let Some(authority) = head.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(HOST, v);
    }
    strip_hop_by_hop(headers, upgrade);
    let forwarded_for = forwarded_for(headers, &conn.client_ip);
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    headers.insert(FLY_CLIENT_IP, conn.client_ip.clone());
    let (proto, ssl) = if conn.client.tls {
        ("https", "on")
    } else {
        ("http", "off")
    };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    headers.insert(X_FORWARDED_SSL, HeaderValue::from_static(ssl));
    headers.insert(X_FORWARDED_PORT, conn.port.port_value.clone());
    headers.insert(FLY_FORWARDED_PORT, conn.port.port_value.clone());
    match &conn.port.region {
        Some(region) => {
            headers.insert(FLY_REGION, region.clone());
        }
        None => {
            headers.remove(FLY_REGION);
        }
    }
    append_via(headers, head.version);
}

/// `X-Forwarded-For`: the client's own list, if it sent one, then the client's address.
fn forwarded_for(headers: &HeaderMap, client_ip: &HeaderValue) -> HeaderValue {
    let mut sent = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    if sent.peek().is_none() {
        return client_ip.clone();
    }
    let ip = client_ip.to_str().unwrap_or_default();
    let list: Vec<&str> = sent.chain([ip]).collect();
    HeaderValue::from_str(&list.join(", ")).unwrap_or_else(|_| client_ip.clone())
}

/// Adds this hop to `Via`: the protocol version it was received with, and spliced's name.
fn append_via(headers: &mut HeaderMap, version: Version) {
    let value = match version {
        Version::HTTP_09 => "0.9 spliced",
        Version::HTTP_10 => "1.0 spliced",
        Version::HTTP_2 => "2 spliced",
        Version::HTTP_3 => "3 spliced",
        _ => "1.1 spliced",
    };
    headers.append(VIA, HeaderValue::from_static(value));
}

/// The request as sent to a machine: HTTP/1.1 in origin form (the upstream connection
/// names the machine for HTTP/2, and gives a `Host` to a request without one).
fn to_machine(head: Parts, body: ProxyBody) -> Request<ProxyBody> {
    let mut req = Request::from_parts(head, body);
    let origin = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(origin);
    *req.version_mut() = Version::HTTP_11;
    req
}

/// The machine's response as sent to the client; the slot is held until its body ends, or,
/// after a switch of protocols, until the tunnel closes.
fn respond(
    mut resp: Response<Incoming>,
    lease: Lease,
    used: Checkout,
    client_side: Option<OnUpgrade>,
    conn: &Arc<Conn>,
) -> Response<ProxyBody> {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), switching);
    for edit in &conn.port.options.response_headers {
        match edit {
            HeaderEdit::Remove(name) => {
                resp.headers_mut().remove(name);
            }
            HeaderEdit::Set(name, values) => {
                resp.headers_mut().remove(name);
                for v in values {
                    resp.headers_mut().append(name.clone(), v.clone());
                }
            }
        }
    }
    let version = resp.version();
    append_via(resp.headers_mut(), version);
    if switching && let Some(client_side) = client_side {
        let machine_side = hyper::upgrade::on(&mut resp);
        conn.stats.upgrades.fetch_add(1, Ordering::Relaxed);
        let tunnel = tokio::spawn(tunnel(
            client_side,
            machine_side,
            lease,
            conn.client.join.clone(),
            conn.phase.clone(),
        ));
        conn.tunnels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tunnel);
        return resp.map(|_| Empty::new().map_err(|never| match never {}).boxed());
    }
    let port = Arc::clone(&conn.port);
    resp.map(|body| {
        Leased {
            body,
            used: Some(used),
            port,
            _lease: lease,
        }
        .boxed()
    })
}

/// Moves bytes both ways between a client and a machine that switched protocols, until
/// both ends close or the grace period ends: on the daemon's data plane when both are bare
/// sockets (`join`), copied here otherwise (a TLS client).
async fn tunnel(
    client: OnUpgrade,
    machine: OnUpgrade,
    _lease: Lease,
    join: Option<Arc<dyn Join>>,
    phase: watch::Receiver<Phase>,
) {
    let (client, machine) = match tokio::try_join!(client, machine) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "protocol switch failed");
            return;
        }
    };
    let Some(join) = join else {
        return copied(TokioIo::new(client), TokioIo::new(machine), phase).await;
    };
    let client = match client.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => parts,
        Err(client) => {
            tracing::debug!("upgraded: the client's side is not a bare socket; copied");
            return copied(TokioIo::new(client), TokioIo::new(machine), phase).await;
        }
    };
    let (mut client_tcp, to_machine) = (client.io.into_inner(), client.read_buf);
    match machine.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            // What the machine sent after its 101 and hyper read reaches the client first.
            if !parts.read_buf.is_empty() && client_tcp.write_all(&parts.read_buf).await.is_err() {
                return;
            }
            tracing::debug!("upgraded: both sides handed to the data plane");
            join.join(client_tcp, parts.io.into_inner(), to_machine, phase)
                .await;
        }
        Err(machine) => {
            tracing::debug!("upgraded: the machine's side is not a bare socket; copied");
            let mut machine = TokioIo::new(machine);
            if machine.write_all(&to_machine).await.is_ok() {
                copied(client_tcp, machine, phase).await;
            }
        }
    }
}

/// Copies both ways between `a` and `b` until both close or the grace period ends.
async fn copied(
    mut a: impl AsyncRead + AsyncWrite + Unpin,
    mut b: impl AsyncRead + AsyncWrite + Unpin,
    mut phase: watch::Receiver<Phase>,
) {
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        _ = phase.wait_for(|p| *p == Phase::Abort) => {}
    }
}

/// A 301 to the same host and path over HTTPS; 400 without a host.
fn redirect(req: &Request<Incoming>, conn: &Conn) -> Response<ProxyBody> {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(http::uri::Authority::as_str));
    let Some(host) = host else {
        conn.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        return answer(StatusCode::BAD_REQUEST, "no host to redirect to");
    };
    // The host without its port: HTTPS is on its own port.
    let name = host
        .parse::<http::uri::Authority>()
        .map_or_else(|_| host.to_owned(), |a| a.host().to_owned());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    conn.stats.redirects.fetch_add(1, Ordering::Relaxed);
    let mut resp = answer(StatusCode::MOVED_PERMANENTLY, "");
    if let Ok(location) = HeaderValue::from_str(&format!("https://{name}{path}")) {
        resp.headers_mut().insert(LOCATION, location);
    }
    resp
}

/// The answer when no machine was given.
fn refused(why: Refusal, conn: &Conn) -> Response<ProxyBody> {
    conn.stats.unavailable.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%why, service = %conn.pool.service, "request refused: 503");
    answer(StatusCode::SERVICE_UNAVAILABLE, &why.to_string())
}

/// A response of spliced's own, with a line of text saying why.
fn answer(status: StatusCode, why: &str) -> Response<ProxyBody> {
    let text = if why.is_empty() {
        String::new()
    } else {
        format!("{status}: {why}\n")
    };
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp.headers_mut()
        .insert(VIA, HeaderValue::from_static("1.1 spliced"));
    resp
}

/// A body that holds its request's slot on the machine until it ends or is dropped, and
/// gives its connection back for the next request when it was read to its end.
struct Leased {
    body: Incoming,
    used: Option<Checkout>,
    port: Arc<HttpPort>,
    _lease: Lease,
}

impl Body for Leased {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        // A connection whose response was not read whole cannot carry another request.
        if self.body.is_end_stream()
            && let Some(used) = self.used.take()
        {
            self.port.upstreams.give_back(used);
        }
    }
}
