//! `spliced-bench`: the benchmark suite behind `cargo xtask bench`. Root only: it builds
//! network namespaces. It measures direct connection, spliced (sockmap and copy planes),
//! `HAProxy`, nginx stream and socat in the same run, interleaved (every target once per
//! workload per round), over loopback, over veth and at an edge (client over veth, backend on
//! the proxy's host), and writes JSON, a markdown table and SVG charts. It asserts no timing:
//! a sample that fails is recorded with its error.

mod charts;
mod cold;
mod load;
mod machine;
mod real;
mod registry;
mod report;
mod targets;
mod topo;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tests::Scratch;

use crate::{
    targets::{TARGETS, Target},
    topo::Topology,
};

const MIB: u64 = 1 << 20;

/// How much each workload does.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub quick: bool,
    /// TCP congestion control of every namespace, so of every socket of every target.
    pub congestion: String,
    pub rounds: usize,
    pub bulk_bytes: u64,
    pub duplex_bytes: u64,
    pub round_trips: usize,
    pub connect_secs: f64,
    pub sweep: Vec<usize>,
    pub sweep_bytes: u64,
    pub idle_conns: usize,
    /// Seconds of each iperf3 and wrk run.
    pub real_secs: u32,
    /// Requests per redis-benchmark test.
    pub redis_requests: u32,
    /// Only the workloads whose names start with one of these (all when empty).
    pub workloads: Vec<String>,
}

impl Plan {
    fn new(quick: bool, congestion: String) -> Self {
        if quick {
            Self {
                quick,
                congestion,
                rounds: 2,
                bulk_bytes: 64 * MIB,
                duplex_bytes: 32 * MIB,
                round_trips: 2_000,
                connect_secs: 0.5,
                sweep: vec![1, 100],
                sweep_bytes: 64 * MIB,
                idle_conns: 500,
                real_secs: 1,
                redis_requests: 10_000,
                workloads: Vec::new(),
            }
        } else {
            Self {
                quick,
                congestion,
                rounds: 5,
                bulk_bytes: 1024 * MIB,
                duplex_bytes: 256 * MIB,
                round_trips: 20_000,
                connect_secs: 4.0,
                sweep: vec![1, 10, 100, 1000],
                sweep_bytes: 512 * MIB,
                // 10,000 would take 20,000 descriptors in each proxy (more in HAProxy, which keeps
                // splice pipes): over the hard
                // open-file limit of the machines this runs on (20,000, not raisable there).
                idle_conns: 8_000,
                real_secs: 2,
                redis_requests: 50_000,
                workloads: Vec::new(),
            }
        }
    }
}

/// One measurement of one target.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub topology: &'static str,
    pub workload: String,
    pub target: &'static str,
    pub round: usize,
    /// Figure name -> value.
    pub figures: BTreeMap<String, f64>,
    pub error: Option<String>,
}

