//! Routing under heavy load: a burst of 10,000 connections against hard limits, and
//! redis-benchmark spread over three redis servers, each machine in its own namespace.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tests::{
    BACKEND_PORT, Daemon, Machines, Net, Plane, Topo, fleet, fleet_config, machine, raise_fd_limit,
};

#[test]
fn burst_of_10000_keeps_every_machine_within_its_hard_limit() {
    const CLIENTS: usize = 10_000;
    const HARD: u32 = 50;
    let s = fleet(2, &[0, 1]);
    let cfg = fleet_config(
        &s.machines,
        &format!("  [services.concurrency]\n    soft_limit = 40\n    hard_limit = {HARD}\n"),
    );
    let daemon = Daemon::start_config(
        &s.net.proxy,
        &cfg,
        Plane::Sockmap,
        &["--queue-limit", "10000", "--queue-timeout", "60"],
    );
    let public = s.net.public();
    let start = Instant::now();
    let failures = s
        .net
        .client()
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..CLIENTS {
                    tasks.spawn(async move {
                        let mut c = tokio::net::TcpStream::connect(public).await?;
                        c.write_all(b"x").await?;
                        let mut b = [0u8; 1];
                        c.read_exact(&mut b).await?;
                        c.shutdown().await?;
                        let mut rest = Vec::new();
                        c.read_to_end(&mut rest).await?;
                        Ok::<_, std::io::Error>(())
                    });
                }
                let mut failures = Vec::new();
                while let Some(r) = tasks.join_next().await {
                    if let Err(e) = r.expect("client task") {
                        failures.push(e.to_string());
                    }
                }
                failures
            })
        })
        .join()
        .expect("client thread");
    let took = start.elapsed();
    let max = s.peaks();
    let total = s.served();
    let st = daemon.wait_idle();
    let queue = &st["services"][0]["queue"];
    println!(
        "burst of {CLIENTS}: {total} served in {took:?}; largest concurrency per machine {max:?} \
         (hard limit {HARD}); queue: {queue}"
    );
    assert!(
        failures.is_empty(),
        "{} clients failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        max.iter().all(|&m| m <= HARD),
        "hard limit exceeded: {max:?}"
    );
    assert_eq!(total as usize, CLIENTS);
    assert!(queue["max_queued"].as_u64() > Some(1000), "{queue}");
    assert_eq!(queue["queue_timeouts"], 0);
    assert_eq!(queue["queue_full"], 0);
    daemon.stop();
}

#[test]
fn redis_benchmark_spreads_over_three_redis_servers() {
    raise_fd_limit();
    let net = Net::new(Topo::Veth);
    let machines = Machines::new(&net.proxy, 3);
    let port = BACKEND_PORT.to_string();
    let mut servers: Vec<std::process::Child> = (0..3)
        .map(|i| {
            let (port, bind) = (port.clone(), machines.backend(i).ip().to_string());
            machines.ns[i]
                .run(move || {
                    Command::new("redis-server")
                        .args(["--port", &port, "--bind", &bind, "--save", ""])
                        .args(["--appendonly", "no", "--protected-mode", "no"])
                        .stdout(std::process::Stdio::null())
                        .spawn()
                })
                .expect("start redis-server")
        })
        .collect();
    for i in 0..3 {
        let addr = machines.backend(i);
        assert!(
            tests::eventually(Duration::from_secs(10), || net.proxy.connect(addr).is_ok()),
            "redis-server {i} did not start"
        );
    }
    let cfg = fleet_config(
        &machines,
        "  [services.concurrency]\n    soft_limit = 15\n    hard_limit = 20\n",
    );
    let daemon = Daemon::start_config(&net.proxy, &cfg, Plane::Sockmap, &[]);
    let out = Command::new("ip")
        .args(["netns", "exec", &net.client().name, "redis-benchmark"])
        .args(["-h", &net.public().ip().to_string()])
        .args(["-p", &net.public().port().to_string()])
        .args(["-n", "30000", "-c", "50", "-t", "set", "--csv"])
        .output()
        .expect("run redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"SET\""),
        "redis-benchmark failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = daemon.wait_idle();
    // 50 connections held at once, over three machines: 17, 17, 16, plus the one that
    // fetched the server's config first.
    let chosen: Vec<u64> = (0..3)
        .map(|i| machine(&st, i)["chosen"].as_u64().expect("chosen"))
        .collect();
    println!("redis-benchmark -c 50 over three redis-servers: connections per machine {chosen:?}");
    assert!(
        chosen.iter().all(|&n| (15..=19).contains(&n)),
        "uneven: {chosen:?} {st:#}"
    );
    for i in 0..3 {
        let keys = Command::new("ip")
            .args(["netns", "exec", &machines.ns[i].name, "redis-cli"])
            .args([
                "-h",
                &machines.backend(i).ip().to_string(),
                "-p",
                &port,
                "dbsize",
            ])
            .output()
            .expect("redis-cli");
        let keys = String::from_utf8_lossy(&keys.stdout);
        assert_eq!(keys.trim(), "1", "machine {i} got no SET: {keys}");
    }
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    daemon.stop();
}
