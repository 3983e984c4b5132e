//! The few socket calls the standard library and socket2 do not offer: socket cookies,
//! `TCP_INFO` byte counters, `SIOCOUTQ`, the `SO_RCVLOWAT` poke, and epoll for the lifecycle
//! watcher, and registering such descriptors with tokio. Every `unsafe` block of the daemon
//! lives here.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

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
    /// `TCP_ESTABLISHED` (1), `TCP_CLOSE` (7), ...
    pub state: u8,
    /// Bytes of this socket's output its peer has acknowledged.
    pub bytes_acked: u64,
    /// Sequence space received in order (data bytes, plus one for a FIN).
    pub bytes_received: u64,
    /// Bytes written to the socket and not yet acknowledged (`SIOCOUTQ`), read after the rest.
    pub outq: u64,
}

impl TcpCounters {
    /// Bytes ever written into this socket's send queue.
    ///
    /// `bytes_acked` is read before `outq`, so an acknowledgement arriving between the two
    /// reads can only make this smaller than the truth, never larger.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_acked + self.outq
    }
}

/// The TCP state value for a closed socket.
pub const TCP_CLOSE: u8 = 7;

/// Reads [`TcpCounters`] of a TCP socket.
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
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int to the pointer given.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpCounters {
        state: info.state,
        bytes_acked: info.bytes_acked,
        bytes_received: info.bytes_received,
        outq: u64::try_from(outq).unwrap_or(0),
    })
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of the kernel's activity stamps
/// (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the kernel fills the timespec passed; the clock id is valid on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC_COARSE exists on every Linux");
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Sets `SO_RCVLOWAT` to 1. Beyond its meaning, the kernel runs the socket's data-ready
/// callback when it is set, which makes the verdict program take bytes that were queued
/// before the socket entered the map.
pub fn poke_receive(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
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

/// Reads [`ReceiveMemory`] of a socket.
pub fn receive_memory(fd: BorrowedFd<'_>) -> io::Result<ReceiveMemory> {
    // SK_MEMINFO_VARS: rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued,
    // optmem, backlog, drops.
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
    Ok(ReceiveMemory {
        held: u64::from(info[0]),
        buffer: u64::from(info[1]),
        drops: u64::from(info[8]),
    })
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

/// The pending error of a socket (`SO_ERROR`), which reading clears.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid int for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the option value is a valid int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An epoll instance used only to learn of end-of-stream and errors on spliced sockets.
pub struct Epoll {
    fd: OwnedFd,
}

/// Bits of an epoll event.
pub mod ev {
    /// The peer shut down its writing half (FIN received).
    pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
    /// Both halves are shut down, or the socket is closed.
    pub const HUP: u32 = libc::EPOLLHUP as u32;
    /// An error is pending.
    pub const ERR: u32 = libc::EPOLLERR as u32;
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; on success it returns a new fd that we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for FIN, hang-up and errors only, edge-triggered. Not asking for `EPOLLIN`
    /// keeps the daemon asleep while the kernel moves bytes through the socket.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: both fds are valid for the duration of the call; the event is initialised.
        let rc = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &raw mut event,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: both fds are valid for the duration of the call; a null event is allowed.
        let rc = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Collects ready events without blocking into `out` as `(token, events)`.
    pub fn poll_now(&self, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            // SAFETY: the buffer holds `events.len()` initialised entries for the kernel to fill.
            let n = unsafe {
                libc::epoll_wait(
                    self.fd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let n = n as usize;
            out.extend(events[..n].iter().map(|e| (e.u64, e.events)));
            if n < events.len() {
                return Ok(());
            }
        }
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Registers a descriptor-owning value with the tokio reactor for readability.
pub fn async_readable<T: AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor and moves into the AsyncFd, which keeps it until the
    // registration is dropped; nothing else closes or replaces that descriptor meanwhile.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}

/// Reads a plain-integer `T` from the start of `bytes`, if long enough.
pub fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `T: Pod` is valid for any bit pattern, the length was checked, and
    // read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// `dir` as a C string for the mount calls.
fn c_path(dir: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Mounts the cgroup v2 file system on `dir`.
pub fn mount_cgroup2(dir: &std::path::Path) -> io::Result<()> {
    let target = c_path(dir)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; no data.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the mount on `dir` (lazily: open files inside stay usable).
pub fn detach_mount(dir: &std::path::Path) -> io::Result<()> {
    let target = c_path(dir)?;
    // SAFETY: the pointer is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
