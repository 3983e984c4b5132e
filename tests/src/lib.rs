//! Helpers for the integration tests: network namespaces, the daemon under test, backends
//! (echo, sink, source), and a verifiable byte stream. Everything here is real: sockets,
//! namespaces, the `spliced` binary and the BPF programs it loads. Root only.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The public port the tests' fly.toml exposes.
pub const PUBLIC_PORT: u16 = 10080;
/// The internal port the tests' backends listen on.
pub const BACKEND_PORT: u16 = 18080;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// The per-direction kernel buffering bound the tests run the daemon with (its default).
pub const MAX_BUFFER: u64 = 4 << 20;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(tag: &str) -> String {
    format!(
        "spl{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and panics with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Raises this process's open-file limit: some tests hold thousands of sockets.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write only the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0);
    }
}

/// Joins two namespaces by a veth pair: each end is named, given its addresses (IPv6 ones
/// without duplicate address detection, so they work at once) and brought up.
pub fn veth(a: (&Netns, &str, &[&str]), b: (&Netns, &str, &[&str])) {
    sh(&[
        "ip", "-n", &a.0.name, "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns",
        &b.0.name,
    ]);
    for (ns, dev, addrs) in [a, b] {
        for addr in addrs {
            let mut cmd = vec!["ip", "-n", &ns.name, "addr", "add", addr, "dev", dev];
            if addr.contains(':') {
                cmd.push("nodad");
            }
            sh(&cmd);
        }
        sh(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
    }
}

/// A network namespace that lives as long as this value.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Moves the calling thread into this namespace.
    fn enter_current_thread(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name))
            .expect("namespace file exists");
        // SAFETY: setns on a namespace fd; affects only the calling thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Runs `f` on a new thread inside this namespace. Sockets it creates stay in it.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let ns = Self {
            name: self.name.clone(),
        };
        std::thread::spawn(move || {
            ns.enter_current_thread();
            std::mem::forget(ns);
            f()
        })
    }

    /// Runs `f` inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Connects to `addr` from inside this namespace.
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Where the client is, as seen from the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topo {
    /// Client, proxy and backend share one namespace and talk over loopback.
    Loopback,
    /// The client is in its own namespace, joined to the proxy's by a veth pair.
    Veth,
}

/// The namespaces of one test: the proxy's (with its backends on loopback) and the client's.
pub struct Net {
    pub proxy: Netns,
    client: Option<Netns>,
    pub topo: Topo,
}

impl Net {
    pub fn new(topo: Topo) -> Self {
        let proxy = Netns::new("proxy");
        let client = match topo {
            Topo::Loopback => None,
            Topo::Veth => {
                let client = Netns::new("client");
                veth(
                    (&client, "vc", &["198.18.0.1/24", "fd00:5::1/64"]),
                    (&proxy, "vp", &["198.18.0.2/24", "fd00:5::2/64"]),
                );
                Some(client)
            }
        };
        Self {
            proxy,
            client,
            topo,
        }
    }

    /// The namespace clients run in.
    pub fn client(&self) -> &Netns {
        self.client.as_ref().unwrap_or(&self.proxy)
    }

    /// The proxy's public address as the client reaches it.
    pub fn public(&self) -> SocketAddr {
        let ip = match self.topo {
            Topo::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Topo::Veth => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
        };
        SocketAddr::new(ip, PUBLIC_PORT)
    }

    /// The proxy's public IPv6 address as the client reaches it.
    pub fn public_v6(&self) -> SocketAddr {
        let ip = match self.topo {
            Topo::Loopback => Ipv6Addr::LOCALHOST,
            Topo::Veth => "fd00:5::2".parse().expect("valid address"),
        };
        SocketAddr::new(IpAddr::V6(ip), PUBLIC_PORT)
    }

    /// The backend's address inside the proxy namespace.
    pub fn backend(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), BACKEND_PORT)
    }

    /// Connects a client to the proxy.
    pub fn connect(&self) -> TcpStream {
        let s = self
            .client()
            .connect(self.public())
            .expect("client connects to the proxy");
        s.set_nodelay(true).ok();
        s
    }
}

