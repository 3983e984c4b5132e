//! Real applications behind spliced, each reading and writing its socket its own way: Go's
//! `io.Copy` (splice(2) both ways), `HAProxy` in `mode tcp` with splicing forced, and servers of
//! our own that read with splice(2) into a pipe, readv, recvmsg, `MSG_PEEK`, or from two
//! threads at once, and write with splice(2) from a pipe or sendfile(2), on blocking and
//! non-blocking sockets. Every stream is checked byte by byte, the bulk size each (1 GiB,
//! `tests::bulk`; sendfile: 256 MiB), on both data planes. The application runs on the
//! proxy's host, as a machine on an edge host does.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    process::Command,
    sync::{Mutex, mpsc},
    time::Duration,
};

use tests::{
    BACKEND_PORT, Daemon, Net, Pattern, Plane, Scratch, Server, Topo,
    apps::{
        PIPE, Process, STALL, go_app, iovec, pipe, read_checked, splice, splice_echo_app, wait_for,
    },
    bulk, recv_exact_pattern, recv_pattern, send_pattern, set_reset_on_close,
};

/// How long a whole 1 GiB transfer may take on the slowest plane.
const TRANSFER: Duration = Duration::from_secs(120);

macro_rules! apps {
    ($($app:ident),* $(,)?) => {
        mod sockmap { $( #[test] fn $app() { super::$app(tests::Plane::Sockmap) } )* }
        mod copy { $( #[test] fn $app() { super::$app(tests::Plane::Copy) } )* }
    };
}

apps!(
    go_io_copy_echo,
    haproxy_splicing,
    splice_echo,
    splice_reader,
    splice_writer,
    sendfile_writer,
    readv_reader,
    recvmsg_reader,
    peek_reader,
    two_thread_blocking_echo,
    nonblocking_echo,
    blocking_read_after_own_fin,
);

/// The application runs on the proxy's host, reached over loopback.
fn setup(plane: Plane) -> (Net, Daemon) {
    tests::setup(plane, Topo::Loopback)
}

/// A client connected through the proxy, whose reads and writes fail after [`STALL`] without
/// progress.
fn client(net: &Net) -> TcpStream {
    let c = net.connect();
    c.set_read_timeout(Some(STALL)).expect("read timeout");
    c.set_write_timeout(Some(STALL)).expect("write timeout");
    c
}

/// Sends `size` bytes of stream `seed` through `c` to an echo while reading them back, then
/// half-closes; `Ok` with the count when every byte came back in order before the echo's end
/// of stream.
fn echo_through(c: TcpStream, seed: u64, size: u64) -> Result<u64, String> {
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        send_pattern(&mut w, seed, size)?;
        w.shutdown(Shutdown::Write)
    });
    let got = recv_pattern(&mut { c }, seed);
    let sent = writer.join().expect("writer thread");
    let got = got?;
    sent.map_err(|e| format!("client's send failed: {e}"))?;
    Ok(got)
}

/// Like [`echo_through`], but half-closes only once every byte has come back, then expects
/// the echo's end of stream with nothing after. `HAProxy` 2.6 with splicing forced drops the
/// tail of a stream whose end arrives while its pipe still holds bytes (reproduced with the
/// client connected to `HAProxy` directly, about one 1 GiB echo in ten): the client's FIN
/// must not overtake its bytes there.
fn echo_then_close(c: TcpStream, seed: u64, size: u64) -> Result<u64, String> {
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || send_pattern(&mut w, seed, size));
    let mut c = c;
    let mut p = Pattern::new(seed);
    let got = recv_exact_pattern(&mut c, &mut p, size);
    let sent = writer.join().expect("writer thread");
    got?;
    sent.map_err(|e| format!("client's send failed: {e}"))?;
    c.shutdown(Shutdown::Write)
        .map_err(|e| format!("client's half-close failed: {e}"))?;
    match c.read(&mut [0; 1]) {
        Ok(0) => Ok(p.pos()),
        Ok(_) => Err(format!("bytes after the {size} echoed")),
        Err(e) => Err(format!("no end of stream after the echo: {e}")),
    }
}

/// Full duplex, the bulk size each way, through the echo application on the proxy's host.
fn duplex_through_echo(plane: Plane, handler: impl Fn(TcpStream) + Send + Sync + 'static) {
    let (net, daemon) = setup(plane);
    let _app = Server::start(&net.proxy, net.backend(), handler);
    assert_eq!(echo_through(client(&net), 31, bulk()), Ok(bulk()));
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
}

/// Client -> application, the bulk size, read by `reader` (which checks it and returns the count).
fn one_way_to_app(
    plane: Plane,
    reader: impl Fn(&mut TcpStream) -> Result<u64, String> + Send + Sync + 'static,
) {
    let (net, daemon) = setup(plane);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let _app = Server::start(&net.proxy, net.backend(), move |mut s| {
        s.set_read_timeout(Some(STALL)).expect("read timeout");
        let r = reader(&mut s);
        let _ = s.shutdown(Shutdown::Write);
        tx.lock().expect("lock").send(r).expect("test waits");
    });
    let mut c = client(&net);
    let sent = send_pattern(&mut c, 32, bulk()).and_then(|()| c.shutdown(Shutdown::Write));
    let got = rx.recv_timeout(TRANSFER).expect("application finished");
    assert_eq!(got, Ok(bulk()), "the client's send: {sent:?}");
    sent.expect("client sends the bulk size and half-closes");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("end of stream");
    assert_eq!(rest, b"");
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
}

/// Application -> client, `size` bytes of stream 33 written by `writer`; then the application
/// half-closes and the client must see exactly those bytes and the end of stream.
fn one_way_to_client(
    plane: Plane,
    size: u64,
    writer: impl Fn(&mut TcpStream, u64) -> std::io::Result<()> + Send + Sync + 'static,
) {
    let (net, daemon) = setup(plane);
    let _app = Server::start(&net.proxy, net.backend(), move |mut s| {
        s.set_write_timeout(Some(STALL)).expect("write timeout");
        if writer(&mut s, size).is_err() {
            set_reset_on_close(&s);
            return;
        }
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read(&mut [0; 1]);
    });
    let mut c = client(&net);
    assert_eq!(recv_pattern(&mut c, 33), Ok(size));
    drop(c);
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
}

// ---------------------------------------------------------------------------------------------
// Applications that are not ours
// ---------------------------------------------------------------------------------------------

/// Go's `io.Copy(conn, conn)`: splice(2) from the socket into a pipe and from the pipe into
/// the socket, on a non-blocking socket driven by Go's poller.
fn go_io_copy_echo(plane: Plane) {
    let (net, daemon) = setup(plane);
    let _app = Process::start(
        &net.proxy,
        Command::new(go_app("goecho")).arg(net.backend().to_string()),
        net.backend(),
    );
    assert_eq!(echo_through(client(&net), 34, bulk()), Ok(bulk()));
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
}

/// `HAProxy` in `mode tcp` with splicing forced both ways, as the application, in front of an
/// echo of its own (see [`echo_then_close`] for when the client half-closes).
fn haproxy_splicing(plane: Plane) {
    let (net, daemon) = setup(plane);
    let echo_addr = SocketAddr::new(net.backend().ip(), BACKEND_PORT + 1);
    let _echo = Server::start(&net.proxy, echo_addr, |s| splice_echo_app(&s));
    let dir = Scratch::new();
    let cfg = dir.0.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 256\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\n  option splice-request\n  \
             option splice-response\n\nlisten app\n  bind {}\n  server echo {echo_addr}\n",
            net.backend()
        ),
    )
    .expect("haproxy config");
    let _app = Process::start(
        &net.proxy,
        Command::new("haproxy").arg("-db").arg("-f").arg(&cfg),
        net.backend(),
    );
    assert_eq!(echo_then_close(client(&net), 35, bulk()), Ok(bulk()));
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
}

