//! Planning across real processes: members elect one leader, which measures
//! nothing itself but plans from every member's measured profile, signs the
//! plan and sends it to all; a device that joins follows that leader, even
//! with a smaller id; when the leader dies the others elect a new one and
//! publish a newer plan without it.

#[path = "support.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Node, admit, ok, s};

fn plan(node: &Node) -> Value {
    serde_json::from_str(&ok(&["plan", "--json", "--data-dir", s(&node.dir)])).expect("plan --json is JSON")
}

/// Polls until every node holds a plan satisfying `check`, the same one; returns it.
fn agreed(nodes: &[&Node], what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let views: Vec<Value> = nodes.iter().map(|n| plan(n)).collect();
        let same = views.windows(2).all(|w| w[0]["epoch"] == w[1]["epoch"] && w[0]["leadership"] == w[1]["leadership"]);
        if same && views.iter().all(|v| !v["plan"].is_null() && check(v)) {
            return views.into_iter().next().unwrap();
        }
        assert!(Instant::now() < deadline, "no agreement on {what}: {views:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn devices(view: &Value) -> Vec<String> {
    view["plan"]["stages"].as_array().unwrap().iter().map(|s| s["device"].as_str().unwrap().to_string()).collect()
}

/// Whether the plan held came from the leader now named, as the node's
/// history says (the leader itself notes that it published it).
fn from_leader(view: &Value) -> bool {
    let line = if view["leadership"]["leader"] == view["me"] {
        format!("epoch {}: published a plan", view["epoch"])
    } else {
        format!("epoch {}: plan from {} (", view["epoch"], view["leader_name"].as_str().unwrap_or("?"))
    };
    view["history"].as_array().unwrap().iter().any(|h| h.as_str().unwrap().starts_with(&line))
}

/// Every unit once, in order, across the stages.
fn covers(view: &Value, units: u64) -> bool {
    let mut next = 0;
    for stage in view["plan"]["stages"].as_array().unwrap() {
        if stage["units"]["start"] != next {
            return false;
        }
        next = stage["units"]["end"].as_u64().unwrap();
    }
    next == units
}

#[test]
fn members_agree_on_a_leader_keep_it_when_a_device_joins_and_replace_it_when_it_dies() {
    let root = tempfile::tempdir().unwrap();
    let dir = |n: &str| root.path().join(n);
    let package = dir("tiny");
    ok(&["model", "synth", "-o", s(&dir("export"))]);
    ok(&["import", s(&dir("export")), "-o", s(&package)]);
    let units =
        std::fs::read_to_string(package.join("manifest.json")).unwrap().matches("\"file\": \"units/").count() as u64;
    // Four devices; the one with the smallest peer id joins last.
    let mut keys: Vec<(String, &str)> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|k| (ok(&["id", "--data-dir", s(&dir(k))]).trim().to_string(), k))
        .collect();
    keys.sort();
    let (late, first_three) = (keys[0].1, [keys[1].1, keys[2].1, keys[3].1]);
    ok(&["mesh", "init", "--data-dir", s(&dir(first_three[0])), "--name", "owner"]);
    for k in first_three[1..].iter().chain([&late]) {
        admit(&dir(first_three[0]), &dir(k), k, "1d");
    }

    // Each offers 1 MiB: the model (about 1.8 MiB with its KV cache) must be split.
    let args = ["--model", s(&package), "--memory", "1MiB"];
    let start = |d: &Path, peers: &[&Node]| Node::start_with(d, peers, &args);
    let a = start(&dir(first_three[0]), &[]);
    let b = start(&dir(first_three[1]), &[&a]);
    let c = start(&dir(first_three[2]), &[&a]);

    let ids: Vec<String> = [&a, &b, &c].iter().map(|n| n.peer_id.clone()).collect();
    let first = agreed(&[&a, &b, &c], "the first plan", |v| v["members"].as_array().unwrap().len() == 2);
    let leadership = first["leadership"].clone();
    assert!(ids.iter().any(|id| leadership["leader"] == id.as_str()), "{first:#}");
    assert!(covers(&first, units), "{first:#}");
    assert!(devices(&first).len() >= 2, "1 MiB each cannot hold the model alone: {first:#}");
    let text = ok(&["plan", "--data-dir", s(&b.dir), "--explain"]);
    assert!(text.contains("leader:") && text.contains("per token") && text.contains("history"), "{text}");

    // A device with a smaller id than any joins: it follows the leader it finds.
    let d = start(&dir(late), &[&a]);
    assert!(ids.iter().all(|id| d.peer_id < *id));
    let joined = agreed(&[&a, &b, &c, &d], "a plan with the newcomer", |v| v["members"].as_array().unwrap().len() == 3);
    assert_eq!(joined["leadership"], leadership, "the newcomer unseated the leader: {joined:#}");
    // Its history names the leader as its certificate does, though the
    // leader's profile may come after the line.
    let names = [("owner", &a), (first_three[1], &b), (first_three[2], &c)];
    let (name, _) = names.iter().find(|(_, n)| leadership["leader"] == n.peer_id.as_str()).unwrap();
    let history = plan(&d)["history"].to_string();
    let line = format!("term {}: {name} leads", leadership["term"]);
    assert!(history.contains(&line), "no '{line}' in the newcomer's history: {history}");

    // Kill the leader: the others elect the smallest of them and plan without it.
    // The plan agreed above may predate the newcomer's, so a newer plan may
    // still be the dead leader's: what is awaited is a plan from the new one.
    let leader = leadership["leader"].as_str().unwrap().to_string();
    let term = leadership["term"].as_u64().unwrap();
    let epoch = joined["epoch"].as_u64().unwrap();
    let mut nodes = vec![a, b, c, d];
    let leader_index = nodes.iter().position(|n| n.peer_id == leader).unwrap();
    nodes.remove(leader_index).stop();
    let next_leader = nodes.iter().map(|n| n.peer_id.clone()).min().unwrap();
    let live: Vec<&Node> = nodes.iter().collect();
    let second = agreed(&live, "a plan without the dead leader", |v| {
        v["leadership"]["leader"] == next_leader.as_str() && v["epoch"].as_u64().unwrap() > epoch && from_leader(v)
    });
    assert!(second["leadership"]["term"].as_u64().unwrap() > term, "{second:#}");
    assert!(covers(&second, units), "{second:#}");
    assert!(!devices(&second).contains(&leader), "the dead leader is in the new plan: {second:#}");

    // Asking for another objective gets a plan for it.
    let out = ok(&["plan", "--data-dir", s(&nodes[0].dir), "--objective", "throughput"]);
    assert!(out.contains("slowest pipeline stage"), "{out}");
}
