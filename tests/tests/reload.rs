//! SIGHUP re-reads the config: ports come and go, services move, machines change, and no
//! established connection is dropped; an invalid config changes nothing.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tests::{Daemon, Net, Pattern, Plane, Server, Topo, echo, ping, recv_pattern};

const A: u16 = 10080;
const B: u16 = 10081;
const C: u16 = 10082;

fn service(public: u16, internal: u16, extra: &str) -> String {
    format!(
        "\n[[services]]\n  internal_port = {internal}\n  protocol = \"tcp\"\n{extra}  [[services.ports]]\n    port = {public}\n"
    )
}

fn config(services: &[(u16, u16)]) -> String {
    let mut c = String::from("app = \"reload\"\n");
    for (public, internal) in services {
        c.push_str(&service(*public, *internal, ""));
    }
    c
}

/// A server on `port` of the proxy's namespace that answers each byte with `tag`.
fn tagged(net: &Net, port: u16, tag: u8) -> Server {
    Server::start(
        &net.proxy,
        SocketAddr::from(([127, 0, 0, 1], port)),
        move |mut s| {
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() {
                if s.write_all(&[tag]).is_err() {
                    return;
                }
            }
        },
    )
}

fn connect(net: &Net, port: u16) -> std::io::Result<TcpStream> {
    net.client()
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn ask(c: &mut TcpStream) -> u8 {
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"?").expect("write");
    let mut b = [0u8; 1];
    c.read_exact(&mut b).expect("answer");
    b[0]
}

#[test]
fn a_reload_adds_ports_moves_services_and_closes_removed_ports() {
    let net = Net::new(Topo::Loopback);
    let _one = tagged(&net, 18001, b'1');
    let _two = tagged(&net, 18002, b'2');
    let _three = tagged(&net, 18003, b'3');
    let daemon = Daemon::start_config(
        &net.proxy,
        &config(&[(A, 18001), (B, 18002)]),
        Plane::Sockmap,
        &[],
    );
    let mut on_a = connect(&net, A).expect("A");
    let mut on_b = connect(&net, B).expect("B");
    assert_eq!(ask(&mut on_a), b'1');
    assert_eq!(ask(&mut on_b), b'2');

    // A moves to the third server, B goes, C comes.
    let s = daemon.reload(&config(&[(A, 18003), (C, 18001)]));
    assert_eq!(s["reloads"]["done"], 1, "{s:#}");
    assert_eq!(s["reloads"]["failed"], 0, "{s:#}");
    assert_eq!(
        ask(&mut connect(&net, A).expect("A after")),
        b'3',
        "new connections take the new route"
    );
    assert_eq!(ask(&mut connect(&net, C).expect("C")), b'1');
    // The removed port's listeners close as their workers see the change.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let refused = connect(&net, B);
        if refused.as_ref().map_err(std::io::Error::kind).err()
            == Some(std::io::ErrorKind::ConnectionRefused)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the removed port still accepts: {refused:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Established connections keep the machine they had, on moved and removed ports alike.
    assert_eq!(ask(&mut on_a), b'1');
    assert_eq!(ask(&mut on_b), b'2');
    drop((on_a, on_b));
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["failed"], 0, "{s:#}");
    assert_eq!(s["connections"]["refused"], 0, "{s:#}");
}

#[test]
fn an_invalid_config_changes_nothing_and_is_counted() {
    let net = Net::new(Topo::Loopback);
    let _one = tagged(&net, 18001, b'1');
    let daemon = Daemon::start_config(&net.proxy, &config(&[(A, 18001)]), Plane::Sockmap, &[]);
    let s = daemon.reload("app = \"reload\"\n\n[[services]]\n  internal_port = 18001\n  [[services.ports]]\n    port = 70000\n");
    assert_eq!(s["reloads"]["failed"], 1, "{s:#}");
    assert_eq!(s["reloads"]["done"], 0, "{s:#}");
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("reload refused") && l.contains("fly.toml:6:12")),
        "the error names file, line and column:\n{log}"
    );
    assert_eq!(ask(&mut connect(&net, A).expect("still served")), b'1');
    // A port another process listens on refuses the whole reload too.
    let blocker = net
        .proxy
        .run(|| std::net::TcpListener::bind("127.0.0.1:10090"));
    let s = daemon.reload(&config(&[(A, 18001), (10090, 18001)]));
    assert_eq!(s["reloads"]["failed"], 2, "{s:#}");
    assert!(
        daemon
            .log()
            .contains("port 10090: 1 listening socket(s) of another process"),
        "{}",
        daemon.log()
    );
    drop(blocker);
    assert_eq!(ask(&mut connect(&net, A).expect("still served")), b'1');
}

