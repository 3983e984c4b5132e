//! Choosing a machine for each connection, as fly-proxy does: least-loaded by live
//! connections, in bands (machines under their soft limit first, then those between soft and
//! hard limit), ties broken at random; never past the hard limit. When every machine is at its
//! hard limit, connections wait in a bounded first-in first-out queue for a slot, up to a
//! maximum wait. A machine failing a health check is out of rotation until it passes again;
//! when every machine of a service fails, all of them are used (see [`Pool::pick`]). Every
//! decision is counted per machine and per service, and changes of state are logged.

#![forbid(unsafe_code)]

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::oneshot;

/// How long and how many connections may wait for a machine below its hard limit.
#[derive(Clone, Copy, Debug)]
pub struct QueuePolicy {
    /// Connections waiting per service; one more is refused at once.
    pub limit: usize,
    /// Longest wait; past it the connection is closed.
    pub max_wait: Duration,
}

/// One backend of a service, with its live load.
#[derive(Debug, Serialize)]
pub struct MachineStats {
    pub id: String,
    pub addr: SocketAddr,
    /// Connections spliced to it now.
    pub active: AtomicU64,
    /// Connections it has been given in all.
    pub chosen: AtomicU64,
    /// Connects it refused or did not answer in time.
    pub connect_failures: AtomicU64,
    /// In rotation: it passes every health check (true until a check says otherwise).
    pub healthy: AtomicBool,
    /// Health checks it fails now.
    pub failing_checks: AtomicU32,
    /// Health check runs it has failed in all.
    pub check_failures: AtomicU64,
}

/// Counters of a service's pool.
#[derive(Debug, Default, Serialize)]
pub struct PoolStats {
    /// Connections waiting for a slot now.
    pub queued: AtomicU64,
    /// The most connections ever waiting at once.
    pub max_queued: AtomicU64,
    /// Connections that waited and then got a slot.
    pub dequeued: AtomicU64,
    /// Connections refused because the queue was full.
    pub queue_full: AtomicU64,
    /// Connections closed because they waited too long.
    pub queue_timeouts: AtomicU64,
    /// Connects retried on another machine after one failed.
    pub retried: AtomicU64,
    /// Connections routed while every machine failed its health checks.
    pub routed_all_failing: AtomicU64,
}

/// The machines of one service and who waits for them.
pub struct Pool {
    pub service: String,
    pub machines: Vec<MachineStats>,
    soft_limit: Option<u64>,
    hard_limit: Option<u64>,
    policy: QueuePolicy,
    state: Mutex<State>,
    pub stats: PoolStats,
}

struct State {
    /// Senders of the queued connections, oldest first. A slot travels as a [`Lease`], so one
    /// handed to a waiter that gives up in the same instant is released when dropped.
    waiters: VecDeque<oneshot::Sender<Lease>>,
    /// When the queue last became non-empty, for the log.
    queued_since: Option<Instant>,
    rng: u64,
}

/// Why no machine was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the service has no machine")]
    NoMachine,
    #[error("every machine is at its hard limit and the queue is full")]
    QueueFull,
    #[error("every machine stayed at its hard limit for the whole queue wait")]
    QueueTimeout,
}

/// A slot on one machine, released when dropped.
pub struct Lease {
    /// `None` once disarmed: dropping it then releases nothing.
    pool: Option<Arc<Pool>>,
    index: usize,
    machine: SocketAddr,
}

