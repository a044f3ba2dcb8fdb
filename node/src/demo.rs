//! `llnode demo`: a real mesh on this machine. Makes the built-in model and
//! imports it on first use, provisions three devices of one mesh (an owner
//! and two certified members), starts each as its own `llnode start`
//! process on localhost with a memory cap that forces the model to be split
//! (only the first node has the package; the others fetch the units the plan
//! gives them), waits for the elected leader's plan, asks a prompt from the
//! second node, prints the answer and the plan, and stops the nodes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llnode_mesh::cert::{OwnerKey, now};
use llnode_mesh::identity::DEVICE_KEY_FILE;
use llnode_mesh::{DeviceKey, Trust};
use llnode_models::model::Model;
use llnode_models::package;
use llnode_models::sampling::SamplingConfig;
use llnode_models::synth::{self, SynthConfig};

use crate::bar::Bar;
use crate::prompt::{PromptEvent, PromptRequest};

/// Node processes, killed when dropped (also when the demo fails half-way).
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn demo(data_dir: PathBuf, nodes: usize, max_tokens: usize, prompt: &str) -> anyhow::Result<()> {
    if !(2..=8).contains(&nodes) {
        bail!("--nodes must be between 2 and 8");
    }
    let package_dir = builtin_package(&data_dir)?;
    let id = package::verify(&package_dir)?;
    let mesh_dir = data_dir.join("demo-mesh");
    let _ = std::fs::remove_dir_all(&mesh_dir);
    let dirs: Vec<PathBuf> = (0..nodes).map(|i| mesh_dir.join(format!("node{i}"))).collect();
    provision(&dirs)?;
    crate::outln!("model: built-in tiny (package {}), a mesh of {nodes} nodes on localhost", &id[..16]);

    // Each node may hold a bit over half the model, so the plan has to split it.
    let (manifest, _) = package::Manifest::read(&package_dir)?;
    let need: u64 = manifest.cost.units.iter().map(|u| u.weight_bytes + 1024 * u.kv_bytes_per_token).sum();
    let memory = (need as f64 * 0.55) as u64;
    let exe = std::env::current_exe().context("cannot find the llnode binary to start nodes")?;
    let mut running = Nodes(Vec::new());
    let mut first_addr: Option<String> = None;
    for (i, dir) in dirs.iter().enumerate() {
        let log = std::fs::File::create(dir.with_extension("log"))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["start", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--memory", &memory.to_string()])
            .arg("--data-dir")
            .arg(dir);
        if i == 0 {
            cmd.arg("--model").arg(&package_dir);
        }
        if let Some(addr) = &first_addr {
            cmd.args(["--peer", addr.as_str()]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().context("cannot start a node")?;
        let line = BufReader::new(child.stdout.take().expect("piped")).lines().next();
        running.0.push(child);
        let line = match line {
            Some(Ok(line)) if line.starts_with("ready ") => line,
            _ => bail!("node {i} did not start; its log is {}", dir.with_extension("log").display()),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let role = if i == 0 { "has the package" } else { "fetches its units from the mesh" };
        crate::outln!("node{i}: {} listening on {} ({role})", words[1], words[2]);
        if first_addr.is_none() {
            first_addr = Some(format!("{}/p2p/{}", words[2], words[1]));
        }
    }

    let rt = crate::runtime()?;
    eprintln!("waiting for the members to meet, elect a leader and agree on a plan…");
    rt.block_on(wait_for_plan(&dirs))?;
    let request = PromptRequest {
        prompt: prompt.to_string(),
        max_tokens,
        sampling: SamplingConfig { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 },
        stop: vec![],
        chat: false,
        ignore_eos: false,
        model: None,
        private: false,
    };
    crate::out(&format!("prompt (asked on node1): {prompt}\nanswer: "));
    let mut summary = String::new();
    rt.block_on(crate::control::prompt(&dirs[1], request, &mut |event| match event {
        PromptEvent::Text(text) => crate::out(&text),
        PromptEvent::Waiting(line) => eprintln!("(waiting for {line})"),
        PromptEvent::Moving { why } => eprintln!("\n({why}; waiting for the next plan)"),
        PromptEvent::Replaying { done, total, .. } => eprintln!("(replayed {done} of {total} steps on the next plan)"),
        PromptEvent::Resumed { epoch, .. } => eprintln!("(the answer goes on on plan epoch {epoch})"),
        PromptEvent::HandedOver { epoch, .. } => eprintln!("\n(the answer moved to plan epoch {epoch} at a token boundary)"),
        PromptEvent::Done { tokens, decode_tokens_per_s, .. } => {
            summary = format!("({tokens} tokens, {decode_tokens_per_s:.1} tokens/s across the mesh; the built-in model has random weights, so the text is gibberish)");
        }
    }))?;
    crate::outln!();
    crate::outln!("{summary}");
    let view = rt.block_on(crate::plan_cmd::view(&dirs[1], None))?;
    crate::plan_cmd::print_view(&view, false);
    // node1's own fetch is in the view above.
    for (i, dir) in dirs.iter().enumerate().skip(2) {
        if let Some(fetch) = rt.block_on(crate::plan_cmd::view(dir, None))?.fetch {
            crate::outln!("node{i}: {fetch}");
        }
    }
    drop(running);
    Ok(())
}

/// The built-in tiny model as a package in `data_dir`, made on first use.
fn builtin_package(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let export = data_dir.join("builtin-tiny-export");
    let package_dir = data_dir.join("builtin-tiny");
    if !package_dir.join(package::MANIFEST).is_file() {
        if !export.join("model.onnx").is_file() {
            synth::write_export(&SynthConfig::tiny(), &export, &Bar::new())?;
        }
        package::write(&Model::from_export(&export)?, &package_dir, &Bar::new())?;
    }
    Ok(package_dir)
}

/// The first directory owns a new mesh; every directory gets a key and a certificate.
fn provision(dirs: &[PathBuf]) -> anyhow::Result<()> {
    let owner = OwnerKey::generate();
    owner.save(&dirs[0].join(llnode_mesh::cert::OWNER_KEY_FILE))?;
    for (i, dir) in dirs.iter().enumerate() {
        let key = DeviceKey::load_or_create(&dir.join(DEVICE_KEY_FILE))?;
        let mut trust = Trust::default();
        trust.install(
            owner.certify(&key.public(), &format!("node{i}"), now().saturating_sub(60), now() + 86_400),
            &key.peer_id(),
        )?;
        trust.save(dir)?;
    }
    Ok(())
}

/// Waits until every node holds the same plan, made with all of them live,
/// and it has stayed the same for a moment: members measure their links just
/// after they meet, and the leader may re-plan with those figures.
async fn wait_for_plan(dirs: &[PathBuf]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stable: Option<(u64, Instant)> = None;
    loop {
        let mut epochs = Vec::new();
        for dir in dirs {
            let view = crate::plan_cmd::view(dir, None).await?;
            let complete = view.members.len() + 1 == dirs.len();
            epochs.push(view.epoch.filter(|_| complete && view.plan.is_some()));
        }
        if let Some(epoch) = epochs[0].filter(|_| epochs.iter().all(|e| *e == epochs[0])) {
            match stable {
                // Segments load once the plan arrives; prompts wait for them.
                Some((e, since)) if e == epoch && since.elapsed() > Duration::from_millis(1500) => {
                    return Ok(());
                }
                Some((e, _)) if e == epoch => {}
                _ => stable = Some((epoch, Instant::now())),
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the nodes did not agree on a plan within 60 s; their logs are in {}",
                dirs[0].parent().unwrap_or(Path::new(".")).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
