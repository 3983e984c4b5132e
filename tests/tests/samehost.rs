//! The same-host bypass: which connections the kernel pairs with the application's socket,
//! and what happens when it cannot. (The data-plane checklist runs over paired connections
//! too: its `bypass_*` cases.)

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
};

use serde_json::Value;
use tests::{BACKEND_PORT, Daemon, Machines, Net, PUBLIC_PORT, Server, Topo, echo};

const BYPASS: &[&str] = &["--same-host-bypass", "on"];

/// One request and its echo, then a clean end.
fn round_trip(c: &mut TcpStream) {
    c.write_all(b"same host?").expect("write");
    let mut got = [0; 10];
    c.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"same host?");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("end of stream");
    assert_eq!(rest, b"");
}

/// Sends `size` bytes of stream `seed` through `c` to an echo while reading them back, then
/// half-closes: what came back (its length, or where it broke or the sending failed).
fn echo_stream(c: TcpStream, seed: u64, size: u64) -> Result<u64, String> {
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        tests::send_pattern(&mut w, seed, size)?;
        w.shutdown(Shutdown::Write)
    });
    let got = tests::recv_pattern(&mut { c }, seed);
    let sent = writer.join().expect("writer");
    got.and_then(|n| sent.map(|()| n).map_err(|e| format!("send failed: {e}")))
}

fn service(s: &Value) -> &Value {
    &s["kernel"]["services"][0]
}

fn config(machine: &str) -> String {
    format!(
        "[[services]]\n  internal_port = {BACKEND_PORT}\n  port = {PUBLIC_PORT}\n\n\
         [[machines]]\n  id = \"m\"\n  address = \"{machine}\"\n"
    )
}

#[test]
fn ipv6_machine_is_paired() {
    let net = Net::new(Topo::Loopback);
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), BACKEND_PORT);
    let _app = Server::start(&net.proxy, addr, echo);
    let daemon = Daemon::start_config(&net.proxy, &config("::1"), "sockmap", BYPASS);
    round_trip(&mut net.connect());
    let s = daemon.wait_idle();
    assert_eq!(service(&s)["paired"], 1, "{s:#}");
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
}

#[test]
fn machine_on_another_host_is_not_paired() {
    let net = Net::new(Topo::Loopback);
    let machines = Machines::new(&net.proxy, 1);
    let _app = Server::start(&machines.ns[0], machines.backend(0), echo);
    let cfg = format!(
        "[[services]]\n  internal_port = {BACKEND_PORT}\n  port = {PUBLIC_PORT}\n\n{}",
        machines.config()
    );
    let daemon = Daemon::start_config(&net.proxy, &cfg, "sockmap", BYPASS);
    round_trip(&mut net.connect());
    let s = daemon.wait_idle();
    assert_eq!(service(&s)["paired"], 0, "{s:#}");
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
    // The bytes took the verdict path.
    assert_eq!(service(&s)["bytes_to_backend"], 10, "{s:#}");
}

#[test]
fn pair_program_that_cannot_attach_leaves_the_verdict_path() {
    let net = Net::new(Topo::Loopback);
    let _app = Server::start(&net.proxy, net.backend(), echo);
    let args = [BYPASS, &["--pair-cgroup", "/no-such-cgroup"]].concat();
    let daemon = Daemon::start(&net.proxy, "sockmap", &args);
    round_trip(&mut net.connect());
    let s = daemon.wait_idle();
    assert_eq!(service(&s)["paired"], 0, "{s:#}");
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
    let log = daemon.stop();
    assert!(log.contains("same-host bypass is OFF"), "{log}");
    assert!(log.contains("no-such-cgroup"), "{log}");
}

#[test]
fn bypass_is_off_unless_asked_for() {
    let net = Net::new(Topo::Loopback);
    let _app = Server::start(&net.proxy, net.backend(), echo);
    let daemon = Daemon::start(&net.proxy, "sockmap", &[]);
    round_trip(&mut net.connect());
    let s = daemon.wait_idle();
    assert_eq!(service(&s)["paired"], 0, "{s:#}");
}

