//! The etcd registry: two edges follow a real three-member etcd cluster, machines are added,
//! moved, removed and expire while traffic flows, and members die and come back. Every host
//! is a network namespace behind one router.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{
    BACKEND_PORT, Daemon, Netns, Plane, Scratch, Server,
    http::head_echo,
    metrics::{promtool, sample},
    registry::{Etcd, Fabric, leased_machine, registry_cmd, registry_output, registry_output_env},
};

const PORT: u16 = 10080;
/// Where each edge serves its metrics, in its namespace.
const METRICS: &str = "127.0.0.1:9464";
const APP: &str = "web";
/// The public and machine ports of the second app, behind the http handler.
const API_PORT: u16 = 10081;
const API_BACKEND: u16 = BACKEND_PORT + 1;

/// A machine: says its name, then echoes.
fn named(name: &'static str) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |mut s: TcpStream| {
        if s.write_all(format!("{name}\n").as_bytes()).is_err() {
            return;
        }
        tests::echo(s);
    }
}

/// The machine a new connection from `client` to `edge` reaches, or why none.
fn reached(client: &Netns, edge: Ipv4Addr) -> Result<String, String> {
    let s = client
        .connect(SocketAddr::new(edge.into(), PORT))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.is_empty() {
        return Err("closed before a name".to_owned());
    }
    Ok(line.trim().to_owned())
}

/// Polls until every new connection from `client` to each of `edges` reaches one of `want`
/// (five in a row on each); how long that took.
fn converge(client: &Netns, edges: &[Ipv4Addr], want: &[&str], limit: Duration) -> Duration {
    let start = Instant::now();
    let mut streak = 0;
    loop {
        let ok = edges
            .iter()
            .all(|&e| reached(client, e).is_ok_and(|m| want.contains(&m.as_str())));
        if ok {
            streak += 1;
            if streak == 5 {
                return start.elapsed();
            }
        } else {
            streak = 0;
        }
        assert!(
            start.elapsed() < limit,
            "edges did not converge on {want:?} within {limit:?}: last {:?}",
            edges
                .iter()
                .map(|&e| reached(client, e))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A held connection through an edge: its machine, and a round trip that must still work.
struct Held(TcpStream, String);

impl Held {
    fn open(client: &Netns, edge: Ipv4Addr) -> Self {
        let s = client
            .connect(SocketAddr::new(edge.into(), PORT))
            .expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        r.read_line(&mut line).expect("name");
        Self(s, line.trim().to_owned())
    }

    fn round_trip(&mut self, msg: &[u8]) {
        tests::assert_echoes(&mut self.0, msg);
    }
}

/// An app's fly.toml: one service from `ports` (machine port, public port), whose public
/// port has the keys in `port_keys`.
fn app_toml(app: &str, region: &str, ports: (u16, u16), port_keys: &str) -> String {
    let (internal, public) = ports;
    format!(
        "app = \"{app}\"\nprimary_region = \"{region}\"\n\n[[services]]\n  internal_port = {internal}\n\n  [[services.ports]]\n    port = {public}\n{port_keys}"
    )
}

/// The hosts; fields drop in order, each server before its namespace, the router last.
struct World {
    machines: Vec<(Server, Netns, Ipv4Addr)>,
    client: Netns,
    etcd: Etcd,
    fabric: Fabric,
    dir: Scratch,
}

const NAMES: [&str; 3] = ["m0", "m1", "m2"];

fn world() -> World {
    world_with(false)
}

/// The hosts; with `tls`, etcd talks TLS to clients and wants a certificate of the CA in
/// `dir` (`ca.pem`), where `edge.pem` and `edge.key` are one for the edges.
fn world_with(tls: bool) -> World {
    tests::raise_fd_limit();
    let fabric = Fabric::new();
    let (reg, reg_addr) = fabric.host("etcd");
    let dir = Scratch::new();
    let certs = tls.then(|| {
        let ca = tests::tls::TestCa::new(&dir.0);
        ca.issue(&dir.0, "server", "etcd", &[&reg_addr.to_string()], true);
        ca.issue(&dir.0, "client", "root", &[], true);
        ca.issue(&dir.0, "edge", "edge", &[], true);
        dir.0.clone()
    });
    let etcd = Etcd::start_with(reg, reg_addr, certs);
    let (client, _) = fabric.host("cli");
    let machines = NAMES
        .iter()
        .map(|&name| {
            let (ns, addr) = fabric.host(name);
            let server =
                Server::start(&ns, SocketAddr::new(addr.into(), BACKEND_PORT), named(name));
            (server, ns, addr)
        })
        .collect();
    World {
        machines,
        client,
        etcd,
        fabric,
        dir,
    }
}

impl World {
    fn put_config(&self, url: &str) {
        self.put_config_with(&[], url, &[]);
    }

    /// Writes the app's fly.toml with `env` and `access` (the registry flags) given.
    fn put_config_with(&self, env: &[&str], url: &str, access: &[&str]) {
        let path = self.dir.0.join("fly.toml");
        std::fs::write(&path, app_toml(APP, "ams", (BACKEND_PORT, PORT), "")).expect("write");
        let args = [access, &["put-config", APP, path.to_str().expect("utf-8")]].concat();
        let out = registry_output_env(&self.client, env, url, &args);
        assert!(out.status.success(), "put-config: {out:?}");
    }

    fn put_machine(&self, url: &str, i: usize) {
        let addr = self.machines[i].2.to_string();
        registry_cmd(
            &self.client,
            url,
            &[
                "put-machine",
                APP,
                NAMES[i],
                "--address",
                &addr,
                "--region",
                "ams",
            ],
        );
    }

    fn remove_machine(&self, url: &str, i: usize) {
        registry_cmd(&self.client, url, &["remove-machine", APP, NAMES[i]]);
    }

    fn edge(&self, tag: &str, url: &str) -> (Netns, Ipv4Addr, Daemon) {
        let (ns, addr) = self.fabric.host(tag);
        let d = Daemon::start_registry(
            &ns,
            url,
            Plane::Sockmap,
            &[
                "--listen-addr",
                &addr.to_string(),
                "--metrics-addr",
                METRICS,
            ],
        );
        (ns, addr, d)
    }
}

fn registry_of(d: &Daemon) -> serde_json::Value {
    d.stats()["registry"].clone()
}

/// One scrape of an edge's `/metrics`, checked by promtool.
fn scrape(edge: &Netns) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &edge.name,
            "curl",
            "-sS",
            "--max-time",
            "10",
        ])
        .arg(format!("http://{METRICS}/metrics"))
        .output()
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool: {said}\n{text}");
    text
}

