//! The kernel memory the proxied sockets of all connections may hold, shared out among the
//! live ones: each connection's bound (`--max-buffer` at most) is what the budget allows for
//! as many connections as are live, so that however many connections stall at once, their
//! buffers cannot push the host into TCP memory pressure (`net.ipv4.tcp_mem`), where the
//! kernel starts to shrink every TCP socket's buffers and then to drop packets.
//!
//! The bound takes one of a few values, `--max-buffer` halved as many times as needed, and
//! changes only when the count of live connections crosses one of them: every live
//! connection is then retuned (both planes' socket buffers; on the sockmap plane, the bound
//! its hold program keeps). It shrinks as soon as connections need it to, and grows back only
//! once it would fit a quarter more connections than are live, so that a count that hovers at
//! a step does not retune every connection at every accept.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use tokio::sync::watch;

/// The smallest bound: a connection's sockets keep buffers of a few segments however many
/// connections share the budget.
pub const MIN_BOUND: u64 = 16 * 1024;

/// Kernel memory one connection may hold per byte of its bound when neither of its readers
/// reads: each direction holds about two and a half times the bound (what its sender's
/// socket queues, in a receive buffer of one and a half times the bound, and what the peer's
/// send queue holds unacknowledged; measured 2.48 times on both planes), both directions
/// together five.
pub const MEMORY_PER_BOUND: u64 = 5;

/// The budget and the connections sharing it.
#[derive(Debug)]
pub struct Budget {
    total: u64,
    max_buffer: u64,
    live: AtomicU64,
    bound: watch::Sender<u64>,
    /// Warned that the budget cannot cover the live connections even at [`MIN_BOUND`]; reset
    /// once it can again.
    spent: AtomicBool,
}

/// One live connection's part of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share(Arc<Budget>);

impl Drop for Share {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
        self.0.settle();
    }
}

impl Budget {
    /// `total` bytes of kernel memory for connections whose bound is at most `max_buffer`.
    pub fn new(total: u64, max_buffer: u64) -> Arc<Self> {
        let (bound, _) = watch::channel(max_buffer);
        Arc::new(Self {
            total,
            max_buffer,
            live: AtomicU64::new(0),
            bound,
            spent: AtomicBool::new(false),
        })
    }

    /// The budget when the operator sets none: half the host's TCP memory pressure threshold
    /// (`net.ipv4.tcp_mem`'s middle value, in pages), leaving the other half to the clients,
    /// the machines and every other TCP socket of the host. A network namespace other than
    /// the host's has no `tcp_mem` to read (the limit is the host's): there the threshold is
    /// taken as the kernel sets it at boot, a sixteenth of the memory then free, which is a
    /// little less than a sixteenth of `MemTotal` (an eighteenth is taken). Returns the budget
    /// and where the threshold came from.
    pub fn host_default() -> std::io::Result<(u64, &'static str)> {
        // SAFETY: sysconf reads a constant of the system.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let (pressure, source) = match std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem") {
            Ok(text) => {
                let pages: u64 = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        std::io::Error::other(format!("net.ipv4.tcp_mem reads {text:?}"))
                    })?;
                (pages.saturating_mul(page), "net.ipv4.tcp_mem")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (memory_total()? / 18, "an eighteenth of MemTotal")
            }
            Err(e) => return Err(e),
        };
        Ok((pressure / 2, source))
    }

    /// Counts a live connection until the share is dropped; the bound may shrink for it.
    pub fn enter(self: &Arc<Self>) -> Share {
        self.live.fetch_add(1, Ordering::AcqRel);
        self.settle();
        Share(Arc::clone(self))
    }

    /// The bound each connection keeps now.
    pub fn bound(&self) -> u64 {
        *self.bound.borrow()
    }

    /// Follows the bound; a connection that keeps buffers retunes them at each change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.bound.subscribe()
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }

    /// Sets the bound for the connections live now. Runs under the watch's lock, so that two
    /// changes of the count settle one after the other, each on the count as it is then.
    fn settle(&self) {
        let mut spent = None;
        self.bound.send_if_modified(|bound| {
            let live = self.live.load(Ordering::Acquire);
            let (next, fits) = self.bound_for(live, *bound);
            let now_spent = !fits;
            if self.spent.swap(now_spent, Ordering::AcqRel) != now_spent {
                spent = Some((live, fits));
            }
            std::mem::replace(bound, next) != next
        });
        match spent {
            Some((live, false)) => tracing::warn!(
                live,
                budget = self.total,
                bound = MIN_BOUND,
                "the buffer budget cannot cover the live connections even at the smallest \
                 bound: stalled connections may now hold more kernel memory than it \
                 (raise --buffer-budget, or limit connections)"
            ),
            Some((live, true)) => {
                tracing::info!(
                    live,
                    budget = self.total,
                    "the buffer budget covers the live connections again"
                );
            }
            None => {}
        }
    }

    /// The bound for `live` connections, the bound being `now`, and whether the budget covers
    /// them at it.
    fn bound_for(&self, live: u64, now: u64) -> (u64, bool) {
        let fits = |bound: u64, live: u64| {
            live.saturating_mul(MEMORY_PER_BOUND).saturating_mul(bound) <= self.total
        };
        let floor = MIN_BOUND.min(self.max_buffer);
        let mut bound = self.max_buffer;
        while bound > floor && !fits(bound, live) {
            bound = (bound / 2).max(floor);
        }
        if bound > now {
            // Grow back only as far as a quarter more connections would still fit.
            let mut grown = now;
            while grown < bound && fits((grown * 2).min(bound), live + live / 4) {
                grown = (grown * 2).min(bound);
            }
            bound = grown;
        }
        (bound, fits(bound, live))
    }
}

