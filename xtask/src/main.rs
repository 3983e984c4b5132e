//! `cargo xtask`: sets up what a fresh machine lacks, then runs spliced, its tests or its
//! benchmarks. The build itself stays in `proxy-user/build.rs`; this only drives cargo.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};

/// The nightly that builds the eBPF crate; its LLVM (22) must match bpf-linker's.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-20";
/// Debian packages: LLVM 22 for bpf-linker, bpftool for the tests' checks, redis for a real
/// backend driven by its own client, nginx as a real PROXY protocol consumer, Go and `HAProxy`
/// for applications that move their bytes with splice(2), iproute2 for network namespaces,
/// netcat for the demo `cargo xtask run` suggests.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "redis-server",
    "redis-tools",
    "nginx",
    "golang-go",
    "haproxy",
    "iproute2",
    "netcat-openbsd",
];
/// The peers `cargo xtask bench` measures spliced against, and the real clients it drives
/// (iperf3, wrk; redis-benchmark, nginx and `HAProxy` come with the test packages), from Debian.
const BENCH_PACKAGES: &[&str] = &["libnginx-mod-stream", "socat", "iperf3", "wrk"];
/// Where the demo backend of `cargo xtask run` listens: `examples/fly.toml`'s `internal_port`.
const DEMO_BACKEND: &str = "127.0.0.1:18080";

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
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("cannot enter the workspace root")?;
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::Run { args } => run(&root, &args),
        Cmd::Test { filter, no_lint } => test(&root, filter.as_deref(), no_lint),
        Cmd::Fuzz { seconds } => fuzz(&root, seconds),
        Cmd::Bench { quick, args } => bench(&root, quick, &args),
    }
}

/// Runs the `config_parse` cargo-fuzz target for `seconds`, seeded with every fly.toml the
/// tests carry, and says how many executions it made.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    setup()?;
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

fn setup() -> Result<()> {
    setup_with(&[])
}

/// [`setup`], with more Debian packages.
fn setup_with(more: &[&str]) -> Result<()> {
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
fn build_daemon(root: &Path) -> Result<PathBuf> {
    check(Command::new("cargo").args(["build", "--release", "--package", "proxy-user"]))?;
    let bin = root.join("target/release/spliced");
    ensure!(bin.exists(), "{} was not built", bin.display());
    Ok(bin)
}

fn run(root: &Path, args: &[String]) -> Result<()> {
    setup()?;
    let bin = build_daemon(root)?;
    let listener = TcpListener::bind(DEMO_BACKEND)
        .with_context(|| format!("the demo backend cannot listen on {DEMO_BACKEND}"))?;
    std::thread::spawn(move || demo_backend(&listener));
    note(&format!(
        "demo backend (echo, upper-cased) listening on {DEMO_BACKEND}"
    ));
    note("spliced listens on port 10080; try:  echo hello | nc -N 127.0.0.1 10080");
    note("stop with Ctrl-C");
    let st = status(
        Command::new(bin)
            .args(["run", "--config"])
            .arg(root.join("examples/fly.toml"))
            .args(args),
    )?;
    if !st.success() {
        bail!("spliced exited with {st}");
    }
    Ok(())
}

/// Echoes each connection's bytes back, ASCII upper-cased, so a reply visibly came through the
/// backend.
fn demo_backend(listener: &TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut conn: TcpStream = conn;
            let mut buf = [0u8; 16 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        buf[..n].make_ascii_uppercase();
                        if conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Builds and runs `spliced-bench`, then checks that it wrote well-formed output: the
/// figures themselves are not judged (the benchmark asserts no timing).
fn bench(root: &Path, quick: bool, args: &[String]) -> Result<()> {
    setup_with(BENCH_PACKAGES)?;
    let spliced = build_daemon(root)?;
    check(Command::new("cargo").args([
        "build",
        "--release",
        "--package",
        "tests",
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

fn test(root: &Path, filter: Option<&str>, no_lint: bool) -> Result<()> {
    setup()?;
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
    let bin = build_daemon(root)?;
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
