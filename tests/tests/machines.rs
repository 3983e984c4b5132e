//! Machines spliced runs itself (`[[machines]]` with `command`): a Go app as Fly's guide
//! deploys one, started by the first connection, stopped or suspended when idle, restarted
//! after a crash, and never left behind by spliced.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{BACKEND_PORT, Daemon, Net, PUBLIC_PORT, Plane, Topo, apps::go_app, until};

/// A config with one service on [`PUBLIC_PORT`] and `machines` Go apps, the n-th listening
/// on 127.0.0.(n+1), under `settings` (service keys).
fn config(machines: usize, settings: &str) -> String {
    let app = go_app("flyapp");
    let mut c = format!(
        "app = \"on-demand\"\n\n[env]\n  APP_MESSAGE = \"from-env\"\n\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n{settings}\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n"
    );
    for n in 0..machines {
        let ip = format!("127.0.0.{}", n + 1);
        let _ = write!(
            c,
            "\n[[machines]]\n  id = \"m{n}\"\n  address = \"{ip}\"\n  command = [\"{}\", \"{ip}\"]\n",
            app.display()
        );
    }
    c
}

fn start(machines: usize, settings: &str, extra: &[&str]) -> (Net, Daemon) {
    let net = Net::new(Topo::Loopback);
    let daemon = Daemon::start_config(
        &net.proxy,
        &config(machines, settings),
        Plane::Sockmap,
        extra,
    );
    (net, daemon)
}

/// Sends `line` at once after connecting (before any machine runs) and returns the answer.
fn ask(net: &Net, line: &str) -> String {
    let (addr, line) = (net.public(), line.to_owned());
    net.client().run(move || {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        writeln!(c, "{line}").expect("write");
        let mut answer = String::new();
        BufReader::new(c).read_line(&mut answer).expect("answer");
        answer
    })
}

/// A connection that has had `line` answered and stays open.
fn held(net: &Net, line: &str) -> TcpStream {
    let addr = net.public();
    let mut c = net
        .client()
        .run(move || TcpStream::connect(addr))
        .expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    writeln!(c, "{line}").expect("write");
    let mut answer = String::new();
    BufReader::new(c.try_clone().expect("clone"))
        .read_line(&mut answer)
        .expect("answer");
    assert_eq!(answer, format!("{}\n", line.to_uppercase()));
    c
}

fn machine(s: &Value, n: usize) -> &Value {
    &s["machines"][n]
}

fn pid(s: &Value, n: usize) -> u32 {
    let pid = machine(s, n)["pid"]
        .as_u64()
        .expect("a running machine has a pid");
    u32::try_from(pid).expect("pid")
}

/// The state letter of `/proc/PID/stat` (R, S, T...), `None` once the process is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        // A zombie is gone for our purpose: it runs nothing and spliced reaps it.
        if proc_state(pid).is_none_or(|s| s == 'Z') {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn the_first_connection_starts_the_machine_and_loses_no_byte() {
    let (net, daemon) = start(1, "  auto_stop_machines = \"stop\"\n", &[]);
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["state"], "stopped", "{s:#}");
    assert!(machine(&s, 0)["pid"].is_null(), "{s:#}");

    let started = Instant::now();
    assert_eq!(ask(&net, "hello"), "HELLO\n");
    println!(
        "first byte from a stopped machine after {:?}",
        started.elapsed()
    );
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["state"], "started", "{s:#}");
    assert_eq!(machine(&s, 0)["starts"], 1, "{s:#}");
    assert_eq!(s["services"][0]["queue"]["waited_for_start"], 1, "{s:#}");
    // A second connection finds it running.
    assert_eq!(ask(&net, "again"), "AGAIN\n");
    let s = daemon.stats();
    assert_eq!(s["services"][0]["queue"]["waited_for_start"], 1, "{s:#}");
    assert_eq!(machine(&s, 0)["starts"], 1, "{s:#}");
    // Its output is in spliced's log, tagged with its id, with [env] and PORT set.
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("machine=m0")
            && l.contains(&format!("listening on 127.0.0.1:{BACKEND_PORT}"))
            && l.contains("APP_MESSAGE=from-env")),
        "{log}"
    );
}