/// The path of the daemon under test (set by `cargo xtask test`).
pub fn spliced_bin() -> PathBuf {
    std::env::var_os("SPLICED_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/spliced"),
        PathBuf::from,
    )
}

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("scratch"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fly.toml the tests serve: one TCP service from [`PUBLIC_PORT`] to [`BACKEND_PORT`].
pub fn test_config() -> String {
    format!(
        "app = \"spliced-test\"\n\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n"
    )
}

/// A running `spliced run` in a namespace.
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    admin: PathBuf,
    log: PathBuf,
    _dir: Scratch,
}

impl Daemon {
    /// Starts the daemon with `--dataplane plane` in `ns` and waits until it serves.
    pub fn start(ns: &Netns, plane: &str, extra: &[&str]) -> Self {
        Self::start_with(ns, &[], plane, extra)
    }

    /// Like [`Daemon::start`], with a command (and its arguments) that runs the daemon.
    pub fn start_with(ns: &Netns, wrapper: &[&str], plane: &str, extra: &[&str]) -> Self {
        Self::start_full(ns, wrapper, &test_config(), plane, extra)
    }

    /// Like [`Daemon::start`], serving the fly.toml `config`.
    pub fn start_config(ns: &Netns, config: &str, plane: &str, extra: &[&str]) -> Self {
        Self::start_full(ns, &[], config, plane, extra)
    }

    fn start_full(
        ns: &Netns,
        wrapper: &[&str],
        config_text: &str,
        plane: &str,
        extra: &[&str],
    ) -> Self {
        let dir = Scratch::new();
        let config = dir.0.join("fly.toml");
        std::fs::write(&config, config_text).expect("write the config");
        let admin = dir.0.join("admin.sock");
        let log = dir.0.join("spliced.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(wrapper)
            .arg(spliced_bin());
        cmd.args(["run", "--config"])
            .arg(&config)
            .args(["--dataplane", plane, "--admin-socket"])
            .arg(&admin)
            .args(extra)
            .env("RUST_LOG", "info,proxy_user=debug")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.0.join("stdout.log")).expect("log file"))
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = cmd.spawn().expect("start spliced");
        let pid = child.id();
        let mut d = Self {
            child: Some(child),
            pid,
            admin,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if d.try_stats().is_some() {
                return d;
            }
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("spliced exited at start ({st}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "spliced did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_stats(&self) -> Option<serde_json::Value> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.admin).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The daemon's counters, from its admin socket.
    pub fn stats(&self) -> serde_json::Value {
        self.try_stats()
            .unwrap_or_else(|| panic!("admin socket did not answer:\n{}", self.log()))
    }

    /// Waits until the daemon reports no live connection and, on the sockmap plane, no map
    /// entry; panics with the counters otherwise.
    pub fn wait_idle(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats();
            let active = s["connections"]["active"].as_u64().expect("active count");
            let entries: u64 = s["kernel"]["map_entries"].as_object().map_or(0, |m| {
                m.values().filter_map(serde_json::Value::as_u64).sum()
            });
            let watched = s["kernel"]["watched_sockets"].as_u64().unwrap_or(0);
            if active == 0 && entries == 0 && watched == 0 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "connections or map entries left behind: {s:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("daemon fd directory")
            .count()
    }

    /// Resident set size of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_field(&format!("/proc/{}/status", self.pid), "VmRSS:")
    }

    /// Bytes the daemon read and wrote through system calls (`/proc/PID/io` rchar + wchar).
    pub fn io_bytes(&self) -> u64 {
        let path = format!("/proc/{}/io", self.pid);
        proc_field(&path, "rchar:") + proc_field(&path, "wchar:")
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on the pid of our own child.
        assert_eq!(unsafe { libc::kill(self.pid as i32, signal) }, 0);
    }

