//! The daemon as a whole: data plane choice when BPF cannot load, and a real server from
//! Debian driven by its own client through the proxy.

use std::{
    io::{Read, Write},
    net::Shutdown,
    process::Command,
    time::Duration,
};

use tests::{
    BACKEND_PORT, Daemon, MAX_BUFFER, Net, Netns, Plane, Server, Topo, echo, raise_fd_limit, setup,
    sockopt,
};

/// Runs the daemon without the capabilities BPF needs.
const NO_BPF: &[&str] = &[
    "setpriv",
    "--bounding-set",
    "-bpf,-sys_admin,-perfmon",
    "--",
];

/// Runs `spliced run` with the tests' config and `args` in `ns` (under `wrapper`), expecting
/// it to stop at start: its exit code and what it wrote to stderr.
fn refused_start(ns: &Netns, wrapper: &[&str], args: &[&str]) -> (Option<i32>, String) {
    let dir = tests::Scratch::new();
    let config = dir.0.join("fly.toml");
    std::fs::write(&config, tests::test_config()).expect("config");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(wrapper)
        .arg(tests::spliced_bin())
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run spliced");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn auto_falls_back_to_copy_when_bpf_cannot_load() {
    let net = Net::new(Topo::Loopback);
    let daemon = Daemon::start_with(&net.proxy, NO_BPF, Plane::Auto, &[]);
    assert_eq!(daemon.stats()["dataplane"], "copy");
    let log = daemon.log();
    for why in [
        "WARN",
        "FALLING BACK TO THE COPY DATA PLANE",
        "lacks what the sockmap plane needs: bpf() system call",
        "CAP_BPF",
        "spliced check --kernel",
    ] {
        assert!(log.contains(why), "the fallback should say {why:?}:\n{log}");
    }
    let _backend = Server::start(&net.proxy, net.backend(), echo);
    let mut c = net.connect();
    c.write_all(b"still served").expect("write");
    let mut got = [0; 12];
    c.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"still served");
    c.shutdown(Shutdown::Write).expect("half-close");
    daemon.stop();
}

/// The same-host bypass cannot keep every application's stream exact on this kernel (see
/// docs/same-host-bypass.md): asking for it stops the daemon at start, with the reason.
#[test]
fn same_host_bypass_is_refused_with_the_reason() {
    let net = Net::new(Topo::Loopback);
    let (code, err) = refused_start(&net.proxy, &[], &["--same-host-bypass", "on"]);
    assert_eq!(code, Some(2), "{err}");
    for why in [
        "--same-host-bypass on is refused",
        "splice(2)",
        "EAGAIN",
        "docs/same-host-bypass.md",
    ] {
        assert!(err.contains(why), "the refusal should say {why:?}: {err}");
    }
    // Off (the default, and said explicitly) serves.
    let daemon = Daemon::start(&net.proxy, Plane::Sockmap, &["--same-host-bypass", "off"]);
    let _backend = Server::start(&net.proxy, net.backend(), echo);
    let mut c = net.connect();
    c.write_all(b"served").expect("write");
    let mut got = [0; 6];
    c.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"served");
    daemon.stop();
}

#[test]
fn sockmap_refuses_to_start_without_bpf() {
    let ns = Netns::new("nobpf");
    let (code, err) = refused_start(&ns, NO_BPF, &["--dataplane", "sockmap"]);
    assert_ne!(code, Some(0), "spliced started without BPF");
    for why in ["--dataplane sockmap", "bpf() system call", "CAP_BPF"] {
        assert!(err.contains(why), "the error should say {why:?}: {err}");
    }
}

