//! `just bench-mesh-infer`: distributed inference on loopback meshes of real
//! `llnode start` processes, against one node. For 1, 2, 3 and 4 nodes (one
//! compute thread each, memory caps that force a split): time to first token
//! and decode tokens/s of one greedy prompt from the mesh's last node and
//! their ratio to one node (each run paired with one on the one-node mesh
//! just before), with the hops a token takes on that mesh's plan (from the
//! asking node through the stages and back: the asker's place in the plan
//! decides whether 3 stages cost 3 hops or 4); what a decode step spends
//! outside the stages' compute (`llnode prompt --stats`: the network and
//! the hand-offs between threads and processes) beyond one node's, per hop,
//! and how much more its compute takes split into stages (in separate
//! processes, on cold caches);
//! aggregate tokens/s of k prompts at once from k members vs one prompt;
//! activation bytes sent per token on each link; peak RSS of each node
//! while it serves prompts, against the weights it runs (and its peak since
//! it started, when it may have held an earlier plan's units, or loaded them).
//! Draws the figures in `$CARGO_TARGET_DIR/bench-mesh-infer.svg`.
//! Node counts on the command line (`just bench-mesh-infer 4`) measure those
//! meshes only.
//! `LLNODE_BENCH_SIZE=tiny` uses the small model.

#[path = "../../tests/support.rs"]
mod support;

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;
use support::{Mesh, llnode, median, ok, package_of, s, share_of, stat};

const TOKENS: &str = "48";
const PROMPT: &str = "The mesh of phones answers";
const RUNS: usize = 9;

#[derive(Clone, Copy)]
struct Figures {
    stages: usize,
    /// Network hops a token takes: from the asking node through the stages' devices and back.
    hops: usize,
    first_token_ms: f64,
    decode_tok_s: f64,
    /// Medians of a decode step's compute in the stages and the rest of its time, in ms.
    compute_ms: f64,
    handoff_ms: f64,
    /// Median over the pairs of a decode step's hand-off time (its time
    /// outside the stages' compute) over the one node's, in ms.
    handoff_extra_ms: f64,
    /// Median over the pairs of a decode step's compute over the one node's.
    compute_ratio: f64,
}

/// What `llnode prompt --stats` says of one prompt.
struct Stats {
    first_token_ms: f64,
    decode_tok_s: f64,
    /// Medians over the decode steps: the stages' compute, and the rest.
    compute_ms: f64,
    handoff_ms: f64,
}

fn main() {
    let size = std::env::var("LLNODE_BENCH_SIZE").unwrap_or_else(|_| "bench".into());
    let sizes = sizes();
    let root = tempfile::tempdir().unwrap();
    eprintln!("making the built-in `{size}` model…");
    ok(&["model", "synth", "--size", &size, "-o", s(&root.path().join("export"))]);
    let package = package_of(&root.path().join("export"), &root.path().join("package"));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(package.join("manifest.json")).unwrap()).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("model: built-in {size}; {cores} cores; {RUNS} runs of {TOKENS} tokens each, medians");
    println!(
        "{:<6} {:>7} {:>5} {:>16} {:>10} {:>12} {:>10} {:>8} {:>9}",
        "nodes", "stages", "hops", "first token ms", "ratio", "decode tok/s", "ratio", "µs/hop", "compute"
    );

    // The one-node mesh stays up: each run on a bigger mesh is paired with a
    // run on it just before, and the ratios are the medians of the pairs'.
    // This machine's pace drifts by a third from one minute to the next, which
    // a ratio of medians taken minutes apart would carry.
    let cpus = cpus();
    let one = Mesh::with_node_args(node_args(&package, 1, 1.5, &[]));
    warm(&one);
    let (alone, _) = runs(&one, None);
    row(1, &alone, (1.0, 1.0));
    handoffs(&alone);
    let mut plot = Plot::default();
    for n in sizes {
        let mesh = Mesh::with_node_args(node_args(&package, n, 1.0 / n as f64 + 0.15, &cpus));
        let started_peaks = warm(&mesh);
        let (figures, ratios) = runs(&mesh, Some(&one));
        row(n, &figures, ratios);
        handoffs(&figures);
        plot.ratios.push((n, ratios));
        plot.at_once.push((n, concurrent(&mesh, n, figures.decode_tok_s, cores)));
        plot.memory.extend(links(&mesh, &manifest, &started_peaks));
    }
    println!("plot: {}", plot.draw().display());
}

