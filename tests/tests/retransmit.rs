//! Segments no kernel TCP sender would produce on demand: a client whose TCP is written by
//! hand, over a TUN device in the proxy's namespace, so that the test decides exactly which
//! segments the proxy's socket receives. The case: a retransmission that overlaps bytes the
//! proxy already received (TCP queues it whole; the sockmap verdict must cut the old head off,
//! not pass those bytes on twice), then a segment that is wholly old, then the end of stream.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown},
    os::fd::AsRawFd,
    sync::mpsc,
    time::{Duration, Instant},
};

use tests::{Daemon, Net, PUBLIC_PORT, Pattern, Plane, Server, Topo, eventually, recv_pattern, sh};

const TUN: &str = "spt0";
/// The proxy's address on the TUN link, and the hand-written client's.
const PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PEER_PORT: u16 = 40_000;
/// Large enough for the biggest segment below in one packet.
const TUN_MTU: usize = 65_000;
const WAIT: Duration = Duration::from_secs(10);

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

#[test]
fn sockmap_overlapping_retransmission() {
    overlapping_retransmission(Plane::Sockmap);
}

#[test]
fn copy_overlapping_retransmission() {
    overlapping_retransmission(Plane::Copy);
}

/// Stream bytes 0..10,000, then a retransmission of 2,000..30,000 (8,000 bytes old: more
/// than one trimming step of the verdict), then 30,000..40,000, then 5,000..6,000 again
/// (wholly old: TCP drops it), then FIN. The backend must get exactly 0..40,000 and EOF.
fn overlapping_retransmission(plane: Plane) {
    const TOTAL: u64 = 40_000;
    let net = Net::new(Topo::Loopback);
    let daemon = Daemon::start(&net.proxy, plane, &[]);
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let _backend = Server::start(&net.proxy, net.backend(), move |mut s| {
        let got = recv_pattern(&mut s, 9);
        let _ = s.shutdown(Shutdown::Write);
        tx.lock().expect("lock").send(got).expect("test waits");
    });
    let mut peer = Peer::connect(&net);
    if plane == Plane::Sockmap {
        // Both sockets are in the verdict map before the overlap arrives.
        assert!(
            eventually(WAIT, || daemon.stats()["kernel"]["map_entries"]["RECV"]
                == 2),
            "never spliced: {}",
            daemon.log()
        );
    }
    peer.send_stream(0, 10_000);
    peer.send_stream(2_000, 30_000);
    peer.send_stream(30_000, TOTAL);
    peer.send_stream(5_000, 6_000);
    peer.finish(TOTAL);
    let got = rx.recv_timeout(WAIT).expect("backend finished");
    assert_eq!(got, Ok(TOTAL), "{}", daemon.log());
    peer.wait_fin();
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
    if plane == Plane::Sockmap {
        let svc = &s["kernel"]["services"][0];
        assert_eq!(svc["overlaps"], 1, "{s:#}");
        assert_eq!(svc["overlap_bytes"], 8_000, "{s:#}");
        assert_eq!(svc["stream_faults"], 0, "{s:#}");
        assert_eq!(svc["bytes_to_backend"], TOTAL, "{s:#}");
    }
}

/// One TCP connection from [`PEER_IP`] to the proxy's public port, written by hand.
struct Peer {
    tun: std::fs::File,
    /// Our initial sequence number; stream byte `n` has sequence `isn + 1 + n`.
    isn: u32,
    /// The sequence number after the last one we sent.
    snd_nxt: u32,
    /// The next sequence number we expect from the proxy.
    rcv_nxt: u32,
    /// Highest acknowledgement seen, and the window that came with it.
    acked: u32,
    window: u32,
    /// The proxy sent FIN.
    fin: bool,
}

impl Peer {
    fn connect(net: &Net) -> Self {
        let tun = net.proxy.run(open_tun);
        let ns = net.proxy.name.as_str();
        let addr = format!("{PROXY_IP}/24");
        sh(&["ip", "-n", ns, "addr", "add", &addr, "dev", TUN]);
        let mtu = TUN_MTU.to_string();
        sh(&["ip", "-n", ns, "link", "set", TUN, "mtu", &mtu, "up"]);
        let isn = 0x1000_0000;
        let mut peer = Self {
            tun,
            isn,
            snd_nxt: isn,
            rcv_nxt: 0,
            acked: 0,
            window: 0,
            fin: false,
        };
        // The TUN link may take a moment to accept packets; SYN until answered.
        let deadline = Instant::now() + WAIT;
        loop {
            peer.send(isn, 0, SYN, &[]);
            if let Some(p) = peer.recv(Duration::from_millis(200))
                && p.flags & (SYN | ACK) == SYN | ACK
            {
                peer.rcv_nxt = p.seq.wrapping_add(1);
                peer.note_ack(&p);
                break;
            }
            assert!(Instant::now() < deadline, "no SYN-ACK from the proxy");
        }
        let (seq, ack) = (isn.wrapping_add(1), peer.rcv_nxt);
        peer.send(seq, ack, ACK, &[]);
        peer
    }

    fn seq(&self, offset: u64) -> u32 {
        self.isn.wrapping_add(1).wrapping_add(offset as u32)
    }

    /// Sends stream bytes `from..to` in one segment (after waiting for the window) and waits
    /// until everything up to `to` is acknowledged.
    fn send_stream(&mut self, from: u64, to: u64) {
        let mut data = vec![0; (to - from) as usize];
        let mut p = Pattern::new(9);
        let mut skip = vec![0; from as usize];
        p.fill(&mut skip);
        p.fill(&mut data);
        let end = self.seq(to);
        self.wait_for(|peer| {
            peer.window >= end.wrapping_sub(peer.acked) || !before(peer.acked, end)
        });
        let seq = self.seq(from);
        self.send(seq, self.rcv_nxt, ACK | PSH, &data);
        self.wait_for(|peer| !before(peer.acked, end));
    }

