//! Reading the machine (CPU time, memory), summarizing samples (median, min, max, ratio to
//! direct in the same round), and writing the markdown table and SVG charts.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use serde::Serialize;

use crate::{Plan, Sample, topo::TARGETS};

/// Clock ticks per second of /proc's CPU times (`USER_HZ`).
fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse().ok()) {
                parent.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// CPU seconds (user + system, with reaped children) of a process tree.
pub fn tree_cpu_secs(pid: u32) -> f64 {
    let hz = ticks();
    tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            // utime, stime, cutime, cstime: fields 14-17 of stat, 12-15 after the name.
            (11..15)
                .filter_map(|i| f.get(i)?.parse::<f64>().ok())
                .sum::<f64>()
                / hz
        })
        .sum()
}

/// Resident memory of a process tree, KiB.
pub fn tree_rss_kib(pid: u32) -> f64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .sum()
}

/// Busy CPU seconds of the whole machine since boot (all but idle and iowait).
pub fn machine_cpu_secs() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, x)| x)
        .sum();
    busy / ticks()
}

/// Kernel memory that grows with sockets, KiB: the active objects of every slab cache (freed
/// objects a cache keeps for reuse are not counted, so the figure falls back when sockets
/// close) plus the pages TCP buffers hold.
pub fn kernel_kib() -> f64 {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    let slab: f64 = slabinfo
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let active: f64 = f.get(1)?.parse().ok()?;
            let size: f64 = f.get(3)?.parse().ok()?;
            Some(active * size / 1024.0)
        })
        .sum();
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tcp_pages = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|x| *x == "mem")?;
            f.get(i + 1)?.parse::<f64>().ok()
        })
        .unwrap_or(0.0);
    slab + tcp_pages * 4.0
}

/// What the numbers were measured on.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_owned(), |s| s.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .find(|l| l.contains("version"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
    };
    serde_json::json!({
        "cpu": model,
        "cpus": cpus,
        "memory_gib": mem_kib / (1 << 20),
        "kernel": kernel,
        "haproxy": version("haproxy", "-v"),
        "nginx": version("nginx", "-v"),
        "socat": version("socat", "-V"),
    })
}

/// Median, min and max of one figure over the rounds, and its median ratio to direct.
#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    pub topology: String,
    pub workload: String,
    pub target: String,
    pub figure: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Median over rounds of (this round's value / direct's value in the same round).
    pub ratio_to_direct: Option<f64>,
    pub rounds_ok: usize,
    pub rounds_failed: usize,
    /// The first error, when some rounds failed.
    pub error: Option<String>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

pub fn summarize(samples: &[Sample]) -> Vec<Stat> {
    // (topology, workload, target) -> samples, in first-seen order.
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for s in samples {
        let k = (s.topology, s.workload.as_str(), s.target);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out = Vec::new();
    for (topo, workload, target) in keys {
        let mine: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.topology == topo && s.workload == workload && s.target == target)
            .collect();
        let failed = mine.iter().filter(|s| s.error.is_some()).count();
        let error = mine.iter().find_map(|s| s.error.clone());
        let mut figures: Vec<&String> = mine.iter().flat_map(|s| s.figures.keys()).collect();
        figures.sort();
        figures.dedup();
        if figures.is_empty() {
            out.push(Stat {
                topology: topo.to_owned(),
                workload: workload.to_owned(),
                target: target.to_owned(),
                figure: String::new(),
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                ratio_to_direct: None,
                rounds_ok: 0,
                rounds_failed: failed,
                error,
            });
            continue;
        }
        for figure in figures {
            let mut values: Vec<f64> = mine
                .iter()
                .filter_map(|s| s.figures.get(figure).copied())
                .filter(|v| v.is_finite())
                .collect();
            let mut ratios: Vec<f64> = mine
                .iter()
                .filter_map(|s| {
                    let v = *s.figures.get(figure)?;
                    let direct = samples.iter().find(|d| {
                        d.topology == topo
                            && d.workload == workload
                            && d.target == "direct"
                            && d.round == s.round
                    })?;
                    let dv = *direct.figures.get(figure)?;
                    (dv.abs() > f64::EPSILON).then(|| v / dv)
                })
                .collect();
            let (min, max) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            out.push(Stat {
                topology: topo.to_owned(),
                workload: workload.to_owned(),
                target: target.to_owned(),
                figure: figure.clone(),
                median: median(&mut values),
                min,
                max,
                ratio_to_direct: (!ratios.is_empty()).then(|| median(&mut ratios)),
                rounds_ok: values.len(),
                rounds_failed: failed,
                error: error.clone(),
            });
        }
    }
    out
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".to_owned()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One markdown table per topology: a row per workload figure, a column per target; each
/// cell the median, its range, and its ratio to direct.
pub fn markdown(stats: &[Stat], machine: &serde_json::Value, plan: &Plan) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Measured on {} ({} CPUs, {} GiB, Linux {}); {} rounds{}, targets interleaved in each \
         round; processes not pinned. Each cell: median (min-max) and, in brackets, the median \
         ratio to direct in the same round.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        plan.rounds,
        if plan.quick { " (--quick)" } else { "" },
    );
    let mut topologies: Vec<&str> = stats.iter().map(|s| s.topology.as_str()).collect();
    topologies.dedup();
    for topo in topologies {
        let mine: Vec<&Stat> = stats.iter().filter(|s| s.topology == topo).collect();
        let targets: Vec<&str> = TARGETS
            .iter()
            .copied()
            .filter(|t| mine.iter().any(|s| s.target == *t))
            .collect();
        let _ = writeln!(md, "### {topo}\n");
        let _ = writeln!(md, "| workload | figure | {} |", targets.join(" | "));
        let _ = writeln!(md, "|---|---|{}", "---|".repeat(targets.len()));
        let mut rows: Vec<(&str, &str)> = Vec::new();
        for s in &mine {
            if !s.figure.is_empty() && !rows.contains(&(s.workload.as_str(), s.figure.as_str())) {
                rows.push((&s.workload, &s.figure));
            }
        }
        for (workload, figure) in rows {
            let cells: Vec<String> = targets
                .iter()
                .map(|t| {
                    let cell = mine
                        .iter()
                        .find(|s| s.workload == workload && s.target == *t && s.figure == figure);
                    let failed = mine
                        .iter()
                        .find(|s| s.workload == workload && s.target == *t)
                        .map_or(0, |s| s.rounds_failed);
                    match cell {
                        None if failed > 0 => "failed".to_owned(),
                        None => "n/a".to_owned(),
                        Some(s) => {
                            let mut c = format!(
                                "{} ({}-{})",
                                fmt_num(s.median),
                                fmt_num(s.min),
                                fmt_num(s.max)
                            );
                            if let Some(r) = s.ratio_to_direct.filter(|_| *t != "direct") {
                                let _ = write!(c, " [{r:.2}]");
                            }
                            if s.rounds_failed > 0 {
                                let _ = write!(c, " ({} failed)", s.rounds_failed);
                            }
                            c
                        }
                    }
                })
                .collect();
            let _ = writeln!(md, "| {workload} | {figure} | {} |", cells.join(" | "));
        }
        let errors: Vec<String> = mine
            .iter()
            .filter_map(|s| {
                let e = s.error.as_ref()?;
                Some(format!("{} {}: {e}", s.target, s.workload))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(md, "\nFailures:\n");
            for e in errors {
                let _ = writeln!(md, "- {e}");
            }
        }
        let _ = writeln!(md);
    }
    md
}