/// `llnode start` arguments for `n` nodes that all have the package, each
/// offering `share` of the memory the model needs. The plan stays put: this
/// measures the pipeline, not the balancer (`just bench-balance` does),
/// which on 2 cores would move units away from nodes slowed by sharing them.
/// Where `cpus` (the cores to use) has at least two for each node, each node
/// runs on cores of its own, as each phone has its own. With fewer the
/// scheduler places them: a node kept on one core had its network threads
/// wait for its own steps (2 prompts at once on 2 nodes, 1.05x one prompt,
/// against 1.8x), and on a core another node had just used a stage computed
/// 2-3% slower than the same units in one process.
fn node_args(package: &Path, n: usize, share: f64, cpus: &[String]) -> Vec<Vec<String>> {
    let memory = share_of(package, share);
    let each = cpus.len() / n;
    (0..n)
        .map(|i| {
            let mut args = ["--memory", &memory, "--model", s(package), "--no-rebalance"].map(String::from).to_vec();
            if each >= 2 {
                args.extend(["--cpus".to_string(), cpus[i * each..(i + 1) * each].join(",")]);
            }
            args
        })
        .collect()
}

/// The cores this process may run on, as Linux lists them (`0-1,4`); none
/// where it does not say.
fn cpus() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(list) = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")) else { return Vec::new() };
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(first), Ok(last)) = (first.parse::<usize>(), last.parse::<usize>()) {
            cpus.extend((first..=last).map(|cpu| cpu.to_string()));
        }
    }
    cpus
}

/// The meshes to measure against one node: the node counts named on the
/// command line (`just bench-mesh-infer 4`), or 2, 3 and 4.
fn sizes() -> Vec<usize> {
    let named: Vec<usize> = std::env::args().skip(1).filter_map(|arg| arg.parse().ok()).collect();
    if let Some(bad) = named.iter().find(|&&n| !(2..=8).contains(&n)) {
        eprintln!("error: a mesh of {bad} nodes: name from 2 to 8");
        std::process::exit(2);
    }
    if named.is_empty() { vec![2, 3, 4] } else { named }
}

/// One prompt, which waits until every node has loaded its share of the
/// plan; then each node's peak resident memory starts over. Returns the
/// peaks until then: mesh start-up, when a node may have held units of a
/// plan made before the last member joined, and loading.
fn warm(mesh: &Mesh) -> Vec<u64> {
    prompt_stats(mesh);
    let peaks = mesh.nodes.iter().map(|node| node.peak_rss()).collect();
    mesh.nodes.iter().for_each(|node| node.reset_peak_rss());
    peaks
}

fn row(n: usize, figures: &Figures, (first_ratio, decode_ratio): (f64, f64)) {
    let (per_hop, compute) = match figures.hops {
        0 => ("-".to_string(), "-".to_string()),
        hops => (
            format!("{:.0}", figures.handoff_extra_ms * 1e3 / hops as f64),
            format!("{:+.1}%", (figures.compute_ratio - 1.0) * 100.0),
        ),
    };
    println!(
        "{:<6} {:>7} {:>5} {:>16.2} {:>9.2}x {:>12.1} {:>9.2}x {:>8} {:>9}",
        n,
        figures.stages,
        figures.hops,
        figures.first_token_ms,
        first_ratio,
        figures.decode_tok_s,
        decode_ratio,
        per_hop,
        compute
    );
}

/// Where a decode step's time goes.
fn handoffs(figures: &Figures) {
    println!(
        "       a decode step: {:.2} ms of compute in the stages, {:.2} ms outside it (network, hand-offs)",
        figures.compute_ms, figures.handoff_ms
    );
}

