//! `llnode prompt` across meshes of real processes: the text equals what
//! `llnode run` prints in one process, greedy and sampled, from any member,
//! for the built-in model and the GPT-2, Llama, Qwen2 and BLOOM test exports,
//! and with several prompts at once; a full device or node answers "busy",
//! and an asker that goes away leaves no caches behind.

#[path = "support.rs"]
mod support;

use std::path::Path;

use support::{Mesh, Streaming, alone, built_in, llnode, median, ok, package_of, s, share_of, stat, units_of};

const GREEDY: [&str; 4] = ["--max-tokens", "24", "--ignore-eos", "The mesh of phones"];
/// An answer long enough to keep a throttled mesh busy while others ask.
const LONG: [&str; 4] = ["--max-tokens", "300", "--ignore-eos", "The mesh of phones"];
const SAMPLED: [&str; 11] =
    ["--max-tokens", "24", "--ignore-eos", "--temperature", "0.9", "--top-k", "40", "--seed", "7", "--top-p", "0.95"];

#[test]
fn built_in_model_answers_the_same_from_every_member() {
    let root = tempfile::tempdir().unwrap();
    let package = built_in(root.path());
    let reference = alone(&package, &GREEDY);
    let sampled_reference = alone(&package, &[&SAMPLED[..], &["The mesh of phones"]].concat());
    assert_ne!(reference, sampled_reference);

    let mesh = Mesh::start(&package, 3, &share_of(&package, 0.55));
    for i in 0..3 {
        assert_eq!(mesh.prompt(i, &GREEDY), reference, "greedy from member {i}");
    }
    let mut sampled = SAMPLED.to_vec();
    sampled.push("The mesh of phones");
    assert_eq!(mesh.prompt(1, &sampled), sampled_reference);
    // Greedy and top-k runs get only the highest logits back; a repetition
    // penalty needs every one of them.
    let penalised = [&["--repetition-penalty", "1.3"][..], &GREEDY[..]].concat();
    let penalised_reference = alone(&package, &penalised);
    assert_ne!(penalised_reference, reference);
    assert_eq!(mesh.prompt(1, &penalised), penalised_reference);

    // Three prompts at once, from three members.
    std::thread::scope(|scope| {
        let mesh = &mesh;
        let handles: Vec<_> = (0..3).map(|i| scope.spawn(move || mesh.prompt(i, &GREEDY))).collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), reference);
        }
    });

    // Privacy mode from member 2: the plan now keeps the first and last units
    // (token ids in, logits out) on it, others run the middle, and the text is
    // the same; the other members are served by that plan too.
    let private = [&["--private"][..], &GREEDY[..]].concat();
    assert_eq!(mesh.prompt(2, &private), reference);
    let view = mesh.view(2);
    let stages = view["plan"]["stages"].as_array().unwrap();
    let asker = mesh.nodes[2].peer_id.as_str();
    assert!(
        stages.len() >= 3 && stages[0]["device"] == asker && stages[stages.len() - 1]["device"] == asker,
        "{view:#}"
    );
    assert!(stages[1..stages.len() - 1].iter().all(|st| st["device"] != asker), "{view:#}");
    assert_eq!(mesh.prompt(0, &GREEDY), reference);
    assert_eq!(mesh.prompt(2, &private), reference);

    // Bad input: one error line, and the node keeps serving.
    let bad = llnode(&["prompt", "--data-dir", s(&mesh.nodes[0].dir), "--top-p", "0", "hi"]);
    assert!(!bad.ok && bad.stderr.lines().count() == 1 && bad.stderr.contains("top-p"), "{}", bad.stderr);
    assert_eq!(mesh.prompt(0, &GREEDY), reference);
    drop(mesh);

    // Two and four nodes. `--stats` splits a decode step's time into the
    // stages' compute and the rest, which add up to about a token's time;
    // the compute is every stage's: a first stage slowed down (with the plan
    // kept as it is) adds to it, not to the rest.
    for (n, share) in [(2, 0.6), (4, 0.3)] {
        let mesh = Mesh::with_args(&package, n, n, &share_of(&package, share), &["--no-rebalance"]);
        assert_eq!(mesh.prompt(n - 1, &GREEDY), reference, "{n} nodes");
        let (compute, handoff) = step_times(&mesh, n - 1);
        let view = mesh.view(n - 1);
        let first = view["plan"]["stages"][0]["device"].as_str().unwrap();
        let first = mesh.nodes.iter().find(|node| node.peer_id == first).unwrap();
        ok(&["throttle", "--data-dir", s(&first.dir), "8"]);
        let (slowed, slowed_handoff) = step_times(&mesh, n - 1);
        assert!(
            slowed > compute + handoff && slowed_handoff < slowed,
            "{n} nodes: {compute} ms of compute and {handoff} ms besides, then {slowed} and {slowed_handoff}"
        );
    }
}

