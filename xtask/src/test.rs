//! `cargo xtask test`: lint, unit tests, then the privileged integration tests.

use std::{path::Path, process::Command};

use anyhow::{Result, ensure};

use crate::{check, is_root, note, setup};

pub fn test(root: &Path, filter: Option<&str>, no_lint: bool) -> Result<()> {
    setup::setup()?;
    if !no_lint {
        note("cargo fmt --check");
        check(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
        note("cargo clippy -D warnings");
        check(Command::new("cargo").args([
            "clippy",
            "--package",
            "proxy-common",
            "--package",
            "proxy-user",
            "--package",
            "xtask",
            "--package",
            "tests",
            "--package",
            "bench",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    note("unit tests");
    check(Command::new("cargo").args([
        "test",
        "--package",
        "proxy-common",
        "--package",
        "proxy-user",
        "--package",
        "xtask",
    ]))?;
    let bin = setup::build_daemon(root)?;
    ensure!(
        is_root(),
        "the integration tests need root (network namespaces, BPF); run as root"
    );
    note("integration tests (root, real BPF, network namespaces, one at a time)");
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--release", "--package", "tests", "--"])
        .arg("--test-threads=1")
        .env("SPLICED_BIN", &bin);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    check(&mut cmd)
}
