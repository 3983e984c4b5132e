//! The admin endpoint: a JSON snapshot of the counters on a Unix socket, one per connection
//! (also logged when the daemon stops).

use std::{path::Path, sync::Arc, sync::atomic::Ordering};

use serde::Serialize;
use tokio::io::AsyncWriteExt as _;

use super::{ConnStats, Shared, StartError};
use crate::{balance::PoolStats, dataplane::Plane};

/// The counters served on the admin socket and logged at exit.
#[derive(Serialize)]
pub(super) struct Snapshot<'a> {
    dataplane: &'static str,
    connections: &'a ConnStats,
    http: &'a crate::http::HttpStats,
    /// Per service: its machines' load and its queue.
    services: serde_json::Value,
    /// The machines spliced runs: state, process and counters.
    machines: serde_json::Value,
    /// SIGHUP reloads served and refused.
    reloads: &'a super::ReloadStats,
    kernel: Option<KernelSnapshot>,
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
                .map(|i| (i, s.kernel.service_totals(i)))
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
        dataplane: shared.plane.name(),
        connections: &shared.stats,
        http: &shared.http,
        services: serde_json::to_value(services).unwrap_or_default(),
        machines: serde_json::to_value(machines).unwrap_or_default(),
        reloads: &shared.reloads,
        kernel,
    }
}

/// Serves a [`snapshot`] to each connection on the Unix socket at `path`.
pub(super) fn start_admin(
    path: &Path,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    std::fs::remove_file(path).ok();
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| StartError::Admin {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = serde_json::to_vec(&snapshot(&shared)).unwrap_or_default();
            tokio::spawn(async move {
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
        }
    }))
}
