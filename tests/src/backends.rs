//! Backends the tests run: listening helpers, a threaded server, an echo, nginx, and backend
//! hosts in namespaces of their own.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    panic::AssertUnwindSafe,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{BACKEND_PORT, Netns, Scratch, sh, veth};

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
    /// Each connection's handler thread, and what those that panicked said.
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Listens on `addr` in `ns` and runs `handler` for each connection on a thread of its
    /// own. A handler that panics fails the test when the server is dropped, with what it said.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handler = Arc::new(handler);
        let handlers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (stop2, handlers2, failures2) = (
            Arc::clone(&stop),
            Arc::clone(&handlers),
            Arc::clone(&failures),
        );
        let thread = ns.spawn(move || {
            let listener = listen(addr).expect("backend listens");
            ready_tx.send(()).expect("test waits");
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (h, failures) = (Arc::clone(&handler), Arc::clone(&failures2));
                let t = std::thread::spawn(move || {
                    if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| h(conn))) {
                        lock(&failures).push(panic_text(p.as_ref()));
                    }
                });
                // Finished handlers are joined as new ones start: an unjoined thread keeps its
                // stack mapped, and tests open tens of thousands of connections.
                let mut live = lock(&handlers2);
                let (done, running): (Vec<_>, Vec<_>) =
                    live.drain(..).partition(JoinHandle::is_finished);
                *live = running;
                live.push(t);
                drop(live);
                for d in done {
                    let _ = d.join();
                }
            }
        });
        ready_rx.recv().expect("backend started");
        Self {
            stop,
            addr,
            ns_name: ns.name.clone(),
            thread: Some(thread),
            handlers,
            failures,
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
        // Handlers still blocked on a connection the test left open are not waited for.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !lock(&self.handlers).iter().all(JoinHandle::is_finished)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let failures = lock(&self.failures);
        assert!(
            failures.is_empty() || std::thread::panicking(),
            "a backend handler failed: {failures:#?}"
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a panic said.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
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

/// Sends `msg` on `c` and asserts that it comes back, whole, through an [`echo`].
pub fn assert_echoes(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).expect("write");
    let mut got = vec![0; msg.len()];
    c.read_exact(&mut got).expect("echo");
    assert_eq!(got, msg);
}

/// An [`echo`] server at the topology's backend address.
pub fn echo_server(net: &crate::Net) -> Server {
    Server::start(&net.proxy, net.backend(), echo)
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

/// Bytes `s` has taken from its writer that its peer has not acknowledged (`SIOCOUTQ`).
pub fn unacknowledged(s: &TcpStream) -> u64 {
    queue_ioctl(s, libc::TIOCOUTQ)
}

/// Bytes `s` has received that its reader has not read (`SIOCINQ`).
pub fn unread(s: &TcpStream) -> u64 {
    queue_ioctl(s, libc::FIONREAD)
}

fn queue_ioctl(s: &TcpStream, request: libc::Ioctl) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: a queue-size ioctl on a valid socket, writing one int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), request, &raw mut n) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    u64::try_from(n).expect("a queue size")
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
