//! The `tls` and `pg_tls` handlers with real clients: `openssl s_client` reports the
//! certificate chosen by SNI (exact, wildcard, default, self-signed, after a reload), the
//! versions and ALPN protocols a port allows; curl fetches from nginx through TLS; a rustls
//! client moves checked streams both ways through TLS, after PostgreSQL's `SSLRequest`, and
//! with a PROXY header the machine reads; bad handshakes are closed and counted.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tests::{
    Daemon, Net, Plane, Scratch, Server, Topo, echo, eventually,
    tls::{
        TestCa, client_config, client_config_for, echo_across_key_update, echo_through_tls,
        kernel_has_tls, s_client, tls_config,
    },
};

/// A directory of certificates: `a.example.com` (common name `exact`, key in the file),
/// `*.wild.example.com` (`wildcard`, key in a `.key` file) and `default` (`default`).
fn cert_dir() -> (Scratch, TestCa, Scratch) {
    let ca_dir = Scratch::new();
    let ca = TestCa::new(&ca_dir.0);
    let certs = Scratch::new();
    ca.issue(&certs.0, "a", "exact", &["a.example.com"], false);
    ca.issue(&certs.0, "wild", "wildcard", &["*.wild.example.com"], true);
    ca.issue(
        &certs.0,
        "default",
        "default",
        &["default.example.com"],
        false,
    );
    (ca_dir, ca, certs)
}

fn start(net: &Net, plane: Plane, config: &str, extra: &[&str]) -> Daemon {
    tests::raise_fd_limit();
    Daemon::start_config(&net.proxy, config, plane, extra)
}

/// A topology with an echo machine and the daemon serving one port with `handlers` and
/// `tls_options` (`options`), its certificates those of [`cert_dir`].
struct Served {
    d: Daemon,
    _backend: Server,
    net: Net,
    ca: TestCa,
    certs: Scratch,
    _ca_dir: Scratch,
}

fn serve_tls(topo: Topo, plane: Plane, handlers: &[&str], options: &str, extra: &[&str]) -> Served {
    let net = Net::new(topo);
    let (ca_dir, ca, certs) = cert_dir();
    let backend = Server::start(&net.proxy, net.backend(), echo);
    let certs_arg = certs.0.to_string_lossy().into_owned();
    let args = [&["--certs", certs_arg.as_str()][..], extra].concat();
    let d = start(
        &net,
        plane,
        &tls_config(handlers, options, net.backend()),
        &args,
    );
    Served {
        d,
        _backend: backend,
        net,
        ca,
        certs,
        _ca_dir: ca_dir,
    }
}

fn counter(d: &Daemon, name: &str) -> u64 {
    d.stats()["connections"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name}"))
}

#[test]
fn the_certificate_is_chosen_by_sni_and_reloaded_when_the_directory_changes() {
    let setup = serve_tls(Topo::Loopback, Plane::Sockmap, &["tls"], "", &[]);
    let (net, ca, d, certs) = (&setup.net, &setup.ca, &setup.d, &setup.certs);
    let served = |args: &[&str]| s_client(net.client(), net.public(), &ca.path, args);
    for (args, cn) in [
        (&["-servername", "a.example.com"][..], "exact"),
        (&["-servername", "A.Example.COM"][..], "exact"),
        (&["-servername", "x.wild.example.com"][..], "wildcard"),
        (&["-servername", "y.x.wild.example.com"][..], "default"),
        (&["-servername", "unknown.test"][..], "default"),
        (&["-noservername"][..], "default"),
    ] {
        let h = served(args);
        assert!(h.ok, "{args:?}: no session\n{}", h.output);
        assert_eq!(h.subject_cn.as_deref(), Some(cn), "{args:?}\n{}", h.output);
        assert_eq!(h.verify_code, Some(0), "{args:?}: chain\n{}", h.output);
    }
    assert_eq!(counter(d, "tls_handshakes"), 6);

    // A new file is served within a few polls; a broken one keeps the set in place.
    ca.issue(&certs.0, "b", "reloaded", &["b.example.com"], false);
    let reloaded = eventually(Duration::from_secs(10), || {
        served(&["-servername", "b.example.com"])
            .subject_cn
            .as_deref()
            == Some("reloaded")
    });
    assert!(
        reloaded,
        "b.example.com not served after a reload:\n{}",
        d.log()
    );
    std::fs::write(
        certs.0.join("broken.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let reported = eventually(Duration::from_secs(10), || {
        d.log().contains("certificates not reloaded") && d.log().contains("broken.pem")
    });
    assert!(reported, "the broken file was not reported:\n{}", d.log());
    let h = served(&["-servername", "b.example.com"]);
    assert_eq!(h.subject_cn.as_deref(), Some("reloaded"), "{}", h.output);
    d.wait_idle();
}

