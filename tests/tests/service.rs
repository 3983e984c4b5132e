//! spliced as a service: the readiness protocol against a real Unix datagram socket (these
//! machines do not boot systemd), the shipped unit checked and scored by systemd's own tools,
//! and the daemon serving on the sockmap plane as an unprivileged user with only the
//! capabilities the unit grants.

use std::{
    io::Read, net::Shutdown, os::unix::net::UnixDatagram, path::Path, process::Command,
    time::Duration,
};

use tests::{Daemon, Net, Plane, Scratch, Topo, echo_server};

/// The capabilities `dist/spliced.service` grants, by number: `CAP_NET_ADMIN` (12),
/// `CAP_NET_BIND_SERVICE` (10), `CAP_PERFMON` (38), `CAP_BPF` (39).
const UNIT_CAPS: u64 = (1 << 12) | (1 << 10) | (1 << 38) | (1 << 39);
const UNIT_CAP_NAMES: &str = "+net_admin,+net_bind_service,+perfmon,+bpf";

fn unit_file() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/spliced.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The next message the daemon sends to `socket`.
fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn notifies(net: &Net, socket: &UnixDatagram, env: &str) {
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut daemon = Daemon::start_with(&net.proxy, &["env", env], Plane::Sockmap, &[]);
    let ready = next_message(socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l == format!("MAINPID={}", daemon.pid)),
        "{ready:?} (pid {})",
        daemon.pid
    );
    daemon.signal(libc::SIGHUP);
    assert_eq!(next_message(socket), "RELOADING=1");
    assert_eq!(next_message(socket), "READY=1");
    assert_eq!(daemon.stats()["reloads"]["done"], 1);
    daemon.signal(libc::SIGTERM);
    assert_eq!(next_message(socket), "STOPPING=1");
    assert!(daemon.wait(Duration::from_secs(20)).success());
}

#[test]
fn notify_ready_reloading_stopping_on_a_path() {
    let dir = Scratch::new();
    let path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    notifies(
        &Net::new(Topo::Loopback),
        &socket,
        &format!("NOTIFY_SOCKET={}", path.display()),
    );
}

/// SIGUSR2: the new process says it is ready, the old one hands the service manager the new
/// main pid and never says it stops; the new one says so when it is stopped.
#[test]
fn notify_follows_an_upgrade() {
    let dir = Scratch::new();
    let path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let net = Net::new(Topo::Loopback);
    let env = format!("NOTIFY_SOCKET={}", path.display());
    let mut daemon = Daemon::start_with(&net.proxy, &["env", &env], Plane::Sockmap, &[]);
    assert!(next_message(&socket).lines().any(|l| l == "READY=1"));
    daemon.signal(libc::SIGUSR2);
    let mut seen = Vec::new();
    let new = loop {
        let m = next_message(&socket);
        assert_ne!(m, "STOPPING=1", "the old process said it stops: {seen:?}");
        if let Some(pid) = m
            .strip_prefix("MAINPID=")
            .and_then(|p| p.parse::<u32>().ok())
        {
            break pid;
        }
        seen.push(m);
    };
    let _reaper = tests::Reaper(vec![u64::from(new)]);
    assert_ne!(new, daemon.pid);
    assert!(
        seen.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "the new process said it is ready: {seen:?}"
    );
    assert_eq!(daemon.stats()["pid"], new);
    assert!(daemon.wait(Duration::from_secs(20)).success());
    // SAFETY: kill with plain integers.
    assert_eq!(unsafe { libc::kill(new as i32, libc::SIGTERM) }, 0);
    assert_eq!(next_message(&socket), "STOPPING=1");
    tests::wait_ended(u64::from(new), Duration::from_secs(20));
}