/// A decode step's compute in the stages and the rest of its time (ms), as
/// `llnode prompt --stats` from node `i` says, once they are seen to add up
/// to about a token's time (medians: on a busy machine a few tokens take
/// many times as long as the rest).
fn step_times(mesh: &Mesh, i: usize) -> (f64, f64) {
    let args = ["prompt", "--data-dir", s(&mesh.nodes[i].dir), "--stats", "--timings"];
    let err = llnode(&[&args[..], &GREEDY].concat()).stderr;
    let timings = err.lines().find_map(|l| l.strip_prefix("timings_ms:")).unwrap_or_else(|| panic!("{err}"));
    let came: Vec<f64> = timings.split_whitespace().map(|t| t.parse().unwrap()).collect();
    let token = median(came.windows(2).map(|pair| pair[1] - pair[0]).collect());
    let (compute, handoff) = (stat(&err, "decode_compute_ms"), stat(&err, "decode_handoff_ms"));
    assert!(
        compute > 0.0 && handoff > 0.0 && (0.5 * token..1.5 * token).contains(&(compute + handoff)),
        "{err} (a token: {token} ms)"
    );
    (compute, handoff)
}

/// A device at its session limit (`--max-sessions`): a prompt that needs it
/// is answered "busy, retry" at once, from any member, wherever the device
/// is in the pipeline: also when the tensor it refuses came from another
/// stage, not from the prompt's initiator. So is a prompt to a node that
/// already runs as many as it may start (`--max-prompts`). The prompt served
/// finishes, and a retry after that is answered.
#[test]
fn a_device_at_its_session_limit_answers_busy_and_serves_on() {
    let root = tempfile::tempdir().unwrap();
    let package = built_in(root.path());
    let reference = alone(&package, &GREEDY);
    let long_reference = alone(&package, &LONG);
    // Every node starts one prompt at a time and runs 10x slowly, so a long
    // answer keeps each device of its plan busy. n0 and n1 keep one session, n2 two.
    let memory = share_of(&package, 0.55);
    let node = |sessions: &str| {
        let args = [
            "--memory",
            &memory,
            "--model",
            s(&package),
            "--max-sessions",
            sessions,
            "--max-prompts",
            "1",
            "--throttle",
            "10",
            "--no-rebalance",
        ];
        args.map(String::from).to_vec()
    };
    let mesh = Mesh::with_node_args(vec![node("1"), node("1"), node("2")]);

    // A private prompt from n2 makes the plan start and end on n2, with the
    // middle on n0 or n1 or both (as `built_in_model_answers_the_same_from_every_member` checks).
    assert_eq!(mesh.prompt(2, &[&["--private"][..], &GREEDY[..]].concat()), reference);
    let view = mesh.view(2);
    let stages = view["plan"]["stages"].as_array().unwrap();
    let device = |peer: &serde_json::Value| mesh.nodes.iter().position(|n| *peer == n.peer_id.as_str()).unwrap();
    assert!(device(&stages[0]["device"]) == 2 && device(&stages[stages.len() - 1]["device"]) == 2, "{view:#}");
    // The long answer comes from the device after n2, which then holds its
    // one session; n2 has room for another.
    let (first, other) = match device(&stages[1]["device"]) {
        0 => (0, 1),
        1 => (1, 0),
        n => panic!("n{n} runs the middle of a private plan: {view:#}"),
    };
    let mut serving = Streaming::start(&mesh.nodes[first].dir, &LONG);
    serving.read_at_least(1);
    for (asker, full) in [
        // Its own limit on prompts answers first.
        (first, "this node already runs 1 prompt(s) at once"),
        // n2 takes the step and sends on; `first` refuses it and tells the asker.
        (other, "this device holds 1 session(s) at once"),
        // n2 runs the first stage itself and hears the refusal in the acknowledgement.
        (2, "this device holds 1 session(s) at once"),
    ] {
        let started = std::time::Instant::now();
        let refused = llnode(&[&["prompt", "--data-dir", s(&mesh.nodes[asker].dir)][..], &GREEDY[..]].concat());
        let said = refused.stderr.trim();
        assert!(
            !refused.ok && said.contains(full) && said.contains("retry") && said.lines().count() == 1,
            "from n{asker}: {said}"
        );
        // Not the 120 s a step waits for logits.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "n{asker} waited {:?} for: {said}",
            started.elapsed()
        );
    }
    let served = serving.finish();
    assert!(served.ok, "{}", served.stderr);
    assert_eq!(served.stdout, long_reference);
    assert_eq!(mesh.prompt(other, &GREEDY), reference);
    assert_eq!(mesh.prompt(first, &GREEDY), reference);
}

