//! Real networks between real processes: each node runs in its own network
//! namespace, joined to the others by a bridge (veth pairs). mDNS discovery
//! (libp2p's mDNS ignores loopback) and a network cut (a node's link taken
//! down mid-generation). Needs root and `ip netns`; elsewhere each test says
//! it was skipped.

#[path = "support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Streaming, alone, built_in, ok, s, share_of, units_of};

const BIN: &str = env!("CARGO_BIN_EXE_llnode");

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("runs");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A bridge namespace and one namespace per node, removed on drop. Node `i`
/// has the address 10.213.0.(i+1).
struct Lan {
    tag: String,
    nodes: usize,
}

impl Lan {
    /// `None` (the test says it is skipped) without root or `ip netns`.
    /// `kind` tells apart the LANs of tests running at once.
    fn new(nodes: usize, kind: char, test: &str) -> Option<Lan> {
        let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let tag = format!("l{kind}{}", std::process::id() % 100_000);
        if !is_root || !sh(&["ip", "netns", "add", &format!("{tag}br")]) {
            eprintln!("SKIPPED {test}: needs root and `ip netns` (it runs in CI)");
            return None;
        }
        let lan = Lan { tag: tag.clone(), nodes };
        let br = format!("{tag}br");
        run(&["ip", "netns", "exec", &br, "ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        run(&["ip", "netns", "exec", &br, "ip", "link", "set", "br0", "up"]);
        for i in 0..nodes {
            let ns = lan.ns(i);
            run(&["ip", "netns", "add", &ns]);
            let (inner, outer) = (format!("{tag}i{i}"), lan.outer(i));
            run(&["ip", "link", "add", &inner, "type", "veth", "peer", "name", &outer]);
            run(&["ip", "link", "set", &inner, "netns", &ns]);
            run(&["ip", "link", "set", &outer, "netns", &br]);
            run(&["ip", "netns", "exec", &br, "ip", "link", "set", &outer, "master", "br0", "up"]);
            run(&["ip", "netns", "exec", &ns, "ip", "addr", "add", &format!("10.213.0.{}/24", i + 1), "dev", &inner]);
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "up", "multicast", "on"]);
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        Some(lan)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    /// Node `i`'s end of its link on the bridge.
    fn outer(&self, i: usize) -> String {
        format!("{}o{i}", self.tag)
    }

    /// Takes node `i`'s link down (`false`) or up again: a network cut that
    /// leaves its process running and its sockets open.
    fn link(&self, i: usize, up: bool) {
        run(&[
            "ip",
            "netns",
            "exec",
            &format!("{}br", self.tag),
            "ip",
            "link",
            "set",
            &self.outer(i),
            if up { "up" } else { "down" },
        ]);
    }

    /// Starts `llnode start` for node `i` in its namespace.
    fn start(&self, i: usize, dir: &Path, args: &[&str]) -> Node {
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), BIN, "start", "--data-dir", s(dir)])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Node(child, dir.to_path_buf())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            sh(&["ip", "netns", "del", &self.ns(i)]);
        }
        sh(&["ip", "netns", "del", &format!("{}br", self.tag)]);
    }
}

struct Node(Child, PathBuf);

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(self.1.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Data directories of `n` devices of one mesh (the first is its owner), and their peer ids.
fn provision(root: &Path, n: usize) -> (Vec<PathBuf>, Vec<String>) {
    let dirs: Vec<PathBuf> = (0..n).map(|i| root.join(format!("n{i}"))).collect();
    ok(&["mesh", "init", "--data-dir", s(&dirs[0]), "--name", "n0"]);
    let mut ids = vec![ok(&["id", "--data-dir", s(&dirs[0])]).trim().to_string()];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        let id = ok(&["id", "--data-dir", s(dir)]).trim().to_string();
        let cert = dir.with_extension("cert");
        ok(&["mesh", "certify", "--data-dir", s(&dirs[0]), &id, "--name", &format!("n{i}"), "-o", s(&cert)]);
        ok(&["mesh", "install", "--data-dir", s(dir), s(&cert)]);
        ids.push(id);
    }
    (dirs, ids)
}

/// `llnode plan --json` of the node on `dir`; null while it is starting.
fn view(dir: &Path) -> serde_json::Value {
    let out = support::llnode(&["plan", "--json", "--data-dir", s(dir)]);
    serde_json::from_str(&out.stdout).unwrap_or_default()
}

