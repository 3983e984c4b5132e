//! Bytes userspace took from one socket of a pair and has not yet written into the other.

use std::{io, net::TcpStream, os::fd::AsFd as _};

use super::MOVE_CHUNK;
use crate::{
    faults::{self, Fault},
    sys,
};

/// Taken, not yet written, in stream order: first `bytes`, then what the pipe holds. Through
/// the pipe the kernel hands the pages from one socket's receive queue to the other's send
/// queue (splice(2)) and the daemon copies nothing. `bytes` holds what a handover passed on,
/// and every byte when a fault that alters carried bytes is injected or no pipe can be made.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) bytes: Vec<u8>,
    pipe: Option<sys::Pipe>,
    /// Bytes in the pipe.
    piped: usize,
    /// A pipe could not be made (the process's or the user's limit): this direction copies,
    /// without asking again at every call.
    no_pipe: bool,
}

/// Whether carried bytes go through memory, where the faults that alter them act.
fn copies() -> bool {
    faults::active(Fault::DuplicateBatch) || faults::active(Fault::DropLastByte)
}

impl Pending {
    pub(super) fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            ..Self::default()
        }
    }

    pub(super) fn len(&self) -> usize {
        self.bytes.len() + self.piped
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes at most `len` bytes from `from`. `Ok(0)` once the stream ended and nothing is
    /// queued; `WouldBlock` when nothing is queued yet, or the pipe is full.
    pub(super) fn take(&mut self, from: &TcpStream, len: usize) -> io::Result<usize> {
        if !copies() && self.pipe.is_none() && !self.no_pipe {
            match sys::Pipe::new(MOVE_CHUNK) {
                Ok(pipe) => self.pipe = Some(pipe),
                Err(e) => {
                    self.no_pipe = true;
                    tracing::debug!(error = %e, "no pipe for carried bytes; copying them");
                }
            }
        }
        if let Some(pipe) = &self.pipe {
            let n = pipe.fill(from.as_fd(), len)?;
            self.piped += n;
            return Ok(n);
        }
        let start = self.bytes.len();
        self.bytes.resize(start + len, 0);
        let read = io::Read::read(&mut &*from, &mut self.bytes[start..]);
        self.bytes.truncate(start + *read.as_ref().unwrap_or(&0));
        read
    }

    /// Writes at most `len` bytes into `to`, the oldest first.
    pub(super) fn give(&mut self, to: &TcpStream, len: usize) -> io::Result<usize> {
        if !self.bytes.is_empty() {
            let n = self.bytes.len().min(len);
            let n = io::Write::write(&mut &*to, &self.bytes[..n])?;
            self.bytes.drain(..n);
            return Ok(n);
        }
        match &self.pipe {
            Some(pipe) if self.piped > 0 => {
                let n = pipe.drain(to.as_fd(), self.piped.min(len))?;
                self.piped -= n;
                Ok(n)
            }
            _ => Ok(0),
        }
    }

    /// Everything it holds, in order, in memory (for a handover).
    pub(super) fn take_bytes(&mut self) -> io::Result<Vec<u8>> {
        let mut bytes = std::mem::take(&mut self.bytes);
        if let Some(pipe) = &self.pipe {
            pipe.read_out(self.piped, &mut bytes)?;
            self.piped = 0;
        }
        Ok(bytes)
    }
}
