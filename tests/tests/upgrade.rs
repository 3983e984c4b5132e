//! `kill -USR2`: the binary starts again and takes over the listening sockets and the
//! established connections (on the sockmap plane with the kernel objects they run on, on the
//! copy plane with the bytes read and not yet written), and the old process exits at once.
//! A client connecting in a loop sees no refusal across upgrades in a row, connections that
//! began before go on echoing after every upgrade, held or half-closed ones flow again in the
//! new process, streams are exact, and the BPF objects go once their last connection ends. A
//! new process that fails leaves the old one serving.

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

/// Sends SIGUSR2 to `old` and waits for the new process: its pid. Both processes answer on the
/// admin socket until the old one has stopped: the new pid is taken from the same answer that
/// shows it.
fn upgrade(daemon: &Daemon, old: u64) -> u64 {
    signal(old, libc::SIGUSR2);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let pid = serving_pid(daemon);
        if pid != old {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new process:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends each connection's stream and expects the end of the echo's, with nothing after.
fn end_cleanly(plane: Plane, open: &[TcpStream]) {
    for (i, c) in open.iter().enumerate() {
        c.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        (&*c)
            .read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("{plane}: conn {i}: {e}"));
        assert!(
            rest.is_empty(),
            "{plane}: conn {i}: {} bytes after the end",
            rest.len()
        );
    }
}

/// Echoes 1 KiB of stream `round` on each connection, checking every byte.
fn echo_round(conns: &mut [TcpStream], round: u64) -> Result<(), String> {
    for (i, c) in conns.iter_mut().enumerate() {
        let seed = 1000 * round + i as u64;
        tests::send_pattern(c, seed, 1024).map_err(|e| format!("conn {i}: {e}"))?;
        let mut p = tests::Pattern::new(seed);
        tests::recv_exact_pattern(&mut &*c, &mut p, 1024).map_err(|e| format!("conn {i}: {e}"))?;
    }
    Ok(())
}

fn upgrades_in_a_row(plane: Plane, topo: Topo) {
    const UPGRADES: usize = 20;
    const OPEN: usize = 1000;
    tests::raise_fd_limit();
    let net = Net::new(topo);
    let _backend = echo_server(&net);
    let mut daemon = Daemon::start(&net.proxy, plane, &[]);
    let first = u64::from(daemon.pid);
    let objects = daemon.bpf_objects();
    let mut open: Vec<TcpStream> = (0..OPEN)
        .map(|_| {
            let c = net.connect();
            c.set_read_timeout(Some(Duration::from_secs(10))).ok();
            c
        })
        .collect();
    echo_round(&mut open, 0).unwrap_or_else(|e| panic!("{plane}: before: {e}"));
    let long = streams(&net, 20, 16 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let looping = connect_loop(&net, Arc::clone(&stop));
    let mut pids = vec![first];
    let mut reaper = tests::Reaper::default();
    for _ in 0..UPGRADES {
        std::thread::sleep(Duration::from_millis(150));
        let old = *pids.last().expect("a pid");
        let new = upgrade(&daemon, old);
        pids.push(new);
        reaper.0.push(new);
        // Every old process exits at once, having handed its connections over.
        wait_ended(old, Duration::from_secs(20));
        let round = pids.len() as u64;
        echo_round(&mut open, round)
            .unwrap_or_else(|e| panic!("{plane}: after upgrade {round}: {e}\n{}", daemon.log()));
    }
    end_cleanly(plane, &open);
    drop(open);
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
    eprintln!(
        "{plane} over {topo:?}: {UPGRADES} upgrades, {OPEN} connections echoing across all, \
         {done} connected in the loop, none refused"
    );
    for (i, s) in long.into_iter().enumerate() {
        let outcome = s.join().expect("stream thread");
        assert_eq!(outcome, Ok(()), "{plane}: stream {i} across the upgrades");
    }
    // The first process exited cleanly, having served or handed over its connections, and
    // its programs and maps went once the last connection on them ended.
    let status = daemon.wait(Duration::from_secs(40));
    assert!(
        status.success(),
        "{plane}: the first process exited {status}"
    );
    assert_eq!(
        tests::left_loaded(&objects, Duration::from_secs(10)),
        vec![],
        "{plane}: still loaded"
    );
    let last = *pids.last().expect("a pid");
    let s = daemon.stats();
    assert!(
        s["connections"]["completed"].as_u64() > Some(0),
        "{plane}: the last process serves: {s:#}"
    );
    assert!(
        s["connections"]["taken_over"].as_u64() >= Some(OPEN as u64),
        "{plane}: the last process took the connections over: {s:#}"
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

#[test]
fn upgrades_in_a_row_refuse_nothing_copy_veth() {
    upgrades_in_a_row(Plane::Copy, Topo::Veth);
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

/// A connection held back when the upgrade comes (its machine reads nothing): on the sockmap
/// plane held at the bound, on the copy plane with bytes read and not yet written. The old
/// process hands it over and exits, and the new one lets it flow once the machine reads;
/// every byte arrives, exact, then the end of the stream.
fn held_connection_flows_again(plane: Plane) {
    const TOTAL: u64 = 64 << 20;
    let net = Net::new(Topo::Loopback);
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (done, received) = std::sync::mpsc::channel::<Result<(), String>>();
    let (wait, done) = (std::sync::Mutex::new(wait), std::sync::Mutex::new(done));
    let _backend = tests::Server::start(&net.proxy, net.backend(), move |mut s| {
        wait.lock().expect("lock").recv().ok();
        let mut p = tests::Pattern::new(7);
        let mut result = tests::recv_exact_pattern(&mut s, &mut p, TOTAL);
        let mut rest = Vec::new();
        if result.is_ok() && s.read_to_end(&mut rest).is_ok() && !rest.is_empty() {
            result = Err(format!("{} bytes after the stream", rest.len()));
        }
        done.lock().expect("lock").send(result).ok();
    });
    let mut daemon = Daemon::start(&net.proxy, plane, &[]);
    let first = u64::from(daemon.pid);
    let mut c = net.connect();
    let writer = std::thread::spawn(move || {
        tests::send_pattern(&mut c, 7, TOTAL).map_err(|e| e.to_string())?;
        c.shutdown(Shutdown::Write).map_err(|e| e.to_string())
    });
    if plane == Plane::Sockmap {
        tests::until(&daemon, Duration::from_secs(20), "a hold", |s| {
            s["kernel"]["holds"].as_u64() > Some(0)
        });
    } else {
        // The machine's receive queue and the proxy's send queue fill within moments; the
        // daemon then holds what it read last.
        tests::until(&daemon, Duration::from_secs(20), "a connection", |s| {
            s["connections"]["active"] == 1
        });
        std::thread::sleep(Duration::from_secs(1));
    }
    let new = upgrade(&daemon, first);
    let mut reaper = tests::Reaper::default();
    reaper.0.push(new);
    let status = daemon.wait(Duration::from_secs(20));
    assert!(status.success(), "the old process exited {status}");
    // The new process counts the connection it took over against its machine's limits.
    let active = |d: &Daemon| d.stats()["services"][0]["machines"][0]["active"].clone();
    assert_eq!(active(&daemon), 1, "{}", daemon.stats());
    if plane == Plane::Copy {
        // The copy stopped with bytes it read and had not written: they went along.
        let log = daemon.log();
        let pending = log
            .split("pending_to_machine=")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        assert!(pending > Some(0), "{plane}: no bytes went along:\n{log}");
    }
    go.send(()).expect("the machine reads");
    let result = received
        .recv_timeout(Duration::from_secs(60))
        .expect("the machine's verdict");
    assert_eq!(result, Ok(()), "{}", daemon.log());
    writer.join().expect("writer").expect("the client's stream");
    tests::completed_one_taken_over(&daemon);
    assert_eq!(
        active(&daemon),
        0,
        "the slot is freed when the connection ends"
    );
    signal(new, libc::SIGTERM);
    wait_ended(new, Duration::from_secs(40));
}

#[test]
fn a_held_connection_flows_again_in_the_new_process() {
    held_connection_flows_again(Plane::Sockmap);
}

#[test]
fn a_held_connection_flows_again_in_the_new_process_copy() {
    held_connection_flows_again(Plane::Copy);
}

/// A connection whose client ended its stream before the upgrade (the machine has read that
/// end) and whose machine answers only after it: the new process carries the answer, exact,
/// then the machine's end; nothing goes the other way.
fn half_closed_connection_goes_on(plane: Plane) {
    const ANSWER: u64 = 8 << 20;
    let net = Net::new(Topo::Loopback);
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (ended, client_ended) = std::sync::mpsc::channel::<Result<(), String>>();
    let (wait, ended) = (std::sync::Mutex::new(wait), std::sync::Mutex::new(ended));
    let _backend = tests::Server::start(&net.proxy, net.backend(), move |mut s| {
        let mut p = tests::Pattern::new(3);
        let mut request = tests::recv_exact_pattern(&mut s, &mut p, 4096);
        let mut rest = Vec::new();
        if request.is_ok() {
            request = match s.read_to_end(&mut rest) {
                Ok(0) => Ok(()),
                Ok(n) => Err(format!("{n} bytes after the request")),
                Err(e) => Err(e.to_string()),
            };
        }
        ended.lock().expect("lock").send(request).ok();
        wait.lock().expect("lock").recv().ok();
        tests::send_pattern(&mut s, 4, ANSWER).expect("the answer");
    });
    let mut daemon = Daemon::start(&net.proxy, plane, &[]);
    let first = u64::from(daemon.pid);
    let mut c = net.connect();
    c.set_read_timeout(Some(Duration::from_secs(30))).ok();
    tests::send_pattern(&mut c, 3, 4096).expect("the request");
    c.shutdown(Shutdown::Write).expect("shutdown");
    let request = client_ended
        .recv_timeout(Duration::from_secs(20))
        .expect("the machine read the request");
    assert_eq!(request, Ok(()), "{plane}: {}", daemon.log());
    let new = upgrade(&daemon, first);
    let mut reaper = tests::Reaper::default();
    reaper.0.push(new);
    let status = daemon.wait(Duration::from_secs(20));
    assert!(status.success(), "{plane}: the old process exited {status}");
    go.send(()).expect("the machine answers");
    let mut p = tests::Pattern::new(4);
    let answer = tests::recv_exact_pattern(&mut &c, &mut p, ANSWER);
    assert_eq!(answer, Ok(()), "{plane}: {}", daemon.log());
    let mut rest = Vec::new();
    (&c).read_to_end(&mut rest).expect("the machine's end");
    assert!(
        rest.is_empty(),
        "{plane}: {} bytes after the answer",
        rest.len()
    );
    tests::completed_one_taken_over(&daemon);
    signal(new, libc::SIGTERM);
    wait_ended(new, Duration::from_secs(40));
}

#[test]
fn a_half_closed_connection_goes_on_in_the_new_process() {
    half_closed_connection_goes_on(Plane::Sockmap);
}

#[test]
fn a_half_closed_connection_goes_on_in_the_new_process_copy() {
    half_closed_connection_goes_on(Plane::Copy);
}
