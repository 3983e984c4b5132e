//! Routing across machines, each in its own namespace behind a veth: least-loaded choice in
//! soft-limit bands, the hard limit never exceeded under a burst (the rest wait in the queue
//! and go through), queued connections closed after the queue timeout, a refusing machine
//! retried around within a bounded number of attempts, and idle connections closed on time.
//! Health checks are in `health.rs`, routing under heavy load in `fleet_load.rs`.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpStream},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tests::{
    Daemon, Machines, Net, Plane, Server, Topo, fleet, fleet_config, ping, raise_fd_limit, until,
};

#[test]
fn least_loaded_fills_soft_limits_evenly() {
    let s = fleet(3, &[0, 1, 2]);
    let cfg = fleet_config(
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
    let s = fleet(2, &[0, 1]);
    let cfg = fleet_config(
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
    let s = fleet(1, &[0]);
    let cfg = fleet_config(
        &s.machines,
        "  [services.concurrency]\n    hard_limit = 1\n",
    );
    let daemon = Daemon::start_config(
        &s.net.proxy,
        &cfg,
        Plane::Sockmap,
        &["--queue-timeout", "500ms"],
    );
    let mut first = s.net.connect();
    ping(&mut first).expect("served");
    let start = Instant::now();
    let mut second = s.net.connect();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The client sends nothing: a reset is then spliced's, not the kernel's for unread bytes.
    let mut b = [0u8; 1];
    let end = second.read(&mut b);
    let waited = start.elapsed();
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the queued connection should be reset: {end:?}"
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
    let s = fleet(2, &[1]);
    let cfg = fleet_config(&s.machines, "");
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

/// Every machine refuses: after `--connect-attempts` machines, each tried once, the client is
/// reset.
#[test]
fn connect_attempts_are_bounded() {
    // No machine serves: each refuses.
    let s = fleet(3, &[]);
    let cfg = fleet_config(&s.machines, "");
    let daemon = Daemon::start_config(
        &s.net.proxy,
        &cfg,
        Plane::Sockmap,
        &["--connect-attempts", "2"],
    );
    let start = Instant::now();
    // The reset can come before the client's connect returns: it then fails with it.
    let end = s.net.client().connect(s.net.public()).and_then(|mut c| {
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.read(&mut [0u8; 1])
    });
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the client should be reset: {end:?}"
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
    let s = fleet(1, &[0]);
    let cfg = fleet_config(&s.machines, "");
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, plane, &["--idle-timeout", "1s"]);
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
    let cfg = fleet_config(&machines, "  [services.concurrency]\n    hard_limit = 1\n");
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
