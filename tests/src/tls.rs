//! TLS for the tests: a certificate authority of the test's own and certificates it signs,
//! written as `spliced run --certs` reads them; a fly.toml whose port terminates TLS;
//! `openssl s_client` as the client that reports what it was served; and a Rust client
//! (tokio-rustls) that moves a checked stream through the TLS port.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{BACKEND_PORT, Netns, PUBLIC_PORT, Pattern};

/// A certificate authority that signs the tests' certificates; its certificate is `ca.pem`
/// in the directory it was made in.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub path: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "spliced test CA");
        let cert = params.self_signed(&key).expect("CA certificate");
        let path = dir.join("ca.pem");
        std::fs::write(&path, cert.pem()).expect("write ca.pem");
        Self {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
            path,
        }
    }

    /// Writes a certificate for `names` with common name `cn` as `dir/stem.pem`, its key
    /// after it (`separate_key`: in `dir/stem.key` instead).
    pub fn issue(&self, dir: &Path, stem: &str, cn: &str, names: &[&str], separate_key: bool) {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let cert_path = dir.join(format!("{stem}.pem"));
        if separate_key {
            std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).expect("key");
            std::fs::write(cert_path, cert.pem()).expect("certificate");
        } else {
            std::fs::write(cert_path, cert.pem() + &key.serialize_pem()).expect("certificate");
        }
    }
}

/// The tests' fly.toml with its one port given `handlers` and, if not empty, the body of its
/// `tls_options` table; the machine at `machine`.
pub fn tls_config(handlers: &[&str], tls_options: &str, machine: SocketAddr) -> String {
    let handlers: Vec<String> = handlers.iter().map(|h| format!("\"{h}\"")).collect();
    let options = if tls_options.is_empty() {
        String::new()
    } else {
        format!("    [services.ports.tls_options]\n{tls_options}\n")
    };
    assert_eq!(machine.port(), BACKEND_PORT, "the config's internal port");
    format!(
        "app = \"spliced-test\"\n\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n\n  \
         [[services.ports]]\n    port = {PUBLIC_PORT}\n    handlers = [{}]\n{options}\n\
         [[machines]]\n  id = \"m\"\n  address = \"{}\"\n",
        handlers.join(", "),
        machine.ip()
    )
}

/// What `openssl s_client` reported about one handshake.
#[derive(Debug)]
pub struct Handshake {
    /// Whether a session was established.
    pub ok: bool,
    /// The common name of the certificate served, if any.
    pub subject_cn: Option<String>,
    /// The verification result code (0: the chain verifies for the name asked).
    pub verify_code: Option<u32>,
    pub alpn: Option<String>,
    pub protocol: Option<String>,
    /// Everything `s_client` printed, for failure messages.
    pub output: String,
}

/// Runs `openssl s_client` from `ns` to `addr` with `args` (such as `-servername NAME`,
/// `-alpn h2`, `-tls1_2`, `-starttls postgres`), checking the chain against `ca`, then closes.
pub fn s_client(ns: &Netns, addr: SocketAddr, ca: &Path, args: &[&str]) -> Handshake {
    let out = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "timeout", "20", "openssl", "s_client",
        ])
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-CAfile")
        .arg(ca)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client (Debian's openssl)");
    let output =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let field = |prefix: &str| {
        output
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
    };
    let subject_cn = output
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .and_then(|s| s.split("CN").nth(1))
        .map(|cn| cn.trim_start_matches([' ', '=']).trim().to_owned());
    Handshake {
        ok: out.status.success() && output.contains("BEGIN CERTIFICATE"),
        subject_cn,
        verify_code: field("Verify return code:")
            .and_then(|v| v.split_whitespace().next().and_then(|c| c.parse().ok())),
        alpn: field("ALPN protocol:"),
        protocol: field("Protocol:").or_else(|| field("Protocol  :")),
        output,
    }
}

/// A rustls client configuration that trusts `ca_pem` only.
pub fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    client_config_for(ca_pem, rustls::ALL_VERSIONS, None)
}