const COLORS: &[&str] = &[
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
];

/// A grouped bar chart: one group per label, one bar per series.
fn bar_chart(title: &str, unit: &str, labels: &[String], series: &[(String, Vec<f64>)]) -> String {
    let (w, h, left, bottom, top) = (760.0, 360.0, 70.0, 60.0, 40.0);
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let plot_h = h - bottom - top;
    let group_w = (w - left - 20.0) / labels.len().max(1) as f64;
    let bar_w = (group_w * 0.8) / series.len().max(1) as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{title}</text>\n",
        w / 2.0
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - 20.0,
            left - 6.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">{unit}</text>",
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    for (g, label) in labels.iter().enumerate() {
        let gx = left + group_w * g as f64 + group_w * 0.1;
        for (si, (_, values)) in series.iter().enumerate() {
            let v = values.get(g).copied().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let bh = plot_h * v / max;
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{}</title></rect>",
                gx + bar_w * si as f64,
                top + plot_h - bh,
                bar_w * 0.95,
                COLORS[si % COLORS.len()],
                fmt_num(v)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            gx + group_w * 0.4,
            h - bottom + 18.0
        );
    }
    for (si, (name, _)) in series.iter().enumerate() {
        let x = left + 110.0 * si as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            h - 22.0,
            COLORS[si % COLORS.len()],
            x + 16.0,
            h - 12.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn lookup(stats: &[Stat], topo: &str, workload: &str, target: &str, figure: &str) -> f64 {
    stats
        .iter()
        .find(|s| {
            s.topology == topo && s.workload == workload && s.target == target && s.figure == figure
        })
        .map_or(f64::NAN, |s| s.median)
}

/// Throughput by target, latency percentiles by target, and the concurrency sweep.
pub fn charts(stats: &[Stat], plan: &Plan, out: &Path) -> Result<()> {
    let mut topologies: Vec<&str> = stats.iter().map(|s| s.topology.as_str()).collect();
    topologies.dedup();
    let targets: Vec<String> = TARGETS
        .iter()
        .filter(|t| stats.iter().any(|s| s.target == **t))
        .map(|t| (*t).to_owned())
        .collect();
    let series = |workload: &str, figure: &str| -> Vec<(String, Vec<f64>)> {
        topologies
            .iter()
            .map(|topo| {
                (
                    (*topo).to_owned(),
                    targets
                        .iter()
                        .map(|t| lookup(stats, topo, workload, t, figure))
                        .collect(),
                )
            })
            .collect()
    };
    std::fs::write(
        out.join("throughput.svg"),
        bar_chart(
            "Bulk one-way throughput (median)",
            "MB/s",
            &targets,
            &series("bulk", "MB/s"),
        ),
    )?;
    for topo in &topologies {
        let percentiles: Vec<(String, Vec<f64>)> = ["p50 µs", "p99 µs", "p99.9 µs"]
            .iter()
            .map(|p| {
                (
                    (*p).to_owned(),
                    targets
                        .iter()
                        .map(|t| lookup(stats, topo, "rr 64 B", t, p))
                        .collect(),
                )
            })
            .collect();
        std::fs::write(
            out.join(format!("latency-{topo}.svg")),
            bar_chart(
                &format!("64-byte round trip, {topo} (median of rounds)"),
                "µs",
                &targets,
                &percentiles,
            ),
        )?;
        let levels: Vec<String> = plan.sweep.iter().map(|c| format!("{c} conns")).collect();
        let sweep: Vec<(String, Vec<f64>)> = targets
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    plan.sweep
                        .iter()
                        .map(|c| lookup(stats, topo, &format!("sweep {c:>4}"), t, "MB/s"))
                        .collect(),
                )
            })
            .collect();
        std::fs::write(
            out.join(format!("sweep-{topo}.svg")),
            bar_chart(
                &format!("Concurrency sweep, bulk, {topo}"),
                "MB/s",
                &levels,
                &sweep,
            ),
        )?;
    }
    Ok(())
}
