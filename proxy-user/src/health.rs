//! Health checks, as fly-proxy runs them: every `[[services.tcp_checks]]` and
//! `[[services.http_checks]]` of a service runs against each of its machines at the service's
//! internal port, on the check's own interval and timeout, starting after its grace period.
//! A machine starts in rotation; it leaves when one of its checks fails and returns when all
//! pass again (see [`Pool::check_changed`]). A TCP check passes when the machine accepts a
//! connection in time; an HTTP check when it answers the configured request with a 2xx in
//! time, over TLS for `protocol = "https"` (SNI `tls_server_name`, or none; the certificate
//! checked against the host's roots unless `tls_skip_verify`).

#![forbid(unsafe_code)]

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
};

use crate::{
    balance::Pool,
    config::{HttpCheck, Service},
};

/// One configured check.
#[derive(Clone, Debug)]
enum Probe {
    Tcp,
    Http(Arc<HttpCheck>),
}

#[derive(Clone, Copy, Debug)]
struct Timing {
    interval: Duration,
    timeout: Duration,
    grace: Duration,
}

/// Starts the checks of `service` on every machine of its `pool`. The tasks stop when the
/// returned set is dropped.
pub fn start_pool(service: &Service, pool: &Arc<Pool>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let mut probes: Vec<(String, Probe, Timing)> = Vec::new();
    for (i, c) in service.tcp_checks.iter().enumerate() {
        let timing = Timing {
            interval: c.interval,
            timeout: c.timeout,
            grace: c.grace_period.unwrap_or_default(),
        };
        probes.push((format!("tcp_checks[{i}]"), Probe::Tcp, timing));
    }
    for (i, c) in service.http_checks.iter().enumerate() {
        let name = format!("http_checks[{i}]");
        let timing = Timing {
            interval: c.interval,
            timeout: c.timeout,
            grace: c.grace_period.unwrap_or_default(),
        };
        probes.push((name, Probe::Http(Arc::new(c.clone())), timing));
    }
    for (number, (name, probe, timing)) in probes.into_iter().enumerate() {
        for index in 0..pool.machines.len() {
            tasks.spawn(run(
                Arc::clone(pool),
                index,
                (number, name.clone()),
                probe.clone(),
                timing,
            ));
        }
    }
    tasks
}

/// Runs check `number` (named `name`) on one machine forever, reporting each change of
/// outcome to the pool, from the outcome the pool holds (a pool that replaced another may
/// hold a failure).
async fn run(
    pool: Arc<Pool>,
    index: usize,
    (number, name): (usize, String),
    probe: Probe,
    timing: Timing,
) {
    let addr = pool.machines[index].addr;
    tokio::time::sleep(timing.grace).await;
    let mut ticks = tokio::time::interval(timing.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut passing = !pool.machines[index].check_failing(number);
    loop {
        ticks.tick().await;
        // A machine spliced has stopped, or not yet started, keeps its last outcome.
        if !pool.machines[index].running() {
            continue;
        }
        let outcome = match tokio::time::timeout(timing.timeout, once(addr, &probe)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {:?}", timing.timeout)),
        };
        let machine = &pool.machines[index];
        machine.checks.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                if !passing {
                    passing = true;
                    pool.check_changed(index, (number, &name), true, "");
                }
            }
            Err(why) => {
                machine.check_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(service = %pool.service, machine = %machine.id, check = %name, %why, "health check failed");
                if passing {
                    passing = false;
                    pool.check_changed(index, (number, &name), false, &why);
                }
            }
        }
    }
}

/// One run of a check, without its timeout.
async fn once(addr: SocketAddr, probe: &Probe) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match probe {
        Probe::Tcp => Ok(()),
        Probe::Http(check) if check.protocol == "https" => {
            let config = crate::tls::client_config(check.tls_skip_verify);
            let name = match &check.tls_server_name {
                Some(n) => {
                    ServerName::try_from(n.clone()).map_err(|e| format!("tls_server_name: {e}"))?
                }
                None => ServerName::IpAddress(addr.ip().into()),
            };
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(&mut tls, addr, check).await
        }
        Probe::Http(check) => exchange(&mut stream, addr, check).await,
    }
}

/// Sends the check's request on `stream` and passes on a 2xx.
async fn exchange(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    addr: SocketAddr,
    check: &HttpCheck,
) -> Result<(), String> {
    stream
        .write_all(request(addr, check).as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = read_status(stream).await?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// The HTTP/1.1 request of a check: its method, path and headers, with `Host` (the machine's
/// address unless the check sets one) and `Connection: close`.
fn request(addr: SocketAddr, check: &HttpCheck) -> String {
    let mut req = format!("{} {} HTTP/1.1\r\n", check.method, check.path);
    let has = |name: &str| {
        check
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    if !has("host") {
        let _ = write!(req, "Host: {addr}\r\n");
    }
    if !has("user-agent") {
        req.push_str("User-Agent: spliced-health-check\r\n");
    }
    for h in &check.headers {
        let _ = write!(req, "{}: {}\r\n", h.name, h.value);
    }
    req.push_str("Connection: close\r\n\r\n");
    req
}

/// The status code of an HTTP/1.x response, from its status line.
async fn read_status(stream: &mut (impl AsyncRead + Unpin)) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        if buf.len() > 4096 {
            return Err("status line longer than 4 KiB".to_owned());
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            return Err("closed before a status line".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_status(&buf).ok_or_else(|| {
        let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
        format!("not an HTTP response: {:?}", String::from_utf8_lossy(line))
    })
}

fn parse_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Header;

    #[test]
    fn request_carries_method_path_and_headers() {
        let check = HttpCheck {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            grace_period: None,
            method: "HEAD".to_owned(),
            path: "/healthz".to_owned(),
            protocol: "http".to_owned(),
            tls_skip_verify: false,
            tls_server_name: None,
            headers: vec![Header {
                name: "X-Probe".to_owned(),
                value: "1".to_owned(),
            }],
        };
        let addr: SocketAddr = "[fd00::2]:8080".parse().expect("address");
        assert_eq!(
            request(addr, &check),
            "HEAD /healthz HTTP/1.1\r\nHost: [fd00::2]:8080\r\nUser-Agent: spliced-health-check\r\n\
             X-Probe: 1\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status(b"HTTP/1.0 503 Busy\r\n"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 200\r\n"), Some(200));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 2000 x\r\n"), None);
    }
}
