//! Faults the test suite must catch, injected only in a build with the `faults` feature and
//! only when `SPLICED_FAULT` names one (`cargo xtask test --faults` runs them). In a normal
//! build [`active`] is false, always, and every injection point compiles away.

/// A fault injected into the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The FIN is passed on before every byte before it is in the peer's send queue.
    FinEarly,
    /// A held side is never released.
    HoldForever,
    /// One map entry of each connection is left behind.
    LeakEntry,
    /// A connection that should end with a reset ends with a FIN.
    FinNotReset,
    /// No side is ever held: the memory bound is ignored.
    NoBound,
    /// The last byte of each stream userspace moves is dropped.
    DropLastByte,
    /// The first batch of bytes userspace moves on each stream is written twice.
    DuplicateBatch,
}

impl Fault {
    /// Every fault, with the name `SPLICED_FAULT` takes.
    pub const ALL: &[(&str, Self)] = &[
        ("fin-early", Self::FinEarly),
        ("hold-forever", Self::HoldForever),
        ("leak-entry", Self::LeakEntry),
        ("fin-not-reset", Self::FinNotReset),
        ("no-bound", Self::NoBound),
        ("drop-last-byte", Self::DropLastByte),
        ("duplicate-batch", Self::DuplicateBatch),
    ];
}

/// Whether `fault` is injected in this process.
#[cfg(feature = "faults")]
pub fn active(fault: Fault) -> bool {
    static CHOSEN: std::sync::OnceLock<Option<Fault>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let name = std::env::var("SPLICED_FAULT").ok()?;
        let fault = Fault::ALL.iter().find(|(n, _)| *n == name).map(|(_, f)| *f);
        tracing::warn!(fault = %name, known = fault.is_some(), "!!! FAULT INJECTED (test build) !!!");
        fault
    }) == Some(fault)
}

/// Whether `fault` is injected in this process: never, in a build without `faults`.
#[cfg(not(feature = "faults"))]
pub const fn active(_fault: Fault) -> bool {
    false
}
