//! Choosing a machine for each connection, as fly-proxy does: least-loaded by live
//! connections, in bands (machines under their soft limit first, then those between soft and
//! hard limit), ties broken at random; never past the hard limit. When every machine is at its
//! hard limit, connections wait in a bounded first-in first-out queue for a slot, up to a
//! maximum wait. A machine failing a health check is out of rotation until it passes again;
//! when every machine of a service fails, all of them are used (see [`Pool::pick`]). Every
//! decision is counted per machine and per service, and changes of state are logged.
//!
//! Machines spliced runs (`machines`) take connections only while started. A connection that
//! finds none of its service's machines running starts one and waits for it (all such
//! connections wait for the same one); one that lands on a machine past its soft limit starts
//! a spare in the background, as Fly's proxy does.

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

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::{
    config::AutoStop,
    machines::{Managed, State as MachineState},
};

/// The soft limit Fly's proxy assumes for a service that sets none, used by the stop rule.
pub const FLY_SOFT_LIMIT: u64 = 20;

/// A service's `auto_start_machines`, `auto_stop_machines` and `min_machines_running`, with
/// Fly's defaults (start on, stop off, none kept).
#[derive(Clone, Copy, Debug)]
pub struct Demand {
    pub auto_start: bool,
    pub auto_stop: AutoStop,
    pub min_running: u32,
}

impl Default for Demand {
    fn default() -> Self {
        Self {
            auto_start: true,
            auto_stop: AutoStop::Off,
            min_running: 0,
        }
    }
}

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
    /// Connections spliced to it now, through this pool and the pools it replaced (see
    /// [`Pool::carrying`]).
    pub active: Arc<AtomicU64>,
    /// Connections it has been given in all.
    pub chosen: AtomicU64,
    /// Connects it refused or did not answer in time.
    pub connect_failures: AtomicU64,
    /// In rotation: it passes every health check (true until a check says otherwise).
    pub healthy: AtomicBool,
    /// Health checks it fails now.
    pub failing_checks: AtomicU32,
    /// Which: bit N for the service's check N (`tcp_checks` then `http_checks`; from the 64th
    /// on, bit 63).
    #[serde(skip)]
    pub failing: AtomicU64,
    /// Health check runs it has had in all, passed or failed.
    pub checks: AtomicU64,
    /// Health check runs it has failed in all.
    pub check_failures: AtomicU64,
    /// How long its connects that succeeded took, in seconds (for the metrics).
    #[serde(skip)]
    pub connect_seconds: Histogram,
    /// The process spliced runs as this machine, if it does.
    #[serde(skip)]
    pub managed: Option<Arc<Managed>>,
}

impl MachineStats {
    /// Whether check `probe` of its service fails now.
    pub fn check_failing(&self, probe: usize) -> bool {
        self.failing.load(Ordering::Relaxed) & check_bit(probe) != 0
    }

    /// Whether it can take connections: always for a machine spliced does not run.
    pub fn running(&self) -> bool {
        self.managed
            .as_ref()
            .is_none_or(|m| m.state() == MachineState::Started)
    }
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
    /// Connections that found no machine running and waited for one to start.
    pub waited_for_start: AtomicU64,
    /// Connections refused because no machine could be started for them.
    pub start_failures: AtomicU64,
    /// Spare machines started because every running one was past its soft limit.
    pub spare_starts: AtomicU64,
}

/// The machines of one service and who waits for them.
pub struct Pool {
    pub service: String,
    pub machines: Vec<MachineStats>,
    soft_limit: Option<u64>,
    hard_limit: Option<u64>,
    policy: QueuePolicy,
    pub demand: Demand,
    state: Mutex<State>,
    /// The pool that replaced this one at a reload, sharing its machines' counts: a slot freed
    /// here may be the one its waiters wait for.
    successor: Mutex<std::sync::Weak<Pool>>,
    /// The pools this one replaced that still live (their connections go on).
    predecessors: Mutex<Vec<std::sync::Weak<Pool>>>,
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
    #[error("no machine runs and auto_start_machines is off")]
    NoneRunning,
    #[error("no machine could be started in time")]
    StartFailed,
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

    /// Its machine's id (its address where the config names none).
    pub fn id(&self) -> String {
        self.pool.as_ref().map_or_else(
            || self.machine.to_string(),
            |p| p.machines[self.index].id.clone(),
        )
    }

