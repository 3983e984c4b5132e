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