#[test]
fn concurrent_first_connections_start_one_machine() {
    const CLIENTS: usize = 100;
    let (net, daemon) = start(1, "  auto_stop_machines = \"stop\"\n", &[]);
    let addr = net.public();
    let answers = net.client().run(move || {
        let threads: Vec<_> = (0..CLIENTS)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = TcpStream::connect(addr).expect("connect");
                    c.set_read_timeout(Some(Duration::from_secs(15)))
                        .expect("timeout");
                    writeln!(c, "client {i}").expect("write");
                    let mut answer = String::new();
                    BufReader::new(c).read_line(&mut answer).expect("answer");
                    answer == format!("CLIENT {i}\n")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .filter(|ok| *ok)
            .count()
    });
    assert_eq!(answers, CLIENTS, "every client answered exactly");
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["starts"], 1, "{s:#}");
    assert_eq!(machine(&s, 0)["start_failures"], 0, "{s:#}");
}

/// One machine under `auto_stop_machines = how`, served once and then left idle until the
/// stop rule has put it in `idle`; returns the pid it had.
fn served_then_idle(how: &str, idle: &str) -> (Net, Daemon, u32) {
    let (net, daemon) = start(
        1,
        &format!("  auto_stop_machines = \"{how}\"\n"),
        &["--autostop-interval", "500ms"],
    );
    assert_eq!(ask(&net, "one"), "ONE\n");
    let p = pid(&daemon.stats(), 0);
    until(
        &daemon,
        Duration::from_secs(5),
        &format!("{idle} when idle"),
        |s| machine(s, 0)["state"] == idle,
    );
    (net, daemon, p)
}

#[test]
fn an_idle_machine_stops_and_the_next_connection_starts_it_again() {
    let (net, daemon, first) = served_then_idle("stop", "stopped");
    assert!(
        gone_within(first, Duration::from_secs(2)),
        "its process ended"
    );
    assert_eq!(ask(&net, "two"), "TWO\n");
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["starts"], 2, "{s:#}");
    assert_eq!(machine(&s, 0)["stops"], 1, "{s:#}");
    assert_eq!(machine(&s, 0)["crashes"], 0, "{s:#}");
    assert_ne!(pid(&s, 0), first, "a new process");
}

#[test]
fn a_machine_with_a_live_connection_is_not_stopped() {
    let (net, daemon) = start(
        1,
        "  auto_stop_machines = \"stop\"\n",
        &["--autostop-interval", "200ms"],
    );
    let addr = net.public();
    let mut c = net
        .client()
        .run(move || TcpStream::connect(addr))
        .expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut r = BufReader::new(c.try_clone().expect("clone"));
    writeln!(c, "first").expect("write");
    let mut line = String::new();
    r.read_line(&mut line).expect("answer");
    assert_eq!(line, "FIRST\n");
    // Several looks of the stop rule pass while the connection lives.
    std::thread::sleep(Duration::from_secs(1));
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["state"], "started", "{s:#}");
    writeln!(c, "still there").expect("write");
    line.clear();
    r.read_line(&mut line).expect("answer");
    assert_eq!(line, "STILL THERE\n");
    drop((c, r));
    until(&daemon, Duration::from_secs(5), "stopped once idle", |s| {
        machine(s, 0)["state"] == "stopped"
    });
}

#[test]
fn a_suspended_machine_resumes_for_the_next_connection() {
    let (net, daemon, p) = served_then_idle("suspend", "suspended");
    assert_eq!(
        proc_state(p),
        Some('T'),
        "the process is stopped by SIGSTOP"
    );
    let started = Instant::now();
    assert_eq!(ask(&net, "two"), "TWO\n");
    println!(
        "first byte from a suspended machine after {:?}",
        started.elapsed()
    );
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["starts"], 1, "{s:#}");
    assert_eq!(machine(&s, 0)["suspends"], 1, "{s:#}");
    assert_eq!(machine(&s, 0)["resumes"], 1, "{s:#}");
    assert_eq!(pid(&s, 0), p, "the same process");
    assert_ne!(proc_state(p), Some('T'));
}

