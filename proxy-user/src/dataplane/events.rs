//! The pumps from the kernel programs to userspace: flow events from the verdict's ring
//! buffer to the connection that owns the socket, and aya-log records to the log.

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use proxy_common::FlowEvent;

use crate::watch::{Registry, SockEvent};

/// Reads [`FlowEvent`]s and hands each to the connection that owns the socket.
pub fn spawn_event_pump(
    events: RingBuf<MapData>,
    registry: Arc<Registry>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut events = crate::sys::async_readable(events)?;
    // Each batch is delivered whole between two waits, so aborting the task at a wait
    // leaves no event taken from the ring and not delivered.
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = events.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(event) = crate::sys::read_pod::<FlowEvent>(&item) {
                    tracing::trace!(cookie = event.cookie, "kernel event");
                    registry.deliver(event.cookie, SockEvent::Pressure);
                }
            }
            guard.clear_ready();
        }
    }))
}

/// Forwards aya-log records from the kernel programs into the `log` facade, which the
/// tracing subscriber picks up.
pub fn spawn_log_pump(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> std::io::Result<()> {
    let mut logger = crate::sys::async_readable(logger)?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
