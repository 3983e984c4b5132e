//! The kernel's table of TCP sockets, read as `ss` reads it (`NETLINK_SOCK_DIAG`): each
//! socket of this network namespace by its cookie, with its `tcp_info`.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::tcp::{TcpCounters, counters_from_info};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// The attribute carrying `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;
/// `struct nlmsghdr`, `struct inet_diag_req_v2`, `struct inet_diag_msg`.
const HEADER: usize = 16;
const REQUEST: usize = 56;
const MESSAGE: usize = 72;
/// Offsets in `struct inet_diag_msg`: `id.idiag_cookie`, `id.idiag_sport` (network order).
const COOKIE_AT: usize = 44;
const SPORT_AT: usize = 4;
/// Offset of `id.idiag_src` (4 bytes of it for IPv4).
const SRC_AT: usize = 8;
/// `TCP_LISTEN` in the kernel's numbering of TCP states.
const TCP_LISTEN: u32 = 10;

/// Every TCP socket of this namespace (IPv4 and IPv6, in any state) by cookie.
pub fn tcp_sockets() -> io::Result<HashMap<u64, TcpCounters>> {
    let mut found = HashMap::new();
    each_socket(u32::MAX, |msg| {
        if let Some((cookie, counters)) = socket(msg) {
            found.insert(cookie, counters);
        }
    })?;
    Ok(found)
}

/// This namespace's listening TCP sockets (IPv4 and IPv6) on local `port`: each one's
/// cookie and local address.
pub fn listeners_on(port: u16) -> io::Result<Vec<(u64, std::net::IpAddr)>> {
    let mut found = Vec::new();
    each_socket(1 << TCP_LISTEN, |msg| {
        if msg.len() < MESSAGE || u16::from_be_bytes([msg[SPORT_AT], msg[SPORT_AT + 1]]) != port {
            return;
        }
        let src = &msg[SRC_AT..SRC_AT + 16];
        let ip = if i32::from(msg[0]) == libc::AF_INET {
            std::net::IpAddr::from([src[0], src[1], src[2], src[3]])
        } else {
            let mut v6 = [0u8; 16];
            v6.copy_from_slice(src);
            std::net::IpAddr::from(v6)
        };
        found.push((cookie(msg), ip));
    })?;
    Ok(found)
}

/// Calls `each` with every `inet_diag_msg` (and its attributes) of the TCP sockets of this
/// namespace in the states of the mask `states`.
fn each_socket(states: u32, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump(&fd, family as u8, states, &mut each)?;
    }
    Ok(())
}

/// Asks for every TCP socket of `family` in `states` with its `tcp_info`, and passes each
/// message to `each`.
fn dump(fd: &OwnedFd, family: u8, states: u32, each: &mut impl FnMut(&[u8])) -> io::Result<()> {
    let mut req = [0u8; HEADER + REQUEST];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[HEADER] = family;
    req[HEADER + 1] = libc::IPPROTO_TCP as u8;
    req[HEADER + 2] = 1 << (INET_DIAG_INFO - 1);
    req[HEADER + 4..HEADER + 8].copy_from_slice(&states.to_ne_bytes());
    // SAFETY: `req` is a complete request of its length; the kernel only reads it.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let mut at = 0;
        while at + HEADER <= n {
            let msg_len = read_u32(&buf, at) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if msg_len < HEADER || at + msg_len > n {
                return Err(io::Error::other("sock_diag: a truncated message"));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR if msg_len < HEADER + 4 => {
                    return Err(io::Error::other("sock_diag: a truncated error"));
                }
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(read_array(&buf, at + HEADER));
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => each(&buf[at + HEADER..at + msg_len]),
            }
            at += align(msg_len);
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// One `inet_diag_msg` and its attributes: the socket's cookie and counters.
fn socket(msg: &[u8]) -> Option<(u64, TcpCounters)> {
    if msg.len() < MESSAGE {
        return None;
    }
    let cookie = cookie(msg);
    let mut at = align(MESSAGE);
    while at + 4 <= msg.len() {
        let len = usize::from(u16::from_ne_bytes([msg[at], msg[at + 1]]));
        let kind = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]);
        if len < 4 || at + len > msg.len() {
            return None;
        }
        if kind == INET_DIAG_INFO {
            return Some((cookie, counters_from_info(&msg[at + 4..at + len])?));
        }
        at += align(len);
    }
    None
}

/// The socket cookie of an `inet_diag_msg` at least [`MESSAGE`] long.
fn cookie(msg: &[u8]) -> u64 {
    u64::from(read_u32(msg, COOKIE_AT)) | (u64::from(read_u32(msg, COOKIE_AT + 4)) << 32)
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(read_array(buf, at))
}

fn read_array(buf: &[u8], at: usize) -> [u8; 4] {
    let mut a = [0; 4];
    a.copy_from_slice(&buf[at..at + 4]);
    a
}
