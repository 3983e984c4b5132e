//! The programs' maps. What each one holds and who writes it is written at its name in
//! `proxy_common::names`; the names here are the ELF symbols userspace looks them up by.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
};
use proxy_common::{
    EVENTS_BYTES, Flow, Link, MAX_SERVICES, MAX_SOCKETS, SentBytes, ServiceCounters,
};

#[map]
pub static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub static RECV: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub static LINKS: HashMap<u64, Link> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<ServiceCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static SENT: PerCpuArray<SentBytes> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static HOLD_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
