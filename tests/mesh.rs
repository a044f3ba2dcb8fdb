//! Whole meshes of real `llnode` processes on localhost: certificates,
//! joins, the gate, revocation and restarts, asserted through what a person
//! sees (`llnode peers`, exit codes, error lines).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_llnode");

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn llnode(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().expect("llnode runs");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(args: &[&str]) -> String {
    let out = llnode(args);
    assert!(out.ok, "llnode {args:?} failed: {}", out.stderr);
    out.stdout
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A running `llnode start`, killed when dropped.
struct Node {
    child: Child,
    dir: PathBuf,
    peer_id: String,
    addr: String,
}

impl Node {
    fn start(dir: &Path, peers: &[&Node]) -> Node {
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["start", "--data-dir", s(dir), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]);
        for p in peers {
            cmd.args(["--peer", &p.addr]);
        }
        let mut child =
            cmd.env("RUST_LOG", "info").stdout(Stdio::piped()).stderr(log).spawn().expect("llnode start runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            panic!("no ready line from {}: {}", dir.display(), std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default())
        });
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("ready"), "{line}");
        let peer_id = words.next().expect("peer id").to_string();
        let addr = format!("{}/p2p/{peer_id}", words.next().expect("an address"));
        Node { child, dir: dir.to_path_buf(), peer_id, addr }
    }

    fn peers(&self) -> Vec<serde_json::Value> {
        let out = ok(&["peers", "--json", "--data-dir", s(&self.dir)]);
        serde_json::from_str(&out).expect("peers --json is JSON")
    }

    fn row(&self, peer: &Node) -> Option<serde_json::Value> {
        self.peers().into_iter().find(|r| r["peer_id"] == peer.peer_id.as_str())
    }

    /// Waits until `peer`'s row satisfies `check`.
    fn wait_for(&self, peer: &Node, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = self.row(peer);
            if let Some(r) = row.as_ref().filter(|r| check(r)) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{} never saw {} {what}; last row: {row:?}\nlog: {}",
                self.dir.display(),
                peer.dir.display(),
                std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_trusted(&self, peer: &Node) {
        self.wait_for(peer, "trusted", |r| r["state"] == "trusted" && r["connected"] == true);
    }

    fn wait_refused(&self, peer: &Node, reason: &str) {
        self.wait_for(peer, &format!("refused ({reason}) and disconnected"), |r| {
            r["state"] == "refused" && r["reason"].as_str().is_some_and(|why| why.contains(reason)) && r["connected"] == false
        });
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Offline admission: the owner certifies the device's peer id, the device installs the file.
fn admit(owner: &Path, device: &Path, name: &str, valid_for: &str) {
    let id = ok(&["id", "--data-dir", s(device)]);
    let cert = device.with_extension("cert");
    ok(&["mesh", "certify", "--data-dir", s(owner), id.trim(), "--name", name, "--valid-for", valid_for, "-o", s(&cert)]);
    ok(&["mesh", "install", "--data-dir", s(device), s(&cert)]);
}

#[test]
fn members_trust_each_other_and_outsiders_are_turned_away() {
    let root = tempfile::tempdir().unwrap();
    let dir = |n: &str| root.path().join(n);
    ok(&["mesh", "init", "--data-dir", s(&dir("a")), "--name", "alpha"]);
    admit(&dir("a"), &dir("b"), "bravo", "1d");
    admit(&dir("a"), &dir("c"), "charlie", "1d");

    let a = Node::start(&dir("a"), &[]);
    let b = Node::start(&dir("b"), &[&a]);
    // c names only a: it meets b through a's introductions.
    let c = Node::start(&dir("c"), &[&a]);
    for (x, y) in [(&a, &b), (&a, &c), (&b, &a), (&b, &c), (&c, &a), (&c, &b)] {
        x.wait_trusted(y);
    }
    let table = ok(&["peers", "--data-dir", s(&dir("b"))]);
    assert!(table.contains("alpha") && table.contains("charlie") && table.contains("trusted"), "{table}");
    assert!(a.row(&b).unwrap()["rtt_ms"].as_f64().is_some() || b.wait_for(&a, "with a round trip", |r| r["rtt_ms"].is_number())["rtt_ms"].is_number());

    // Garbage on the node's port: the connection fails, the node keeps serving.
    {
        use std::io::Write;
        let port = a.addr.split('/').nth(4).unwrap();
        let mut raw = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        let _ = raw.write_all(&[0xff; 4096]);
        let _ = raw.write_all(b"/multistream/1.0.0\n\x13/noise\n garbage");
    }
    a.wait_trusted(&b);
    b.wait_trusted(&a);

    // No certificate at all.
    let d = Node::start(&dir("d"), &[&a]);
    a.wait_refused(&d, "certificate");
    assert_ne!(d.row(&a).map(|r| r["state"].clone()), Some("trusted".into()));
    d.stop();

    // A certificate from another mesh.
    ok(&["mesh", "init", "--data-dir", s(&dir("other")), "--name", "mallory-owner"]);
    admit(&dir("other"), &dir("e"), "mallory", "1d");
    let e = Node::start(&dir("e"), &[&a]);
    a.wait_refused(&e, "another mesh");
    e.stop();

    // A certificate that runs out while connected.
    admit(&dir("a"), &dir("f"), "shortlived", "4s");
    let f = Node::start(&dir("f"), &[&a]);
    a.wait_refused(&f, "expired");
    f.stop();

    // A node restarted on its data directory keeps its identity and its trust.
    let b_id = b.peer_id.clone();
    b.stop();
    let b = Node::start(&dir("b"), &[&a]);
    assert_eq!(b.peer_id, b_id);
    a.wait_trusted(&b);
    b.wait_trusted(&a);
    b.wait_trusted(&c);
}

#[test]
fn tokens_admit_once_and_revocation_spreads_at_once() {
    let root = tempfile::tempdir().unwrap();
    let dir = |n: &str| root.path().join(n);
    ok(&["mesh", "init", "--data-dir", s(&dir("a")), "--name", "alpha"]);
    admit(&dir("a"), &dir("b"), "bravo", "1d");
    let a = Node::start(&dir("a"), &[]);
    let b = Node::start(&dir("b"), &[&a]);
    a.wait_trusted(&b);

    let token = ok(&["mesh", "invite", "--data-dir", s(&dir("a"))]);
    let token = token.trim();
    // Joining without a running node on the new device.
    let joined = ok(&["mesh", "join", "--data-dir", s(&dir("d")), "--name", "delta", token]);
    assert!(joined.contains("as delta"), "{joined}");
    // One use only.
    let again = llnode(&["mesh", "join", "--data-dir", s(&dir("x")), "--name", "x", token]);
    assert!(!again.ok && again.stderr.contains("already used"), "{}", again.stderr);
    // Forged, expired and damaged tokens.
    let forged = llnode(&["mesh", "join", "--data-dir", s(&dir("y")), &format!("{}x", &token[..token.len() - 1])]);
    assert!(!forged.ok && forged.stderr.lines().count() == 1, "{}", forged.stderr);
    let short = ok(&["mesh", "invite", "--data-dir", s(&dir("a")), "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let expired = llnode(&["mesh", "join", "--data-dir", s(&dir("y")), short.trim()]);
    assert!(!expired.ok && expired.stderr.contains("expired"), "{}", expired.stderr);
    let junk = llnode(&["mesh", "join", "--data-dir", s(&dir("y")), "hello"]);
    assert!(!junk.ok && junk.stderr.contains("not a join token"), "{}", junk.stderr);

    // Joining through a running node: it starts outside the mesh and is admitted live.
    let e = Node::start(&dir("e"), &[&a]);
    let token = ok(&["mesh", "invite", "--data-dir", s(&dir("a"))]);
    ok(&["mesh", "join", "--data-dir", s(&dir("e")), "--name", "echo", token.trim()]);
    let d = Node::start(&dir("d"), &[&a]);
    for (x, y) in [(&a, &d), (&b, &d), (&d, &b), (&a, &e), (&b, &e)] {
        x.wait_trusted(y);
    }

    // Revoked by name on the owner: every member drops it at once.
    let revoked = ok(&["mesh", "revoke", "--data-dir", s(&dir("a")), "delta"]);
    assert!(revoked.contains(&d.peer_id), "{revoked}");
    a.wait_refused(&d, "revoked");
    b.wait_refused(&d, "revoked");
    e.wait_refused(&d, "revoked");
    let not_owner = llnode(&["mesh", "revoke", "--data-dir", s(&dir("b")), "echo"]);
    assert!(!not_owner.ok && not_owner.stderr.contains("only the mesh owner"), "{}", not_owner.stderr);
    let no_node = llnode(&["peers", "--data-dir", s(&dir("nobody"))]);
    assert!(!no_node.ok && no_node.stderr.contains("no node is running"), "{}", no_node.stderr);
}
