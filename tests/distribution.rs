//! Model distribution across meshes of real processes: a node without the
//! package fetches exactly the unit files its stages need, verified against
//! the manifest's hashes; a member whose copy is damaged is caught and the
//! bytes come from another; a device outside the mesh gets nothing.

#[path = "support.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Mesh, Node, Streaming, admit, alone, llnode, ok, s, share_of};

const GREEDY: [&str; 4] = ["--max-tokens", "16", "--ignore-eos", "The mesh of phones"];

fn built_in(root: &Path) -> (PathBuf, String, Value) {
    let package = support::built_in(root);
    let reference = alone(&package, &GREEDY);
    let manifest = serde_json::from_str(&std::fs::read_to_string(package.join("manifest.json")).unwrap()).unwrap();
    (package, reference, manifest)
}

fn plan(node: &Node) -> Value {
    serde_json::from_str(&ok(&["plan", "--json", "--data-dir", s(&node.dir)])).unwrap()
}

/// Every file under `dir`, relative, except unfinished fetches.
fn files_under(dir: &Path) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let rel = entry.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if entry.path().is_dir() {
                if rel != ".partial" {
                    stack.push(entry.path());
                }
            } else {
                files.insert(rel);
            }
        }
    }
    files
}

/// What a device running `units` needs from the package.
fn unit_files(manifest: &Value, units: &[(u64, u64)]) -> BTreeSet<String> {
    let mut files = BTreeSet::from(["manifest.json".to_string()]);
    for &(start, end) in units {
        for u in &manifest["units"].as_array().unwrap()[start as usize..end as usize] {
            files.insert(u["file"].as_str().unwrap().to_string());
            files.extend(u["weights"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()));
        }
    }
    files
}

/// The files on disk match the manifest's hashes.
fn assert_verified(dir: &Path, manifest: &Value, files: &BTreeSet<String>) {
    for file in files.iter().filter(|f| *f != "manifest.json") {
        let hash = blake3::hash(&std::fs::read(dir.join(file)).unwrap()).to_hex().to_string();
        assert_eq!(manifest["files"][file]["blake3"].as_str(), Some(hash.as_str()), "{file}");
    }
}

#[test]
fn a_node_without_the_model_fetches_only_its_own_units() {
    let root = tempfile::tempdir().unwrap();
    let (package, reference, manifest) = built_in(root.path());
    let id = ok(&["model", "verify", s(&package)]).split_whitespace().last().unwrap().to_string();
    // Each node holds half the model (the tied embedding counts on both ends): all three run units. Only n0 has the package.
    let mesh = Mesh::with_sources(&package, 3, 1, &share_of(&package, 0.5));
    // n2 never had the model; it asks, so it also needs the tokenizer and configs.
    assert_eq!(mesh.prompt(2, &GREEDY), reference);

    let view = plan(&mesh.nodes[0]);
    let stages = view["plan"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3, "{view:#}");
    for (i, node) in mesh.nodes.iter().enumerate().skip(1) {
        let units: Vec<(u64, u64)> = stages
            .iter()
            .filter(|st| st["device"] == node.peer_id.as_str())
            .map(|st| (st["units"]["start"].as_u64().unwrap(), st["units"]["end"].as_u64().unwrap()))
            .collect();
        assert!(!units.is_empty(), "n{i} runs units: {view:#}");
        // Plus the spare units the plan asks it to keep for failover, if any.
        let spares: Vec<(u64, u64)> = view["plan"]["spares"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|sp| sp["device"] == node.peer_id.as_str())
            .map(|sp| (sp["units"]["start"].as_u64().unwrap(), sp["units"]["end"].as_u64().unwrap()))
            .collect();
        let mut expected = unit_files(&manifest, &[units.clone(), spares].concat());
        if i == 2 {
            for side in ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"] {
                if manifest["files"].get(side).is_some() {
                    expected.insert(side.to_string());
                }
            }
        }
        let dir = node.dir.join("models").join(id.trim());
        // Spares come in the background, after a device's own units.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut on_disk = files_under(&dir);
        while on_disk != expected && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
            on_disk = files_under(&dir);
        }
        assert_eq!(on_disk, expected, "n{i} holds exactly its units' files (and spares)");
        assert_verified(&dir, &manifest, &on_disk);
    }
    // The source's package is its own: nothing was copied into its store.
    assert!(!mesh.nodes[0].dir.join("models").join(id.trim()).exists());

    // Asking for a model the mesh does not run: one line saying so.
    let wrong = llnode(&["prompt", "--data-dir", s(&mesh.nodes[1].dir), "--model", "ffff", "hi"]);
    assert!(
        !wrong.ok && wrong.stderr.lines().count() == 1 && wrong.stderr.contains("no member has model ffff"),
        "{}",
        wrong.stderr
    );
    let prefix = &id.trim()[..8];
    let mut right = vec!["prompt", "--data-dir", s(&mesh.nodes[1].dir), "--model", prefix];
    right.extend_from_slice(&GREEDY);
    assert_eq!(ok(&right), reference);
}

