//! Delivers what the kernel says about spliced sockets to the task that owns their
//! connection: end-of-stream and errors (from a private epoll instance that asks only for
//! `EPOLLRDHUP`, so bytes passing through never wake the daemon), and flow-control events
//! from the verdict program's ring buffer. Both are keyed by socket cookie.

use std::{
    collections::HashMap,
    os::fd::BorrowedFd,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::sys::Epoll;

/// Which socket of a connection an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    #[must_use]
    pub fn other(self) -> Self {
        match self {
            Self::Client => Self::Backend,
            Self::Backend => Self::Client,
        }
    }

    pub fn index(self) -> usize {
        match self {
            Self::Client => 0,
            Self::Backend => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Backend => "backend",
        }
    }
}

/// What happened to one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockEvent {
    /// epoll bits (`sys::ev`).
    Epoll(Side, u32),
    /// The verdict program reached the socket's check point: look at what is buffered.
    Pressure(Side),
}

type Sender = mpsc::UnboundedSender<SockEvent>;

/// Socket cookie -> the connection task that owns the socket.
#[derive(Default)]
pub struct Registry {
    owners: Mutex<HashMap<u64, (Sender, Side)>>,
}

impl Registry {
    pub fn add(&self, cookie: u64, side: Side, tx: Sender) {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cookie, (tx, side));
    }

    pub fn remove(&self, cookie: u64) {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&cookie);
    }

    pub fn len(&self) -> usize {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends an event to the owner of `cookie`; events for sockets already gone are dropped.
    pub fn deliver(&self, cookie: u64, make: impl FnOnce(Side) -> SockEvent) {
        let owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((tx, side)) = owners.get(&cookie) {
            // The owner may be finishing; a closed channel needs nothing more.
            let _ = tx.send(make(*side));
        }
    }
}

/// The epoll half: registration, and a task that drains the epoll instance.
pub struct Watcher {
    epoll: Arc<AsyncFd<Epoll>>,
}

impl Watcher {
    /// Starts the watcher on the current tokio runtime.
    pub fn start(registry: Arc<Registry>) -> std::io::Result<Self> {
        let epoll = Arc::new(crate::sys::async_readable(Epoll::new()?)?);
        let pump = Arc::clone(&epoll);
        tokio::spawn(async move {
            let mut ready = Vec::new();
            loop {
                let Ok(mut guard) = pump.readable().await else {
                    return;
                };
                ready.clear();
                if let Err(e) = guard.get_inner().poll_now(&mut ready) {
                    tracing::error!(error = %e, "epoll_wait on the lifecycle watcher failed");
                    return;
                }
                guard.clear_ready();
                for &(cookie, bits) in &ready {
                    registry.deliver(cookie, |side| SockEvent::Epoll(side, bits));
                }
            }
        });
        Ok(Self { epoll })
    }

    pub fn add(&self, fd: BorrowedFd<'_>, cookie: u64) -> std::io::Result<()> {
        self.epoll.get_ref().add(fd, cookie)
    }

    pub fn delete(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.epoll.get_ref().delete(fd)
    }
}
