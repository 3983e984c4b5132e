//! A fleet of machines for the routing tests: each machine a namespace behind a veth, running
//! an echo that counts the connections it holds.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{BACKEND_PORT, Daemon, Machines, Net, PUBLIC_PORT, Server, Topo, raise_fd_limit};

/// The tests' fly.toml with `concurrency` (a `[services.concurrency]` block, or nothing) and
/// `machines` as its `[[machines]]`.
pub fn fleet_config(machines: &Machines, concurrency: &str) -> String {
    format!(
        "[[services]]\n  internal_port = {BACKEND_PORT}\n  port = {PUBLIC_PORT}\n{concurrency}\n{}",
        machines.config()
    )
}

/// Per machine: connections open now, the most ever open at once, and all it accepted.
#[derive(Default)]
pub struct Load {
    pub now: AtomicU32,
    pub max: AtomicU32,
    pub total: AtomicU32,
}

/// Echoes a byte back per byte read, holding the connection until the client closes;
/// counts its concurrency in `load`.
pub fn counting_echo(load: Arc<Load>) -> impl Fn(TcpStream) + Send + Sync + 'static {
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
pub fn ping(c: &mut TcpStream) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    c.write_all(b"x")?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b)
}

/// Fields drop in order: the servers before the namespaces they live in.
pub struct Fleet {
    _servers: Vec<Server>,
    pub loads: Vec<Arc<Load>>,
    pub machines: Machines,
    pub net: Net,
}

impl Fleet {
    /// Connections open now at each machine.
    pub fn open_now(&self) -> Vec<u32> {
        self.loads
            .iter()
            .map(|l| l.now.load(Ordering::SeqCst))
            .collect()
    }

    /// The most connections each machine ever had open at once.
    pub fn peaks(&self) -> Vec<u32> {
        self.loads
            .iter()
            .map(|l| l.max.load(Ordering::SeqCst))
            .collect()
    }

    /// Connections all machines accepted.
    pub fn served(&self) -> u32 {
        self.loads
            .iter()
            .map(|l| l.total.load(Ordering::SeqCst))
            .sum()
    }
}

/// `n` machines behind a veth each, the client over veth too; the machines in `serving` run a
/// [`counting_echo`].
pub fn fleet(n: usize, serving: &[usize]) -> Fleet {
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
    Fleet {
        net,
        machines,
        loads,
        _servers: servers,
    }
}

/// Waits until the daemon (after an upgrade) counts one connection completed, the one it took
/// over; its snapshot then.
pub fn completed_one_taken_over(daemon: &Daemon) -> Value {
    until(
        daemon,
        Duration::from_secs(20),
        "the connection completed",
        |s| s["connections"]["completed"] == 1,
    );
    let s = daemon.stats();
    assert_eq!(s["connections"]["taken_over"], 1, "{s:#}");
    s
}

/// Waits up to `limit` for the admin snapshot to satisfy `cond`; how long it took. Panics
/// naming `what` when it never does.
pub fn until(
    daemon: &Daemon,
    limit: Duration,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Duration {
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

/// Machine `i` of the first service in an admin snapshot.
pub fn machine(s: &Value, i: usize) -> &Value {
    &s["services"][0]["machines"][i]
}
