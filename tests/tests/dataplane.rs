//! The L4 checklist every data plane passes, part one: streams, exact both ways. Each check
//! runs six times (sockmap and copy; loopback, veth, and veth over IPv6 to an IPv6 machine),
//! each in namespaces of its own; the backend runs on the proxy's host. Part two, how
//! connections end and what they cost, is in `ends.rs`.

use std::{
    io::{Read, Write},
    net::Shutdown,
    sync::{Mutex, mpsc},
    time::Duration,
};

use tests::{
    Pattern, Plane, Server, Topo, bulk, checklist, echo_server, recv_exact_pattern, recv_pattern,
    send_pattern, setup,
};

checklist!(
    small_transfer,
    bulk_to_backend,
    bulk_to_client,
    full_duplex,
    small_messages,
    half_close_client_first,
    half_close_backend_first,
    data_before_insertion,
    ipv6_client,
    egress_audit,
);

fn small_transfer(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let _backend = echo_server(&net);
    let mut c = net.connect();
    c.write_all(b"hello spliced\n").expect("write");
    let mut got = [0; 14];
    c.read_exact(&mut got).expect("echo arrives");
    assert_eq!(&got, b"hello spliced\n");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("end of stream");
    assert_eq!(rest, b"");
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
}

/// Client -> backend, the bulk size (1 GiB, `tests::bulk`), checked byte by byte; on the sockmap plane the daemon's own
/// reads and writes stay under a few KiB meanwhile.
fn bulk_to_backend(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let _backend = Server::start(&net.proxy, net.backend(), move |mut s| {
        let r = recv_pattern(&mut s, 1);
        let _ = s.shutdown(Shutdown::Write);
        tx.lock().expect("lock").send(r).expect("test waits");
    });
    let mut c = net.connect();
    let io_before = daemon.io_bytes();
    send_pattern(&mut c, 1, bulk()).expect("send the bulk transfer");
    c.shutdown(Shutdown::Write).expect("half-close");
    let got = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("backend finished");
    assert_eq!(got, Ok(bulk()));
    // The backend sends nothing back: the client's end of stream follows at once.
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("end of stream");
    assert_eq!(rest, b"", "bytes the backend never sent");
    let io = daemon.io_bytes() - io_before;
    let s = daemon.wait_idle();
    if plane.in_kernel() {
        assert!(io < 16 * 1024, "the daemon read or wrote {io} bytes: {s:#}");
        let svc = &s["kernel"]["services"][0];
        let moved = s["kernel"]["userspace_moved_bytes"]
            .as_u64()
            .expect("moved");
        assert_eq!(
            svc["bytes_to_backend"].as_u64().expect("counter") + moved,
            bulk(),
            "{s:#}"
        );
        assert_eq!(svc["redirect_failures"], 0, "{s:#}");
        // The kernel wakes the daemon for the holds it makes and their drains, nothing else:
        // a flow within the bound moves its bytes without an event.
        let count = |name: &str| svc[name].as_u64().expect("counter");
        assert!(count("flow_events") <= count("kernel_holds"), "{s:#}");
        assert!(count("drain_events") <= count("kernel_holds"), "{s:#}");
        // Without --egress-audit no sk_msg program is attached (it costs a copy a byte).
        assert!(s["kernel"]["user_tx_bytes"].is_null(), "{s:#}");
    }
}

/// Backend -> client, the bulk size, checked byte by byte.
fn bulk_to_client(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let _backend = Server::start(&net.proxy, net.backend(), |mut s| {
        if send_pattern(&mut s, 2, bulk()).is_ok() {
            let _ = s.shutdown(Shutdown::Write);
            let _ = s.read(&mut [0; 1]);
        }
    });
    let mut c = net.connect();
    let io_before = daemon.io_bytes();
    assert_eq!(recv_pattern(&mut c, 2), Ok(bulk()));
    let io = daemon.io_bytes() - io_before;
    drop(c);
    let s = daemon.wait_idle();
    if plane.in_kernel() {
        assert!(io < 16 * 1024, "the daemon read or wrote {io} bytes: {s:#}");
    }
}