#[test]
fn no_connection_is_dropped_across_100_reloads() {
    const RELOADS: usize = 100;
    let net = Net::new(Topo::Loopback);
    let _echo = Server::start(&net.proxy, SocketAddr::from(([127, 0, 0, 1], 18001)), echo);
    let _echo2 = Server::start(&net.proxy, SocketAddr::from(([127, 0, 0, 1], 18002)), echo);
    // Two configs to switch between: the service's limits and a second port change.
    let first = format!(
        "app = \"reload\"\n{}",
        service(
            A,
            18001,
            "  [services.concurrency]\n    soft_limit = 100\n    hard_limit = 200\n"
        )
    );
    let second = format!(
        "app = \"reload\"\n{}{}",
        service(
            A,
            18001,
            "  [services.concurrency]\n    soft_limit = 150\n    hard_limit = 300\n"
        ),
        service(C, 18002, "")
    );
    let daemon = Daemon::start_config(&net.proxy, &first, Plane::Sockmap, &[]);
    let addr = SocketAddr::from(([127, 0, 0, 1], A));
    let stop = Arc::new(AtomicBool::new(false));

    // A bulk stream each way, checked byte by byte.
    let bulk = {
        let stop = Arc::clone(&stop);
        net.client().spawn(move || {
            let c = TcpStream::connect(addr).expect("connect");
            let mut w = c.try_clone().expect("clone");
            let writer = std::thread::spawn(move || {
                let mut p = Pattern::new(11);
                let mut buf = vec![0u8; 256 << 10];
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    p.fill(&mut buf);
                    w.write_all(&buf).expect("send across reloads");
                    sent += buf.len() as u64;
                }
                w.shutdown(Shutdown::Write).expect("half-close");
                sent
            });
            let got = recv_pattern(&mut &c, 11);
            (writer.join().expect("writer"), got)
        })
    };
    // Round trips on one connection.
    let round_trips = Arc::new(AtomicU64::new(0));
    let rr = {
        let (stop, n) = (Arc::clone(&stop), Arc::clone(&round_trips));
        net.client().spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            while !stop.load(Ordering::Relaxed) {
                ping(&mut c).expect("round trip across reloads");
                n.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // New connections in a loop: none refused.
    let connects = Arc::new(AtomicU64::new(0));
    let fresh = {
        let (stop, n) = (Arc::clone(&stop), Arc::clone(&connects));
        net.client().spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut c = TcpStream::connect(addr).expect("no refusal during reloads");
                ping(&mut c).expect("a new connection is served");
                n.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for i in 0..RELOADS {
        let s = daemon.reload(if i % 2 == 0 { &second } else { &first });
        assert_eq!(s["reloads"]["failed"], 0, "{s:#}");
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, got) = bulk.join().expect("bulk client");
    rr.join().expect("round-trip client");
    fresh.join().expect("connecting client");
    assert_eq!(got, Ok(sent), "the bulk stream is exact");
    let s = daemon.wait_idle();
    println!(
        "{RELOADS} reloads: {} MiB streamed, {} round trips, {} new connections",
        sent >> 20,
        round_trips.load(Ordering::Relaxed),
        connects.load(Ordering::Relaxed)
    );
    assert_eq!(s["reloads"]["done"], RELOADS as u64, "{s:#}");
    assert!(round_trips.load(Ordering::Relaxed) > 0 && connects.load(Ordering::Relaxed) > 0);
    assert_eq!(s["connections"]["failed"], 0, "{s:#}");
    assert_eq!(s["connections"]["refused"], 0, "{s:#}");
}

#[test]
fn a_machine_gone_from_the_config_stops_once_its_connections_end() {
    let net = Net::new(Topo::Loopback);
    let app = tests::apps::go_app("flyapp");
    let machine = |id: &str, ip: &str| {
        format!(
            "\n[[machines]]\n  id = \"{id}\"\n  address = \"{ip}\"\n  command = [\"{}\", \"{ip}\"]\n",
            app.display()
        )
    };
    let base = format!("app = \"reload\"\n{}", service(A, 18080, ""));
    let daemon = Daemon::start_config(
        &net.proxy,
        &format!("{base}{}", machine("m0", "127.0.0.1")),
        Plane::Sockmap,
        &[],
    );
    tests::until(&daemon, Duration::from_secs(10), "m0 started", |s| {
        s["machines"][0]["state"] == "started"
    });
    let old = daemon.stats()["machines"][0]["pid"].as_u64().expect("pid");
    let mut live = connect(&net, A).expect("connect");
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let say = |c: &mut TcpStream, text: &str| {
        writeln!(c, "{text}").expect("write");
        let mut b = [0u8; 64];
        let n = c.read(&mut b).expect("answer");
        String::from_utf8_lossy(&b[..n]).into_owned()
    };
    assert_eq!(say(&mut live, "before"), "BEFORE\n");

    // m0 is replaced by m1: new connections go to m1, m0 serves its connection to the end.
    let s = daemon.reload(&format!("{base}{}", machine("m1", "127.0.0.2")));
    assert_eq!(s["reloads"]["done"], 1, "{s:#}");
    tests::until(&daemon, Duration::from_secs(10), "m1 started", |s| {
        s["machines"][0]["id"] == "m1" && s["machines"][0]["state"] == "started"
    });
    assert_eq!(say(&mut connect(&net, A).expect("new"), "new"), "NEW\n");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::path::Path::new(&format!("/proc/{old}")).exists(),
        "m0 runs while it carries a connection"
    );
    assert_eq!(say(&mut live, "still"), "STILL\n");
    drop(live);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{old}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        assert!(
            std::time::Instant::now() < deadline,
            "m0 still runs after its last connection:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