/// An abstract name (`@name`) is per network namespace: the socket is bound in the proxy's,
/// where the daemon runs.
#[test]
fn notify_on_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt as _;
    let net = Net::new(Topo::Loopback);
    let name = format!("spliced-test-notify-{}", std::process::id());
    let socket = net.proxy.run({
        let name = name.clone();
        move || {
            let addr =
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
            UnixDatagram::bind_addr(&addr).expect("bind the notify socket")
        }
    });
    notifies(&net, &socket, &format!("NOTIFY_SOCKET=@{name}"));
}

/// `systemd-analyze verify` finds nothing to say about the unit, and `systemd-analyze
/// security` rates its exposure 3.0 or lower ("OK" on its scale of 0 to 10).
#[test]
fn unit_verifies_and_scores() {
    let dir = Scratch::new();
    let unit = dir.0.join("spliced.service");
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let bin = tests::spliced_bin();
    std::fs::write(
        &unit,
        unit_file().replace("/usr/local/bin/spliced", &bin.display().to_string()),
    )
    .expect("unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian's systemd)");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for spliced.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level: {text}"));
    assert!(exposure <= 3.0, "exposure {exposure}:\n{text}");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
    ] {
        assert!(
            unit_file().lines().any(|l| l == line),
            "the unit lacks {line}"
        );
    }
}

/// The field `name` of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    field(&status, name)
}

/// The field `name` of a /proc status text.
fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_owned()
}

