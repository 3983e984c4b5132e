//! The admin endpoint, a Unix socket: each connection may send one request line, and gets one
//! JSON answer. `snapshot` (or nothing: an empty line, the end of its input, or no request
//! within [`REQUEST_WAIT`]) answers the counters (also logged when the daemon stops);
//! `connections` answers the live connections (`spliced status`).

use std::{path::Path, sync::Arc, sync::atomic::Ordering};

use serde::Serialize;
use tokio::io::AsyncWriteExt as _;

use super::{ConnStats, Shared, StartError};
use crate::{balance::PoolStats, dataplane::Plane};

/// The counters served on the admin socket and logged at exit.
#[derive(Serialize)]
pub(super) struct Snapshot<'a> {
    /// The daemon's process id (after an upgrade, the new process's).
    pid: u32,
    dataplane: &'static str,
    connections: &'a ConnStats,
    buffers: Buffers,
    http: &'a crate::http::HttpStats,
    /// Per service: its machines' load and its queue.
    services: serde_json::Value,
    /// The machines spliced runs: state, process and counters.
    machines: serde_json::Value,
    /// SIGHUP reloads served and refused, and SIGUSR2 upgrades that did not happen.
    reloads: &'a super::ReloadStats,
    kernel: Option<KernelSnapshot>,
    /// This edge's view of the registry (`--registry`): the revision it serves, whether it
    /// watches now, what it leaves out.
    #[serde(skip_serializing_if = "Option::is_none")]
    registry: Option<&'a crate::registry::Status>,
}

/// The buffer budget and the bound it gives each live connection now.
#[derive(Serialize)]
struct Buffers {
    budget: u64,
    bound: u64,
    connections: u64,
}

#[derive(Serialize)]
struct PoolSnapshot<'a> {
    name: &'a str,
    machines: &'a [crate::balance::MachineStats],
    queue: &'a PoolStats,
}

#[derive(Serialize)]
struct KernelSnapshot {
    userspace_moved_bytes: u64,
    holds: u64,
    /// Held sockets whose receive buffer was raised because their queue had outgrown it, and
    /// raises refused at their limit (see `dataplane::sockmap`).
    squeezes_relieved: u64,
    squeezes_refused: u64,
    services: Vec<ServiceSnapshot>,
    /// What the `sk_msg` program counted (`--egress-audit`; null without).
    user_tx_bytes: Option<u64>,
    user_tx_messages: Option<u64>,
    map_entries: std::collections::BTreeMap<&'static str, usize>,
    watched_sockets: usize,
}

/// One service's kernel counters, summed over CPUs.
#[derive(Serialize)]
struct ServiceSnapshot {
    service: u32,
    #[serde(flatten)]
    counters: proxy_common::ServiceCounters,
}

/// The counters as they are now.
pub(super) fn snapshot(shared: &Shared) -> Snapshot<'_> {
    let kernel = match &shared.plane {
        Plane::Copy => None,
        Plane::Sockmap(s) => {
            let services = (0..proxy_common::MAX_SERVICES)
                .map(|i| (i, shared.service_totals(i)))
                .filter(|(_, t)| {
                    t.segments != 0 || t.redirect_failures != 0 || t.stream_faults != 0
                })
                .map(|(service, counters)| ServiceSnapshot { service, counters })
                .collect();
            let sent = s.kernel.sent();
            Some(KernelSnapshot {
                userspace_moved_bytes: s.moved_bytes.load(Ordering::Relaxed),
                holds: s.holds.load(Ordering::Relaxed),
                squeezes_relieved: s.squeezes_relieved.load(Ordering::Relaxed),
                squeezes_refused: s.squeezes_refused.load(Ordering::Relaxed),
                services,
                user_tx_bytes: sent.map(|s| s.bytes),
                user_tx_messages: sent.map(|s| s.messages),
                map_entries: s.kernel.entry_counts().into_iter().collect(),
                watched_sockets: s.registry.len(),
            })
        }
    };
    // The config's reading of now: a reload may replace it while this is written.
    let current = shared.current();
    let services: Vec<PoolSnapshot<'_>> = current
        .pools
        .iter()
        .map(|p| PoolSnapshot {
            name: &p.service,
            machines: &p.machines,
            queue: &p.stats,
        })
        .collect();
    let machines: Vec<_> = current.managed.iter().map(|m| m.snapshot()).collect();
    Snapshot {
        pid: std::process::id(),
        dataplane: shared.plane.name(),
        connections: &shared.stats,
        buffers: Buffers {
            budget: shared.budget.total(),
            bound: shared.budget.bound(),
            connections: shared.budget.live(),
        },
        http: &shared.http,
        services: serde_json::to_value(services).unwrap_or_default(),
        machines: serde_json::to_value(machines).unwrap_or_default(),
        reloads: &shared.reloads,
        kernel,
        registry: shared.registry.as_deref(),
    }
}

/// How long a connection that sends nothing is waited for before it gets the snapshot.
const REQUEST_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// The answer to one request line.
fn answer(shared: &Shared, request: &str) -> Vec<u8> {
    match request.trim() {
        "" | "snapshot" => serde_json::to_vec(&snapshot(shared)),
        "connections" => {
            let sockets = crate::sys::diag::tcp_sockets();
            let receiving = match &shared.plane {
                Plane::Sockmap(s) => Some(s.kernel.receiving()),
                Plane::Copy => None,
            };
            match sockets {
                Ok(sockets) => {
                    serde_json::to_vec(&shared.live.report(&sockets, receiving.as_ref()))
                }
                Err(e) => serde_json::to_vec(&serde_json::json!({
                    "error": format!("the kernel's socket table (sock_diag): {e}")
                })),
            }
        }
        other => serde_json::to_vec(&serde_json::json!({
            "error": format!("unknown request {other:?}: snapshot or connections")
        })),
    }
    .unwrap_or_default()
}

/// Reads one request line (at most 256 bytes), or what came before the end of input or
/// [`REQUEST_WAIT`].
async fn request(stream: &mut tokio::net::UnixStream) -> String {
    use tokio::io::AsyncBufReadExt as _;
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(stream, 256));
    let _ = tokio::time::timeout(REQUEST_WAIT, reader.read_until(b'\n', &mut line)).await;
    String::from_utf8_lossy(&line).into_owned()
}

/// Answers each connection on the Unix socket at `path` (see the module's comment).
pub(super) fn start_admin(
    path: &Path,
    shared: Arc<Shared>,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> Result<(tokio::task::JoinHandle<()>, std::os::fd::OwnedFd), StartError> {
    let error = |source| StartError::Admin {
        path: path.to_path_buf(),
        source,
    };
    // Handed over by the process this one upgraded, the path already leads to it.
    let listener = if let Some(l) = inherited {
        l.set_nonblocking(true).map_err(error)?;
        tokio::net::UnixListener::from_std(l).map_err(error)?
    } else {
        std::fs::remove_file(path).ok();
        tokio::net::UnixListener::bind(path).map_err(error)?
    };
    let copy = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .map_err(error)?;
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let request = request(&mut stream).await;
                let body = answer(&shared, &request);
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok((task, copy))
}
