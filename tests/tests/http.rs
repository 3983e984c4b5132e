//! The `http` handler with real clients (curl over HTTP/1.1, HTTP/2 by ALPN over TLS and
//! HTTP/2 in the clear, h2load) and machines of the tests' own that show what reached them:
//! Fly's forwarding headers, requests balanced one by one, `force_https`, response header
//! edits, bodies streamed both ways, a WebSocket-style upgrade tunnelled, the idle timeout,
//! and 400, 502 and 504 where a proxy answers them.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use tests::{
    BACKEND_PORT, Daemon, Net, Nginx, PUBLIC_PORT, Pattern, Plane, Scratch, Server, Topo,
    http::{head_echo, silent},
    tls::TestCa,
};

/// A fly.toml with one service at `BACKEND_PORT` on `machines`, its public port given
/// `port_toml` (the keys of a `[[services.ports]]` table), and `top` at the top.
fn config(top: &str, port_toml: &str, machines: &[&str]) -> String {
    let machines: Vec<String> = machines
        .iter()
        .enumerate()
        .map(|(i, m)| format!("[[machines]]\n  id = \"m{i}\"\n  address = \"{m}\"\n"))
        .collect();
    let machines = machines.concat();
    format!(
        "app = \"spliced-test\"\n{top}\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n{port_toml}\n{machines}"
    )
}

fn machine(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), BACKEND_PORT)
}

/// Runs curl in the client's namespace: its status, stdout and stderr.
fn curl(net: &Net, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.client().name,
            "curl",
            "-sS",
            "--max-time",
            "30",
        ])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn url(net: &Net, path: &str) -> String {
    format!("http://{}{path}", net.public())
}

/// A topology with one machine answering as [`head_echo`] at the backend address, and the
/// daemon serving [`config`] with `top` and `port_toml` on it.
fn one_machine(topo: Topo, top: &str, port_toml: &str, extra: &[&str]) -> (Net, Server, Daemon) {
    let net = Net::new(topo);
    let machine = Server::start(&net.proxy, net.backend(), head_echo("m0"));
    let ip = net.backend().ip().to_string();
    let d = start(&net, &config(top, port_toml, &[ip.as_str()]), extra);
    (net, machine, d)
}

fn start(net: &Net, config: &str, extra: &[&str]) -> Daemon {
    tests::raise_fd_limit();
    Daemon::start_config(&net.proxy, config, Plane::Sockmap, extra)
}

#[test]
fn the_machine_gets_fly_forwarding_headers_over_every_protocol() {
    let (net, _m, d) = one_machine(
        Topo::Veth,
        "primary_region = \"ams\"",
        "    handlers = [\"http\"]",
        &[],
    );
    let (ok, body, err) = curl(
        &net,
        &[
            "-i",
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "Fly-Client-IP: 192.0.2.1",
            "-H",
            "X-Forwarded-Proto: https",
            "-H",
            "Connection: keep-alive, X-Hop",
            "-H",
            "X-Hop: this hop only",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "X-Kept: yes",
            &url(&net, "/path?q=1"),
        ],
    );
    assert!(ok, "{err}\n{}", d.log());
    for want in [
        "GET /path?q=1 HTTP/1.1",
        &format!("host: {}", net.public()),
        "fly-client-ip: 198.18.0.1",
        "x-forwarded-for: 203.0.113.9, 198.18.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-ssl: off",
        &format!("x-forwarded-port: {PUBLIC_PORT}"),
        &format!("fly-forwarded-port: {PUBLIC_PORT}"),
        "fly-region: ams",
        "via: 1.1 spliced",
    ] {
        assert!(
            body.to_ascii_lowercase()
                .contains(&want.to_ascii_lowercase()),
            "{want:?} not in what the machine got:\n{body}"
        );
    }
    assert!(
        !body.contains("192.0.2.1"),
        "the client's Fly-Client-IP was passed on:\n{body}"
    );
    // Hop-by-hop headers, and those the client's `Connection` names, stay on this hop.
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("x-kept: yes"), "{body}");
    for gone in ["x-hop:", "keep-alive:", "timeout=5"] {
        assert!(!lower.contains(gone), "{gone:?} was passed on:\n{body}");
    }
    // HTTP/2 in the clear (prior knowledge): the authority becomes the Host header.
    let (ok, body, err) = curl(&net, &["-i", "--http2-prior-knowledge", &url(&net, "/h2c")]);
    assert!(ok, "{err}");
    assert!(body.starts_with("HTTP/2 200"), "{body}");
    assert!(
        body.contains("GET /h2c HTTP/1.1") && body.contains("via: 2 spliced"),
        "{body}"
    );
    assert!(body.contains(&format!("host: {}", net.public())), "{body}");
    let stats = d.wait_idle();
    assert_eq!(stats["http"]["requests"], 2, "{stats:#}");
}

