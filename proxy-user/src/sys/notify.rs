//! The service manager's readiness protocol (`sd_notify(3)`): a datagram of `KEY=VALUE`
//! lines to the socket named by `$NOTIFY_SOCKET`, a path or, with a leading `@`, an abstract
//! name. Without the variable (not started by a service manager) nothing is sent.

use std::os::{
    linux::net::SocketAddrExt as _,
    unix::{
        ffi::OsStrExt as _,
        net::{SocketAddr, UnixDatagram},
    },
};

/// The variable that names the socket; the machines spliced runs do not inherit it.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (`READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=...`, one per line) to the
/// service manager, if one asked; a failure is logged, never fatal.
pub fn notify(state: &str) {
    let Some(name) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    let name = name.as_bytes();
    let sent = match name.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name),
        None => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(name)),
    }
    .and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = %String::from_utf8_lossy(name), "cannot notify the service manager");
    }
}
