//! Health checks across machines, each in its own namespace behind a veth: `tcp_checks` and
//! `http_checks` take a machine out of rotation and bring it back, and when every machine
//! fails, connections go to all of them.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use tests::{
    Daemon, Load, Machines, Net, Plane, Server, Topo, counting_echo, fleet, fleet_config, machine,
    ping, raise_fd_limit, until,
};

#[test]
fn health_check_takes_a_dead_machine_out_and_brings_it_back() {
    const INTERVAL_MS: u64 = 500;
    const TIMEOUT_MS: u64 = 300;
    let s = fleet(2, &[0, 1]);
    let checks = format!(
        "  [[services.tcp_checks]]\n    interval = {INTERVAL_MS}\n    timeout = {TIMEOUT_MS}\n"
    );
    let cfg = fleet_config(&s.machines, &checks);
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
    assert!(machine(&daemon.stats(), 0)["check_failures"].as_u64() >= Some(1));
    // A reload that rebuilds the service's pool (new limits, the same checks) keeps it out.
    let limits = "  [services.concurrency]\n    type = \"connections\"\n    hard_limit = 100\n";
    let reloaded = daemon.reload(&fleet_config(&s.machines, &format!("{checks}{limits}")));
    assert_eq!(reloaded["reloads"]["done"], 1, "{}", daemon.log());
    assert_eq!(machine(&reloaded, 0)["healthy"], false, "{reloaded:#}");
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
    let cfg = fleet_config(
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
