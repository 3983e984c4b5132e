//! The config model through the real binary: `spliced check` output and exit status, `spliced
//! run` refusing what it cannot serve before binding anything, and the PROXY protocol header
//! read by a real consumer (nginx with `proxy_protocol`) for IPv4 and IPv6 clients, on both
//! data planes.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use tests::{
    BACKEND_PORT, Daemon, Net, Netns, Nginx, PUBLIC_PORT, Plane, Scratch, Topo, spliced_bin,
};

fn write_config(dir: &Scratch, text: &str) -> std::path::PathBuf {
    let path = dir.0.join("fly.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn check_prints_the_routing_table_and_json() {
    let dir = Scratch::new();
    let config = write_config(
        &dir,
        "app = \"shop\"\n\
         [processes]\nweb = \"run web\"\ndb = \"run db\"\n\
         [[services]]\n  internal_port = 8080\n  processes = [\"web\"]\n\
         \x20 [[services.ports]]\n    port = 443\n    handlers = [\"tls\", \"http\"]\n\
         \x20 [[services.ports]]\n    port = 5000\n    handlers = [\"proxy_proto\"]\n    proxy_proto_options = { version = \"v2\" }\n\
         \x20 [services.concurrency]\n    type = \"connections\"\n    hard_limit = 25\n    soft_limit = 20\n\
         \x20 [[services.tcp_checks]]\n    interval = \"10s\"\n\
         [[services]]\n  internal_port = 5432\n  processes = [\"db\"]\n\
         [[services]]\n  internal_port = 6379\n  processes = [\"db\"]\n\
         [[machines]]\n  id = \"w1\"\n  address = \"10.0.0.1\"\n  processes = [\"web\"]\n\
         [[machines]]\n  id = \"d1\"\n  address = \"fd00::7\"\n  processes = [\"db\"]\n  region = \"ams\"\n\
         [build]\n  image = \"x\"\n",
    );
    let out = Command::new(spliced_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run spliced check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check failed: {out:?}");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    let row = |port: &str| {
        rows.iter()
            .find(|r| r.first() == Some(&port))
            .unwrap_or_else(|| panic!("no row for {port}:\n{text}"))
    };
    assert_eq!(
        row("443/tcp"),
        &vec![
            "443/tcp",
            "services[0]",
            "8080",
            "tls,http",
            "w1",
            "conns 20/25",
            "tcp every 10s",
            "serve"
        ]
    );
    assert_eq!(row("5000/tcp")[3], "proxy_proto v2");
    assert_eq!(row("5000/tcp")[7], "serve");
    assert_eq!(row("80/tcp")[1], "services[1] (default ports)");
    assert_eq!(row("80/tcp")[4], "d1");
    assert!(
        text.contains("internal-only") && row("services[2]")[1] == "6379",
        "the third service is internal-only:\n{text}"
    );
    assert!(
        text.contains("ignored (not an L4 proxy's job): build"),
        "{text}"
    );

    let out = Command::new(spliced_bin())
        .args(["check", "--format", "json", "--config"])
        .arg(&config)
        .output()
        .expect("run spliced check --format json");
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check prints JSON");
    assert_eq!(json["valid"], true);
    let services = json["config"]["services"].as_array().expect("services");
    assert_eq!(services.len(), 3);
    assert_eq!(services[0]["ports"][1]["proxy_proto"], "v2");
    assert_eq!(services[0]["tcp_checks"][0]["interval"], 10_000);
    assert_eq!(services[2]["exposure"], "internal_only");
    assert_eq!(json["config"]["machines"][1]["address"], "fd00::7");
    assert_eq!(json["unservable"].as_array().map(Vec::len), Some(0));
}

#[test]
fn invalid_config_exits_2_and_binds_nothing() {
    let ns = Netns::new("badcfg");
    let dir = Scratch::new();
    let config = write_config(
        &dir,
        &format!(
            "[[services]]\n  internal_port = {BACKEND_PORT}\n  port = {PUBLIC_PORT}\n[[services]]\n  internal_port = 9\n  [[services.ports]]\n    port = 70000\n"
        ),
    );
    // The public port is taken: a daemon that bound before checking would fail on it
    // ("cannot listen") instead of naming the config error.
    let public = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), PUBLIC_PORT);
    let _taken = ns.run(move || std::net::TcpListener::bind(public).expect("take the port"));
    for cmd in ["check", "run"] {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(spliced_bin())
            .args([cmd, "--config"])
            .arg(&config)
            .output()
            .expect("run spliced");
        assert_eq!(out.status.code(), Some(2), "{cmd}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "{}:7:12: services[1].ports[0].port: 70000 is not a port (1-65535)",
                config.display()
            )),
            "{cmd}: {err}"
        );
        assert!(
            !err.contains("listening") && !err.contains("cannot listen"),
            "{cmd} bound a port before refusing: {err}"
        );
    }
}

#[test]
fn run_refuses_unimplemented_handlers_one_message_per_port() {
    let ns = Netns::new("tlscfg");
    let dir = Scratch::new();
    let config = write_config(
        &dir,
        "[[services]]\n  internal_port = 8080\n  [[services.ports]]\n    port = 443\n    handlers = [\"edge_http\"]\n  [[services.ports]]\n    port = 80\n    handlers = [\"http\"]\n[[services]]\n  protocol = \"udp\"\n  internal_port = 53\n  port = 53\n",
    );
    // Port 443 is taken: a daemon that bound before refusing would fail on it instead.
    let public = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 443);
    let _taken = ns.run(move || std::net::TcpListener::bind(public).expect("take the port"));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(spliced_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run spliced");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("cannot listen"),
        "bound before refusing: {err}"
    );
    let f = config.display();
    for line in [
        format!(
            "{f}: port 443 (services[0]): edge_http is a handler of Fly's own edge, not one an app's ports can use; use http"
        ),
        format!("{f}: port 53/udp (services[1]): UDP services are not implemented yet"),
    ] {
        assert!(
            err.lines().any(|l| l == line),
            "missing {line:?} in:\n{err}"
        );
    }
    assert!(!err.contains("port 80"), "the http port was refused: {err}");
}

