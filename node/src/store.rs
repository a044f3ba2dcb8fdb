//! The model store: the packages this node serves and the unit files it
//! fetched from the mesh.
//!
//! A node started with `--model <package>` is a source of that package. At
//! start it checks every file against the manifest's BLAKE3 hash and keeps a
//! bao outboard of each (the hash tree of BLAKE3's verified streaming), so it
//! can send any byte range of a file together with the proof that the range
//! belongs to the file the manifest names. A node the plan gives units it does
//! not have fetches exactly those files, and the manifest (whose hash is the
//! package id), from members that have them, in 1 MiB slices checked as they
//! arrive. Verified bytes go to a `.part` file, so an interrupted fetch resumes
//! where it stopped; the file is renamed into place only when complete, and a
//! slice that fails verification is fetched again from another member.
//! Fetched packages live in `<data-dir>/models/<package-id>/`, holding only
//! the files this device needed; they are served to others in turn.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llnode_mesh::wire::{ControlRequest, ControlResponse};
use llnode_mesh::{MeshClient, PeerId};
use llnode_models::package::{FileEntry, MANIFEST, Manifest};

use crate::protocol::NodeMessage;

/// Bytes asked for in one request (a multiple of bao's 1 KiB chunks).
pub const SLICE_BYTES: u64 = 1 << 20;
/// Manifests travel whole, in one control frame.
const MANIFEST_LIMIT: usize = 4 << 20;
/// How often a running fetch reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub struct Store {
    /// `<data-dir>/models`: fetched packages, one directory per id, and `.outboard/`.
    root: PathBuf,
    /// Complete packages this node was started with, by id.
    sources: BTreeMap<String, PathBuf>,
    /// Members that said they have a model, by model id.
    holders: Mutex<HashMap<String, BTreeSet<PeerId>>>,
    manifests: Mutex<HashMap<String, Arc<Manifest>>>,
    /// (model, file) checked against the manifest since this node started.
    verified: Mutex<HashSet<(String, String)>>,
    /// One fetch at a time: a second caller finds the first one's files.
    fetching: tokio::sync::Mutex<()>,
    status: Mutex<Option<String>>,
    rejected: AtomicU64,
    /// Bytes asked for per request ([`SLICE_BYTES`]; tests use less).
    slice_bytes: u64,
}

impl Store {
    /// Opens `<data_dir>/models` and checks each source package's files
    /// (blocking: one pass over the weights).
    pub fn open(data_dir: &Path, sources: &[PathBuf]) -> anyhow::Result<Store> {
        use anyhow::Context;
        let root = data_dir.join("models");
        std::fs::create_dir_all(root.join(".outboard")).with_context(|| format!("cannot create {}", root.display()))?;
        let mut store = Store {
            root,
            sources: BTreeMap::new(),
            holders: Mutex::default(),
            manifests: Mutex::default(),
            verified: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
            status: Mutex::default(),
            rejected: AtomicU64::new(0),
            slice_bytes: SLICE_BYTES,
        };
        for dir in sources {
            let (manifest, id) = Manifest::read(dir)
                .with_context(|| format!("--model {} must be a package written by `llnode import`", dir.display()))?;
            let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
            let started = Instant::now();
            for (name, entry) in &manifest.files {
                store
                    .index(&dir.join(name), entry)
                    .map_err(anyhow::Error::msg)
                    .context("run `llnode model verify` on it, or import the model again")?;
                store.verified.lock().expect("store lock").insert((id.clone(), name.clone()));
            }
            tracing::info!(
                "checked package {} ({:.1} MiB) in {:.2} s",
                short(&id),
                mib(bytes),
                started.elapsed().as_secs_f64()
            );
            store.manifests.lock().expect("store lock").insert(id.clone(), Arc::new(manifest));
            store.sources.insert(id, dir.clone());
        }
        Ok(store)
    }