#[test]
fn https_serves_http2_by_alpn_and_says_so_to_the_machine() {
    let net = Net::new(Topo::Veth);
    let ca_dir = Scratch::new();
    let ca = TestCa::new(&ca_dir.0);
    let certs = Scratch::new();
    ca.issue(&certs.0, "a", "exact", &["a.example.com"], false);
    let _m = Server::start(&net.proxy, net.backend(), head_echo("m0"));
    let certs_arg = certs.0.to_string_lossy().into_owned();
    let d = start(
        &net,
        &config("", "    handlers = [\"tls\", \"http\"]", &["127.0.0.1"]),
        &["--certs", &certs_arg],
    );
    let public = net.public();
    let resolve = format!("a.example.com:{}:{}", public.port(), public.ip());
    let https = format!("https://a.example.com:{}/secure", public.port());
    let ca_path = ca.path.to_string_lossy().into_owned();
    for (flag, version, via) in [
        ("--http2", "HTTP/2 200", "via: 2 spliced"),
        ("--http1.1", "HTTP/1.1 200", "via: 1.1 spliced"),
    ] {
        let (ok, body, err) = curl(
            &net,
            &[
                "-i",
                flag,
                "--cacert",
                &ca_path,
                "--resolve",
                &resolve,
                &https,
            ],
        );
        assert!(ok, "{flag}: {err}\n{}", d.log());
        assert!(body.starts_with(version), "{flag}:\n{body}");
        for want in [
            "x-forwarded-proto: https",
            "x-forwarded-ssl: on",
            via,
            "host: a.example.com",
        ] {
            assert!(body.contains(want), "{flag}: {want:?} not in:\n{body}");
        }
    }
}

#[test]
fn requests_are_balanced_one_by_one_and_headers_edited() {
    let net = Net::new(Topo::Loopback);
    let _m0 = Server::start(&net.proxy, machine("127.0.0.1"), head_echo("m0"));
    let _m1 = Server::start(&net.proxy, machine("127.0.0.2"), head_echo("m1"));
    let port = "    handlers = [\"http\"]\n    [services.ports.http_options.response.headers]\n      x-drop = false\n      x-added = \"yes\"\n      x-machine = [\"hidden\", \"twice\"]\n";
    let d = start(&net, &config("", port, &["127.0.0.1", "127.0.0.2"]), &[]);
    // One client connection, 40 requests on it.
    let urls: Vec<String> = (0..40).map(|i| url(&net, &format!("/{i}"))).collect();
    let mut args = vec!["-i"];
    args.extend(urls.iter().map(String::as_str));
    let (ok, out, err) = curl(&net, &args);
    assert!(ok, "{err}");
    assert_eq!(out.matches("HTTP/1.1 200").count(), 40, "{out}");
    assert!(!out.contains("x-drop"), "x-drop was not removed:\n{out}");
    assert_eq!(out.matches("x-added: yes").count(), 40, "{out}");
    assert_eq!(
        out.matches("x-machine: hidden\r\nx-machine: twice").count(),
        40,
        "{out}"
    );
    let stats = d.wait_idle();
    let machines = &stats["services"][0]["machines"];
    let (a, b) = (
        machines[0]["chosen"].as_u64(),
        machines[1]["chosen"].as_u64(),
    );
    assert_eq!(a.zip(b).map(|(a, b)| a + b), Some(40), "{stats:#}");
    assert!(
        a > Some(0) && b > Some(0),
        "one connection's requests all went to one machine: {stats:#}"
    );
    assert_eq!(stats["connections"]["accepted"], 1, "{stats:#}");
}