#[test]
fn a_crashed_machine_is_started_again_after_a_back_off() {
    let (net, daemon) = start(1, "  auto_stop_machines = \"off\"\n", &[]);
    // Without auto-stop, spliced starts it at once.
    until(&daemon, Duration::from_secs(10), "started at start", |s| {
        machine(s, 0)["state"] == "started"
    });
    let first = pid(&daemon.stats(), 0);
    let addr = net.public();
    net.client().run(move || {
        let mut c = TcpStream::connect(addr).expect("connect");
        writeln!(c, "exit").expect("write");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // The machine exits: the connection ends.
        let _ = std::io::Read::read(&mut c, &mut [0; 16]);
    });
    until(
        &daemon,
        Duration::from_secs(5),
        "failed after a crash",
        |s| machine(s, 0)["state"] == "failed" && machine(s, 0)["crashes"] == 1,
    );
    assert!(gone_within(first, Duration::from_secs(2)));
    // The next connection waits out the back-off (1 s) and the start.
    let started = Instant::now();
    assert_eq!(ask(&net, "back"), "BACK\n");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["starts"], 2, "{s:#}");
    assert!(
        daemon
            .log()
            .contains("machine crashed soon after its start"),
        "{}",
        daemon.log()
    );
}

#[test]
fn min_machines_running_is_kept_and_a_spare_starts_past_the_soft_limit() {
    let (net, daemon) = start(
        2,
        "  auto_stop_machines = \"stop\"\n  min_machines_running = 1\n  [services.concurrency]\n    type = \"connections\"\n    soft_limit = 1\n    hard_limit = 10\n",
        &["--autostop-interval", "300ms"],
    );
    // One machine is kept running from the start.
    until(&daemon, Duration::from_secs(10), "one kept", |s| {
        machine(s, 0)["state"] == "started"
    });
    let s = daemon.stats();
    assert_eq!(machine(&s, 1)["state"], "stopped", "{s:#}");

    // Two live connections put m0 past its soft limit: m1 starts as a spare.
    let conns: Vec<TcpStream> = (0..2).map(|i| held(&net, &format!("x{i}"))).collect();
    until(&daemon, Duration::from_secs(10), "spare started", |s| {
        machine(s, 1)["state"] == "started"
    });
    assert_eq!(daemon.stats()["services"][0]["queue"]["spare_starts"], 1);
    drop(conns);
    // Idle again: the spare stops, the kept one does not, however many looks pass.
    until(&daemon, Duration::from_secs(5), "spare stopped", |s| {
        machine(s, 1)["state"] == "stopped"
    });
    std::thread::sleep(Duration::from_secs(1));
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["state"], "started", "{s:#}");
    assert_eq!(machine(&s, 0)["stops"], 0, "{s:#}");
}

#[test]
fn machines_end_with_spliced_even_when_it_is_killed() {
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let (_net, mut daemon) = start(2, "  auto_stop_machines = \"off\"\n", &[]);
        until(&daemon, Duration::from_secs(10), "both started", |s| {
            machine(s, 0)["state"] == "started" && machine(s, 1)["state"] == "started"
        });
        let s = daemon.stats();
        let pids = [pid(&s, 0), pid(&s, 1)];
        daemon.signal(signal);
        daemon.wait(Duration::from_secs(15));
        for p in pids {
            assert!(
                gone_within(p, Duration::from_secs(3)),
                "machine process {p} outlived spliced (signal {signal})"
            );
        }
    }
}

