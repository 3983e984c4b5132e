//! Routing across machines, each in its own namespace behind a veth: least-loaded choice in
//! soft-limit bands, the hard limit never exceeded under a burst (the rest wait in the queue
//! and go through, also under a burst of 10,000), queued connections closed after the queue
//! timeout, a refusing machine retried around within a bounded number of attempts, health
//! checks taking machines out of rotation and back, and idle connections closed on time.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU16, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    BACKEND_PORT, Daemon, Machines, Net, PUBLIC_PORT, Plane, Server, Topo, raise_fd_limit,
};

fn config(machines: &Machines, concurrency: &str) -> String {
    format!(
        "[[services]]\n  internal_port = {BACKEND_PORT}\n  port = {PUBLIC_PORT}\n{concurrency}\n{}",
        machines.config()
    )
}

/// Per machine: connections open now, the most ever open at once, and all it accepted.
#[derive(Default)]
struct Load {
    now: AtomicU32,
    max: AtomicU32,
    total: AtomicU32,
}

/// Echoes a byte back per byte read, holding the connection until the client closes;
/// counts its concurrency in `load`.
fn counting_echo(load: Arc<Load>) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |mut s: TcpStream| {
        let now = load.now.fetch_add(1, Ordering::SeqCst) + 1;
        load.max.fetch_max(now, Ordering::SeqCst);
        load.total.fetch_add(1, Ordering::SeqCst);
        let mut b = [0u8; 1];
        while let Ok(1) = s.read(&mut b) {
            if s.write_all(&b).is_err() {
                break;
            }
        }
        load.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request-response round, proving the connection reached a machine.
fn ping(c: &mut TcpStream) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    c.write_all(b"x")?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b)
}

/// Fields drop in order: the servers before the namespaces they live in.
struct Setup {
    _servers: Vec<Server>,
    loads: Vec<Arc<Load>>,
    machines: Machines,
    net: Net,
}

impl Setup {
    /// Connections open now at each machine.
    fn open_now(&self) -> Vec<u32> {
        self.loads
            .iter()
            .map(|l| l.now.load(Ordering::SeqCst))
            .collect()
    }

    /// The most connections each machine ever had open at once.
    fn peaks(&self) -> Vec<u32> {
        self.loads
            .iter()
            .map(|l| l.max.load(Ordering::SeqCst))
            .collect()
    }

    /// Connections all machines accepted.
    fn served(&self) -> u32 {
        self.loads
            .iter()
            .map(|l| l.total.load(Ordering::SeqCst))
            .sum()
    }
}

fn setup(n: usize, serving: &[usize]) -> Setup {
    raise_fd_limit();
    let net = Net::new(Topo::Veth);
    let machines = Machines::new(&net.proxy, n);
    let loads: Vec<Arc<Load>> = (0..n).map(|_| Arc::default()).collect();
    let servers = serving
        .iter()
        .map(|&i| {
            Server::start(
                &machines.ns[i],
                machines.backend(i),
                counting_echo(Arc::clone(&loads[i])),
            )
        })
        .collect();
    Setup {
        net,
        machines,
        loads,
        _servers: servers,
    }
}

#[test]
fn least_loaded_fills_soft_limits_evenly() {
    let s = setup(3, &[0, 1, 2]);
    let cfg = config(
        &s.machines,
        "  [services.concurrency]\n    soft_limit = 2\n    hard_limit = 3\n",
    );
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, Plane::Sockmap, &[]);
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut c = s.net.connect();
        ping(&mut c).expect("served");
        held.push(c);
    }
    let per = s.open_now();
    assert_eq!(per, vec![2, 2, 2], "least-loaded within the soft band");
    // Past every soft limit, the next goes to a machine between soft and hard.
    let mut c = s.net.connect();
    ping(&mut c).expect("served above the soft limit");
    let per = s.open_now();
    assert_eq!(per.iter().sum::<u32>(), 7);
    assert!(per.iter().all(|&n| n <= 3), "{per:?}");
    drop(c);
    drop(held);
    daemon.wait_idle();
    daemon.stop();
}