impl Lease {
    fn new(pool: &Arc<Pool>, index: usize) -> Self {
        Self {
            machine: pool.machines[index].addr,
            pool: Some(Arc::clone(pool)),
            index,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.machine
    }

    /// Position of its machine in the pool, for [`Pool::retry`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// Counts a connect to its machine that was refused or timed out.
    pub fn connect_failed(&self) {
        if let Some(pool) = &self.pool {
            pool.machines[self.index]
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.release(self.index);
        }
    }
}

impl Pool {
    pub fn new(
        service: String,
        machines: Vec<(String, SocketAddr)>,
        soft_limit: Option<u32>,
        hard_limit: Option<u32>,
        policy: QueuePolicy,
    ) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
            | 1;
        Self {
            service,
            machines: machines
                .into_iter()
                .map(|(id, addr)| MachineStats {
                    id,
                    addr,
                    active: AtomicU64::new(0),
                    chosen: AtomicU64::new(0),
                    connect_failures: AtomicU64::new(0),
                    healthy: AtomicBool::new(true),
                    failing_checks: AtomicU32::new(0),
                    check_failures: AtomicU64::new(0),
                })
                .collect::<Vec<_>>(),
            soft_limit: soft_limit.map(u64::from),
            hard_limit: hard_limit.map(u64::from),
            policy,
            state: Mutex::new(State {
                waiters: VecDeque::new(),
                queued_since: None,
                rng: seed,
            }),
            stats: PoolStats::default(),
        }
    }

