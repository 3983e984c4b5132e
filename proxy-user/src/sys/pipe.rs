//! A pipe between two sockets for splice(2): the pages of the bytes change hands in the
//! kernel, and the daemon never copies them.

use std::{
    fs::File,
    io::{self, Read as _},
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
};

/// The ends of one non-blocking pipe.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

const FLAGS: libc::c_uint = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

impl Pipe {
    /// A non-blocking pipe asked to hold `size` bytes. The kernel may refuse the size (over
    /// `fs.pipe-max-size`, or an unprivileged user past its pipe pages): the pipe then keeps
    /// its default, which only makes each move shorter.
    pub fn new(size: usize) -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: the kernel fills both descriptors on success.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both are fresh descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: plain fcntl on a descriptor owned here; its failure is allowed (above).
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        Ok(Self { read, write })
    }

    /// Moves at most `len` bytes from the socket `from` into the pipe. `Ok(0)`: the stream
    /// ended; `WouldBlock`: nothing queued, or the pipe is full.
    pub fn fill(&self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_fd(), len)
    }

    /// Moves at most `len` bytes from the pipe into the socket `to`.
    pub fn drain(&self, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.read.as_fd(), to, len)
    }

    /// Reads `len` bytes out of the pipe into `out`: all it holds when `len` is what went in.
    pub fn read_out(&self, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let mut file = File::from(self.read.try_clone()?);
        let start = out.len();
        out.resize(start + len, 0);
        file.read_exact(&mut out[start..])
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are valid for the call; null offsets are allowed for pipes
    // and sockets.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            FLAGS,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