#[test]
fn hard_limit_holds_under_a_burst_and_the_queue_drains() {
    const CLIENTS: usize = 300;
    const HARD: u32 = 10;
    let s = setup(2, &[0, 1]);
    let cfg = config(
        &s.machines,
        &format!("  [services.concurrency]\n    soft_limit = 5\n    hard_limit = {HARD}\n"),
    );
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, Plane::Sockmap, &[]);
    let public = s.net.public();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            s.net.client().spawn(move || {
                let mut c = TcpStream::connect(public)?;
                ping(&mut c)?;
                std::thread::sleep(Duration::from_millis(30));
                c.shutdown(Shutdown::Write)?;
                let mut rest = Vec::new();
                c.read_to_end(&mut rest)?;
                Ok::<_, std::io::Error>(())
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        c.join()
            .expect("client thread")
            .unwrap_or_else(|e| panic!("client {i} was not served: {e}\n{}", daemon.log()));
    }
    let max = s.peaks();
    let total = s.served();
    println!("largest concurrency per machine: {max:?} (hard limit {HARD}), {total} served");
    assert!(
        max.iter().all(|&m| m <= HARD),
        "hard limit exceeded: {max:?}"
    );
    assert_eq!(total as usize, CLIENTS);
    let stats = daemon.wait_idle();
    let queue = &stats["services"][0]["queue"];
    assert!(
        queue["dequeued"].as_u64().expect("dequeued") > 0,
        "the burst never queued: {stats:#}"
    );
    assert_eq!(queue["queue_timeouts"], 0, "{stats:#}");
    daemon.stop();
}

#[test]
fn queued_connection_closes_after_the_queue_timeout() {
    let s = setup(1, &[0]);
    let cfg = config(
        &s.machines,
        "  [services.concurrency]\n    hard_limit = 1\n",
    );
    let daemon = Daemon::start_config(
        &s.net.proxy,
        &cfg,
        Plane::Sockmap,
        &["--queue-timeout", "0.5"],
    );
    let mut first = s.net.connect();
    ping(&mut first).expect("served");
    let start = Instant::now();
    let mut second = s.net.connect();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = second.write_all(b"x");
    let mut b = [0u8; 1];
    let end = second.read(&mut b);
    let waited = start.elapsed();
    assert!(
        matches!(&end, Ok(0)) || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the queued connection should be closed: {end:?}"
    );
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "closed after {waited:?}, queue timeout 0.5 s"
    );
    let stats = daemon.stats();
    assert_eq!(
        stats["services"][0]["queue"]["queue_timeouts"], 1,
        "{stats:#}"
    );
    assert_eq!(stats["connections"]["refused"], 1, "{stats:#}");
    drop(first);
    // The slot is free again.
    let mut third = s.net.connect();
    ping(&mut third).expect("served after the first left");
    drop(third);
    daemon.wait_idle();
    daemon.stop();
}

#[test]
fn refusing_machine_is_retried_around() {
    // Machine 0 has no server: it refuses every connect.
    let s = setup(2, &[1]);
    let cfg = config(&s.machines, "");
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, Plane::Sockmap, &[]);
    for i in 0..20 {
        let mut c = s.net.connect();
        ping(&mut c).unwrap_or_else(|e| panic!("connection {i} was not served: {e}"));
    }
    let stats = daemon.wait_idle();
    let svc = &stats["services"][0];
    assert!(
        svc["queue"]["retried"].as_u64().expect("retried") > 0,
        "{stats:#}"
    );
    assert!(
        svc["machines"][0]["connect_failures"]
            .as_u64()
            .expect("failures")
            > 0,
        "{stats:#}"
    );
    assert_eq!(s.loads[1].total.load(Ordering::SeqCst), 20);
    assert_eq!(stats["connections"]["backend_unreachable"], 0, "{stats:#}");
    daemon.stop();
}

