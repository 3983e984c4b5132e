//! The load generator: each workload runs on the calling thread (inside the client's
//! namespace) and threads it spawns, against one target address. The backend protocol is in
//! `topo::start_backend`.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// No single read or write of a workload waits longer than this: a stalled target fails its
/// sample instead of hanging the run.
const STALL: Duration = Duration::from_secs(30);
const CHUNK: usize = 256 * 1024;

/// Whether a workload's client turns Nagle's algorithm off: the request/response workloads
/// do, as such clients do; bulk ones write large blocks and leave TCP to pack segments.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nagle {
    Off,
    On,
}

fn connect(addr: SocketAddr, mode: u8, nagle: Nagle) -> Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(nagle == Nagle::Off)?;
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    s.write_all(&[mode])?;
    Ok(s)
}

/// Sends `bytes` to the sink and waits for its count: seconds from connect to the count.
pub fn bulk(addr: SocketAddr, bytes: u64) -> Result<f64> {
    bulk_from(addr, bytes, &block())
}

/// The block every bulk workload writes, over and over.
fn block() -> Vec<u8> {
    vec![0x5au8; CHUNK]
}

/// [`bulk`], writing `block` (filled before the clock starts).
fn bulk_from(addr: SocketAddr, bytes: u64, block: &[u8]) -> Result<f64> {
    let start = Instant::now();
    let mut s = connect(addr, b'S', Nagle::On)?;
    send(&mut s, bytes, block)?;
    s.shutdown(Shutdown::Write)?;
    sink_count(&mut s, bytes)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Reads the sink's count at the end of a bulk transfer and checks it: `bytes` and the mode
/// byte.
fn sink_count(s: &mut impl std::io::Read, bytes: u64) -> Result<()> {
    let mut count = [0u8; 8];
    s.read_exact(&mut count).context("the sink's count")?;
    let got = u64::from_le_bytes(count);
    ensure!(
        got == bytes + 1,
        "the sink got {} of {bytes} bytes",
        got.saturating_sub(1)
    );
    Ok(())
}

fn send(s: &mut impl std::io::Write, mut left: u64, block: &[u8]) -> Result<()> {
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        s.write_all(&block[..n]).context("send")?;
        left -= n as u64;
    }
    Ok(())
}

/// Sends `bytes` to the echo while reading them back: seconds until the last byte is back.
pub fn duplex(addr: SocketAddr, bytes: u64) -> Result<f64> {
    let block = block();
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut s = connect(addr, b'E', Nagle::On)?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> Result<()> {
        send(&mut w, bytes, &block)?;
        w.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let mut got = 0u64;
    while got < bytes {
        match s.read(&mut buf) {
            Ok(0) => bail!("echo ended after {got} of {bytes} bytes"),
            Ok(n) => got += n as u64,
            Err(e) => bail!("echo read after {got} of {bytes} bytes: {e}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok(secs)
}

/// `count` request/response rounds of `size` bytes on one connection: each round's time in
/// nanoseconds, sorted.
pub fn round_trips(addr: SocketAddr, size: usize, count: usize) -> Result<Vec<u64>> {
    let mut s = connect(addr, b'E', Nagle::Off)?;
    let msg = vec![0x33u8; size];
    let mut back = vec![0u8; size];
    // Warm-up: the first rounds pay for connection set-up.
    for _ in 0..=count / 10 {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
    }
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("echo")?;
        times.push(t.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    Ok(times)
}

/// The `q` quantile of sorted `values`.
pub fn quantile(values: &[u64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let i = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[i.min(values.len() - 1)] as f64
}

/// New connections, one after another for `duration`, each carrying a 32-byte exchange and
/// closed by the client: connections per second.
pub fn connection_rate(addr: SocketAddr, duration: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0u64;
    let msg = [0x44u8; 32];
    let mut back = [0u8; 32];
    while start.elapsed() < duration {
        let mut s = connect(addr, b'E', Nagle::Off)?;
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("echo")?;
        drop(s);
        done += 1;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// What a sweep measured: seconds from the start (every worker thread ready) until the last
/// count is back, and each connection's microseconds from its connect to its count, sorted.
pub struct Swept {
    pub secs: f64,
    pub each_us: Vec<u64>,
}

/// `conns` connections at once, each sending its share of `total` bytes to the sink.
pub fn sweep(addr: SocketAddr, conns: usize, total: u64) -> Result<Swept> {
    let each = total / conns as u64;
    let block = Arc::new(block());
    // Workers wait at the gate (held shut by the write lock) until every one is ready; a
    // failed spawn opens it too, so that none waits forever.
    let gate = Arc::new(RwLock::new(()));
    let ready = Arc::new(AtomicUsize::new(0));
    let shut = gate.write().map_err(|_| anyhow::anyhow!("gate poisoned"))?;
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (block, gate, ready) = (Arc::clone(&block), Arc::clone(&gate), Arc::clone(&ready));
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    ready.fetch_add(1, Ordering::SeqCst);
                    drop(gate.read());
                    bulk_from(addr, each, &block)
                })
        })
        .collect::<std::io::Result<_>>()?;
    while ready.load(Ordering::SeqCst) < conns {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(shut);
    let start = Instant::now();
    let mut each_us = workers
        .into_iter()
        .map(|w| {
            let secs = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
            Ok((secs * 1e6) as u64)
        })
        .collect::<Result<Vec<u64>>>()?;
    let secs = start.elapsed().as_secs_f64();
    each_us.sort_unstable();
    Ok(Swept { secs, each_us })
}

/// Opens `n` connections that stay idle; they close when the returned sockets drop. Each is
/// proven through (one echo) so that the proxy has spliced it before memory is read.
pub fn idle(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s =
            connect(addr, b'E', Nagle::Off).with_context(|| format!("idle connection {i}"))?;
        s.write_all(b"i")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("idle connection {i}"))?;
        conns.push(s);
    }
    Ok(conns)
}

/// A TLS session over `tcp` to [`crate::targets::TLS_NAME`], its handshake done.
fn tls(
    tcp: TcpStream,
    config: &Arc<rustls::ClientConfig>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(crate::targets::TLS_NAME)?;
    let conn = rustls::ClientConnection::new(Arc::clone(config), name)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).context("TLS handshake")?;
    }
    Ok(s)
}

/// [`bulk`] over TLS: the target terminates it and passes the bytes on in the clear. The
/// end of the stream is TLS's `close_notify`, then FIN.
pub fn tls_bulk(addr: SocketAddr, bytes: u64, config: &Arc<rustls::ClientConfig>) -> Result<f64> {
    let block = block();
    let start = Instant::now();
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_read_timeout(Some(STALL))?;
    tcp.set_write_timeout(Some(STALL))?;
    let mut s = tls(tcp, config)?;
    s.write_all(b"S")?;
    send(&mut s, bytes, &block)?;
    s.conn.send_close_notify();
    s.flush()?;
    s.sock.shutdown(Shutdown::Write)?;
    sink_count(&mut s, bytes)?;
    Ok(start.elapsed().as_secs_f64())
}

/// [`connection_rate`] over TLS, each connection with a full handshake (no resumption):
/// connections per second.
pub fn tls_connection_rate(
    addr: SocketAddr,
    duration: Duration,
    config: &Arc<rustls::ClientConfig>,
) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0u64;
    let msg = [0x44u8; 32];
    let mut back = [0u8; 32];
    while start.elapsed() < duration {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect {addr}"))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(STALL))?;
        let mut s = tls(tcp, config)?;
        s.write_all(b"E")?;
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("echo")?;
        drop(s);
        done += 1;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}