#[test]
fn force_https_redirects_plain_requests() {
    let (net, _m, d) = one_machine(
        Topo::Loopback,
        "",
        "    handlers = [\"http\"]\n    force_https = true",
        &[],
    );
    let (ok, out, err) = curl(
        &net,
        &[
            "-i",
            "-H",
            "Host: shop.example:10080",
            &url(&net, "/cart?id=7"),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 301"), "{out}");
    assert!(
        out.contains("location: https://shop.example/cart?id=7"),
        "{out}"
    );
    let stats = d.wait_idle();
    assert_eq!(stats["http"]["redirects"], 1, "{stats:#}");
    assert_eq!(
        stats["services"][0]["machines"][0]["chosen"], 0,
        "{stats:#}"
    );
}

#[test]
fn bodies_stream_both_ways_and_h2load_completes_every_request() {
    let (net, _m, d) = one_machine(Topo::Veth, "", "    handlers = [\"http\"]", &[]);
    let dir = Scratch::new();
    let upload = dir.0.join("upload");
    let mut data = vec![0u8; 64 << 20];
    Pattern::new(5).fill(&mut data);
    std::fs::write(&upload, &data).expect("write upload");
    let back = dir.0.join("back");
    let (ok, _, err) = curl(
        &net,
        &[
            "--fail",
            "-T",
            &upload.to_string_lossy(),
            "-o",
            &back.to_string_lossy(),
            &url(&net, "/echo"),
        ],
    );
    assert!(ok, "{err}\n{}", d.log());
    let got = std::fs::read(&back).expect("echoed body");
    assert!(
        got == data,
        "the body came back as {} bytes, not the {} sent, or changed",
        got.len(),
        data.len()
    );
    // h2load: 2,000 requests over 10 connections, HTTP/1.1 and HTTP/2.
    for proto in [&["--h1"][..], &[][..]] {
        h2load_all_succeed(&net, 2000, 10, proto);
    }
    let stats = d.wait_idle();
    assert_eq!(stats["http"]["requests"], 4001, "{stats:#}");
}

#[test]
fn an_upgraded_connection_is_tunnelled_exactly() {
    let (net, _m, d) = one_machine(Topo::Veth, "", "    handlers = [\"http\"]", &[]);
    let total = 16u64 << 20;
    let mut stream = vec![0u8; total as usize];
    Pattern::new(11).fill(&mut stream);
    // The first bytes of the new protocol come with the request, before the 101: the proxy
    // has read them with the request and must pass them on first, once.
    let mut s = net.connect();
    let request = b"GET /ws HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    s.write_all(&[&request[..], &stream[..1000]].concat())
        .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        w.write_all(&stream[1000..]).expect("send");
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let got = tests::recv_pattern(&mut s, 11).expect("tunnelled bytes exact");
    writer.join().expect("writer");
    assert_eq!(got, total);
    let stats = d.wait_idle();
    assert_eq!(stats["http"]["upgrades"], 1, "{stats:#}");
    // After the 101, the kernel moved the bytes: both ways, the daemon almost none.
    let kernel = &stats["kernel"];
    let service = &kernel["services"][0];
    assert!(
        service["bytes_to_backend"].as_u64() >= Some(total - (1 << 20)),
        "{stats:#}"
    );
    assert!(
        service["bytes_to_client"].as_u64() >= Some(total - (1 << 20)),
        "{stats:#}"
    );
    assert!(
        kernel["userspace_moved_bytes"].as_u64() < Some(total / 50),
        "{stats:#}"
    );
}

#[test]
fn failures_are_answered_400_502_504_and_idle_connections_closed() {
    let net = Net::new(Topo::Loopback);
    // m0 never answers; m1 refuses (nothing listens there).
    let _m0 = Server::start(&net.proxy, machine("127.0.0.1"), silent);
    let port =
        "    handlers = [\"http\"]\n    [services.ports.http_options]\n      idle_timeout = 1\n";
    let d = start(
        &net,
        &config("", port, &["127.0.0.1"]),
        &["--http-response-timeout", "1s"],
    );
    let (ok, out, err) = curl(&net, &["-i", &url(&net, "/slow")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    // A request line hyper cannot parse.
    let mut s = net.connect();
    s.write_all(b"GET /\x01 HTTP/1.1\r\n\r\n").expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // An idle keep-alive connection is closed after the port's idle timeout.
    let mut s = net.connect();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let started = Instant::now();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let waited = started.elapsed();
    assert!(
        String::from_utf8_lossy(&all).starts_with("HTTP/1.1 504"),
        "{all:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the idle connection stayed open {waited:?}"
    );
    drop(d);

    let d = start(
        &net,
        &config("", "    handlers = [\"http\"]", &["127.0.0.2"]),
        &[],
    );
    let (ok, out, err) = curl(&net, &["-i", &url(&net, "/down")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    let stats = d.wait_idle();
    assert_eq!(stats["http"]["bad_gateway"], 1, "{stats:#}");
}

/// nginx's answer: the protocol it was asked in, its connection's serial number and how many
/// requests that connection has carried.
const CONNECTION_ECHO: &str =
    "return 200 \"$server_protocol conn=$connection n=$connection_requests\\n\";";

/// The (connection, request count) of each of nginx's [`CONNECTION_ECHO`] answers in `out`,
/// from lines starting with `protocol`.
fn connection_echoes(out: &str, protocol: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix(protocol)?.strip_prefix(" conn="))
        .filter_map(|l| {
            let (conn, n) = l.trim().split_once(" n=")?;
            Some((conn.parse().ok()?, n.parse().ok()?))
        })
        .collect()
}

/// h2load from the client's namespace: `n` requests to `/load` over `conns` connections, 4 at
/// once on each, with `proto` (`--h1`, or none for HTTP/2); every one must succeed with 2xx.
fn h2load_all_succeed(net: &Net, n: u32, conns: u32, proto: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &net.client().name, "h2load"])
        .args(["-n", &n.to_string(), "-c", &conns.to_string(), "-m", "4"])
        .args(proto)
        .arg(url(net, "/load"))
        .output()
        .expect("h2load (Debian's nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{n} total"))
            && text.contains(&format!("{n} succeeded"))
            && text.contains(&format!("{n} 2xx")),
        "{proto:?}:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One request on `s` and its whole answer (nginx's [`CONNECTION_ECHO`]: one line of body).
fn request_on(s: &mut std::net::TcpStream, path: &str) -> String {
    // A read that waits past the deadline fails instead of hanging the test.
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: kept.example\r\n\r\n").expect("request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((_, body)) = text.split_once("\r\n\r\n")
            && body.ends_with('\n')
        {
            return text;
        }
        assert!(Instant::now() < deadline, "no whole answer: {text:?}");
        let n = s.read(&mut buf).expect("read answer");
        assert!(n > 0, "closed before a whole answer: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn machines_are_reached_over_kept_connections_http1_and_http2() {
    let net = Net::new(Topo::Loopback);
    let h1 = machine("127.0.0.1");
    let h2 = SocketAddr::new(h1.ip(), BACKEND_PORT + 1);
    let nginx = Nginx::start(
        &net.proxy,
        &format!(
            "  keepalive_timeout 1s;\n  server {{ listen {h1}; location / {{ {CONNECTION_ECHO} }} }}\n  \
             server {{ listen {h2} http2; keepalive_requests 50; location / {{ {CONNECTION_ECHO} }} }}\n"
        ),
        h1,
    );
    // HTTP/1.1: the requests of one client connection go one after the other over one
    // connection to the machine.
    let d = start(
        &net,
        &config("", "    handlers = [\"http\"]", &["127.0.0.1"]),
        &[],
    );
    let urls: Vec<String> = (0..20).map(|i| url(&net, &format!("/{i}"))).collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (ok, out, err) = curl(&net, &args);
    assert!(ok, "{err}\n{}", nginx.error_log());
    let seen = connection_echoes(&out, "HTTP/1.1");
    assert_eq!(seen.len(), 20, "{out}");
    assert!(seen.iter().all(|(c, _)| *c == seen[0].0), "{seen:?}");
    let counts: Vec<u64> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, (1..=20).collect::<Vec<u64>>(), "{out}");
    // The machine closes the connection once idle for a second: the next request goes on a
    // new one, answered as any other.
    let mut s = net.client().connect(net.public()).expect("connect");
    let first = connection_echoes(&request_on(&mut s, "/a"), "HTTP/1.1");
    std::thread::sleep(Duration::from_millis(1500));
    let answer = request_on(&mut s, "/b");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let second = connection_echoes(&answer, "HTTP/1.1");
    assert_eq!((first.len(), second.len()), (1, 1), "{answer}");
    assert_ne!(first[0].0, second[0].0, "{answer}");
    assert_eq!(second[0].1, 1, "{answer}");
    drop(s);
    let stats = d.wait_idle();
    assert_eq!(stats["http"]["bad_gateway"], 0, "{stats:#}");
    drop(d);

    // `h2_backend`: HTTP/2 to the machine, every request on one connection.
    let port =
        "    handlers = [\"http\"]\n    [services.ports.http_options]\n      h2_backend = true\n";
    let toml = config("", port, &["127.0.0.1"]).replace(
        &format!("internal_port = {BACKEND_PORT}"),
        &format!("internal_port = {}", h2.port()),
    );
    let d = start(&net, &toml, &[]);
    let (ok, out, err) = curl(&net, &args);
    assert!(ok, "{err}\n{}\n{}", nginx.error_log(), d.log());
    let seen = connection_echoes(&out, "HTTP/2.0");
    assert_eq!(seen.len(), 20, "{out}\n{}", d.log());
    assert!(seen.iter().all(|(c, _)| *c == seen[0].0), "{seen:?}");
    // The machine sends GOAWAY after every 50 requests of a connection, with requests in
    // flight: those it did not process go again on a new connection, none is lost.
    h2load_all_succeed(&net, 3000, 20, &["--h1"]);
    let stats = d.wait_idle();
    assert_eq!(stats["http"]["bad_gateway"], 0, "{stats:#}");
    assert_eq!(stats["http"]["requests"], 3020, "{stats:#}");
}