/// Polls the admin snapshot until `cond` holds of it; returns how long that took.
fn until(daemon: &Daemon, limit: Duration, what: &str, cond: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let s = daemon.stats();
        if cond(&s) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}: {s:#}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn machine(s: &Value, i: usize) -> &Value {
    &s["services"][0]["machines"][i]
}

#[test]
fn health_check_takes_a_dead_machine_out_and_brings_it_back() {
    const INTERVAL_MS: u64 = 500;
    const TIMEOUT_MS: u64 = 300;
    let s = setup(2, &[0, 1]);
    let cfg = config(
        &s.machines,
        &format!(
            "  [[services.tcp_checks]]\n    interval = {INTERVAL_MS}\n    timeout = {TIMEOUT_MS}\n"
        ),
    );
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, Plane::Sockmap, &[]);
    // Both pass their first check.
    until(&daemon, Duration::from_secs(5), "first checks", |st| {
        st["services"][0]["machines"]
            .as_array()
            .is_some_and(|ms| ms.iter().all(|m| m["healthy"] == true))
    });
    std::thread::sleep(Duration::from_millis(INTERVAL_MS));

    // Machine 0 dies without a word: its packets are dropped.
    s.machines.set_up(0, false);
    let failover = until(
        &daemon,
        Duration::from_secs(5),
        "m0 out of rotation",
        |st| machine(st, 0)["healthy"] == false,
    );
    println!(
        "failover: machine out of rotation {failover:?} after it died (interval {INTERVAL_MS} ms, timeout {TIMEOUT_MS} ms)"
    );
    assert!(
        failover <= Duration::from_millis(INTERVAL_MS + TIMEOUT_MS + 500),
        "failover took {failover:?}"
    );
    let before = daemon.stats();
    for i in 0..10 {
        let mut c = s.net.connect();
        ping(&mut c).unwrap_or_else(|e| panic!("connection {i} not served: {e}"));
    }
    let after = daemon.stats();
    assert_eq!(
        machine(&after, 0)["chosen"],
        machine(&before, 0)["chosen"],
        "a machine out of rotation got connections: {after:#}"
    );
    assert_eq!(
        machine(&after, 0)["connect_failures"],
        0,
        "a connect to the dead machine was tried"
    );
    assert!(machine(&after, 0)["check_failures"].as_u64() >= Some(1));

    // It recovers: back within one interval.
    s.machines.set_up(0, true);
    let back = until(&daemon, Duration::from_secs(5), "m0 back", |st| {
        machine(st, 0)["healthy"] == true
    });
    println!("recovery: machine back in rotation {back:?} after it recovered");
    assert!(
        back <= Duration::from_millis(INTERVAL_MS + TIMEOUT_MS + 500),
        "{back:?}"
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = s.net.connect();
        ping(&mut c).expect("served");
        held.push(c);
    }
    assert_eq!(
        s.loads[0].now.load(Ordering::SeqCst),
        2,
        "the recovered machine takes its share"
    );
    drop(held);
    let log = daemon.stop();
    assert!(log.contains("machine out of rotation"), "{log}");
    assert!(log.contains("machine back in rotation"), "{log}");
}

/// An echo server that also answers `GET /healthz` with the status in `status`.
fn echo_with_health(load: Arc<Load>, status: Arc<AtomicU16>) -> impl Fn(TcpStream) + Send + Sync {
    let echo = counting_echo(load);
    move |mut s: TcpStream| {
        let mut first = [0u8; 1];
        if s.peek(&mut first).is_err() {
            return;
        }
        if first[0] != b'G' {
            echo(s);
            return;
        }
        let mut req = Vec::new();
        let mut b = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&b[..n]),
            }
        }
        assert!(req.starts_with(b"GET /healthz HTTP/1.1\r\n"), "{req:?}");
        assert!(
            req.windows(16).any(|w| w == b"X-Check: spliced"),
            "configured header missing"
        );
        let code = status.load(Ordering::SeqCst);
        let _ = write!(
            s,
            "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
}