/// A checked stream each way through TLS, on both planes, over veth; the daemon's TLS
/// sockets end cleanly and nothing is left behind.
fn tls_stream_is_exact(plane: Plane) {
    let setup = serve_tls(Topo::Veth, plane, &["tls"], "", &[]);
    let (net, ca, d) = (&setup.net, &setup.ca, &setup.d);
    let config = client_config(&ca.pem);
    let conns: Vec<_> = (0..4u64)
        .map(|i| {
            let s = net.connect();
            let config = Arc::clone(&config);
            std::thread::spawn(move || {
                echo_through_tls(s, config, "a.example.com", None, 100 + i, 64 << 20)
            })
        })
        .collect();
    for c in conns {
        c.join()
            .expect("client thread")
            .expect("exact stream through TLS");
    }
    let s = d.wait_idle();
    assert_eq!(s["connections"]["tls_handshakes"], 4, "{s:#}");
    assert_eq!(s["connections"]["completed"], 4, "{s:#}");
    assert_eq!(s["connections"]["failed"], 0, "{s:#}");
}

#[test]
fn tls_stream_is_exact_sockmap() {
    tls_stream_is_exact(Plane::Sockmap);
}

#[test]
fn tls_stream_is_exact_copy() {
    tls_stream_is_exact(Plane::Copy);
}

