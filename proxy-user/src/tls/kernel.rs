//! Kernel TLS: after rustls's handshake, a `tls` port hands the session's keys and sequence
//! numbers to the kernel, which from then on decrypts what the client sends and encrypts what
//! it is sent, while the daemon reads and writes plaintext on the client's own socket.
//!
//! The handshake reads the client's socket one TLS record at a time ([`Records`]), so that
//! rustls never holds bytes of a record after the handshake: every byte the kernel has not
//! seen is still in the socket when the keys are handed over.

use std::{
    io,
    os::fd::AsFd as _,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll, ready},
};

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;

use crate::sys::ktls::{self, CryptoInfo};

/// Why kernel TLS cannot be used on this host, or `None` when it can. Asked once.
pub fn unavailable() -> Option<&'static str> {
    static FOUND: OnceLock<Option<String>> = OnceLock::new();
    FOUND.get_or_init(probe).as_deref()
}

/// Asks the kernel for its `tls` upper-layer protocol on a socket that is not connected: it
/// answers `ENOTCONN` when it has it (loading the module if need be), `ENOENT` when not.
fn probe() -> Option<String> {
    let s = match socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) {
        Ok(s) => s,
        Err(e) => return Some(format!("no TCP socket to probe with: {e}")),
    };
    match ktls::set_ulp(s.as_fd()) {
        Ok(()) => None,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => None,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            Some("the kernel has no TLS (CONFIG_TLS, module tls)".to_owned())
        }
        Err(e) => Some(format!("TCP_ULP tls: {e}")),
    }
}

/// Whether a socket in a socket map can take kernel TLS keys, which the sockmap plane would
/// need to redirect a machine's bytes into a session's client socket (a socket that has TLS
/// cannot join a map). `Err` says which step the kernel refused. Tried on a loopback pair
/// with throwaway keys.
pub fn with_socket_maps() -> Result<(), String> {
    fn step(what: &'static str) -> impl Fn(io::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    if let Some(why) = unavailable() {
        return Err(why.to_owned());
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(step("loopback"))?;
    let addr = listener.local_addr().map_err(step("loopback"))?;
    let _client = std::net::TcpStream::connect(addr).map_err(step("loopback"))?;
    let (server, _) = listener.accept().map_err(step("loopback"))?;
    let map = crate::sys::sockhash(1).map_err(step("a SOCKHASH"))?;
    let fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&server)).unwrap_or(u32::MAX);
    crate::sys::map_update(map.as_fd(), &0u64, &fd, 0).map_err(step("joining the map"))?;
    let keys = CryptoInfo {
        version: 0x0304,
        cipher: 51,
        iv: vec![0; 8],
        key: vec![0; 16],
        salt: vec![0; 4],
        seq: 0,
    };
    ktls::set_ulp(server.as_fd()).map_err(step("TCP_ULP"))?;
    ktls::set_keys(server.as_fd(), &keys, &keys).map_err(step("then the keys"))
}