/// The application writes a banner the moment it accepts, before the daemon could know its
/// socket; then it echoes. The banner and the echo go straight to the client.
#[test]
fn application_writes_first() {
    let net = Net::new(Topo::Loopback);
    let _app = Server::start(&net.proxy, net.backend(), |mut s| {
        if s.write_all(b"220 ready\r\n").is_ok() {
            echo(s);
        }
    });
    let daemon = Daemon::start(&net.proxy, "sockmap", BYPASS);
    for _ in 0..50 {
        let mut c = net.connect();
        let mut banner = [0; 11];
        c.read_exact(&mut banner).expect("banner");
        assert_eq!(&banner, b"220 ready\r\n");
        round_trip(&mut c);
    }
    let s = daemon.wait_idle();
    let svc = service(&s);
    assert_eq!(svc["paired"], 50, "{s:#}");
    assert_eq!(svc["direct_bytes"], 50 * 21, "{s:#}");
    assert_eq!(svc["ingress_bytes"], 50 * 10, "{s:#}");
    // Nothing crossed the loopback leg; the verdict only handed the client's bytes on.
    assert_eq!(svc["bytes_to_client"], 0, "{s:#}");
    assert_eq!(svc["early_writes"], 0, "{s:#}");
}

/// The application writes and closes at once; the client gets every byte, then the end.
#[test]
fn application_writes_and_closes_at_once() {
    const SIZE: u64 = 1 << 20;
    let net = Net::new(Topo::Loopback);
    let _app = Server::start(&net.proxy, net.backend(), |mut s| {
        let _ = tests::send_pattern(&mut s, 21, SIZE);
    });
    let daemon = Daemon::start(&net.proxy, "sockmap", BYPASS);
    for _ in 0..20 {
        let mut c = net.connect();
        assert_eq!(tests::recv_pattern(&mut c, 21), Ok(SIZE));
    }
    let s = daemon.wait_idle();
    assert_eq!(service(&s)["paired"], 20, "{s:#}");
    assert_eq!(s["connections"]["completed"], 20, "{s:#}");
}

/// Bulk both ways through an echo that reads first: the client's bytes go straight into the
/// application's queue (or, while that queue has no room, through the upstream's TCP path),
/// and the application's straight to the client or, while the client is behind, through the
/// application's TCP path; none is lost or reordered.
#[test]
fn bulk_echo_both_ways_is_exact() {
    const SIZE: u64 = 64 << 20;
    let net = Net::new(Topo::Loopback);
    let _app = Server::start(&net.proxy, net.backend(), echo);
    let daemon = Daemon::start(&net.proxy, "sockmap", BYPASS);
    assert_eq!(echo_stream(net.connect(), 22, SIZE), Ok(SIZE));
    let s = daemon.wait_idle();
    let svc = service(&s);
    let count = |name: &str| svc[name].as_u64().expect("counter");
    let moved = s["kernel"]["userspace_moved_bytes"]
        .as_u64()
        .expect("counter");
    let (direct, via_tcp) = (count("direct_bytes"), count("bytes_to_client"));
    // Every byte the daemon took from the client went through the verdict (or, at the end of
    // a held stream, through userspace); every byte of the application went straight to the
    // client, through the verdict, or through userspace.
    assert_eq!(
        count("bytes_to_backend") + direct + via_tcp + moved,
        2 * SIZE,
        "{s:#}"
    );
    let ingress = count("ingress_bytes");
    assert!(ingress > 0 && direct > 0, "{s:#}");
    // Straight into the application's queue, except while it was behind.
    if count("unread_stops") == 0 {
        assert_eq!(ingress, SIZE, "{s:#}");
    }
    eprintln!(
        "echo of {SIZE} B: {ingress} B into the application's queue; {direct} B direct, \
         {via_tcp} B through TCP, {moved} B moved"
    );
}

/// Full-duplex echo, round after round, from a client that writes as fast as it reads: the
/// application's queue must never take so much of its receive memory that the bytes of its
/// TCP path (which carry the client's stream while it is behind) are dropped and wait for
/// TCP's backed-off retransmissions. Each round must end well within the read timeout.
#[test]
fn full_duplex_rounds_never_stall() {
    duplex_rounds(BYPASS);
}

/// The same rounds on the verdict path. There, as on the paired path, both directions are
/// held in turn, and a held socket whose queue outgrew its receive buffer stops taking the
/// acknowledgements the other direction's hold waits for unless the daemon raises that buffer
/// (see `dataplane::sockmap`); on the paired path the rounds stalled until the idle timeout
/// about once in a hundred without it.
#[test]
fn full_duplex_rounds_never_stall_on_the_verdict_path() {
    duplex_rounds(&[]);
}

