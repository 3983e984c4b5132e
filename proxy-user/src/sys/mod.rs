//! The few system calls the standard library and socket2 do not offer, by subject: TCP
//! sockets ([`tcp`]), BPF maps ([`bpf`]), epoll and tokio registration ([`epoll`]), cgroup
//! mounts ([`mount`]), machines' processes ([`process`]), the service manager ([`notify`]),
//! kernel TLS ([`ktls`]), the kernel's table of TCP sockets ([`diag`]), the daemon's user and
//! capabilities (`user`), descriptors passed to the next process on an upgrade (`handover`),
//! pipes that move bytes between sockets with splice(2) ([`Pipe`]).
//! Every `unsafe` block of the daemon lives here.

mod bpf;
pub mod diag;
mod epoll;
mod handover;
pub mod ktls;
mod mount;
mod notify;
mod pipe;
mod process;
mod tcp;
mod user;

pub use bpf::{
    map_delete, map_delete_all, map_lookup, map_update, map_update_batch, own_bpf_links, sockhash,
};
pub use epoll::{Epoll, async_readable, ev, read_pod};
pub use handover::{inherit_fd, recv_record, send_record, seqpacket_pair, take_env_fd};
pub use mount::{detach_mount, mount_cgroup2};
pub use notify::{NOTIFY_SOCKET, notify};
pub use pipe::Pipe;
pub use process::{die_with_parent, signal_group};
pub use tcp::{
    ReceiveMemory, TcpCounters, TcpState, bytes_read, bytes_written, offer_window, poke_receive,
    receive_memory, reset_on_close, send_queue, send_room, set_congestion, set_no_delay,
    set_receive_buffer, set_send_buffer, socket_cookie, tcp_counters,
};
pub use user::{Identity, become_user, lookup_user, pass_capabilities, pass_no_capabilities};

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

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

pub(crate) fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: i32,
) -> io::Result<()> {
    setsockopt_bytes(fd, level, name, &value.to_ne_bytes())
}

/// Sets a socket option whose value is `value`'s bytes.
pub(crate) fn setsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: the option value is `value`'s bytes with their length; the kernel copies them.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            libc::socklen_t::try_from(value.len()).unwrap_or(libc::socklen_t::MAX),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