#[test]
fn http_checks_follow_the_status_and_all_failing_routes_to_all() {
    let (net, machines) = {
        raise_fd_limit();
        let net = Net::new(Topo::Veth);
        let machines = Machines::new(&net.proxy, 2);
        (net, machines)
    };
    let loads: Vec<Arc<Load>> = (0..2).map(|_| Arc::default()).collect();
    let status: Vec<Arc<AtomicU16>> = (0..2).map(|_| Arc::new(AtomicU16::new(200))).collect();
    let servers: Vec<Server> = (0..2)
        .map(|i| {
            Server::start(
                &machines.ns[i],
                machines.backend(i),
                echo_with_health(Arc::clone(&loads[i]), Arc::clone(&status[i])),
            )
        })
        .collect();
    let cfg = config(
        &machines,
        "  [[services.http_checks]]\n    interval = \"200ms\"\n    timeout = \"1s\"\n    \
         path = \"/healthz\"\n    headers = { X-Check = \"spliced\" }\n",
    );
    let daemon = Daemon::start_config(&net.proxy, &cfg, Plane::Sockmap, &[]);
    let served_by = |i: usize| loads[i].total.load(Ordering::SeqCst);

    status[0].store(503, Ordering::SeqCst);
    until(
        &daemon,
        Duration::from_secs(3),
        "m0 fails its check",
        |st| machine(st, 0)["healthy"] == false,
    );
    let before = served_by(0);
    for _ in 0..10 {
        let mut c = net.connect();
        ping(&mut c).expect("served");
    }
    assert_eq!(served_by(0), before, "m0 answers 503 yet got connections");

    // Every machine fails: the checks may be wrong while the service works, so spliced
    // routes to all of them (and says so) rather than refuse everything.
    status[1].store(500, Ordering::SeqCst);
    until(
        &daemon,
        Duration::from_secs(3),
        "m1 fails its check",
        |st| machine(st, 1)["healthy"] == false,
    );
    for i in 0..10 {
        let mut c = net.connect();
        ping(&mut c).unwrap_or_else(|e| panic!("connection {i} refused while all fail: {e}"));
    }
    assert!(served_by(0) > before, "all failing, yet m0 got nothing");
    let st = daemon.stats();
    assert_eq!(
        st["services"][0]["queue"]["routed_all_failing"], 10,
        "{st:#}"
    );

    status[0].store(204, Ordering::SeqCst);
    until(&daemon, Duration::from_secs(3), "m0 passes again", |st| {
        machine(st, 0)["healthy"] == true
    });
    let before = served_by(1);
    for _ in 0..10 {
        let mut c = net.connect();
        ping(&mut c).expect("served");
    }
    assert_eq!(served_by(1), before, "m1 still fails, yet got connections");
    let log = daemon.stop();
    assert!(
        log.contains("every machine fails its health checks"),
        "{log}"
    );
    drop(servers);
}