/// An asker that goes away mid-answer frees its sessions' caches on every
/// device: when `llnode prompt` is stopped, its node stops generating; when
/// the asking node itself dies, the devices drop its sessions. Each device
/// keeps one session, so another member's prompt is answered only once they are freed.
#[test]
fn an_asker_that_goes_away_frees_its_sessions() {
    let root = tempfile::tempdir().unwrap();
    let package = built_in(root.path());
    let reference = alone(&package, &GREEDY);
    // n0-n2 run the model and keep one session each; n3 has memory for no
    // unit: it only asks, so the plan outlives it.
    let memory = share_of(&package, 0.55);
    let device =
        ["--memory", &memory, "--model", s(&package), "--max-sessions", "1", "--throttle", "10", "--no-rebalance"]
            .map(String::from);
    let asker = ["--memory", "1000", "--no-rebalance"].map(String::from).to_vec();
    let mut mesh = Mesh::with_node_args(vec![device.to_vec(), device.to_vec(), device.to_vec(), asker]);
    assert_eq!(units_of(&mesh.view(0), &mesh.nodes[3].peer_id), 0);
    let answered_from_n0 = |mesh: &Mesh| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = llnode(&[&["prompt", "--data-dir", s(&mesh.nodes[0].dir)][..], &GREEDY[..]].concat());
            if out.ok {
                assert_eq!(out.stdout, reference);
                return;
            }
            // Busy while the sessions are held; the plan may also be moving after n3 left.
            assert!(std::time::Instant::now() < deadline, "{}", out.stderr);
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };

    // `llnode prompt` stopped after its first words.
    let mut serving = Streaming::start(&mesh.nodes[3].dir, &LONG);
    serving.read_at_least(1);
    serving.kill();
    answered_from_n0(&mesh);
    let log = mesh.nodes[3].log();
    let stopped =
        log.lines().find(|l| l.contains("the asker went away after")).unwrap_or_else(|| panic!("n3 went on: {log}"));
    let steps: usize =
        stopped.split("after ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(steps < 300, "{stopped}");

    // The asking node killed.
    let mut serving = Streaming::start(&mesh.nodes[3].dir, &LONG);
    serving.read_at_least(1);
    mesh.nodes[3].kill();
    assert!(!serving.finish().ok);
    answered_from_n0(&mesh);
}