// ---------------------------------------------------------------------------------------------
// Applications of our own, one way of reading or writing each
// ---------------------------------------------------------------------------------------------

fn splice_echo(plane: Plane) {
    duplex_through_echo(plane, |s| splice_echo_app(&s));
}

fn splice_reader(plane: Plane) {
    one_way_to_app(plane, |s| {
        let (r, w) = pipe();
        let mut p = Pattern::new(32);
        let mut buf = vec![0; PIPE];
        loop {
            let n = splice(s.as_raw_fd(), w.as_raw_fd(), PIPE)
                .map_err(|e| format!("splice from the socket after {} bytes: {e}", p.pos()))?;
            if n == 0 {
                return Ok(p.pos());
            }
            let mut pipe_r = std::fs::File::from(r.try_clone().expect("dup"));
            pipe_r.read_exact(&mut buf[..n]).expect("read the pipe");
            p.check(&buf[..n])?;
        }
    });
}

fn splice_writer(plane: Plane) {
    one_way_to_client(plane, bulk(), |s, size| {
        let (r, w) = pipe();
        let mut pipe_w = std::fs::File::from(w);
        let mut p = Pattern::new(33);
        let mut buf = vec![0; PIPE];
        while p.pos() < size {
            let n = (size - p.pos()).min(PIPE as u64) as usize;
            p.fill(&mut buf[..n]);
            pipe_w.write_all(&buf[..n])?;
            let mut left = n;
            while left > 0 {
                left -= splice(r.as_raw_fd(), s.as_raw_fd(), left)?;
            }
        }
        Ok(())
    });
}

