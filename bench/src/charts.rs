//! The SVG charts of a run.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;

use crate::{
    Plan,
    report::{Stat, fmt_num},
    targets::TARGETS,
};

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
