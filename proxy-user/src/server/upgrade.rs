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
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::{Endpoints, Shared, generation::Ports};
use crate::sys;

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
    End,
}

/// Copies of the descriptors this process serves on, as the next one takes them.
pub(super) struct Handover {
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
    pub admin: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
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
            let (n, fd) = sys::recv_record(channel.as_fd(), &mut buf)?;
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

    /// Tells the process that started this one that this one serves: it stops accepting.
    pub fn serving(&mut self) {
        if let Some(channel) = self.channel.take()
            && let Err(e) = sys::send_record(channel.as_fd(), b"ready", None)
        {
            tracing::warn!(error = %e, "upgrade: could not tell the old process");
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
    #[error(
        "spliced runs as --user and could not load the new process's programs: restart it instead"
    )]
    User,
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

/// Starts the new process, hands it `sockets`, and waits until it serves: its pid.
pub(super) fn start_successor(sockets: &Handover) -> Result<u32, UpgradeError> {
    let (ours, theirs) = sys::seqpacket_pair()?;
    let exe = binary()?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(std::env::args_os().skip(1))
        .env(ENV, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null());
    sys::inherit_fd(&mut cmd, theirs.as_raw_fd());
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
    outcome.map(|()| child.id())
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
    let send = |record: &Record, fd| {
        let payload = serde_json::to_vec(record).map_err(io::Error::other)?;
        sys::send_record(sock, &payload, fd)
    };
    for (addr, fd) in &sockets.listeners {
        send(&Record::Listener(*addr), Some(fd.as_fd()))?;
    }
    if let Some(fd) = &sockets.admin {
        send(&Record::Admin, Some(fd.as_fd()))?;
    }
    if let Some(fd) = &sockets.metrics {
        send(&Record::Metrics, Some(fd.as_fd()))?;
    }
    send(&Record::End, None)
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
    let refused = if !shared.current().managed.is_empty() {
        Some(UpgradeError::Machines)
    } else if shared.opts.user.is_some() {
        Some(UpgradeError::User)
    } else {
        None
    };
    let copies = || -> std::io::Result<Handover> {
        let copy = |fd: &Option<std::os::fd::OwnedFd>| {
            fd.as_ref().map(std::os::fd::OwnedFd::try_clone).transpose()
        };
        Ok(Handover {
            listeners: ports.listener_copies()?,
            admin: copy(&endpoints.admin)?,
            metrics: copy(&endpoints.metrics)?,
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
        Ok(pid) => Some(pid),
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