    /// Machines in rotation. Their flags change only with the state locked.
    fn in_rotation(&self) -> usize {
        self.machines
            .iter()
            .filter(|m| m.healthy.load(Ordering::Relaxed))
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The machine to take next, skipping `exclude`: lowest band, then fewest connections,
    /// then at random. Bands: 0 below the soft limit, 1 from soft to hard limit. Machines at
    /// the hard limit are not candidates, nor are machines failing a health check while
    /// another passes. When every machine fails, all are candidates: a check can be wrong
    /// while the service works (a bad path, a slow dependency), and a connection tried on a
    /// machine that is really down fails fast and is retried on the next, whereas refusing
    /// everything is a certain outage. Called with the state locked, so the choice and the
    /// count it raises are one step.
    fn pick(&self, state: &mut State, exclude: &[usize]) -> Option<usize> {
        let mut best: Option<(u8, u64, usize)> = None;
        let mut ties = 0u64;
        let all_failing = self.in_rotation() == 0;
        for (i, m) in self.machines.iter().enumerate() {
            if exclude.contains(&i) || !(all_failing || m.healthy.load(Ordering::Relaxed)) {
                continue;
            }
            let active = m.active.load(Ordering::Relaxed);
            if self.hard_limit.is_some_and(|h| active >= h) {
                continue;
            }
            let band = u8::from(self.soft_limit.is_some_and(|s| active >= s));
            let key = (band, active);
            match best {
                Some((b, a, _)) if (b, a) < key => {}
                Some((b, a, _)) if (b, a) == key => {
                    // Reservoir sampling keeps each tied machine equally likely.
                    ties += 1;
                    state.rng ^= state.rng << 13;
                    state.rng ^= state.rng >> 7;
                    state.rng ^= state.rng << 17;
                    if state.rng.is_multiple_of(ties) {
                        best = Some((band, active, i));
                    }
                }
                _ => {
                    ties = 1;
                    best = Some((band, active, i));
                }
            }
        }
        let (_, _, i) = best?;
        let m = &self.machines[i];
        m.active.fetch_add(1, Ordering::Relaxed);
        m.chosen.fetch_add(1, Ordering::Relaxed);
        if all_failing {
            self.stats
                .routed_all_failing
                .fetch_add(1, Ordering::Relaxed);
        }
        Some(i)
    }

    /// A slot on the best machine, waiting in the queue when all are full.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, Refusal> {
        if self.machines.is_empty() {
            return Err(Refusal::NoMachine);
        }
        let rx = {
            let mut state = self.lock();
            // Waiters go first: a newcomer never overtakes the queue.
            if state.waiters.is_empty()
                && let Some(index) = self.pick(&mut state, &[])
            {
                return Ok(Lease::new(self, index));
            }
            if state.waiters.len() >= self.policy.limit {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            if state.waiters.is_empty() {
                state.queued_since = Some(Instant::now());
                tracing::info!(service = %self.service, "every machine is at its hard limit: new connections wait");
            }
            state.waiters.push_back(tx);
            self.stats.queued.fetch_add(1, Ordering::Relaxed);
            self.stats
                .max_queued
                .fetch_max(state.waiters.len() as u64, Ordering::Relaxed);
            rx
        };
        let outcome = tokio::time::timeout(self.policy.max_wait, rx).await;
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        if let Ok(Ok(lease)) = outcome {
            self.stats.dequeued.fetch_add(1, Ordering::Relaxed);
            Ok(lease)
        } else {
            // Timed out: the dropped receiver makes `release` skip this waiter; a lease sent
            // in the same instant is dropped with the receiver, which releases it.
            self.stats.queue_timeouts.fetch_add(1, Ordering::Relaxed);
            Err(Refusal::QueueTimeout)
        }
    }

    /// Another machine, after those in `tried` could not be reached: no queueing, nothing
    /// tried twice.
    pub fn retry(self: &Arc<Self>, tried: &[usize]) -> Option<Lease> {
        let mut state = self.lock();
        let index = self.pick(&mut state, tried)?;
        self.stats.retried.fetch_add(1, Ordering::Relaxed);
        Some(Lease::new(self, index))
    }

    /// Frees a slot of machine `index` and hands the first live waiter a slot, if any.
    fn release(self: &Arc<Self>, index: usize) {
        let mut state = self.lock();
        self.machines[index].active.fetch_sub(1, Ordering::Relaxed);
        self.serve_waiters(&mut state);
    }

    /// Hands free slots to waiters, oldest first.
    fn serve_waiters(self: &Arc<Self>, state: &mut State) {
        while !state.waiters.is_empty() {
            let Some(slot) = self.pick(state, &[]) else {
                return;
            };
            let waiter = state.waiters.pop_front().expect("checked non-empty");
            if state.waiters.is_empty()
                && let Some(since) = state.queued_since.take()
            {
                tracing::info!(
                    service = %self.service,
                    queued_for = ?since.elapsed(),
                    dequeued = self.stats.dequeued.load(Ordering::Relaxed),
                    timeouts = self.stats.queue_timeouts.load(Ordering::Relaxed),
                    refused = self.stats.queue_full.load(Ordering::Relaxed),
                    "queue drained"
                );
            }
            if let Err(mut lease) = waiter.send(Lease::new(self, slot)) {
                // That waiter gave up. Undo by hand: a dropped lease would take the lock again.
                lease.pool = None;
                let m = &self.machines[slot];
                m.active.fetch_sub(1, Ordering::Relaxed);
                m.chosen.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// A health check of machine `index` changed from passing to failing or back. The
    /// machine is in rotation while it fails none.
    pub fn check_changed(self: &Arc<Self>, index: usize, passing: bool, check: &str, why: &str) {
        let mut state = self.lock();
        let m = &self.machines[index];
        let failing = if passing {
            m.failing_checks.fetch_sub(1, Ordering::Relaxed) - 1
        } else {
            m.failing_checks.fetch_add(1, Ordering::Relaxed) + 1
        };
        let healthy = failing == 0;
        if healthy == m.healthy.swap(healthy, Ordering::Relaxed) {
            return;
        }
        let (service, machine) = (&self.service, &m.id);
        let in_rotation = self.in_rotation();
        if healthy {
            tracing::info!(%service, %machine, addr = %m.addr, %check, "machine back in rotation");
            if in_rotation == 1 && self.machines.len() > 1 {
                tracing::info!(%service, "a machine passes its checks again: routing only to passing machines");
            }
            self.serve_waiters(&mut state);
        } else {
            tracing::warn!(%service, %machine, addr = %m.addr, %check, %why, "machine out of rotation: health check failed");
            if in_rotation == 0 {
                tracing::error!(%service, "every machine fails its health checks: routing to all of them until one passes");
                // Machines left out a moment ago are candidates again.
                self.serve_waiters(&mut state);
            }
        }
    }
}

#[cfg(test)]
mod tests;
