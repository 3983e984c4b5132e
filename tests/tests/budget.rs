//! The buffer budget: however many connections stall at once, the kernel memory of the
//! daemon's sockets stays within what the host gives TCP before memory pressure, where the
//! kernel starts to shrink every socket's buffers and to drop packets. 10,000 clients (fewer
//! where the open-file limit cannot be raised so far: the daemon holds two sockets for each)
//! push into machines that do not read, on each data plane; the host's TCP memory is read while they
//! are all held back, then every byte arrives once the machines read, and the bound each
//! connection keeps grows back when they are gone.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use tests::{MAX_BUFFER, Netns, Pattern, Plane, Topo, setup_with, sh};

/// Connections, where the open-file limit allows them.
const CONNECTIONS: usize = 10_000;
/// Descriptors the daemon and the test hold besides two per connection.
const OTHER_FDS: u64 = 200;
/// The clients' send buffers and the machines' receive buffers (payload; the kernel doubles
/// it): small, so that what the host's TCP memory holds is mostly the daemon's.
const END_BUFFER: i32 = 4096;
/// The smallest bound the budget gives (`MIN_BOUND` in the daemon).
const MIN_BOUND: u64 = 16 * 1024;

#[test]
fn sockmap_ten_thousand_stalled_connections() {
    ten_thousand_stalled_connections(Plane::Sockmap);
}

#[test]
fn copy_ten_thousand_stalled_connections() {
    ten_thousand_stalled_connections(Plane::Copy);
}

fn ten_thousand_stalled_connections(plane: Plane) {
    // The daemon inherits this limit.
    let limit = tests::raise_fd_limit();
    let connections = CONNECTIONS.min(usize::try_from((limit - OTHER_FDS) / 2).expect("fds"));
    let (net, daemon) = setup_with(plane, Topo::Loopback, &["--idle-timeout", "0"]);
    let s = daemon.stats();
    let budget = s["buffers"]["budget"].as_u64().expect("budget");
    assert_eq!(s["buffers"]["bound"], MAX_BUFFER, "{s:#}");
    let pressure = tcp_mem()[1];
    assert!(
        budget <= pressure * page() / 2,
        "the default budget {budget} B is more than half the pressure threshold {pressure} pages"
    );
    let pressures_before = memory_pressures(&net.proxy);
    let (backend, public) = (net.backend(), net.public());
    let proxy = &net.proxy;
    let (mut clients, sinks) = proxy.run(move || connect_all(backend, public, connections));

    // Every client pushes until TCP holds it back; then again, after a pause.
    let mut peak = 0;
    for _ in 0..2 {
        while push_round(&mut clients) > 0 {
            peak = peak.max(tcp_pages());
        }
        std::thread::sleep(Duration::from_secs(1));
        peak = peak.max(tcp_pages());
    }
    let pushed: u64 = clients.iter().map(|c| c.pushed).sum();
    let s = daemon.stats();
    eprintln!(
        "budget {plane}: {connections} connections pushed {pushed} B; TCP memory at most {peak} \
         pages (pressure at {pressure}); budget {budget} B; bound {}",
        s["buffers"]["bound"]
    );
    assert_eq!(s["buffers"]["connections"], connections as u64, "{s:#}");
    let bound = s["buffers"]["bound"].as_u64().expect("bound");
    assert!(
        bound <= (budget / (5 * connections as u64)).max(MIN_BOUND),
        "bound {bound} B for {connections} connections in {budget} B"
    );
    assert!(
        peak < pressure,
        "TCP memory reached {peak} pages, pressure at {pressure}"
    );
    assert_eq!(
        memory_pressures(&net.proxy),
        pressures_before,
        "the host went into TCP memory pressure"
    );
    // Each client pushed more than its own and its machine's buffers hold (8 KiB of memory
    // each): the daemon holds some of every stream.
    let least = clients.iter().map(|c| c.pushed).min().expect("clients");
    assert!(least > 32 * 1024, "a client pushed only {least} B");

    read_back(&clients, sinks);
    drop(clients);
    let s = daemon.wait_idle();
    assert_eq!(s["buffers"]["connections"], 0, "{s:#}");
    assert_eq!(s["buffers"]["bound"], MAX_BUFFER, "{s:#}");
    drop(daemon);
}

/// One client: its stream is its index (8 bytes), then the pattern of that seed.
struct Client {
    s: TcpStream,
    index: u64,
    p: Pattern,
    chunk: Vec<u8>,
    off: usize,
    pushed: u64,
}

