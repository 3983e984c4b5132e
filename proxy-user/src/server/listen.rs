//! The public listeners: binding each public port, and the accept loops.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};

use super::{Route, Shared, connection, generation::NewListener};
use crate::dataplane::Phase;

/// Binds `addr` with `SO_REUSEADDR`, `SO_REUSEPORT` (each worker binds its own listener of
/// the address; the kernel spreads new connections over them) and a backlog of 4096; an IPv6
/// wildcard takes only IPv6.
pub(super) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        // The IPv4 wildcard gets its own socket, so both can be bound side by side.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

thread_local! {
    /// Which worker runs on this thread; 0 elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the worker thread this runs on (0 off the workers).
pub fn worker_index() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// One worker thread: a single-threaded runtime that accepts on its own listeners and serves
/// every connection it accepts to its end, so a connection's tasks (and an HTTP port's pool
/// of connections to the machines) stay on one thread. Listeners arrive on `listeners`, at
/// start and at each reload that adds a port. It stops accepting when the daemon stops
/// serving, and returns once no connection of the daemon is live.
pub(super) fn worker(
    index: usize,
    mut listeners: mpsc::UnboundedReceiver<NewListener>,
    shared: &Arc<Shared>,
    phase: &watch::Receiver<Phase>,
) {
    WORKER.with(|w| w.set(index));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(worker = index, error = %e, "cannot start a worker's runtime: it serves nothing");
            return;
        }
    };
    runtime.block_on(async {
        let mut accepting = tokio::task::JoinSet::new();
        let mut serving = phase.clone();
        loop {
            tokio::select! {
                next = listeners.recv() => {
                    let Some((listener, route)) = next else { break };
                    match TcpListener::from_std(listener) {
                        Ok(l) => {
                            accepting.spawn(accept_loop(l, route, Arc::clone(shared), phase.clone()));
                        }
                        Err(e) => tracing::error!(worker = index, error = %e, "a listener could not join its worker"),
                    }
                }
                _ = serving.wait_for(|p| *p != Phase::Serve) => break,
                // Accept loops of ports that are gone end on their own.
                Some(_) = accepting.join_next() => {}
            }
        }
        accepting.shutdown().await;
        shared.all_ended().await;
    });
}

/// Accepts on `listener` until its port is gone from the config or the task is aborted,
/// and serves each client in a task of its own, spawned here so that it starts on the
/// accepting thread, with the port's route at the time it was accepted;
/// `shared.stats.active` counts those tasks until each has ended.
pub(super) async fn accept_loop(
    listener: TcpListener,
    mut route: watch::Receiver<Option<Arc<Route>>>,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(current) = route.borrow().clone() else {
                        return;
                    };
                    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    shared.stats.active.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection::serve(
                        Arc::clone(&shared),
                        stream,
                        peer,
                        current,
                        phase.clone(),
                    ));
                }
                Err(e) => {
                    // EMFILE and friends: log, back off briefly, keep serving.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            changed = route.changed() => {
                if changed.is_err() || route.borrow().is_none() {
                    return;
                }
            }
        }
    }
}