#[test]
fn test_exports_answer_the_same_across_the_mesh() {
    let exports = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/testdata/exports");
    let root = tempfile::tempdir().unwrap();
    for family in ["gpt2", "llama", "qwen2", "bloom"] {
        let package = package_of(&exports.join(family), &root.path().join(family));
        let reference = alone(&package, &GREEDY);
        // Only the first node has the package: the others fetch their units.
        let mesh = Mesh::with_sources(&package, 3, 1, &share_of(&package, 0.55));
        assert_eq!(mesh.prompt(1, &GREEDY), reference, "{family}");
    }
}

/// The README's main job: three node processes, a plan, an answer, a clean stop.
#[test]
fn demo_runs_a_mesh_and_answers_like_one_process() {
    let root = tempfile::tempdir().unwrap();
    let out = ok(&["demo", "--data-dir", s(root.path())]);
    let answer = out.lines().find_map(|l| l.strip_prefix("answer: ")).unwrap_or_else(|| panic!("no answer: {out}"));
    let package = root.path().join("builtin-tiny");
    let run = ok(&["run", "-m", s(&package), "--max-tokens", "24", "The mesh of phones"]);
    assert_eq!(answer, run.trim_end_matches('\n'), "{out}");
    assert!(out.contains("leader:") && out.contains("stage") && out.contains("per token"), "{out}");
    // The nodes are gone: their control sockets no longer answer.
    let peers = llnode(&["peers", "--data-dir", s(&root.path().join("demo-mesh/node1"))]);
    assert!(!peers.ok && peers.stderr.contains("no node is running"), "{}", peers.stderr);
}

#[test]
fn a_prompt_for_another_model_moves_the_mesh_to_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = |name: &str| root.path().join(name);
    // Two built-in models that answer differently; n0 serves one, n1 the other, n2 neither.
    let package = |seed: &str, name: &str| {
        ok(&["model", "synth", "--seed", seed, "-o", s(&dir(name))]);
        package_of(&dir(name), &dir(&format!("{name}-package")))
    };
    let (first, second) = (package("0", "first"), package("1", "second"));
    let answer = |p: &Path| alone(p, &GREEDY);
    let (first_text, second_text) = (answer(&first), answer(&second));
    assert_ne!(first_text, second_text);
    let id = |p: &Path| ok(&["model", "verify", s(p)]).split_whitespace().last().unwrap().to_string();
    let (first_id, second_id) = (id(&first), id(&second));

    let memory = share_of(&first, 0.55);
    let node = |model: Option<&Path>| {
        let mut args = vec!["--memory".to_string(), memory.clone()];
        args.extend(model.map(|p| ["--model".to_string(), s(p).to_string()]).into_iter().flatten());
        args
    };
    let mesh = Mesh::with_node_args(vec![node(Some(&first)), node(Some(&second)), node(None)]);
    let ask = |i: usize, model: &str| mesh.prompt(i, &[&["--model", &model[..8]][..], &GREEDY[..]].concat());
    let plan_model = |i: usize| mesh.view(i)["model"].as_str().unwrap_or_default().to_string();

    // Whichever model the leader started with, each prompt gets the one it names.
    assert_eq!(ask(2, &second_id), second_text);
    assert_eq!(plan_model(2), second_id);
    assert_eq!(ask(2, &first_id), first_text);
    assert_eq!(plan_model(0), first_id);
    assert_eq!(ask(1, &second_id), second_text);
    // Without --model, the model the mesh runs now.
    assert_eq!(mesh.prompt(0, &GREEDY), second_text);

    // A model nobody has: one line naming what the mesh has.
    let wrong = llnode(&["prompt", "--data-dir", s(&mesh.nodes[2].dir), "--model", "ffff", "hi"]);
    assert!(
        !wrong.ok && wrong.stderr.lines().count() == 1 && wrong.stderr.contains("no member has model ffff"),
        "{}",
        wrong.stderr
    );
    assert!(wrong.stderr.contains(&first_id[..12]) && wrong.stderr.contains(&second_id[..12]), "{}", wrong.stderr);
}