/// Where the kernel has TLS, every session of a port that forwards plaintext goes to it after
/// the handshake, whatever the version and cipher suite; checked streams pass both ways and
/// both ends see `close_notify`. Where it has not, or with `--kernel-tls off`, rustls carries
/// them all the same.
#[test]
fn sessions_go_to_kernel_tls_where_the_kernel_has_it() {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let kernel = kernel_has_tls();
    let sessions = [
        (&rustls::version::TLS13, cs::TLS13_AES_128_GCM_SHA256),
        (&rustls::version::TLS13, cs::TLS13_AES_256_GCM_SHA384),
        (&rustls::version::TLS13, cs::TLS13_CHACHA20_POLY1305_SHA256),
        (
            &rustls::version::TLS12,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS12,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (extra, handed) in [(&[][..], kernel), (&["--kernel-tls", "off"][..], false)] {
        let setup = serve_tls(Topo::Veth, Plane::Sockmap, &["tls"], "", extra);
        let (net, ca, d) = (&setup.net, &setup.ca, &setup.d);
        for (i, (version, suite)) in sessions.iter().enumerate() {
            let config = client_config_for(&ca.pem, &[*version], Some(*suite));
            echo_through_tls(
                net.connect(),
                config,
                "a.example.com",
                None,
                i as u64,
                8 << 20,
            )
            .unwrap_or_else(|e| panic!("{:?}: {e}\n{}", suite.suite(), d.log()));
        }
        let s = d.wait_idle();
        let n = sessions.len() as u64;
        assert_eq!(s["connections"]["tls_handshakes"], n, "{s:#}");
        assert_eq!(s["connections"]["completed"], n, "{s:#}");
        let expected = if handed { n } else { 0 };
        assert_eq!(s["connections"]["tls_kernel"], expected, "{extra:?}: {s:#}");
        let said = if handed {
            "then kernel TLS encrypts and decrypts"
        } else {
            "no kernel TLS"
        };
        assert!(d.log().contains(said), "{extra:?}: {}", d.log());
    }
}

/// SIGUSR2 with a TLS session open on a port that forwards plaintext. Where the kernel has
/// TLS, the session's state is its socket's: it goes to the new process with the socket and
/// the old one exits at once. Where rustls carries it, the old process serves it to its end,
/// then exits. Either way the session echoes before and after, exact, and both ends see
/// `close_notify`.
#[test]
fn a_tls_session_lives_across_an_upgrade() {
    let kernel = kernel_has_tls();
    let setup = serve_tls(Topo::Loopback, Plane::Sockmap, &["tls"], "", &[]);
    let old = u64::from(setup.d.pid);
    let name = rustls::pki_types::ServerName::try_from("a.example.com").expect("name");
    let session = rustls::ClientConnection::new(client_config(&setup.ca.pem), name)
        .expect("a client session");
    let conn = setup.net.connect();
    conn.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut tls = rustls::StreamOwned::new(session, conn);
    let echo_round = |tls: &mut rustls::StreamOwned<_, std::net::TcpStream>, seed| {
        tests::send_pattern(tls, seed, 64 << 10).expect("send through TLS");
        let mut p = tests::Pattern::new(seed);
        tests::recv_exact_pattern(tls, &mut p, 64 << 10)
    };
    assert_eq!(echo_round(&mut tls, 1), Ok(()), "{}", setup.d.log());
    setup.d.signal(libc::SIGUSR2);
    let d = &setup.d;
    let new = tests::eventually(Duration::from_secs(20), || {
        d.stats()["pid"].as_u64() != Some(old)
    });
    assert!(new, "no new process:\n{}", d.log());
    let new = d.stats()["pid"].as_u64().expect("pid");
    let mut reaper = tests::Reaper::default();
    reaper.0.push(new);
    if kernel {
        tests::wait_ended(old, Duration::from_secs(20));
        assert_eq!(d.stats()["connections"]["taken_over"], 1, "{}", d.log());
    } else {
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !tests::ended(old),
            "the old process left its TLS session:\n{}",
            d.log()
        );
    }
    assert_eq!(echo_round(&mut tls, 2), Ok(()), "{}", d.log());
    tls.conn.send_close_notify();
    tls.flush().expect("close_notify");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).expect("the echo's close_notify");
    assert!(rest.is_empty(), "{} bytes after the stream", rest.len());
    tests::wait_ended(old, Duration::from_secs(20));
    // SAFETY: kill with plain integers.
    unsafe { libc::kill(i32::try_from(new).expect("pid"), libc::SIGTERM) };
    tests::wait_ended(new, Duration::from_secs(40));
}

/// A client whose first record of data arrives in two parts, the first with its Finished:
/// the handshake ends inside that record, and the session goes to kernel TLS (where there is
/// one) once rustls has read the record to its end, its plaintext first.
#[test]
fn a_first_record_cut_by_the_end_of_the_handshake_goes_first() {
    let kernel = kernel_has_tls();
    let setup = serve_tls(Topo::Loopback, Plane::Sockmap, &["tls"], "", &[]);
    let (net, ca, d) = (&setup.net, &setup.ca, &setup.d);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = client_config_for(&ca.pem, &[version], None);
        let msg: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let got = tests::tls::echo_first_record_split(
            net.connect(),
            config,
            "a.example.com",
            &msg,
            Duration::from_millis(300),
        )
        .unwrap_or_else(|e| panic!("{version:?}: {e}\n{}", d.log()));
        assert!(got == msg, "{version:?}: the echo differs");
    }
    let s = d.wait_idle();
    assert_eq!(s["connections"]["tls_failed"], 0, "{s:#}\n{}", d.log());
    let handed = if kernel { 2 } else { 0 };
    assert_eq!(s["connections"]["tls_kernel"], handed, "{s:#}");
}

