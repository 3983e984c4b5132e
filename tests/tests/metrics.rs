//! `--metrics-addr`: the metrics count real traffic, pass Prometheus' own checker, and a real
//! Prometheus server scrapes them.

use std::{
    io::{Read, Write},
    net::Shutdown,
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    Net, Plane, Scratch, Topo, echo_server, eventually,
    metrics::{promtool, sample},
    setup_with,
};

/// Where the daemon serves its metrics, in the proxy's namespace.
const METRICS: &str = "127.0.0.1:9464";

/// The body curl gets from `url` in the proxy's namespace, and whether it got one.
fn get(net: &Net, url: &str) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &net.proxy.name])
        .args(["curl", "-sS", "--max-time", "10", url])
        .output()
        .expect("curl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// One scrape of `/metrics`, from the proxy's namespace.
fn scrape(net: &Net) -> String {
    let (ok, text) = get(net, &format!("http://{METRICS}/metrics"));
    assert!(ok, "{text}");
    text
}

/// One echo of `size` bytes through the proxy, ended with FIN both ways.
fn echo_through(net: &Net, size: usize) {
    let mut c = net.connect();
    let payload = vec![7u8; size];
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        w.write_all(&payload).expect("send");
        w.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("echo and end of stream");
    writer.join().expect("writer");
    assert_eq!(got.len(), size);
}

fn counts_traffic(plane: Plane) {
    const SIZE: usize = 1 << 20;
    let (net, daemon) = setup_with(plane, Topo::Veth, &["--metrics-addr", METRICS]);
    let _backend = echo_server(&net);
    echo_through(&net, SIZE);
    daemon.wait_idle();
    let text = scrape(&net);
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool: {said}\n{text}");
    let svc = "service=\"services[0]\"";
    for (series, want) in [
        ("spliced_connections_accepted_total", 1.0),
        ("spliced_connections_active", 0.0),
        (
            "spliced_connections_ended_total{outcome=\"completed\"}",
            1.0,
        ),
        ("spliced_connections_ended_total{outcome=\"failed\"}", 0.0),
        (
            &format!("spliced_machine_connections_total{{{svc},machine=\"m\"}}"),
            1.0,
        ),
        (
            &format!("spliced_machine_healthy{{{svc},machine=\"m\"}}"),
            1.0,
        ),
        (&format!("spliced_service_queued{{{svc}}}"), 0.0),
        (
            &format!("spliced_machine_connect_seconds_count{{{svc},machine=\"m\"}}"),
            1.0,
        ),
        (
            &format!("spliced_machine_connect_seconds_bucket{{{svc},machine=\"m\",le=\"+Inf\"}}"),
            1.0,
        ),
        (
            &format!("spliced_dataplane{{dataplane=\"{}\"}}", plane.name()),
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series}:\n{text}");
    }
    assert!(
        sample(&text, "spliced_process_resident_memory_bytes").is_some_and(|v| v > 1e6),
        "{text}"
    );
    if plane.in_kernel() {
        for direction in ["to_backend", "to_client"] {
            let series = format!("spliced_kernel_bytes_total{{{svc},direction=\"{direction}\"}}");
            let moved = sample(&text, &series).expect("kernel bytes");
            let by_user = sample(&text, "spliced_userspace_moved_bytes_total").expect("moved");
            assert!(
                moved + by_user >= SIZE as f64 && moved > 0.0,
                "{series} = {moved} (+{by_user} by userspace) for {SIZE} bytes:\n{text}"
            );
        }
        for map in ["SOCKS", "RECV", "LINKS", "FLOWS"] {
            let series = format!("spliced_bpf_map_entries{{map=\"{map}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}:\n{text}");
        }
    } else {
        assert!(!text.contains("spliced_kernel_bytes_total"), "{text}");
    }
}

#[test]
fn metrics_count_traffic_sockmap() {
    counts_traffic(Plane::Sockmap);
}

#[test]
fn metrics_count_traffic_copy() {
    counts_traffic(Plane::Copy);
}

/// A real Prometheus server in the proxy's namespace scrapes the daemon every second; its
/// query API then returns the daemon's count of accepted connections.
#[test]
fn prometheus_scrapes_the_daemon() {
    let (net, _daemon) = setup_with(Plane::Sockmap, Topo::Loopback, &["--metrics-addr", METRICS]);
    let _backend = echo_server(&net);
    for _ in 0..3 {
        echo_through(&net, 1000);
    }
    let dir = Scratch::new();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: spliced\n    \
             static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )
    .expect("prometheus config");
    let mut server = Command::new("ip")
        .args(["netns", "exec", &net.proxy.name, "prometheus"])
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("prometheus.log")).expect("log"))
        .spawn()
        .expect("prometheus (cargo xtask setup installs it)");
    let query = || {
        get(
            &net,
            "http://127.0.0.1:9090/api/v1/query?query=spliced_connections_accepted_total",
        )
        .1
    };
    let mut last = String::new();
    let scraped = eventually(Duration::from_secs(60), || {
        last = query();
        serde_json::from_str::<serde_json::Value>(&last).is_ok_and(|v| {
            v["data"]["result"][0]["value"][1] == "3"
                && v["data"]["result"][0]["metric"]["job"] == "spliced"
        })
    });
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        scraped,
        "Prometheus did not report 3 accepted connections: {last}\n{}",
        std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
    );
}
