//! `just bench-balance`: runtime balancing and failover on a loopback mesh of
//! three real `llnode start` processes with the built-in model (any two can
//! hold it, so the plan leaves one spare). One greedy prompt runs; a quarter
//! of the way in, the busiest stage other than the asking member is
//! throttled 2× (`llnode throttle`). Once with `--no-rebalance`, once with
//! balancing: tokens/s after the throttle and their ratio (target ≥ 1.3×),
//! also as a share of each run's own pace before the throttle,
//! the longest pause, tokens until the generation moved to the plan that took
//! work off the throttled node, and tokens until the pace recovered (a window
//! within 15% of the pace before the throttle) (target ≤ 20); then, with
//! balancing, the throttle is taken off with no prompt running: the seconds
//! until the node's probes re-profile it. Then a
//! stage is killed (SIGKILL) halfway through a prompt: the time from the kill
//! to the token that ends the stall. Every answer is checked against
//! `llnode run` in one process, both runs must throttle the same share of
//! the model, and the balancing run must move units: the bench fails
//! otherwise, as its figures would mean nothing. Draws tokens/s over time to
//! `$CARGO_TARGET_DIR/bench-balance.svg`. `LLNODE_BENCH_SIZE=tiny` and
//! `LLNODE_BENCH_TOKENS=N` change the model and the answer's length.
//! Whether the idle node keeps the throttled stage's units as spares (a move
//! that loads nothing) depends on the plan; `LLNODE_BENCH_THROTTLE=unspared`
//! starts meshes until it does not, so the move must load units.

#[path = "../../tests/support.rs"]
mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use support::{Mesh, Streaming, median, ok, package_of, s, share_of, units_of};

const PROMPT: &str = "The mesh of phones answers";
const ASKING: usize = 0;
/// Meshes the balancing run may start to get the first run's plan.
const MESH_TRIES: usize = 4;
/// Log lines that time a move: profile, re-profile, plan, fetch, load, hand-over.
const TIMELINE: [&str; 7] =
    ["measured this device", "re-profiled", "moving units", "fetched", "loaded", "handed over", "no session is left"];
/// Log lines that time a failover: the loss, the election, the plan, the fetch, the load.
const FAILOVER_TIMELINE: [&str; 6] = ["left the mesh", "leads", "moving units", "published", "fetched", "loaded"];
/// Token intervals in the window that decides the pace has recovered.
const WINDOW: usize = 8;

struct Run {
    label: &'static str,
    /// Token arrival times, ms from the prefill's start.
    token_ms: Vec<f64>,
    /// The first token after the throttle.
    throttled_at: usize,
    /// The token before which the generation last moved to a new plan, if it moved after the throttle.
    moved_at: Option<usize>,
}

