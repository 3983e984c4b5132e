//! The daemon under test: started in a namespace with the tests' fly.toml, its admin
//! snapshot, its process, and the BPF objects it loads.

use std::{
    io::Read,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{BACKEND_PORT, Net, Netns, PUBLIC_PORT, Topo, netns::unique, sh};

/// A data plane of the daemon, as `--dataplane` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    Sockmap,
    Copy,
    /// sockmap, or copy when the kernel programs cannot load.
    Auto,
}

impl Plane {
    /// The name `--dataplane` takes and the admin snapshot reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sockmap => "sockmap",
            Self::Copy => "copy",
            Self::Auto => "auto",
        }
    }
}

impl Plane {
    /// Whether this plane moves the bytes in the kernel.
    pub fn in_kernel(self) -> bool {
        self != Self::Copy
    }
}

impl std::fmt::Display for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Instantiates each check `fn check(plane: Plane, topo: Topo)` named for both data planes and
/// every topology, as `sockmap_loopback::check`, `copy_veth6::check`, ...
#[macro_export]
macro_rules! checklist {
    ($($check:ident),* $(,)?) => {
        mod sockmap_loopback { $( #[test] fn $check() { super::$check($crate::Plane::Sockmap, $crate::Topo::Loopback) } )* }
        mod sockmap_veth { $( #[test] fn $check() { super::$check($crate::Plane::Sockmap, $crate::Topo::Veth) } )* }
        mod copy_loopback { $( #[test] fn $check() { super::$check($crate::Plane::Copy, $crate::Topo::Loopback) } )* }
        mod copy_veth { $( #[test] fn $check() { super::$check($crate::Plane::Copy, $crate::Topo::Veth) } )* }
        mod sockmap_veth6 { $( #[test] fn $check() { super::$check($crate::Plane::Sockmap, $crate::Topo::Veth6) } )* }
        mod copy_veth6 { $( #[test] fn $check() { super::$check($crate::Plane::Copy, $crate::Topo::Veth6) } )* }
    };
}

/// A topology with the daemon serving the tests' fly.toml on `plane`.
pub fn setup(plane: Plane, topo: Topo) -> (Net, Daemon) {
    setup_with(plane, topo, &[])
}

/// [`setup`] with more options for the daemon.
pub fn setup_with(plane: Plane, topo: Topo, extra: &[&str]) -> (Net, Daemon) {
    crate::raise_fd_limit();
    let net = Net::new(topo);
    let daemon = Daemon::start_config(&net.proxy, &net.config(), plane, extra);
    assert_eq!(
        daemon.stats()["dataplane"],
        plane.name(),
        "{}",
        daemon.log()
    );
    (net, daemon)
}

/// The path of the daemon under test (set by `cargo xtask test`).
pub fn spliced_bin() -> PathBuf {
    std::env::var_os("SPLICED_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/spliced"),
        PathBuf::from,
    )
}

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("scratch"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fly.toml the tests serve: one TCP service from [`PUBLIC_PORT`] to [`BACKEND_PORT`].
pub fn test_config() -> String {
    format!(
        "app = \"spliced-test\"\n\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n"
    )
}

/// A running `spliced run` in a namespace.
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    admin: PathBuf,
    log: PathBuf,
    config: PathBuf,
    _dir: Scratch,
}

impl Daemon {
    /// Starts the daemon with `--dataplane plane` in `ns` and waits until it serves.
    pub fn start(ns: &Netns, plane: Plane, extra: &[&str]) -> Self {
        Self::start_with(ns, &[], plane, extra)
    }

    /// Like [`Daemon::start`], with a command (and its arguments) that runs the daemon.
    pub fn start_with(ns: &Netns, wrapper: &[&str], plane: Plane, extra: &[&str]) -> Self {
        Self::start_full(ns, wrapper, Some(&test_config()), plane, extra)
    }

    /// Like [`Daemon::start`], serving the fly.toml `config`.
    pub fn start_config(ns: &Netns, config: &str, plane: Plane, extra: &[&str]) -> Self {
        Self::start_full(ns, &[], Some(config), plane, extra)
    }

    /// [`Daemon::start_config`] under `wrapper`, as [`Daemon::start_with`].
    pub fn start_config_with(
        ns: &Netns,
        wrapper: &[&str],
        config: &str,
        plane: Plane,
        extra: &[&str],
    ) -> Self {
        Self::start_full(ns, wrapper, Some(config), plane, extra)
    }

    /// Like [`Daemon::start`], serving the apps of the registry at `url` and no file.
    pub fn start_registry(ns: &Netns, url: &str, plane: Plane, extra: &[&str]) -> Self {
        Self::start_registry_with(ns, &[], url, plane, extra)
    }

    /// [`Daemon::start_registry`] under `wrapper` (a command and its arguments).
    pub fn start_registry_with(
        ns: &Netns,
        wrapper: &[&str],
        url: &str,
        plane: Plane,
        extra: &[&str],
    ) -> Self {
        let args = [&["--registry", url], extra].concat();
        Self::start_full(ns, wrapper, None, plane, &args)
    }

    fn start_full(
        ns: &Netns,
        wrapper: &[&str],
        config_text: Option<&str>,
        plane: Plane,
        extra: &[&str],
    ) -> Self {
        let dir = Scratch::new();
        // Writable by a daemon that runs as another user (under a `setpriv` wrapper), as /tmp is.
        std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .expect("scratch permissions");
        let config = dir.0.join("fly.toml");
        if let Some(text) = config_text {
            std::fs::write(&config, text).expect("write the config");
        }
        let admin = dir.0.join("admin.sock");
        let log = dir.0.join("spliced.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(wrapper)
            .arg(spliced_bin());
        cmd.arg("run");
        if config_text.is_some() {
            cmd.arg("--config").arg(&config);
        }
        cmd.args(["--dataplane", plane.name(), "--admin-socket"])
            .arg(&admin)
            .args(extra)
            // SPLICED_TEST_LOG replaces the filter (trace, when a test is being looked into).
            .env(
                "RUST_LOG",
                std::env::var("SPLICED_TEST_LOG")
                    .unwrap_or_else(|_| "info,proxy_user=debug".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.0.join("stdout.log")).expect("log file"))
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = cmd.spawn().expect("start spliced");
        let pid = child.id();
        let mut d = Self {
            child: Some(child),
            pid,
            admin,
            log,
            config,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if d.try_stats().is_some() {
                return d;
            }
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("spliced exited at start ({st}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "spliced did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes `config` over the daemon's config file, sends SIGHUP, and returns the snapshot
    /// once the reload is counted, served or refused.
    pub fn reload(&self, config: &str) -> serde_json::Value {
        let before = self.stats();
        let count = |s: &serde_json::Value| {
            s["reloads"]["done"].as_u64().unwrap_or(0)
                + s["reloads"]["failed"].as_u64().unwrap_or(0)
        };
        let want = count(&before) + 1;
        std::fs::write(&self.config, config).expect("write the config");
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats();
            if count(&s) >= want {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "reload not counted:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin socket's answer to `request` (`snapshot`, `connections`).
    pub fn ask(&self, request: &str) -> Option<serde_json::Value> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.admin).ok()?;
        std::io::Write::write_all(&mut s, format!("{request}\n").as_bytes()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> &std::path::Path {
        &self.admin
    }

    fn try_stats(&self) -> Option<serde_json::Value> {
        self.ask("snapshot")
    }

    /// The daemon's counters, from its admin socket.
    pub fn stats(&self) -> serde_json::Value {
        self.try_stats()
            .unwrap_or_else(|| panic!("admin socket did not answer:\n{}", self.log()))
    }

    /// Waits until the daemon reports no live connection and, on the sockmap plane, no map
    /// entry; panics with the counters otherwise.
    pub fn wait_idle(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats();
            let active = s["connections"]["active"].as_u64().expect("active count");
            let (entries, watched) = kernel_leftovers(&s);
            if active == 0 && entries == 0 && watched == 0 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "connections or map entries left behind: {s:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The BPF programs and maps the daemon holds, read from its descriptors
    /// (`/proc/PID/fdinfo`: `prog_id`, `map_id`): its own, whatever their names.
    pub fn bpf_objects(&self) -> Vec<BpfObject> {
        let dir = format!("/proc/{}/fdinfo", self.pid);
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir)
            .expect("daemon fdinfo directory")
            .flatten()
        {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            for line in text.lines() {
                let object = if let Some(v) = line.strip_prefix("prog_id:") {
                    ("prog", v)
                } else if let Some(v) = line.strip_prefix("map_id:") {
                    ("map", v)
                } else {
                    continue;
                };
                if let Ok(id) = object.1.trim().parse() {
                    found.push((object.0, id));
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("daemon fd directory")
            .count()
    }

    /// Every TCP socket the daemon holds, listeners included, as duplicates of its descriptors
    /// (`pidfd_getfd`): their options can then be read as the daemon set them.
    pub fn tcp_sockets(&self) -> Vec<OwnedFd> {
        // SAFETY: pidfd_open on the pid of our own, still running, child.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor just returned to us, owned from here on.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let mut found = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{}/fd", self.pid)).expect("daemon fds") {
            let entry = entry.expect("fd entry");
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
            let Some(target) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if !is_socket {
                continue;
            }
            // SAFETY: pidfd_getfd with a valid pidfd; a descriptor closed meanwhile fails.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
            if fd < 0 {
                continue;
            }
            // SAFETY: as above.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
            let domain = sockopt(&fd, libc::SOL_SOCKET, libc::SO_DOMAIN);
            let protocol = sockopt(&fd, libc::SOL_SOCKET, libc::SO_PROTOCOL);
            if matches!(domain, libc::AF_INET | libc::AF_INET6) && protocol == libc::IPPROTO_TCP {
                found.push(fd);
            }
        }
        found
    }

    /// Resident set size of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_field(&format!("/proc/{}/status", self.pid), "VmRSS:")
    }

    /// Bytes the daemon read and wrote through system calls (`/proc/PID/io` rchar + wchar).
    pub fn io_bytes(&self) -> u64 {
        let path = format!("/proc/{}/io", self.pid);
        proc_field(&path, "rchar:") + proc_field(&path, "wchar:")
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on the pid of our own child.
        assert_eq!(unsafe { libc::kill(self.pid as i32, signal) }, 0);
    }

    /// Waits for the daemon to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("daemon still owned");
        loop {
            if let Some(st) = child.try_wait().expect("wait for spliced") {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "spliced did not exit in {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let st = self.wait(Duration::from_secs(40));
        assert!(st.success(), "spliced exited with {st}:\n{}", self.log());
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- spliced log (last lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn proc_field(path: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{path} has no {key}"))
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
pub fn ended(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits up to `limit` for process `pid` to end; panics if it does not.
pub fn wait_ended(pid: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !ended(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes a test started indirectly (an upgrade's new daemon is not the test's child),
/// killed when this is dropped, so that a failed test leaves none running.
#[derive(Default)]
pub struct Reaper(pub Vec<u64>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if !ended(pid)
                && let Ok(raw) = i32::try_from(pid)
            {
                // SAFETY: kill with plain integers.
                unsafe { libc::kill(raw, libc::SIGKILL) };
            }
        }
    }
}

/// Runs `spliced run --config CONFIG --dataplane sockmap` in `ns` under `wrapper`, for a
/// start that should fail, killed after `secs` if it serves instead (exit status 124).
pub fn run_to_exit(ns: &Netns, wrapper: &[&str], config: &Path, secs: u32) -> std::process::Output {
    Command::new("timeout")
        .args([&secs.to_string(), "ip", "netns", "exec", &ns.name])
        .args(wrapper)
        .arg(spliced_bin())
        .arg("run")
        .arg("--config")
        .arg(config)
        .args(["--dataplane", "sockmap"])
        .output()
        .expect("run spliced")
}

/// A BPF program or map, by its kernel id: `("prog", 12)`, `("map", 40)`.
pub type BpfObject = (&'static str, u64);

/// Which of `objects` are still loaded once the kernel has had `limit` to free them: it frees a
/// program or map after its last reference goes, which may come a little after the process
/// holding it exited (a map stays while a program using it waits out an RCU grace period).
pub fn left_loaded(objects: &[BpfObject], limit: Duration) -> Vec<BpfObject> {
    let mut left = still_loaded(objects);
    crate::eventually(limit, || {
        left = still_loaded(objects);
        left.is_empty()
    });
    left
}

/// Which of `objects` are loaded in the kernel now.
pub fn still_loaded(objects: &[BpfObject]) -> Vec<BpfObject> {
    let mut loaded = Vec::new();
    for kind in ["prog", "map"] {
        let out = sh(&["bpftool", "-j", kind, "show"]);
        let list: serde_json::Value = serde_json::from_str(&out).expect("bpftool prints JSON");
        for item in list.as_array().into_iter().flatten() {
            if let Some(id) = item["id"].as_u64()
                && objects.contains(&(kind, id))
            {
                loaded.push((kind, id));
            }
        }
    }
    loaded
}

/// The per-socket map entries and watched sockets a snapshot reports; every count must be
/// there on the sockmap plane (a renamed or missing one fails rather than reads as zero), and
/// the copy plane has none.
fn kernel_leftovers(s: &serde_json::Value) -> (u64, u64) {
    let kernel = &s["kernel"];
    if s["dataplane"] != "sockmap" {
        assert!(kernel.is_null(), "kernel counters on the copy plane: {s:#}");
        return (0, 0);
    }
    let maps = &kernel["map_entries"];
    let entries = ["SOCKS", "RECV", "LINKS", "FLOWS"]
        .iter()
        .map(|m| {
            maps[m]
                .as_u64()
                .unwrap_or_else(|| panic!("the snapshot has no entry count for {m}: {s:#}"))
        })
        .sum();
    let watched = kernel["watched_sockets"]
        .as_u64()
        .unwrap_or_else(|| panic!("the snapshot has no watched_sockets: {s:#}"));
    (entries, watched)
}

/// An integer socket option of `fd`.
pub fn sockopt(fd: &impl AsRawFd, level: i32, name: i32) -> i32 {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid int for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    value
}