/// A rustls client configuration that trusts `ca_pem` only and offers `versions` and, if
/// given, one cipher suite only.
pub fn client_config_for(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suite: Option<rustls::SupportedCipherSuite>,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Whether this kernel has TLS, asked as the kernel documents it: the `tls` upper-layer
/// protocol on a TCP socket that is not connected is refused with `ENOTCONN` where the kernel
/// has it, `ENOENT` where it has not. Where `SPLICED_TEST_KERNEL_TLS` is set (a guest on
/// Debian's kernels), a kernel without it fails the test instead of being tested as one.
pub fn kernel_has_tls() -> bool {
    let s = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP socket");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    // A listening socket answers as an unconnected one does: ENOTCONN, or ENOENT.
    // SAFETY: the option value is three bytes that live across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_ULP,
            b"tls".as_ptr().cast(),
            3,
        )
    };
    let err = std::io::Error::last_os_error().raw_os_error();
    assert!(rc != 0, "TCP_ULP tls set on a listening socket");
    let has = match err {
        Some(libc::ENOTCONN) => true,
        Some(libc::ENOENT) => false,
        e => panic!("TCP_ULP tls: unexpected errno {e:?}"),
    };
    assert!(
        has || std::env::var_os("SPLICED_TEST_KERNEL_TLS").is_none(),
        "SPLICED_TEST_KERNEL_TLS is set, but this kernel has no TLS (TCP_ULP tls: ENOENT)"
    );
    has
}

/// Over TLS to `name` through `conn` (already connected; `clear`: bytes written in the clear
/// first, and the one byte answer expected, as PostgreSQL's `SSLRequest` and `S`), sends
/// `total` bytes of stream `seed` while reading them back from an echo, checks every byte,
/// then ends the stream (`close_notify`) and expects the echo's end. Returns an error naming
/// where the stream went wrong.
pub fn echo_through_tls(
    mut conn: std::net::TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: &str,
    clear: Option<(&[u8], u8)>,
    seed: u64,
    total: u64,
) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let name =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(crate::CLIENT_STALL))
        .and_then(|()| conn.set_write_timeout(Some(crate::CLIENT_STALL)))
        .map_err(|e| e.to_string())?;
    if let Some((bytes, answer)) = clear {
        conn.write_all(bytes).map_err(|e| e.to_string())?;
        let mut got = [0u8];
        conn.read_exact(&mut got)
            .map_err(|e| format!("preface answer: {e}"))?;
        if got[0] != answer {
            return Err(format!("preface answered {:?}, not {answer:?}", got[0]));
        }
    }
    let mut tls = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    tls.complete_io(&mut conn)
        .map_err(|e| format!("handshake: {e}"))?;
    // Each chunk is encrypted whole, then written out before the next.
    tls.set_buffer_limit(None);
    // One thread each way; the session is shared, never locked across a socket call.
    let tls = Arc::new(std::sync::Mutex::new(tls));
    let sender = {
        let (tls, conn) = (
            Arc::clone(&tls),
            conn.try_clone().map_err(|e| e.to_string())?,
        );
        std::thread::spawn(move || send_through_tls(conn, &tls, seed, total))
    };
    let received = receive_through_tls(&mut conn, &tls, seed);
    if received.is_err() {
        // Unblocks the sender.
        conn.shutdown(std::net::Shutdown::Both).ok();
    }
    let sent = sender
        .join()
        .map_err(|_| "the sending thread panicked".to_owned())?;
    let got = received?;
    sent?;
    if got == total {
        Ok(())
    } else {
        Err(format!("end of stream at {got} of {total}"))
    }
}

/// Sends `total` bytes of stream `seed` through the session `tls` on `conn`, then
/// `close_notify` and FIN.
fn send_through_tls(
    mut conn: std::net::TcpStream,
    tls: &std::sync::Mutex<rustls::ClientConnection>,
    seed: u64,
    total: u64,
) -> Result<(), String> {
    use std::io::Write as _;
    let mut p = Pattern::new(seed);
    let mut buf = vec![0; 100_000];
    let mut out = Vec::new();
    loop {
        let end = p.pos() == total;
        {
            let mut tls = tls.lock().map_err(|e| e.to_string())?;
            if end {
                tls.send_close_notify();
            } else {
                let n = (total - p.pos()).min(buf.len() as u64) as usize;
                p.fill(&mut buf[..n]);
                tls.writer()
                    .write_all(&buf[..n])
                    .map_err(|e| e.to_string())?;
            }
            while tls.wants_write() {
                tls.write_tls(&mut out).map_err(|e| e.to_string())?;
            }
        }
        conn.write_all(&out)
            .map_err(|e| format!("write at {}: {e}", p.pos()))?;
        out.clear();
        if end {
            return conn
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"));
        }
    }
}

