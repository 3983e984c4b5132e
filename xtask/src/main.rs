//! `cargo xtask`: sets up what a fresh machine lacks, then runs spliced, its tests or its
//! benchmarks. The build itself stays in `proxy-user/build.rs`; this only drives cargo.

mod bench;
mod faults;
mod fuzz;
mod kernels;
mod run;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

/// The nightly that builds the eBPF crate (`proxy-user/build.rs` reads the same file); its
/// LLVM (22) must match bpf-linker's.
const EBPF_TOOLCHAIN: &str = include_str!("../../proxy-ebpf/toolchain").trim_ascii();

#[derive(Parser)]
#[command(name = "xtask", about = "Set up, run and test spliced")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: apt packages, rustup toolchains, bpf-linker.
    Setup,
    /// Build and run spliced on examples/fly.toml with a demo echo backend.
    Run {
        /// Extra arguments for `spliced run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the fly.toml reader with cargo-fuzz, seeded with the config test corpus.
    Fuzz {
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// The benchmark suite: direct, spliced (sockmap, copy), `HAProxy`, nginx and socat,
    /// interleaved, over loopback, veth and edge; JSON, markdown and SVG in target/bench (or
    /// `--out DIR`).
    Bench {
        /// A smoke run in under five minutes.
        #[arg(long)]
        quick: bool,
        /// More arguments for spliced-bench (--targets a,b --topologies loopback).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Format check, clippy, unit tests, then the privileged integration tests.
    Test {
        /// Only integration tests whose name contains this.
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Instead of the suite: inject each fault the suite must catch into the tests that
        /// should catch it, and fail unless every fault made one of them fail.
        #[arg(long)]
        faults: bool,
        /// Instead of on this host: inside this Debian kernel series (6.1, 6.12) or `all`,
        /// booted under QEMU.
        #[arg(long)]
        kernel: Option<String>,
        /// With --kernel: divide the 1 GiB bulk transfers by this (the guest's CPU is
        /// emulated); they never shrink below 64 MiB.
        #[arg(long, default_value_t = 16)]
        shrink: u64,
        /// With --kernel: only this integration test binary (dataplane, ends...); repeatable.
        #[arg(long = "test")]
        tests: Vec<String>,
        /// With --kernel: not the tests whose name contains this; repeatable.
        #[arg(long)]
        skip: Vec<String>,
        /// With --kernel: the longest one guest may run, in minutes.
        #[arg(long, default_value_t = 240)]
        guest_minutes: u64,
        /// With --kernel: try KVM (it hangs on this machine kind).
        #[arg(long)]
        kvm: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("cannot enter the workspace root")?;
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Run { args } => run::run(&root, &args),
        Cmd::Test { faults: true, .. } => faults::faults(&root),
        Cmd::Test {
            kernel: Some(kernel),
            filter,
            shrink,
            tests,
            skip,
            guest_minutes,
            kvm,
            ..
        } => kernels::test(
            &root,
            &kernels::Options {
                kernel,
                shrink,
                tests,
                filter,
                skip,
                kvm,
                timeout: std::time::Duration::from_secs(guest_minutes * 60),
            },
        ),
        Cmd::Test {
            filter, no_lint, ..
        } => test::test(&root, filter.as_deref(), no_lint),
        Cmd::Fuzz { seconds } => fuzz::fuzz(&root, seconds),
        Cmd::Bench { quick, args } => bench::bench(&root, quick, &args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn note(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("cannot start {}", cmd.get_program().display()))
}

fn check(cmd: &mut Command) -> Result<()> {
    let what = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let st = status(cmd)?;
    ensure!(st.success(), "`{what}` failed ({st})");
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
