//! `llnode prompt` across meshes of real processes: the text equals what
//! `llnode run` prints in one process, greedy and sampled, from any member,
//! for the built-in model and the GPT-2, Llama, Qwen2 and BLOOM test exports,
//! and with several prompts at once.

#[path = "support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Node, admit, llnode, ok, s};

/// A mesh of `n` nodes on `package`, each offering `memory`, once they agree on a plan.
struct Mesh {
    nodes: Vec<Node>,
    _root: tempfile::TempDir,
}

impl Mesh {
    fn start(package: &Path, n: usize, memory: &str) -> Mesh {
        let root = tempfile::tempdir().unwrap();
        let dir = |i: usize| root.path().join(format!("n{i}"));
        ok(&["mesh", "init", "--data-dir", s(&dir(0)), "--name", "n0"]);
        for i in 1..n {
            admit(&dir(0), &dir(i), &format!("n{i}"), "1d");
        }
        let args = ["--model", s(package), "--memory", memory];
        let first = Node::start_with(&dir(0), &[], &args);
        let mut nodes = vec![first];
        for i in 1..n {
            let node = Node::start_with(&dir(i), &[&nodes[0]], &args);
            nodes.push(node);
        }
        let mesh = Mesh { nodes, _root: root };
        mesh.wait_for_plan(n);
        mesh
    }

    /// Every node holds the same plan, made with all `n` members live, and
    /// it stays the same for a second (links are measured once members meet).
    fn wait_for_plan(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stable: Option<(Value, Instant)> = None;
        loop {
            let views: Vec<Value> = self
                .nodes
                .iter()
                .map(|node| serde_json::from_str(&ok(&["plan", "--json", "--data-dir", s(&node.dir)])).unwrap())
                .collect();
            let agreed = views.windows(2).all(|w| w[0]["epoch"] == w[1]["epoch"])
                && views.iter().all(|v| !v["plan"].is_null() && v["members"].as_array().unwrap().len() == n - 1);
            if agreed {
                let stages = views[0]["plan"]["stages"].as_array().unwrap().len();
                assert!(stages >= 2, "the memory cap should force a split: {:#}", views[0]);
                match &stable {
                    Some((epoch, since)) if *epoch == views[0]["epoch"] => {
                        if since.elapsed() > Duration::from_secs(1) {
                            return;
                        }
                    }
                    _ => stable = Some((views[0]["epoch"].clone(), Instant::now())),
                }
            }
            assert!(Instant::now() < deadline, "no agreed plan: {views:#?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn prompt(&self, i: usize, args: &[&str]) -> String {
        let mut all = vec!["prompt", "--data-dir", s(&self.nodes[i].dir)];
        all.extend_from_slice(args);
        ok(&all)
    }
}

fn package_of(export: &Path, out: &Path) -> PathBuf {
    ok(&["import", s(export), "-o", s(out)]);
    out.to_path_buf()
}

/// Memory that holds about `share` of the model (weights and a 1024-token KV cache).
fn share_of(package: &Path, share: f64) -> String {
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(package.join("manifest.json")).unwrap()).unwrap();
    let need: u64 = manifest["cost"]["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["weight_bytes"].as_u64().unwrap() + 1024 * u["kv_bytes_per_token"].as_u64().unwrap())
        .sum();
    format!("{}", (need as f64 * share) as u64)
}

const GREEDY: [&str; 4] = ["--max-tokens", "24", "--ignore-eos", "The mesh of phones"];
const SAMPLED: [&str; 11] =
    ["--max-tokens", "24", "--ignore-eos", "--temperature", "0.9", "--top-k", "40", "--seed", "7", "--top-p", "0.95"];

#[test]
fn built_in_model_answers_the_same_from_every_member() {
    let root = tempfile::tempdir().unwrap();
    ok(&["model", "synth", "-o", s(&root.path().join("export"))]);
    let package = package_of(&root.path().join("export"), &root.path().join("tiny"));
    let mut run = vec!["run", "-m", s(&package)];
    run.extend_from_slice(&GREEDY);
    let reference = ok(&run);
    let mut sampled_run = vec!["run", "-m", s(&package)];
    sampled_run.extend_from_slice(&SAMPLED);
    sampled_run.push("The mesh of phones");
    let sampled_reference = ok(&sampled_run);
    assert_ne!(reference, sampled_reference);

    let mesh = Mesh::start(&package, 3, &share_of(&package, 0.55));
    for i in 0..3 {
        assert_eq!(mesh.prompt(i, &GREEDY), reference, "greedy from member {i}");
    }
    let mut sampled = SAMPLED.to_vec();
    sampled.push("The mesh of phones");
    assert_eq!(mesh.prompt(1, &sampled), sampled_reference);

    // Three prompts at once, from three members.
    std::thread::scope(|scope| {
        let mesh = &mesh;
        let handles: Vec<_> = (0..3).map(|i| scope.spawn(move || mesh.prompt(i, &GREEDY))).collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), reference);
        }
    });

    // Bad input: one error line, and the node keeps serving.
    let bad = llnode(&["prompt", "--data-dir", s(&mesh.nodes[0].dir), "--top-p", "0", "hi"]);
    assert!(!bad.ok && bad.stderr.lines().count() == 1 && bad.stderr.contains("top-p"), "{}", bad.stderr);
    assert_eq!(mesh.prompt(0, &GREEDY), reference);
    drop(mesh);

    // Two and four nodes.
    for (n, share) in [(2, 0.6), (4, 0.3)] {
        let mesh = Mesh::start(&package, n, &share_of(&package, share));
        assert_eq!(mesh.prompt(n - 1, &GREEDY), reference, "{n} nodes");
    }
}

#[test]
fn test_exports_answer_the_same_across_the_mesh() {
    let exports = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/testdata/exports");
    let root = tempfile::tempdir().unwrap();
    for family in ["gpt2", "llama", "qwen2", "bloom"] {
        let package = package_of(&exports.join(family), &root.path().join(family));
        let mut run = vec!["run", "-m", s(&package)];
        run.extend_from_slice(&GREEDY);
        let reference = ok(&run);
        let mesh = Mesh::start(&package, 3, &share_of(&package, 0.55));
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