/// One greedy prompt from the mesh's last node, `RUNS` times, each after one
/// on `paired_with` (the one-node mesh) when given: the medians of the
/// mesh's figures and of its ratios to the one node's (first token: theirs
/// over ours; decode: ours over theirs).
fn runs(mesh: &Mesh, paired_with: Option<&Mesh>) -> (Figures, (f64, f64)) {
    let (mut first, mut decode, mut first_ratio, mut decode_ratio) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut handoff_extra, mut compute_ratio) = (Vec::new(), Vec::new());
    let (mut compute, mut handoff) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let base = paired_with.map(prompt_stats);
        let ours = prompt_stats(mesh);
        if let Some(base) = base {
            first_ratio.push(base.first_token_ms / ours.first_token_ms);
            decode_ratio.push(ours.decode_tok_s / base.decode_tok_s);
            handoff_extra.push(ours.handoff_ms - base.handoff_ms);
            compute_ratio.push(ours.compute_ms / base.compute_ms);
        }
        first.push(ours.first_token_ms);
        decode.push(ours.decode_tok_s);
        compute.push(ours.compute_ms);
        handoff.push(ours.handoff_ms);
    }
    let view = plan(&mesh.nodes[0].dir);
    let stages: Vec<&str> =
        view["plan"]["stages"].as_array().unwrap().iter().map(|st| st["device"].as_str().unwrap()).collect();
    // The asking node sends the token to the first stage and gets the logits from the last.
    let asker = mesh.nodes[mesh.nodes.len() - 1].peer_id.as_str();
    let route: Vec<&str> = std::iter::once(asker).chain(stages.iter().copied()).chain([asker]).collect();
    let figures = Figures {
        stages: stages.len(),
        hops: route.windows(2).filter(|pair| pair[0] != pair[1]).count(),
        first_token_ms: median(first),
        decode_tok_s: median(decode),
        compute_ms: median(compute),
        handoff_ms: median(handoff),
        handoff_extra_ms: if handoff_extra.is_empty() { 0.0 } else { median(handoff_extra) },
        compute_ratio: if compute_ratio.is_empty() { 1.0 } else { median(compute_ratio) },
    };
    let ratios = if paired_with.is_some() { (median(first_ratio), median(decode_ratio)) } else { (1.0, 1.0) };
    (figures, ratios)
}

/// The figures of one prompt from the mesh's last node.
fn prompt_stats(mesh: &Mesh) -> Stats {
    let dir = &mesh.nodes[mesh.nodes.len() - 1].dir;
    let out = llnode(&["prompt", "--data-dir", s(dir), "--stats", "--ignore-eos", "--max-tokens", TOKENS, PROMPT]);
    assert!(out.ok, "{}", out.stderr);
    Stats {
        first_token_ms: stat(&out.stderr, "first_token_ms"),
        decode_tok_s: stat(&out.stderr, "decode_tok_s"),
        compute_ms: stat(&out.stderr, "decode_compute_ms"),
        handoff_ms: stat(&out.stderr, "decode_handoff_ms"),
    }
}

