//! The L4 checklist, the bound: clients pushing into backends that do not read are held back
//! by TCP within `--max-buffer` plus a fixed slack, measured from outside the proxy, and every
//! byte arrives once the backends read. Runs for both data planes over every topology, like the rest of the
//! checklist.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tests::{
    MAX_BUFFER, Pattern, Plane, Server, Topo, checklist, setup_with, unacknowledged, unread,
};

checklist!(slow_reader);

/// What the proxy may hold of one direction beyond the `--max-buffer` in flight toward a slow
/// reader (docs/design.md): the held socket's queue (its receive buffer, which spliced fixes
/// at one and a half times `--max-buffer` of kernel memory, raised to at most twice it while
/// held), and what passes the bound before the hold takes: the kernel checks the bound at
/// every packet the socket sends, so a few segments (256 KiB covers four of the largest). The
/// copy plane holds its two socket buffers and one 64 KiB buffer, within the same. Fixed: it
/// follows from `--max-buffer`, never from the host's `tcp_rmem`.
const SLACK: u64 = MAX_BUFFER * 2 + 256 * 1024;
/// Process memory the daemon may add for 100 connections beyond the bytes it holds: their
/// state, and the allocator's step (mimalloc takes memory a segment of up to 4 MiB at a
/// time; docs/design.md, Threads). Holding their payload would be 100 times `MAX_BUFFER`.
const BOOKKEEPING_KIB: u64 = 6144;
/// The copy plane's buffer per direction (`COPY_BUFFER` in the daemon).
const COPY_BUFFER_KIB: u64 = 64;

/// Bytes of each client's stream inside the proxy: written by the client, acknowledged to it,
/// not yet in its backend's receive queue. Each backend's stream is known by its first bytes,
/// peeked.
fn in_proxy(pushers: &[Pusher], backends: &[TcpStream]) -> Vec<u64> {
    let mut inside = vec![None; pushers.len()];
    for b in backends {
        let mut first = [0u8; 8];
        let n = b.peek(&mut first).expect("peek");
        assert_eq!(n, 8, "a backend got fewer than 8 bytes");
        let i = (0..pushers.len())
            .find(|&i| Pattern::new(100 + i as u64).check(&first).is_ok())
            .expect("a known stream");
        inside[i] = Some(pushers[i].pushed - unacknowledged(&pushers[i].c) - unread(b));
    }
    inside
        .into_iter()
        .enumerate()
        .map(|(i, n)| n.unwrap_or_else(|| panic!("no backend got client {i}'s stream")))
        .collect()
}

/// 100 clients push into backends that do not read. Each client is held back by TCP once
/// the proxy holds `--max-buffer` plus [`SLACK`] of its stream, measured from outside the
/// proxy, and stays held back; then the backends read everything, byte-exact.
fn slow_reader(plane: Plane, topo: Topo) {
    const CLIENTS: usize = 100;
    // A held client moves no byte until every other is held too: under an emulated CPU that
    // takes longer than the default idle timeout, which this test is not about. A budget that
    // gives every connection the whole `--max-buffer`: this test is about the bound itself
    // (tests/tests/budget.rs about sharing it).
    let budget = (5 * MAX_BUFFER * CLIENTS as u64).to_string();
    let (net, daemon) = setup_with(
        plane,
        topo,
        &["--idle-timeout", "0", "--buffer-budget", &budget],
    );
    let rss_idle = daemon.rss_kib();
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
    // Held back, and stays held back.
    std::thread::sleep(Duration::from_secs(2));
    push_until_held(&mut pushers);
    let pushed: Vec<u64> = pushers.iter().map(|x| x.pushed).collect();
    let inside = in_proxy(&pushers, &held.lock().expect("lock"));
    let rss = daemon.rss_kib();
    let max = *inside.iter().max().expect("clients");
    let total: u64 = inside.iter().sum();
    eprintln!(
        "slow_reader {plane} {topo:?}: in the proxy per connection max {max} B, total {total} B; \
         bound {} B; pushed max {} B; daemon RSS {rss_idle} -> {rss} KiB",
        MAX_BUFFER + SLACK,
        pushed.iter().max().expect("clients"),
    );
    for (i, n) in inside.iter().enumerate() {
        assert!(
            *n <= MAX_BUFFER + SLACK,
            "connection {i}: the proxy holds {n} bytes of it (bound {})",
            MAX_BUFFER + SLACK
        );
    }
    // The sockmap plane moves no byte through the process; the copy plane holds one buffer
    // per stalled direction.
    let copied_kib = if plane.in_kernel() {
        0
    } else {
        CLIENTS as u64 * COPY_BUFFER_KIB
    };
    assert!(
        rss <= rss_idle + copied_kib + BOOKKEEPING_KIB,
        "the daemon grew from {rss_idle} to {rss} KiB"
    );
    for (i, (a, b)) in first.iter().zip(&pushed).enumerate() {
        assert!(b - a <= SLACK, "client {i} kept going: {a} -> {b}");
    }
    // Now the backends read: every byte arrives, in order.
    let backends: Vec<TcpStream> = std::mem::take(&mut *held.lock().expect("lock"));
    assert_eq!(backends.len(), CLIENTS);
    let conns: Vec<TcpStream> = pushers.into_iter().map(|x| x.c).collect();
    let io_before = daemon.io_bytes();
    read_back(&conns, backends, &pushed);
    drop(conns);
    let io = daemon.io_bytes() - io_before;
    let s = daemon.wait_idle();
    if plane.in_kernel() {
        // Every client half-closed while held, so the daemon moved the rest of each stream
        // (its socket cannot go back into a socket map); through pipes, copying none of it.
        let moved = s["kernel"]["userspace_moved_bytes"]
            .as_u64()
            .expect("moved");
        eprintln!("slow_reader {plane} {topo:?}: the daemon moved {moved} B, read or wrote {io} B");
        assert!(moved >= CLIENTS as u64 * (256 << 10), "{s:#}");
        assert!(
            io < 1 << 20,
            "the daemon read or wrote {io} bytes of {moved} it moved"
        );
        // Each held direction was told when its backend had drained it (the hold program's
        // event on the backend socket's acknowledgements), not left to a poll.
        let drained = s["kernel"]["services"][0]["drain_events"]
            .as_u64()
            .expect("drain_events");
        assert!(drained >= CLIENTS as u64, "{s:#}");
    }
}

/// Half-closes every client, lets every backend read its stream to the end, and checks each
/// byte-exact and as long as its client `pushed`.
fn read_back(conns: &[TcpStream], backends: Vec<TcpStream>, pushed: &[u64]) {
    let clients = conns.len();
    for c in conns {
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
                let seed = (100..100 + clients as u64)
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