#[test]
fn edges_follow_the_registry_within_a_second_and_keep_established_connections() {
    let w = world();
    let url = w.etcd.url(&[0, 1, 2], "fleet");
    w.put_config(&url);
    w.put_machine(&url, 0);
    let (e0, a0, d0) = w.edge("edge0", &url);
    let (e1, a1, d1) = w.edge("edge1", &url);
    let edges = [a0, a1];
    assert_eq!(reached(&w.client, a0).as_deref(), Ok("m0"));
    assert_eq!(reached(&w.client, a1).as_deref(), Ok("m0"));
    let mut held: Vec<Held> = edges.iter().map(|&e| Held::open(&w.client, e)).collect();
    // New connections go through both edges the whole time; none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let traffic = steady_traffic(&w.client, edges, Arc::clone(&stop), Arc::clone(&served));

    // A machine moves: m1 added, m0 removed. New connections follow on both edges within a
    // second; those already on m0 keep working.
    w.put_machine(&url, 1);
    w.remove_machine(&url, 0);
    let moved = converge(&w.client, &edges, &["m1"], Duration::from_secs(1));
    for h in &mut held {
        assert_eq!(h.1, "m0");
        h.round_trip(b"still here after m0 left the registry");
    }
    println!("a move converged on both edges in {moved:?}");

    // A machine registered with a lease goes when its lease expires (its host died).
    let mut agent = leased_machine(
        &w.client,
        &url,
        &[APP, "m2", "--address", &w.machines[2].2.to_string()],
        "2s",
    );
    // Both machines now take connections: wait until each edge has reached m2 once.
    let deadline = Instant::now() + Duration::from_secs(5);
    for &e in &edges {
        while reached(&w.client, e).as_deref() != Ok("m2") {
            assert!(Instant::now() < deadline, "m2 never reached through {e}");
        }
    }
    agent.kill().expect("kill the agent");
    agent.wait().expect("reap the agent");
    let expired = converge(&w.client, &edges, &["m1"], Duration::from_secs(8));
    println!("lease of 2 s: m2 left both edges {expired:?} after its agent died");

    // Both edges see the same registry revision and machines. Routing alone can look
    // converged while an edge still lists m2 (m1 chosen five times in a row): wait for both
    // to list one machine first.
    let one_machine = || [&d0, &d1].iter().all(|d| registry_of(d)["machines"] == 1);
    assert!(
        tests::eventually(Duration::from_secs(5), one_machine),
        "{}\n{}",
        registry_of(&d0),
        registry_of(&d1)
    );
    let (r0, r1) = (registry_of(&d0), registry_of(&d1));
    assert_eq!(r0["revision"], r1["revision"], "{r0}\n{r1}");
    assert_eq!(r0["machines"], 1, "{r0}");
    assert_eq!(r0["connected"], true, "{r0}");
    // The metrics say the same, per edge, with services and machines named by app.
    for (ns, r) in [(&e0, &r0), (&e1, &r1)] {
        let text = scrape(ns);
        let revision = r["revision"].as_f64();
        assert_eq!(
            sample(&text, "spliced_registry_revision"),
            revision,
            "{text}"
        );
        assert_eq!(sample(&text, "spliced_registry_connected"), Some(1.0));
        assert_eq!(sample(&text, "spliced_registry_machines"), Some(1.0));
        let m1 = "spliced_machine_healthy{service=\"web/services[0]\",machine=\"web/m1\"}";
        assert_eq!(sample(&text, m1), Some(1.0), "{text}");
    }
    for h in &mut held {
        h.round_trip(b"and after the lease expired");
    }

    // An invalid config is refused where it is written, and if written anyway (etcdctl) is
    // reported while the app keeps being served as before.
    let bad = w.dir.0.join("bad.toml");
    std::fs::write(&bad, "[[services]]\n  internal_port = \"x\"\n").expect("write");
    let out = registry_output(
        &w.client,
        &url,
        &["put-config", APP, bad.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("internal_port"), "{said}");
    let raw = w
        .etcd
        .etcdctl(&[0], &["put", "/fleet/apps/web/config", "[[services]"]);
    assert!(raw.status.success());
    assert!(tests::eventually(Duration::from_secs(2), || {
        registry_of(&d0)["left_out"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    }));
    let left = registry_of(&d0)["left_out"].to_string();
    assert!(left.contains("still serving the config before"), "{left}");
    assert_eq!(reached(&w.client, a0).as_deref(), Ok("m1"));
    let listing = registry_cmd(&w.client, &url, &["list", "--format", "json"]);
    let listing: serde_json::Value = serde_json::from_str(&listing).expect("json");
    assert_eq!(listing["apps"][0]["machines"][0]["id"], "m1", "{listing}");

    an_http_app_is_told_its_region(&w, &url, &edges);
    stop.store(true, Ordering::Relaxed);
    let errors = traffic.join().expect("traffic thread");
    assert!(errors.is_empty(), "connections failed: {errors:?}");
    assert!(served.load(Ordering::Relaxed) > 20);
    d0.stop();
    d1.stop();
}

/// An app behind the http handler, added to the registry: its machine is told the app's own
/// primary region (`Fly-Region`) through every edge.
fn an_http_app_is_told_its_region(w: &World, url: &str, edges: &[Ipv4Addr]) {
    let api = w.dir.0.join("api.toml");
    std::fs::write(
        &api,
        app_toml(
            "api",
            "fra",
            (API_BACKEND, API_PORT),
            "    handlers = [\"http\"]\n",
        ),
    )
    .expect("write");
    registry_cmd(
        &w.client,
        url,
        &["put-config", "api", api.to_str().expect("utf-8")],
    );
    let (machine_ns, machine_ip) = (&w.machines[0].1, w.machines[0].2);
    let _api_machine = Server::start(
        machine_ns,
        SocketAddr::new(machine_ip.into(), API_BACKEND),
        head_echo("api"),
    );
    registry_cmd(
        &w.client,
        url,
        &[
            "put-machine",
            "api",
            "a0",
            "--address",
            &machine_ip.to_string(),
        ],
    );
    for &e in edges {
        let fetch = || {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &w.client.name,
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                ])
                .arg(format!("http://{e}:{API_PORT}/"))
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
        };
        assert!(
            tests::eventually(Duration::from_secs(3), || fetch()
                .contains("fly-region: fra")),
            "through {e}: {}",
            fetch()
        );
    }
}

