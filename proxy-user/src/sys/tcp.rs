//! A TCP socket's own view of its stream: its cookie, its byte counters (`TCP_INFO`,
//! `SIOCOUTQ`) and state, its buffers and receive memory.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use super::{setsockopt_bytes, setsockopt_int};

/// The kernel's unique id of a socket (`SO_COOKIE`); the key of every per-socket map.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid u64 for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The prefix of `struct tcp_info` (include/uapi/linux/tcp.h) that spliced reads. The kernel
/// only appends to this struct, so these offsets are stable.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    u32s_a: [u32; 4],
    u32s_b: [u32; 5],
    u32s_c: [u32; 4],
    u32s_d: [u32; 8],
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
}

const _: () = assert!(size_of::<RawTcpInfo>() == 160);
const _: () = assert!(std::mem::offset_of!(RawTcpInfo, bytes_acked) == 120);

/// What spliced needs of a TCP socket's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub state: TcpState,
    /// Bytes of this socket's output its peer has acknowledged.
    pub bytes_acked: u64,
    /// Sequence space received in order (data bytes, plus one for a FIN).
    pub bytes_received: u64,
}

/// A TCP socket's state (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    #[default]
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
    /// A value this list does not know.
    Other(u8),
}

impl TcpState {
    /// The state as `ss` names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTAB",
            Self::SynSent => "SYN-SENT",
            Self::SynRecv | Self::NewSynRecv => "SYN-RECV",
            Self::FinWait1 => "FIN-WAIT-1",
            Self::FinWait2 => "FIN-WAIT-2",
            Self::TimeWait => "TIME-WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE-WAIT",
            Self::LastAck => "LAST-ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::BoundInactive | Self::Other(_) => "UNKNOWN",
        }
    }
}

impl From<u8> for TcpState {
    fn from(v: u8) -> Self {
        match v {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            12 => Self::NewSynRecv,
            13 => Self::BoundInactive,
            other => Self::Other(other),
        }
    }
}

/// Reads [`TcpCounters`] of a TCP socket (`TCP_INFO`).
pub fn tcp_counters(fd: BorrowedFd<'_>) -> io::Result<TcpCounters> {
    let mut info = RawTcpInfo::default();
    let mut len = size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid RawTcpInfo for the kernel to fill; the
    // kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<RawTcpInfo>() {
        return Err(io::Error::other("kernel returned a short tcp_info"));
    }
    Ok(TcpCounters {
        state: TcpState::from(info.state),
        bytes_acked: info.bytes_acked,
        bytes_received: info.bytes_received,
    })
}

/// [`TcpCounters`] from a `struct tcp_info` as the kernel wrote it (`sock_diag`'s
/// `INET_DIAG_INFO`); `None` when it is too short to hold them.
pub fn counters_from_info(info: &[u8]) -> Option<TcpCounters> {
    let at = std::mem::offset_of!(RawTcpInfo, bytes_acked);
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_ne_bytes(info.get(at..at + 8)?.try_into().ok()?))
    };
    Some(TcpCounters {
        state: TcpState::from(*info.first()?),
        bytes_acked: u64_at(at)?,
        bytes_received: u64_at(at + 8)?,
    })
}

/// Bytes written to a TCP socket and not yet acknowledged (`SIOCOUTQ`).
pub fn send_queue(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int to the pointer given.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(outq).unwrap_or(0))
}

/// Bytes ever written into a TCP socket's send queue: those acknowledged, read first, plus
/// those not yet. An acknowledgement arriving between the two reads can only make this
/// smaller than the truth, never larger.
pub fn bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = tcp_counters(fd)?.bytes_acked;
    Ok(acked + send_queue(fd)?)
}

/// Bytes of the socket's input userspace has read: those received less those still queued.
/// Both are read until no byte arrived between them, so the figure is exact while nobody
/// reads the socket.
pub fn bytes_read(fd: BorrowedFd<'_>) -> io::Result<u64> {
    loop {
        let before = tcp_counters(fd)?.bytes_received;
        let mut inq: libc::c_int = 0;
        // SAFETY: SIOCINQ writes one int to the pointer given.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut inq) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if tcp_counters(fd)?.bytes_received == before {
            return Ok(before.saturating_sub(inq.max(0) as u64));
        }
    }
}

