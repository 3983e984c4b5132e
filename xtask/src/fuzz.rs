//! `cargo xtask fuzz`: the fly.toml reader under cargo-fuzz.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{EBPF_TOOLCHAIN, check, note, setup, succeeds};

/// Runs the `config_parse` cargo-fuzz target for `seconds`, seeded with every fly.toml the
/// tests carry, and says how many executions it made.
pub fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    setup::setup()?;
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        note("installing cargo-fuzz (runs libFuzzer targets)");
        check(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    let seeds = root.join("fuzz/corpus/config_parse");
    std::fs::create_dir_all(&seeds).context("fuzz corpus directory")?;
    let mut stack = vec![root.join("proxy-user/tests/fixtures")];
    let mut n = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                let name = path
                    .strip_prefix(root)?
                    .to_string_lossy()
                    .replace('/', "__");
                std::fs::copy(&path, seeds.join(name))?;
                n += 1;
            }
        }
    }
    note(&format!(
        "fuzzing the fly.toml reader for {seconds} s from {n} seed files"
    ));
    check(
        Command::new("cargo")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .args(["fuzz", "run", "--fuzz-dir", "fuzz", "config_parse"])
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-dict={}", root.join("fuzz/fly.dict").display()))
            .arg("-max_len=8192")
            // The daemon's kernel programs play no part in parsing.
            .env("AYA_BUILD_SKIP", "1"),
    )
}
