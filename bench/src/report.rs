//! Summarizing samples (median, min, max, ratio to direct in the same round), and the
//! markdown table of a run.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{Plan, Sample, targets::TARGETS};

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
    /// For spliced's sockmap plane: its median over the best median of the userspace peers
    /// (copy plane, `HAProxy`, nginx, socat) for this figure, where a figure has a better
    /// direction ([`higher_is_better`]).
    pub ratio_to_best_peer: Option<f64>,
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
                ratio_to_best_peer: None,
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
                ratio_to_best_peer: None,
                rounds_ok: values.len(),
                rounds_failed: failed,
                error: error.clone(),
            });
        }
    }
    let ratios: Vec<Option<f64>> = out.iter().map(|s| best_peer_ratio(s, &out)).collect();
    for (s, r) in out.iter_mut().zip(ratios) {
        s.ratio_to_best_peer = r;
    }
    out
}

/// The userspace proxies spliced's kernel path is measured against.
const PEERS: &[&str] = &["copy", "haproxy", "nginx", "socat"];

/// Whether more of `figure` is better (throughput, rates), less (latency, CPU, memory), or
/// neither (counts reported for insight).
fn higher_is_better(figure: &str) -> Option<bool> {
    if figure.contains("MB/s") || figure.contains("conn/s") || figure.contains("req/s") {
        Some(true)
    } else if figure.contains("µs")
        || figure.ends_with(" ms")
        || figure.contains("s/GiB")
        || figure.contains("KiB")
    {
        Some(false)
    } else {
        None
    }
}

/// `stat`'s median over the best peer's for the same figure (sockmap plane only).
fn best_peer_ratio(stat: &Stat, all: &[Stat]) -> Option<f64> {
    if stat.target != "sockmap" {
        return None;
    }
    let higher = higher_is_better(&stat.figure)?;
    let peers = all.iter().filter(|p| {
        PEERS.contains(&p.target.as_str())
            && p.topology == stat.topology
            && p.workload == stat.workload
            && p.figure == stat.figure
            && p.median.is_finite()
    });
    let best = if higher {
        peers.map(|p| p.median).max_by(f64::total_cmp)?
    } else {
        peers.map(|p| p.median).min_by(f64::total_cmp)?
    };
    (best.abs() > f64::EPSILON && stat.median.is_finite()).then(|| stat.median / best)
}

pub fn fmt_num(v: f64) -> String {
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
        "Measured on {} ({} CPUs, {} GiB, Linux {}); TCP congestion control {} on every \
         socket; {} rounds{}, targets interleaved in each round; processes not pinned. Each cell: median (min-max) and, in brackets, the median \
         ratio to direct in the same round; for sockmap, in braces, its median over the best \
         userspace peer's (copy, HAProxy, nginx, socat), on throughput, latency, CPU and memory \
         figures.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        plan.congestion,
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
                            if let Some(r) = s.ratio_to_best_peer {
                                let _ = write!(c, " {{{r:.2} of best peer}}");
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