    /// The packages this node can serve files of: sources and fetched ones.
    pub fn models(&self) -> Vec<String> {
        let mut ids: BTreeSet<String> = self.sources.keys().cloned().collect();
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && entry.path().join(MANIFEST).is_file() {
                    ids.insert(name);
                }
            }
        }
        ids.into_iter().collect()
    }

    /// The first source package, the one this node plans for when it leads.
    pub fn source(&self) -> Option<(String, Arc<Manifest>)> {
        let id = self.sources.keys().next()?.clone();
        let manifest = self.manifest(&id)?;
        Some((id, manifest))
    }

    pub fn manifest(&self, model: &str) -> Option<Arc<Manifest>> {
        if let Some(m) = self.manifests.lock().expect("store lock").get(model) {
            return Some(m.clone());
        }
        let dir = self.dir(model)?;
        let (manifest, id) = Manifest::read(&dir).ok()?;
        if id != model {
            return None;
        }
        let manifest = Arc::new(manifest);
        self.manifests.lock().expect("store lock").insert(id, manifest.clone());
        Some(manifest)
    }

    /// Where the package's files are (or go).
    fn dir(&self, model: &str) -> Option<PathBuf> {
        if let Some(dir) = self.sources.get(model) {
            return Some(dir.clone());
        }
        // Ids are hex hashes; anything else never names a directory.
        let dir = self.root.join(model);
        (model.len() == 64 && model.bytes().all(|b| b.is_ascii_hexdigit()) && dir.join(MANIFEST).is_file())
            .then_some(dir)
    }

    pub fn set_holder(&self, peer: PeerId, models: &[String]) {
        let mut holders = self.holders.lock().expect("store lock");
        for (model, peers) in holders.iter_mut() {
            if !models.contains(model) {
                peers.remove(&peer);
            }
        }
        for model in models {
            holders.entry(model.clone()).or_default().insert(peer);
        }
    }

    pub fn peer_gone(&self, peer: PeerId) {
        for peers in self.holders.lock().expect("store lock").values_mut() {
            peers.remove(&peer);
        }
    }

    /// Every package this node or a member it knows of can serve.
    pub fn known_models(&self) -> BTreeSet<String> {
        let mut ids: BTreeSet<String> = self.models().into_iter().collect();
        ids.extend(
            self.holders
                .lock()
                .expect("store lock")
                .iter()
                .filter(|(_, peers)| !peers.is_empty())
                .map(|(id, _)| id.clone()),
        );
        ids
    }

    fn holders_of(&self, model: &str) -> Vec<PeerId> {
        self.holders.lock().expect("store lock").get(model).map(|p| p.iter().copied().collect()).unwrap_or_default()
    }

    /// A line about the fetch in progress (or the last one), for `llnode plan`.
    pub fn status(&self) -> Option<String> {
        let line = self.status.lock().expect("store lock").clone()?;
        match self.rejected.load(Ordering::Relaxed) {
            0 => Some(line),
            n => Some(format!("{line}; {n} slice(s) failed verification and were fetched again")),
        }
    }

    fn set_status(&self, line: String) {
        *self.status.lock().expect("store lock") = Some(line);
    }

    fn outboard_path(&self, hash: &str) -> PathBuf {
        self.root.join(".outboard").join(format!("{hash}.obao"))
    }

    /// Hashes `path`, which must match `entry`, and keeps its outboard (blocking).
    fn index(&self, path: &Path, entry: &FileEntry) -> Result<(), String> {
        let fail = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
        let file = std::fs::File::open(path).map_err(fail)?;
        let mut encoder = bao::encode::Encoder::new_outboard(std::io::Cursor::new(Vec::new()));
        let bytes = std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, file), &mut encoder).map_err(fail)?;
        let hash = encoder.finalize().map_err(fail)?;
        if bytes != entry.bytes || hash.to_hex().as_str() != entry.blake3 {
            return Err(format!("{} does not match its manifest's hash", path.display()));
        }
        let outboard = encoder.into_inner().into_inner();
        // Named by the content's hash: one already there with the right length is this one.
        let path = self.outboard_path(&entry.blake3);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == outboard.len() as u64) {
            return Ok(());
        }
        llnode_mesh::file::write_atomic(&path, &outboard, false).map_err(fail)
    }

    async fn index_blocking(self: &Arc<Self>, path: PathBuf, entry: FileEntry) -> Result<(), String> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.index(&path, &entry)).await.map_err(|e| e.to_string())?
    }

    /// Removes fetched unit files of `model` that are not in `keep` (the
    /// units this device runs now); the manifest, tokenizer and configs stay.
    /// A source's own package is never touched.
    pub fn retain(&self, model: &str, keep: &BTreeSet<String>) {
        if self.sources.contains_key(model) {
            return;
        }
        let Some(manifest) = self.manifest(model) else { return };
        let side = manifest.side_files();
        let dir = self.root.join(model);
        let mut removed = 0;
        for file in manifest.files.keys().filter(|f| !keep.contains(*f) && !side.contains(*f)) {
            let part = dir.join(".partial").join(file.replace('/', "%"));
            if std::fs::remove_file(dir.join(file)).is_ok() {
                removed += 1;
            }
            let _ = std::fs::remove_file(part);
            self.verified.lock().expect("store lock").remove(&(model.to_string(), file.clone()));
        }
        if removed > 0 {
            tracing::info!("removed {removed} file(s) of model {} that this device no longer runs", short(model));
        }
    }

    /// Answers a member's fetch: the manifest whole, or a verifiable slice of a file (blocking).
    pub fn serve(&self, model: &str, file: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let dir = self.dir(model).ok_or_else(|| format!("this node does not have model {}", short(model)))?;
        if file == MANIFEST {
            return std::fs::read(dir.join(MANIFEST)).map_err(|e| format!("cannot read the manifest: {e}"));
        }
        let manifest = self.manifest(model).ok_or("the manifest is unreadable")?;
        let entry =
            manifest.files.get(file).ok_or_else(|| format!("{file} is not a file of model {}", short(model)))?;
        let (path, outboard) = (dir.join(file), self.outboard_path(&entry.blake3));
        if !self.verified.lock().expect("store lock").contains(&(model.to_string(), file.to_string()))
            || !outboard.is_file()
        {
            return Err(format!("this node does not hold {file}"));
        }
        let open = |p: &Path| std::fs::File::open(p).map_err(|e| format!("cannot read {file}: {e}"));
        let mut slice = Vec::new();
        bao::encode::SliceExtractor::new_outboard(open(&path)?, open(&outboard)?, offset, len.min(SLICE_BYTES))
            .read_to_end(&mut slice)
            .map_err(|e| format!("cannot read {file}: {e}"))?;
        Ok(slice)
    }

    /// The model's manifest, fetched from a member when this node lacks it.
    pub async fn ensure_manifest(self: &Arc<Self>, client: &MeshClient, model: &str) -> Result<Arc<Manifest>, String> {
        self.ensure(client, model, &BTreeSet::new()).await?;
        self.manifest(model).ok_or_else(|| format!("the manifest of model {} is unreadable", short(model)))
    }

    /// Makes sure this node holds `files` of `model` (and its manifest),
    /// fetching what is missing from members that have the model. Returns the
    /// package directory.
    pub async fn ensure(
        self: &Arc<Self>,
        client: &MeshClient,
        model: &str,
        files: &BTreeSet<String>,
    ) -> Result<PathBuf, String> {
        self.ensure_with(model, files, |peer, message| request(client, peer, message)).await
    }

    /// [`Store::ensure`] with the request to a member given (the mesh, or a test's stand-in).
    pub async fn ensure_with<R, F>(
        self: &Arc<Self>,
        model: &str,
        files: &BTreeSet<String>,
        request: R,
    ) -> Result<PathBuf, String>
    where
        R: Fn(PeerId, NodeMessage) -> F,
        F: Future<Output = Result<Vec<u8>, String>>,
    {
        if let Some(dir) = self.sources.get(model) {
            return Ok(dir.clone());
        }
        let _one_at_a_time = self.fetching.lock().await;
        let dir = self.root.join(model);
        let manifest = match self.manifest(model) {
            Some(m) => m,
            None => self.fetch_manifest(model, &request).await?,
        };
        let mut missing = Vec::new();
        for file in files {
            let entry =
                manifest.files.get(file).ok_or_else(|| format!("{file} is not a file of model {}", short(model)))?;
            let key = (model.to_string(), file.clone());
            if self.verified.lock().expect("store lock").contains(&key) {
                continue;
            }
            let path = dir.join(file);
            if path.is_file() {
                match self.index_blocking(path.clone(), entry.clone()).await {
                    Ok(()) => {
                        self.verified.lock().expect("store lock").insert(key);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("{e}; fetching it again");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            missing.push((file.clone(), entry.clone()));
        }
        if missing.is_empty() {
            return Ok(dir);
        }
        let mut progress = Progress::new(model, missing.iter().map(|(_, e)| e.bytes).sum(), missing.len());
        for (file, entry) in &missing {
            if let Err(e) = self.fetch_file(model, file, entry, &request, &mut progress).await {
                self.set_status(format!("fetch failed: {e}"));
                return Err(e);
            }
        }
        let line = progress.finished();
        tracing::info!("{line}");
        self.set_status(line);
        Ok(dir)
    }

    async fn fetch_manifest<R, F>(&self, model: &str, request: &R) -> Result<Arc<Manifest>, String>
    where
        R: Fn(PeerId, NodeMessage) -> F,
        F: Future<Output = Result<Vec<u8>, String>>,
    {
        let mut last = format!("no member has model {}; start a node with --model <package>", short(model));
        for peer in self.holders_of(model) {
            let message =
                NodeMessage::Fetch { model: model.to_string(), file: MANIFEST.to_string(), offset: 0, len: 0 };
            match request(peer, message).await {
                Ok(bytes) if bytes.len() <= MANIFEST_LIMIT && blake3::hash(&bytes).to_hex().as_str() == model => {
                    let path = self.root.join(model).join(MANIFEST);
                    llnode_mesh::file::write_atomic(&path, &bytes, false)
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    return self
                        .manifest(model)
                        .ok_or_else(|| format!("the manifest of {} is not one this version reads", short(model)));
                }
                Ok(_) => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    last = format!("the manifest from {peer} does not hash to the model id");
                    tracing::warn!("{last}; asking another member");
                }
                Err(e) => last = format!("{peer}: {e}"),
            }
        }
        Err(last)
    }

    async fn fetch_file<R, F>(
        self: &Arc<Self>,
        model: &str,
        file: &str,
        entry: &FileEntry,
        request: &R,
        progress: &mut Progress,
    ) -> Result<(), String>
    where
        R: Fn(PeerId, NodeMessage) -> F,
        F: Future<Output = Result<Vec<u8>, String>>,
    {
        let dir = self.root.join(model);
        let part = dir.join(".partial").join(file.replace('/', "%"));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: std::io::Error| format!("cannot write {}: {e}; check the disk", p.display())
        };
        std::fs::create_dir_all(part.parent().expect("inside the store")).map_err(io(&part))?;
        // Everything in the part file was verified before it was written.
        let mut offset = std::fs::metadata(&part).map_or(0, |m| m.len());
        if offset > entry.bytes {
            std::fs::remove_file(&part).map_err(io(&part))?;
            offset = 0;
        }
        progress.resumed(offset);
        let hash =
            blake3::Hash::from_hex(&entry.blake3).map_err(|_| format!("the manifest's hash of {file} is malformed"))?;
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&part).map_err(io(&part))?;
        let peers = self.holders_of(model);
        if peers.is_empty() {
            return Err(format!("no member has model {} any more; start a node with --model <package>", short(model)));
        }
        let mut next = 0;
        while offset < entry.bytes {
            let len = self.slice_bytes.min(entry.bytes - offset);
            let mut last = String::new();
            let mut bytes = None;
            for _ in 0..peers.len() {
                let peer = peers[next % peers.len()];
                let message = NodeMessage::Fetch { model: model.to_string(), file: file.to_string(), offset, len };
                match request(peer, message).await.and_then(|slice| open_slice(&slice, &hash, offset, len)) {
                    Ok(b) => {
                        bytes = Some(b);
                        break;
                    }
                    Err(e) => {
                        if e.starts_with(CORRUPT) {
                            self.rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                "{file} bytes {offset}.. from {peer} failed verification; fetching them again from another member"
                            );
                        }
                        last = format!("{peer}: {e}");
                        next += 1;
                    }
                }
            }
            let bytes =
                bytes.ok_or_else(|| format!("no member could send {file} of model {} (last: {last})", short(model)))?;
            let write = io(&part);
            out = tokio::task::spawn_blocking(move || out.write_all(&bytes).map(|()| out))
                .await
                .map_err(|e| e.to_string())?
                .map_err(write)?;
            offset += len;
            if let Some(line) = progress.advance(len) {
                tracing::info!("{line}");
                self.set_status(line);
            }
        }
        out.sync_all().map_err(io(&part))?;
        drop(out);
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("inside the package")).map_err(io(&path))?;
        std::fs::rename(&part, &path).map_err(io(&path))?;
        // Checked once more whole, and indexed so this node can serve it in turn.
        self.index_blocking(path, entry.clone()).await?;
        self.verified.lock().expect("store lock").insert((model.to_string(), file.to_string()));
        Ok(())
    }
}