/// A client's TLS 1.3 key update: rustls in userspace takes it and the stream goes on. Kernel
/// TLS here is not re-keyed, so a session handed to it ends with a reset, counted as failed:
/// never a byte decrypted with the old keys or lost.
#[test]
fn a_key_update_goes_on_in_userspace_and_resets_a_kernel_tls_session() {
    let kernel = kernel_has_tls();
    for (extra, handed) in [(&[][..], kernel), (&["--kernel-tls", "off"][..], false)] {
        let setup = serve_tls(Topo::Loopback, Plane::Sockmap, &["tls"], "", extra);
        let (net, ca, d) = (&setup.net, &setup.ca, &setup.d);
        let config = client_config_for(&ca.pem, &[&rustls::version::TLS13], None);
        let echoed = echo_across_key_update(net.connect(), config, "a.example.com");
        let s = d.wait_idle();
        if handed {
            let e = echoed.expect_err("an echo after the key update through kernel TLS");
            assert!(
                e.contains("reset") || e.contains("no echo") || e.contains("eof"),
                "{e}"
            );
            assert_eq!(s["connections"]["failed"], 1, "{s:#}");
            assert!(d.log().contains("key update"), "{}", d.log());
        } else {
            echoed.unwrap_or_else(|e| panic!("{extra:?}: {e}\n{}", d.log()));
            assert_eq!(s["connections"]["completed"], 1, "{s:#}");
        }
    }
}

/// Kernel TLS and socket maps exclude each other on the kernels spliced is tested on: a
/// socket with TLS cannot join a socket map, and a socket in one takes the TLS upper layer but
/// not its keys. `spliced check --kernel` says so; the daemon therefore moves a kernel TLS
/// session's plaintext itself (docs/kernels.md). A kernel that takes the keys fails this: the
/// machine's bytes could then be redirected into the client's socket.
#[test]
fn check_kernel_says_a_socket_in_a_map_takes_no_tls_keys() {
    let out = std::process::Command::new(tests::spliced_bin())
        .args(["check", "--kernel", "--format", "json"])
        .output()
        .expect("run spliced check --kernel");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let checks = report["checks"].as_array().expect("checks");
    let check = checks
        .iter()
        .find(|c| c["feature"] == "kernel TLS on a socket in a socket map")
        .unwrap_or_else(|| panic!("no such check: {report:#}"));
    assert_eq!(check["found"], false, "{check}");
    assert_eq!(check["required"], false, "{check}");
    let detail = check["detail"].as_str().expect("a reason");
    let expected = if kernel_has_tls() {
        "then the keys: TLS_TX: Invalid argument"
    } else {
        "the kernel has no TLS"
    };
    assert!(detail.contains(expected), "{detail}");
}

#[test]
fn curl_fetches_from_nginx_through_tls() {
    let net = Net::new(Topo::Veth);
    let (_ca_dir, ca, certs) = cert_dir();
    let www = Scratch::new();
    let body: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(www.0.join("blob"), &body).expect("write blob");
    let backend = net.backend();
    let _nginx = tests::Nginx::start(
        &net.proxy,
        &format!("  server {{ listen {backend}; root {}; }}", www.0.display()),
        backend,
    );
    let certs_arg = certs.0.to_string_lossy().into_owned();
    let d = start(
        &net,
        Plane::Sockmap,
        &tls_config(&["tls"], "", backend),
        &["--certs", &certs_arg],
    );
    let public = net.public();
    let out_file = www.0.join("fetched");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &net.client().name, "curl", "-sS", "--fail"])
        .args(["--max-time", "30", "--cacert"])
        .arg(&ca.path)
        .arg("--resolve")
        .arg(format!(
            "x.wild.example.com:{}:{}",
            public.port(),
            public.ip()
        ))
        .arg("-o")
        .arg(&out_file)
        .args(["-w", "%{http_code} %{ssl_verify_result}"])
        .arg(format!("https://x.wild.example.com:{}/blob", public.port()))
        .output()
        .expect("curl");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {report} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert_eq!(report, "200 0");
    let fetched = std::fs::read(&out_file).expect("fetched file");
    assert!(
        fetched == body,
        "fetched {} bytes, not the {} served",
        fetched.len(),
        body.len()
    );
    d.wait_idle();
}