fn main() {
    let size = std::env::var("LLNODE_BENCH_SIZE").unwrap_or_else(|_| "bench".into());
    let tokens = std::env::var("LLNODE_BENCH_TOKENS").unwrap_or_else(|_| "480".into());
    let unspared = std::env::var("LLNODE_BENCH_THROTTLE").is_ok_and(|v| v == "unspared");
    let root = tempfile::tempdir().unwrap();
    eprintln!("making the built-in `{size}` model…");
    ok(&["model", "synth", "--size", &size, "-o", s(&root.path().join("export"))]);
    let package = package_of(&root.path().join("export"), &root.path().join("package"));
    eprintln!("the reference answer, in one process…");
    let reference = ok(&["run", "-m", s(&package), "--max-tokens", &tokens, "--ignore-eos", PROMPT]);
    println!(
        "model: built-in {size}; 3 nodes on loopback; {tokens} greedy tokens; throttle 2x at a quarter of the answer"
    );

    let mut runs = Vec::new();
    let mut shares = Vec::new();
    // Whether another device kept the throttled stage's units as spares, per run.
    let mut spared_in = Vec::new();
    // With balancing: once released, how long until the throttled node's probes re-profile it.
    let mut recovered = None;
    for (label, extra) in [("without balancing", &["--no-rebalance"][..]), ("with balancing", &[][..])] {
        eprintln!("{label}: starting the mesh…");
        // Both runs must slow the same share of the model for their rates to
        // compare; plans come from measured speeds, so a mesh whose plan is
        // not the one wanted is started again.
        // Identical devices usually split the model evenly: the first run
        // waits for that plan, the second for the first run's.
        let first = shares.first().copied();
        let (mut mesh, slowed, share, spared) = mesh_throttling(&package, extra, label, |share, spared| {
            first.map_or(2 * share.0 == share.1, |first| first == share) && !(unspared && spared)
        });
        shares.push(share);
        spared_in.push(format!("{label}: {}", if spared { "yes" } else { "no" }));
        let (out, killed_or_throttled_ms) = prompt_with(&mut mesh, &tokens, reference.len() / 4, |mesh| {
            ok(&["throttle", "--data-dir", s(&mesh.nodes[slowed].dir), "2"]);
        });
        assert_eq!(out.stdout, reference, "{label}: the answer changed: {}", out.stderr);
        let token_ms = timings(&out.stderr);
        let throttled_at = token_ms.iter().position(|t| *t >= killed_or_throttled_ms).unwrap_or(token_ms.len());
        // The leader's history says what moved and why.
        let moves: Vec<String> = (0..3)
            .flat_map(|i| mesh.view(i)["history"].as_array().unwrap().clone())
            .filter_map(|h| h.as_str().filter(|h| h.contains("moving units")).map(str::to_string))
            .collect();
        let moved = moves.len();
        for line in &moves {
            eprintln!("{label}: {line}");
        }
        let resumed: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains("resumed on plan epoch") || l.contains("moved to plan epoch"))
            .map(|l| l.trim_start_matches("llnode: "))
            .collect();
        eprintln!(
            "{label}: n{slowed} throttled at token {throttled_at}; plans that moved units: {moved}; {}",
            resumed.join("; ")
        );
        assert!(
            !extra.is_empty() || moved > 0,
            "{label}: no plan moved units, so this run says nothing about the balancer; run the bench again"
        );
        // The first move after the throttle is the one that answers it.
        let moved_at = moves_at(&out.stderr).into_iter().find(|&k| k >= throttled_at);
        // When each step of a move happened, from the nodes' logs.
        for (i, node) in mesh.nodes.iter().enumerate() {
            for line in node.log().lines().filter(|l| TIMELINE.iter().any(|t| l.contains(t))) {
                eprintln!("{label}: n{i}: {line}");
            }
        }
        runs.push(Run { label, token_ms, throttled_at, moved_at });
        if extra.is_empty() {
            recovered = Some(release(&mesh, slowed));
        }
    }

    println!(
        "{:<18} {:>12} {:>20} {:>16} {:>18} {:>18} {:>18}",
        "",
        "before tok/s",
        "after throttle tok/s",
        "steady tok/s",
        "longest pause ms",
        "tokens until moved",
        "until recovered"
    );
    let (mut after, mut steady, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for run in &runs {
        let at = run.throttled_at.saturating_sub(1);
        let before = rate(&run.token_ms[1..run.throttled_at.max(2)]);
        let later = rate(&run.token_ms[at..]);
        let recovered = recovery(run);
        // Steady: from the move (or, never moving, from the throttle) to the end.
        let calm = rate(&run.token_ms[run.moved_at.unwrap_or(at)..]);
        let pause = run.token_ms[at..].windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
        let moved = run.moved_at.map_or("-".to_string(), |k| (k - run.throttled_at).to_string());
        let recovered = recovered.map_or("never".to_string(), |n| n.to_string());
        println!(
            "{:<18} {:>12.1} {:>20.1} {:>16.1} {:>18.0} {:>18} {:>18}",
            run.label, before, later, calm, pause, moved, recovered
        );
        after.push(later);
        steady.push(calm);
        kept.push(later / before);
    }
    assert_eq!(
        shares[0], shares[1],
        "the two runs throttled different shares of the model (units, total), so their rates do not compare; run the bench again"
    );
    println!("the throttled node ran {} of {} units in both runs", shares[0].0, shares[0].1);
    println!("another device kept them as spares (a move that loads nothing): {}", spared_in.join(", "));
    println!(
        "balancing gives {:.2}x the tokens/s over the rest of the answer, the pause included, and {:.2}x once moved (target >= 1.3x)",
        after[1] / after[0],
        steady[1] / steady[0]
    );
    // The two runs are two meshes, minutes apart; on a shared machine their
    // pace before the throttle can differ by a third, so each is also
    // measured against itself.
    println!(
        "each run against its own pace before the throttle: {:.2} of it kept without balancing, {:.2} with, {:.2}x",
        kept[0],
        kept[1],
        kept[1] / kept[0]
    );
    if let Some(line) = recovered {
        println!("{line}");
    }

    eprintln!("failover: starting the mesh…");
    // Without the balancer, so that the stage killed is one the generation runs on.
    let mut mesh = ready_mesh(&package, &["--no-rebalance"]);
    let victim = mesh.busiest_besides(ASKING);
    let mut killed_clock = String::new();
    let (out, killed_ms) = prompt_with(&mut mesh, &tokens, reference.len() / 2, |mesh| {
        killed_clock = utc_clock();
        mesh.nodes[victim].kill();
    });
    assert_eq!(out.stdout, reference, "failover: the answer changed: {}", out.stderr);
    assert!(out.stderr.contains("resumed on plan epoch"), "failover: the generation never moved: {}", out.stderr);
    let token_ms = timings(&out.stderr);
    // The stall: the longest interval from the one the kill fell in on; a step in flight may still land just after the kill.
    let first = token_ms.iter().position(|t| *t >= killed_ms).unwrap_or(token_ms.len() - 1).max(1);
    let end = (first..token_ms.len())
        .max_by(|&a, &b| (token_ms[a] - token_ms[a - 1]).total_cmp(&(token_ms[b] - token_ms[b - 1])))
        .unwrap_or(first);
    let next = token_ms[end] - killed_ms;
    // The last move is the kill's (an earlier one may be the balancer's).
    let resumed = out.stderr.lines().rfind(|l| l.contains("resumed on plan epoch")).unwrap_or("(no move reported)");
    println!(
        "kill -9 of a stage halfway: the stream went on {next:.0} ms after the kill ({})",
        resumed.trim_start_matches("llnode: ")
    );
    eprintln!("failover: n{victim} killed at {killed_clock}");
    for (i, node) in mesh.nodes.iter().enumerate().filter(|(i, _)| *i != victim) {
        for line in node.log().lines().filter(|l| FAILOVER_TIMELINE.iter().any(|t| l.contains(t))) {
            eprintln!("failover: n{i}: {line}");
        }
    }
    mesh.nodes.truncate(0);

    let path = draw(&runs);
    println!("plot: {}", path.display());
}

