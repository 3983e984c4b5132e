//! Kernel TLS (include/uapi/linux/tls.h): the `tls` upper-layer protocol on a TCP socket,
//! its keys for each direction, and records of a type other than application data, which
//! the kernel passes in control messages.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use super::setsockopt_bytes;

const SOL_TLS: i32 = 282;
const TLS_TX: i32 = 1;
const TLS_RX: i32 = 2;
const TLS_SET_RECORD_TYPE: i32 = 1;
const TLS_GET_RECORD_TYPE: i32 = 2;

/// A TLS record's content type (RFC 8446, 5.1).
pub const RECORD_ALERT: u8 = 21;
pub const RECORD_HANDSHAKE: u8 = 22;
pub const RECORD_DATA: u8 = 23;

/// The cipher of a direction, as `struct tls12_crypto_info_*` lays it out: the version and
/// cipher ids, then `iv`, `key`, `salt` and `rec_seq`, all bytes (no padding).
pub struct CryptoInfo {
    /// `TLS_1_2_VERSION` (0x0303) or `TLS_1_3_VERSION` (0x0304).
    pub version: u16,
    /// `TLS_CIPHER_AES_GCM_128` (51), `_AES_GCM_256` (52), `_CHACHA20_POLY1305` (54).
    pub cipher: u16,
    pub iv: Vec<u8>,
    pub key: Vec<u8>,
    pub salt: Vec<u8>,
    /// The sequence number of the next record.
    pub seq: u64,
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        self.key.fill(0);
        self.iv.fill(0);
        self.salt.fill(0);
    }
}

impl CryptoInfo {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4 + self.iv.len() + self.key.len() + self.salt.len() + 8);
        b.extend_from_slice(&self.version.to_ne_bytes());
        b.extend_from_slice(&self.cipher.to_ne_bytes());
        b.extend_from_slice(&self.iv);
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.salt);
        b.extend_from_slice(&self.seq.to_be_bytes());
        b
    }
}

/// Sets the `tls` upper-layer protocol on `fd`. On a socket that is not connected, `ENOTCONN`
/// says the kernel has it and `ENOENT` that it has not (nor can load it).
pub fn set_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_ULP, b"tls")
}

/// Hands the keys of both directions to the kernel: from here on the socket reads and writes
/// plaintext, and the kernel encrypts and decrypts the records.
pub fn set_keys(fd: BorrowedFd<'_>, tx: &CryptoInfo, rx: &CryptoInfo) -> io::Result<()> {
    for (name, option, info) in [("TLS_TX", TLS_TX, tx), ("TLS_RX", TLS_RX, rx)] {
        let mut bytes = info.bytes();
        let set = setsockopt_bytes(fd, SOL_TLS, option, &bytes);
        bytes.fill(0);
        set.map_err(|e| io::Error::new(e.kind(), format!("{name}: {e}")))?;
    }
    Ok(())
}

/// Reads decrypted bytes of records of one type, without waiting: how many, and the type.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, u8)> {
    // Room for one control message of one byte, aligned as the kernel writes it.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: the header points at `buf` and `control`, both live and of the lengths given.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut kind = RECORD_DATA;
    // SAFETY: the kernel filled `msg_control` up to `msg_controllen`; the CMSG macros walk it
    // within those bounds.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE {
                kind = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n, kind))
}

/// Sends one record of type `kind` holding `payload`, without waiting.
pub fn send_record(fd: BorrowedFd<'_>, kind: u8, payload: &[u8]) -> io::Result<usize> {
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a length.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as usize;
    // SAFETY: `control` is larger than CMSG_SPACE(1) and aligned for a cmsghdr; the header
    // and its one data byte are written within it; the kernel only reads `payload`.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(c) = kind;
        libc::sendmsg(
            fd.as_raw_fd(),
            &raw const msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