/// `spliced check --kernel --format json` and its exit code, run with `wrapper`.
fn check_kernel(wrapper: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut cmd = Command::new(wrapper.first().copied().unwrap_or("env"));
    let out = cmd
        .args(wrapper.iter().skip(1))
        .arg(tests::spliced_bin())
        .args(["check", "--kernel", "--format", "json"])
        .output()
        .expect("run spliced check --kernel");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

/// On a kernel that runs the sockmap plane, every probe answers yes, and the probes cover what
/// the programs use: their map types, program types and helpers, read from the object.
#[test]
fn check_kernel_probes_what_the_programs_use() {
    let (code, report) = check_kernel(&[]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["sockmap"]["available"], true, "{report:#}");
    let checks = report["checks"].as_array().expect("checks");
    for c in checks {
        assert!(
            c["found"] == true || c["required"] == false,
            "a required feature is missing: {c}"
        );
    }
    for feature in [
        "bpf() system call",
        "BPF_MAP_TYPE_SOCKHASH",
        "BPF_MAP_TYPE_RINGBUF",
        "BPF_PROG_TYPE_SK_SKB",
        "BPF_PROG_TYPE_SK_MSG",
        "BPF_PROG_TYPE_SOCK_OPS",
        "bpf_sk_redirect_hash in BPF_PROG_TYPE_SK_SKB",
        "bpf_skb_adjust_room in BPF_PROG_TYPE_SK_SKB",
        "bpf_sock_ops_cb_flags_set in BPF_PROG_TYPE_SOCK_OPS",
        "cgroup v2",
        "load and attach",
    ] {
        assert!(
            checks.iter().any(|c| c["feature"] == feature),
            "no probe of {feature}: {report:#}"
        );
    }
}

/// Without the privilege `bpf()` needs, the report says so and exits 1.
#[test]
fn check_kernel_names_what_is_missing() {
    let (code, report) = check_kernel(NO_BPF);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["sockmap"]["available"], false, "{report:#}");
    let why = report["sockmap"]["why"].as_str().expect("why");
    assert!(why.contains("bpf() system call"), "{why}");
    assert!(why.contains("CAP_BPF"), "{why}");
}

fn redis_through_proxy(plane: Plane) {
    raise_fd_limit();
    let net = Net::new(Topo::Veth);
    let daemon = Daemon::start(&net.proxy, plane, &[]);
    let port = BACKEND_PORT.to_string();
    let mut redis = net
        .proxy
        .run(move || {
            Command::new("redis-server")
                .args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
        })
        .expect("start redis-server");
    assert!(
        tests::eventually(Duration::from_secs(10), || {
            net.proxy.connect(net.backend()).is_ok()
        }),
        "redis-server did not start"
    );
    let host = net.public().ip().to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.client().name,
            "redis-benchmark",
            "-h",
            &host,
        ])
        .args(["-p", &net.public().port().to_string()])
        .args([
            "-n",
            "20000",
            "-c",
            "20",
            "-t",
            "set,get,lpush",
            "-d",
            "512",
            "--csv",
        ])
        .output()
        .expect("run redis-benchmark");
    let _ = redis.kill();
    let _ = redis.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "redis-benchmark failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for test in ["SET", "GET", "LPUSH"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))
            .unwrap_or_else(|| panic!("no {test} result: {text}"));
        let rps: f64 = line
            .split(',')
            .nth(1)
            .and_then(|v| v.trim_matches('"').parse().ok())
            .expect("rps");
        assert!(rps > 0.0, "{line}");
        eprintln!("redis-benchmark {plane} {test}: {rps} requests/s");
    }
    daemon.wait_idle();
}

#[test]
fn redis_benchmark_copy() {
    redis_through_proxy(Plane::Copy);
}

#[test]
fn redis_benchmark_sockmap() {
    redis_through_proxy(Plane::Sockmap);
}

/// `--backend-congestion` gives each connection to a machine that congestion control (seen
/// with `ss` on the proxy's socket), and one the kernel lacks stops the daemon at start with
/// the ones it offers.
#[test]
fn backend_congestion_is_set_or_refused() {
    let net = Net::new(Topo::Loopback);
    let (code, err) = refused_start(&net.proxy, &[], &["--backend-congestion", "nonesuch"]);
    assert_ne!(code, Some(0), "spliced started with nonesuch");
    for part in ["--backend-congestion nonesuch", "reno"] {
        assert!(err.contains(part), "the refusal should say {part:?}: {err}");
    }

    // reno is built into every kernel and is no namespace's default.
    let daemon = Daemon::start(
        &net.proxy,
        Plane::Sockmap,
        &["--backend-congestion", "reno"],
    );
    let _backend = Server::start(&net.proxy, net.backend(), echo);
    let mut c = net.connect();
    c.write_all(b"ping").expect("write");
    let mut got = [0; 4];
    c.read_exact(&mut got).expect("echo");
    let dport = format!("dport = :{BACKEND_PORT}");
    let ss = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.proxy.name,
            "ss",
            "-tinH",
            "state",
            "established",
        ])
        .arg(&dport)
        .output()
        .expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(
        ss.contains("reno") && !ss.contains("cubic") && !ss.contains("bbr"),
        "the connection to the machine should use reno: {ss}"
    );
    drop(c);
    daemon.stop();
}

