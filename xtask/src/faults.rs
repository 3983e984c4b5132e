//! `cargo xtask test --faults`: proof that the suite catches faults. The daemon is built with
//! its `faults` feature; each fault is injected in turn (`SPLICED_FAULT`) into the tests that
//! should catch it, and the run succeeds only when every fault made at least one of them
//! fail.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};

use crate::{check, is_root, note, setup};

/// Each fault (as `SPLICED_FAULT` names it), what it does, and the tests that should catch
/// it (libtest filters: a test runs when its name contains one).
const FAULTS: &[(&str, &str, &[&str])] = &[
    (
        "fin-early",
        "FIN before the last byte",
        &["sockmap_loopback::half_close_client_first"],
    ),
    (
        "hold-forever",
        "never release a hold",
        &[
            "sockmap_loopback::slow_reader",
            "sockmap_loopback::full_duplex",
        ],
    ),
    (
        "leak-entry",
        "leak one map entry per connection",
        &[
            "sockmap_loopback::small_transfer",
            "sockmap_loopback::leak_check",
        ],
    ),
    (
        "fin-not-reset",
        "FIN where a reset is due",
        &[
            "sockmap_loopback::backend_refuses",
            "copy_loopback::backend_refuses",
            "sockmap_loopback::shutdown_with_live_sessions",
            "copy_loopback::shutdown_with_live_sessions",
        ],
    ),
    (
        "no-bound",
        "ignore the memory bound",
        &["sockmap_loopback::slow_reader"],
    ),
    (
        "drop-last-byte",
        "drop the last byte of a stream",
        &[
            "copy_loopback::small_transfer",
            "copy_loopback::bulk_to_backend",
            "copy_loopback::half_close_backend_first",
            "sockmap_loopback::slow_reader",
        ],
    ),
    (
        "duplicate-batch",
        "duplicate one batch",
        &[
            "copy_loopback::small_transfer",
            "copy_loopback::bulk_to_client",
            "sockmap_loopback::slow_reader",
            "sockmap_loopback::data_before_insertion",
        ],
    ),
];

/// Builds the daemon with faults, runs each fault's tests, prints which tests caught which
/// fault, and fails if a fault went uncaught.
pub fn faults(root: &Path) -> Result<()> {
    setup::setup()?;
    ensure!(
        is_root(),
        "the fault runs need root (network namespaces, BPF); run as root"
    );
    let target = root.join("target/faults");
    note("building the daemon with injectable faults (target/faults)");
    check(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "--package",
                "proxy-user",
                "--features",
                "faults",
            ])
            .arg("--target-dir")
            .arg(&target),
    )?;
    let bin = target.join("release/spliced");
    check(Command::new("cargo").args(["test", "--release", "--package", "tests", "--no-run"]))?;
    let mut table = Vec::new();
    for (fault, what, tests) in FAULTS {
        note(&format!("fault {fault} ({what}): {}", tests.join(", ")));
        let out = Command::new("cargo")
            // Every test binary runs, also after one has failed.
            .args([
                "test",
                "--release",
                "--no-fail-fast",
                "--package",
                "tests",
                "--",
            ])
            .arg("--test-threads=1")
            .args(*tests)
            .env("SPLICED_BIN", &bin)
            .env("SPLICED_FAULT", fault)
            .output()
            .context("cannot run cargo test")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result = |verdict: &str| -> Vec<String> {
            stdout
                .lines()
                .filter_map(|l| l.strip_prefix("test "))
                .filter_map(|l| l.strip_suffix(verdict))
                .map(str::to_owned)
                .collect()
        };
        let (caught, passed) = (result(" ... FAILED"), result(" ... ok"));
        ensure!(
            !caught.is_empty() || !passed.is_empty(),
            "fault {fault}: no test ran (filters {tests:?})"
        );
        table.push((*fault, *what, caught, passed));
    }
    println!("\n| fault | what | caught by | passed anyway |\n|---|---|---|---|");
    for (fault, what, caught, passed) in &table {
        println!(
            "| {fault} | {what} | {} | {} |",
            caught.join(", "),
            passed.join(", ")
        );
    }
    let missed: Vec<&str> = table
        .iter()
        .filter(|(_, _, caught, _)| caught.is_empty())
        .map(|(fault, ..)| *fault)
        .collect();
    ensure!(missed.is_empty(), "faults no test caught: {missed:?}");
    note("every fault made the suite fail");
    Ok(())
}