/// Bytes each node sent each other node per generated token, and each node's
/// peak RSS while serving vs the weights it holds: its stages' and the spare
/// units it loads ahead (target: 1.1× plus 64 MiB); and its peak before.
/// Returns each node's figures for the plot.
fn links(mesh: &Mesh, manifest: &Value, started_peaks: &[u64]) -> Vec<Memory> {
    let view = plan(&mesh.nodes[0].dir);
    let name =
        |id: &str| mesh.nodes.iter().position(|node| node.peer_id == id).map_or("?".to_string(), |i| format!("n{i}"));
    // Prefill steps count as one token each here: the warm-up, RUNS prompts
    // and one at once from each node, of TOKENS tokens each.
    let tokens = ((1 + RUNS + mesh.nodes.len()) * TOKENS.parse::<usize>().unwrap()) as f64;
    let mut line = Vec::new();
    for (i, node) in mesh.nodes.iter().enumerate() {
        for (to, sent) in plan(&node.dir)["sent"].as_object().unwrap() {
            line.push(format!("n{i}->{} {:.0} B/token", name(to), sent["bytes"].as_f64().unwrap() / tokens));
        }
    }
    println!("       activations: {}", line.join(", "));
    let mut rss = Vec::new();
    let mut memory = Vec::new();
    // Units a node holds as `list` ("stages" or "spares") of the plan says.
    let units = |list: &str, id: &str| -> std::collections::BTreeSet<u64> {
        let ranges = view["plan"][list].as_array().unwrap().iter().filter(|st| st["device"] == id);
        ranges.flat_map(|st| st["units"]["start"].as_u64().unwrap()..st["units"]["end"].as_u64().unwrap()).collect()
    };
    let bytes = |units: &std::collections::BTreeSet<u64>| -> u64 {
        units.iter().map(|&u| manifest["cost"]["units"][u as usize]["weight_bytes"].as_u64().unwrap()).sum()
    };
    let mib = |b: u64| b as f64 / 1048576.0;
    for (i, node) in mesh.nodes.iter().enumerate() {
        let own = units("stages", &node.peer_id);
        let spare: std::collections::BTreeSet<u64> = units("spares", &node.peer_id).difference(&own).copied().collect();
        let (weights, spares) = (bytes(&own), bytes(&spare));
        let peak = node.peak_rss();
        // The target: weights held (spares loaded ahead included) × 1.1 + 64 MiB.
        let target = ((weights + spares) as f64 * 1.1) as u64 + (64 << 20);
        let verdict = if peak <= target { "within" } else { "over" };
        memory.push(Memory {
            node: format!("{}:n{i}", mesh.nodes.len()),
            weights: mib(weights + spares),
            peak: mib(peak),
            target: mib(target),
        });
        rss.push(format!(
            "n{i} {:.0} MiB peak RSS ({:.0} MiB now, {:.0} MiB at start-up) / {:.0} MiB weights + {:.0} MiB spare ({verdict} {:.0} MiB)",
            mib(peak),
            mib(node.rss()),
            mib(started_peaks[i]),
            mib(weights),
            mib(spares),
            mib(target)
        ));
    }
    println!("       memory: {}", rss.join(", "));
    memory
}

/// k prompts at once, one from each member, against one prompt alone: the speed-up.
fn concurrent(mesh: &Mesh, k: usize, alone: f64, cores: usize) -> f64 {
    let tokens: f64 = TOKENS.parse().unwrap();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for node in &mesh.nodes {
            scope.spawn(move || {
                ok(&["prompt", "--data-dir", s(&node.dir), "--ignore-eos", "--max-tokens", TOKENS, PROMPT])
            });
        }
    });
    let aggregate = k as f64 * tokens / started.elapsed().as_secs_f64();
    let note =
        if cores < k { format!(" (only {cores} cores for {k} nodes: the target needs {k})") } else { String::new() };
    println!(
        "       {k} prompts at once: {aggregate:.1} tok/s in all, {:.2}x one prompt (target {:.1}x){note}",
        aggregate / alone,
        0.8 * k as f64
    );
    aggregate / alone
}

fn plan(dir: &Path) -> Value {
    serde_json::from_str(&ok(&["plan", "--json", "--data-dir", s(dir)])).unwrap()
}

/// One node's memory, in MiB: weights held (spares included), peak RSS while serving, target.
struct Memory {
    node: String,
    weights: f64,
    peak: f64,
    target: f64,
}

/// The figures the plot shows.
#[derive(Default)]
struct Plot {
    /// Per mesh size: first-token and decode ratios to one node.
    ratios: Vec<(usize, (f64, f64))>,
    /// Per mesh size k: aggregate tokens/s of k prompts at once over one prompt.
    at_once: Vec<(usize, f64)>,
    memory: Vec<Memory>,
}

