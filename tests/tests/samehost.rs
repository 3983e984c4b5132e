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

/// Bulk both ways through an echo that reads first: the client's bytes all go straight into
/// the application's queue, and the application's straight to the client or, while the
/// client is behind, through the application's TCP path; none is lost or reordered.
#[test]
fn no_byte_crosses_the_loopback_leg_to_the_application() {
    const SIZE: u64 = 64 << 20;
    let net = Net::new(Topo::Loopback);
    let _app = Server::start(&net.proxy, net.backend(), echo);
    let daemon = Daemon::start(&net.proxy, "sockmap", BYPASS);
    let c = net.connect();
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        tests::send_pattern(&mut w, 22, SIZE).expect("send");
        w.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut r = c;
    assert_eq!(tests::recv_pattern(&mut r, 22), Ok(SIZE));
    writer.join().expect("writer");
    let s = daemon.wait_idle();
    let svc = service(&s);
    let count = |name: &str| svc[name].as_u64().expect("counter");
    // Every byte the daemon took from the client (through the verdict, or by itself at the
    // end of a held stream) went straight into the application's queue.
    assert_eq!(count("ingress_bytes"), SIZE, "{s:#}");
    let moved = s["kernel"]["userspace_moved_bytes"]
        .as_u64()
        .expect("counter");
    let (direct, via_tcp) = (count("direct_bytes"), count("bytes_to_client"));
    assert_eq!(
        count("bytes_to_backend") + direct + via_tcp + moved,
        2 * SIZE,
        "{s:#}"
    );
    assert!(direct > 0, "{s:#}");
    eprintln!("echo of {SIZE} B: {direct} B direct, {via_tcp} B through TCP, {moved} B moved");
}
