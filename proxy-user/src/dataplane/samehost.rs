//! Same-host connections: pairing the daemon's upstream socket with the application's own
//! socket, when the machine runs on this host.
//!
//! The kernel does the pairing, because the application may write the moment it accepts,
//! before userspace could know which socket is its: userspace registers the upstream socket
//! (by cookie, in `UPSTREAMS`) before it connects; the hold program records both sides of the
//! connection in `BYPASS` as the upstream gets its SYN-ACK; and the pair program, attached to
//! the applications' cgroup, puts the application's socket into `SOCKS` as it is established,
//! which is before the application can accept it. The pair program claims a pairing by
//! deleting the registration, and userspace takes it back the same way when it stops waiting,
//! so a connection is either paired before userspace looks or never.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsFd as _,
    time::Duration,
};

use proxy_common::{BYPASS_PAIRED, BYPASS_WAITING, Tuple, V4_MAPPED_WORD};
use tokio::net::TcpStream;

use super::kernel::{Kernel, MapOpError};
use crate::sys;

/// How long to wait, after the upstream connected, for the kernel to pair the application's
/// socket. It is normally paired before the connect returns; it is late when the application's
/// accept queue was full and its kernel dropped the handshake's last ACK.
const PAIR_WAIT: Duration = Duration::from_millis(100);

/// A same-host connection's entries in the kernel maps.
#[derive(Clone, Copy, Debug)]
pub struct SameHost {
    /// Cookie of the daemon's upstream socket.
    pub upstream_cookie: u64,
    /// The upstream socket's address.
    pub upstream_local: SocketAddr,
    /// The machine's address: the upstream's peer, and the application socket's own.
    pub machine: SocketAddr,
    /// Cookie of the application's socket, if it was paired.
    pub app_cookie: Option<u64>,
}

impl SameHost {
    /// The upstream socket's tuple (the application's is its reverse).
    pub fn upstream(&self) -> Tuple {
        tuple(self.upstream_local, self.machine)
    }
}

/// Whether `ip` is an address of this host (in the daemon's network namespace): one it can
/// bind to.
pub fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The [`Tuple`] of a socket bound to `local` and connected to `remote`.
pub fn tuple(local: SocketAddr, remote: SocketAddr) -> Tuple {
    fn words(ip: IpAddr) -> [u32; 4] {
        match ip {
            IpAddr::V4(v4) => [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(v4.octets())],
            IpAddr::V6(v6) => {
                let o = v6.octets();
                std::array::from_fn(|i| {
                    u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                })
            }
        }
    }
    Tuple {
        local: words(local.ip()),
        remote: words(remote.ip()),
        local_port: u32::from(local.port()),
        remote_port: u32::from(remote.port()),
    }
}

/// Why a same-host connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Map(#[from] MapOpError),
}

/// Takes a same-host connection's entries out of the maps when dropped, unless disarmed:
/// a connect that fails or is abandoned half-way leaves nothing behind.
struct Registration<'a> {
    kernel: &'a Kernel,
    cookie: u64,
    client: u64,
    tuple: Option<Tuple>,
    armed: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // A tuple that is not known yet has no BYPASS entries: the hold program writes them
        // only once the upstream is established.
        let tuple = self.tuple.unwrap_or_default();
        self.kernel.forget_bypass(self.cookie, &tuple);
        self.kernel.forget(self.client);
    }
}

/// The client of a same-host connection: its socket's cookie and the socket.
#[derive(Clone, Copy)]
pub struct Client<'a> {
    pub cookie: u64,
    pub socket: &'a TcpStream,
}

/// Connects to `addr`, a machine on this host, asking the kernel to pair the application's
/// socket with `client`; waits briefly for the pairing. The returned [`SameHost`] must be
/// handed to [`Kernel::forget_bypass`] when the connection ends.
///
/// The client's socket enters `SOCKS` first: the application may write as soon as it accepts,
/// and what it writes goes straight to the client's socket. `Ok(None)`: the client's socket
/// cannot enter the map (its client already half-closed); connect without pairing.
pub async fn connect(
    kernel: &Kernel,
    addr: SocketAddr,
    client: Client<'_>,
    service: u32,
    limit: u64,
) -> Result<Option<(TcpStream, SameHost)>, ConnectError> {
    match kernel.add_socket(client.cookie, client.socket.as_fd()) {
        Ok(()) => {}
        Err(e) if e.is_state_refusal() => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    let cookie = sys::socket_cookie(socket.as_fd())?;
    let mut registration = Registration {
        kernel,
        cookie,
        client: client.cookie,
        tuple: None,
        armed: true,
    };
    kernel.register_upstream(cookie, client.cookie, service, limit)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("upstream socket has no IP address"))?;
    let upstream = tuple(local, addr);
    registration.tuple = Some(upstream);
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e.into());
    }
    // The upstream socket of a paired connection sends no data segment (its bytes go into the
    // application's queue), so its receive window only moves with its acknowledgements. Those
    // it sends while it works through the backlog of packets that arrived while the kernel's
    // worker held its lock count that whole backlog as still in use, and the last can offer
    // less than a segment; with nothing sent after the backlog is gone, the application then
    // waits for its zero-window probe (200 ms). A fixed buffer (the kernel doubles `limit`)
    // four times the window it may offer keeps every offer above half that window.
    sys::set_receive_window(stream.as_fd(), limit, limit / 2)?;

    let app = upstream.reversed();
    let deadline = tokio::time::Instant::now() + PAIR_WAIT;
    // No entry yet counts as waiting: the socket can look connected to this task a moment
    // before the hold program, which runs right after the kernel marks it established, has
    // written the entries.
    let waiting = |e: &Option<proxy_common::Bypass>| e.is_none_or(|e| e.state == BYPASS_WAITING);
    let mut entry = kernel.bypass(&app);
    while waiting(&entry) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
        entry = kernel.bypass(&app);
    }
    if waiting(&entry) && !kernel.cancel_upstream(cookie)? {
        // The kernel claimed it meanwhile: the pair program found the entries and is running;
        // it finishes in moments.
        while waiting(&entry) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            entry = kernel.bypass(&app);
        }
    }
    let app_cookie = entry
        .filter(|e| e.state == BYPASS_PAIRED)
        .map(|e| e.app_cookie);
    registration.armed = false;
    Ok(Some((
        stream,
        SameHost {
            upstream_cookie: cookie,
            upstream_local: local,
            machine: addr,
            app_cookie,
        },
    )))
}
