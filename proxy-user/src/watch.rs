//! Delivers what the kernel says about spliced sockets to the task that owns their
//! connection: end-of-stream and errors (from a private epoll instance that asks only for
//! `EPOLLRDHUP`, so bytes passing through never wake the daemon; input and room only on the
//! sockets of a direction userspace carries), and flow-control events
//! from the verdict program's ring buffer. Both are keyed by socket cookie.

use std::{
    cell::RefCell,
    collections::HashMap,
    os::fd::BorrowedFd,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
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
    /// The kernel held the socket, reached its drain point, or dropped bytes: look at its flow.
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

/// The epoll half: an epoll instance per thread that splices, each drained by a task on that
/// thread's runtime, so that an event wakes the thread that serves the connection, not
/// another that would then have to wake it.
pub struct Watcher {
    registry: Arc<Registry>,
    /// Tells this watcher's instances from another's in a thread's list.
    id: u64,
}

/// One thread's epoll instance of a [`Watcher`].
#[derive(Clone)]
pub struct LocalWatch(Arc<AsyncFd<Epoll>>);

thread_local! {
    /// This thread's instances, by watcher id.
    static LOCAL: RefCell<Vec<(u64, LocalWatch)>> = const { RefCell::new(Vec::new()) };
}

impl Watcher {
    pub fn new(registry: Arc<Registry>) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            registry,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// This thread's instance, started on the current tokio runtime at its first use. A
    /// socket is deleted from the instance it was added to, so a caller keeps it.
    pub fn local(&self) -> std::io::Result<LocalWatch> {
        LOCAL.with_borrow_mut(|list| {
            if let Some((_, watch)) = list.iter().find(|(id, _)| *id == self.id) {
                return Ok(watch.clone());
            }
            let watch = LocalWatch::start(Arc::clone(&self.registry))?;
            list.push((self.id, watch.clone()));
            Ok(watch)
        })
    }
}

impl LocalWatch {
    fn start(registry: Arc<Registry>) -> std::io::Result<Self> {
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
        Ok(Self(epoll))
    }

    pub fn add(&self, fd: BorrowedFd<'_>, cookie: u64) -> std::io::Result<()> {
        self.0.get_ref().add(fd, cookie)
    }

    /// Also asks for the readiness in `extra` (`sys::ev::IN`, `sys::ev::OUT`), re-armed.
    pub fn modify(&self, fd: BorrowedFd<'_>, cookie: u64, extra: u32) -> std::io::Result<()> {
        self.0.get_ref().modify(fd, cookie, extra)
    }

    pub fn delete(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.0.get_ref().delete(fd)
    }
}