/// A command that runs the rest as user 65534 with only the capabilities `caps` (setpriv's
/// `+name,...`). `ip netns exec` gives the daemon a fresh /sys without cgroup2, which spliced
/// then mounts itself, as only root may; a service manager has it mounted: so it is here,
/// before the privileges go.
fn unprivileged(caps: &str) -> Vec<String> {
    [
        "sh",
        "-c",
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"",
        "sh",
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps=-all,{caps}"),
        &format!("--ambient-caps=-all,{caps}"),
        &format!("--bounding-set=-all,{caps}"),
        "--",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Each capability the unit grants for the sockmap plane is needed: without any one of them,
/// `--dataplane sockmap` refuses to start.
#[test]
fn each_capability_is_needed() {
    let net = Net::new(Topo::Loopback);
    let dir = Scratch::new();
    let config = dir.0.join("fly.toml");
    std::fs::write(&config, tests::test_config()).expect("config");
    for dropped in ["+bpf", "+perfmon", "+net_admin"] {
        let caps: Vec<&str> = UNIT_CAP_NAMES
            .split(',')
            .filter(|c| *c != dropped)
            .collect();
        let wrapper = unprivileged(&caps.join(","));
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let out = tests::run_to_exit(&net.proxy, &wrapper, &config, 10);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "without {dropped} the sockmap plane still started (124: it served):\n{err}"
        );
        assert!(err.contains("--dataplane sockmap"), "{err}");
    }
}

/// As the unit runs it: an unprivileged user whose only capabilities are the unit's. The
/// sockmap plane loads, attaches and moves bytes; /proc shows the user and the capabilities.
#[test]
fn serves_unprivileged_with_the_units_capabilities() {
    let net = Net::new(Topo::Loopback);
    let wrapper = unprivileged(UNIT_CAP_NAMES);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let daemon = Daemon::start_with(&net.proxy, &wrapper, Plane::Sockmap, &[]);
    assert_eq!(daemon.stats()["dataplane"], "sockmap");
    let uids = status_field(daemon.pid, "Uid");
    assert!(uids.split_whitespace().all(|u| u == "65534"), "Uid: {uids}");
    let effective = u64::from_str_radix(&status_field(daemon.pid, "CapEff"), 16).expect("hex");
    assert_eq!(effective, UNIT_CAPS, "CapEff {effective:#x}");
    let _backend = echo_server(&net);
    let mut c = net.connect();
    tests::assert_echoes(&mut c, b"unprivileged");
    c.shutdown(Shutdown::Write).expect("half-close");
    let s = daemon.wait_idle();
    assert_kernel_moved(&s, 12);
}

/// A command that runs the rest from a copy of the binary in `dir`, which the user 65534 can
/// reach (a checkout may be in a private directory): an upgrade starts the binary at the
/// running one's path. The harness appends its binary and the arguments; the copy runs with
/// the arguments.
fn from_reachable_copy(dir: &Scratch) -> Vec<String> {
    let copy = reachable_copy(dir, &tests::spliced_bin(), "spliced");
    [
        "sh",
        "-c",
        &format!("shift; exec {} \"$@\"", copy.display()),
        "sh",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `kill -USR2` of the daemon, which runs as user 65534 and serves `c`: the new process
/// starts as the same user with the unit's capabilities in effect, loads its programs, and
/// takes over `c`, which echoes on through the kernel; the old process exits.
fn upgrade_as_the_user(daemon: &mut Daemon, c: &mut std::net::TcpStream) {
    tests::assert_echoes(c, b"before");
    let old = daemon.pid;
    // SAFETY: kill with plain integers.
    assert_eq!(
        unsafe { libc::kill(i32::try_from(old).expect("pid"), libc::SIGUSR2) },
        0
    );
    let status = daemon.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "the old process exited {status}\n{}",
        daemon.log()
    );
    let new = daemon.stats()["pid"].as_u64().expect("pid");
    assert_ne!(new, u64::from(old));
    let mut reaper = tests::Reaper::default();
    reaper.0.push(new);
    let new = u32::try_from(new).expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{new}/status")).expect("status");
    let uids = field(&status, "Uid");
    assert!(uids.split_whitespace().all(|u| u == "65534"), "Uid: {uids}");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let got = u64::from_str_radix(&field(&status, set), 16).expect("hex");
        assert_eq!(got, UNIT_CAPS, "{set} {got:#x}");
    }
    tests::assert_echoes(c, b"after");
    c.shutdown(Shutdown::Write).expect("half-close");
    let s = tests::completed_one_taken_over(daemon);
    assert_kernel_moved(&s, 11);
    // SAFETY: kill with plain integers.
    unsafe { libc::kill(i32::try_from(new).expect("pid"), libc::SIGTERM) };
    tests::wait_ended(u64::from(new), Duration::from_secs(20));
}

/// An upgrade as the unit runs it (`kill -USR2` of the main pid).
#[test]
fn upgrades_unprivileged_with_the_units_capabilities() {
    let net = Net::new(Topo::Loopback);
    let dir = Scratch::new();
    let mut wrapper = unprivileged(UNIT_CAP_NAMES);
    wrapper.extend(from_reachable_copy(&dir));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_with(&net.proxy, &wrapper, Plane::Sockmap, &[]);
    let _backend = echo_server(&net);
    let mut c = net.connect();
    upgrade_as_the_user(&mut daemon, &mut c);
}

/// An upgrade of a daemon started as root with `--user`: the old process passes the
/// capabilities it kept on to the new one, which starts as the user already.
#[test]
fn upgrades_after_switching_to_the_user() {
    let net = Net::new(Topo::Loopback);
    let dir = Scratch::new();
    let wrapper = from_reachable_copy(&dir);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut daemon =
        Daemon::start_with(&net.proxy, &wrapper, Plane::Sockmap, &["--user", "nobody"]);
    let _backend = echo_server(&net);
    let mut c = net.connect();
    upgrade_as_the_user(&mut daemon, &mut c);
}

/// The snapshot `s` shows the kernel moved at least `bytes` to the backend, with one
/// connection completed.
fn assert_kernel_moved(s: &serde_json::Value, bytes: u64) {
    assert_eq!(s["connections"]["completed"], 1, "{s:#}");
    assert!(
        s["kernel"]["services"][0]["bytes_to_backend"]
            .as_u64()
            .is_some_and(|b| b >= bytes),
        "the kernel moved the bytes: {s:#}"
    );
}

/// `--log-format json`: every line the daemon logs is one JSON object with a level and a
/// message, for a log pipeline.
#[test]
fn logs_as_json() {
    let net = Net::new(Topo::Loopback);
    let daemon = Daemon::start(&net.proxy, Plane::Sockmap, &["--log-format", "json"]);
    let log = daemon.stop();
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        messages.push(
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    for want in ["spliced is serving", "stopped"] {
        assert!(
            messages.iter().any(|m| m == want),
            "no {want:?} in {messages:?}"
        );
    }
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(str::trim);
        if parent == Some(&pid.to_string()) {
            found.push(child);
        }
    }
    found
}

/// The credentials of one thread or process, as /proc shows them, checked against the user
/// (65534) with `caps` kept, and `bounding` the most it or its children may ever have.
fn assert_switched(status_path: &Path, caps: u64, bounding: u64) {
    let status = std::fs::read_to_string(status_path)
        .unwrap_or_else(|e| panic!("{}: {e}", status_path.display()));
    for ids in ["Uid", "Gid"] {
        let v = field(&status, ids);
        assert!(
            v.split_whitespace().all(|u| u == "65534"),
            "{}: {ids} {v}",
            status_path.display()
        );
    }
    for (set, want) in [
        ("CapEff", caps),
        ("CapPrm", caps),
        ("CapBnd", bounding),
        ("CapInh", 0),
        ("CapAmb", 0),
    ] {
        let got = u64::from_str_radix(&field(&status, set), 16).expect("hex");
        assert_eq!(got, want, "{}: {set} {got:#x}", status_path.display());
    }
}

/// A copy of the program `from`, named `name` in `dir`, which the user 65534 can run, as
/// `dir` itself can be entered by it.
fn reachable_copy(dir: &Scratch, from: &Path, name: &str) -> std::path::PathBuf {
    let mode = |m| std::os::unix::fs::PermissionsExt::from_mode(m);
    std::fs::set_permissions(&dir.0, mode(0o755)).expect("scratch permissions");
    let copy = dir.0.join(name);
    std::fs::copy(from, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    std::fs::set_permissions(&copy, mode(0o755)).expect("copy's permissions");
    copy
}

/// A copy of the echo app in `dir`, which the user 65534 can run: a machine runs as the
/// user, who may not reach into the checkout (a private temporary directory, say).
fn reachable_echo(dir: &Scratch) -> std::path::PathBuf {
    reachable_copy(dir, &tests::apps::go_app("goecho"), "goecho")
}

/// A config whose one service runs the echo app at `echo` as a machine spliced starts, on
/// the public `ports` (`[[services.ports]]` tables).
fn machine_config(echo: &Path, ports: &str) -> String {
    format!(
        "app = \"as-user\"\n\n[[services]]\n  internal_port = {}\n  protocol = \"tcp\"\n  auto_stop_machines = \"off\"\n{ports}\n[[machines]]\n  id = \"echo\"\n  command = [\"sh\", \"-c\", \"exec {} 127.0.0.1:$PORT\"]\n",
        tests::BACKEND_PORT,
        echo.display()
    )
}

/// Under the unit, whose capabilities are ambient (passed on at exec), a machine the daemon
/// starts still runs with none: the daemon empties its child's ambient and inheritable sets.
#[test]
fn a_machine_gets_none_of_the_units_capabilities() {
    let net = Net::new(Topo::Loopback);
    let reachable = Scratch::new();
    let echo = reachable_echo(&reachable);
    let wrapper = unprivileged(UNIT_CAP_NAMES);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let public = format!("  [[services.ports]]\n    port = {}\n", tests::PUBLIC_PORT);
    let daemon = Daemon::start_config_with(
        &net.proxy,
        &wrapper,
        &machine_config(&echo, &public),
        Plane::Sockmap,
        &[],
    );
    let amb = u64::from_str_radix(&status_field(daemon.pid, "CapAmb"), 16).expect("hex");
    assert_eq!(amb, UNIT_CAPS, "the daemon's ambient set: {amb:#x}");
    // The first connection starts the machine.
    let mut c = net.connect();
    tests::assert_echoes(&mut c, b"no capabilities");
    let machines = children(daemon.pid);
    assert_eq!(machines.len(), 1, "the machine's process: {machines:?}");
    assert_switched(
        Path::new(&format!("/proc/{}/status", machines[0])),
        0,
        UNIT_CAPS,
    );
    drop(c);
    daemon.stop();
}

/// `--user`: started as root, the daemon loads its programs and binds its ports, then every
/// one of its threads runs as the user with only the unit's capabilities, two shown in use
/// here: the kernel moves the bytes, the proxied sockets get receive buffers past
/// `net.core.rmem_max` (`CAP_NET_ADMIN`), a reload binds port 80 (`CAP_NET_BIND_SERVICE`),
/// and a machine the daemon starts runs as the user with no capability at all (`CAP_BPF`
/// and `CAP_PERFMON` are for an upgrade's new process: `upgrades_after_switching_to_the_user`).
#[test]
fn switches_every_thread_to_the_user_keeping_the_units_capabilities() {
    let net = Net::new(Topo::Loopback);
    let reachable = Scratch::new();
    let echo = reachable_echo(&reachable);
    let config = |ports: &str| machine_config(&echo, ports);
    let public = format!("  [[services.ports]]\n    port = {}\n", tests::PUBLIC_PORT);
    // A bound whose receive buffers (1.5 times it, half of that asked for) pass the host's cap.
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .expect("rmem_max")
        .trim()
        .parse()
        .expect("number");
    let max_buffer = (rmem_max * 2).next_multiple_of(1 << 16);
    let daemon = Daemon::start_config(
        &net.proxy,
        &config(&public),
        Plane::Sockmap,
        &["--user", "nobody", "--max-buffer", &max_buffer.to_string()],
    );
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", daemon.pid))
        .expect("tasks")
        .map(|t| t.expect("task").path().join("status"))
        .collect();
    assert!(tasks.len() >= 3, "threads: {tasks:?}");
    for status in &tasks {
        assert_switched(status, UNIT_CAPS, UNIT_CAPS);
    }

    // The first connection starts the machine.
    let mut c = net.connect();
    tests::assert_echoes(&mut c, b"as a user");
    let buffers: Vec<i32> = daemon
        .tcp_sockets()
        .iter()
        .filter(|s| tests::sockopt(*s, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == 0)
        .map(|s| tests::sockopt(s, libc::SOL_SOCKET, libc::SO_RCVBUF))
        .collect();
    assert_eq!(buffers.len(), 2, "the daemon's connected sockets");
    assert!(
        buffers
            .iter()
            .all(|&b| u64::try_from(b) == Ok(max_buffer * 3 / 2) && b as u64 / 2 > rmem_max),
        "receive buffers {buffers:?} past rmem_max {rmem_max}"
    );
    let machines = children(daemon.pid);
    assert_eq!(machines.len(), 1, "the machine's process: {machines:?}");
    assert_switched(
        Path::new(&format!("/proc/{}/status", machines[0])),
        0,
        UNIT_CAPS,
    );
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("end of stream");
    let s = daemon.wait_idle();
    assert_kernel_moved(&s, 9);

    let low = format!("{public}  [[services.ports]]\n    port = 80\n");
    let s = daemon.reload(&config(&low));
    assert_eq!(s["reloads"]["done"], 1, "{s:#}\n{}", daemon.log());
    let addr = std::net::SocketAddr::new(net.public().ip(), 80);
    let mut c = net
        .client()
        .connect(addr)
        .expect("port 80 after the reload");
    tests::assert_echoes(&mut c, b"low port");
    drop(c);
    daemon.stop();
}
