//! The public listeners: binding each public port, and the accept loops.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
};

use super::{Route, Shared, connection};
use crate::dataplane::Phase;

/// Binds `addr` with `SO_REUSEADDR` and a backlog of 4096; an IPv6 wildcard takes only IPv6.
pub(super) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            // The IPv4 wildcard gets its own socket, so both can be bound side by side.
            socket2::SockRef::from(&s).set_only_v6(true)?;
            s
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Accepts on `listener` until the task is aborted, and serves each client in a task of its
/// own, spawned here so that it starts on the accepting thread; `shared.stats.active` counts
/// those tasks until each has ended.
pub(super) async fn accept_loop(
    listener: TcpListener,
    route: Arc<Route>,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                shared.stats.active.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection::serve(
                    Arc::clone(&shared),
                    stream,
                    peer,
                    Arc::clone(&route),
                    phase.clone(),
                ));
            }
            Err(e) => {
                // EMFILE and friends: log, back off briefly, keep serving.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