/// A group of bars under one label, and a target mark across it.
struct Group {
    label: String,
    bars: Vec<(f64, &'static str)>,
    target: Option<f64>,
}

const BLUE: &str = "#4c78a8";
const ORANGE: &str = "#f58518";
const GREY: &str = "#bab0ac";
const GREEN: &str = "#54a24b";
const PANEL: (f64, f64) = (300.0, 220.0);

impl Plot {
    /// Three panels: ratios to one node, k prompts at once, peak RSS per node.
    fn draw(&self) -> PathBuf {
        let mut svg = String::new();
        let (width, height) = (3.0 * (PANEL.0 + 70.0) + 20.0, PANEL.1 + 110.0);
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
        );
        let ratios: Vec<Group> = self
            .ratios
            .iter()
            .map(|(n, (first, decode))| Group {
                label: format!("{n} nodes"),
                bars: vec![(*first, BLUE), (*decode, ORANGE)],
                target: Some(0.95),
            })
            .collect();
        panel(
            &mut svg,
            0,
            "Against one node (target 0.95x)",
            &[("first token", BLUE), ("decode", ORANGE)],
            &ratios,
            "x",
        );
        let at_once: Vec<Group> = self
            .at_once
            .iter()
            .map(|(k, speedup)| Group {
                label: format!("k = {k}"),
                bars: vec![(*speedup, BLUE)],
                target: Some(0.8 * *k as f64),
            })
            .collect();
        panel(&mut svg, 1, "k prompts at once over one (target 0.8k)", &[("speed-up", BLUE)], &at_once, "x");
        let memory: Vec<Group> = self
            .memory
            .iter()
            .map(|m| Group {
                label: m.node.clone(),
                bars: vec![(m.weights, GREY), (m.peak, GREEN)],
                target: Some(m.target),
            })
            .collect();
        panel(
            &mut svg,
            2,
            "Peak RSS serving (target 1.1 w + 64 MiB)",
            &[("weights", GREY), ("peak", GREEN)],
            &memory,
            " MiB",
        );
        support::write_plot("bench-mesh-infer.svg", svg)
    }
}

/// Bar chart number `at` from the left: each group's bars side by side, its
/// target a dashed line across them, the legend `series` under the title.
fn panel(svg: &mut String, at: usize, title: &str, series: &[(&str, &str)], groups: &[Group], unit: &str) {
    let (left, top, (width, height)) = (60.0 + at as f64 * (PANEL.0 + 70.0), 60.0, PANEL);
    let values = groups.iter().flat_map(|g| g.bars.iter().map(|b| b.0).chain(g.target));
    let max = values.fold(0.0f64, f64::max) * 1.1;
    let y = |v: f64| top + height - v / max.max(1e-9) * height;
    let _ = writeln!(svg, r#"<text x="{left}" y="20" font-size="13">{title}</text>"#);
    for (k, (name, colour)) in series.iter().enumerate() {
        let _ = writeln!(svg, r#"<text x="{}" y="40" fill="{colour}">{name}</text>"#, left + 90.0 * k as f64);
    }
    let _ = writeln!(svg, r##"<line x1="{left}" x2="{left}" y1="{top}" y2="{}" stroke="#000"/>"##, top + height);
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" x2="{}" y1="{b}" y2="{b}" stroke="#000"/>"##,
        left + width,
        b = top + height
    );
    let decimals = if max < 10.0 { 2 } else { 0 };
    for tick in 0..=4 {
        let v = max / 1.1 * tick as f64 / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.decimals$}{unit}</text>"#,
            left - 4.0,
            y(v) + 4.0
        );
    }
    let slot = width / groups.len().max(1) as f64;
    for (g, group) in groups.iter().enumerate() {
        let x0 = left + slot * g as f64 + slot * 0.15;
        let bar = slot * 0.7 / group.bars.len() as f64;
        for (b, (value, colour)) in group.bars.iter().enumerate() {
            let x = x0 + bar * b as f64;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/>"#,
                y(*value),
                bar - 1.0,
                top + height - y(*value)
            );
        }
        if let Some(target) = group.target {
            let _ = writeln!(
                svg,
                r##"<line x1="{x0:.1}" x2="{:.1}" y1="{t:.1}" y2="{t:.1}" stroke="#e45756" stroke-width="2" stroke-dasharray="4 2"/>"##,
                x0 + slot * 0.7,
                t = y(target)
            );
        }
        let (lx, ly) = (x0 + slot * 0.35, top + height + 14.0);
        let rotate = if groups.len() > 4 {
            format!(r#" transform="rotate(-45 {lx:.1} {ly:.1})" text-anchor="end""#)
        } else {
            r#" text-anchor="middle""#.to_string()
        };
        let _ = writeln!(svg, r#"<text x="{lx:.1}" y="{ly:.1}"{rotate}>{}</text>"#, group.label);
    }
}