#[test]
fn connect_attempts_are_bounded() {
    // No machine serves: each refuses.
    let s = setup(3, &[]);
    let cfg = config(&s.machines, "");
    let daemon = Daemon::start_config(
        &s.net.proxy,
        &cfg,
        Plane::Sockmap,
        &["--connect-attempts", "2"],
    );
    let start = Instant::now();
    let mut c = s.net.connect();
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut b = [0u8; 1];
    let end = c.read(&mut b);
    assert!(
        matches!(&end, Ok(0)) || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{end:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let st = daemon.wait_idle();
    let failures: u64 = st["services"][0]["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| m["connect_failures"].as_u64().expect("count"))
        .sum();
    assert_eq!(failures, 2, "{st:#}");
    assert_eq!(st["connections"]["backend_unreachable"], 1, "{st:#}");
    daemon.stop();
}

fn idle_closes_while_busy_stays(plane: Plane) {
    let s = setup(1, &[0]);
    let cfg = config(&s.machines, "");
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, plane, &["--idle-timeout", "1"]);
    let mut idle = s.net.connect();
    let mut busy = s.net.connect();
    ping(&mut idle).expect("served");
    let last = Instant::now();
    idle.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut closed_after = None;
    while last.elapsed() < Duration::from_millis(2500) {
        ping(&mut busy).expect("the busy connection stays open");
        let mut b = [0u8; 1];
        match idle.read(&mut b) {
            Ok(0) if closed_after.is_none() => closed_after = Some(last.elapsed()),
            Ok(0) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("idle connection: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_after = closed_after.expect("the idle connection was not closed");
    println!("{plane}: idle connection closed after {closed_after:?} (timeout 1 s)");
    assert!(
        closed_after >= Duration::from_millis(950) && closed_after < Duration::from_millis(1600),
        "closed after {closed_after:?}"
    );
    ping(&mut busy).expect("the busy connection stays open");
    let st = daemon.stats();
    assert_eq!(st["connections"]["idle_closed"], 1, "{st:#}");
    drop(busy);
    daemon.wait_idle();
    daemon.stop();
}

#[test]
fn idle_connection_closes_on_time_sockmap() {
    idle_closes_while_busy_stays(Plane::Sockmap);
}

#[test]
fn idle_connection_closes_on_time_copy() {
    idle_closes_while_busy_stays(Plane::Copy);
}

#[test]
fn burst_of_10000_keeps_every_machine_within_its_hard_limit() {
    const CLIENTS: usize = 10_000;
    const HARD: u32 = 50;
    let s = setup(2, &[0, 1]);
    let cfg = config(
        &s.machines,
        &format!("  [services.concurrency]\n    soft_limit = 40\n    hard_limit = {HARD}\n"),
    );
    let daemon = Daemon::start_config(
        &s.net.proxy,
        &cfg,
        Plane::Sockmap,
        &["--queue-limit", "10000", "--queue-timeout", "60"],
    );
    let public = s.net.public();
    let start = Instant::now();
    let failures = s
        .net
        .client()
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..CLIENTS {
                    tasks.spawn(async move {
                        let mut c = tokio::net::TcpStream::connect(public).await?;
                        c.write_all(b"x").await?;
                        let mut b = [0u8; 1];
                        c.read_exact(&mut b).await?;
                        c.shutdown().await?;
                        let mut rest = Vec::new();
                        c.read_to_end(&mut rest).await?;
                        Ok::<_, std::io::Error>(())
                    });
                }
                let mut failures = Vec::new();
                while let Some(r) = tasks.join_next().await {
                    if let Err(e) = r.expect("client task") {
                        failures.push(e.to_string());
                    }
                }
                failures
            })
        })
        .join()
        .expect("client thread");
    let took = start.elapsed();
    let max = s.peaks();
    let total = s.served();
    let st = daemon.wait_idle();
    let queue = &st["services"][0]["queue"];
    println!(
        "burst of {CLIENTS}: {total} served in {took:?}; largest concurrency per machine {max:?} \
         (hard limit {HARD}); queue: {queue}"
    );
    assert!(
        failures.is_empty(),
        "{} clients failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        max.iter().all(|&m| m <= HARD),
        "hard limit exceeded: {max:?}"
    );
    assert_eq!(total as usize, CLIENTS);
    assert!(queue["max_queued"].as_u64() > Some(1000), "{queue}");
    assert_eq!(queue["queue_timeouts"], 0);
    assert_eq!(queue["queue_full"], 0);
    daemon.stop();
}

#[test]
fn redis_benchmark_spreads_over_three_redis_servers() {
    raise_fd_limit();
    let net = Net::new(Topo::Veth);
    let machines = Machines::new(&net.proxy, 3);
    let port = BACKEND_PORT.to_string();
    let mut servers: Vec<std::process::Child> = (0..3)
        .map(|i| {
            let (port, bind) = (port.clone(), machines.backend(i).ip().to_string());
            machines.ns[i]
                .run(move || {
                    Command::new("redis-server")
                        .args(["--port", &port, "--bind", &bind, "--save", ""])
                        .args(["--appendonly", "no", "--protected-mode", "no"])
                        .stdout(std::process::Stdio::null())
                        .spawn()
                })
                .expect("start redis-server")
        })
        .collect();
    for i in 0..3 {
        let addr = machines.backend(i);
        assert!(
            tests::eventually(Duration::from_secs(10), || net.proxy.connect(addr).is_ok()),
            "redis-server {i} did not start"
        );
    }
    let cfg = config(
        &machines,
        "  [services.concurrency]\n    soft_limit = 15\n    hard_limit = 20\n",
    );
    let daemon = Daemon::start_config(&net.proxy, &cfg, Plane::Sockmap, &[]);
    let out = Command::new("ip")
        .args(["netns", "exec", &net.client().name, "redis-benchmark"])
        .args(["-h", &net.public().ip().to_string()])
        .args(["-p", &net.public().port().to_string()])
        .args(["-n", "30000", "-c", "50", "-t", "set", "--csv"])
        .output()
        .expect("run redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"SET\""),
        "redis-benchmark failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = daemon.wait_idle();
    // 50 connections held at once, over three machines: 17, 17, 16, plus the one that
    // fetched the server's config first.
    let chosen: Vec<u64> = (0..3)
        .map(|i| machine(&st, i)["chosen"].as_u64().expect("chosen"))
        .collect();
    println!("redis-benchmark -c 50 over three redis-servers: connections per machine {chosen:?}");
    assert!(
        chosen.iter().all(|&n| (15..=19).contains(&n)),
        "uneven: {chosen:?} {st:#}"
    );
    for i in 0..3 {
        let keys = Command::new("ip")
            .args(["netns", "exec", &machines.ns[i].name, "redis-cli"])
            .args([
                "-h",
                &machines.backend(i).ip().to_string(),
                "-p",
                &port,
                "dbsize",
            ])
            .output()
            .expect("redis-cli");
        let keys = String::from_utf8_lossy(&keys.stdout);
        assert_eq!(keys.trim(), "1", "machine {i} got no SET: {keys}");
    }
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    daemon.stop();
}

#[test]
fn queued_connections_go_through_in_arrival_order() {
    const WAITERS: u8 = 6;
    raise_fd_limit();
    let net = Net::new(Topo::Veth);
    let machines = Machines::new(&net.proxy, 1);
    // The backend notes the first byte of each connection, in the order they reach it.
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&order);
    let server = Server::start(&machines.ns[0], machines.backend(0), move |mut s| {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() {
            seen.lock().expect("order").push(b[0]);
            let _ = s.write_all(&b);
            let _ = s.read(&mut b);
        }
    });
    let cfg = config(&machines, "  [services.concurrency]\n    hard_limit = 1\n");
    let daemon = Daemon::start_config(&net.proxy, &cfg, Plane::Sockmap, &[]);
    let mut first = net.connect();
    first.write_all(&[0]).expect("send");
    first.read_exact(&mut [0u8; 1]).expect("served");
    let mut waiting = Vec::new();
    for i in 1..=WAITERS {
        let mut c = net.connect();
        c.write_all(&[i]).expect("send");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        waiting.push(c);
        until(&daemon, Duration::from_secs(5), "queued", |st| {
            st["services"][0]["queue"]["queued"] == u64::from(i)
        });
    }
    drop(first);
    // Each is served only after the one before it has gone: out of order, a read below
    // would wait for a slot that its predecessor holds, and time out.
    for (i, mut c) in waiting.into_iter().enumerate() {
        let mut b = [0u8; 1];
        c.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("waiter {} not served in turn: {e}", i + 1));
        assert_eq!(usize::from(b[0]), i + 1);
    }
    assert_eq!(
        *order.lock().expect("order"),
        (0..=WAITERS).collect::<Vec<u8>>()
    );
    let st = daemon.wait_idle();
    assert_eq!(st["services"][0]["queue"]["dequeued"], u64::from(WAITERS));
    daemon.stop();
    drop(server);
}
