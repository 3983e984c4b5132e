//! `cargo xtask setup`: installs, idempotently, what a fresh Debian machine lacks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use crate::{EBPF_TOOLCHAIN, check, is_root, note, succeeds};

/// Debian packages: LLVM 22 for bpf-linker, bpftool for the tests' checks, redis for a real
/// backend driven by its own client, nginx as a real PROXY protocol consumer, Go and `HAProxy`
/// for applications that move their bytes with splice(2), iproute2 for network namespaces,
/// netcat for the demo `cargo xtask run` suggests, curl, openssl and h2load (nghttp2-client)
/// as the clients of the TLS and HTTP handlers, Prometheus (and its promtool) to scrape and
/// check the metrics, protoc and protobuf's own definitions for the etcd client's build, and
/// etcd (server and etcdctl) for the registry's tests.
pub const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "redis-server",
    "redis-tools",
    "nginx",
    "nghttp2-client",
    "curl",
    "openssl",
    "golang-go",
    "haproxy",
    "iproute2",
    "netcat-openbsd",
    "prometheus",
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "etcd-client",
];
/// Installs, idempotently, everything the build and the tests need.
/// While alive, Debian's maintainer scripts may not start services (`policy-rc.d` exiting
/// 101), unless the machine already has a policy of its own, which is left alone.
struct DenyServiceStarts(Option<&'static Path>);

impl DenyServiceStarts {
    const POLICY: &'static str = "/usr/sbin/policy-rc.d";

    fn new() -> Result<Self> {
        let path = Path::new(Self::POLICY);
        if path.exists() {
            return Ok(Self(None));
        }
        std::fs::write(path, "#!/bin/sh\nexit 101\n").context(Self::POLICY)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .context(Self::POLICY)?;
        Ok(Self(Some(path)))
    }
}

impl Drop for DenyServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub fn setup() -> Result<()> {
    setup_with(&[])
}

/// [`setup`], with more Debian packages.
pub fn setup_with(more: &[&str]) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(more)
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        note(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        ensure!(
            is_root(),
            "installing Debian packages needs root; run as root"
        );
        check(Command::new("apt-get").args(["update", "-q"]))?;
        // The tests start redis and nginx themselves, inside their own namespaces: keep the
        // packages from starting system-wide copies on the host's ports.
        let _no_services = DenyServiceStarts::new()?;
        check(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    let has_nightly = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        });
    if !has_nightly {
        note(&format!(
            "installing rustup toolchain {EBPF_TOOLCHAIN} with rust-src (builds the eBPF programs)"
        ));
        check(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }

    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        note("installing bpf-linker against Debian's LLVM 22 (about a minute)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        check(
            Command::new("cargo")
                .args([
                    "install",
                    "--locked",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path)
                .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
        )?;
        ensure!(
            succeeds(Command::new("bpf-linker").arg("--version")),
            "bpf-linker was installed but is not on PATH; add cargo's bin directory to PATH"
        );
    }
    Ok(())
}

/// Builds the daemon (and, through its build script, the eBPF programs) in release mode.
pub fn build_daemon(root: &Path) -> Result<PathBuf> {
    check(Command::new("cargo").args(["build", "--release", "--package", "proxy-user"]))?;
    let bin = root.join("target/release/spliced");
    ensure!(bin.exists(), "{} was not built", bin.display());
    Ok(bin)
}