struct Args {
    quick: bool,
    congestion: String,
    out: PathBuf,
    spliced: targets::SplicedCmd,
    targets: Vec<&'static str>,
    topologies: Vec<String>,
    workloads: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        // Linux's default, which Debian and Ubuntu keep; `--congestion bbr` measures a host
        // that chose BBR.
        congestion: "cubic".to_owned(),
        out: PathBuf::from("target/bench"),
        spliced: targets::SplicedCmd {
            bin: tests::spliced_bin(),
            extra: Vec::new(),
        },
        targets: TARGETS.to_vec(),
        topologies: vec!["loopback".to_owned(), "veth".to_owned(), "edge".to_owned()],
        workloads: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--congestion" => args.congestion = it.next().context("--congestion ALGO")?,
            "--out" => args.out = it.next().context("--out PATH")?.into(),
            "--spliced" => args.spliced.bin = it.next().context("--spliced PATH")?.into(),
            "--spliced-arg" => args
                .spliced
                .extra
                .push(it.next().context("--spliced-arg ARG")?),
            "--targets" => {
                let list = it.next().context("--targets a,b,...")?;
                args.targets = list
                    .split(',')
                    .map(|t| {
                        TARGETS
                            .iter()
                            .copied()
                            .find(|k| *k == t)
                            .with_context(|| format!("unknown target {t}; known: {TARGETS:?}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "--topologies" => {
                let list = it.next().context("--topologies a,b")?;
                args.topologies = list.split(',').map(str::to_owned).collect();
            }
            "--workloads" => {
                let list = it.next().context("--workloads a,b")?;
                args.workloads = list.split(',').map(str::to_owned).collect();
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}; {USAGE}"),
        }
    }
    Ok(args)
}

const USAGE: &str = "usage: spliced-bench [--quick] [--congestion ALGO] [--out DIR] \
    [--spliced PATH] [--spliced-arg ARG]... [--targets a,b] [--topologies loopback,veth,edge] \
    [--workloads bulk,connect,...]";

fn main() -> Result<()> {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some("--backend") {
        let addr = raw.next().context("--backend ADDR")?.parse()?;
        tests::raise_fd_limit();
        return topo::serve_backend(addr);
    }
    let args = parse_args()?;
    tests::raise_fd_limit();
    topo::allow_congestion(&args.congestion)?;
    let mut plan = Plan::new(args.quick, args.congestion.clone());
    plan.workloads.clone_from(&args.workloads);
    let started = Instant::now();
    let dir = Scratch::new();
    let tls = targets::TlsFiles::new(&dir)?;
    let tls_client = {
        let mut c = (*tests::tls::client_config(&tls.ca_pem)).clone();
        // Every connection of the TLS connection-rate workload pays for a full handshake.
        c.resumption = rustls::client::Resumption::disabled();
        std::sync::Arc::new(c)
    };
    let mut samples = Vec::new();
    for name in &args.topologies {
        let topo = match name.as_str() {
            "loopback" => Topology::loopback(&plan.congestion),
            "veth" => Topology::veth(&plan.congestion),
            "edge" => Topology::edge(&plan.congestion),
            other => anyhow::bail!("unknown topology {other}"),
        };
        let _backend = topo::Backend::start(&topo.backend, topo.backend_addr)?;
        let _real = topo::RealBackends::start(&topo, &dir)?;
        let mut targets = Vec::new();
        for t in &args.targets {
            targets.push(targets::start_target(t, &topo, &args.spliced, &tls, &dir)?);
        }
        eprintln!(
            "[bench] {}: {} targets up; {} rounds",
            topo.name,
            targets.len(),
            plan.rounds
        );
        for round in 0..plan.rounds {
            run_round(&topo, &targets, &plan, &tls_client, round, &mut samples);
            eprintln!(
                "[bench] {} round {} done ({:.0} s so far)",
                topo.name,
                round + 1,
                started.elapsed().as_secs_f64()
            );
        }
        // Machines on demand are spliced's alone, and local to the proxy: once, on loopback.
        let wanted = plan.workloads.is_empty()
            || plan
                .workloads
                .iter()
                .any(|w| "cold start".starts_with(w.as_str()));
        if topo.name == "loopback" && wanted && args.targets.contains(&"sockmap") {
            drop(targets);
            match cold::run(&topo, &args.spliced.bin, plan.rounds * 4, &dir) {
                Ok(s) => samples.extend(s),
                Err(e) => eprintln!("[bench] cold start: {e:#}"),
            }
        }
    }
    // The registry is spliced's alone, and a fleet of its own rather than a topology: once.
    let wanted = plan.workloads.is_empty()
        || plan
            .workloads
            .iter()
            .any(|w| "registry change".starts_with(w.as_str()));
    if wanted && args.targets.contains(&"sockmap") {
        match registry::run(&args.spliced.bin, plan.rounds * 4, &dir) {
            Ok(s) => samples.extend(s),
            Err(e) => eprintln!("[bench] registry change: {e:#}"),
        }
    }
    let machine = machine::machine();
    let summary = report::summarize(&samples);
    std::fs::create_dir_all(&args.out)?;
    let doc = serde_json::json!({
        "machine": machine,
        "plan": plan,
        "placement": "not pinned: client, proxy and backend share every CPU under the scheduler, the same for every target",
        "duration_secs": started.elapsed().as_secs_f64(),
        "summary": summary,
        "samples": samples,
    });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    let md = report::markdown(&summary, &machine, &plan);
    std::fs::write(args.out.join("results.md"), &md)?;
    charts::charts(&summary, &plan, &args.out)?;
    println!("{md}");
    eprintln!(
        "[bench] wrote {}/results.json, results.md and charts in {:.0} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// CPU seconds of a target's process tree, and of the whole machine.
struct Cpu {
    proxy: f64,
    machine: f64,
}

fn cpu(target: &Target) -> Cpu {
    Cpu {
        proxy: target.pid.map_or(0.0, machine::tree_cpu_secs),
        machine: machine::machine_cpu_secs(),
    }
}

/// The CPU a sample that moved `bytes` took, per GiB, from the readings around it.
fn cpu_figures(before: &Cpu, after: &Cpu, bytes: u64) -> [(String, f64); 2] {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    [
        (
            "proxy CPU s/GiB".to_owned(),
            (after.proxy - before.proxy) / gib,
        ),
        (
            "machine CPU s/GiB".to_owned(),
            (after.machine - before.machine) / gib,
        ),
    ]
}

/// What spliced's kernel plane did for a sample that moved `bytes` (`before`: its counters
/// when the sample started): the share of bytes the daemon moved itself, and holds and
/// daemon wake-ups per GiB. Empty for other targets.
fn kernel_figures(
    t: &Target,
    before: Option<targets::KernelWork>,
    bytes: u64,
) -> BTreeMap<String, f64> {
    let (Some(before), Some(after)) = (before, t.kernel_work()) else {
        return BTreeMap::new();
    };
    let gib = bytes as f64 / (1u64 << 30) as f64;
    BTreeMap::from([
        (
            "userspace moved %".to_owned(),
            100.0 * (after.userspace_moved - before.userspace_moved) / bytes as f64,
        ),
        ("holds/GiB".to_owned(), (after.holds - before.holds) / gib),
        (
            "wake-ups/GiB".to_owned(),
            (after.wakeups - before.wakeups) / gib,
        ),
    ])
}

#[expect(
    clippy::too_many_lines,
    reason = "the workloads one after another, in the order they run"
)]
fn run_round(
    topo: &Topology,
    targets: &[Target],
    plan: &Plan,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    round: usize,
    out: &mut Vec<Sample>,
) {
    let mut measure = |workload: &str, f: &dyn Fn(&Target) -> Result<BTreeMap<String, f64>>| {
        if !plan.workloads.is_empty() && !plan.workloads.iter().any(|w| workload.starts_with(w)) {
            return;
        }
        // Each round starts at another target, so that none always runs first or last.
        for t in targets
            .iter()
            .cycle()
            .skip(round % targets.len().max(1))
            .take(targets.len())
        {
            let result = f(t);
            let (figures, error) = match result {
                Ok(f) => (f, None),
                Err(e) => {
                    eprintln!("[bench] {} {workload} {}: {e:#}", topo.name, t.name);
                    (BTreeMap::new(), Some(format!("{e:#}")))
                }
            };
            out.push(Sample {
                topology: topo.name,
                workload: workload.to_owned(),
                target: t.name,
                round,
                figures,
                error,
            });
            // Let sockets of the last sample leave TIME_WAIT-heavy states settle.
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let client = &topo.client;

    measure("bulk", &|t| {
        let (addr, bytes) = (t.addr, plan.bulk_bytes);
        let work = t.kernel_work();
        let before = cpu(t);
        let secs = client.run(move || load::bulk(addr, bytes))?;
        let after = cpu(t);
        let mut figures = kernel_figures(t, work, bytes);
        figures.extend(cpu_figures(&before, &after, bytes));
        figures.insert("MB/s".to_owned(), bytes as f64 / secs / 1e6);
        Ok(figures)
    });
    measure("duplex", &|t| {
        let (addr, bytes) = (t.addr, plan.duplex_bytes);
        let work = t.kernel_work();
        let secs = client.run(move || load::duplex(addr, bytes))?;
        let mut figures = kernel_figures(t, work, 2 * bytes);
        figures.insert("MB/s each way".to_owned(), bytes as f64 / secs / 1e6);
        Ok(figures)
    });
    for size in [64usize, 4096] {
        let name = if size == 64 { "rr 64 B" } else { "rr 4 KiB" };
        measure(name, &|t| {
            let (addr, n) = (t.addr, plan.round_trips);
            let times = client.run(move || load::round_trips(addr, size, n))?;
            Ok(BTreeMap::from([
                ("p50 µs".to_owned(), load::quantile(&times, 0.5) / 1e3),
                ("p99 µs".to_owned(), load::quantile(&times, 0.99) / 1e3),
                ("p99.9 µs".to_owned(), load::quantile(&times, 0.999) / 1e3),
            ]))
        });
    }
    measure("connect", &|t| {
        let (addr, d) = (t.addr, Duration::from_secs_f64(plan.connect_secs));
        let rate = client.run(move || load::connection_rate(addr, d))?;
        Ok(BTreeMap::from([("conn/s".to_owned(), rate)]))
    });
    for &conns in &plan.sweep {
        measure(&format!("sweep {conns:>4}"), &|t| {
            let (addr, bytes) = (t.addr, plan.sweep_bytes);
            let work = t.kernel_work();
            let before = cpu(t);
            let idle_kib = machine::tcp_buffer_kib();
            let (swept, peak_kib) =
                machine::with_peak_tcp_kib(|| client.run(move || load::sweep(addr, conns, bytes)));
            let swept = swept?;
            let secs = swept.secs;
            let after = cpu(t);
            let mut figures = kernel_figures(t, work, bytes);
            figures.extend(cpu_figures(&before, &after, bytes));
            figures.insert(
                "TCP buffers KiB/conn (peak)".to_owned(),
                (peak_kib - idle_kib).max(0.0) / conns as f64,
            );
            figures.insert("MB/s".to_owned(), bytes as f64 / secs / 1e6);
            // A connection that stalls (a lost window update waits for its sender's probe, a
            // retransmission timeout) shows as a slowest far behind the median.
            figures.insert(
                "conn median ms".to_owned(),
                load::quantile(&swept.each_us, 0.5) / 1e3,
            );
            figures.insert(
                "conn slowest ms".to_owned(),
                load::quantile(&swept.each_us, 1.0) / 1e3,
            );
            Ok(figures)
        });
    }
    let ns = client.name.as_str();
    measure("iperf3", &|t| {
        real::iperf3(ns, t.addrs[topo::service("iperf3")], plan.real_secs)
    });
    measure("redis-benchmark", &|t| {
        real::redis_benchmark(ns, t.addrs[topo::service("redis")], plan.redis_requests)
    });
    measure("wrk", &|t| {
        real::wrk(ns, t.addrs[topo::service("http")], plan.real_secs)
    });
    // The handlers: TLS and HTTP terminated by the proxy. spliced serves them in userspace
    // whatever its data plane, so its copy target adds nothing; direct and socat do not
    // terminate.
    let terminates = |t: &Target| -> Result<()> {
        if matches!(t.name, "sockmap" | "haproxy" | "nginx") {
            Ok(())
        } else {
            anyhow::bail!(
                "not measured: {} does not terminate TLS or HTTP here",
                t.name
            )
        }
    };
    measure("tls bulk", &|t| {
        terminates(t)?;
        let (addr, bytes) = (t.addrs[topo::service("tls")], plan.bulk_bytes);
        let before = cpu(t);
        let config = std::sync::Arc::clone(tls);
        let secs = client.run(move || load::tls_bulk(addr, bytes, &config))?;
        let after = cpu(t);
        let mut figures = BTreeMap::from(cpu_figures(&before, &after, bytes));
        figures.insert("MB/s".to_owned(), bytes as f64 / secs / 1e6);
        Ok(figures)
    });
    measure("tls connect", &|t| {
        terminates(t)?;
        let addr = t.addrs[topo::service("tls")];
        let d = Duration::from_secs_f64(plan.connect_secs);
        let config = std::sync::Arc::clone(tls);
        let rate = client.run(move || load::tls_connection_rate(addr, d, &config))?;
        Ok(BTreeMap::from([("conn/s".to_owned(), rate)]))
    });
    measure("http wrk", &|t| {
        terminates(t)?;
        let url = format!("http://{}/", t.addrs[topo::service("http-proxy")]);
        real::wrk_url(ns, &url, plan.real_secs)
    });
    measure("https wrk", &|t| {
        terminates(t)?;
        let url = format!("https://{}/", t.addrs[topo::service("https")]);
        real::wrk_url(ns, &url, plan.real_secs)
    });
    measure("idle", &|t| {
        if t.name == "socat" {
            anyhow::bail!("not measured: socat forks a process per connection");
        }
        let (addr, n) = (t.addr, plan.idle_conns);
        // Against the proxy's memory when it started listening: an allocator keeps what
        // earlier rounds freed, so a delta within the round would hide it.
        let rss_before = t.rss_at_start_kib;
        let kernel_before = machine::kernel_kib();
        let conns = client.run(move || load::idle(addr, n))?;
        // Let the proxy finish splicing the last ones.
        std::thread::sleep(Duration::from_millis(300));
        let rss_after = t.pid.map_or(0.0, machine::tree_rss_kib);
        let kernel_after = machine::kernel_kib();
        drop(conns);
        // Let the proxies close them before the next target.
        std::thread::sleep(Duration::from_secs(1));
        Ok(BTreeMap::from([
            (
                "proxy RSS KiB/conn".to_owned(),
                (rss_after - rss_before) / n as f64,
            ),
            (
                "kernel KiB/conn".to_owned(),
                (kernel_after - kernel_before) / n as f64,
            ),
        ]))
    });
}
