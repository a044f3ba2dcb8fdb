//! Helpers for the multi-process tests: run `llnode`, start nodes that are
//! killed when dropped, and poll what `llnode peers` shows.
#![allow(dead_code)] // each test file uses its own share

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_llnode");

pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn llnode(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().expect("llnode runs");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn ok(args: &[&str]) -> String {
    let out = llnode(args);
    assert!(out.ok, "llnode {args:?} failed: {}", out.stderr);
    out.stdout
}

/// Writes a benchmark's plot (`svg`, closed here) as `name` in the target
/// directory (`$CARGO_TARGET_DIR`, or the workspace's `target/`); returns its path.
pub fn write_plot(name: &str, mut svg: String) -> PathBuf {
    svg.push_str("</svg>\n");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
    let path = dir.join(name);
    llnode_mesh::file::write_atomic(&path, svg.as_bytes(), false).unwrap();
    path
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A running `llnode start`, killed when dropped.
pub struct Node {
    child: Child,
    pub dir: PathBuf,
    pub peer_id: String,
    pub addr: String,
}

impl Node {
    pub fn start(dir: &Path, peers: &[&Node]) -> Node {
        Node::start_with(dir, peers, &[])
    }

    /// Starts with extra `llnode start` arguments.
    pub fn start_with(dir: &Path, peers: &[&Node], extra: &[&str]) -> Node {
        // Appended: a node started again on the same directory keeps its earlier log.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["start", "--data-dir", s(dir), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]);
        for p in peers {
            cmd.args(["--peer", &p.addr]);
        }
        cmd.args(extra);
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
            panic!(
                "no ready line from {}: {}",
                dir.display(),
                std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
            )
        });
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("ready"), "{line}");
        let peer_id = words.next().expect("peer id").to_string();
        let addr = format!("{}/p2p/{peer_id}", words.next().expect("an address"));
        Node { child, dir: dir.to_path_buf(), peer_id, addr }
    }

    pub fn peers(&self) -> Vec<serde_json::Value> {
        let out = ok(&["peers", "--json", "--data-dir", s(&self.dir)]);
        serde_json::from_str(&out).expect("peers --json is JSON")
    }

    pub fn row(&self, peer: &Node) -> Option<serde_json::Value> {
        self.peers().into_iter().find(|r| r["peer_id"] == peer.peer_id.as_str())
    }

    /// Waits until `peer`'s row satisfies `check`.
    pub fn wait_for(&self, peer: &Node, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
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

    pub fn wait_trusted(&self, peer: &Node) {
        self.wait_for(peer, "trusted", |r| r["state"] == "trusted" && r["connected"] == true);
    }

    pub fn wait_refused(&self, peer: &Node, reason: &str) {
        self.wait_for(peer, &format!("refused ({reason}) and disconnected"), |r| {
            r["state"] == "refused"
                && r["reason"].as_str().is_some_and(|why| why.contains(reason))
                && r["connected"] == false
        });
    }

    /// The process's peak resident memory (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_kib("VmHWM:") * 1024
    }

    /// Starts the peak over from the resident memory now (Linux: 5 to `clear_refs`).
    pub fn reset_peak_rss(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5")
            .expect("the peak resident memory can be reset");
    }

    /// The process's resident memory now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        self.status_kib("VmRSS:") * 1024
    }

    /// The cores each of the process's threads may run on, as Linux lists them (`0-1`).
    pub fn thread_cpus(&self) -> Vec<String> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("the process's threads");
        tasks
            .map(|task| {
                let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
                status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string()
            })
            .collect()
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
    }

    pub fn stop(mut self) {
        self.kill();
    }

    /// SIGKILL: the process ends at once, sockets reset, nothing cleaned up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by name (`STOP` freezes the process as a hung phone would, `CONT` thaws it).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").args(["-s", name, &self.child.id().to_string()]).status().expect("kill runs");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits until the node has measured itself (it logs its profile).
    pub fn wait_measured(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.log().contains("measured this device") {
            assert!(Instant::now() < deadline, "{} never measured itself: {}", self.dir.display(), self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Offline admission: the owner certifies the device's peer id, the device installs the file.
pub fn admit(owner: &Path, device: &Path, name: &str, valid_for: &str) {
    let id = ok(&["id", "--data-dir", s(device)]);
    let cert = device.with_extension("cert");
    ok(&[
        "mesh",
        "certify",
        "--data-dir",
        s(owner),
        id.trim(),
        "--name",
        name,
        "--valid-for",
        valid_for,
        "-o",
        s(&cert),
    ]);
    ok(&["mesh", "install", "--data-dir", s(device), s(&cert)]);
}

/// A mesh of `n` nodes on `package`, each offering `memory`, once they agree on a plan.
pub struct Mesh {
    pub nodes: Vec<Node>,
    /// Each node's `llnode start` arguments beyond the common ones.
    args: Vec<Vec<String>>,
    _root: tempfile::TempDir,
}

impl Mesh {
    pub fn start(package: &Path, n: usize, memory: &str) -> Mesh {
        Mesh::with_sources(package, n, n, memory)
    }

    /// Only the first `sources` nodes have the package; the others fetch their units.
    pub fn with_sources(package: &Path, n: usize, sources: usize, memory: &str) -> Mesh {
        Mesh::with_args(package, n, sources, memory, &[])
    }

    /// As [`Mesh::with_sources`], with `extra` arguments for every node.
    pub fn with_args(package: &Path, n: usize, sources: usize, memory: &str, extra: &[&str]) -> Mesh {
        let args: Vec<Vec<String>> = (0..n)
            .map(|i| {
                let mut a = vec!["--memory".to_string(), memory.to_string()];
                if i < sources {
                    a.extend(["--model".to_string(), s(package).to_string()]);
                }
                a.extend(extra.iter().map(|e| e.to_string()));
                a
            })
            .collect();
        Mesh::with_node_args(args)
    }

    /// A node per entry of `args`, each started with its own `llnode start` arguments.
    pub fn with_node_args(args: Vec<Vec<String>>) -> Mesh {
        let n = args.len();
        let root = tempfile::tempdir().unwrap();
        let dir = |i: usize| root.path().join(format!("n{i}"));
        ok(&["mesh", "init", "--data-dir", s(&dir(0)), "--name", "n0"]);
        for i in 1..n {
            admit(&dir(0), &dir(i), &format!("n{i}"), "1d");
        }
        let strs = |i: usize| args[i].iter().map(String::as_str).collect::<Vec<_>>();
        // One after another, each once it has measured itself: devices measured
        // at the same time on this machine's two cores slow each other down
        // (by 1.7x), and plans follow the measurements. Phones have their own cores.
        let first = Node::start_with(&dir(0), &[], &strs(0));
        first.wait_measured();
        let mut nodes = vec![first];
        for i in 1..n {
            let node = Node::start_with(&dir(i), &[&nodes[0]], &strs(i));
            node.wait_measured();
            nodes.push(node);
        }
        let mesh = Mesh { nodes, args, _root: root };
        mesh.wait_for_plan();
        mesh
    }

    /// Starts node `i` again on its data directory (after a kill), dialling `via`.
    pub fn restart(&mut self, i: usize, via: usize) {
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        let node = Node::start_with(&self.nodes[i].dir.clone(), &[&self.nodes[via]], &args);
        self.nodes[i] = node;
    }

    /// The node other than `asking` that runs the most units in the plan `asking` holds.
    pub fn busiest_besides(&self, asking: usize) -> usize {
        let view = self.view(asking);
        (0..self.nodes.len()).filter(|&i| i != asking).max_by_key(|&i| units_of(&view, &self.nodes[i].peer_id)).unwrap()
    }

    /// The plan node `i` holds, as `llnode plan --json` shows it.
    pub fn view(&self, i: usize) -> serde_json::Value {
        serde_json::from_str(&ok(&["plan", "--json", "--data-dir", s(&self.nodes[i].dir)])).unwrap()
    }

    /// Every node holds the same plan, made with all `n` members live, and
    /// it stays the same for a second (links are measured once members meet).
    pub fn wait_for_plan(&self) {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.wait_for_plan_among(&all);
    }

    /// The nodes `live` (the others were killed) hold the same plan, made
    /// with exactly them as members, and it stays the same for a second.
    pub fn wait_for_plan_among(&self, live: &[usize]) {
        let n = live.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stable: Option<(serde_json::Value, Instant)> = None;
        loop {
            let views: Vec<serde_json::Value> = live.iter().map(|&i| self.view(i)).collect();
            let agreed = views.windows(2).all(|w| w[0]["epoch"] == w[1]["epoch"])
                && views.iter().all(|v| !v["plan"].is_null() && v["members"].as_array().unwrap().len() == n - 1);
            if agreed {
                let stages = views[0]["plan"]["stages"].as_array().unwrap().len();
                assert!(n == 1 || stages >= 2, "the memory cap should force a split: {:#}", views[0]);
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

    pub fn prompt(&self, i: usize, args: &[&str]) -> String {
        let mut all = vec!["prompt", "--data-dir", s(&self.nodes[i].dir)];
        all.extend_from_slice(args);
        ok(&all)
    }
}

/// The built-in model, made and imported under `root`: its package.
pub fn built_in(root: &Path) -> PathBuf {
    ok(&["model", "synth", "-o", s(&root.join("export"))]);
    package_of(&root.join("export"), &root.join("tiny"))
}

/// What `llnode run` prints for `args` with `package` in one process: the
/// reference a mesh's answer must equal.
pub fn alone(package: &Path, args: &[&str]) -> String {
    ok(&[&["run", "-m", s(package)][..], args].concat())
}

pub fn package_of(export: &Path, out: &Path) -> PathBuf {
    ok(&["import", s(export), "-o", s(out)]);
    out.to_path_buf()
}

/// Memory that holds about `share` of the model (weights and a 1024-token KV cache).
pub fn share_of(package: &Path, share: f64) -> String {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(package.join("manifest.json")).unwrap()).unwrap();
    let need: u64 = manifest["cost"]["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["weight_bytes"].as_u64().unwrap() + 1024 * u["kv_bytes_per_token"].as_u64().unwrap())
        .sum();
    format!("{}", (need as f64 * share) as u64)
}

/// How many units the plan in `view` (`llnode plan --json`) gives `peer`.
pub fn units_of(view: &serde_json::Value, peer: &str) -> u64 {
    view["plan"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["device"] == peer)
        .map(|st| st["units"]["end"].as_u64().unwrap() - st["units"]["start"].as_u64().unwrap())
        .sum()
}

/// A `llnode prompt` running in the background, its answer read as it streams.
pub struct Streaming {
    child: Child,
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    reader: std::thread::JoinHandle<()>,
    pub out: Vec<u8>,
    /// Its standard error so far, read as it comes.
    err: std::sync::Arc<std::sync::Mutex<String>>,
    err_reader: std::thread::JoinHandle<()>,
}

impl Streaming {
    pub fn start(dir: &Path, args: &[&str]) -> Streaming {
        let mut child = Command::new(BIN)
            .args(["prompt", "--data-dir", s(dir)])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("llnode prompt runs");
        let mut stdout = child.stdout.take().unwrap();
        let (tx, chunks) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 256];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let into = err.clone();
        let err_reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 256];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Streaming { child, chunks, reader, out: Vec::new(), err, err_reader }
    }

    /// Its standard error so far.
    pub fn err_text(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// The answer so far, without waiting.
    pub fn so_far(&mut self) -> &[u8] {
        self.out.extend(self.chunks.try_iter().flatten());
        &self.out
    }

    /// Waits until at least `n` bytes of the answer have come (or the answer ends).
    pub fn read_at_least(&mut self, n: usize) {
        while self.out.len() < n {
            match self.chunks.recv_timeout(Duration::from_secs(120)) {
                Ok(chunk) => self.out.extend(chunk),
                Err(_) => return,
            }
        }
    }

    /// Kills the `llnode prompt` process, as a Ctrl-C would end it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the prompt to end.
    pub fn finish(mut self) -> Output {
        let status = self.child.wait().unwrap();
        let _ = self.reader.join();
        let _ = self.err_reader.join();
        self.out.extend(self.chunks.try_iter().flatten());
        let stderr = self.err.lock().unwrap().clone();
        Output { ok: status.success(), stdout: String::from_utf8_lossy(&self.out).into_owned(), stderr }
    }
}

/// The figure `key` on the `stats:` line `llnode prompt --stats` wrote to `stderr`.
pub fn stat(stderr: &str, key: &str) -> f64 {
    let line = stderr.lines().find(|l| l.starts_with("stats:")).unwrap_or_else(|| panic!("no stats in {stderr}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// The median of `v` (the upper one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
