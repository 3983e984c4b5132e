//! Applications of the tests' own that read and write their sockets in one particular way
//! (splice(2), readv, recvmsg, ...), and programs started as applications: Go programs built
//! from `tests/apps`, and any command in a namespace.

use std::{
    io::ErrorKind,
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use crate::{Netns, Pattern, eventually, set_reset_on_close};

/// Pipe size for the splice(2) applications (`fs.pipe-max-size` allows 1 MiB by default).
pub const PIPE: usize = 1 << 20;
/// A read or write that makes no progress for this long fails, naming where the stream
/// stopped.
pub const STALL: Duration = Duration::from_secs(20);

/// An echo that moves every byte with splice(2): socket -> pipe -> socket, blocking. A failure
/// resets the connection, so that a broken echo never looks complete.
pub fn splice_echo_app(s: &TcpStream) {
    let (r, w) = pipe();
    let moved = (|| -> std::io::Result<()> {
        loop {
            let n = splice(s.as_raw_fd(), w.as_raw_fd(), PIPE)?;
            if n == 0 {
                return Ok(());
            }
            let mut left = n;
            while left > 0 {
                left -= splice(r.as_raw_fd(), s.as_raw_fd(), left)?;
            }
        }
    })();
    match moved {
        Ok(()) => {
            let _ = s.shutdown(Shutdown::Write);
        }
        Err(_) => set_reset_on_close(s),
    }
}

/// Reads `s` to its end with `read` (a raw read call into the buffer it is given), checking
/// every byte against stream `seed`.
pub fn read_checked(
    s: &TcpStream,
    seed: u64,
    read: impl Fn(RawFd, &mut [u8]) -> isize,
) -> Result<u64, String> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = read(s.as_raw_fd(), &mut buf);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("read failed after {} bytes: {e}", p.pos()));
        }
        if n == 0 {
            return Ok(p.pos());
        }
        p.check(&buf[..n as usize])?;
    }
}

pub fn iovec(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// A pipe of [`PIPE`] bytes: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor owned here.
    let rc = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE as libc::c_int) };
    assert!(rc >= 0, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
    (r, w)
}

/// splice(2) of up to `len` bytes from `from` to `to` (one of them a pipe), blocking.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    loop {
        // SAFETY: splice between two valid descriptors without offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until `s` is ready for `events` (or [`STALL`] passes: the caller then retries and the
/// test's own deadlines report the stall).
pub fn wait_for(s: &TcpStream, events: libc::c_short) {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&raw mut pfd, 1, STALL.as_millis() as libc::c_int) };
}

/// A program started in a namespace, killed at drop.
pub struct Process(Child);

impl Process {
    /// Starts `cmd` in `ns` and waits until `ready` accepts connections.
    pub fn start(ns: &Netns, cmd: &Command, ready: SocketAddr) -> Self {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", cmd.get_program().display()));
        let mut p = Self(child);
        if !eventually(Duration::from_secs(10), || ns.connect(ready).is_ok()) {
            let _ = p.0.kill();
            panic!(
                "{} did not start listening on {ready}",
                cmd.get_program().display()
            );
        }
        p
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the Go program `tests/apps/NAME` (Go's cache makes a rebuild cheap) with Debian's Go, which
/// `cargo xtask test` installs, and returns the binary.
pub fn go_app(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<()>> = OnceLock::new();
    let _one_build_at_a_time = BUILT.get_or_init(Mutex::default).lock().expect("lock");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("../target/go-apps");
    let bin = out.join(name);
    let st = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(root.join(format!("apps/{name}/main.go")))
        .env("GOCACHE", out.join("cache"))
        .env("GOPATH", out.join("gopath"))
        .env("GO111MODULE", "off")
        .status()
        .expect("run go (cargo xtask test installs golang-go)");
    assert!(st.success(), "go build of {name} failed: {st}");
    bin
}
