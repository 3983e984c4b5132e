//! Upgrading the binary without refusing a connection (`kill -USR2`, as nginx does): the
//! binary at the same path starts with the same arguments and receives every listening
//! socket, the admin socket and the metrics listener over a Unix socket pair; once it
//! serves, it says so, and this process stops accepting and serves the connections it has
//! to their end (within `--grace`), as on SIGTERM. The listening sockets are the same
//! sockets in both processes, so no connection waiting in an accept queue is lost and none
//! is refused. If the new process fails before it serves, this one goes on as before.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{Endpoints, Shared, connection, generation::Ports, live::Carrier};
use crate::{
    dataplane::{
        Outcome, Phase, Plane, SpliceError,
        copy::{self, CopyPair},
        kernel::KernelFds,
        sockmap::{Spliced, Splicer, handover},
    },
    sys,
};

/// The environment variable that gives the new process its end of the socket pair.
pub(super) const ENV: &str = "SPLICED_UPGRADE_FD";

/// Longest wait for the new process to serve.
const START_LIMIT: Duration = Duration::from_secs(60);

/// One record of the handover: what the descriptor sent with it is.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
#[serde(rename_all = "snake_case")]
enum Record {
    Listener(SocketAddr),
    Admin,
    Metrics,
    /// The directory of the daemon's cgroup at this path, where the hold program attaches.
    Cgroup(String),
    End,
    /// A spliced connection, with its client's and machine's sockets; the bytes userspace
    /// held of it follow ([`handover::send_pending`]).
    Connection(Box<ConnectionRecord>),
    /// A connection of the copy plane, with its client's and machine's sockets; the bytes
    /// read and not yet written follow.
    Copied(Box<CopiedRecord>),
    /// The kernel objects of the splicer `id`, in [`Kernel::HANDOVER_ORDER`].
    Kernel {
        id: u64,
    },
}

/// What the new process needs to serve a spliced connection on.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct ConnectionRecord {
    client: SocketAddr,
    service: String,
    machine: Option<(String, SocketAddr)>,
    snapshot: handover::PairSnapshot,
}

/// What the new process needs to serve a connection of the copy plane on.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct CopiedRecord {
    client: SocketAddr,
    service: String,
    machine: Option<(String, SocketAddr)>,
    /// Its client socket carries kernel TLS.
    kernel_tls: bool,
    directions: [copy::DirectionSnapshot; 2],
}

/// Copies of the descriptors this process serves on, as the next one takes them.
pub(super) struct Handover {
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
    pub admin: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub cgroup: Option<(String, OwnedFd)>,
}

/// What a process started by an upgrade received; empty in any other.
#[derive(Default)]
pub(super) struct Inherited {
    pub listeners: HashMap<SocketAddr, Vec<std::net::TcpListener>>,
    pub admin: Option<std::os::unix::net::UnixListener>,
    pub metrics: Option<std::net::TcpListener>,
    /// The way back to the process that started this one.
    channel: Option<OwnedFd>,
}

impl Inherited {
    /// Receives the handover when [`ENV`] names a descriptor, and forgets the variable so
    /// that nothing this process starts sees it.
    pub fn receive() -> io::Result<Self> {
        let Some(channel) = sys::take_env_fd(ENV)? else {
            return Ok(Self::default());
        };
        let mut inherited = Self::default();
        let mut buf = [0u8; 1024];
        loop {
            let (n, fds) = sys::recv_record(channel.as_fd(), &mut buf)?;
            let fd = fds.into_iter().next();
            if n == 0 {
                return Err(io::Error::other("the upgrading process went away"));
            }
            let record: Record = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
            match (record, fd) {
                (Record::End, _) => break,
                (Record::Listener(addr), Some(fd)) => inherited
                    .listeners
                    .entry(addr)
                    .or_default()
                    .push(std::net::TcpListener::from(fd)),
                (Record::Admin, Some(fd)) => {
                    inherited.admin = Some(std::os::unix::net::UnixListener::from(fd));
                }
                (Record::Metrics, Some(fd)) => {
                    inherited.metrics = Some(std::net::TcpListener::from(fd));
                }
                (Record::Cgroup(path), Some(fd)) => crate::dataplane::cgroup::adopt(path, fd),
                (
                    record @ (Record::Connection(_) | Record::Copied(_) | Record::Kernel { .. }),
                    _,
                ) => {
                    return Err(io::Error::other(format!(
                        "{record:?} came before the process served"
                    )));
                }
                (record, None) => {
                    return Err(io::Error::other(format!(
                        "{record:?} came without its socket"
                    )));
                }
            }
        }
        let count: usize = inherited.listeners.values().map(Vec::len).sum();
        tracing::info!(
            listeners = count,
            "upgrade: took over the listening sockets"
        );
        inherited.channel = Some(channel);
        Ok(inherited)
    }

