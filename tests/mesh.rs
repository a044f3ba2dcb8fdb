//! Whole meshes of real `llnode` processes on localhost: certificates,
//! joins, the gate, revocation and restarts, asserted through what a person
//! sees (`llnode peers`, exit codes, error lines).

#[path = "support.rs"]
mod support;

use std::time::Duration;

use support::{Node, admit, llnode, ok, s};

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
    assert!(
        a.row(&b).unwrap()["rtt_ms"].as_f64().is_some()
            || b.wait_for(&a, "with a round trip", |r| r["rtt_ms"].is_number())["rtt_ms"].is_number()
    );

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

/// `llnode start --cpus`: every thread of the node runs on the cores named,
/// its measuring and its runtime included; a core the process may not use is
/// one error line.
#[test]
fn a_node_runs_on_the_cores_it_is_given() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    ok(&["mesh", "init", "--data-dir", s(&dir), "--name", "alpha"]);
    let node = Node::start_with(&dir, &[], &["--cpus", "0"]);
    node.wait_measured();
    let cpus = node.thread_cpus();
    assert!(cpus.len() > 2 && cpus.iter().all(|c| c == "0"), "{cpus:?}");
    node.stop();

    let out = llnode(&["start", "--data-dir", s(&dir), "--no-mdns", "--cpus", "0,4095"]);
    assert!(!out.ok && out.stderr.lines().count() == 1 && out.stderr.contains("no core 4095"), "{}", out.stderr);
}
