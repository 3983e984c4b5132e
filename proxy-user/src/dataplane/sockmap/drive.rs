//! The event loop of one spliced connection: kernel events (a hold made, a drain point
//! reached), socket events (FIN, error, reset; input and room while userspace carries), ticks
//! while something waits, the idle timeout and the daemon's phase.

use tokio::sync::{mpsc, watch};

use super::{Outcome, POLL_MAX, POLL_MIN, Phase, SpliceError, end::side_error, pair::Pair};
use crate::{
    sys::{self, ev},
    watch::{LocalWatch, SockEvent},
};

/// Drives `pair` until both directions have ended, the daemon aborts, the pair is idle for
/// the timeout, or a side fails.
pub(super) async fn drive(
    pair: &mut Pair<'_>,
    watch: &LocalWatch,
    rx: &mut mpsc::UnboundedReceiver<SockEvent>,
    phase: &mut watch::Receiver<Phase>,
) -> Result<Outcome, SpliceError> {
    let mut delay = POLL_MIN;
    // Nothing waits on a new pair; one taken over may be ending, held or carried.
    let mut waiting = pair.on_tick()?;
    let idle = pair.splicer.idle_timeout;
    let mut idle_check = tokio::time::Instant::now() + idle.unwrap_or_default();
    // A pair taken over may have been set for another bound.
    let mut bound = pair.splicer.budget.watch();
    pair.set_bound(*bound.borrow_and_update())?;
    loop {
        if pair.sides.iter().all(|d| d.done) {
            return Ok(Outcome::Completed);
        }
        match *phase.borrow() {
            Phase::Abort => return Ok(Outcome::Aborted),
            // Between two events, the pair's state is whole.
            Phase::HandOver => return Ok(Outcome::HandedOver),
            Phase::Serve | Phase::Drain => {}
        }
        let event = tokio::select! {
            e = rx.recv() => e,
            () = tokio::time::sleep(delay), if waiting => None,
            _ = phase.changed() => continue,
            Ok(()) = bound.changed() => {
                pair.set_bound(*bound.borrow_and_update())?;
                continue;
            }
            () = tokio::time::sleep_until(idle_check), if idle.is_some() => {
                let left = pair.idle_left(idle.unwrap_or_default())?;
                if left.is_zero() {
                    return Ok(Outcome::Idle);
                }
                idle_check = tokio::time::Instant::now() + left;
                continue;
            }
        };
        match event {
            Some(SockEvent::Pressure(side)) => {
                pair.on_pressure(side)?;
                delay = POLL_MIN;
            }
            Some(SockEvent::Epoll(side, bits)) => {
                if bits & ev::RDHUP != 0 {
                    pair.side_mut(side).eof = true;
                }
                if bits & (ev::ERR | ev::HUP) != 0 {
                    if let Some(err) =
                        sys::take_error(pair.fd(side)).map_err(SpliceError::Internal)?
                    {
                        return Err(side_error(side, err));
                    }
                    // Closed, but not by the end of both ways (its other way ends with the FIN
                    // this task sends on it): a reset whose error was taken already.
                    if pair.counters(side)?.state == sys::TcpState::Close
                        && !(pair.side(side).eof && pair.side(side.other()).done)
                    {
                        return Err(SpliceError::closed(side));
                    }
                    pair.side_mut(side).eof = true;
                }
                delay = POLL_MIN;
            }
            None => delay = (delay * 2).min(POLL_MAX),
        }
        waiting = pair.on_tick()?;
        pair.watch_carries(watch)?;
        if std::mem::take(&mut pair.draining) {
            delay = POLL_MIN;
        }
    }
}