    /// Whether this process was started by an upgrade.
    pub fn is_upgrade(&self) -> bool {
        self.channel.is_some()
    }

    /// Tells the process that started this one that this one serves: it stops accepting and
    /// hands over its spliced connections, which are taken over from here on.
    pub fn serving(&mut self, shared: &Arc<Shared>, phase: &watch::Receiver<Phase>) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        if let Err(e) = sys::send_record(channel.as_fd(), b"ready", &[]) {
            tracing::warn!(error = %e, "upgrade: could not tell the old process");
            return;
        }
        let (shared, phase) = (Arc::clone(shared), phase.clone());
        let runtime = tokio::runtime::Handle::current();
        let spawned = std::thread::Builder::new()
            .name("spliced-takeover".to_owned())
            .spawn(move || {
                let _entered = runtime.enter();
                match take_over(&shared, &channel, &phase) {
                    Ok(n) => tracing::info!(connections = n, "upgrade: took over the spliced connections"),
                    Err(e) => tracing::error!(error = %e, "upgrade: taking over the spliced connections failed"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "upgrade: cannot take over the spliced connections");
        }
    }
}

/// Why an upgrade did not happen; the process goes on serving.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpgradeError {
    #[error(
        "the config runs machines (`[[machines]]` with `command`), which end with this process: restart spliced instead"
    )]
    Machines,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the new process exited before it served ({0})")]
    Exited(std::process::ExitStatus),
    #[error("the new process did not serve within {0:?}")]
    TimedOut(Duration),
}

/// The binary this process was started from, even if the file was replaced since.
fn binary() -> io::Result<std::path::PathBuf> {
    let link = std::fs::read_link("/proc/self/exe")?;
    let text = link.to_string_lossy();
    Ok(text
        .strip_suffix(" (deleted)")
        .map_or_else(|| link.clone(), std::path::PathBuf::from))
}

/// Starts the new process, hands it `sockets`, and waits until it serves: its pid, and the
/// way to it.
pub(super) fn start_successor(sockets: &Handover) -> Result<(u32, OwnedFd), UpgradeError> {
    let (ours, theirs) = sys::seqpacket_pair()?;
    let exe = binary()?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(std::env::args_os().skip(1))
        .env(ENV, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null());
    sys::inherit_fd(&mut cmd, theirs.as_raw_fd());
    // After `--user` (or under a service manager's user) it loads its programs with what
    // this process kept.
    sys::pass_capabilities(&mut cmd);
    let mut child = cmd.spawn()?;
    drop(theirs);
    tracing::info!(pid = child.id(), binary = %exe.display(), "upgrade: new process started");
    let outcome = send_all(ours.as_fd(), sockets)
        .map_err(UpgradeError::from)
        .and_then(|()| wait_ready(&ours, &mut child));
    let outcome = match outcome {
        // Its end of the pair closed under a send or a read: it is exiting.
        Err(UpgradeError::Io(e)) => {
            Err(exit_status(&mut child).map_or(UpgradeError::Io(e), UpgradeError::Exited))
        }
        other => other,
    };
    if outcome.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    outcome.map(|()| (child.id(), ours))
}