/// Reads stream `seed` through the session `tls` on `conn`, checking every byte, until
/// `close_notify`; how many bytes came. A FIN without `close_notify` is an error.
fn receive_through_tls(
    conn: &mut std::net::TcpStream,
    tls: &std::sync::Mutex<rustls::ClientConnection>,
    seed: u64,
) -> Result<u64, String> {
    use std::io::Read as _;
    let mut p = Pattern::new(seed);
    let mut wire = vec![0; 64 * 1024];
    let mut plain = vec![0; 64 * 1024];
    loop {
        let n = match conn.read(&mut wire) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let states = crate::netns::socket_states();
                return Err(format!("stalled at {}; sockets:\n{states}", p.pos()));
            }
            Err(e) => return Err(format!("read at {}: {e}", p.pos())),
        };
        let mut tls = tls.lock().map_err(|e| e.to_string())?;
        let mut fed = &wire[..n];
        loop {
            // An empty read tells rustls of the FIN.
            tls.read_tls(&mut fed).map_err(|e| e.to_string())?;
            tls.process_new_packets()
                .map_err(|e| format!("read at {}: {e}", p.pos()))?;
            loop {
                match tls.reader().read(&mut plain) {
                    Ok(0) => return Ok(p.pos()),
                    Ok(k) => p.check(&plain[..k])?,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("read at {}: {e}", p.pos())),
                }
            }
            if fed.is_empty() {
                break;
            }
        }
    }
}

/// Over TLS 1.3 to `name` through `conn`, with an echo behind: one message echoed, then the
/// client updates its keys (RFC 8446, 4.6.3) and sends another. The second echo, or why there
/// was none.
pub fn echo_across_key_update(
    conn: std::net::TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<(), String> {
    let name =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        conn.set_nonblocking(true).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::from_std(conn).map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| format!("handshake: {e}"))?;
        echo(&mut tls, b"before the key update").await?;
        tls.get_mut()
            .1
            .refresh_traffic_keys()
            .map_err(|e| format!("key update: {e}"))?;
        echo(&mut tls, b"after the key update").await
    })
}

/// Writes `msg` and reads its echo, within 10 s.
async fn echo(
    tls: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    msg: &[u8],
) -> Result<(), String> {
    tls.write_all(msg)
        .await
        .map_err(|e| format!("write: {e}"))?;
    tls.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut got = vec![0; msg.len()];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut got));
    match read.await {
        Err(_) => Err("no echo in 10 s".to_owned()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(_)) if got == msg => Ok(()),
        Ok(Ok(_)) => Err(format!("echoed {got:?}")),
    }
}

/// Over TLS to `name` through `conn` (blocking): the client's Finished and the first part of
/// its first record of data go out in one write, the rest of that record `pause` later, so
/// the server's handshake ends inside that record. Returns what the echo sent back.
pub fn echo_first_record_split(
    mut conn: std::net::TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: &str,
    msg: &[u8],
    pause: Duration,
) -> Result<Vec<u8>, String> {
    use std::io::{Read as _, Write as _};
    let name =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let mut tls = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    // The handshake, writing nothing of the client's last flight.
    let mut flight = Vec::new();
    while tls.is_handshaking() {
        while tls.wants_write() {
            tls.write_tls(&mut flight).map_err(|e| e.to_string())?;
        }
        if !tls.is_handshaking() {
            break;
        }
        conn.write_all(&flight)
            .map_err(|e| format!("handshake write: {e}"))?;
        flight.clear();
        if tls
            .read_tls(&mut conn)
            .map_err(|e| format!("handshake read: {e}"))?
            == 0
        {
            return Err("the server closed during the handshake".to_owned());
        }
        tls.process_new_packets()
            .map_err(|e| format!("handshake: {e}"))?;
    }
    tls.writer().write_all(msg).map_err(|e| e.to_string())?;
    while tls.wants_write() {
        tls.write_tls(&mut flight).map_err(|e| e.to_string())?;
    }
    // Finished, and the record's header with a few bytes of its body.
    let cut = flight.len() - msg.len() / 2;
    conn.write_all(&flight[..cut]).map_err(|e| e.to_string())?;
    std::thread::sleep(pause);
    conn.write_all(&flight[cut..]).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    while got.len() < msg.len() {
        let mut buf = [0u8; 4096];
        match tls.reader().read(&mut buf) {
            Ok(0) => return Err(format!("end of stream after {} bytes", got.len())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if tls.read_tls(&mut conn).map_err(|e| format!("read: {e}"))? == 0 {
                    return Err(format!("closed after {} bytes", got.len()));
                }
                tls.process_new_packets()
                    .map_err(|e| format!("read: {e}"))?;
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(got)
}