#[test]
fn a_start_that_times_out_resets_the_connection_and_is_counted() {
    let net = Net::new(Topo::Loopback);
    // A machine that runs but never listens.
    let cfg = format!(
        "app = \"never-ready\"\n\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n  auto_stop_machines = \"stop\"\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n\n[[machines]]\n  id = \"slow\"\n  command = [\"sleep\", \"600\"]\n"
    );
    let daemon = Daemon::start_config(&net.proxy, &cfg, Plane::Sockmap, &["--start-timeout", "1s"]);
    let addr = net.public();
    let (outcome, took) = net.client().run(move || {
        let started = Instant::now();
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        writeln!(c, "anyone?").expect("write");
        let outcome = std::io::Read::read(&mut c, &mut [0; 16]);
        (outcome.map_err(|e| e.kind()), started.elapsed())
    });
    assert!(
        matches!(outcome, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
        "the client is closed without an answer: {outcome:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "after the start timeout: {took:?}"
    );
    // The start itself ends on its own timer, a moment after the connection's.
    until(&daemon, Duration::from_secs(2), "start failed", |s| {
        machine(s, 0)["state"] == "failed"
    });
    let s = daemon.stats();
    assert_eq!(s["services"][0]["queue"]["start_failures"], 1, "{s:#}");
    assert_eq!(machine(&s, 0)["start_failures"], 1, "{s:#}");
    assert!(
        machine(&s, 0)["pid"].is_null(),
        "the process was killed: {s:#}"
    );
}

#[test]
fn a_stream_through_a_machine_spliced_runs_is_exact_in_the_kernel() {
    const BYTES: u64 = 256 << 20;
    let net = Net::new(Topo::Loopback);
    let echo = go_app("goecho");
    // goecho echoes with splice(2); its process runs in spliced's cgroup.
    let cfg = format!(
        "app = \"echo\"\n\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n  auto_stop_machines = \"stop\"\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n\n[[machines]]\n  id = \"echo\"\n  command = [\"sh\", \"-c\", \"exec {} 127.0.0.1:$PORT\"]\n",
        echo.display()
    );
    let daemon = Daemon::start_config(&net.proxy, &cfg, Plane::Sockmap, &[]);
    let addr = net.public();
    let got = net.client().run(move || {
        // The first connection starts the machine; its early bytes wait in the socket and are
        // moved by userspace at the splice.
        let mut first = TcpStream::connect(addr).expect("connect");
        first.write_all(b"ping").expect("write");
        std::io::Read::read_exact(&mut first, &mut [0; 4]).expect("echo");
        drop(first);
        let c = TcpStream::connect(addr).expect("connect");
        let mut w = c.try_clone().expect("clone");
        let writer = std::thread::spawn(move || {
            tests::send_pattern(&mut w, 7, BYTES).expect("send");
        });
        // Every byte comes back before the client's end of stream, then the echo's.
        let mut p = tests::Pattern::new(7);
        let got = tests::recv_exact_pattern(&mut &c, &mut p, BYTES);
        writer.join().expect("writer");
        c.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut &c, &mut rest).expect("end of stream");
        got.map(|()| rest.len())
    });
    assert_eq!(got, Ok(0), "{}", daemon.log());
    let s = daemon.wait_idle();
    let moved = s["kernel"]["userspace_moved_bytes"]
        .as_u64()
        .expect("counter");
    assert!(
        moved < BYTES / 1000,
        "the bulk stream moved in the kernel: {s:#}"
    );
    assert_eq!(machine(&s, 0)["starts"], 1, "{s:#}");
}

/// Running machines counted in a snapshot.
fn running(s: &Value) -> usize {
    s["machines"].as_array().map_or(0, |ms| {
        ms.iter().filter(|m| m["state"] == "started").count()
    })
}

#[test]
fn machines_follow_a_load_that_rises_and_falls() {
    const MACHINES: usize = 4;
    const SOFT: usize = 2;
    let (net, daemon) = start(
        MACHINES,
        &format!(
            "  auto_stop_machines = \"stop\"\n  min_machines_running = 1\n  [services.concurrency]\n    type = \"connections\"\n    soft_limit = {SOFT}\n    hard_limit = 20\n"
        ),
        &["--autostop-interval", "300ms"],
    );
    until(&daemon, Duration::from_secs(10), "one kept", |s| {
        running(s) == 1
    });
    let open =
        |n: usize| -> Vec<TcpStream> { (0..n).map(|i| held(&net, &format!("c{i}"))).collect() };
    let mut timeline = Vec::new();
    let mut held: Vec<TcpStream> = Vec::new();
    // Rise: 2, 4, 6, 8 connections held; each step waits for the machines to settle.
    for _ in 0..MACHINES {
        held.extend(open(SOFT));
        std::thread::sleep(Duration::from_millis(700));
        let s = daemon.stats();
        timeline.push((held.len(), running(&s)));
    }
    // Fall: back to 6, 4, 2, 0.
    while !held.is_empty() {
        held.truncate(held.len() - SOFT);
        std::thread::sleep(Duration::from_millis(1000));
        let s = daemon.stats();
        timeline.push((held.len(), running(&s)));
    }
    println!("(connections held, machines running): {timeline:?}");
    // A spare starts when the machine chosen goes past the soft limit: at the top, every
    // running machine is at or past it.
    let (top, at_top) = timeline[MACHINES - 1];
    assert!(
        at_top >= top / (SOFT + 1) && at_top > 1,
        "too few machines at the top: {timeline:?}"
    );
    // Falling, idle machines stop while the rest stay within the soft limit; one is kept.
    for &(conns, run) in &timeline[MACHINES..] {
        assert!(
            run >= conns.div_ceil(SOFT).max(1),
            "too few machines for {conns} connections: {timeline:?}"
        );
    }
    assert_eq!(timeline.last(), Some(&(0, 1)), "{timeline:?}");
}