/// How `child` exited, if it does within a second.
fn exit_status(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn send_all(sock: std::os::fd::BorrowedFd<'_>, sockets: &Handover) -> io::Result<()> {
    let send = |record: &Record, fds: &[std::os::fd::BorrowedFd<'_>]| {
        let payload = serde_json::to_vec(record).map_err(io::Error::other)?;
        sys::send_record(sock, &payload, fds)
    };
    for (addr, fd) in &sockets.listeners {
        send(&Record::Listener(*addr), &[fd.as_fd()])?;
    }
    if let Some(fd) = &sockets.admin {
        send(&Record::Admin, &[fd.as_fd()])?;
    }
    if let Some(fd) = &sockets.metrics {
        send(&Record::Metrics, &[fd.as_fd()])?;
    }
    if let Some((path, fd)) = &sockets.cgroup {
        send(&Record::Cgroup(path.clone()), &[fd.as_fd()])?;
    }
    send(&Record::End, &[])
}

/// Waits for the new process's word that it serves, while it runs.
fn wait_ready(ours: &OwnedFd, child: &mut std::process::Child) -> Result<(), UpgradeError> {
    socket2::SockRef::from(ours).set_read_timeout(Some(Duration::from_millis(200)))?;
    let started = Instant::now();
    let mut buf = [0u8; 16];
    loop {
        match sys::recv_record(ours.as_fd(), &mut buf) {
            Ok((n, _)) if &buf[..n] == b"ready" => return Ok(()),
            // Its end closed without a word: it is exiting, or will not serve.
            Ok((0, _)) => {
                let status = child.wait()?;
                return Err(UpgradeError::Exited(status));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(status) = child.try_wait()? {
            return Err(UpgradeError::Exited(status));
        }
        if started.elapsed() > START_LIMIT {
            return Err(UpgradeError::TimedOut(START_LIMIT));
        }
    }
}

/// SIGUSR2: starts the new process and hands it the listening sockets; its pid once it
/// serves, `None` (logged) when it did not, and this one serves on.
pub(super) async fn on_signal(
    shared: &Shared,
    ports: &Ports,
    endpoints: &Endpoints,
) -> Option<u32> {
    let refused = if shared.current().managed.is_empty() {
        None
    } else {
        Some(UpgradeError::Machines)
    };
    let copies = || -> std::io::Result<Handover> {
        let copy = |fd: &Option<std::os::fd::OwnedFd>| {
            fd.as_ref().map(std::os::fd::OwnedFd::try_clone).transpose()
        };
        Ok(Handover {
            listeners: ports.listener_copies()?,
            admin: copy(&endpoints.admin)?,
            metrics: copy(&endpoints.metrics)?,
            cgroup: crate::dataplane::cgroup::opened(),
        })
    };
    let started = match refused {
        Some(e) => Err(e),
        None => match copies() {
            Ok(handover) => tokio::task::spawn_blocking(move || start_successor(&handover))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e).into())),
            Err(e) => Err(e.into()),
        },
    };
    match started {
        Ok((pid, channel)) => {
            *shared
                .successor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(channel);
            Some(pid)
        }
        Err(e) => {
            shared
                .reloads
                .upgrades_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!("SIGUSR2: no upgrade, still serving: {e}");
            None
        }
    }
}

/// The splicers of this process: its own and those over kernels it took over.
fn splicers(shared: &Shared) -> Vec<SplicerRef<'_>> {
    let mut all = Vec::new();
    if let Plane::Sockmap(own) = &shared.plane {
        all.push(SplicerRef::Own(own));
    }
    let adopted = shared
        .adopted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    all.extend(
        adopted
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .map(SplicerRef::Adopted),
    );
    all
}

enum SplicerRef<'a> {
    Own(&'a Splicer),
    Adopted(Arc<Adopted>),
}

/// A splicer over a kernel taken over at an upgrade. When its last connection ends and it
/// goes, its counters are kept in [`Shared`]'s totals.
pub(super) struct Adopted {
    splicer: Splicer,
    shared: std::sync::Weak<Shared>,
}

impl std::ops::Deref for Adopted {
    type Target = Splicer;
    fn deref(&self) -> &Splicer {
        &self.splicer
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut retired = shared
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for service in 0..proxy_common::MAX_SERVICES {
            let totals = self.splicer.kernel.service_totals(service);
            if totals != proxy_common::ServiceCounters::default() {
                retired.entry(service).or_default().add(&totals);
            }
        }
    }
}

impl std::ops::Deref for SplicerRef<'_> {
    type Target = Splicer;
    fn deref(&self) -> &Splicer {
        match self {
            Self::Own(s) => s,
            Self::Adopted(s) => s,
        }
    }
}