/// A client connecting through each of `edges` in turn until `stop`, each connection checked
/// (a machine's name, then an echo); what failed.
fn steady_traffic(
    client: &Netns,
    edges: [Ipv4Addr; 2],
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<String>> {
    client.spawn(move || {
        let mut errors = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for e in edges {
                let target = SocketAddr::new(e.into(), PORT);
                let r = TcpStream::connect_timeout(&target, Duration::from_secs(3)).and_then(
                    |mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        let mut r = BufReader::new(s.try_clone()?);
                        let mut line = String::new();
                        r.read_line(&mut line)?;
                        s.write_all(b"ping\n")?;
                        let mut echo = String::new();
                        r.read_line(&mut echo)?;
                        Ok((line, echo))
                    },
                );
                match r {
                    Ok((line, echo)) if !line.is_empty() && echo == "ping\n" => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    other => errors.push(format!("{e}: {other:?}")),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        errors
    })
}

#[test]
fn edges_serve_through_etcd_failures_and_catch_up() {
    let mut w = world();
    let url = w.etcd.url(&[0, 1, 2], "fleet");
    w.put_config(&url);
    w.put_machine(&url, 0);
    let (_e0, a0, d0) = w.edge("edge0", &url);
    // This edge knows one member only: while that member is away it misses every change.
    let (_e1, a1, d1) = w.edge("edge1", &w.etcd.url(&[0], "fleet"));
    let edges = [a0, a1];
    converge(&w.client, &edges, &["m0"], Duration::from_secs(2));

    // Traffic flows through both edges the whole time: no new connection is refused.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let traffic = steady_traffic(&w.client, edges, Arc::clone(&stop), Arc::clone(&served));

    // One member dies (member 0, which edge1 alone talks to): the other edge sees changes
    // as before.
    w.etcd.kill(0);
    w.put_machine(&w.etcd.url(&[1, 2], "fleet"), 1);
    let one_down = converge(&w.client, &[a0], &["m0", "m1"], Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(3);
    while reached(&w.client, a0).as_deref() != Ok("m1") {
        assert!(Instant::now() < deadline, "m1 never reached through edge0");
    }
    println!("one member down: a change reached edge0 in {one_down:?}");
    // While it is away, m0 goes, and the history is compacted past what edge1 holds.
    w.remove_machine(&w.etcd.url(&[1, 2], "fleet"), 0);
    converge(&w.client, &[a0], &["m1"], Duration::from_secs(2));
    let status = w
        .etcd
        .etcdctl(&[1, 2], &["endpoint", "status", "--write-out", "json"]);
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("etcdctl endpoint status json");
    let revision = status[0]["Status"]["header"]["revision"]
        .as_i64()
        .expect("revision");
    let compacted = w.etcd.etcdctl(&[1, 2], &["compact", &revision.to_string()]);
    assert!(compacted.status.success(), "{compacted:?}");
    assert_eq!(
        reached(&w.client, a1).as_deref(),
        Ok("m0"),
        "edge1 still serves what it had"
    );
    w.etcd.restart(0);
    w.etcd.healthy(&[0, 1, 2]);
    let caught_up = converge(&w.client, &[a1], &["m1"], Duration::from_secs(10));
    println!("edge1 reloaded the compacted registry whole {caught_up:?} after member 0 was back");
    let r1 = registry_of(&d1);
    assert!(r1["full_loads"].as_u64() >= Some(2), "{r1}");
    assert!(r1["reconnects"].as_u64() >= Some(1), "{r1}");

    // Every member dies: both edges keep serving the last state and say so.
    for i in 0..3 {
        w.etcd.kill(i);
    }
    assert!(tests::eventually(Duration::from_secs(10), || {
        registry_of(&d0)["connected"] == false && registry_of(&d1)["connected"] == false
    }));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(reached(&w.client, a0).as_deref(), Ok("m1"));
    assert_eq!(reached(&w.client, a1).as_deref(), Ok("m1"));
    let log = d0.log();
    assert!(log.contains("registry unreachable"), "{log}");
    // An upgrade now would start a process with nothing to serve: it is refused, and the
    // edge serves on as it was.
    let pid = d0.stats()["pid"].clone();
    d0.signal(libc::SIGUSR2);
    tests::until(&d0, Duration::from_secs(30), "a failed upgrade", |s| {
        s["reloads"]["upgrades_failed"] == 1
    });
    assert_eq!(d0.stats()["pid"], pid);
    let log = d0.log();
    assert!(
        log.contains("a process started by an upgrade serves no less"),
        "{log}"
    );
    assert_eq!(reached(&w.client, a0).as_deref(), Ok("m1"));

    // Back: the edges watch again and take the next change.
    for i in 0..3 {
        w.etcd.restart(i);
    }
    w.etcd.healthy(&[0, 1, 2]);
    w.put_machine(&url, 2);
    w.remove_machine(&url, 1);
    let back = converge(&w.client, &edges, &["m2"], Duration::from_secs(15));
    println!("all members back: both edges took the next change {back:?} after it was made");
    for d in [&d0, &d1] {
        assert_eq!(registry_of(d)["connected"], true);
    }

    stop.store(true, Ordering::Relaxed);
    let errors = traffic.join().expect("traffic thread");
    assert!(errors.is_empty(), "connections failed: {errors:?}");
    assert!(served.load(Ordering::Relaxed) > 50);
    d0.stop();
    d1.stop();
}

#[test]
fn edges_reach_etcd_over_tls_with_a_client_certificate_and_a_password() {
    let mut w = world_with(true);
    for args in [
        vec!["user", "add", "edge:edge-password"],
        vec!["role", "add", "fleet"],
        vec![
            "role",
            "grant-permission",
            "fleet",
            "--prefix=true",
            "readwrite",
            "/fleet/",
        ],
        vec!["user", "grant-role", "edge", "fleet"],
    ] {
        let out = w.etcd.etcdctl(&[0], &args);
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    }
    w.etcd.enable_auth("root-password");
    let url = w.etcd.url(&[0, 1, 2], "fleet");
    let file = |name: &str| w.dir.0.join(name).to_str().expect("utf-8").to_owned();
    let (ca, cert, key) = (file("ca.pem"), file("edge.pem"), file("edge.key"));
    let access = [
        "--registry-ca",
        &ca,
        "--registry-cert",
        &cert,
        "--registry-key",
        &key,
        "--registry-user",
        "edge",
    ];
    let password = "SPLICED_REGISTRY_PASSWORD=edge-password";

    // Without a client certificate, or with a wrong password, etcd refuses.
    let no_cert = registry_output(&w.client, &url, &["--registry-ca", &ca, "list"]);
    assert_eq!(no_cert.status.code(), Some(1), "{no_cert:?}");
    let wrong = registry_output_env(
        &w.client,
        &["SPLICED_REGISTRY_PASSWORD=guess"],
        &url,
        &[&access[..], &["list"]].concat(),
    );
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("authentication failed"), "{said}");

    w.put_config_with(&[password], &url, &access);
    let machine = |i: usize| {
        let addr = w.machines[i].2.to_string();
        let args = [
            &access[..],
            &["put-machine", APP, NAMES[i], "--address", &addr],
        ]
        .concat();
        let out = registry_output_env(&w.client, &[password], &url, &args);
        assert!(out.status.success(), "put-machine: {out:?}");
    };
    machine(0);
    let (ns, addr) = w.fabric.host("edge");
    let listen = addr.to_string();
    let d = Daemon::start_registry_with(
        &ns,
        &["env", password],
        &url,
        Plane::Sockmap,
        &[&access[..], &["--listen-addr", &listen]].concat(),
    );
    assert_eq!(reached(&w.client, addr).as_deref(), Ok("m0"));
    machine(1);
    let out = registry_output_env(
        &w.client,
        &[password],
        &url,
        &[&access[..], &["remove-machine", APP, "m0"]].concat(),
    );
    assert!(out.status.success(), "remove-machine: {out:?}");
    let moved = converge(&w.client, &[addr], &["m1"], Duration::from_secs(1));
    println!("over TLS with a password: a move reached the edge in {moved:?}");
    assert_eq!(registry_of(&d)["connected"], true);
    d.stop();
}
