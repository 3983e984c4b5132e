//! Where the benchmark runs: the namespaces of a topology, the backend server, and every
//! target (direct and the proxies) started side by side on their own ports.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tests::{BACKEND_PORT, Netns, Scratch, sh, veth};

/// What every target forwards, each on its own public port: our load generator's backend
/// (sink and echo), then real servers driven by their own clients.
pub const SERVICES: &[(&str, u16)] = &[
    ("load", BACKEND_PORT),
    ("iperf3", 18083),
    ("redis", 18081),
    ("http", 18082),
    // Terminated by the proxy: TLS in front of the load backend; HTTP parsed and passed on
    // to nginx, in the clear and over TLS.
    ("tls", BACKEND_PORT),
    ("http-proxy", 18082),
    ("https", 18082),
];

/// Whether the proxy terminates TLS on service `name`, and whether it handles its HTTP.
pub fn terminated(name: &str) -> (bool, bool) {
    (
        matches!(name, "tls" | "https"),
        matches!(name, "http-proxy" | "https"),
    )
}

/// The index of service `name` in [`SERVICES`].
pub fn service(name: &str) -> usize {
    SERVICES
        .iter()
        .position(|(n, _)| *n == name)
        .expect("a known service")
}

/// One way of placing client, proxy and backend.
pub struct Topology {
    pub name: &'static str,
    pub client: Arc<Netns>,
    pub proxy: Arc<Netns>,
    pub backend: Arc<Netns>,
    /// The proxy's address as clients reach it.
    pub public_ip: IpAddr,
    /// The backend as the proxy (and, for "direct", the client) reaches it.
    pub backend_addr: SocketAddr,
}

/// Where the host lists the congestion controls a namespace other than the first may choose.
const ALLOWED_CONGESTION: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

/// Lets every namespace choose `congestion`: the host allows only its default and reno there
/// until told otherwise (a host whose default is BBR refuses cubic). Only adds to the list,
/// and says so.
pub fn allow_congestion(congestion: &str) -> Result<()> {
    let allowed = std::fs::read_to_string(ALLOWED_CONGESTION).context(ALLOWED_CONGESTION)?;
    if allowed.split_whitespace().any(|a| a == congestion) {
        return Ok(());
    }
    let available = "/proc/sys/net/ipv4/tcp_available_congestion_control";
    if !std::fs::read_to_string(available)
        .context(available)?
        .split_whitespace()
        .any(|a| a == congestion)
    {
        // A module the kernel loads on request (tcp_cubic, tcp_bbr).
        let _ = Command::new("modprobe")
            .arg(format!("tcp_{congestion}"))
            .status();
    }
    let wanted = format!("{} {congestion}", allowed.trim());
    std::fs::write(ALLOWED_CONGESTION, &wanted)
        .with_context(|| format!("{ALLOWED_CONGESTION}: allowing {congestion}"))?;
    eprintln!(
        "bench: host sysctl net.ipv4.tcp_allowed_congestion_control raised to {wanted:?} (was {:?}) so that every namespace can use {congestion}",
        allowed.trim()
    );
    Ok(())
}

/// Settings every namespace gets: ports enough that the connection-rate workload does not
/// run out to `TIME_WAIT`, none of them among the ports the bench listens on (an outgoing
/// connection that took one first would make its listener fail to bind), and one congestion
/// control for every socket of every target (a namespace starts with the host's, which may
/// pace where nothing needs pacing).
fn tune(ns: &Netns, congestion: &str) {
    for (key, value) in [
        ("net.ipv4.tcp_tw_reuse", "1"),
        ("net.ipv4.ip_local_port_range", "1024 65535"),
        ("net.ipv4.ip_local_reserved_ports", "10000-19999"),
        ("net.core.somaxconn", "8192"),
        ("net.ipv4.tcp_congestion_control", congestion),
    ] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ]);
    }
}