/// The host's memory (`MemTotal` in `/proc/meminfo`), in bytes.
fn memory_total() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other("/proc/meminfo has no MemTotal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_bound_halves_as_connections_come_and_grows_back_with_slack() {
        // 400 MiB: 20 connections at 4 MiB (5 * 4 MiB each), 40 at 2 MiB.
        let budget = Budget::new(400 * MIB, 4 * MIB);
        let shares: Vec<_> = (0..20).map(|_| budget.enter()).collect();
        assert_eq!(budget.bound(), 4 * MIB);
        let mut more: Vec<_> = (0..20).map(|_| budget.enter()).collect();
        assert_eq!(budget.bound(), 2 * MIB);
        more.push(budget.enter());
        assert_eq!(budget.bound(), MIB);
        // Back to 40: 2 MiB would fit 40 but not 50, so it stays at 1 MiB.
        more.pop();
        assert_eq!(budget.bound(), MIB);
        more.truncate(12);
        // 32 live: 2 MiB fits 40 (32 and a quarter), 4 MiB does not.
        assert_eq!(budget.live(), 32);
        assert_eq!(budget.bound(), 2 * MIB);
        drop(more);
        drop(shares);
        assert_eq!(budget.live(), 0);
        assert_eq!(budget.bound(), 4 * MIB);
    }

    #[test]
    fn the_bound_stops_at_its_floor_and_says_whether_the_budget_covers() {
        let budget = Budget::new(100 * MIB, 4 * MIB);
        assert_eq!(budget.bound_for(10_000, 4 * MIB), (MIN_BOUND, false));
        // 1,280 connections at 16 KiB: 100 MiB.
        assert_eq!(budget.bound_for(1_280, 4 * MIB), (MIN_BOUND, true));
        assert_eq!(budget.bound_for(0, MIN_BOUND), (4 * MIB, true));
        // A bound below the floor stays where the operator set it.
        let small = Budget::new(MIB, 8 * 1024);
        assert_eq!(small.bound_for(1_000, 8 * 1024), (8 * 1024, false));
    }

    #[test]
    fn a_bound_that_is_not_a_power_of_two_halves_from_itself() {
        let budget = Budget::new(100 * MIB, 3 * MIB);
        assert_eq!(budget.bound_for(7, 3 * MIB), (3 * MIB / 2, true));
        assert_eq!(budget.bound_for(1, 3 * MIB / 2), (3 * MIB, true));
    }
}