#[test]
fn a_port_allows_the_versions_and_alpn_protocols_it_names() {
    let options = "      alpn = [\"h2\", \"http/1.1\"]\n      versions = [\"TLSv1.2\"]";
    let setup = serve_tls(Topo::Loopback, Plane::Sockmap, &["tls"], options, &[]);
    let (net, ca) = (&setup.net, &setup.ca);
    let served = |args: &[&str]| {
        let mut all = vec!["-servername", "a.example.com"];
        all.extend_from_slice(args);
        s_client(net.client(), net.public(), &ca.path, &all)
    };
    let h = served(&["-alpn", "h2,http/1.1"]);
    assert!(h.ok, "{}", h.output);
    assert_eq!(h.alpn.as_deref(), Some("h2"), "{}", h.output);
    assert_eq!(h.protocol.as_deref(), Some("TLSv1.2"), "{}", h.output);
    let h = served(&["-alpn", "http/1.1"]);
    assert_eq!(h.alpn.as_deref(), Some("http/1.1"), "{}", h.output);
    let h = served(&["-tls1_3"]);
    assert!(
        !h.ok,
        "TLS 1.3 was accepted on a TLSv1.2 port:\n{}",
        h.output
    );
    let h = served(&["-tls1_2"]);
    assert!(h.ok, "{}", h.output);
}

#[test]
fn self_signed_certificates_where_asked_for_or_nothing_is_configured() {
    let net = Net::new(Topo::Loopback);
    let (_ca_dir, ca, certs) = cert_dir();
    let _backend = Server::start(&net.proxy, net.backend(), echo);
    // No --certs: every name gets the self-signed certificate, with a warning at start.
    let d = start(
        &net,
        Plane::Sockmap,
        &tls_config(&["tls"], "", net.backend()),
        &[],
    );
    let h = s_client(
        net.client(),
        net.public(),
        &ca.path,
        &["-servername", "a.example.com"],
    );
    assert!(h.ok, "{}", h.output);
    assert_eq!(
        h.subject_cn.as_deref(),
        Some("rcgen self signed cert"),
        "{}",
        h.output
    );
    assert_eq!(h.verify_code, Some(18), "not self-signed:\n{}", h.output);
    assert!(d.log().contains("self-signed"), "no warning:\n{}", d.log());
    drop(d);

    // With --certs and no default: a name without a certificate fails its handshake, counted.
    std::fs::remove_file(certs.0.join("default.pem")).expect("remove default");
    let certs_arg = certs.0.to_string_lossy().into_owned();
    let d = start(
        &net,
        Plane::Sockmap,
        &tls_config(&["tls"], "", net.backend()),
        &["--certs", &certs_arg],
    );
    let h = s_client(
        net.client(),
        net.public(),
        &ca.path,
        &["-servername", "unknown.test"],
    );
    assert!(
        !h.ok,
        "a handshake without a certificate succeeded:\n{}",
        h.output
    );
    assert!(
        eventually(Duration::from_secs(5), || counter(&d, "tls_failed") == 1),
        "{:#}",
        d.stats()
    );
    drop(d);

    // default_self_signed: the self-signed certificate where no file matches.
    let d = start(
        &net,
        Plane::Sockmap,
        &tls_config(&["tls"], "      default_self_signed = true", net.backend()),
        &["--certs", &certs_arg],
    );
    let h = s_client(
        net.client(),
        net.public(),
        &ca.path,
        &["-servername", "unknown.test"],
    );
    assert_eq!(
        h.subject_cn.as_deref(),
        Some("rcgen self signed cert"),
        "{}",
        h.output
    );
    let h = s_client(
        net.client(),
        net.public(),
        &ca.path,
        &["-servername", "a.example.com"],
    );
    assert_eq!(h.subject_cn.as_deref(), Some("exact"), "{}", h.output);
    assert_eq!(h.verify_code, Some(0), "{}", h.output);
    d.wait_idle();
}

