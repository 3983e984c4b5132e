//! Which connections an upgrade hands over: those counted in a [`Gate`] while it was open.
//! The handover closes the gate, then waits until none is counted: a connection counted
//! before the close is handed over (it stops and is sent), one that comes after finds the
//! gate closed and stays in this process.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

/// Connections that may still be handed over, and whether new ones may be.
#[derive(Default)]
pub struct Gate {
    /// Connections counted now: running, or stopped for the handover and not yet sent.
    running: Arc<AtomicUsize>,
    /// Set once the handover began: new connections are not counted.
    closed: AtomicBool,
}

impl Gate {
    /// Counts a connection unless the gate is closed. Counted before the check: the
    /// handover either sees it counted or it sees the gate closed (both sequentially
    /// consistent).
    pub fn enter(&self) -> Option<Running> {
        let running = self.count();
        (!self.closed.load(Ordering::SeqCst)).then_some(running)
    }

    /// Counts a connection whatever the gate says (one taken over, which runs on).
    pub fn count(&self) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        Running(Arc::clone(&self.running))
    }

    /// Counts no new connection from now on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Whether the gate is closed.
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Connections counted now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

/// Counts a connection in its [`Gate`] while this lives.
pub struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