#[test]
fn nodes_on_one_network_find_each_other_with_mdns() {
    let Some(lan) = Lan::new(3, 'm', "nodes_on_one_network_find_each_other_with_mdns") else { return };
    let root = tempfile::tempdir().unwrap();
    let (dirs, ids) = provision(root.path(), 3);
    let nodes: Vec<Node> =
        dirs.iter().enumerate().map(|(i, dir)| lan.start(i, dir, &["--listen", "/ip4/0.0.0.0/tcp/0"])).collect();

    // Nobody was given an address: each must find and trust the other two.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, dir) in dirs.iter().enumerate() {
        loop {
            let peers = Command::new(BIN).args(["peers", "--json", "--data-dir", s(dir)]).output().unwrap();
            let rows: Vec<serde_json::Value> = serde_json::from_slice(&peers.stdout).unwrap_or_default();
            let trusted = |id: &String| {
                rows.iter().any(|r| r["peer_id"] == id.as_str() && r["state"] == "trusted" && r["connected"] == true)
            };
            if ids.iter().enumerate().filter(|(j, _)| *j != i).all(|(_, id)| trusted(id)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not find the others by mDNS: {rows:?}\n{}",
                nodes[i].log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A stage's network link goes down mid-generation (its process runs on and
/// its sockets stay open; nothing reaches it): the others drop it when its
/// pings go unanswered, plan without it, and the answer is exactly the
/// uninterrupted one. When the link comes back, the node redials, is
/// admitted again and is back in the plan.
#[test]
fn a_stage_cut_off_the_network_mid_generation_changes_nothing_in_the_answer() {
    let Some(lan) = Lan::new(3, 'p', "a_stage_cut_off_the_network_mid_generation_changes_nothing_in_the_answer") else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let package = built_in(root.path());
    let prompt = "The mesh of phones";
    let reference = alone(&package, &["--max-tokens", "200", "--ignore-eos", prompt]);
    let (dirs, ids) = provision(root.path(), 3);
    // Any two hold the model; n0 and n1 have it. Each dials the ones started
    // before it, again whenever the link drops. The balancer is off, so that
    // the stage cut off is one the generation runs on.
    let memory = share_of(&package, 0.55);
    let addr = |i: usize| format!("/ip4/10.213.0.{}/tcp/4001", i + 1);
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let (listen, mut args) = (addr(i), vec!["--no-mdns", "--no-rebalance", "--memory", &memory]);
            args.extend(["--listen", &listen]);
            if i < 2 {
                args.extend(["--model", s(&package)]);
            }
            let peers: Vec<String> = (0..i).map(addr).collect();
            for p in &peers {
                args.extend(["--peer", p]);
            }
            lan.start(i, &dirs[i], &args)
        })
        .collect();
    let settled = |live: &[usize]| {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let views: Vec<serde_json::Value> = live.iter().map(|&i| view(&dirs[i])).collect();
            if views.windows(2).all(|w| w[0]["epoch"] == w[1]["epoch"])
                && views
                    .iter()
                    .all(|v| !v["plan"].is_null() && v["members"].as_array().map_or(0, Vec::len) == live.len() - 1)
            {
                return views[0].clone();
            }
            let logs: String = live.iter().map(|&i| nodes[i].log()).collect();
            assert!(Instant::now() < deadline, "no plan agreed among {live:?}: {views:#?}\n{logs}");
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let asking = 0;
    settled(&[0, 1, 2]);
    let mut answer = Streaming::start(&dirs[asking], &["--max-tokens", "200", "--ignore-eos", prompt]);
    answer.read_at_least(reference.len() / 3);
    // A stage of the plan the generation runs on now (a late link measurement may have moved it).
    let now = view(&dirs[asking]);
    let victim = *[1, 2].iter().max_by_key(|&&i| units_of(&now, &ids[i])).unwrap();
    assert!(units_of(&now, &ids[victim]) > 0, "{now:#}");
    let cut = Instant::now();
    lan.link(victim, false);
    let out = answer.finish();
    let took = cut.elapsed();
    assert!(out.ok, "{}\n{}", out.stderr, nodes[asking].log());
    assert_eq!(out.stdout, reference, "{}", out.stderr);
    assert!(out.stderr.contains("resumed on plan epoch"), "the generation never moved: {}", out.stderr);
    assert!(took < Duration::from_secs(60), "the cut-off stage was dropped only after {took:?}");
    let others: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let without = settled(&others);
    assert_eq!(units_of(&without, &ids[victim]), 0, "{without:#}");

    lan.link(victim, true);
    // Back: a member again, and in the next plan the leader makes (a stage or spare units).
    let planned = |v: &serde_json::Value| {
        let named = |list: &serde_json::Value| {
            list.as_array().is_some_and(|l| l.iter().any(|x| x["device"] == ids[victim].as_str()))
        };
        named(&v["plan"]["stages"]) || named(&v["plan"]["spares"])
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let back = settled(&[0, 1, 2]);
        if planned(&back) {
            break;
        }
        assert!(Instant::now() < deadline, "n{victim} is back but no plan gives it a stage or spare units: {back:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // And the mesh answers as before.
    assert_eq!(
        ok(&["prompt", "--data-dir", s(&dirs[asking]), "--max-tokens", "200", "--ignore-eos", prompt]),
        reference
    );
}