/// Takes the throttle off node `slowed` with no prompt running: no step of
/// its own can time it, so its probes must find it back at full speed. Says
/// after how long they re-profiled it and what it runs then.
fn release(mesh: &Mesh, slowed: usize) -> String {
    let probed = |i: usize| mesh.view(i)["history"].to_string().contains("arithmetic probe");
    let before = units_of(&mesh.view(ASKING), &mesh.nodes[slowed].peer_id);
    ok(&["throttle", "--data-dir", s(&mesh.nodes[slowed].dir), "1"]);
    let released = Instant::now();
    while !probed(slowed) && released.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if !probed(slowed) {
        return format!("released from the throttle, n{slowed} was not re-profiled by its probes in 60 s");
    }
    let secs = released.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let after = units_of(&mesh.view(ASKING), &mesh.nodes[slowed].peer_id);
    format!(
        "released from the throttle with no prompt running, n{slowed} was re-profiled by its probes after {secs:.1} s; it ran {before} units then, {after} two seconds later"
    )
}

/// A ready mesh and its busiest stage besides the asking member, with the
/// (units it runs, units in all) of the plan; meshes whose share, and
/// whether another device keeps that stage's units as spares, are not
/// `wanted` are started again, up to [`MESH_TRIES`] in all.
fn mesh_throttling(
    package: &Path,
    extra: &[&str],
    label: &str,
    wanted: impl Fn((u64, u64), bool) -> bool,
) -> (Mesh, usize, (u64, u64), bool) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mesh = ready_mesh(package, extra);
        let slowed = mesh.busiest_besides(ASKING);
        let view = mesh.view(ASKING);
        let share = (
            units_of(&view, &mesh.nodes[slowed].peer_id),
            mesh.nodes.iter().map(|n| units_of(&view, &n.peer_id)).sum(),
        );
        let spared = spared(&view, &mesh.nodes[slowed].peer_id);
        let spares = if spared { "another device keeps them as spares" } else { "no other device keeps them" };
        eprintln!("{label}: n{slowed} runs {} of {} units, {spares} (mesh {attempt})", share.0, share.1);
        if wanted(share, spared) || attempt == MESH_TRIES {
            return (mesh, slowed, share, spared);
        }
    }
}

