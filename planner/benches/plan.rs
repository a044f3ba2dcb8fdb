//! Planner benchmark: how long the MIP takes on 8 devices x 64 units and 16
//! x 128 units, and how much faster its plans run than the rules of thumb
//! (even split, exo-style memory split, Cake-style compute split) on mixes
//! of real phones, by simulation. Prints tables and writes a bar chart of
//! the speedups to `$CARGO_TARGET_DIR/bench-plan.svg` (or the workspace's
//! `target/`).
//!
//! Run with `cargo bench -p llnode-planner`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use llnode_planner::config::{Config, Objective};
use llnode_planner::cost::ModelCost;
use llnode_planner::cost::TransformerShape;
use llnode_planner::phone::{self, Phone};
use llnode_planner::plan::{Method, Plan};
use llnode_planner::profile::DeviceProfile;
use llnode_planner::simulate::simulate;
use llnode_planner::{assign, baseline};

/// Sequences in flight when measuring throughput.
const SEQUENCES: usize = 8;

/// Runs per solve-time figure (`BENCH_RUNS` overrides).
fn runs() -> usize {
    std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5)
}

fn main() {
    solve_times();
    let rows = speedups();
    let path = write_svg(&rows);
    println!("\nchart written to {}", path.display());
}

/// A Llama-shaped model with `units - 2` decoder layers.
fn model(units: usize) -> ModelCost {
    ModelCost::transformer(&TransformerShape { layers: units - 2, ..TransformerShape::tiny_llama() })
}

fn cycle(n: usize) -> Vec<Phone> {
    (0..n).map(|i| phone::CATALOG[i % phone::CATALOG.len()]).collect()
}

/// The same devices with every unit "measured" at its estimate times a
/// deterministic 0.97..1.03 factor: no two units alike, no blocks.
fn measured(devices: &[DeviceProfile], model: &ModelCost) -> Vec<DeviceProfile> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    devices
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d.unit_time_s = Some(
                (0..model.units.len())
                    .map(|u| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let noise = 0.97 + 0.06 * (state % 1000) as f64 / 1000.0;
                        d.compute_s(u, &model.units[u]) * noise
                    })
                    .collect(),
            );
            d
        })
        .collect()
}

fn describe(method: &Method) -> String {
    match method {
        Method::Mip { proven_optimal: true, nodes, .. } => format!("optimal, {nodes} nodes"),
        Method::Mip { gap, nodes, .. } => {
            format!("gap {:.1}%, {nodes} nodes", gap.unwrap_or(f64::NAN) * 100.0)
        }
        other => format!("{other:?}"),
    }
}

fn solve_times() {
    let runs = runs();
    println!("MIP solve time, median of {runs} runs (release build, this machine)");
    println!("{:<28} {:<11} {:>10} {:>8}  result", "instance", "objective", "median", "stages");
    // (name, model, devices, Config::interchangeable)
    let cases: Vec<(String, ModelCost, Vec<DeviceProfile>, f64)> = vec![
        ("8 phones x 64 units".into(), model(64), phone::mesh(&cycle(8)), 0.1),
        ("16 phones x 128 units".into(), model(128), phone::mesh(&cycle(16)), 0.1),
        {
            let m = model(64);
            let d = measured(&phone::mesh(&cycle(8)), &m);
            ("8 x 64, measured (+-3%)".into(), m, d, 0.1)
        },
        {
            let m = model(64);
            let d = measured(&phone::mesh(&cycle(8)), &m);
            ("8 x 64, measured, exact".into(), m, d, 0.0)
        },
    ];
    for (name, model, devices, interchangeable) in &cases {
        for objective in [Objective::Latency, Objective::Throughput] {
            let config = Config {
                objective,
                interchangeable: *interchangeable,
                time_limit: Duration::from_secs(10),
                ..Config::default()
            };
            let mut times = Vec::new();
            let mut last = None;
            // Slow cases (seconds) are timed once.
            for _ in 0..runs {
                let started = Instant::now();
                let plan = assign::plan(model, devices, &config);
                times.push(started.elapsed());
                last = Some(plan);
                if times[0] > Duration::from_secs(2) {
                    break;
                }
            }
            times.sort();
            let median = times[times.len() / 2];
            match last {
                Some(Ok(plan)) => println!(
                    "{name:<28} {:<11} {:>8.1}ms {:>8}  {} ({} run{})",
                    format!("{objective:?}"),
                    median.as_secs_f64() * 1e3,
                    plan.stages.len(),
                    describe(&plan.method),
                    times.len(),
                    if times.len() == 1 { "" } else { "s" },
                ),
                Some(Err(e)) => println!("{name:<28} {objective:?}: {e}"),
                None => {}
            }
        }
    }
}