#[test]
fn a_damaged_copy_is_caught_and_the_bytes_come_from_another_member() {
    let root = tempfile::tempdir().unwrap();
    let (package, reference, manifest) = built_in(root.path());
    let dir = |name: &str| root.path().join(name);
    ok(&["mesh", "init", "--data-dir", s(&dir("a")), "--name", "a"]);
    admit(&dir("a"), &dir("b"), "b", "1d");
    admit(&dir("a"), &dir("c"), "c", "1d");

    // a serves a copy of the package that rots on disk after a checked it at
    // start; a and b offer too little memory to run anything, so c runs it all.
    let copy = dir("a-copy");
    std::fs::create_dir_all(copy.join("units")).unwrap();
    std::fs::create_dir_all(copy.join("weights")).unwrap();
    for file in manifest["files"].as_object().unwrap().keys().chain(["manifest.json".to_string()].iter()) {
        std::fs::copy(package.join(file), copy.join(file)).unwrap();
    }
    let a = Node::start_with(&dir("a"), &[], &["--model", s(&copy), "--memory", "1000"]);
    for entry in std::fs::read_dir(copy.join("weights")).unwrap().flatten() {
        let mut bytes = std::fs::read(entry.path()).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(entry.path(), bytes).unwrap();
    }
    let c = Node::start_with(&dir("c"), &[&a], &[]);
    // A device outside the mesh that dials in.
    let outsider = Node::start_with(&dir("outsider"), &[&a], &[]);

    // With only the damaged copy around, c refuses every weights file it gets.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fetch = plan(&c)["fetch"].as_str().unwrap_or_default().to_string();
        if fetch.contains("failed verification") {
            assert!(fetch.contains("fetch failed"), "{fetch}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c never noticed the damaged copy: {fetch}\n{}",
            std::fs::read_to_string(dir("c").with_extension("log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let failed = llnode(&["prompt", "--data-dir", s(&c.dir), "hi"]);
    assert!(
        !failed.ok && failed.stderr.lines().count() == 1 && failed.stderr.contains("verification"),
        "{}",
        failed.stderr
    );
    // Asked on a, which runs nothing, the prompt waits for c and says why.
    let waiting = Streaming::start(&a.dir, &GREEDY);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !waiting.err_text().contains("cannot load its units yet") {
        assert!(Instant::now() < deadline, "the prompt on a never said what it waits for: {}", waiting.err_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(waiting.err_text().contains("verification"), "{}", waiting.err_text());

    // b has an intact copy: c's next try gets every slice verified, and the waiting prompt goes on.
    let _b = Node::start_with(&dir("b"), &[&a], &["--model", s(&package), "--memory", "1000"]);
    let answered = waiting.finish();
    assert!(answered.ok, "{}", answered.stderr);
    assert_eq!(answered.stdout, reference);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fetch = plan(&c)["fetch"].as_str().unwrap_or_default().to_string();
        if fetch.starts_with("fetched") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c never fetched its units: {fetch}\n{}",
            std::fs::read_to_string(dir("c").with_extension("log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ok(&[&["prompt", "--data-dir", s(&c.dir)][..], &GREEDY[..]].concat()), reference);
    let id = plan(&c)["model"].as_str().unwrap().to_string();
    let held = c.dir.join("models").join(&id);
    let on_disk = files_under(&held);
    assert!(on_disk.iter().any(|f| f.starts_with("weights/")), "{on_disk:?}");
    assert_verified(&held, &manifest, &on_disk);

    // The outsider was refused by the mesh and holds nothing of the model.
    let got = files_under(&dir("outsider").join("models"));
    assert!(got.is_empty(), "the outsider got {got:?}");
    drop(outsider);
}
