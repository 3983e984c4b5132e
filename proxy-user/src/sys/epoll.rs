//! epoll for the socket lifecycle watcher, and registering descriptors with tokio.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

/// An epoll instance that learns of end-of-stream and errors on spliced sockets, and of
/// input and room on those whose bytes userspace carries.
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
    /// Bytes to read.
    pub const IN: u32 = libc::EPOLLIN as u32;
    /// Room to write.
    pub const OUT: u32 = libc::EPOLLOUT as u32;
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
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, 0)
    }

    /// Watches `fd` as [`Self::add`] does, and also for the readiness in `extra` (`ev::IN`,
    /// `ev::OUT`). Each call re-arms: the kernel polls the socket at once, so an event comes
    /// now if it is ready already, and a TCP socket found without room is marked to report
    /// the room it gets next.
    pub fn modify(&self, fd: BorrowedFd<'_>, token: u64, extra: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, extra)
    }

    fn ctl(&self, op: libc::c_int, fd: BorrowedFd<'_>, token: u64, extra: u32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32 | extra,
            u64: token,
        };
        // SAFETY: both fds are valid for the duration of the call; the event is initialised.
        let rc =
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd.as_raw_fd(), &raw mut event) };
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