    /// Sends FIN after `total` stream bytes and waits for its acknowledgement.
    fn finish(&mut self, total: u64) {
        let (fin, ack) = (self.seq(total), self.rcv_nxt);
        self.send(fin, ack, FIN | ACK, &[]);
        let end = fin.wrapping_add(1);
        self.wait_for(|peer| !before(peer.acked, end));
    }

    /// Waits for the proxy's FIN (the backend closed) and acknowledges it.
    fn wait_fin(&mut self) {
        self.wait_for(|peer| peer.fin);
    }

    fn wait_for(&mut self, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the proxy stopped answering");
            if let Some(p) = self.recv(left) {
                self.note_ack(&p);
            }
        }
    }

    fn note_ack(&mut self, p: &Segment) {
        assert_eq!(p.flags & RST, 0, "the proxy reset the connection");
        if p.flags & ACK != 0 && !before(p.ack, self.acked) {
            self.acked = p.ack;
            self.window = u32::from(p.window);
        }
        if p.flags & FIN != 0 && p.flags & SYN == 0 {
            let fin_seq = p.seq.wrapping_add(p.len);
            if fin_seq == self.rcv_nxt {
                self.rcv_nxt = fin_seq.wrapping_add(1);
                self.fin = true;
                let (seq, ack) = (self.snd_nxt, self.rcv_nxt);
                self.send(seq, ack, ACK, &[]);
            }
        } else if p.len > 0 && p.seq == self.rcv_nxt {
            self.rcv_nxt = p.seq.wrapping_add(p.len);
        }
    }

    fn send(&mut self, seq: u32, ack: u32, flags: u8, payload: &[u8]) {
        let flag_seqs = u32::from(flags & (SYN | FIN) != 0);
        let end = seq
            .wrapping_add(payload.len() as u32)
            .wrapping_add(flag_seqs);
        if before(self.snd_nxt, end) {
            self.snd_nxt = end;
        }
        let packet = ipv4_tcp(seq, ack, flags, payload);
        let n = (&self.tun).write(&packet).expect("tun write");
        assert_eq!(n, packet.len(), "a TUN write takes a whole packet");
    }

    /// The next TCP segment from the proxy's public port to the peer, if one comes in time.
    fn recv(&mut self, limit: Duration) -> Option<Segment> {
        let deadline = Instant::now() + limit;
        let mut buf = vec![0; TUN_MTU + 100];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.tun.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&raw mut pfd, 1, left.as_millis() as i32) };
            if ready <= 0 {
                continue;
            }
            match self.tun.read(&mut buf) {
                Ok(n) => {
                    if let Some(s) = parse(&buf[..n]) {
                        return Some(s);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("tun read: {e}"),
            }
        }
    }
}

/// A TCP segment from the proxy.
struct Segment {
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    len: u32,
}

/// Serial-number comparison: `a` comes before `b`.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The part of `struct ifreq` that `TUNSETIFF` reads.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens a TUN device (no packet information header) in the calling thread's namespace.
fn open_tun() -> std::fs::File {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..TUN.len()].copy_from_slice(TUN.as_bytes());
    // SAFETY: TUNSETIFF reads and fills an ifreq-sized struct.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    // SAFETY: sets a flag on a descriptor we own.
    unsafe { libc::fcntl(tun.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    tun
}

/// An IPv4 packet from the peer to the proxy's public port.
fn ipv4_tcp(seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let options: &[u8] = if flags & SYN != 0 {
        // MSS: the whole TUN MTU.
        let mss = (TUN_MTU - 40) as u16;
        &[2, 4, (mss >> 8) as u8, mss as u8]
    } else {
        &[]
    };
    let tcp_len = 20 + options.len() + payload.len();
    let total = 20 + tcp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_TCP as u8, 0, 0]);
    p.extend_from_slice(&PEER_IP.octets());
    p.extend_from_slice(&PROXY_IP.octets());
    let sum = checksum(&p, 0);
    p[10..12].copy_from_slice(&sum.to_be_bytes());

    p.extend_from_slice(&PEER_PORT.to_be_bytes());
    p.extend_from_slice(&PUBLIC_PORT.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.push(((20 + options.len()) / 4) as u8 * 16);
    p.push(flags);
    p.extend_from_slice(&u16::MAX.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(options);
    p.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&PEER_IP.octets());
    pseudo.extend_from_slice(&PROXY_IP.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    let sum = checksum(&p[20..], sum_words(&pseudo, 0));
    p[36..38].copy_from_slice(&sum.to_be_bytes());
    p
}

fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    let (words, rest) = data.as_chunks::<2>();
    for w in words {
        sum += u32::from(u16::from_be_bytes(*w));
    }
    if let [last] = rest {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// The Internet checksum of `data`, continuing a partial sum.
fn checksum(data: &[u8], start: u32) -> u16 {
    let mut sum = sum_words(data, start);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment from the proxy's public port to the peer, from an IPv4 packet.
fn parse(p: &[u8]) -> Option<Segment> {
    if p.len() < 40 || p[0] >> 4 != 4 || p[9] != libc::IPPROTO_TCP as u8 {
        return None;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let t = p.get(ihl..total)?;
    if t.len() < 20
        || u16::from_be_bytes([t[0], t[1]]) != PUBLIC_PORT
        || u16::from_be_bytes([t[2], t[3]]) != PEER_PORT
    {
        return None;
    }
    let off = usize::from(t[12] >> 4) * 4;
    Some(Segment {
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        flags: t[13],
        window: u16::from_be_bytes([t[14], t[15]]),
        len: t.len().saturating_sub(off) as u32,
    })
}