/// Whether a device other than `peer` keeps every stage of `peer`'s as
/// spares in the plan `view` shows: a move of them onto it loads nothing.
fn spared(view: &serde_json::Value, peer: &str) -> bool {
    let range = |v: &serde_json::Value| v["units"]["start"].as_u64().unwrap()..v["units"]["end"].as_u64().unwrap();
    let spares = view["plan"]["spares"].as_array().cloned().unwrap_or_default();
    view["plan"]["stages"].as_array().unwrap().iter().filter(|st| st["device"] == peer).all(|st| {
        let units = range(st);
        spares.iter().any(|sp| sp["device"] != peer && range(sp).start <= units.start && units.end <= range(sp).end)
    })
}

/// Three nodes, any two of which hold the model, after a warm-up prompt
/// (the first steps re-profile the devices) and a steady plan.
fn ready_mesh(package: &Path, extra: &[&str]) -> Mesh {
    let mesh = Mesh::with_args(package, 3, 3, &share_of(package, 0.55), extra);
    ok(&["prompt", "--data-dir", s(&mesh.nodes[ASKING].dir), "--max-tokens", "32", "--ignore-eos", PROMPT]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    mesh.wait_for_plan();
    mesh
}

/// Runs the prompt, doing `act` once `at_bytes` of the answer have come;
/// returns the output and when `act` happened on the prompt's clock (ms).
fn prompt_with(mesh: &mut Mesh, tokens: &str, at_bytes: usize, act: impl FnOnce(&mut Mesh)) -> (support::Output, f64) {
    let mut prompt =
        Streaming::start(&mesh.nodes[ASKING].dir, &["--max-tokens", tokens, "--ignore-eos", "--timings", PROMPT]);
    prompt.read_at_least(1);
    // The first text comes with the first token: that aligns the two clocks.
    let first_text = Instant::now();
    prompt.read_at_least(at_bytes);
    act(mesh);
    let since_first = first_text.elapsed().as_secs_f64() * 1e3;
    let out = prompt.finish();
    let first_token_ms = timings(&out.stderr).first().copied().unwrap_or(0.0);
    (out, first_token_ms + since_first)
}

/// The time of day, UTC, as the nodes' logs write it (`14:13:22.581`).
fn utc_clock() -> String {
    let ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()) % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
}

fn timings(stderr: &str) -> Vec<f64> {
    let line =
        stderr.lines().find_map(|l| l.strip_prefix("timings_ms: ")).unwrap_or_else(|| panic!("no timings: {stderr}"));
    line.split_whitespace().map(|t| t.parse().unwrap()).collect()
}

