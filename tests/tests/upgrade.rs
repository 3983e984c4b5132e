//! `kill -USR2`: the binary starts again and takes over the listening sockets; the old
//! process stops accepting and serves its connections to their end. A client connecting in a
//! loop sees no refusal across upgrades in a row, streams that began before are exact, and
//! every old process exits, its BPF objects with it. A new process that fails leaves the old
//! one serving.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tests::{Daemon, Net, Plane, Scratch, Topo, echo_server, wait_ended};

fn signal(pid: u64, signal: i32) {
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: kill with plain integers.
    assert_eq!(
        unsafe { libc::kill(pid, signal) },
        0,
        "signal {signal} to {pid}"
    );
}

/// Sends SIGUSR2 and waits until the daemon counts it as an upgrade that did not happen,
/// logged with `why`; the same process serves on.
fn upgrade_fails(daemon: &Daemon, why: &str) {
    let pid = serving_pid(daemon);
    signal(pid, libc::SIGUSR2);
    tests::until(
        daemon,
        Duration::from_secs(20),
        "a failed upgrade counted",
        |s| s["reloads"]["upgrades_failed"] == 1,
    );
    assert_eq!(serving_pid(daemon), pid);
    assert!(
        daemon.log().contains(why),
        "no {why:?} in:\n{}",
        daemon.log()
    );
}

/// The pid the admin socket answers with.
fn serving_pid(daemon: &Daemon) -> u64 {
    daemon.stats()["pid"].as_u64().expect("pid in the snapshot")
}

/// New connections, one after another, each with a 4-byte echo, until `stop`: (done, failed).
fn connect_loop(net: &Net, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    let addr = net.public();
    net.client().spawn(move || {
        let (mut done, mut failures) = (0u64, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let attempt = || -> std::io::Result<()> {
                let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                c.write_all(b"ping")?;
                let mut got = [0; 4];
                c.read_exact(&mut got)?;
                if &got != b"ping" {
                    return Err(std::io::Error::other("wrong echo"));
                }
                Ok(())
            };
            match attempt() {
                Ok(()) => done += 1,
                Err(e) => failures.push(e.to_string()),
            }
        }
        (done, failures)
    })
}

/// `conns` connections, each streaming `bytes` through the echo and checking every byte.
fn streams(
    net: &Net,
    conns: usize,
    bytes: u64,
) -> Vec<std::thread::JoinHandle<Result<(), String>>> {
    (0..conns)
        .map(|i| {
            let c = net.connect();
            c.set_read_timeout(Some(Duration::from_secs(20))).ok();
            std::thread::spawn(move || {
                let mut w = c.try_clone().map_err(|e| e.to_string())?;
                let seed = 100 + i as u64;
                let writer = std::thread::spawn(move || {
                    tests::send_pattern(&mut w, seed, bytes).map_err(|e| e.to_string())?;
                    w.shutdown(Shutdown::Write).map_err(|e| e.to_string())
                });
                let mut p = tests::Pattern::new(seed);
                tests::recv_exact_pattern(&mut &c, &mut p, bytes)?;
                writer.join().map_err(|_| "writer panicked".to_owned())??;
                let mut rest = Vec::new();
                (&c).read_to_end(&mut rest).map_err(|e| e.to_string())?;
                if rest.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} bytes after the stream", rest.len()))
                }
            })
        })
        .collect()
}