    /// Position of its machine in the pool, for [`Pool::retry`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// Records how long a connect to its machine took that succeeded.
    pub fn connected(&self, took: Duration) {
        if let Some(pool) = &self.pool {
            pool.machines[self.index]
                .connect_seconds
                .observe(took.as_secs_f64());
        }
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
                    active: Arc::default(),
                    chosen: AtomicU64::new(0),
                    connect_failures: AtomicU64::new(0),
                    healthy: AtomicBool::new(true),
                    failing_checks: AtomicU32::new(0),
                    failing: AtomicU64::new(0),
                    checks: AtomicU64::new(0),
                    check_failures: AtomicU64::new(0),
                    // 25 us doubling to about 0.8 s: loopback to a machine across the world.
                    connect_seconds: Histogram::new(exponential_buckets(25e-6, 2.0, 16)),
                    managed: None,
                })
                .collect::<Vec<_>>(),
            soft_limit: soft_limit.map(u64::from),
            hard_limit: hard_limit.map(u64::from),
            policy,
            demand: Demand::default(),
            successor: Mutex::default(),
            predecessors: Mutex::default(),
            state: Mutex::new(State {
                waiters: VecDeque::new(),
                queued_since: None,
                rng: seed,
            }),
            stats: PoolStats::default(),
        }
    }

    /// The same pool with the service's start and stop settings, and the processes spliced
    /// runs as its machines (`managed[i]` for machine `i`).
    #[must_use]
    pub fn with_demand(mut self, demand: Demand, managed: Vec<Option<Arc<Managed>>>) -> Self {
        self.demand = demand;
        for (m, managed) in self.machines.iter_mut().zip(managed) {
            m.managed = managed;
        }
        self
    }

    /// Shares, with `old` (the pool this one replaces at a reload), the live load of each
    /// machine both have (same id and address): connections still on `old` count against this
    /// pool's limits until they end, so a change of the machine set never lets a machine take
    /// more than its hard limit. With `same_checks` (the service's checks did not change),
    /// each such machine also keeps the outcome of each check, so one out of rotation stays
    /// out until its checks pass (the checks start again from those outcomes).
    #[must_use]
    pub fn carrying(mut self, old: &Pool, same_checks: bool) -> Self {
        for m in &mut self.machines {
            let Some(o) = old
                .machines
                .iter()
                .find(|o| o.id == m.id && o.addr == m.addr)
            else {
                continue;
            };
            m.active = Arc::clone(&o.active);
            if same_checks {
                let _state = old.lock();
                let failing = o.failing.load(Ordering::Relaxed);
                m.failing.store(failing, Ordering::Relaxed);
                m.failing_checks
                    .store(failing.count_ones(), Ordering::Relaxed);
                m.healthy.store(failing == 0, Ordering::Relaxed);
            }
        }
        self
    }

    /// Notes that `next`, made with [`Pool::carrying`] from this pool, replaces it: from now
    /// on a slot freed on this pool or on any pool this one replaced serves `next`'s waiters.
    pub fn replaced_by(self: &Arc<Self>, next: &Arc<Pool>) {
        let mut older: Vec<std::sync::Weak<Pool>> = lock(&self.predecessors)
            .iter()
            .filter(|p| p.strong_count() > 0)
            .cloned()
            .collect();
        older.push(Arc::downgrade(self));
        for p in older.iter().filter_map(std::sync::Weak::upgrade) {
            *lock(&p.successor) = Arc::downgrade(next);
        }
        *lock(&next.predecessors) = older;
    }

    /// A lease for a connection that exists already (one taken over at an upgrade) to machine
    /// `id` at `addr`: counted against the machine's limits from now until the lease goes.
    /// `None` when this pool has no such machine, or it is one spliced runs that is not started.
    pub fn adopt(self: &Arc<Self>, id: &str, addr: SocketAddr) -> Option<Lease> {
        let _state = self.lock();
        let i = self
            .machines
            .iter()
            .position(|m| m.id == id && m.addr == addr)?;
        let m = &self.machines[i];
        if let Some(managed) = &m.managed
            && !managed.enter()
        {
            return None;
        }
        m.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease::new(self, i))
    }

    /// Machines in rotation. Their flags change only with the state locked.
    fn in_rotation(&self) -> usize {
        self.machines
            .iter()
            .filter(|m| m.healthy.load(Ordering::Relaxed))
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
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
            if exclude.contains(&i)
                || !(all_failing || m.healthy.load(Ordering::Relaxed))
                || !m.running()
            {
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
        if let Some(managed) = &m.managed
            && !managed.enter()
        {
            // Stopped since it was looked at: choose again without it.
            let mut exclude = exclude.to_vec();
            exclude.push(i);
            return self.pick(state, &exclude);
        }
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
        if !self.machines.iter().any(MachineStats::running) {
            self.start_for_connection().await?;
        }
        let rx = {
            let mut state = self.lock();
            // Waiters go first: a newcomer never overtakes the queue.
            if state.waiters.is_empty()
                && let Some(index) = self.pick(&mut state, &[])
            {
                self.spare_if_busy(index);
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

    /// Starts a machine for a connection that found none running, and waits for it: a
    /// suspended one first (it resumes at once), then the first stopped one; one already
    /// starting is joined, so concurrent arrivals start one machine.
    async fn start_for_connection(&self) -> Result<(), Refusal> {
        let managed = || self.machines.iter().filter_map(|m| m.managed.as_ref());
        if !self.demand.auto_start {
            return Err(Refusal::NoneRunning);
        }
        let pick = managed()
            .find(|m| m.state() == MachineState::Suspended)
            .or_else(|| {
                managed()
                    .find(|m| matches!(m.state(), MachineState::Starting | MachineState::Stopping))
            })
            .or_else(|| managed().find(|m| m.can_start()))
            .or_else(|| managed().next());
        let Some(machine) = pick else {
            return Err(Refusal::NoMachine);
        };
        self.stats.waited_for_start.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = machine.ensure_started().await {
            self.stats.start_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %self.service, error = %e, "no machine for a connection");
            return Err(Refusal::StartFailed);
        }
        Ok(())
    }

    /// Starts a stopped or suspended machine in the background when the one just chosen is
    /// past its soft limit (every running machine then is).
    fn spare_if_busy(&self, chosen: usize) {
        let Some(soft) = self.soft_limit else {
            return;
        };
        if !self.demand.auto_start || self.machines[chosen].active.load(Ordering::Relaxed) <= soft {
            return;
        }
        let mut managed = self.machines.iter().filter_map(|m| m.managed.as_ref());
        // One spare at a time: connections arriving while it starts would each start another.
        if managed.clone().any(|m| m.state() == MachineState::Starting) {
            return;
        }
        let spare = managed.find(|m| {
            matches!(m.state(), MachineState::Stopped | MachineState::Suspended) && m.can_start()
        });
        if let Some(m) = spare {
            self.stats.spare_starts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(service = %self.service, machine = %m.spec.id, soft_limit = soft, "every running machine is past its soft limit: starting another");
            m.start_soon();
        }
    }

    /// At start: the machines spliced runs that should be running. Without auto-stop, all of
    /// them (nothing would ever stop them); with it, `min_machines_running` of them; the
    /// others start on demand.
    pub fn start_kept(&self) {
        let keep = match self.demand.auto_stop {
            AutoStop::Off => usize::MAX,
            AutoStop::Stop | AutoStop::Suspend => self.demand.min_running as usize,
        };
        for m in self
            .machines
            .iter()
            .filter_map(|m| m.managed.as_ref())
            .take(keep)
        {
            m.start_soon();
        }
    }

    /// One look of Fly's stop rule: while more than `min_machines_running` machines run and
    /// the service's connections would stay within the soft limit (Fly's default 20 when none
    /// is set) on one machine fewer, an idle machine spliced runs is stopped or suspended,
    /// the last listed first. A machine also serving a service without auto-stop is kept, and
    /// so is one started or resumed less than `min_age` ago.
    pub fn stop_idle(&self, every: &[Arc<Pool>], min_age: Duration) {
        if self.demand.auto_stop == AutoStop::Off {
            return;
        }
        let soft = self.soft_limit.unwrap_or(FLY_SOFT_LIMIT);
        let running: Vec<&MachineStats> = self.machines.iter().filter(|m| m.running()).collect();
        let mut n = running.len() as u64;
        let load: u64 = running
            .iter()
            .map(|m| m.active.load(Ordering::Relaxed))
            .sum();
        for m in running.iter().rev() {
            let Some(managed) = &m.managed else {
                continue;
            };
            if n <= u64::from(self.demand.min_running) || load > soft * (n - 1) {
                return;
            }
            let kept_elsewhere = every.iter().any(|p| {
                p.demand.auto_stop == AutoStop::Off
                    && p.machines
                        .iter()
                        .any(|o| o.managed.as_ref().is_some_and(|o| Arc::ptr_eq(o, managed)))
            });
            if !kept_elsewhere && managed.stop_if_idle(self.demand.auto_stop, min_age) {
                tracing::info!(service = %self.service, machine = %m.id, running = n - 1, load, how = ?self.demand.auto_stop, "idle machine stopped");
                n -= 1;
            }
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
        let m = &self.machines[index];
        m.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(managed) = &m.managed {
            managed.leave();
        }
        self.serve_waiters(&mut state);
        drop(state);
        let next = lock(&self.successor).upgrade();
        if let Some(next) = next {
            let mut state = next.lock();
            next.serve_waiters(&mut state);
        }
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
                if let Some(managed) = &m.managed {
                    managed.leave();
                }
            }
        }
    }

    /// A health check of machine `index` changed from passing to failing or back. The
    /// machine is in rotation while it fails none.
    pub fn check_changed(
        self: &Arc<Self>,
        index: usize,
        (probe, check): (usize, &str),
        passing: bool,
        why: &str,
    ) {
        let mut state = self.lock();
        let m = &self.machines[index];
        let bit = check_bit(probe);
        let failing = if passing {
            m.failing.fetch_and(!bit, Ordering::Relaxed) & !bit
        } else {
            m.failing.fetch_or(bit, Ordering::Relaxed) | bit
        };
        m.failing_checks
            .store(failing.count_ones(), Ordering::Relaxed);
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The bit of check `probe` in [`MachineStats::failing`].
fn check_bit(probe: usize) -> u64 {
    1 << probe.min(63)
}

#[cfg(test)]
mod tests;
