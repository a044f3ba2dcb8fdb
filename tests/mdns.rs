//! mDNS discovery between real processes. libp2p's mDNS ignores loopback, so
//! each node runs in its own network namespace, joined to the others by a
//! bridge (veth pairs), and no node is told about any other. Needs root and
//! `ip netns`; elsewhere the test says it was skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_llnode");

fn sh(args: &[&str]) -> bool {
    Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("runs");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A bridge namespace and one namespace per node, removed on drop.
struct Lan {
    tag: String,
    nodes: usize,
}

impl Lan {
    fn new(nodes: usize) -> Option<Lan> {
        let tag = format!("ll{}", std::process::id() % 100_000);
        let lan = Lan { tag: tag.clone(), nodes };
        if !sh(&["ip", "netns", "add", &format!("{tag}br")]) {
            return None;
        }
        let br = format!("{tag}br");
        run(&["ip", "netns", "exec", &br, "ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        run(&["ip", "netns", "exec", &br, "ip", "link", "set", "br0", "up"]);
        for i in 0..nodes {
            let ns = lan.ns(i);
            run(&["ip", "netns", "add", &ns]);
            let (inner, outer) = (format!("{tag}i{i}"), format!("{tag}o{i}"));
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
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            sh(&["ip", "netns", "del", &self.ns(i)]);
        }
        sh(&["ip", "netns", "del", &format!("{}br", self.tag)]);
    }
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn llnode(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("llnode runs");
    assert!(out.status.success(), "llnode {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nodes_on_one_network_find_each_other_with_mdns() {
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let Some(lan) = is_root.then(|| Lan::new(3)).flatten() else {
        eprintln!("SKIPPED nodes_on_one_network_find_each_other_with_mdns: needs root and `ip netns` (it runs in CI)");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| root.path().join(format!("n{i}"))).collect();
    llnode(&["mesh", "init", "--data-dir", s(&dirs[0]), "--name", "n0"]);
    let mut ids = vec![llnode(&["id", "--data-dir", s(&dirs[0])]).trim().to_string()];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        let id = llnode(&["id", "--data-dir", s(dir)]).trim().to_string();
        let cert = dir.with_extension("cert");
        llnode(&["mesh", "certify", "--data-dir", s(&dirs[0]), &id, "--name", &format!("n{i}"), "-o", s(&cert)]);
        llnode(&["mesh", "install", "--data-dir", s(dir), s(&cert)]);
        ids.push(id);
    }
    let _nodes: Vec<Node> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let log = std::fs::File::create(dir.with_extension("log")).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &lan.ns(i), BIN, "start", "--data-dir", s(dir), "--listen", "/ip4/0.0.0.0/tcp/0"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            Node(child)
        })
        .collect();

    // Nobody was given an address: each must find and trust the other two.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, dir) in dirs.iter().enumerate() {
        loop {
            let peers = Command::new(BIN).args(["peers", "--json", "--data-dir", s(dir)]).output().unwrap();
            let rows: Vec<serde_json::Value> = serde_json::from_slice(&peers.stdout).unwrap_or_default();
            let trusted = |id: &String| rows.iter().any(|r| r["peer_id"] == id.as_str() && r["state"] == "trusted" && r["connected"] == true);
            if ids.iter().enumerate().filter(|(j, _)| *j != i).all(|(_, id)| trusted(id)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not find the others by mDNS: {rows:?}\n{}",
                std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