#[test]
fn bad_handshakes_are_closed_and_counted() {
    let extra = ["--tls-handshake-timeout", "1s"];
    let setup = serve_tls(Topo::Loopback, Plane::Sockmap, &["tls"], "", &extra);
    let (net, ca, d) = (&setup.net, &setup.ca, &setup.d);
    // Plain HTTP to a TLS port.
    let mut plain = net.connect();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        .expect("write");
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    assert!(
        rest.is_empty() || rest[0] == 0x15,
        "plain text got an answer other than an alert: {rest:?}"
    );
    // A client that says nothing is closed after the handshake timeout.
    let mut silent = net.connect();
    let mut byte = [0u8; 1];
    let got = silent.read(&mut byte);
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "the silent client got {got:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || counter(d, "tls_failed") == 2),
        "{:#}",
        d.stats()
    );
    // A good one is served still, and no machine's slot was taken by the others.
    let conn = net.connect();
    echo_through_tls(
        conn,
        client_config(&ca.pem),
        "a.example.com",
        None,
        7,
        1 << 20,
    )
    .expect("served");
    let stats = d.wait_idle();
    assert_eq!(stats["connections"]["tls_handshakes"], 1, "{stats:#}");
    assert_eq!(
        stats["services"][0]["machines"][0]["chosen"], 1,
        "{stats:#}"
    );
}

/// `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// `GSSENCRequest`: length 8, code 80877104.
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

#[test]
fn pg_tls_answers_postgres_clients_and_passes_plain_text_on() {
    let setup = serve_tls(Topo::Veth, Plane::Sockmap, &["pg_tls"], "", &[]);
    let (net, ca, d) = (&setup.net, &setup.ca, &setup.d);
    // openssl's own PostgreSQL negotiation.
    let h = s_client(
        net.client(),
        net.public(),
        &ca.path,
        &["-starttls", "postgres", "-servername", "a.example.com"],
    );
    assert!(h.ok, "{}", h.output);
    assert_eq!(h.subject_cn.as_deref(), Some("exact"), "{}", h.output);
    assert_eq!(h.verify_code, Some(0), "{}", h.output);
    // SSLRequest, then a checked stream; GSSENCRequest first is declined.
    let config = client_config(&ca.pem);
    let s = net.connect();
    echo_through_tls(
        s,
        Arc::clone(&config),
        "a.example.com",
        Some((&SSL_REQUEST, b'S')),
        3,
        16 << 20,
    )
    .expect("stream after SSLRequest");
    let mut s = net.connect();
    s.write_all(&GSSENC_REQUEST).expect("write");
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"N");
    echo_through_tls(
        s,
        config,
        "a.example.com",
        Some((&SSL_REQUEST, b'S')),
        4,
        1 << 20,
    )
    .expect("stream after GSSENCRequest and SSLRequest");
    // A startup message in plain text reaches the machine unchanged.
    let mut s = net.connect();
    let startup: Vec<u8> = [
        &[0u8, 0, 0, 23, 0, 3, 0, 0][..],
        b"user\0pg\0\0",
        b"more bytes",
    ]
    .concat();
    s.write_all(&startup).expect("write");
    // The rest comes once the connection is spliced, and ends with FIN then: the 8 bytes
    // spliced read itself must not hold the end back.
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"after the splice").expect("write");
    std::thread::sleep(Duration::from_millis(300));
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("echo");
    assert_eq!(back, [&startup[..], b"after the splice"].concat());
    let s = d.wait_idle();
    assert_eq!(s["connections"]["pg_plaintext"], 1, "{s:#}");
    assert_eq!(s["connections"]["tls_handshakes"], 3, "{s:#}");
}

