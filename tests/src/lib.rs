//! Helpers for the integration tests: network namespaces, the daemon under test, backends
//! (echo, sink, source), and a verifiable byte stream. Everything here is real: sockets,
//! namespaces, the `spliced` binary and the BPF programs it loads. Root only.

pub mod apps;
mod backends;
mod daemon;
mod fleet;
pub mod http;
pub mod metrics;
mod netns;
mod pattern;
pub mod registry;
pub mod tls;

pub use backends::*;
pub use daemon::*;
pub use fleet::*;
pub use netns::*;
pub use pattern::*;

/// The public port the tests' fly.toml exposes.
pub const PUBLIC_PORT: u16 = 10080;
/// The internal port the tests' backends listen on.
pub const BACKEND_PORT: u16 = 18080;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// The size of the bulk transfers (1 GiB), divided by `SPLICED_TEST_SHRINK` when set (`cargo
/// xtask test --kernel` sets it: its guests emulate the CPU), and never below 16 times the
/// per-direction bound, so that a shrunk transfer still fills and drains every buffer many times.
pub fn bulk() -> u64 {
    let shrink = std::env::var("SPLICED_TEST_SHRINK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    (GIB / shrink).max(16 * MAX_BUFFER)
}
/// The per-direction kernel buffering bound the tests run the daemon with (its default).
pub const MAX_BUFFER: u64 = 4 << 20;