/// Every socket that carries a proxied stream has its options, on both planes: no Nagle
/// delay, the send buffer of the plane and the receive buffer fixed at one and a half times
/// `--max-buffer` of kernel memory (the kernel doubles the buffer sizes it is given).
#[test]
fn proxied_sockets_carry_their_options() {
    for plane in [Plane::Sockmap, Plane::Copy] {
        let (net, daemon) = setup(plane, Topo::Loopback);
        let _backend = Server::start(&net.proxy, net.backend(), echo);
        let mut c = net.connect();
        c.write_all(b"ping").expect("write");
        let mut got = [0; 4];
        c.read_exact(&mut got).expect("echo");
        let send_buffer = match plane {
            Plane::Copy => MAX_BUFFER,
            _ => 2 * MAX_BUFFER,
        };
        let sockets = daemon.tcp_sockets();
        let mut connected = 0;
        for s in &sockets {
            if sockopt(s, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == 1 {
                continue;
            }
            connected += 1;
            let got = [
                sockopt(s, libc::IPPROTO_TCP, libc::TCP_NODELAY),
                sockopt(s, libc::SOL_SOCKET, libc::SO_SNDBUF),
                sockopt(s, libc::SOL_SOCKET, libc::SO_RCVBUF),
            ];
            let want = [1, send_buffer as i32, (MAX_BUFFER * 3 / 2) as i32];
            assert_eq!(
                got, want,
                "{plane}: nodelay, sndbuf, rcvbuf of a connection"
            );
        }
        assert_eq!(connected, 2, "{plane}: connected sockets of the daemon");
        drop(c);
        daemon.stop();
    }
}

/// `spliced status --format json`, parsed, and the text table.
fn status(daemon: &Daemon) -> (serde_json::Value, String) {
    let run = |format: &str| {
        let out = Command::new(tests::spliced_bin())
            .args(["status", "--format", format, "--admin-socket"])
            .arg(daemon.admin_socket())
            .output()
            .expect("spliced status");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let json = serde_json::from_str(&run("json")).expect("status --format json");
    (json, run("text"))
}

/// Writes to `c`, which never reads, until the whole path to it stays full for half a second.
fn fill(c: &mut std::net::TcpStream) -> u64 {
    c.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![5u8; 64 * 1024];
    let (mut sent, mut blocked_since) = (0u64, None::<std::time::Instant>);
    loop {
        match c.write(&chunk) {
            Ok(n) => {
                sent += n as u64;
                blocked_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    return sent;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// `spliced status` lists each live connection: its client and machine, plane and state, the
/// bytes the daemon's sockets received from each side (exact, from the kernel's socket
/// table), and both TCP states; a connection whose client stopped reading shows as held on
/// the sockmap plane; the per-service totals add up; a closed connection leaves the list.
/// The admin socket still answers the snapshot to a client that sends nothing.
#[test]
fn status_lists_live_connections() {
    for plane in [Plane::Sockmap, Plane::Copy] {
        let (net, daemon) = setup(plane, Topo::Veth);
        let _backend = Server::start(&net.proxy, net.backend(), echo);
        let mut clients = Vec::new();
        for n in [10_000usize, 20_000, 30_000] {
            let mut c = net.connect();
            c.write_all(&vec![7u8; n]).expect("write");
            let mut got = vec![0; n];
            c.read_exact(&mut got).expect("echo");
            clients.push((c, n as u64));
        }
        let mut slow = net.connect();
        let slow_sent = fill(&mut slow);
        let service = daemon.stats()["services"][0]["name"].clone();

        let (json, text) = status(&daemon);
        let conns = json["connections"].as_array().expect("connections");
        assert_eq!(conns.len(), 4, "{plane}: {json:#}");
        let find = |c: &std::net::TcpStream| {
            let addr = c.local_addr().expect("address").to_string();
            conns
                .iter()
                .find(|e| e["client"] == addr.as_str())
                .unwrap_or_else(|| panic!("{plane}: {addr} not listed: {json:#}"))
                .clone()
        };
        for (c, n) in &clients {
            let e = find(c);
            assert_eq!(e["service"], service, "{e:#}");
            assert_eq!(
                e["machine_addr"],
                net.backend().to_string().as_str(),
                "{e:#}"
            );
            assert_eq!(e["plane"], plane.name(), "{e:#}");
            let state = if plane == Plane::Sockmap {
                "spliced"
            } else {
                "copied"
            };
            assert_eq!(e["state"], state, "{e:#}");
            assert_eq!(e["bytes_from_client"], *n, "{e:#}");
            assert_eq!(e["bytes_from_machine"], *n, "{e:#}");
            assert_eq!(e["client_tcp"], "ESTAB", "{e:#}");
            assert_eq!(e["machine_tcp"], "ESTAB", "{e:#}");
            let addr = c.local_addr().expect("address").to_string();
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&addr) && l.contains(state)),
                "{plane}: {addr} not in the table:\n{text}"
            );
        }
        let e = find(&slow);
        let want = if plane == Plane::Sockmap {
            "held"
        } else {
            "copied"
        };
        assert_eq!(
            e["state"], want,
            "{plane}: a client that does not read: {e:#}"
        );
        let from_client = e["bytes_from_client"].as_u64().expect("bytes");
        assert!(
            from_client > 0 && from_client <= slow_sent,
            "{plane}: {from_client} of {slow_sent} sent: {e:#}"
        );
        let total = &json["services"][service.as_str().expect("service name")];
        assert_eq!(total["connections"], 4, "{json:#}");
        assert_eq!(
            total["bytes_from_client"].as_u64(),
            Some(60_000 + from_client),
            "{json:#}"
        );

        admin_requests(&daemon, plane);

        drop(clients);
        drop(slow);
        let emptied = tests::eventually(Duration::from_secs(10), || {
            daemon.ask("connections").expect("connections")["connections"]
                .as_array()
                .is_some_and(Vec::is_empty)
        });
        assert!(
            emptied,
            "{plane}: {:#}",
            daemon.ask("connections").unwrap_or_default()
        );
        daemon.wait_idle();
        daemon.stop();
    }
}

/// The admin socket answers the snapshot to a client that sends nothing (after its wait for a
/// request), and an error to an unknown request.
fn admin_requests(daemon: &Daemon, plane: Plane) {
    // Nothing sent: the snapshot after the wait for a request.
    let mut raw = std::os::unix::net::UnixStream::connect(daemon.admin_socket()).expect("admin");
    let mut body = String::new();
    raw.read_to_string(&mut body).expect("snapshot");
    let snapshot: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(snapshot["dataplane"], plane.name(), "{snapshot:#}");
    let unknown = daemon.ask("show everything").expect("an answer");
    assert!(
        unknown["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown request")),
        "{unknown:#}"
    );
}

/// Without a daemon, `spliced status` fails naming the socket it tried.
#[test]
fn status_names_the_socket_it_cannot_reach() {
    let out = Command::new(tests::spliced_bin())
        .args(["status", "--admin-socket", "/nonexistent/admin.sock"])
        .output()
        .expect("spliced status");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/admin.sock"), "{err}");
}

/// A second spliced on the ports of a running one refuses to start, naming the port, rather
/// than join them (`SO_REUSEPORT`) and take part of their connections; the first serves on.
/// After SIGKILL, the first leaves no BPF object behind, and a new one serves at once.
#[test]
fn a_second_daemon_on_the_same_ports_is_refused_and_a_killed_one_restarts() {
    let (net, mut first) = setup(Plane::Sockmap, Topo::Loopback);
    let _backend = Server::start(&net.proxy, net.backend(), echo);
    let objects = first.bpf_objects();
    assert!(
        !objects.is_empty(),
        "the daemon holds its programs and maps"
    );
    let config = tests::Scratch::new();
    let path = config.0.join("fly.toml");
    std::fs::write(&path, tests::test_config()).expect("config");
    let out = tests::run_to_exit(&net.proxy, &[], &path, 20);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the second one started:\n{err}");
    assert!(
        err.contains(&format!("port {}", tests::PUBLIC_PORT)) && err.contains("another process"),
        "{err}"
    );
    tests::assert_echoes(&mut net.connect(), b"one");

    first.signal(libc::SIGKILL);
    assert!(!first.wait(Duration::from_secs(10)).success());
    assert_eq!(
        tests::left_loaded(&objects, Duration::from_secs(5)),
        vec![],
        "left behind after SIGKILL"
    );
    let second = Daemon::start(&net.proxy, Plane::Sockmap, &[]);
    tests::assert_echoes(&mut net.connect(), b"one");
    second.stop();
}
