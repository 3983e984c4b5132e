//! Hosts for the tests: network namespaces, veth pairs between them, and the topologies the
//! checklist runs over.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
    time::Duration,
};

use crate::{BACKEND_PORT, PUBLIC_PORT};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub(crate) fn unique(tag: &str) -> String {
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

/// Raises this process's open-file limit: some tests hold tens of thousands of sockets. To
/// what the kernel allows a process (`fs.nr_open`) where the hard limit may be raised, else
/// to the hard limit. Returns the limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let nr_open: libc::rlim_t = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .expect("fs.nr_open")
        .trim()
        .parse()
        .expect("a number");
    // SAFETY: getrlimit and setrlimit read or write only the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        let hard = lim.rlim_max;
        lim.rlim_max = hard.max(nr_open);
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
            // Without CAP_SYS_RESOURCE.
            lim.rlim_max = hard;
            lim.rlim_cur = hard;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0);
        }
    }
    lim.rlim_cur
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

/// The TCP sockets of every named network namespace as `ss` shows them (queues, memory,
/// TCP and ULP state), for the message of a test that found a stream stalled.
pub fn socket_states() -> String {
    match Command::new("ip")
        .args(["-all", "netns", "exec", "ss", "-tnmoi"])
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => format!("(no socket states: {e})"),
    }
}

/// How long a client's read waits for a byte before it fails (see [`Net::connect`]).
pub const CLIENT_STALL: Duration = Duration::from_secs(30);

/// Where the client is, as seen from the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topo {
    /// Client, proxy and backend share one namespace and talk over loopback.
    Loopback,
    /// The client is in its own namespace, joined to the proxy's by a veth pair.
    Veth,
    /// As [`Topo::Veth`], over IPv6 on both legs: the client reaches the proxy at an IPv6
    /// address, and the machine is an IPv6 one (`::1`).
    Veth6,
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
            Topo::Veth | Topo::Veth6 => {
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
            Topo::Veth6 => return self.public_v6(),
        };
        SocketAddr::new(ip, PUBLIC_PORT)
    }

    /// The proxy's public IPv6 address as the client reaches it.
    pub fn public_v6(&self) -> SocketAddr {
        let ip = match self.topo {
            Topo::Loopback => Ipv6Addr::LOCALHOST,
            Topo::Veth | Topo::Veth6 => "fd00:5::2".parse().expect("valid address"),
        };
        SocketAddr::new(IpAddr::V6(ip), PUBLIC_PORT)
    }

    /// The backend's address inside the proxy namespace.
    pub fn backend(&self) -> SocketAddr {
        let ip = match self.topo {
            Topo::Loopback | Topo::Veth => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Topo::Veth6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, BACKEND_PORT)
    }

    /// The tests' fly.toml for this topology: its one machine at [`Net::backend`]'s address.
    pub fn config(&self) -> String {
        let machine = self.backend().ip();
        format!(
            "{}\n[[machines]]\n  id = \"m\"\n  address = \"{machine}\"\n",
            crate::test_config()
        )
    }

    /// Connects a client to the proxy. Its reads fail after [`CLIENT_STALL`] without a byte,
    /// so that a stalled stream fails the test, naming where it stopped, instead of hanging it.
    pub fn connect(&self) -> TcpStream {
        let s = self
            .client()
            .connect(self.public())
            .expect("client connects to the proxy");
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(CLIENT_STALL)).ok();
        s
    }
}