/// Tokens per second over arrival times.
fn rate(times: &[f64]) -> f64 {
    match times {
        [first, .., last] if last > first => (times.len() - 1) as f64 / (last - first) * 1e3,
        _ => f64::NAN,
    }
}

/// The tokens before which the generation moved to a new plan live (`moved
/// to plan epoch E after K token(s)`).
fn moves_at(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| {
            l.split_once("moved to plan epoch ")?.1.split_once(" after ")?.1.split_once(" token")?.0.parse().ok()
        })
        .collect()
}

/// Tokens after the throttle until the pace has recovered: a window of
/// intervals whose median is within 15% of the pace just before the throttle
/// (the median of the window that ends there), with no pause in it (no
/// interval over three times that pace). Not against the pace the answer
/// ends at: tokens slow as the context grows, so the last third's pace is
/// nearer the throttled one than the start's, and a run that never recovered
/// could count as settled at once.
fn recovery(run: &Run) -> Option<usize> {
    let intervals: Vec<f64> = run.token_ms.windows(2).map(|w| w[1] - w[0]).collect();
    let start = run.throttled_at.checked_sub(1)?;
    let before = median(intervals.get(start.checked_sub(WINDOW)?..start)?.to_vec());
    (start..intervals.len().saturating_sub(WINDOW))
        .find(|&i| {
            let window = &intervals[i..i + WINDOW];
            median(window.to_vec()) <= before * 1.15 && window.iter().all(|t| *t <= before * 3.0)
        })
        .map(|i| i - start)
}

/// Tokens/s over time (a moving window of `WINDOW` tokens) for each run,
/// with the moment of the throttle marked.
fn draw(runs: &[Run]) -> PathBuf {
    let (left, top, width, height) = (60.0, 40.0, 640.0, 260.0);
    let series: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            r.token_ms
                .windows(WINDOW + 1)
                .map(|w| (w[WINDOW] / 1e3, WINDOW as f64 / (w[WINDOW] - w[0]) * 1e3))
                .collect()
        })
        .collect();
    let max_t = series.iter().flatten().map(|p| p.0).fold(1.0f64, f64::max);
    let max_r = series.iter().flatten().map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
    let x = |t: f64| left + t / max_t * width;
    let y = |r: f64| top + height - r / max_r * height;
    let colours = ["#f58518", "#4c78a8"];
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        left + width + 180.0,
        top + height + 50.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="20" font-size="13">Tokens/s over time; one stage throttled 2x (dashed line)</text>"#
    );
    let _ = writeln!(svg, r##"<line x1="{left}" x2="{left}" y1="{top}" y2="{}" stroke="#000"/>"##, top + height);
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" x2="{}" y1="{b}" y2="{b}" stroke="#000"/>"##,
        left + width,
        b = top + height
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds</text>"#,
        left + width / 2.0,
        top + height + 35.0
    );
    let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="end">{max_r:.0} tok/s</text>"#, left - 6.0, top + 4.0);
    for second in (0..=max_t as usize).step_by((max_t / 10.0).ceil().max(1.0) as usize) {
        let tx = x(second as f64);
        let _ = writeln!(svg, r#"<text x="{tx}" y="{}" text-anchor="middle">{second}</text>"#, top + height + 15.0);
    }
    for (k, (run, points)) in runs.iter().zip(&series).enumerate() {
        let line: Vec<String> = points.iter().map(|(t, r)| format!("{:.1},{:.1}", x(*t), y(*r))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            colours[k % 2],
            line.join(" ")
        );
        if let Some(t) = run.token_ms.get(run.throttled_at) {
            let _ = writeln!(
                svg,
                r#"<line x1="{tx}" x2="{tx}" y1="{top}" y2="{}" stroke="{}" stroke-dasharray="4 3"/>"#,
                top + height,
                colours[k % 2],
                tx = x(t / 1e3)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{}">{}</text>"#,
            left + width + 10.0,
            top + 20.0 + 16.0 * k as f64,
            colours[k % 2],
            run.label
        );
    }
    support::write_plot("bench-balance.svg", svg)
}
