//! The public listeners: binding each public port, and the accept loops.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::Route;

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

/// An accepted client, its address, and where its connection goes.
pub(super) type Accepted = (TcpStream, SocketAddr, Arc<Route>);

/// Accepts on `listener` for ever, handing each client to `out`; stops when `out` is closed.
pub(super) async fn accept_loop(
    listener: TcpListener,
    route: Arc<Route>,
    out: tokio::sync::mpsc::UnboundedSender<Accepted>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if out.send((stream, peer, Arc::clone(&route))).is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: log, back off briefly, keep serving.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