impl Client {
    /// Writes what the connection takes now; how much.
    fn push(&mut self) -> u64 {
        let mut wrote = 0;
        loop {
            if self.off == self.chunk.len() {
                self.chunk.resize(16 * 1024, 0);
                self.p.fill(&mut self.chunk);
                self.off = 0;
            }
            match self.s.write(&self.chunk[self.off..]) {
                Ok(n) => {
                    self.off += n;
                    self.pushed += n as u64;
                    wrote += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return wrote,
                Err(e) => panic!("client {}: {e}", self.index),
            }
        }
    }
}

/// Bytes all clients wrote in one pass.
fn push_round(clients: &mut [Client]) -> u64 {
    clients.iter_mut().map(Client::push).sum()
}

/// Connects `connections` clients through the proxy to a machine that accepts them all and
/// reads nothing; the machine's sockets in order of acceptance.
fn connect_all(
    backend: SocketAddr,
    public: SocketAddr,
    connections: usize,
) -> (Vec<Client>, Vec<TcpStream>) {
    let listener = TcpListener::bind(backend).expect("machine listens");
    set_buffer(&listener, libc::SO_RCVBUF);
    // SAFETY: a valid listening socket.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 4096) }, 0);
    let accepting = std::thread::spawn(move || {
        (0..connections)
            .map(|_| listener.accept().expect("accept").0)
            .collect::<Vec<_>>()
    });
    let clients = (0..connections as u64)
        .map(|index| {
            let s = TcpStream::connect_timeout(&public, Duration::from_secs(10)).expect("connect");
            set_buffer(&s, libc::SO_SNDBUF);
            s.set_nonblocking(true).expect("nonblocking");
            Client {
                s,
                index,
                p: Pattern::new(index),
                chunk: index.to_le_bytes().to_vec(),
                off: 0,
                pushed: 0,
            }
        })
        .collect();
    (clients, accepting.join().expect("accepting"))
}

fn set_buffer(s: &impl AsRawFd, option: i32) {
    let value: i32 = END_BUFFER;
    // SAFETY: setsockopt with an int value on a valid socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// Half-closes every client, reads every machine's socket to its end, and checks each stream
/// byte-exact and as long as its client pushed (the unwritten rest of a chunk is not part of
/// it).
fn read_back(clients: &[Client], sinks: Vec<TcpStream>) {
    for c in clients {
        c.s.shutdown(Shutdown::Write).expect("half-close");
    }
    let mut readers: Vec<Reader> = sinks.into_iter().map(Reader::new).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while readers.iter().any(|r| !r.ended) {
        assert!(
            Instant::now() < deadline,
            "streams did not end: {} left",
            readers.iter().filter(|r| !r.ended).count()
        );
        let mut fds: Vec<libc::pollfd> = readers
            .iter()
            .filter(|r| !r.ended)
            .map(|r| libc::pollfd {
                fd: r.s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        for r in readers.iter_mut().filter(|r| !r.ended) {
            r.read();
        }
    }
    let mut got: Vec<(u64, u64)> = readers
        .iter()
        .map(|r| {
            (
                r.index.expect("a stream's index"),
                r.p.as_ref().map_or(0, Pattern::pos),
            )
        })
        .collect();
    got.sort_unstable();
    for (i, (index, n)) in got.into_iter().enumerate() {
        assert_eq!(index, i as u64, "every stream arrives once");
        // Its pattern is what the client pushed after the index.
        assert_eq!(n + 8, clients[i].pushed, "stream {i}");
    }
}

/// A machine's socket read to its end: its stream's index first, then its pattern.
struct Reader {
    s: TcpStream,
    head: Vec<u8>,
    index: Option<u64>,
    p: Option<Pattern>,
    ended: bool,
}

impl Reader {
    fn new(s: TcpStream) -> Self {
        s.set_nonblocking(true).expect("nonblocking");
        Self {
            s,
            head: Vec::new(),
            index: None,
            p: None,
            ended: false,
        }
    }

    fn read(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => {
                    self.ended = true;
                    return;
                }
                Ok(n) => self.take(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => panic!("stream {:?}: {e}", self.index),
            }
        }
    }

    fn take(&mut self, mut data: &[u8]) {
        if self.index.is_none() {
            let want = (8 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..want]);
            data = &data[want..];
            if self.head.len() < 8 {
                return;
            }
            let index = u64::from_le_bytes(self.head[..8].try_into().expect("8 bytes"));
            self.index = Some(index);
            self.p = Some(Pattern::new(index));
        }
        if let Some(p) = &mut self.p {
            p.check(data)
                .unwrap_or_else(|e| panic!("stream {:?}: {e}", self.index));
        }
    }
}

/// `net.ipv4.tcp_mem`, in pages.
fn tcp_mem() -> [u64; 3] {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").expect("tcp_mem");
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|v| v.parse().expect("pages"))
        .collect();
    [v[0], v[1], v[2]]
}

fn page() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size")
}

/// Pages of memory every TCP socket of the host holds now (`/proc/net/sockstat`).
fn tcp_pages() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").expect("sockstat");
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .expect("a TCP line");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "mem").expect("mem");
    words[at + 1].parse().expect("pages")
}

/// Times TCP entered memory pressure, as counted in `ns` (`TCPMemoryPressures`).
fn memory_pressures(ns: &Netns) -> u64 {
    let text = sh(&["ip", "netns", "exec", &ns.name, "cat", "/proc/net/netstat"]);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("names"), lines.next().expect("values"));
    let at = names
        .split_whitespace()
        .position(|n| n == "TCPMemoryPressures")
        .expect("TCPMemoryPressures");
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .expect("a count")
}
