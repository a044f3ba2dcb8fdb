//! `llnode prompt` across meshes of real processes: the text equals what
//! `llnode run` prints in one process, greedy and sampled, from any member,
//! for the built-in model and the GPT-2, Llama, Qwen2 and BLOOM test exports,
//! and with several prompts at once.

#[path = "support.rs"]
mod support;

use std::path::Path;

use support::{Mesh, llnode, ok, package_of, s, share_of};

const GREEDY: [&str; 4] = ["--max-tokens", "24", "--ignore-eos", "The mesh of phones"];
const SAMPLED: [&str; 11] = ["--max-tokens", "24", "--ignore-eos", "--temperature", "0.9", "--top-k", "40", "--seed", "7", "--top-p", "0.95"];

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