    /// Waits for the daemon to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("daemon still owned");
        loop {
            if let Some(st) = child.try_wait().expect("wait for spliced") {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "spliced did not exit in {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let st = self.wait(Duration::from_secs(40));
        assert!(st.success(), "spliced exited with {st}:\n{}", self.log());
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- spliced log (last lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn proc_field(path: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{path} has no {key}"))
}

/// Names of the BPF programs and maps of spliced loaded in the kernel.
pub fn loaded_bpf_objects() -> Vec<String> {
    let mut found = Vec::new();
    for kind in ["prog", "map"] {
        let out = sh(&["bpftool", "-j", kind, "show"]);
        let list: serde_json::Value = serde_json::from_str(&out).expect("bpftool prints JSON");
        for item in list.as_array().into_iter().flatten() {
            let Some(name) = item["name"].as_str() else {
                continue;
            };
            let ours = name.starts_with("spliced_")
                || [
                    "SOCKS",
                    "RECV",
                    "LINKS",
                    "FLOWS",
                    "SERVICE_STATS",
                    "USER_TX",
                    "EVENTS",
                ]
                .iter()
                .any(|n| name == &n[..n.len().min(15)]);
            if ours {
                found.push(format!("{kind} {name}"));
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// A verifiable byte stream
// ---------------------------------------------------------------------------------------------

fn word(seed: u64, index: u64) -> u64 {
    // splitmix64
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic stream of bytes, named by its seed; any offset can be produced or checked.
pub struct Pattern {
    seed: u64,
    pos: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self { seed, pos: 0 }
    }

    /// Bytes produced or checked so far.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    fn byte_at(&self, at: u64) -> u8 {
        word(self.seed, at / 8).to_le_bytes()[(at % 8) as usize]
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && !self.pos.is_multiple_of(8) {
            buf[i] = self.byte_at(self.pos);
            i += 1;
            self.pos += 1;
        }
        let (words, rest) = buf[i..].as_chunks_mut::<8>();
        for c in words {
            *c = word(self.seed, self.pos / 8).to_le_bytes();
            self.pos += 8;
        }
        for b in rest {
            *b = self.byte_at(self.pos);
            self.pos += 1;
        }
    }

    /// Checks that `data` are the next bytes of the stream.
    pub fn check(&mut self, data: &[u8]) -> Result<(), String> {
        let mut expected = vec![0; data.len()];
        let start = self.pos;
        self.fill(&mut expected);
        if expected == data {
            return Ok(());
        }
        let at = expected
            .iter()
            .zip(data)
            .position(|(a, b)| a != b)
            .expect("some byte differs");
        let pos = start + at as u64;
        let found = self.locate(&data[at..]).map_or_else(String::new, |src| {
            let d = src as i64 - pos as i64;
            format!("; the bytes there are the stream's bytes from {src} ({d:+})")
        });
        Err(format!(
            "stream {:#x}: byte {pos} is {:#04x}, expected {:#04x}{found}",
            self.seed, data[at], expected[at]
        ))
    }

    /// Where in the stream (within 64 MiB of the current position) `data` comes from.
    fn locate(&self, data: &[u8]) -> Option<u64> {
        if data.len() < 16 {
            return None;
        }
        let around = self.pos / 8;
        let lo = around.saturating_sub(8 << 20);
        for shift in 0..8u64 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&data[shift as usize..shift as usize + 8]);
            let w = u64::from_le_bytes(w);
            for idx in lo..around + (8 << 20) {
                if word(self.seed, idx) == w {
                    return (idx * 8).checked_sub(shift);
                }
            }
        }
        None
    }
}

/// Writes `total` bytes of stream `seed` to `w`.
pub fn send_pattern(w: &mut impl Write, seed: u64, total: u64) -> std::io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0; 256 * 1024];
    while p.pos() < total {
        let n = (total - p.pos()).min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
    }
    Ok(())
}

/// Reads `r` to its end, checking every byte against stream `seed`; returns the byte count.
pub fn recv_pattern(r: &mut impl Read, seed: u64) -> Result<u64, String> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0; 256 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(p.pos()),
            Ok(n) => p.check(&buf[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read failed after {} bytes: {e}", p.pos())),
        }
    }
}

/// Reads exactly `n` bytes, checking them against `p`.
pub fn recv_exact_pattern(r: &mut impl Read, p: &mut Pattern, n: u64) -> Result<(), String> {
    let mut buf = vec![0; 256 * 1024];
    let end = p.pos() + n;
    while p.pos() < end {
        let want = (end - p.pos()).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("end of stream at {} of {end}", p.pos())),
            Ok(k) => p.check(&buf[..k])?,
            Err(e) => return Err(format!("read failed at {}: {e}", p.pos())),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// A listening socket on `addr` with a backlog of 4096. The standard library listens with a
/// backlog of 128, which 1000 connections opened at once overflow: the kernel then drops
/// handshakes (or answers with SYN cookies whose final ACK it drops), and those connections
/// wait for retransmissions a second or more later, or are reset. Listening again only changes
/// the backlog (the kernel caps it at `net.core.somaxconn`).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    // SAFETY: a valid listening socket.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// A TCP server in a namespace; each connection runs `handler` on its own thread.
pub struct Server {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    ns_name: String,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handler = Arc::new(handler);
        let stop2 = Arc::clone(&stop);
        let thread = ns.spawn(move || {
            let listener = listen(addr).expect("backend listens");
            ready_tx.send(()).expect("test waits");
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let h = Arc::clone(&handler);
                std::thread::spawn(move || h(conn));
            }
        });
        ready_rx.recv().expect("backend started");
        Self {
            stop,
            addr,
            ns_name: ns.name.clone(),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let ns = Netns {
            name: self.ns_name.clone(),
        };
        let addr = self.addr;
        let _ = ns
            .spawn(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            .join();
        std::mem::forget(ns);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echoes every byte with blocking reads and writes; passes the end of stream on. A read
/// error ends the echo without a FIN, so that a broken stream never looks complete.
pub fn echo(mut s: TcpStream) {
    let Ok(mut r) = s.try_clone() else { return };
    let mut buf = vec![0; 256 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Sets `SO_LINGER` to zero, so that closing `s` sends a reset.
pub fn set_reset_on_close(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a linger struct of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0);
}

/// Waits until `cond` holds, at most `limit`; returns whether it did.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// nginx from Debian, run in a namespace with a configuration of the test's own; stopped at
/// drop.
pub struct Nginx {
    child: Child,
    dir: Scratch,
}

impl Nginx {
    /// Starts nginx with `http_block` (the body of its `http { }`) in `ns`, and waits until
    /// `ready` accepts connections.
    pub fn start(ns: &Netns, http_block: &str, ready: SocketAddr) -> Self {
        let dir = Scratch::new();
        let d = dir.0.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{http_block}\n}}\n"
        );
        let conf_path = dir.0.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx config");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nginx", "-e"])
            .arg(dir.0.join("error.log"))
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx (cargo xtask setup installs it)");
        let mut n = Self { child, dir };
        let up = eventually(Duration::from_secs(10), || ns.connect(ready).is_ok());
        if !up {
            let _ = n.child.kill();
            panic!("nginx did not start:\n{}", n.error_log());
        }
        n
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Backend hosts: one namespace each, joined to the proxy's namespace by its own veth pair
/// (proxy side 10.77.i.1/24, machine side 10.77.i.2/24).
pub struct Machines {
    pub ns: Vec<Netns>,
}

impl Machines {
    pub fn new(proxy: &Netns, n: usize) -> Self {
        let ns: Vec<Netns> = (0..n).map(|i| Netns::new(&format!("m{i}"))).collect();
        for (i, m) in ns.iter().enumerate() {
            veth(
                (m, "e0", &[&format!("10.77.{i}.2/24")]),
                (proxy, &format!("vm{i}"), &[&format!("10.77.{i}.1/24")]),
            );
        }
        Self { ns }
    }

    /// Takes machine `i`'s link down (`up == false`): its packets are dropped, as when a
    /// host dies without a word. Or brings it back.
    pub fn set_up(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        sh(&["ip", "-n", &self.ns[i].name, "link", "set", "e0", state]);
    }

    /// Machine `i`'s backend address.
    pub fn backend(&self, i: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 77, i as u8, 2)), BACKEND_PORT)
    }

    /// The `[[machines]]` blocks naming them `m0`, `m1`, ...
    pub fn config(&self) -> String {
        let mut out = String::new();
        for i in 0..self.ns.len() {
            let _ = std::fmt::Write::write_fmt(
                &mut out,
                format_args!("[[machines]]\n  id = \"m{i}\"\n  address = \"10.77.{i}.2\"\n"),
            );
        }
        out
    }
}