fn duplex_rounds(extra: &[&str]) {
    const SIZE: u64 = 256 << 20;
    const ROUNDS: u64 = 24;
    let net = Net::new(Topo::Loopback);
    let _app = Server::start(&net.proxy, net.backend(), echo);
    let daemon = Daemon::start(&net.proxy, "sockmap", extra);
    for round in 0..ROUNDS {
        let c = net.connect();
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let started = std::time::Instant::now();
        assert_eq!(
            echo_stream(c, 40 + round, SIZE),
            Ok(SIZE),
            "round {round} after {:?}: {:#}",
            started.elapsed(),
            daemon.stats()
        );
    }
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], ROUNDS, "{s:#}");
}

/// Bytes of `s`'s receive side the kernel holds (`SO_MEMINFO`): what a paired socket has not
/// read, in its queue from the `sk_msg` program or its TCP receive queue.
fn unread(s: &TcpStream) -> u64 {
    let mut info = [0u32; 9];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: the buffer and its length describe nine u32 for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "SO_MEMINFO: {}", std::io::Error::last_os_error());
    u64::from(info[0])
}

/// An application that stops reading: what the kernel puts into its queue has no TCP window
/// to stop it, so past the bound the client's bytes take the upstream's TCP path, where TCP
/// holds the client back. When the application reads again it gets every byte in order,
/// across the switch and back.
#[test]
fn application_that_stops_reading_is_bounded() {
    const SIZE: u64 = 512 << 20;
    let net = Net::new(Topo::Loopback);
    let (tx, rx) = std::sync::mpsc::channel();
    let _app = Server::start(&net.proxy, net.backend(), move |s| {
        tx.send(s).expect("the test waits for the socket");
    });
    let daemon = Daemon::start(&net.proxy, "sockmap", BYPASS);
    let mut c = net.connect();
    let mut app = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the application accepts");
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent2 = std::sync::Arc::clone(&sent);
    let writer = std::thread::spawn(move || {
        let mut p = tests::Pattern::new(23);
        let mut buf = vec![0; 64 * 1024];
        while p.pos() < SIZE {
            let n = (SIZE - p.pos()).min(buf.len() as u64) as usize;
            p.fill(&mut buf[..n]);
            c.write_all(&buf[..n]).expect("send");
            sent2.store(p.pos(), std::sync::atomic::Ordering::Relaxed);
        }
        c.shutdown(Shutdown::Write).expect("half-close");
        c
    });
    // The client is held back well before it could send it all: it makes no progress for
    // half a second.
    let mut last = 0;
    let mut still = 0;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = sent.load(std::sync::atomic::Ordering::Relaxed);
        still = if now == last && now > 0 { still + 1 } else { 0 };
        last = now;
        if still == 5 {
            break;
        }
    }
    assert_eq!(
        still, 5,
        "the client is not held back: it sent {last} bytes"
    );
    let held = unread(&app);
    assert!(
        held <= tests::MAX_BUFFER + (1 << 20),
        "the application holds {held} bytes it has not read (bound {})",
        tests::MAX_BUFFER
    );
    // Either the kernel saw it behind (its bytes then went over TCP) or the daemon held the
    // client first; which one comes first is a race.
    let s = daemon.stats();
    let stops = service(&s)["unread_stops"].as_u64().expect("counter");
    assert!(
        stops >= 1 || s["kernel"]["holds"].as_u64() >= Some(1),
        "{s:#}"
    );
    let ingress_held = service(&s)["ingress_bytes"].as_u64().expect("counter");
    // Reading again: every byte, in order, then the end.
    assert_eq!(
        tests::recv_pattern(&mut tests::EventLoopReader(&mut app), 23),
        Ok(SIZE)
    );
    let _client = writer.join().expect("writer");
    drop(app);
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
    // Once it had read what came over TCP, the client's bytes went into its queue again.
    let ingress = service(&s)["ingress_bytes"].as_u64().expect("counter");
    assert!(ingress > ingress_held, "{s:#}");
    eprintln!(
        "a stalled application held {held} B unread ({stops} times behind); \
         {ingress} B went into its queue"
    );
}