/// What one public port of a corpus file answered, or why it did not.
fn answer_of(ns: &Netns, port: u16, handlers: &[&str]) -> Result<String, String> {
    let run = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "timeout", "20"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let tls = handlers.contains(&"tls");
    if handlers.contains(&"http") {
        let scheme = if tls { "https" } else { "http" };
        let code = run(&[
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{scheme}://127.0.0.1:{port}/"),
        ])?;
        // No machine runs: spliced itself answers (502), or redirects (force_https).
        return if code == "502" || code == "301" {
            Ok(format!("HTTP {code}"))
        } else {
            Err(format!("HTTP {code:?}"))
        };
    }
    if tls || handlers.contains(&"pg_tls") {
        let mut args = vec!["openssl", "s_client", "-connect"];
        let addr = format!("127.0.0.1:{port}");
        args.push(&addr);
        if handlers.contains(&"pg_tls") {
            args.extend(["-starttls", "postgres"]);
        }
        let out = run(&args)?;
        return if out.contains("BEGIN CERTIFICATE") {
            Ok("TLS".to_owned())
        } else {
            Err(out)
        };
    }
    let addr = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port);
    ns.connect(addr)
        .map(|_| "TCP".to_owned())
        .map_err(|e| e.to_string())
}

#[test]
fn every_real_world_file_starts_and_answers_on_its_ports() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../proxy-user/tests/fixtures/fly-toml/real-world");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .expect("corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 25, "corpus went missing: {}", files.len());
    let mut answered = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        let out = Command::new(spliced_bin())
            .args(["check", "--format", "json", "--config"])
            .arg(file)
            .output()
            .expect("check");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check JSON");
        let services = report["config"]["services"]
            .as_array()
            .expect("services")
            .clone();
        if services.iter().any(|s| s["protocol"] == "udp") {
            continue;
        }
        let ns = Netns::new("corpus");
        let daemon =
            Daemon::start_config(&ns, &text, Plane::Sockmap, &["--listen-addr", "127.0.0.1"]);
        for s in services.iter().filter(|s| s["exposure"] != "internal_only") {
            for p in s["ports"].as_array().expect("ports") {
                let port = p["port"].as_u64().expect("port") as u16;
                let handlers: Vec<&str> = p["handlers"]
                    .as_array()
                    .expect("handlers")
                    .iter()
                    .filter_map(|h| h.as_str())
                    .collect();
                if let Err(e) = answer_of(&ns, port, &handlers) {
                    panic!(
                        "{}: port {port} {handlers:?}: {e}\n{}",
                        file.display(),
                        daemon.log()
                    );
                }
            }
        }
        answered += 1;
    }
    println!("{answered} of {} real-world files served", files.len());
    assert_eq!(
        answered,
        files.len(),
        "every real-world file has only TCP services"
    );
}

/// nginx answers each request with the addresses it read from the PROXY header.
const NGINX_PROXY_PROTOCOL: &str = "  server {\n    listen 127.0.0.1:18080 proxy_protocol;\n    \
     keepalive_requests 1000;\n    location / {\n      return 200 \
     \"client=$proxy_protocol_addr:$proxy_protocol_port server=$proxy_protocol_server_addr:$proxy_protocol_server_port\\n\";\n    }\n  }";

fn proxy_protocol(plane: Plane, version: &str) {
    let net = Net::new(Topo::Veth);
    let _nginx = Nginx::start(&net.proxy, NGINX_PROXY_PROTOCOL, net.backend());
    let config = format!(
        "[[services]]\n  internal_port = {BACKEND_PORT}\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n    handlers = [\"proxy_proto\"]\n    proxy_proto_options = {{ version = \"{version}\" }}\n"
    );
    let daemon = Daemon::start_config(&net.proxy, &config, plane, &[]);
    for public in [net.public(), net.public_v6()] {
        let mut c = net.client().connect(public).expect("client connects");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let me = c.local_addr().expect("client address");
        // Three requests on one connection: the header came once, first, or nginx would
        // answer 400 to the bytes that follow it.
        for round in 0..3 {
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("request");
            let body = read_response(&mut c);
            let want = format!(
                "client={}:{} server={}:{}",
                me.ip(),
                me.port(),
                public.ip(),
                public.port()
            );
            assert_eq!(
                body.trim_end(),
                want,
                "{plane} {version} round {round} via {public}"
            );
        }
    }
    daemon.wait_idle();
    daemon.stop();
}

/// Reads one HTTP/1.1 response with a Content-Length and returns its body.
fn read_response(c: &mut std::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = c.read(&mut byte).expect("response head");
        assert!(n == 1, "connection closed in the response head: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "nginx refused: {head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Content-Length");
    let mut body = vec![0; len];
    c.read_exact(&mut body).expect("response body");
    String::from_utf8(body).expect("text body")
}

#[test]
fn proxy_protocol_v1_sockmap() {
    proxy_protocol(Plane::Sockmap, "v1");
}

#[test]
fn proxy_protocol_v2_sockmap() {
    proxy_protocol(Plane::Sockmap, "v2");
}

#[test]
fn proxy_protocol_v1_copy() {
    proxy_protocol(Plane::Copy, "v1");
}

#[test]
fn proxy_protocol_v2_copy() {
    proxy_protocol(Plane::Copy, "v2");
}