fn sendfile_writer(plane: Plane) {
    const SIZE: u64 = 256 << 20;
    let dir = Scratch::new();
    let path = dir.0.join("payload");
    send_pattern(
        &mut std::fs::File::create(&path).expect("payload file"),
        33,
        SIZE,
    )
    .expect("write the payload");
    one_way_to_client(plane, SIZE, move |s, size| {
        let f = std::fs::File::open(&path)?;
        let mut off: libc::off_t = 0;
        while (off as u64) < size {
            let left = (size - off as u64) as usize;
            // SAFETY: two valid descriptors and an offset on the stack.
            let n = unsafe { libc::sendfile(s.as_raw_fd(), f.as_raw_fd(), &raw mut off, left) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if n == 0 {
                return Err(std::io::Error::other("sendfile sent nothing"));
            }
        }
        Ok(())
    });
}

fn readv_reader(plane: Plane) {
    one_way_to_app(plane, |s| {
        read_checked(s, 32, |fd, buf| {
            // Two buffers of odd sizes: a read splits wherever the kernel's segments fall.
            let (a, b) = buf.split_at_mut(4093);
            let iov = [iovec(a), iovec(b)];
            // SAFETY: two iovecs over live buffers.
            unsafe { libc::readv(fd, iov.as_ptr(), 2) }
        })
    });
}

fn recvmsg_reader(plane: Plane) {
    one_way_to_app(plane, |s| {
        read_checked(s, 32, |fd, buf| {
            let (a, rest) = buf.split_at_mut(1000);
            let (b, c) = rest.split_at_mut(30_000);
            let mut iov = [iovec(a), iovec(b), iovec(c)];
            // SAFETY: zeroed msghdr is valid (no name, no control).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = 3;
            // SAFETY: a msghdr whose iovecs point into live buffers.
            unsafe { libc::recvmsg(fd, &raw mut msg, 0) }
        })
    });
}

fn peek_reader(plane: Plane) {
    one_way_to_app(plane, |s| {
        let mut p = Pattern::new(32);
        let mut peeked = vec![0; 64 * 1024];
        let mut read = vec![0; 64 * 1024];
        loop {
            let n = match s.peek(&mut peeked) {
                Ok(0) => return Ok(p.pos()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("peek after {} bytes: {e}", p.pos())),
            };
            // What was peeked is still there: a read of that many returns exactly it.
            s.read_exact(&mut read[..n])
                .map_err(|e| format!("read after peek at {}: {e}", p.pos()))?;
            if peeked[..n] != read[..n] {
                return Err(format!("peeked bytes at {} differ from read ones", p.pos()));
            }
            p.check(&read[..n])?;
        }
    });
}

/// One thread reads (blocking) while another writes (blocking) what it read: the reader
/// waits while the writer fills its send buffer and is woken as it drains.
fn two_thread_blocking_echo(plane: Plane) {
    duplex_through_echo(plane, |s| {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
        let mut w = s.try_clone().expect("clone");
        let writer = std::thread::spawn(move || {
            for chunk in rx {
                w.write_all(&chunk)?;
            }
            w.shutdown(Shutdown::Write)
        });
        let mut r = s;
        let mut buf = vec![0; 64 * 1024];
        let ok = loop {
            match r.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break false;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        drop(tx);
        if !ok || writer.join().map_or(true, |r| r.is_err()) {
            set_reset_on_close(&r);
        }
    });
}

/// A non-blocking socket read and written as an event loop does: poll, then read or write
/// what the socket takes.
fn nonblocking_echo(plane: Plane) {
    duplex_through_echo(plane, |mut s| {
        s.set_nonblocking(true).expect("non-blocking");
        let mut buf = vec![0; 256 * 1024];
        let done = loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    wait_for(&s, libc::POLLIN);
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break false,
            };
            let mut sent = 0;
            while sent < n {
                match s.write(&buf[sent..n]) {
                    Ok(k) => sent += k,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => wait_for(&s, libc::POLLOUT),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if sent < n {
                break false;
            }
        };
        if done {
            let _ = s.shutdown(Shutdown::Write);
        } else {
            set_reset_on_close(&s);
        }
    });
}

/// The application answers, half-closes, then blocks reading the client's stream: its read
/// waits while its own FIN is acknowledged.
fn blocking_read_after_own_fin(plane: Plane) {
    let (net, daemon) = setup(plane);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let _app = Server::start(&net.proxy, net.backend(), move |mut s| {
        s.set_read_timeout(Some(STALL)).expect("read timeout");
        send_pattern(&mut s, 36, 8 << 20).expect("answer");
        s.shutdown(Shutdown::Write).expect("half-close");
        let r = recv_pattern(&mut s, 37);
        tx.lock().expect("lock").send(r).expect("test waits");
    });
    let mut c = client(&net);
    assert_eq!(recv_pattern(&mut c, 36), Ok(8 << 20));
    // Only now, with the application blocked in its read, does the client send.
    std::thread::sleep(Duration::from_millis(200));
    let sent = send_pattern(&mut c, 37, 64 << 20).and_then(|()| c.shutdown(Shutdown::Write));
    let got = rx.recv_timeout(TRANSFER).expect("application finished");
    assert_eq!(got, Ok(64 << 20), "the client's send: {sent:?}");
    sent.expect("client sends after the end of the answer");
    let s = daemon.wait_idle();
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
}
