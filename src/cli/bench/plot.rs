//! `bench --plot FILE.svg`: throughput over time and the latency distribution of switchyard and
//! the bare loop on one picture, as plain SVG.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use super::{Report, Timeline};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 420.0;
const PANEL: f64 = 400.0;
const TOP: f64 = 60.0;
const PLOT_H: f64 = 280.0;
const SWITCHYARD: &str = "#1f6feb";
const BARE: &str = "#8b949e";

pub fn write(path: &Path, report: &Report) -> anyhow::Result<()> {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="20" y="24" font-size="15">switchyard bench: {:?} over {:?}, {} jobs, provider latency {} ms, {} in flight</text>"#,
        report.mode, report.shape, report.jobs, report.provider_latency_ms, report.inflight
    );
    let _ = writeln!(
        svg,
        r#"<text x="20" y="44" fill="{SWITCHYARD}">switchyard {:.0} jobs/s, {:.3} ms CPU/job</text><text x="330" y="44" fill="{BARE}">bare loop {:.0} jobs/s, {:.3} ms CPU/job</text><text x="640" y="44">ratio {:.3} throughput, {:.3} CPU/job</text>"#,
        report.switchyard.jobs_per_s,
        report.switchyard.cpu_ms_per_job,
        report.bare_loop.jobs_per_s,
        report.bare_loop.cpu_ms_per_job,
        report.ratio.throughput,
        report.ratio.cpu_per_job
    );
    throughput_panel(&mut svg, 60.0, report);
    latency_panel(&mut svg, 540.0, report);
    svg.push_str("</svg>\n");
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// Jobs finished per second in 250 ms bins, from each side's first completion.
fn rates(t: &Timeline) -> Vec<(f64, f64)> {
    let Some(first) = t.done_us.iter().min().copied() else {
        return Vec::new();
    };
    let last = t.done_us.iter().max().copied().unwrap_or(first);
    let bins = usize::try_from((last - first) / 250_000 + 1)
        .unwrap_or(1)
        .min(10_000);
    let mut counts = vec![0u32; bins];
    for d in &t.done_us {
        let i = usize::try_from((d - first) / 250_000)
            .unwrap_or(0)
            .min(bins - 1);
        if let Some(c) = counts.get_mut(i) {
            *c += 1;
        }
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| (i as f64 * 0.25, f64::from(*c) * 4.0))
        .collect()
}

fn axes(svg: &mut String, x0: f64, title: &str, x_label: &str, y_label: &str) {
    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="{}" font-size="13">{title}</text><line x1="{x0}" y1="{}" x2="{x0}" y2="{}" stroke="black"/><line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/><text x="{}" y="{}" text-anchor="middle">{x_label}</text><text x="{}" y="{}" transform="rotate(-90 {} {})" text-anchor="middle">{y_label}</text>"#,
        TOP + 10.0,
        TOP + 20.0,
        TOP + 20.0 + PLOT_H,
        TOP + 20.0 + PLOT_H,
        x0 + PANEL,
        TOP + 20.0 + PLOT_H,
        x0 + PANEL / 2.0,
        TOP + PLOT_H + 55.0,
        x0 - 40.0,
        TOP + 20.0 + PLOT_H / 2.0,
        x0 - 40.0,
        TOP + 20.0 + PLOT_H / 2.0
    );
}

fn ticks(svg: &mut String, x0: f64, y_max: f64, x_ticks: &[(f64, String)]) {
    for k in 0..=4 {
        let v = y_max * f64::from(k) / 4.0;
        let y = TOP + 20.0 + PLOT_H - PLOT_H * f64::from(k) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end" font-size="10">{v:.0}</text><line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/>"##,
            x0 - 4.0,
            y + 3.0,
            x0 + PANEL
        );
    }
    for (x, label) in x_ticks {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="10">{label}</text>"#,
            x0 + x,
            TOP + PLOT_H + 34.0
        );
    }
}

fn polyline(svg: &mut String, points: &[(f64, f64)], colour: &str) {
    let mut path = String::new();
    for (x, y) in points {
        let _ = write!(path, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        svg,
        r#"<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>"#
    );
}

fn throughput_panel(svg: &mut String, x0: f64, report: &Report) {
    axes(
        svg,
        x0,
        "throughput over time",
        "seconds since the first result",
        "jobs/s",
    );
    let sides = [
        rates(&report.switchyard.timeline),
        rates(&report.bare_loop.timeline),
    ];
    let t_max = sides
        .iter()
        .flat_map(|s| s.last().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let y_max = nice(sides.iter().flatten().map(|p| p.1).fold(1.0, f64::max));
    let x_ticks: Vec<(f64, String)> = (0..=4)
        .map(|k| {
            let t = t_max * f64::from(k) / 4.0;
            (PANEL * f64::from(k) / 4.0, format!("{t:.1}"))
        })
        .collect();
    ticks(svg, x0, y_max, &x_ticks);
    for (side, colour) in sides.iter().zip([SWITCHYARD, BARE]) {
        let points: Vec<(f64, f64)> = side
            .iter()
            .map(|(t, r)| {
                (
                    x0 + PANEL * t / t_max,
                    TOP + 20.0 + PLOT_H - PLOT_H * r / y_max,
                )
            })
            .collect();
        polyline(svg, &points, colour);
    }
}

/// End-to-end latency against the percentile, on a scale that spreads the tail (0, 90, 99,
/// 99.9).
fn latency_panel(svg: &mut String, x0: f64, report: &Report) {
    axes(
        svg,
        x0,
        "end-to-end latency by percentile",
        "percentile",
        "ms",
    );
    let nines = |q: f64| -(1.0 - q).log10();
    let span = nines(0.999);
    let curves: Vec<Vec<(f64, f64)>> = [&report.switchyard.timeline, &report.bare_loop.timeline]
        .iter()
        .map(|t| {
            let mut sorted = t.latency_us.clone();
            sorted.sort_unstable();
            (0..=300)
                .filter_map(|k| {
                    let q = 1.0 - 10f64.powf(-span * f64::from(k) / 300.0);
                    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
                    sorted.get(i).map(|us| (nines(q), *us as f64 / 1000.0))
                })
                .collect()
        })
        .collect();
    let y_max = nice(curves.iter().flatten().map(|p| p.1).fold(1.0, f64::max));
    let x_ticks: Vec<(f64, String)> = [
        (0.0, "0"),
        (0.5, "50"),
        (0.9, "90"),
        (0.99, "99"),
        (0.999, "99.9"),
    ]
    .iter()
    .map(|(q, l)| (PANEL * nines(*q) / span, (*l).to_owned()))
    .collect();
    ticks(svg, x0, y_max, &x_ticks);
    for (curve, colour) in curves.iter().zip([SWITCHYARD, BARE]) {
        let points: Vec<(f64, f64)> = curve
            .iter()
            .map(|(x, ms)| {
                (
                    x0 + PANEL * x / span,
                    TOP + 20.0 + PLOT_H - PLOT_H * ms / y_max,
                )
            })
            .collect();
        polyline(svg, &points, colour);
    }
}

/// A round axis maximum at or above `v`.
fn nice(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}