/// Longest wait for the next connection to stop for the handover.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Once the new process serves: stops every spliced connection between two of its events,
/// and every one the copy plane carries between two of its calls, and hands it over (each
/// connection's task sends it, [`send_connection`], [`send_copied`]), then gives each
/// splicer's kernel, whose ring buffer this process no longer reads. TLS sessions that rustls
/// carries and HTTP connections, whose state lives in this process, are left to finish here.
pub(super) async fn hand_over(shared: &Shared, phase: &watch::Sender<Phase>) {
    let has_channel = shared
        .successor
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_some();
    if !has_channel {
        return;
    }
    let all = splicers(shared);
    if let Some(s) = all.iter().find(|s| !s.kernel.can_hand_over()) {
        tracing::error!(
            kernel = s.id(),
            "upgrade: a kernel cannot be handed over: the spliced connections stay here"
        );
        // The new process stops waiting for connections when the way to it closes.
        drop(
            shared
                .successor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        return;
    }
    for s in &all {
        s.stop_taking();
    }
    shared.copy_handover.close();
    phase.send_replace(Phase::HandOver);
    let running =
        || all.iter().map(|s| s.running()).sum::<usize>() + shared.copy_handover.running();
    // However many there are, as long as they go: the wait ends when none went for a while.
    let (mut left, mut moved) = (running(), Instant::now());
    while left > 0 && moved.elapsed() < STOP_LIMIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = running();
        if now < left {
            moved = Instant::now();
        }
        left = now;
    }
    if left > 0 {
        tracing::error!(
            left,
            "upgrade: connections did not stop for the handover (the copied ones stay here)"
        );
    }
    let mut given = Vec::new();
    for s in &all {
        match s.give_kernel().await {
            Ok(fds) => given.push((s.id(), fds)),
            Err(e) => tracing::error!(error = %e, "upgrade: a kernel could not be handed over"),
        }
    }
    let Some(channel) = shared
        .successor
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    else {
        return;
    };
    let sent = given.iter().try_for_each(|(id, KernelFds(fds))| {
        let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        send(channel.as_fd(), &Record::Kernel { id: *id }, &fds)
    });
    if let Err(e) = sent.and_then(|()| send(channel.as_fd(), &Record::End, &[])) {
        tracing::error!(error = %e, "upgrade: the kernel handover failed");
    }
    tracing::info!(
        handed = shared.stats.handed_over.load(Ordering::Relaxed),
        "upgrade: spliced connections handed over"
    );
}

