//! The kernel's counters: per service ([`maps::SERVICE_STATS`]) and of every byte that enters
//! a spliced socket's send path ([`maps::SENT`]), one copy per CPU.

use proxy_common::ServiceCounters;

use crate::maps;

/// Adds to this CPU's counters of `service`.
pub fn count(service: u32, add: impl FnOnce(&mut ServiceCounters)) {
    if let Some(c) = maps::SERVICE_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
        add(unsafe { &mut *c });
    }
}

/// Counts one message of `size` bytes entering a spliced socket's send path.
pub fn sent(size: u32) {
    if let Some(tx) = maps::SENT.get_ptr_mut(0) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it during this run.
        let tx = unsafe { &mut *tx };
        tx.messages += 1;
        tx.bytes += u64::from(size);
    }
}
