//! The L4 checklist, the bound: clients pushing into backends that do not read are held back
//! by TCP within `--max-buffer` plus the sockets' own buffers, and every byte arrives once the
//! backends read. Runs for both data planes over every topology, like the rest of the
//! checklist.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tests::{MAX_BUFFER, Pattern, Plane, Server, Topo, checklist, setup};

checklist!(slow_reader);

fn sysctl_max(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .expect("sysctl")
        .split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .expect("three numbers")
}

/// 100 clients push into backends that do not read. Each client is held back by TCP once
/// the proxy's bound and the sockets' own buffers are full, and stays held back; then the
/// backends read everything, byte-exact.
fn slow_reader(plane: Plane, topo: Topo) {
    const CLIENTS: usize = 100;
    let (net, daemon) = setup(plane, topo);
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let held2 = Arc::clone(&held);
    let _backend = Server::start(&net.proxy, net.backend(), move |s| {
        held2.lock().expect("lock").push(s);
    });
    let mut pushers: Vec<Pusher> = (0..CLIENTS)
        .map(|i| {
            let c = net.connect();
            c.set_nonblocking(true).expect("nonblocking");
            Pusher {
                c,
                p: Pattern::new(100 + i as u64),
                pending: Vec::new(),
                off: 0,
                pushed: 0,
            }
        })
        .collect();
    push_until_held(&mut pushers);
    let first: Vec<u64> = pushers.iter().map(|x| x.pushed).collect();
    let mem_first = tcp_mem_pages();
    // Held back, and stays held back.
    std::thread::sleep(Duration::from_secs(2));
    push_until_held(&mut pushers);
    let pushed: Vec<u64> = pushers.iter().map(|x| x.pushed).collect();
    let mem_second = tcp_mem_pages();
    let rmem = sysctl_max("/proc/sys/net/ipv4/tcp_rmem");
    let wmem = sysctl_max("/proc/sys/net/ipv4/tcp_wmem");
    // The client's send buffer, the proxy's receive buffer (where a held sender's bytes
    // wait), the bound, the proxy's send buffer, the backend's receive buffer.
    let bound = MAX_BUFFER + 3 * rmem + 2 * wmem;
    let max = *pushed.iter().max().expect("clients");
    let total: u64 = pushed.iter().sum();
    eprintln!(
        "slow_reader {plane} {topo:?}: per client max {max} B, total {total} B; bound {bound} B; \
         TCP memory {mem_first} -> {mem_second} pages"
    );
    assert!(
        max <= bound,
        "a client pushed {max} bytes past a stalled backend (bound {bound})"
    );
    for (i, (a, b)) in first.iter().zip(&pushed).enumerate() {
        assert!(b - a <= 2 * rmem, "client {i} kept going: {a} -> {b}");
    }
    // Now the backends read: every byte arrives, in order.
    let backends: Vec<TcpStream> = std::mem::take(&mut *held.lock().expect("lock"));
    assert_eq!(backends.len(), CLIENTS);
    let conns: Vec<TcpStream> = pushers.into_iter().map(|x| x.c).collect();
    for c in &conns {
        c.set_nonblocking(false).expect("blocking");
        c.shutdown(Shutdown::Write).expect("half-close");
    }
    let readers: Vec<_> = backends
        .into_iter()
        .map(|mut b| {
            std::thread::spawn(move || {
                // A stall fails the test instead of hanging it.
                b.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                let mut first = [0u8; 8];
                b.read_exact(&mut first).expect("data");
                let seed = (100..100 + CLIENTS as u64)
                    .find(|&s| {
                        let mut p = Pattern::new(s);
                        p.check(&first).is_ok()
                    })
                    .expect("a known stream");
                let mut p = Pattern::new(seed);
                p.check(&first).expect("first bytes");
                let mut rest = Vec::new();
                b.read_to_end(&mut rest).expect("rest");
                p.check(&rest).expect("byte-exact");
                (seed, p.pos())
            })
        })
        .collect();
    let mut got: Vec<(u64, u64)> = readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .collect();
    got.sort_unstable();
    for (i, (seed, n)) in got.into_iter().enumerate() {
        assert_eq!(seed, 100 + i as u64);
        assert_eq!(n, pushed[i], "client {i}");
    }
    drop(conns);
    daemon.wait_idle();
}

/// A client writing its stream as fast as the connection takes it.
struct Pusher {
    c: TcpStream,
    p: Pattern,
    pending: Vec<u8>,
    off: usize,
    pushed: u64,
}

/// Writes on every connection until none has taken a byte for a second.
fn push_until_held(pushers: &mut [Pusher]) {
    let mut last_progress = Instant::now();
    while last_progress.elapsed() < Duration::from_secs(1) {
        for (i, x) in pushers.iter_mut().enumerate() {
            loop {
                if x.off == x.pending.len() {
                    x.pending.resize(64 * 1024, 0);
                    x.p.fill(&mut x.pending);
                    x.off = 0;
                }
                match x.c.write(&x.pending[x.off..]) {
                    Ok(n) => {
                        x.off += n;
                        x.pushed += n as u64;
                        last_progress = Instant::now();
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tcp_mem_pages() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").expect("sockstat");
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .expect("TCP mem")
}