/// Why a session could not be handed to the kernel; the client is reset.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("TLS records still to be sent: {0}")]
    Flush(#[source] io::Error),
    #[error("the client ended its stream inside a TLS record")]
    ReadPast,
    #[error("the client left a TLS record unfinished for the handshake's time")]
    TimedOut,
    #[error("kernel TLS has no {0}")]
    Unsupported(String),
    #[error("the session's secrets: {0}")]
    Secrets(#[source] rustls::Error),
    #[error("the kernel refused the session: {0}")]
    Kernel(#[source] io::Error),
}

/// Hands the session of `stream`, whose handshake is complete, to the kernel: the client's
/// socket, now read and written in plaintext, and any plaintext rustls had already decrypted.
pub async fn hand_over(
    mut stream: TlsStream<Records<TcpStream>>,
) -> Result<(TcpStream, Vec<u8>), HandoverError> {
    // Records rustls still holds (TLS 1.3's session tickets) go out under its keys first.
    stream.flush().await.map_err(HandoverError::Flush)?;
    // The handshake reads on after the client's Finished until a read would block, so it may
    // have stopped inside the client's first record of data: rustls reads that record to its
    // end, and its plaintext goes first, before what it holds of earlier records.
    let mut early = Vec::new();
    let mut buf = [0u8; 4096];
    while !stream.get_ref().0.at_boundary() {
        match stream.read(&mut buf).await {
            Ok(0) => return Err(HandoverError::ReadPast),
            Ok(n) => early.extend_from_slice(&buf[..n]),
            Err(e) => return Err(HandoverError::Kernel(e)),
        }
    }
    let (records, mut conn) = stream.into_inner();
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_2) => 0x0303,
        Some(ProtocolVersion::TLSv1_3) => 0x0304,
        v => return Err(HandoverError::Unsupported(format!("{v:?}"))),
    };
    loop {
        match io::Read::read(&mut conn.reader(), &mut buf) {
            Ok(0) => break,
            Ok(n) => early.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(HandoverError::Kernel(e)),
        }
    }
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "cipher suite".to_owned(), |s| format!("{:?}", s.suite()));
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(HandoverError::Secrets)?;
    let tx = crypto_info(version, &suite, secrets.tx)?;
    let rx = crypto_info(version, &suite, secrets.rx)?;
    let socket = records.into_inner();
    ktls::set_ulp(socket.as_fd())
        .map_err(|e| HandoverError::Kernel(io::Error::new(e.kind(), format!("TCP_ULP: {e}"))))?;
    ktls::set_keys(socket.as_fd(), &tx, &rx).map_err(HandoverError::Kernel)?;
    Ok((socket, early))
}

/// The kernel's description of one direction: GCM's 12-byte nonce is a 4-byte salt and an
/// 8-byte IV there; ChaCha20-Poly1305's is all IV.
fn crypto_info(
    version: u16,
    suite: &str,
    (seq, secrets): (u64, ConnectionTrafficSecrets),
) -> Result<CryptoInfo, HandoverError> {
    let (cipher, key, iv, salt_len) = match &secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (51, key.as_ref(), iv.as_ref(), 4),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (52, key.as_ref(), iv.as_ref(), 4),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (54, key.as_ref(), iv.as_ref(), 0)
        }
        _ => return Err(HandoverError::Unsupported(suite.to_owned())),
    };
    let (salt, iv) = iv.split_at(salt_len);
    Ok(CryptoInfo {
        version,
        cipher,
        iv: iv.to_vec(),
        key: key.to_vec(),
        salt: salt.to_vec(),
        seq,
    })
}

/// A client's socket read, while `exact`, no further than the end of the TLS record being
/// read: a 5-byte header, then as many bytes as it announces. Writes pass through.
pub struct Records<IO> {
    io: IO,
    exact: bool,
    header: [u8; 5],
    /// Bytes of `header` read so far; 0 between records.
    header_read: usize,
    /// Bytes of the current record's body still to read.
    body_left: usize,
}

impl<IO> Records<IO> {
    pub fn new(io: IO, exact: bool) -> Self {
        Self {
            io,
            exact,
            header: [0; 5],
            header_read: 0,
            body_left: 0,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    pub fn into_inner(self) -> IO {
        self.io
    }

    /// Whether everything read so far ends a record.
    fn at_boundary(&self) -> bool {
        !self.exact || (self.header_read == 0 && self.body_left == 0)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Records<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.exact {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let limit = if this.body_left > 0 {
            this.body_left
        } else {
            this.header.len() - this.header_read
        };
        let mut part = buf.take(limit);
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        if this.body_left > 0 {
            this.body_left -= n;
        } else {
            this.header[this.header_read..this.header_read + n].copy_from_slice(part.filled());
            this.header_read += n;
            if this.header_read == this.header.len() {
                this.header_read = 0;
                this.body_left = usize::from(u16::from_be_bytes([this.header[3], this.header[4]]));
            }
        }
        // SAFETY: `part` is the unfilled part of `buf`, and the reader initialised and filled
        // its first `n` bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Records<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
