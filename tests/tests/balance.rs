//! Routing across machines, each in its own namespace behind a veth: least-loaded choice in
//! soft-limit bands, the hard limit never exceeded under a burst (the rest wait in the queue
//! and go through), queued connections closed after the queue timeout, and a refusing machine
//! retried around.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{BACKEND_PORT, Daemon, Machines, Net, PUBLIC_PORT, Server, Topo, raise_fd_limit};

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
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, "sockmap", &[]);
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut c = s.net.connect();
        ping(&mut c).expect("served");
        held.push(c);
    }
    let per: Vec<u32> = s
        .loads
        .iter()
        .map(|l| l.now.load(Ordering::SeqCst))
        .collect();
    assert_eq!(per, vec![2, 2, 2], "least-loaded within the soft band");
    // Past every soft limit, the next goes to a machine between soft and hard.
    let mut c = s.net.connect();
    ping(&mut c).expect("served above the soft limit");
    let per: Vec<u32> = s
        .loads
        .iter()
        .map(|l| l.now.load(Ordering::SeqCst))
        .collect();
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
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, "sockmap", &[]);
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
    let max: Vec<u32> = s
        .loads
        .iter()
        .map(|l| l.max.load(Ordering::SeqCst))
        .collect();
    let total: u32 = s.loads.iter().map(|l| l.total.load(Ordering::SeqCst)).sum();
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
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, "sockmap", &["--queue-timeout", "0.5"]);
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
    let daemon = Daemon::start_config(&s.net.proxy, &cfg, "sockmap", &[]);
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