/// The bulk size each way at once through an echo backend.
fn full_duplex(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let _backend = echo_server(&net);
    let c = net.connect();
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        send_pattern(&mut w, 3, bulk()).expect("send");
        w.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut r = c;
    assert_eq!(recv_pattern(&mut r, 3), Ok(bulk()));
    writer.join().expect("writer");
    let s = daemon.wait_idle();
    if plane.in_kernel() {
        // Both directions were held and released, so retransmissions that overlap bytes
        // already received may have come in; the verdict cut them (counted as overlaps), and
        // no batch was dropped.
        let svc = &s["kernel"]["services"][0];
        assert_eq!(svc["stream_faults"], 0, "{s:#}");
        assert_eq!(svc["redirect_failures"], 0, "{s:#}");
    }
}

/// Many small writes of varying size, echoed and checked.
fn small_messages(plane: Plane, topo: Topo) {
    const COUNT: usize = 50_000;
    let (net, daemon) = setup(plane, topo);
    let _backend = echo_server(&net);
    let c = net.connect();
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let mut p = Pattern::new(4);
        let mut buf = [0u8; 1500];
        let mut total = 0u64;
        for i in 0..COUNT {
            let n = 1 + (i * 7919) % 1500;
            p.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).expect("write");
            total += n as u64;
        }
        w.shutdown(Shutdown::Write).expect("half-close");
        total
    });
    let mut r = c;
    let got = recv_pattern(&mut r, 4).expect("echo checks out");
    assert_eq!(got, writer.join().expect("writer"));
    daemon.wait_idle();
}

/// The client sends and half-closes; the backend reads to the end, then answers; the client
/// gets the whole answer and then EOF.
fn half_close_client_first(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let _backend = Server::start(&net.proxy, net.backend(), |mut s| {
        let n = recv_pattern(&mut s, 5).expect("request checks out");
        s.write_all(&n.to_le_bytes()).expect("answer");
        send_pattern(&mut s, 6, 8 << 20).expect("answer");
        // Dropped: close with everything sent.
    });
    let mut c = net.connect();
    send_pattern(&mut c, 5, 8 << 20).expect("request");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut len = [0; 8];
    c.read_exact(&mut len).expect("answer starts");
    assert_eq!(u64::from_le_bytes(len), 8 << 20);
    assert_eq!(recv_pattern(&mut c, 6), Ok(8 << 20));
    daemon.wait_idle();
}

/// The backend sends and half-closes while the client still sends; the client gets all and
/// EOF, keeps sending, half-closes, and the backend gets all of it.
fn half_close_backend_first(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let _backend = Server::start(&net.proxy, net.backend(), move |mut s| {
        send_pattern(&mut s, 7, 8 << 20).expect("send");
        s.shutdown(Shutdown::Write).expect("half-close");
        // A blocking read after its own FIN, while that FIN is acknowledged.
        let r = recv_pattern(&mut s, 8);
        tx.lock().expect("lock").send(r).expect("test waits");
    });
    let mut c = net.connect();
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        send_pattern(&mut w, 8, 4 << 20).expect("send while the other way ends");
        w
    });
    assert_eq!(recv_pattern(&mut c, 7), Ok(8 << 20));
    let mut w = writer.join().expect("writer");
    // The other direction keeps flowing after the backend's EOF.
    let mut p = Pattern::new(8);
    let mut skip = vec![0; 4 << 20];
    p.fill(&mut skip);
    let mut more = vec![0; 4 << 20];
    p.fill(&mut more);
    w.write_all(&more).expect("send after EOF");
    w.shutdown(Shutdown::Write).expect("half-close");
    let got = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("backend finished");
    assert_eq!(got, Ok(8 << 20));
    daemon.wait_idle();
}