#[test]
fn proxy_protocol_after_tls_precedes_the_plaintext() {
    let net = Net::new(Topo::Veth);
    let (_ca_dir, ca, certs) = cert_dir();
    let headers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&headers);
    // The machine reads the PROXY v1 line, notes it, then echoes what follows.
    let _backend = Server::start(&net.proxy, net.backend(), move |s| {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        let mut r = s.try_clone().expect("clone");
        while !line.ends_with(b"\r\n") {
            if r.read(&mut byte).unwrap_or(0) == 0 {
                return;
            }
            line.push(byte[0]);
        }
        seen.lock()
            .expect("headers")
            .push(String::from_utf8_lossy(&line).into_owned());
        echo(s);
    });
    let certs_arg = certs.0.to_string_lossy().into_owned();
    let config = tls_config(&["tls", "proxy_proto"], "", net.backend());
    let _d = start(&net, Plane::Sockmap, &config, &["--certs", &certs_arg]);
    let s = net.connect();
    let client: SocketAddr = s.local_addr().expect("client address");
    echo_through_tls(s, client_config(&ca.pem), "a.example.com", None, 9, 4 << 20)
        .expect("stream after the header");
    let headers = headers.lock().expect("headers");
    let public = net.public();
    assert_eq!(
        headers.as_slice(),
        [format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            client.ip(),
            public.ip(),
            client.port(),
            public.port()
        )]
    );
}

/// A machine that serves HTTPS only (nginx with a certificate of the test's CA).
fn https_machine(net: &Net, ca: &TestCa, dir: &Scratch) -> tests::Nginx {
    ca.issue(&dir.0, "m", "machine", &["machine.internal"], true);
    let backend = net.backend();
    let d = dir.0.display();
    tests::Nginx::start(
        &net.proxy,
        &format!(
            "  server {{ listen {backend} ssl; ssl_certificate {d}/m.pem; ssl_certificate_key {d}/m.key; \
             location / {{ return 200 \"ok\\n\"; }} }}"
        ),
        backend,
    )
}

/// The machine's health once its checks have run three times. Each check may take 5 s: a
/// handshake under an emulated CPU (the kernel matrix) has taken more than one.
fn checked_health(net: &Net, check: &str) -> serde_json::Value {
    let config = format!(
        "{}  [[services.http_checks]]\n    interval = 200\n    timeout = 5000\n{check}\n",
        tests::test_config()
    ) + &format!(
        "[[machines]]\n  id = \"m\"\n  address = \"{}\"\n",
        net.backend().ip()
    );
    let d = start(net, Plane::Sockmap, &config, &[]);
    let machine = || d.stats()["services"][0]["machines"][0].clone();
    // Three runs: enough for a failing check to take the machine out of rotation.
    let ran = tests::eventually(Duration::from_secs(30), || {
        machine()["checks"].as_u64().is_some_and(|n| n >= 3)
    });
    assert!(ran, "the checks did not run: {:#}", machine());
    machine()
}

#[test]
fn https_checks_verify_the_machine_or_skip_verification_when_told() {
    let net = Net::new(Topo::Loopback);
    let ca_dir = Scratch::new();
    let ca = TestCa::new(&ca_dir.0);
    let _nginx = https_machine(&net, &ca, &ca_dir);
    // Without verification: passes, so TLS and the request went through.
    let m = checked_health(&net, "    protocol = \"https\"\n    tls_skip_verify = true");
    assert_eq!(m["healthy"], true, "{m:#}");
    assert_eq!(m["check_failures"], 0, "{m:#}");
    // Verified against the host's roots, which do not hold the test's CA: fails.
    let m = checked_health(
        &net,
        "    protocol = \"https\"\n    tls_server_name = \"machine.internal\"",
    );
    assert_eq!(m["healthy"], false, "{m:#}");
    // Plain HTTP to an HTTPS machine: nginx answers 400, the check fails.
    let m = checked_health(&net, "    protocol = \"http\"");
    assert_eq!(m["healthy"], false, "{m:#}");
}