/// One mix's figures: speedup of the planned plan over each baseline, for
/// latency and for throughput (`None` when the baseline does not fit).
struct Row {
    mix: String,
    latency: Vec<Option<f64>>,
    throughput: Vec<Option<f64>>,
}

const BASELINES: [&str; 3] = ["even", "memory (exo)", "compute (Cake)"];

fn speedups() -> Vec<Row> {
    use phone::{GALAXY_A14 as A14, GALAXY_S23 as S23, PIXEL_6A as P6A, PIXEL_7 as P7, REDMI_9A as R9A};
    let tiny = ModelCost::transformer(&TransformerShape::tiny_llama());
    let three_b = ModelCost::transformer(&TransformerShape::llama_3b());
    let mixes: Vec<(&str, ModelCost, Vec<Phone>)> = vec![
        ("1.1B on P7+A14+9A", tiny.clone(), vec![R9A, A14, P7]),
        ("1.1B on A14+A14+9A+9A", tiny, vec![R9A, A14, R9A, A14]),
        ("3B on S23+P7+A14+9A", three_b.clone(), vec![R9A, A14, P7, S23]),
        ("3B on 2xP6a+2xA14+2x9A", three_b.clone(), vec![A14, R9A, P6A, A14, R9A, P6A]),
        ("3B on 8 mixed", three_b, vec![R9A, A14, P6A, P7, S23, R9A, A14, P6A]),
    ];
    println!("\nSimulated speedup of the planned plan over each rule (x = baseline time / planned time)");
    println!(
        "{:<26} {:<10} {:>9} {:>14} {:>14} {:>16}",
        "mix", "measure", "planned", BASELINES[0], BASELINES[1], BASELINES[2]
    );
    let mut rows = Vec::new();
    for (name, model, phones) in mixes {
        let devices = phone::mesh(&phones);
        let mut row = Row { mix: name.to_string(), latency: Vec::new(), throughput: Vec::new() };
        for (objective, sequences) in [(Objective::Latency, 1), (Objective::Throughput, SEQUENCES)] {
            let config = Config { objective, ..Config::default() };
            let figure = |plan: &Plan| -> Option<f64> {
                let sim = simulate(plan, &model, &devices, &config, sequences).ok()?;
                Some(match objective {
                    Objective::Latency => sim.latency_s * 1e3,
                    Objective::Throughput => sim.tokens_per_s,
                })
            };
            let planned = match assign::plan(&model, &devices, &config) {
                Ok(plan) => plan,
                Err(e) => {
                    println!("{name:<26} {objective:?}: {e}");
                    continue;
                }
            };
            let Some(best) = figure(&planned) else {
                continue;
            };
            let mut cells = Vec::new();
            let mut ratios = Vec::new();
            for rule in [baseline::even, baseline::by_memory, baseline::by_compute] {
                let ratio =
                    rule(&model, &devices, &config).ok().and_then(|plan| figure(&plan)).map(|value| match objective {
                        Objective::Latency => value / best,
                        Objective::Throughput => best / value,
                    });
                cells.push(match ratio {
                    Some(r) => format!("{r:.2}x"),
                    None => "does not fit".to_string(),
                });
                ratios.push(ratio);
            }
            let (measure, value) = match objective {
                Objective::Latency => ("ms/token", format!("{best:.0} ms")),
                Objective::Throughput => ("tokens/s", format!("{best:.2}")),
            };
            println!("{name:<26} {measure:<10} {value:>9} {:>14} {:>14} {:>16}", cells[0], cells[1], cells[2]);
            match objective {
                Objective::Latency => row.latency = ratios,
                Objective::Throughput => row.throughput = ratios,
            }
        }
        rows.push(row);
    }
    rows
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Grouped bars: for each mix, the latency and the throughput speedup over
/// each baseline, with a line at 1x.
fn write_svg(rows: &[Row]) -> PathBuf {
    let colours = ["#4c78a8", "#f58518", "#54a24b"];
    let (bar, gap, left, top, height) = (14.0, 30.0, 60.0, 40.0, 260.0);
    let group = 6.0 * bar + gap;
    let width = left + rows.len() as f64 * group + 40.0;
    let max =
        rows.iter().flat_map(|r| r.latency.iter().chain(&r.throughput)).flatten().fold(2.0f64, |m, v| m.max(*v)).ceil();
    let y = |v: f64| top + height - v / max * height;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<text x="{left}" y="20" font-size="13">Speedup of the planned plan over each rule (solid: latency, light: throughput)</text>
"#,
        w = width,
        h = top + height + 90.0
    );
    for tick in 0..=max as usize {
        let ty = y(tick as f64);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{x2}" y1="{ty}" y2="{ty}" stroke="{c}"/><text x="{tx}" y="{ly}" text-anchor="end">{tick}x</text>"##,
            x2 = width - 20.0,
            c = if tick == 1 { "#000" } else { "#ddd" },
            tx = left - 6.0,
            ly = ty + 4.0
        );
    }
    for (i, row) in rows.iter().enumerate() {
        let x0 = left + gap / 2.0 + i as f64 * group;
        for (k, (series, opacity)) in [(&row.latency, 1.0), (&row.throughput, 0.45)].into_iter().enumerate() {
            for (b, ratio) in series.iter().enumerate() {
                let x = x0 + (k * 3 + b) as f64 * bar;
                match ratio {
                    Some(r) => {
                        let _ = writeln!(
                            svg,
                            r#"<rect x="{x}" y="{ry}" width="{bw}" height="{rh}" fill="{c}" fill-opacity="{opacity}"><title>{name}: {r:.2}x</title></rect>"#,
                            ry = y(*r),
                            bw = bar - 2.0,
                            rh = (y(0.0) - y(*r)).max(0.0),
                            c = colours[b],
                            name = BASELINES[b]
                        );
                    }
                    None => {
                        let _ = writeln!(
                            svg,
                            r#"<text x="{tx}" y="{ty}" font-size="9" transform="rotate(-90 {tx} {ty})">n/a</text>"#,
                            tx = x + bar / 2.0,
                            ty = y(0.0) - 4.0
                        );
                    }
                }
            }
        }
        let _ = writeln!(
            svg,
            r#"<text x="{tx}" y="{ty}" text-anchor="end" transform="rotate(-25 {tx} {ty})">{mix}</text>"#,
            tx = x0 + 3.0 * bar,
            ty = top + height + 16.0,
            mix = row.mix
        );
    }
    // The 1x line again, over the bars.
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" x2="{x2}" y1="{y1}" y2="{y1}" stroke="#000" stroke-dasharray="4 3"/>"##,
        x2 = width - 20.0,
        y1 = y(1.0)
    );
    for (b, name) in BASELINES.iter().enumerate() {
        let lx = left + b as f64 * 130.0;
        let ly = top + height + 75.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="{ry}" width="10" height="10" fill="{c}"/><text x="{tx}" y="{ly}">vs {name}</text>"#,
            ry = ly - 9.0,
            c = colours[b],
            tx = lx + 14.0
        );
    }
    svg.push_str("</svg>\n");
    let dir = target_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("bench-plan.svg");
    if let Err(e) = std::fs::write(&path, svg) {
        println!("could not write {}: {e}", path.display());
    }
    path
}