impl Topology {
    /// Client, proxy and backend in one namespace, over loopback.
    pub fn loopback(congestion: &str) -> Self {
        let ns = Arc::new(Netns::new("bench-lo"));
        tune(&ns, congestion);
        Self {
            name: "loopback",
            client: Arc::clone(&ns),
            proxy: Arc::clone(&ns),
            backend: ns,
            public_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            backend_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), BACKEND_PORT),
        }
    }

    /// client | proxy | backend, three namespaces joined by two veth pairs; the proxy's
    /// namespace routes between the other two, which is the "direct" path.
    pub fn veth(congestion: &str) -> Self {
        let (c, p, b) = (
            Netns::new("bench-c"),
            Netns::new("bench-p"),
            Netns::new("bench-b"),
        );
        veth(
            (&c, "vc", &["198.18.0.1/24"]),
            (&p, "vp", &["198.18.0.2/24"]),
        );
        veth(
            (&b, "vb", &["198.19.0.2/24"]),
            (&p, "vq", &["198.19.0.1/24"]),
        );
        let (cn, pn, bn) = (c.name.as_str(), p.name.as_str(), b.name.as_str());
        sh(&[
            "ip",
            "-n",
            cn,
            "route",
            "add",
            "default",
            "via",
            "198.18.0.2",
        ]);
        sh(&[
            "ip",
            "-n",
            bn,
            "route",
            "add",
            "default",
            "via",
            "198.19.0.1",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            pn,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]);
        for ns in [&c, &p, &b] {
            tune(ns, congestion);
        }
        Self {
            name: "veth",
            client: Arc::new(c),
            proxy: Arc::new(p),
            backend: Arc::new(b),
            public_ip: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
            backend_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 2)), BACKEND_PORT),
        }
    }

    /// client | proxy and backend: the client's namespace joined by a veth pair to the one
    /// the proxy and the backend share, so the client comes over a network and the backend
    /// is a machine on the proxy's host, as on an edge host that runs its machines; the
    /// client's own leg is the same for every target.
    pub fn edge(congestion: &str) -> Self {
        let (c, p) = (Netns::new("bench-ec"), Netns::new("bench-ep"));
        veth(
            (&c, "vc", &["198.18.0.1/24"]),
            (&p, "vp", &["198.18.0.2/24"]),
        );
        for ns in [&c, &p] {
            tune(ns, congestion);
        }
        let p = Arc::new(p);
        let ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        Self {
            name: "edge",
            client: Arc::new(c),
            proxy: Arc::clone(&p),
            backend: p,
            public_ip: ip,
            backend_addr: SocketAddr::new(ip, BACKEND_PORT),
        }
    }
}

/// The backend: each connection's first byte says what it wants. `S`: a sink that reads to
/// end of stream and answers with the byte count (8 bytes, little endian). `E`: an echo.
/// It runs as a process of its own (this binary with `--backend`), so that its descriptors
/// and the client's are counted apart.
pub struct Backend(Child);

impl Backend {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(std::env::current_exe()?)
            .args(["--backend", &addr.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .context("start the backend")?;
        let backend = Self(child);
        wait_listening(ns, addr, "the backend")?;
        Ok(backend)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real servers behind [`SERVICES`] after the first: iperf3, redis-server and nginx
/// (HTTP, answering `200 ok`), in the backend's namespace.
pub struct RealBackends(Vec<Child>);

impl RealBackends {
    pub fn start(topo: &Topology, dir: &Scratch) -> Result<Self> {
        let ip = topo.backend_addr.ip().to_string();
        let port = |name: &str| SERVICES[service(name)].1.to_string();
        let nginx_conf = dir.0.join(format!("{}-backend-nginx.conf", topo.name));
        std::fs::write(
            &nginx_conf,
            format!(
                "daemon off;\nworker_processes 1;\npid {};\nerror_log {} warn;\n\
                 events {{ worker_connections 4096; }}\nhttp {{ access_log off; server {{ \
                 listen {ip}:{}; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
                dir.0
                    .join(format!("{}-backend-nginx.pid", topo.name))
                    .display(),
                dir.0
                    .join(format!("{}-backend-nginx.log", topo.name))
                    .display(),
                port("http"),
            ),
        )?;
        let commands: Vec<Vec<String>> = vec![
            vec![
                "iperf3".into(),
                "-s".into(),
                "-p".into(),
                port("iperf3"),
                "-B".into(),
                ip.clone(),
            ],
            vec![
                "redis-server".into(),
                "--port".into(),
                port("redis"),
                "--bind".into(),
                ip.clone(),
                "--protected-mode".into(),
                "no".into(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
            ],
            vec![
                "nginx".into(),
                "-c".into(),
                nginx_conf.display().to_string(),
            ],
        ];
        let mut children = Vec::new();
        for c in commands {
            children.push(
                Command::new("ip")
                    .args(["netns", "exec", &topo.backend.name])
                    .args(&c)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("start {}", c[0]))?,
            );
        }
        let backends = Self(children);
        for (name, p) in SERVICES[1..]
            .iter()
            .filter(|(n, _)| terminated(n) == (false, false))
        {
            wait_listening(
                &topo.backend,
                SocketAddr::new(topo.backend_addr.ip(), *p),
                name,
            )?;
        }
        Ok(backends)
    }
}

impl Drop for RealBackends {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill on a child we own; SIGTERM lets nginx remove its pid file.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Waits up to 10 s until `addr` accepts connections from inside `ns`.
fn wait_listening(ns: &Netns, addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The backend process's main loop.
pub fn serve_backend(addr: SocketAddr) -> Result<()> {
    // The sweep opens up to 1000 connections at once.
    let listener = tests::listen(addr).with_context(|| format!("listen on {addr}"))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || serve(conn))
            .ok();
    }
    Ok(())
}

fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).is_err() {
        return;
    }
    let mut buf = vec![0u8; 256 * 1024];
    match mode[0] {
        b'S' => {
            let mut total = 1u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = s.write_all(&total.to_le_bytes());
        }
        b'E' => loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        },
        _ => {}
    }
}