fn send(
    sock: std::os::fd::BorrowedFd<'_>,
    record: &Record,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<()> {
    let payload = serde_json::to_vec(record).map_err(io::Error::other)?;
    sys::send_record(sock, &payload, fds)
}

/// Sends a connection stopped for the handover to the new process: it serves it from here.
/// A connection that cannot be sent is reset.
pub(super) fn send_connection(
    shared: &Shared,
    handed: &handover::HandedPair,
) -> Result<Outcome, SpliceError> {
    let record = |d: super::live::Described| {
        Record::Connection(Box::new(ConnectionRecord {
            client: d.client,
            service: d.service,
            machine: d.machine,
            snapshot: handed.snapshot.clone(),
        }))
    };
    let sent = send_live(
        shared,
        handed.snapshot.cookies[0],
        record,
        handed.fds(),
        &handed.pending,
    );
    // Its kernel is the new process's: kept here, nothing would move its bytes.
    let sent = match sent {
        Ok(Handed::Sent) => Ok(Outcome::HandedOver),
        Ok(Handed::Kept) => Err(io::Error::other(
            "the handover ended before this connection",
        )),
        Err(e) => Err(e),
    };
    sent.map_err(SpliceError::Internal)
        .inspect_err(|_| handed.reset())
}

/// [`send_connection`] for a connection of the copy plane; `cookie`: its client socket's.
/// One kept goes on here.
pub(super) fn send_copied(
    shared: &Shared,
    pair: &CopyPair,
    cookie: u64,
) -> Result<Handed, SpliceError> {
    let (directions, pending) = pair.snapshot();
    tracing::debug!(
        pending_to_machine = directions[0].pending,
        pending_to_client = directions[1].pending,
        "upgrade: handing over a copied connection"
    );
    let record = |d: super::live::Described| {
        Record::Copied(Box::new(CopiedRecord {
            client: d.client,
            service: d.service,
            machine: d.machine,
            kernel_tls: pair.is_kernel_tls(),
            directions,
        }))
    };
    send_live(shared, cookie, record, pair.fds(), &pending)
        .map_err(SpliceError::Internal)
        .inspect_err(|_| pair.reset())
}

/// Whether a connection stopped for the handover went to the new process.
pub(super) enum Handed {
    Sent,
    /// Nothing of it was sent (the handover is over, or the new process went away before
    /// its record): it is still this process's, whole.
    Kept,
}

/// Sends the record `record` makes of the live connection `cookie` (its client socket's),
/// with its two sockets, then the bytes it held each way. An error once its record went
/// leaves the connection in neither process.
fn send_live(
    shared: &Shared,
    cookie: u64,
    record: impl FnOnce(super::live::Described) -> Record,
    fds: [std::os::fd::BorrowedFd<'_>; 2],
    pending: &[Vec<u8>; 2],
) -> io::Result<Handed> {
    let described = shared
        .live
        .describe(cookie)
        .ok_or_else(|| io::Error::other("the connection is not among the live ones"))?;
    let channel = shared
        .successor
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(channel) = channel.as_ref() else {
        return Ok(Handed::Kept);
    };
    // A record goes whole or not at all (a datagram).
    if let Err(e) = send(channel.as_fd(), &record(described), &fds) {
        tracing::warn!(error = %e, "upgrade: a connection could not be handed over: it stays here");
        return Ok(Handed::Kept);
    }
    handover::send_pending(channel.as_fd(), pending)?;
    Ok(Handed::Sent)
}

/// Receives the spliced connections and their kernels from the process that started this
/// one, and serves each on the kernel it ran on. How many were taken over.
fn take_over(
    shared: &Arc<Shared>,
    channel: &OwnedFd,
    phase: &watch::Receiver<Phase>,
) -> io::Result<usize> {
    let settings = crate::dataplane::sockmap::Settings {
        budget: Arc::clone(&shared.budget),
        idle_timeout: shared.opts.idle_timeout,
        egress_audit: false,
    };
    let mut buf = vec![0u8; 1 << 16];
    let mut waiting: Vec<(ConnectionRecord, handover::HandedPair)> = Vec::new();
    let mut kernels: HashMap<u64, Arc<Adopted>> = HashMap::new();
    let mut taken = 0;
    loop {
        let (n, fds) = sys::recv_record(channel.as_fd(), &mut buf)?;
        if n == 0 {
            break;
        }
        let record: Record = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
        match record {
            Record::Connection(c) => {
                let [client, backend]: [OwnedFd; 2] = fds
                    .try_into()
                    .map_err(|_| io::Error::other("a connection came without its two sockets"))?;
                let lengths = c.snapshot.sides.each_ref().map(|s| s.pending);
                let pending = handover::recv_pending(channel.as_fd(), lengths)?;
                let handed = handover::HandedPair::new(
                    client.into(),
                    backend.into(),
                    c.snapshot.clone(),
                    pending,
                );
                waiting.push((*c, handed));
            }
            Record::Copied(c) => {
                let [client, backend]: [OwnedFd; 2] = fds
                    .try_into()
                    .map_err(|_| io::Error::other("a connection came without its two sockets"))?;
                let lengths = c.directions.map(|d| d.pending);
                let pending = handover::recv_pending(channel.as_fd(), lengths)?;
                taken += 1;
                resume_copied(shared, *c, [client, backend], pending, phase.clone());
            }
            Record::Kernel { id } => {
                let splicer = Splicer::adopt(settings.clone(), id, KernelFds(fds))
                    .map_err(|e| io::Error::other(format!("adopting a kernel: {e}")))?;
                let splicer = Arc::new(Adopted {
                    splicer,
                    shared: Arc::downgrade(shared),
                });
                shared
                    .adopted
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Arc::downgrade(&splicer));
                kernels.insert(id, splicer);
            }
            Record::End => break,
            other => tracing::warn!(record = ?other, "upgrade: unexpected record after ready"),
        }
    }
    for (record, handed) in waiting {
        let Some(splicer) = kernels.get(&record.snapshot.kernel) else {
            tracing::error!(client = %record.client, "upgrade: a connection came without its kernel: reset");
            handed.reset();
            continue;
        };
        taken += 1;
        resume(shared, Arc::clone(splicer), record, handed, phase.clone());
    }
    Ok(taken)
}

/// Serves a connection of the copy plane taken over, counted as this process's own. One
/// whose sockets cannot be served here is reset.
fn resume_copied(
    shared: &Arc<Shared>,
    record: CopiedRecord,
    [client, backend]: [OwnedFd; 2],
    pending: [Vec<u8>; 2],
    phase: watch::Receiver<Phase>,
) {
    let shared = Arc::clone(shared);
    shared.stats.taken_over.fetch_add(1, Ordering::Relaxed);
    shared.stats.active.fetch_add(1, Ordering::AcqRel);
    let share = shared.budget.enter();
    // Everything past the record is done in the task: the records of the next connections
    // wait for this loop, and their connections stand still until they are read.
    tokio::spawn(async move {
        let [client, backend] = [client, backend].map(std::net::TcpStream::from);
        let sockets = (|| {
            let cookies = [
                sys::socket_cookie(client.as_fd())?,
                sys::socket_cookie(backend.as_fd())?,
            ];
            let client = tokio::net::TcpStream::from_std(client.try_clone()?)?;
            let backend = tokio::net::TcpStream::from_std(backend.try_clone()?)?;
            io::Result::Ok((cookies, client, backend))
        })();
        let result = match sockets {
            Ok((cookies, served_client, served_backend)) => {
                // The copies serve it from here on.
                drop((client, backend));
                let (client, backend) = (served_client, served_backend);
                let lease = adopt_lease(&shared, &record.service, record.machine.as_ref());
                let tracked = shared
                    .live
                    .track(cookies[0], record.client, &record.service);
                if let Some((id, addr)) = &record.machine {
                    shared.live.connected(cookies[0], id, *addr, cookies[1]);
                }
                let carrier = if record.kernel_tls {
                    Carrier::KernelTls
                } else {
                    Carrier::Copy
                };
                shared.live.carried(cookies[0], carrier);
                let pair = CopyPair::resume(
                    (client, backend),
                    record.kernel_tls,
                    record.directions,
                    pending,
                );
                let result = connection::copy_pair(&shared, pair, cookies[0], phase, 0).await;
                drop((tracked, lease));
                result
            }
            Err(e) => {
                tracing::error!(client = %record.client, error = %e, "upgrade: a copied connection cannot be served here: reset");
                sys::reset_on_close([client.as_fd(), backend.as_fd()]);
                Err(SpliceError::Internal(e))
            }
        };
        connection::count_outcome(&shared, record.client, &result);
        drop(share);
        connection::ended(&shared);
    });
}

/// The slot the old process held on a connection's machine, while the config served has
/// both the service and the machine.
fn adopt_lease(
    shared: &Shared,
    service: &str,
    machine: Option<&(String, SocketAddr)>,
) -> Option<crate::balance::Lease> {
    let (id, addr) = machine?;
    let current = shared.current();
    let pool = current.pools.iter().find(|p| p.service == service)?;
    pool.adopt(id, *addr)
}

/// Serves a connection taken over, counted as this process's own.
fn resume(
    shared: &Arc<Shared>,
    splicer: Arc<Adopted>,
    record: ConnectionRecord,
    handed: handover::HandedPair,
    phase: watch::Receiver<Phase>,
) {
    let shared = Arc::clone(shared);
    shared.stats.taken_over.fetch_add(1, Ordering::Relaxed);
    shared.stats.active.fetch_add(1, Ordering::AcqRel);
    let share = shared.budget.enter();
    let lease = adopt_lease(&shared, &record.service, record.machine.as_ref());
    tokio::spawn(async move {
        let cookies = handed.snapshot.cookies;
        let tracked = shared
            .live
            .track(cookies[0], record.client, &record.service);
        if let Some((id, addr)) = &record.machine {
            shared.live.connected(cookies[0], id, *addr, cookies[1]);
        }
        shared.live.carried(cookies[0], Carrier::Sockmap);
        let result = match splicer.resume(handed, phase).await {
            Spliced::Done(result) => result,
            Spliced::HandedOver(h) => send_connection(&shared, &h),
            Spliced::Refused(..) => Err(SpliceError::Internal(io::Error::other(
                "a connection taken over was refused",
            ))),
        };
        // The last connection on a kernel takes it (and keeps its counters) before the
        // outcome is counted, so that a snapshot that sees the outcome sees its bytes.
        drop(splicer);
        connection::count_outcome(&shared, record.client, &result);
        drop((tracked, lease, share));
        connection::ended(&shared);
    });
}
