//! `cargo xtask test --kernel SERIES`: the integration tests inside one of Debian's kernels,
//! booted under QEMU.
//!
//! The kernel package comes from Debian's archive (`apt-get download`, unpacked with `dpkg -x`,
//! never installed) into `target/kernels`. virtme-ng boots it with this machine's root file
//! system, read-only with writable overlays, and the guest runs the test binaries built here,
//! writing their output to a directory shared with the host, which is printed as it comes.
//! QEMU emulates the CPU (TCG): KVM hangs after the firmware on these machines whatever the CPU
//! model (docs/kernels.md), so it is used only when asked (`--kvm`).

use std::{
    fmt::Write as _,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{check, note, setup, succeeds};

/// Debian packages the guests need: QEMU, depmod (virtme-ng indexes the unpacked modules) and
/// a static busybox (its initramfs).
const APT_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "busybox-static"];
/// `virtme-ng`, from `PyPI`, at the version this was written against.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// What to run in each guest.
pub struct Options {
    /// A kernel series Debian's archive serves (`6.1`, `6.12`), or `all`.
    pub kernel: String,
    /// Divides the bulk transfers (`tests::bulk`).
    pub shrink: u64,
    /// Test binaries (`dataplane`, `ends`...); all when empty.
    pub tests: Vec<String>,
    /// Only tests whose name contains this.
    pub filter: Option<String>,
    /// Not the tests whose name contains one of these.
    pub skip: Vec<String>,
    /// Try hardware virtualization.
    pub kvm: bool,
    /// The longest one guest may run.
    pub timeout: Duration,
}

/// Runs the integration tests in each kernel `opts.kernel` names; fails if any failed.
pub fn test(root: &Path, opts: &Options) -> Result<()> {
    setup::setup_with(APT_PACKAGES)?;
    install_virtme_ng()?;
    let kernels = resolve(&opts.kernel)?;
    let (bin, binaries) = frozen(
        root,
        &setup::build_daemon(root)?,
        &test_binaries(&opts.tests)?,
    )?;
    let mut failed = Vec::new();
    for package in &kernels {
        let image = fetch(root, package)?;
        note(&format!("booting {package} under QEMU"));
        if !run_guest(root, &image, &bin, &binaries, opts)? {
            failed.push(package.clone());
        }
    }
    ensure!(
        failed.is_empty(),
        "the tests failed on {}",
        failed.join(", ")
    );
    Ok(())
}

fn install_virtme_ng() -> Result<()> {
    let has = || succeeds(Command::new("python3").args(["-c", "import virtme_ng.run"]));
    if !has() {
        note(&format!(
            "installing {VIRTME_NG} from PyPI (boots the test kernels)"
        ));
        check(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--root-user-action=ignore",
            VIRTME_NG,
        ]))?;
        ensure!(
            has(),
            "{VIRTME_NG} was installed but python3 cannot import it"
        );
    }
    Ok(())
}

