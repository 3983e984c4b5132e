//! The L4 checklist every data plane passes, part two: how connections end (refusals,
//! resets, shutdown) and what they cost (1,000 at once, slow readers held within the bound,
//! leaks). Each check runs four times (sockmap and copy; loopback and veth), each in
//! namespaces of its own; the backend runs on the proxy's host.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpStream},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use tests::{
    MAX_BUFFER, Pattern, Plane, Server, Topo, checklist, echo_server, eventually, send_pattern,
    set_reset_on_close, setup, setup_with,
};

checklist!(
    backend_refuses,
    backend_resets,
    client_resets,
    concurrent_1000,
    slow_reader,
    shutdown_with_live_sessions,
    leak_check,
);

/// Reads until end or error; returns how it ended and when.
fn read_until_closed(s: &mut TcpStream) -> (Result<u64, ErrorKind>, Instant) {
    let mut total = 0;
    let mut buf = vec![0; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (Ok(total), Instant::now()),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (Err(e.kind()), Instant::now()),
        }
    }
}

fn backend_refuses(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    // No backend listens.
    let start = Instant::now();
    // The proxy may reset the client before connect() has returned to it (a descheduled
    // client thread on a busy machine): that is the close this test waits for.
    let (end, at) = match net.client().connect(net.public()) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            (Err(ErrorKind::ConnectionReset), Instant::now())
        }
        Err(e) => panic!("client connects to the proxy: {e}"),
        Ok(mut c) => {
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let _ = c.write_all(b"anyone there?");
            read_until_closed(&mut c)
        }
    };
    assert!(
        matches!(end, Ok(0) | Err(ErrorKind::ConnectionReset)),
        "the client's connection should close: {end:?}"
    );
    assert!(
        at - start < Duration::from_secs(5),
        "closed after {:?}",
        at - start
    );
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["backend_unreachable"], 1, "{s:#}");
}

fn backend_resets(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let (tx, rx) = mpsc::channel::<()>();
    let tx = Mutex::new(tx);
    let _backend = Server::start(&net.proxy, net.backend(), move |mut s| {
        let mut buf = vec![0; 1 << 20];
        s.read_exact(&mut buf).expect("first MiB");
        s.write_all(b"partial answer").expect("answer");
        set_reset_on_close(&s);
        drop(s);
        tx.lock().expect("lock").send(()).expect("test waits");
    });
    let mut c = net.connect();
    // More than the backend reads, so that its close would reset even without SO_LINGER.
    // One thread only: a concurrent writer could take the reset error the reader must see.
    let sent = send_pattern(&mut c, 9, (1 << 20) + 4096);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("backend reset");
    let reset_at = Instant::now();
    let (end, at) = match sent {
        // The reset came while the client was still writing its last bytes (the backend
        // resets as soon as it has read its first MiB): the write saw it.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => (Err(e.kind()), reset_at),
        sent => {
            sent.expect("send");
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            read_until_closed(&mut c)
        }
    };
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the client should see a reset"
    );
    assert!(
        at - reset_at < Duration::from_secs(3),
        "reset after {:?}",
        at - reset_at
    );
    daemon.wait_idle();
}

fn client_resets(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let _backend = Server::start(&net.proxy, net.backend(), move |mut s| {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let r = read_until_closed(&mut s);
        tx.lock().expect("lock").send(r).expect("test waits");
    });
    let mut c = net.connect();
    send_pattern(&mut c, 10, 1 << 20).expect("send");
    std::thread::sleep(Duration::from_millis(100));
    set_reset_on_close(&c);
    let reset_at = Instant::now();
    drop(c);
    let (end, at) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("backend saw the end");
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the backend should see a reset"
    );
    assert!(
        at - reset_at < Duration::from_secs(3),
        "reset after {:?}",
        at - reset_at
    );
    daemon.wait_idle();
}