fn upgrades_in_a_row(plane: Plane, topo: Topo) {
    const UPGRADES: usize = 10;
    let net = Net::new(topo);
    let _backend = echo_server(&net);
    let mut daemon = Daemon::start(&net.proxy, plane, &[]);
    let first = u64::from(daemon.pid);
    let objects = daemon.bpf_objects();
    let long = streams(&net, 20, 16 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let looping = connect_loop(&net, Arc::clone(&stop));
    let mut pids = vec![first];
    let mut reaper = tests::Reaper::default();
    for _ in 0..UPGRADES {
        std::thread::sleep(Duration::from_millis(150));
        let old = *pids.last().expect("a pid");
        signal(old, libc::SIGUSR2);
        // Both processes answer on the admin socket until the old one has stopped: the new
        // pid is taken from the same answer that shows it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let new = loop {
            let pid = serving_pid(&daemon);
            if pid != old {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no new process:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        pids.push(new);
        reaper.0.push(new);
        // An old process without live connections exits at once.
        if old != first {
            wait_ended(old, Duration::from_secs(20));
        }
    }
    std::thread::sleep(Duration::from_millis(150));
    stop.store(true, Ordering::Relaxed);
    let (done, failures) = looping.join().expect("loop");
    assert!(
        failures.is_empty(),
        "{plane}: {} of {} connections failed across {UPGRADES} upgrades: {:?}\n{}",
        failures.len(),
        done + failures.len() as u64,
        &failures[..failures.len().min(5)],
        daemon.log()
    );
    assert!(done > 100, "{plane}: only {done} connections in the loop");
    for (i, s) in long.into_iter().enumerate() {
        let outcome = s.join().expect("stream thread");
        assert_eq!(outcome, Ok(()), "{plane}: stream {i} across the upgrades");
    }
    // The first process served the streams to their end, then exited cleanly, and its
    // programs and maps went with it.
    let status = daemon.wait(Duration::from_secs(40));
    assert!(
        status.success(),
        "{plane}: the first process exited {status}"
    );
    assert_eq!(tests::still_loaded(&objects), vec![], "{plane}");
    let last = *pids.last().expect("a pid");
    let s = daemon.stats();
    assert!(
        s["connections"]["completed"].as_u64() > Some(0),
        "{plane}: the last process serves: {s:#}"
    );
    signal(last, libc::SIGTERM);
    wait_ended(last, Duration::from_secs(40));
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), UPGRADES + 1, "{plane}: pids {pids:?}");
}

#[test]
fn upgrades_in_a_row_refuse_nothing_sockmap() {
    upgrades_in_a_row(Plane::Sockmap, Topo::Loopback);
}

#[test]
fn upgrades_in_a_row_refuse_nothing_copy() {
    upgrades_in_a_row(Plane::Copy, Topo::Loopback);
}

#[test]
fn upgrades_in_a_row_refuse_nothing_sockmap_veth() {
    upgrades_in_a_row(Plane::Sockmap, Topo::Veth);
}

/// Machines spliced runs end with the process that started them: SIGUSR2 is refused, said
/// why, and the daemon serves on.
#[test]
fn an_upgrade_with_machines_spliced_runs_is_refused() {
    let net = Net::new(Topo::Loopback);
    let config = format!(
        "app = \"runs-machines\"\n\n[[services]]\n  internal_port = {}\n  protocol = \"tcp\"\n  [[services.ports]]\n    port = {}\n\n[[machines]]\n  id = \"m\"\n  command = [\"sleep\", \"600\"]\n",
        tests::BACKEND_PORT,
        tests::PUBLIC_PORT
    );
    let daemon = Daemon::start_config(&net.proxy, &config, Plane::Sockmap, &[]);
    upgrade_fails(&daemon, "restart spliced instead");
    daemon.stop();
}

/// The binary at the daemon's path is replaced by one that cannot serve: SIGUSR2 starts it,
/// it exits, and the daemon goes on serving, counting the failed upgrade.
#[test]
fn a_failed_upgrade_leaves_the_daemon_serving() {
    let net = Net::new(Topo::Loopback);
    let _backend = echo_server(&net);
    let dir = Scratch::new();
    let copy = dir.0.join("spliced");
    std::fs::copy(tests::spliced_bin(), &copy).expect("copy the binary");
    // The harness appends its binary and the arguments: run the copy with the arguments.
    let wrapper = format!("shift; exec {} \"$@\"", copy.display());
    let daemon = Daemon::start_with(
        &net.proxy,
        &["sh", "-c", &wrapper, "sh"],
        Plane::Sockmap,
        &[],
    );
    std::fs::remove_file(&copy).expect("remove the copy");
    std::fs::write(&copy, "#!/bin/sh\nexit 3\n").expect("a binary that fails");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("executable");
    upgrade_fails(&daemon, "exited before it served");
    tests::assert_echoes(&mut net.connect(), b"still");
    daemon.stop();
}