const CORRUPT: &str = "slice failed verification";

/// Checks a slice against the file's hash; returns its content bytes.
fn open_slice(slice: &[u8], hash: &blake3::Hash, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut content = Vec::with_capacity(len as usize);
    bao::decode::SliceDecoder::new(slice, hash, offset, len)
        .read_to_end(&mut content)
        .map_err(|e| format!("{CORRUPT}: {e}"))?;
    if content.len() as u64 != len {
        return Err(format!("{CORRUPT}: {} bytes instead of {len}", content.len()));
    }
    Ok(content)
}

/// A fetch request over the mesh.
async fn request(client: &MeshClient, peer: PeerId, message: NodeMessage) -> Result<Vec<u8>, String> {
    match client.request(peer, ControlRequest::Node(message.encode())).await {
        Ok(ControlResponse::Node(bytes)) => Ok(bytes),
        Ok(ControlResponse::Refused { reason }) => Err(reason),
        Ok(_) => Err("an answer that is not a slice".into()),
        Err(e) => Err(e.to_string()),
    }
}

struct Progress {
    model: String,
    files: usize,
    total: u64,
    done: u64,
    resumed: u64,
    started: Instant,
    reported: Instant,
}

impl Progress {
    fn new(model: &str, total: u64, files: usize) -> Progress {
        let now = Instant::now();
        Progress { model: short(model), files, total, done: 0, resumed: 0, started: now, reported: now }
    }