/// Sets `SO_RCVLOWAT` to 1. Beyond its meaning, the kernel runs the socket's data-ready
/// callback when it is set, which makes the verdict program take bytes that were queued
/// before the socket entered the map.
///
/// Then sends the acknowledgement TCP has pending, if any (`TCP_QUICKACK`): while the call
/// owned the socket, segments that arrived waited in its backlog, and TCP acknowledged them
/// against a window reduced by that backlog, or left the acknowledgement to its delayed-ACK
/// timer (up to 200 ms). A sender that filled that window then waited for the timer or for
/// its own window probe. The acknowledgement sent here carries the window as it is once the
/// backlog is processed; nothing is sent when nothing is pending.
pub fn poke_receive(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1)
}

/// Makes the close of each of `sockets` a reset (`SO_LINGER` of zero): for a connection
/// that cannot go on. Best effort: a socket that refuses is closed with FIN.
pub fn reset_on_close<'a>(sockets: impl IntoIterator<Item = BorrowedFd<'a>>) {
    for fd in sockets {
        socket2::SockRef::from(&fd)
            .set_linger(Some(std::time::Duration::ZERO))
            .ok();
    }
}

/// Turns Nagle's algorithm off (`TCP_NODELAY`).
pub fn set_no_delay(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// Fixes a socket's send buffer at `bytes` of payload (the kernel doubles the value for its
/// overhead), past the `net.core.wmem_max` cap when the process may (`SO_SNDBUFFORCE`).
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes)
}

/// Fixes a socket's receive buffer at `bytes` of payload (doubled by the kernel, past
/// `net.core.rmem_max` when the process may).
pub fn set_receive_buffer(fd: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes)
}

/// What a socket's receive side holds and may hold (`SO_MEMINFO`).
#[derive(Debug, Clone, Copy)]
pub struct ReceiveMemory {
    /// Memory of what it received and nobody has read yet (`sk_rmem_alloc`).
    pub held: u64,
    /// Its receive buffer (`sk_rcvbuf`).
    pub buffer: u64,
    /// Packets it dropped over its life (`sk_drops`).
    pub drops: u64,
}

/// A socket's `SO_MEMINFO`: `rmem_alloc`, `rcvbuf`, `wmem_alloc`, `sndbuf`, `fwd_alloc`,
/// `wmem_queued`, `optmem`, `backlog`, `drops`.
fn memory_info(fd: BorrowedFd<'_>) -> io::Result<[u32; 9]> {
    let mut info = [0u32; 9];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: the buffer and its length describe nine u32 for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Reads [`ReceiveMemory`] of a socket.
pub fn receive_memory(fd: BorrowedFd<'_>) -> io::Result<ReceiveMemory> {
    let info = memory_info(fd)?;
    Ok(ReceiveMemory {
        held: u64::from(info[0]),
        buffer: u64::from(info[1]),
        drops: u64::from(info[8]),
    })
}

/// Memory a socket's send queue may still take: its send buffer less what is queued
/// (`sk_sndbuf - sk_wmem_queued`), counted with the kernel's overhead per segment.
pub fn send_room(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = memory_info(fd)?;
    Ok(u64::from(info[3]).saturating_sub(u64::from(info[5])))
}

/// Makes a TCP socket with bytes in its receive queue send its peer the window it can offer
/// now, if that is more than twice the one it offered last: the kernel looks at that after
/// every read, and a peek counts as one without taking a byte. Nothing is sent when the
/// queue is empty.
pub fn offer_window(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer for the kernel to fill.
    let rc = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
    }
    Ok(())
}

/// Sets a buffer size with the `forced` option, which passes the `net.core` cap, or with
/// `plain` when the process may not.
fn set_buffer(fd: BorrowedFd<'_>, forced: i32, plain: i32, bytes: u64) -> io::Result<()> {
    let value = i32::try_from(bytes).unwrap_or(i32::MAX / 2);
    match setsockopt_int(fd, libc::SOL_SOCKET, forced, value) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt_int(fd, libc::SOL_SOCKET, plain, value)
        }
        other => other,
    }
}

/// Sets the socket's TCP congestion control by name (`TCP_CONGESTION`); the kernel refuses a
/// name it has not loaded or does not allow.
pub fn set_congestion(fd: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, name.as_bytes())
}