/// The kernel image packages (`linux-image-<abi>-amd64`, signed, generic flavour) Debian's
/// archive here serves, newest of each series.
fn available() -> Result<Vec<(String, String)>> {
    let search = || -> Result<String> {
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", "^linux-image-[0-9].*-amd64$"])
            .output()
            .context("apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut listing = search()?;
    if !listing.contains("linux-image-") {
        check(Command::new("apt-get").args(["update", "-q"]))?;
        listing = search()?;
    }
    let mut newest: Vec<(String, Vec<u64>, String)> = Vec::new();
    for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(abi) = name
            .strip_prefix("linux-image-")
            .and_then(|n| n.strip_suffix("-amd64"))
        else {
            continue;
        };
        // Flavours other than the generic one, and the unsigned or debug builds.
        if abi.contains("cloud") || abi.contains("rt") || abi.contains("unsigned") {
            continue;
        }
        let numbers: Vec<u64> = abi
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        let [major, minor, ..] = numbers[..] else {
            continue;
        };
        let series = format!("{major}.{minor}");
        match newest.iter_mut().find(|(s, ..)| *s == series) {
            Some(entry) if entry.1 < numbers => *entry = (series, numbers, name.to_owned()),
            Some(_) => {}
            None => newest.push((series, numbers, name.to_owned())),
        }
    }
    newest.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(newest.into_iter().map(|(s, _, n)| (s, n)).collect())
}

/// The packages `kernel` names: one series, or `all`.
fn resolve(kernel: &str) -> Result<Vec<String>> {
    let all = available()?;
    let series: Vec<String> = all.iter().map(|(s, _)| s.clone()).collect();
    if kernel == "all" {
        ensure!(
            !all.is_empty(),
            "Debian's archive here serves no kernel image"
        );
        return Ok(all.into_iter().map(|(_, n)| n).collect());
    }
    match all.into_iter().find(|(s, _)| s == kernel) {
        Some((_, name)) => Ok(vec![name]),
        None => bail!(
            "Debian's archive here serves no {kernel} kernel; it serves {}",
            series.join(", ")
        ),
    }
}

/// Downloads and unpacks `package` under target/kernels once; returns its kernel image.
fn fetch(root: &Path, package: &str) -> Result<PathBuf> {
    let dir = root.join("target/kernels").join(package);
    let tree = dir.join("root");
    let image = |tree: &Path| -> Option<PathBuf> {
        std::fs::read_dir(tree.join("boot"))
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
    };
    if let Some(found) = image(&tree) {
        return Ok(found);
    }
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    note(&format!("downloading {package} from Debian's archive"));
    check(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&dir),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
    let partial = dir.join("root.partial");
    let _ = std::fs::remove_dir_all(&partial);
    check(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &tree)?;
    let _ = std::fs::remove_file(&deb);
    image(&tree).with_context(|| format!("{package} holds no boot/vmlinuz-*"))
}

/// The integration test binaries, built, whose names are in `wanted` (all when empty).
fn test_binaries(wanted: &[String]) -> Result<Vec<PathBuf>> {
    let out = Command::new("cargo")
        .args([
            "test",
            "--release",
            "--package",
            "tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    ensure!(
        out.status.success(),
        "building the integration tests failed"
    );
    let mut found = Vec::new();
    for line in out.stdout.split(|&b| b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let target = &msg["target"];
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), target["name"].as_str()) else {
            continue;
        };
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if is_test && (wanted.is_empty() || wanted.iter().any(|w| w == name)) {
            found.push(PathBuf::from(exe));
        }
    }
    for w in wanted {
        ensure!(
            found.iter().any(|p| p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{w}-")))),
            "no integration test binary is named {w}"
        );
    }
    Ok(found)
}

/// Copies of the daemon and the test binaries, under target/kernels/bin, which the guests run:
/// a build on the host while a guest runs (its root file system is the host's) changes none
/// of the programs under test.
fn frozen(root: &Path, daemon: &Path, tests: &[PathBuf]) -> Result<(PathBuf, Vec<PathBuf>)> {
    let dir = root.join("target/kernels/bin");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let copy = |p: &Path| -> Result<PathBuf> {
        let to = dir.join(p.file_name().context("a binary without a name")?);
        std::fs::copy(p, &to).with_context(|| format!("copy {}", p.display()))?;
        Ok(to)
    };
    let tests = tests.iter().map(|t| copy(t)).collect::<Result<_>>()?;
    Ok((copy(daemon)?, tests))
}

/// Boots `image` and runs `binaries` in it; whether every test passed.
fn run_guest(
    root: &Path,
    image: &Path,
    daemon: &Path,
    binaries: &[PathBuf],
    opts: &Options,
) -> Result<bool> {
    let shared = root.join("target/kernels/out");
    let _ = std::fs::remove_dir_all(&shared);
    std::fs::create_dir_all(&shared)?;
    let log = shared.join("log");
    let rc = shared.join("rc");
    let quote = |p: &Path| format!("'{}'", p.display());
    let mut script = format!(
        "#!/bin/sh\nexec >{log} 2>&1\ncd {root}\nexport SPLICED_BIN={daemon} SPLICED_TEST_SHRINK={shrink}\n\
         # Debian's kernels build TLS as a module: the TLS tests must find it.\n\
         export SPLICED_TEST_KERNEL_TLS=1\n\
         echo \"guest: kernel $(uname -r), $(nproc) CPUs\"\nstatus=0\n\
         # As on the host: some tests hold tens of thousands of sockets.\n\
         ulimit -n 1048576\n\
         # The guest has no udev: /dev/net/tun appears once its module is loaded.\n\
         modprobe tun\n\
         \"$SPLICED_BIN\" check --kernel || status=1\n",
        log = quote(&log),
        root = quote(root),
        daemon = quote(daemon),
        shrink = opts.shrink,
    );
    for b in binaries {
        let name = b.file_name().map(|n| n.to_string_lossy().into_owned());
        let _ = writeln!(script, "echo '== {}'", name.unwrap_or_default());
        let _ = write!(script, "{} --test-threads=1", quote(b));
        if let Some(f) = &opts.filter {
            let _ = write!(script, " '{f}'");
        }
        for skip in &opts.skip {
            let _ = write!(script, " --skip '{skip}'");
        }
        script.push_str(" || status=1\n");
    }
    let _ = writeln!(script, "echo $status >{}", quote(&rc));
    let script_path = shared.join("run.sh");
    std::fs::write(&script_path, script)?;

    let mut vng = Command::new("python3");
    vng.args(["-m", "virtme_ng.run", "--run"])
        .arg(image)
        .args(["--cpus", "2", "--memory", "4G"])
        .arg(format!("--rwdir={}", shared.display()))
        // The tests build their Go applications under target/; the guest's writes stay there.
        .arg(format!("--overlay-rwdir={}", root.join("target").display()))
        .arg("--exec")
        .arg(format!("sh {}", quote(&script_path)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own group, so that a guest past its time is stopped with QEMU and all.
        .process_group(0);
    if !opts.kvm {
        vng.arg("--disable-kvm");
    }
    let mut child = vng.spawn().context("cannot start virtme-ng")?;
    let finished = follow(&mut child, &log, opts.timeout)?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    if !finished {
        bail!(
            "the guest ran past {} s and was stopped\n{stderr}",
            opts.timeout.as_secs()
        );
    }
    match std::fs::read_to_string(&rc) {
        Ok(code) => Ok(code.trim() == "0"),
        Err(_) => bail!("the guest ended before its tests did (crash or boot failure)\n{stderr}"),
    }
}

/// Prints what the guest writes to `log` until `child` exits (true) or `timeout` passes
/// (false: the guest is killed).
fn follow(child: &mut Child, log: &Path, timeout: Duration) -> Result<bool> {
    let start = Instant::now();
    let mut offset = 0;
    let mut out = std::io::stdout();
    let mut print_new = |offset: &mut u64| {
        if let Ok(mut f) = std::fs::File::open(log)
            && f.seek(SeekFrom::Start(*offset)).is_ok()
        {
            let mut buf = Vec::new();
            if let Ok(n) = f.read_to_end(&mut buf) {
                *offset += n as u64;
                let _ = out.write_all(&buf);
                let _ = out.flush();
            }
        }
    };
    loop {
        print_new(&mut offset);
        if child.try_wait()?.is_some() {
            print_new(&mut offset);
            return Ok(true);
        }
        if start.elapsed() > timeout {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            print_new(&mut offset);
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