fn concurrent_1000(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let _backend = echo_server(&net);
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| net.connect()).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(format!("connection {i:04}").as_bytes())
            .expect("write");
    }
    assert!(
        eventually(Duration::from_secs(20), || {
            daemon.stats()["connections"]["active"] == 1000
        }),
        "1000 connections should be live at once"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        let mut got = [0; 15];
        c.read_exact(&mut got).expect("echo");
        assert_eq!(got, *format!("connection {i:04}").as_bytes());
        c.shutdown(Shutdown::Write).expect("half-close");
    }
    for c in &mut conns {
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("end of stream");
    }
    drop(conns);
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1000, "{s:#}");
}

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

/// SIGTERM: no new connections, live ones go on for the grace period and are then closed,
/// and nothing of ours stays in the kernel.
fn shutdown_with_live_sessions(plane: Plane, topo: Topo) {
    let (net, daemon) = setup_with(plane, topo, &["--grace", "2s"]);
    let _backend = echo_server(&net);
    let mut live = net.connect();
    live.write_all(b"before").expect("write");
    let mut got = [0; 6];
    live.read_exact(&mut got).expect("echo");
    // A second session that ends during the grace period.
    let mut finishing = net.connect();
    finishing.write_all(b"x").expect("write");
    finishing.read_exact(&mut [0; 1]).expect("echo");

    daemon.signal(libc::SIGTERM);
    let term_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || net
            .client()
            .connect(net.public())
            .is_err()),
        "still accepting after SIGTERM"
    );
    // Live sessions keep working during the grace period.
    live.write_all(b"during").expect("write during grace");
    live.read_exact(&mut got).expect("echo during grace");
    assert_eq!(&got, b"during");
    finishing.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    finishing
        .read_to_end(&mut rest)
        .expect("clean end during grace");
    // Then the grace period ends and the live session is closed.
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (_, closed_at) = read_until_closed(&mut live);
    let after = closed_at - term_at;
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_secs(5),
        "closed {after:?} after SIGTERM, grace 2 s"
    );
    let log = daemon.stop();
    assert!(log.contains("grace period over"), "{log}");
    // The kernel frees programs and maps after their last reference goes, a little later.
    assert!(
        eventually(Duration::from_secs(5), || tests::loaded_bpf_objects()
            .is_empty()),
        "left in the kernel after exit: {:?}",
        tests::loaded_bpf_objects()
    );
}

/// 10,000 connections open and close: maps empty, no fd leaked, RSS stable.
fn leak_check(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let _backend = echo_server(&net);
    let round = |n: usize| {
        net.client().run({
            let addr = net.public();
            move || {
                for batch in 0..n / 100 {
                    let mut conns: Vec<TcpStream> = (0..100)
                        .map(|_| TcpStream::connect(addr).expect("connect"))
                        .collect();
                    for (i, c) in conns.iter_mut().enumerate() {
                        // Some close cleanly, some reset, some close at once.
                        match (batch + i) % 3 {
                            0 => {
                                c.write_all(b"ping").expect("write");
                                c.read_exact(&mut [0; 4]).expect("echo");
                                c.shutdown(Shutdown::Write).expect("half-close");
                                let _ = c.read_to_end(&mut Vec::new());
                            }
                            1 => {
                                c.write_all(b"ping").expect("write");
                                set_reset_on_close(c);
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
    };
    // Warm up: the allocator and the runtime reach their working size.
    round(1000);
    daemon.wait_idle();
    let fds = daemon.fd_count();
    round(4000);
    daemon.wait_idle();
    let rss = daemon.rss_kib();
    round(5000);
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["accepted"], 10_000, "{s:#}");
    // A leak per connection would show as thousands; the runtime may open one or two
    // descriptors of its own on the way.
    let fds_after = daemon.fd_count();
    assert!(
        fds_after <= fds + 2,
        "file descriptors leaked: {fds} -> {fds_after}"
    );
    let rss_after = daemon.rss_kib();
    eprintln!(
        "leak_check {plane} {topo:?}: RSS {rss} KiB after 5,000, {rss_after} KiB after 10,000"
    );
    assert!(
        rss_after < rss + 4 * 1024,
        "RSS grew from {rss} to {rss_after} KiB"
    );
}
