//! Machines spliced runs itself: a `[[machines]]` entry with a `command` is a child process,
//! started when a connection finds no machine of its service running, stopped (fly.toml's
//! `kill_signal`, SIGTERM by default, then SIGKILL after `kill_timeout`) or suspended
//! (SIGSTOP, resumed by SIGCONT) when idle, as Fly's proxy does with `auto_start_machines`,
//! `auto_stop_machines` and `min_machines_running`.
//!
//! Each machine leads its own process group and is killed if spliced dies. A machine is
//! `started` once its port accepts; only then is it given connections. Its live connections
//! are counted under the same lock that stops it, so a machine is never stopped under a
//! connection. A machine that exits within [`CRASH_WINDOW`] of its start, or fails to start,
//! backs off (1 s, doubling to 30 s) before the next start. Its output goes to the log, tagged
//! with its id; every change of state is logged and counted.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, BufReader},
    sync::watch,
    time::Instant,
};

use crate::config::AutoStop;

/// An exit sooner than this after a start counts as a crash and delays the next start.
pub const CRASH_WINDOW: Duration = Duration::from_secs(10);
/// The longest delay between starts of a crashing machine.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a starting machine's port is tried: from every millisecond (a refused connect
/// on the host costs microseconds), doubling to this.
const READY_POLL: Duration = Duration::from_millis(16);

/// Where a machine is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Stopped,
    /// Its process runs; its port does not accept yet.
    Starting,
    Started,
    /// Sent SIGTERM; not given connections.
    Stopping,
    Suspended,
    /// Exited soon after a start or failed to start: no start before the back-off ends.
    Failed,
}

/// How to run one machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub id: String,
    /// The program, then its arguments.
    pub command: Vec<String>,
    pub dir: Option<PathBuf>,
    /// Added to spliced's own environment: the config's `[env]` and `PORT`.
    pub env: Vec<(String, String)>,
    /// The address that accepts once the machine is ready.
    pub ready: SocketAddr,
    /// What stops it (fly.toml's `kill_signal`; SIGTERM by default), and how long it has
    /// before SIGKILL (`kill_timeout`, else `--machine-stop-grace`).
    pub stop_signal: i32,
    pub stop_grace: Duration,
}

/// Timings shared by every machine.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Longest wait for a start (`--start-timeout`).
    pub start_timeout: Duration,
    /// Between the stop signal and SIGKILL, when the config gives no `kill_timeout`.
    pub stop_grace: Duration,
}

/// The number of a signal `kill_signal` may name; SIGTERM for any other.
#[must_use]
pub fn signal_number(name: &str) -> i32 {
    match name {
        "SIGINT" => libc::SIGINT,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGUSR1" => libc::SIGUSR1,
        "SIGUSR2" => libc::SIGUSR2,
        "SIGKILL" => libc::SIGKILL,
        "SIGSTOP" => libc::SIGSTOP,
        _ => libc::SIGTERM,
    }
}

/// Why a machine could not be started for a connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    #[error("machine {0} did not start within the start timeout")]
    Timeout(String),
    #[error("machine {0} crashed or failed to start and backs off")]
    BackingOff(String),
}

/// Counters of one machine, for the admin snapshot.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    pub starts: AtomicU64,
    pub start_failures: AtomicU64,
    pub exits: AtomicU64,
    pub crashes: AtomicU64,
    pub stops: AtomicU64,
    pub suspends: AtomicU64,
    pub resumes: AtomicU64,
}

struct Inner {
    /// Process group (the child's pid) while a process runs.
    pgid: Option<u32>,
    /// Connections routed to it now, over every service.
    live: u64,
    /// Set by a stop: the exit that follows is expected.
    stopping: bool,
    /// When the current process became `started`.
    started_at: Option<Instant>,
    /// When it last began to take connections: its start, or its last resume.
    serving_since: Option<Instant>,
    /// Crashes and failed starts in a row.
    failures: u32,
    retry_at: Option<Instant>,
    /// Raised at each start, so that a stale SIGKILL timer does nothing.
    generation: u64,
}

