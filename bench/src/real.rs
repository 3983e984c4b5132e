//! Real clients, from Debian, run in the client's namespace against one target: iperf3 for
//! bulk, redis-benchmark against redis-server, wrk against nginx serving HTTP.

use std::{collections::BTreeMap, net::SocketAddr, process::Command};

use anyhow::{Context as _, Result, bail, ensure};

fn run(ns: &str, args: &[String]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| format!("run {}", args[0]))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{} failed ({}): {}{}",
        args[0],
        out.status,
        text.chars().take(300).collect::<String>(),
        String::from_utf8_lossy(&out.stderr)
            .chars()
            .take(300)
            .collect::<String>()
    );
    Ok(text)
}

/// iperf3 for `secs` seconds: the receiver's MB/s.
pub fn iperf3(ns: &str, addr: SocketAddr, secs: u32) -> Result<BTreeMap<String, f64>> {
    let text = run(
        ns,
        &[
            "iperf3".into(),
            "-c".into(),
            addr.ip().to_string(),
            "-p".into(),
            addr.port().to_string(),
            "-t".into(),
            secs.to_string(),
            "-J".into(),
        ],
    )?;
    let doc: serde_json::Value = serde_json::from_str(&text).context("iperf3 -J output")?;
    let bps = doc["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?;
    Ok(BTreeMap::from([("MB/s".to_owned(), bps / 8e6)]))
}

/// redis-benchmark with 50 clients, `n` requests per test: SET and GET requests per second.
pub fn redis_benchmark(ns: &str, addr: SocketAddr, n: u32) -> Result<BTreeMap<String, f64>> {
    let text = run(
        ns,
        &[
            "redis-benchmark".into(),
            "-h".into(),
            addr.ip().to_string(),
            "-p".into(),
            addr.port().to_string(),
            "-n".into(),
            n.to_string(),
            "-c".into(),
            "50".into(),
            "-t".into(),
            "set,get".into(),
            "--csv".into(),
        ],
    )?;
    let mut figures = BTreeMap::new();
    for test in ["SET", "GET"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))
            .with_context(|| format!("redis-benchmark: no {test} line in {text}"))?;
        let rps: f64 = line
            .split(',')
            .nth(1)
            .and_then(|v| v.trim_matches('"').parse().ok())
            .context("redis-benchmark: requests per second")?;
        figures.insert(format!("{test} req/s"), rps);
    }
    Ok(figures)
}

/// wrk with 2 threads and 50 connections for `secs` seconds: requests per second and the
/// p99 latency.
pub fn wrk(ns: &str, addr: SocketAddr, secs: u32) -> Result<BTreeMap<String, f64>> {
    wrk_url(ns, &format!("http://{addr}/"), secs)
}

/// [`wrk`] at `url` (`https://` for a target that terminates TLS; wrk checks no
/// certificate).
pub fn wrk_url(ns: &str, url: &str, secs: u32) -> Result<BTreeMap<String, f64>> {
    let text = run(
        ns,
        &[
            "wrk".into(),
            "-t2".into(),
            "-c50".into(),
            format!("-d{secs}s"),
            "--latency".into(),
            url.to_owned(),
        ],
    )?;
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors: {text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("wrk: no Requests/sec in {text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| micros(v.trim()))
        .with_context(|| format!("wrk: no 99% latency in {text}"))?;
    Ok(BTreeMap::from([
        ("req/s".to_owned(), rps),
        ("p99 µs".to_owned(), p99),
    ]))
}

/// A wrk duration ("812.00us", "1.23ms", "2.01s") in microseconds.
fn micros(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else {
        (v.strip_suffix('s')?, 1e6)
    };
    num.parse::<f64>().ok().map(|x| x * scale)
}