#[test]
fn a_machine_that_exits_after_running_a_while_is_stopped_not_crashed() {
    let (net, daemon) = start(1, "  auto_stop_machines = \"stop\"\n", &[]);
    assert_eq!(ask(&net, "one"), "ONE\n");
    // Past the crash window (10 s after the start), an exit is an app shutting itself down.
    std::thread::sleep(Duration::from_millis(10_300));
    let mut c = held(&net, "bye");
    writeln!(c, "exit").expect("write");
    let _ = std::io::Read::read(&mut c, &mut [0; 16]);
    until(&daemon, Duration::from_secs(5), "stopped on its own", |s| {
        machine(s, 0)["state"] == "stopped"
    });
    let started = Instant::now();
    assert_eq!(ask(&net, "again"), "AGAIN\n");
    assert!(started.elapsed() < Duration::from_secs(1), "no back-off");
    let s = daemon.stats();
    assert_eq!(machine(&s, 0)["crashes"], 0, "{s:#}");
    assert_eq!(machine(&s, 0)["exits"], 1, "{s:#}");
    assert_eq!(machine(&s, 0)["starts"], 2, "{s:#}");
}

#[test]
fn kill_signal_and_kill_timeout_stop_the_machine_as_fly_does() {
    let net = Net::new(Topo::Loopback);
    // SIGINT ends the app; SIGUSR1 is ignored by a shell waiting on `sleep`, so kill_timeout
    // ends with SIGKILL.
    let app = go_app("flyapp");
    let base = |signal: &str, timeout: &str| {
        format!(
            "app = \"kill\"\nkill_signal = \"{signal}\"\nkill_timeout = {timeout}\n\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n  auto_stop_machines = \"stop\"\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n\n[[machines]]\n  id = \"m0\"\n  command = [\"{}\", \"127.0.0.1\"]\n",
            app.display()
        )
    };
    let daemon = Daemon::start_config(
        &net.proxy,
        &base("SIGINT", "3"),
        Plane::Sockmap,
        &["--autostop-interval", "300ms"],
    );
    assert_eq!(ask(&net, "one"), "ONE\n");
    until(&daemon, Duration::from_secs(5), "stopped", |s| {
        machine(s, 0)["state"] == "stopped"
    });
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("machine stopped") && l.contains("SIGINT")),
        "{log}"
    );
    drop(daemon);

    // A machine that ignores its stop signal is killed after kill_timeout.
    let net = Net::new(Topo::Loopback);
    let stubborn = format!(
        "app = \"kill\"\nkill_signal = \"SIGUSR1\"\nkill_timeout = \"1s\"\n\n[[services]]\n  internal_port = {BACKEND_PORT}\n  protocol = \"tcp\"\n  auto_stop_machines = \"stop\"\n  [[services.ports]]\n    port = {PUBLIC_PORT}\n\n[[machines]]\n  id = \"m0\"\n  command = [\"sh\", \"-c\", \"trap '' USR1; {} 127.0.0.1 & wait; wait\"]\n",
        go_app("flyapp").display()
    );
    let daemon = Daemon::start_config(
        &net.proxy,
        &stubborn,
        Plane::Sockmap,
        &["--autostop-interval", "300ms"],
    );
    assert_eq!(ask(&net, "two"), "TWO\n");
    until(&daemon, Duration::from_secs(5), "stopping", |s| {
        machine(s, 0)["state"] == "stopping"
    });
    let waited = until(&daemon, Duration::from_secs(5), "killed", |s| {
        machine(s, 0)["state"] == "stopped"
    });
    assert!(
        waited >= Duration::from_millis(800),
        "killed only after kill_timeout: stopped {waited:?} after it was seen stopping"
    );
    assert!(daemon.log().contains("killing it"), "{}", daemon.log());
}