/// One machine spliced runs.
pub struct Managed {
    pub spec: Spec,
    timing: Timing,
    runtime: tokio::runtime::Handle,
    state: watch::Sender<State>,
    inner: Mutex<Inner>,
    pub counters: Counters,
}

impl std::fmt::Debug for Managed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Managed")
            .field("id", &self.spec.id)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// What the admin snapshot shows of a machine.
#[derive(Debug, Serialize)]
pub struct Snapshot<'a> {
    pub id: &'a str,
    pub state: State,
    pub pid: Option<u32>,
    pub live: u64,
    #[serde(flatten)]
    pub counters: &'a Counters,
}

impl Managed {
    /// A stopped machine; its processes run on `runtime`, whose threads outlive them.
    pub fn new(spec: Spec, timing: Timing, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Self {
            spec,
            timing,
            runtime,
            state: watch::Sender::new(State::Stopped),
            inner: Mutex::new(Inner {
                pgid: None,
                live: 0,
                stopping: false,
                started_at: None,
                serving_since: None,
                failures: 0,
                retry_at: None,
                generation: 0,
            }),
            counters: Counters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    pub fn snapshot(&self) -> Snapshot<'_> {
        let inner = self.lock();
        Snapshot {
            id: &self.spec.id,
            state: self.state(),
            pid: inner.pgid,
            live: inner.live,
            counters: &self.counters,
        }
    }

    fn set(&self, state: State) {
        let was = self.state.send_replace(state);
        if was != state {
            tracing::info!(machine = %self.spec.id, from = ?was, to = ?state, "machine state");
        }
    }

    /// Counts a connection routed to it, if it is started; the check and the count are one
    /// step with any stop.
    pub fn enter(&self) -> bool {
        let mut inner = self.lock();
        if self.state() != State::Started {
            return false;
        }
        inner.live += 1;
        true
    }

    /// A connection counted by [`Self::enter`] ended.
    pub fn leave(&self) {
        let mut inner = self.lock();
        inner.live = inner.live.saturating_sub(1);
    }

    pub fn live(&self) -> u64 {
        self.lock().live
    }

    /// Whether a start for a connection may begin now, or the machine is on its way up.
    pub fn can_start(&self) -> bool {
        match self.state() {
            State::Failed => self.lock().retry_at.is_none_or(|t| t <= Instant::now()),
            _ => true,
        }
    }

    /// Returns once the machine is started: at once if it is, after SIGCONT if suspended,
    /// else after a start (joined by every caller while it lasts). Bounded by the start
    /// timeout; a back-off that ends within it is waited out.
    pub async fn ensure_started(self: &Arc<Self>) -> Result<(), StartError> {
        let deadline = Instant::now() + self.timing.start_timeout;
        let mut rx = self.state.subscribe();
        loop {
            let wait_until = {
                let mut inner = self.lock();
                let state = *rx.borrow_and_update();
                match state {
                    State::Started => return Ok(()),
                    State::Suspended => {
                        self.resume(&mut inner);
                        return Ok(());
                    }
                    State::Failed if inner.retry_at.is_some_and(|t| t > Instant::now()) => {
                        let at = inner.retry_at.expect("checked");
                        if at >= deadline {
                            return Err(StartError::BackingOff(self.spec.id.clone()));
                        }
                        Some(at)
                    }
                    State::Stopped | State::Failed => {
                        self.begin_start(&mut inner);
                        None
                    }
                    State::Starting | State::Stopping => None,
                }
            };
            if let Some(at) = wait_until {
                tokio::time::sleep_until(at).await;
                continue;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(StartError::Timeout(self.spec.id.clone())),
            }
        }
    }

    /// Starts in the background, for a spare machine or `min_machines_running`.
    pub fn start_soon(self: &Arc<Self>) {
        let this = Arc::clone(self);
        self.runtime.spawn(async move {
            if let Err(e) = this.ensure_started().await {
                tracing::warn!(error = %e, "background start failed");
            }
        });
    }

    fn resume(&self, inner: &mut Inner) {
        if let Some(pgid) = inner.pgid
            && let Err(e) = crate::sys::signal_group(pgid, libc::SIGCONT)
        {
            tracing::error!(machine = %self.spec.id, error = %e, "cannot resume the machine");
            return;
        }
        inner.serving_since = Some(Instant::now());
        self.counters.resumes.fetch_add(1, Ordering::Relaxed);
        self.set(State::Started);
    }

    fn begin_start(self: &Arc<Self>, inner: &mut Inner) {
        inner.generation += 1;
        inner.stopping = false;
        inner.retry_at = None;
        self.set(State::Starting);
        let this = Arc::clone(self);
        let generation = inner.generation;
        self.runtime
            .spawn(async move { this.run(generation).await });
    }

    /// Runs one life of the machine's process: spawn, wait for its port, wait for its exit.
    async fn run(self: Arc<Self>, generation: u64) {
        let spec = &self.spec;
        let mut cmd = tokio::process::Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..])
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            // Its readiness is spliced's to tell, not the machine's.
            .env_remove(crate::sys::NOTIFY_SOCKET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &spec.dir {
            cmd.current_dir(dir);
        }
        crate::sys::die_with_parent(&mut cmd);
        crate::sys::pass_no_capabilities(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.start_failed(&format!("cannot run {:?}: {e}", spec.command[0]));
                return;
            }
        };
        let pid = child.id();
        self.lock().pgid = pid;
        self.counters.starts.fetch_add(1, Ordering::Relaxed);
        tracing::info!(machine = %spec.id, ?pid, command = ?spec.command, "machine process started");
        if let Some(out) = child.stdout.take() {
            self.runtime.spawn(forward(spec.id.clone(), "stdout", out));
        }
        if let Some(err) = child.stderr.take() {
            self.runtime.spawn(forward(spec.id.clone(), "stderr", err));
        }
        let ready = tokio::time::timeout(self.timing.start_timeout, accepts(spec.ready));
        tokio::select! {
            status = child.wait() => {
                self.lock().pgid = None;
                self.start_failed(&format!("exited before accepting on {}: {}", spec.ready, describe(status)));
                return;
            }
            ready = ready => if ready.is_err() {
                if let Some(pgid) = pid {
                    crate::sys::signal_group(pgid, libc::SIGKILL).ok();
                }
                let _ = child.wait().await;
                self.lock().pgid = None;
                self.start_failed(&format!("did not accept on {} within {:?}", spec.ready, self.timing.start_timeout));
                return;
            }
        }
        {
            let mut inner = self.lock();
            if inner.generation != generation || inner.stopping {
                // Stopped while starting: the exit below is expected.
            } else {
                inner.started_at = Some(Instant::now());
                inner.serving_since = inner.started_at;
                self.set(State::Started);
            }
        }
        let status = child.wait().await;
        self.exited(&describe(status));
    }

    fn start_failed(&self, why: &str) {
        let mut inner = self.lock();
        self.counters.start_failures.fetch_add(1, Ordering::Relaxed);
        if inner.stopping {
            inner.stopping = false;
            self.set(State::Stopped);
            return;
        }
        let delay = backoff(&mut inner);
        tracing::error!(machine = %self.spec.id, %why, retry_in = ?delay, "machine failed to start");
        self.set(State::Failed);
    }

    fn exited(&self, status: &str) {
        let mut inner = self.lock();
        inner.pgid = None;
        self.counters.exits.fetch_add(1, Ordering::Relaxed);
        let ran = inner.started_at.take().map(|t| t.elapsed());
        if std::mem::take(&mut inner.stopping) {
            tracing::info!(machine = %self.spec.id, %status, "machine stopped");
            self.set(State::Stopped);
        } else if ran.is_some_and(|r| r >= CRASH_WINDOW) {
            inner.failures = 0;
            tracing::warn!(machine = %self.spec.id, %status, "machine exited on its own; the next connection starts it");
            self.set(State::Stopped);
        } else {
            self.counters.crashes.fetch_add(1, Ordering::Relaxed);
            let delay = backoff(&mut inner);
            tracing::error!(machine = %self.spec.id, %status, ?ran, retry_in = ?delay, "machine crashed soon after its start");
            self.set(State::Failed);
        }
    }

    /// Stops or suspends the machine if it is started, carries no connection and has run
    /// for at least `min_age` (a machine just started for a spare gets a look's time to take
    /// connections); true if it did.
    pub fn stop_if_idle(self: &Arc<Self>, how: AutoStop, min_age: Duration) -> bool {
        let mut inner = self.lock();
        if self.state() != State::Started
            || inner.live > 0
            || inner.serving_since.is_some_and(|t| t.elapsed() < min_age)
        {
            return false;
        }
        let Some(pgid) = inner.pgid else {
            return false;
        };
        match how {
            AutoStop::Off => false,
            AutoStop::Suspend => {
                if let Err(e) = crate::sys::signal_group(pgid, libc::SIGSTOP) {
                    tracing::error!(machine = %self.spec.id, error = %e, "cannot suspend the machine");
                    return false;
                }
                self.counters.suspends.fetch_add(1, Ordering::Relaxed);
                self.set(State::Suspended);
                true
            }
            AutoStop::Stop => {
                self.terminate(&mut inner, pgid);
                true
            }
        }
    }

    /// Stops the machine whatever it carries: spliced is exiting.
    pub fn stop(self: &Arc<Self>) {
        let mut inner = self.lock();
        if let Some(pgid) = inner.pgid
            && !inner.stopping
        {
            self.terminate(&mut inner, pgid);
        }
    }

    /// The stop signal to the group (after SIGCONT, so a suspended one can act on it),
    /// SIGKILL after the grace period if the same process still runs.
    fn terminate(self: &Arc<Self>, inner: &mut Inner, pgid: u32) {
        inner.stopping = true;
        self.counters.stops.fetch_add(1, Ordering::Relaxed);
        self.set(State::Stopping);
        crate::sys::signal_group(pgid, libc::SIGCONT).ok();
        if let Err(e) = crate::sys::signal_group(pgid, self.spec.stop_signal) {
            tracing::error!(machine = %self.spec.id, error = %e, "cannot stop the machine");
        }
        let this = Arc::clone(self);
        let generation = inner.generation;
        self.runtime.spawn(async move {
            tokio::time::sleep(this.spec.stop_grace).await;
            let inner = this.lock();
            if inner.generation == generation
                && inner.stopping
                && let Some(pgid) = inner.pgid
            {
                tracing::warn!(machine = %this.spec.id, grace = ?this.spec.stop_grace, "machine still runs after its stop signal: killing it");
                crate::sys::signal_group(pgid, libc::SIGKILL).ok();
            }
        });
    }

    /// Waits until no process of the machine runs.
    pub async fn stopped(&self) {
        let mut rx = self.state.subscribe();
        loop {
            if self.lock().pgid.is_none() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The delay before the next start after one more failure in a row.
fn backoff(inner: &mut Inner) -> Duration {
    inner.failures += 1;
    let delay = Duration::from_secs(1 << inner.failures.saturating_sub(1).min(5)).min(MAX_BACKOFF);
    inner.retry_at = Some(Instant::now() + delay);
    delay
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// Returns once `addr` accepts a connection.
async fn accepts(addr: SocketAddr) {
    let mut pause = Duration::from_millis(1);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(READY_POLL);
    }
}

/// Logs each line a machine writes, tagged with its id.
async fn forward(id: String, stream: &'static str, from: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(machine = %id, stream, "{line}");
    }
}