    fn resumed(&mut self, bytes: u64) {
        self.done += bytes;
        self.resumed += bytes;
    }

    /// A progress line, at most once a second.
    fn advance(&mut self, bytes: u64) -> Option<String> {
        self.done += bytes;
        if self.reported.elapsed() < PROGRESS_EVERY {
            return None;
        }
        self.reported = Instant::now();
        let percent = 100.0 * self.done as f64 / self.total.max(1) as f64;
        Some(format!(
            "fetching {} file(s) of model {}: {:.1} of {:.1} MiB ({percent:.0}%)",
            self.files,
            self.model,
            mib(self.done),
            mib(self.total)
        ))
    }

    fn finished(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let fetched = self.done - self.resumed;
        let resumed =
            if self.resumed > 0 { format!(", resumed after {:.1} MiB", mib(self.resumed)) } else { String::new() };
        format!(
            "fetched {} file(s) of model {} ({:.1} MiB) in {secs:.2} s ({:.0} MiB/s){resumed}",
            self.files,
            self.model,
            mib(fetched),
            mib(fetched) / secs.max(1e-6)
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

pub fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// The built-in tiny model as a package in `dir`; returns its path and id.
    fn package(dir: &Path) -> (PathBuf, String) {
        let silent = llnode_models::progress::Silent;
        let export = llnode_models::synth::write_export(
            &llnode_models::synth::SynthConfig::tiny(),
            &dir.join("export"),
            &silent,
        )
        .unwrap();
        let model = llnode_models::model::Model::from_export(&export).unwrap();
        let id = llnode_models::package::write(&model, &dir.join("package"), &silent).unwrap();
        (dir.join("package"), id)
    }

    /// A member that serves from `source`, through the same code that answers the mesh.
    fn serve(source: &Store, message: NodeMessage) -> Result<Vec<u8>, String> {
        match message {
            NodeMessage::Fetch { model, file, offset, len } => source.serve(&model, &file, offset, len),
            _ => Err("not a fetch".into()),
        }
    }

    fn hash(path: &Path) -> String {
        blake3::hash(&std::fs::read(path).unwrap()).to_hex().to_string()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn fetches_only_the_files_asked_for_verifies_resumes_and_refetches_corrupt_slices() {
        let root = tempfile::tempdir().unwrap();
        let (package, id) = package(root.path());
        let source = Store::open(&root.path().join("source"), std::slice::from_ref(&package)).unwrap();
        let mut fetcher = Store::open(&root.path().join("fetcher"), &[]).unwrap();
        fetcher.slice_bytes = 16 << 10;
        let fetcher = Arc::new(fetcher);
        // Holders are asked in peer id order: the bad one first, so its slice is tried.
        let (a, b) = (PeerId::random(), PeerId::random());
        let (bad, good) = (a.min(b), a.max(b));
        fetcher.set_holder(good, std::slice::from_ref(&id));
        let manifest = source.manifest(&id).unwrap();
        let layer = manifest.unit_files(1..2);
        let weights = manifest.units[1].weights[0].clone();
        assert!(manifest.files[&weights].bytes > 3 * fetcher.slice_bytes, "the test needs a file of several slices");

        // The link drops after three slices: what arrived is kept, nothing is in place yet.
        let served = AtomicUsize::new(0);
        let dropping = |_peer, message| {
            let n = served.fetch_add(1, Ordering::SeqCst);
            let answer = if n < 4 { serve(&source, message) } else { Err("connection lost".to_string()) };
            async move { answer }
        };
        let err = fetcher.ensure_with(&id, &layer, dropping).await.unwrap_err();
        assert!(err.contains("connection lost"), "{err}");
        let dir = root.path().join("fetcher/models").join(&id);
        assert!(!dir.join(&weights).exists());
        let part = dir.join(".partial").join(weights.replace('/', "%"));
        let kept = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        assert!(kept > 0 && kept.is_multiple_of(fetcher.slice_bytes), "verified slices are kept: {kept}");

        // Resumed: asks only for what is missing. A second member's copy is
        // corrupted in one slice; that slice is fetched again from the first.
        fetcher.set_holder(bad, std::slice::from_ref(&id));
        let asked = Mutex::new(Vec::new());
        let resuming = |peer, message: NodeMessage| {
            if let NodeMessage::Fetch { file, offset, .. } = &message {
                asked.lock().unwrap().push((file.clone(), *offset));
            }
            let mut answer = serve(&source, message);
            if peer == bad
                && let Ok(slice) = &mut answer
            {
                let last = slice.len() - 1;
                slice[last] ^= 1;
            }
            async move { answer }
        };
        let got = fetcher.ensure_with(&id, &layer, resuming).await.unwrap();
        assert_eq!(got, dir);
        assert!(fetcher.rejected.load(Ordering::Relaxed) >= 1, "the corrupt slice was noticed");
        let asked = asked.into_inner().unwrap();
        let first = asked.iter().find(|(f, _)| *f == weights).unwrap();
        assert_eq!(first.1, kept, "the fetch resumed where it stopped");
        for file in &layer {
            assert_eq!(hash(&dir.join(file)), manifest.files[file].blake3, "{file}");
        }
        assert!(!part.exists());

        // Exactly the unit's files (and the manifest) are on disk.
        let mut on_disk: Vec<String> = walk(&dir).into_iter().filter(|f| !f.starts_with(".partial")).collect();
        on_disk.sort();
        let mut expected: Vec<String> = layer.iter().cloned().chain([MANIFEST.to_string()]).collect();
        expected.sort();
        assert_eq!(on_disk, expected);

        // Held now: served to others in turn, and not fetched again.
        let slice = fetcher.serve(&id, &weights, 0, 1024).unwrap();
        assert_eq!(
            open_slice(&slice, &blake3::Hash::from_hex(&manifest.files[&weights].blake3).unwrap(), 0, 1024)
                .unwrap()
                .len(),
            1024
        );
        let never = |_, _| async { Err::<Vec<u8>, String>("no request expected".into()) };
        fetcher.ensure_with(&id, &layer, never).await.unwrap();

        // A file nobody can send intact is an error that says so, not a hang.
        let only_bad = Arc::new(Store::open(&root.path().join("other"), &[]).unwrap());
        only_bad.set_holder(bad, std::slice::from_ref(&id));
        let corrupt = |_, message| {
            let mut answer = serve(&source, message);
            if let Ok(slice) = &mut answer
                && slice.len() > 64 * 1024
            {
                let last = slice.len() - 1;
                slice[last] ^= 1;
            }
            async move { answer }
        };
        let err = only_bad.ensure_with(&id, &layer, corrupt).await.unwrap_err();
        assert!(err.contains("no member could send") && err.contains(CORRUPT), "{err}");
    }

    #[test]
    fn a_source_refuses_files_it_does_not_list_and_a_damaged_package() {
        let root = tempfile::tempdir().unwrap();
        let (package, id) = package(root.path());
        let source = Store::open(&root.path().join("source"), std::slice::from_ref(&package)).unwrap();
        assert!(source.serve(&id, "../../etc/passwd", 0, 10).unwrap_err().contains("not a file"));
        assert!(source.serve(&"0".repeat(64), "manifest.json", 0, 0).unwrap_err().contains("does not have"));
        assert_eq!(blake3::hash(&source.serve(&id, MANIFEST, 0, 0).unwrap()).to_hex().as_str(), id);

        let weights = package.join("weights/001.bin");
        let mut bytes = std::fs::read(&weights).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&weights, bytes).unwrap();
        let err = Store::open(&root.path().join("again"), &[package]).err().unwrap();
        assert!(format!("{err:#}").contains("does not match"), "{err:#}");
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap().flatten() {
                if entry.path().is_dir() {
                    stack.push(entry.path());
                } else {
                    files.push(entry.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        files
    }
}
