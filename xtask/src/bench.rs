//! `cargo xtask bench`: builds and runs the benchmark, and checks its output.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};

use crate::{check, is_root, note, setup};

/// The peers `cargo xtask bench` measures spliced against, and the real clients it drives
/// (iperf3, wrk; redis-benchmark, nginx and `HAProxy` come with the test packages), from Debian.
const BENCH_PACKAGES: &[&str] = &["libnginx-mod-stream", "socat", "iperf3", "wrk"];

/// Builds and runs `spliced-bench`, then checks that it wrote well-formed output: the
/// figures themselves are not judged (the benchmark asserts no timing).
pub fn bench(root: &Path, quick: bool, args: &[String]) -> Result<()> {
    setup::setup_with(BENCH_PACKAGES)?;
    let spliced = setup::build_daemon(root)?;
    check(Command::new("cargo").args([
        "build",
        "--release",
        "--package",
        "bench",
        "--bin",
        "spliced-bench",
    ]))?;
    ensure!(
        is_root(),
        "the benchmark needs root (network namespaces, BPF); run as root"
    );
    // The output directory is checked below, so an `--out` among the arguments (which the
    // benchmark honours, the last one winning) is the one to check.
    let out = args
        .iter()
        .rposition(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || Ok(root.join("target/bench")),
            |dir| std::env::current_dir().map(|cwd| cwd.join(dir)),
        )?;
    let mut cmd = Command::new(root.join("target/release/spliced-bench"));
    cmd.arg("--spliced").arg(&spliced).arg("--out").arg(&out);
    if quick {
        cmd.arg("--quick");
    }
    check(cmd.args(args))?;
    let text = std::fs::read_to_string(out.join("results.json")).context("results.json")?;
    let doc: serde_json::Value = serde_json::from_str(&text).context("results.json is not JSON")?;
    let summary = doc["summary"].as_array().map_or(&[][..], Vec::as_slice);
    let measured = summary
        .iter()
        .filter(|s| s["median"].as_f64().is_some_and(f64::is_finite))
        .count();
    ensure!(
        doc["machine"]["cpus"].as_u64().is_some() && measured > 0,
        "results.json has no measured figure"
    );
    for f in ["results.md", "throughput.svg"] {
        let body = std::fs::read_to_string(out.join(f)).with_context(|| f.to_owned())?;
        ensure!(!body.trim().is_empty(), "{f} is empty");
    }
    note(&format!(
        "benchmark output in {} ({measured} figures)",
        out.display()
    ));
    Ok(())
}
