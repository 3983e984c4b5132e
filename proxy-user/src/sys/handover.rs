//! Passing descriptors to another process: a Unix `SOCK_SEQPACKET` pair, whose records keep
//! their bounds, each record a short message with at most [`MAX_FDS`] descriptors
//! (`SCM_RIGHTS`).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// A connected pair of `SOCK_SEQPACKET` Unix sockets, both close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into the array passed.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just made and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Most descriptors one record carries.
pub const MAX_FDS: usize = 16;
/// Space for one control message of [`MAX_FDS`] descriptors.
const CMSG_SPACE: usize = 16 + 4 * MAX_FDS;

/// Sends one record: `payload`, and `fds` with it (at most [`MAX_FDS`]).
pub fn send_record(sock: BorrowedFd<'_>, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other("too many descriptors for one record"));
    }
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u8; CMSG_SPACE];
    // SAFETY: a plain C struct, all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = (fds.len() * size_of::<RawFd>()) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        // SAFETY: the control buffer is large enough for one header and `MAX_FDS`
        // descriptors, and the header pointer is within it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    // SAFETY: every pointer in `msg` refers to a live local for the call.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one record into `buf`: its length (0 at the peer's end) and the descriptors that
/// came with it, made close-on-exec.
pub fn recv_record(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u8; CMSG_SPACE];
    // SAFETY: a plain C struct, all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: every pointer in `msg` refers to a live local for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other("a handover record was cut short"));
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled the control buffer; the macros walk it within its length,
    // and each SCM_RIGHTS message holds as many descriptors as its length says.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((usize::try_from(n).unwrap_or(0), fds))
}

/// Makes `cmd`'s child keep `fd` open across exec (it is close-on-exec here).
pub fn inherit_fd(cmd: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and calls only fcntl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The descriptor named by the environment variable `name`, now owned here, and the variable
/// removed so that no process started from here inherits it; `None` when it is not set.
pub fn take_env_fd(name: &str) -> io::Result<Option<OwnedFd>> {
    let Some(raw) = std::env::var_os(name) else {
        return Ok(None);
    };
    // SAFETY: called once, early in the daemon's start, before any thread it starts reads
    // or writes the environment.
    unsafe { std::env::remove_var(name) };
    let fd: RawFd = raw
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| io::Error::other(format!("{name}: not a descriptor number")))?;
    let mut kind: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `kind`; a descriptor that is not a socket fails.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &raw mut len,
        )
    };
    if rc != 0 || kind != libc::SOCK_SEQPACKET {
        return Err(io::Error::other(format!(
            "{name}={fd}: not the socket an upgrading spliced passes"
        )));
    }
    // SAFETY: the process that started this one passed this descriptor, a socket of the
    // handover's kind, for this one to own; nothing else here refers to it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}
