//! `cargo xtask test`: lint, unit tests, then the privileged integration tests.

use std::{path::Path, process::Command};

use anyhow::{Result, ensure};

use crate::{check, is_root, note, setup};

/// The workspace's host crates whose tests need no privilege.
const HOST_PACKAGES: &[&str] = &["proxy-common", "proxy-user", "xtask"];
/// The crates that need root (network namespaces, BPF): linted here; `tests` runs below.
const ROOT_PACKAGES: &[&str] = &["tests", "bench"];

/// Lint, unit tests, then the integration tests (root), one at a time, optionally only
/// those whose name contains `filter`.
pub fn test(root: &Path, filter: Option<&str>, no_lint: bool) -> Result<()> {
    setup::setup()?;
    if !no_lint {
        note("cargo fmt --check");
        check(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
        note("cargo clippy -D warnings");
        let mut clippy = Command::new("cargo");
        clippy.arg("clippy");
        for p in HOST_PACKAGES.iter().chain(ROOT_PACKAGES) {
            clippy.args(["--package", p]);
        }
        check(clippy.args(["--all-targets", "--", "-D", "warnings"]))?;
    }
    note("unit tests");
    let mut unit = Command::new("cargo");
    unit.arg("test");
    for p in HOST_PACKAGES {
        unit.args(["--package", p]);
    }
    check(&mut unit)?;
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