/// Bytes that arrive before the sockets enter the map are delivered at once: a client that
/// speaks first, and a backend that greets first.
fn data_before_insertion(plane: Plane, topo: Topo) {
    let (net, daemon) = setup(plane, topo);
    let _backend = Server::start(&net.proxy, net.backend(), |mut s| {
        s.write_all(b"220 ready\n").expect("greeting");
        let mut req = [0; 5];
        if s.read_exact(&mut req).is_ok() {
            let _ = s.write_all(&req);
        }
    });
    for i in 0..200 {
        let mut c = net.connect();
        c.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        if i % 2 == 0 {
            // Speaks first, at once.
            c.write_all(b"PING\n").expect("request");
        }
        let mut greeting = [0; 10];
        c.read_exact(&mut greeting)
            .unwrap_or_else(|e| panic!("round {i}: greeting stalled: {e}"));
        assert_eq!(&greeting, b"220 ready\n");
        if i % 2 == 1 {
            c.write_all(b"PING\n").expect("request");
        }
        let mut answer = [0; 5];
        c.read_exact(&mut answer)
            .unwrap_or_else(|e| panic!("round {i}: answer stalled: {e}"));
        assert_eq!(&answer, b"PING\n");
        // Then the backend closes: nothing more, and a clean end of stream.
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("round {i}: end of stream: {e}"));
        assert_eq!(rest, b"", "round {i}: bytes after the answer");
    }
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 200, "{s:#}");
}

fn ipv6_client(plane: Plane, topo: Topo) {
    // Rounds of request and echo, each checked: the full-duplex case is full_duplex's.
    const ROUNDS: u64 = 16;
    const ROUND: u64 = 1 << 20;
    let (net, daemon) = setup(plane, topo);
    let _backend = echo_server(&net);
    let mut c = net.client().connect(net.public_v6()).expect("IPv6 connect");
    let mut out = Pattern::new(11);
    let mut back = Pattern::new(11);
    let mut buf = vec![0; ROUND as usize];
    for _ in 0..ROUNDS {
        out.fill(&mut buf);
        c.write_all(&buf).expect("send over IPv6");
        recv_exact_pattern(&mut c, &mut back, ROUND).expect("echo over IPv6");
    }
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("end of stream");
    assert_eq!(rest, b"");
    assert_eq!(back.pos(), ROUNDS * ROUND);
    daemon.wait_idle();
}

/// `--egress-audit`: the `sk_msg` program counts every byte that enters a spliced socket's send
/// path, both ways, and the streams stay exact under it.
fn egress_audit(plane: Plane, topo: Topo) {
    const UP: u64 = 64 << 20;
    const DOWN: u64 = 16 << 20;
    let (net, daemon) = tests::setup_with(plane, topo, &["--egress-audit"]);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let _backend = Server::start(&net.proxy, net.backend(), move |mut s| {
        let got = recv_exact_pattern(&mut s, &mut Pattern::new(3), UP);
        let sent = send_pattern(&mut s, 4, DOWN).map_err(|e| e.kind());
        tx.lock()
            .expect("lock")
            .send((got, sent))
            .expect("test waits");
    });
    let mut c = net.connect();
    send_pattern(&mut c, 3, UP).expect("send");
    assert_eq!(
        recv_exact_pattern(&mut c, &mut Pattern::new(4), DOWN),
        Ok(())
    );
    let (got, sent) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("backend finished");
    assert_eq!(got, Ok(()), "the backend's stream");
    assert_eq!(sent, Ok(()), "the backend's send");
    drop(c);
    let s = daemon.wait_idle();
    if plane.in_kernel() {
        assert_eq!(
            s["kernel"]["user_tx_bytes"].as_u64(),
            Some(UP + DOWN),
            "{s:#}"
        );
    } else {
        assert!(s["kernel"].is_null(), "{s:#}");
    }
}
