//! Model packages, written by `llnode import`: each unit's graph in its own
//! file, weights in files grouped by the set of units that read them (a
//! device running a segment reads only that segment's weights; tied
//! embeddings are stored once), tokenizer and configs, and `manifest.json`
//! listing every file with its blake3 hash, the cost profile and each unit's
//! inputs and outputs. The package id is the hash of the manifest. Written
//! all or nothing; the same export always gives the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tract_onnx::pb::{self, GraphProto, OperatorSetIdProto, TensorProto};

use crate::atomic::AtomicDir;
use crate::cost::CostProfile;
use crate::model::{ImportError, Model, ModelInfo, Unit, require};
use crate::onnx::{self, Dim};
use crate::progress::Progress;
use crate::segment::UnitSpec;

pub const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;
const ALIGN: u64 = 64;
/// Files copied from the export when present.
const SIDE_FILES: [&str; 4] = ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub blake3: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestUnit {
    #[serde(flatten)]
    pub spec: UnitSpec,
    /// The unit's graph.
    pub file: String,
    /// Weight files it reads.
    pub weights: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeclaredInput {
    pub name: String,
    pub elem_type: i32,
    pub dims: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub model: ModelInfo,
    pub layers: usize,
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<DeclaredInput>,
    pub units: Vec<ManifestUnit>,
    pub cost: CostProfile,
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<(Manifest, String), ImportError> {
        let path = dir.join(MANIFEST);
        let bytes =
            std::fs::read(&path).map_err(|e| ImportError::Unreadable { path: path.clone(), reason: e.to_string() })?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| ImportError::Unreadable {
            path: path.clone(),
            reason: format!("not an llnode manifest: {e}"),
        })?;
        if manifest.format != FORMAT {
            return Err(ImportError::Unreadable {
                path,
                reason: format!("package format {} is not {FORMAT}; re-import the model", manifest.format),
            });
        }
        Ok((manifest, blake3::hash(&bytes).to_hex().to_string()))
    }
}

/// Writes `model` as a package in `out`; returns the package id.
pub fn write(model: &Model, out: &Path, progress: &dyn Progress) -> Result<String, ImportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| ImportError::Unreadable { path: path.clone(), reason: e.to_string() }
    };
    let dir = AtomicDir::create(out).map_err(io(out))?;
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join("units")).map_err(io(&root))?;
    std::fs::create_dir(root.join("weights")).map_err(io(&root))?;

    // Group weights by the set of units that read them.
    let mut readers: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (u, unit) in model.units.iter().enumerate() {
        for t in &unit.graph.initializer {
            readers.entry(t.name.clone()).or_default().insert(u);
        }
    }
    let group_file = |set: &BTreeSet<usize>| match set.len() {
        1 => format!("weights/{:03}.bin", set.first().expect("non-empty")),
        _ => format!("weights/shared-{}.bin", set.iter().map(|u| format!("{u:03}")).collect::<Vec<_>>().join("-")),
    };
    let total: u64 = readers.keys().filter_map(|n| find_tensor(model, n)).map(onnx::tensor_bytes).sum();
    progress.phase("writing weights", total);
    let mut placed: BTreeMap<String, (String, u64, u64)> = BTreeMap::new();
    let mut writers: BTreeMap<String, (BufWriter<std::fs::File>, u64)> = BTreeMap::new();
    for unit in &model.units {
        for t in &unit.graph.initializer {
            if placed.contains_key(&t.name) {
                continue;
            }
            let file = group_file(&readers[&t.name]);
            let (w, len) = match writers.entry(file.clone()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let f = std::fs::File::create(root.join(&file)).map_err(io(&root.join(&file)))?;
                    e.insert((BufWriter::new(f), 0))
                }
            };
            let pad = (ALIGN - *len % ALIGN) % ALIGN;
            w.write_all(&vec![0; pad as usize]).map_err(io(&root))?;
            *len += pad;
            let written = copy_tensor_data(t, &model.dir, w)?;
            placed.insert(t.name.clone(), (file, *len, written));
            *len += written;
            progress.advance(written);
        }
    }
    for (file, (w, _)) in writers {
        w.into_inner().map_err(|e| io(&root.join(&file))(e.into_error()))?.sync_all().map_err(io(&root))?;
    }

    let mut units = Vec::new();
    for (u, unit) in model.units.iter().enumerate() {
        let mut graph = unit.graph.clone();
        let mut weights = BTreeSet::new();
        for t in &mut graph.initializer {
            let (file, offset, length) = &placed[&t.name];
            onnx::set_external(t, file, *offset, *length);
            weights.insert(file.clone());
        }
        let file = format!("units/{u:03}-{}.onnx", unit.spec.name.replace('.', "-"));
        let proto = onnx::model(graph, model.opsets.clone());
        std::fs::write(root.join(&file), onnx::encode(&proto)).map_err(io(&root.join(&file)))?;
        units.push(ManifestUnit { spec: unit.spec.clone(), file, weights: weights.into_iter().collect() });
    }
    for name in SIDE_FILES {
        let from = model.dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, root.join(name)).map_err(io(&from))?;
        }
    }

    progress.phase("hashing", 0);
    let mut files = BTreeMap::new();
    for entry in walk(&root).map_err(io(&root))? {
        let rel = entry.strip_prefix(&root).expect("inside").to_string_lossy().replace('\\', "/");
        let mut hasher = blake3::Hasher::new();
        let bytes = hasher.update_reader(std::fs::File::open(&entry).map_err(io(&entry))?).map_err(io(&entry))?.count();
        files.insert(rel, FileEntry { bytes, blake3: hasher.finalize().to_hex().to_string() });
    }
    let manifest = Manifest {
        format: FORMAT,
        model: model.info.clone(),
        layers: model.layers,
        opsets: model.opsets.iter().map(|o| (o.domain.clone(), o.version)).collect(),
        inputs: model
            .inputs
            .iter()
            .filter_map(|i| {
                let (elem_type, dims) = onnx::tensor_type(i)?;
                Some(DeclaredInput { name: i.name.clone(), elem_type, dims: dims.iter().map(Dim::to_string).collect() })
            })
            .collect(),
        units,
        cost: CostProfile::of(model),
        files,
    };
    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifests serialise");
    std::fs::write(root.join(MANIFEST), &bytes).map_err(io(&root))?;
    dir.commit().map_err(io(out))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

impl Manifest {
    /// The files a device running units `units` reads: their graphs and weights.
    pub fn unit_files(&self, units: std::ops::Range<usize>) -> BTreeSet<String> {
        self.units[units]
            .iter()
            .flat_map(|u| std::iter::once(u.file.clone()).chain(u.weights.iter().cloned()))
            .collect()
    }

    /// The files an initiator reads: tokenizer and configs.
    pub fn side_files(&self) -> BTreeSet<String> {
        SIDE_FILES.iter().filter(|f| self.files.contains_key(**f)).map(|f| f.to_string()).collect()
    }
}

/// Checks every file against the manifest's hash; returns the package id.
pub fn verify(dir: &Path) -> Result<String, ImportError> {
    let (manifest, id) = Manifest::read(dir)?;
    for (name, entry) in &manifest.files {
        let path = dir.join(name);
        let mut hasher = blake3::Hasher::new();
        let file = std::fs::File::open(&path)
            .map_err(|e| ImportError::Unreadable { path: path.clone(), reason: e.to_string() })?;
        hasher
            .update_reader(file)
            .map_err(|e| ImportError::Unreadable { path: path.clone(), reason: e.to_string() })?;
        if hasher.finalize().to_hex().as_str() != entry.blake3 {
            return Err(ImportError::Unreadable {
                path,
                reason: "contents do not match the manifest's hash; re-import or fetch the package again".into(),
            });
        }
    }
    Ok(id)
}

/// Opens a package: unit graphs are read now, weights when a segment loads.
pub fn load(dir: &Path) -> Result<Model, ImportError> {
    let (manifest, _) = Manifest::read(dir)?;
    require(dir.join("tokenizer.json"), "the package is incomplete; import the model again")?;
    let all = 0..manifest.units.len();
    open(dir, manifest, &[all])
}

/// Opens the units in `held` of a package that may hold only those (a device's
/// share, fetched from the mesh). Every other unit keeps its spec but has an
/// empty graph, so only segments within `held` can be assembled.
pub fn load_units(dir: &Path, held: &[std::ops::Range<usize>]) -> Result<Model, ImportError> {
    let (manifest, _) = Manifest::read(dir)?;
    open(dir, manifest, held)
}

fn open(dir: &Path, manifest: Manifest, held: &[std::ops::Range<usize>]) -> Result<Model, ImportError> {
    let mut units = Vec::new();
    for (u, mu) in manifest.units.iter().enumerate() {
        let graph: GraphProto = if held.iter().any(|r| r.contains(&u)) {
            let path = dir.join(&mu.file);
            let proto = onnx::read_model(&path)
                .map_err(|e| ImportError::Unreadable { path: path.clone(), reason: e.to_string() })?;
            proto.graph.unwrap_or_default()
        } else {
            GraphProto::default()
        };
        units.push(Unit { spec: mu.spec.clone(), graph });
    }
    let inputs = manifest
        .inputs
        .iter()
        .map(|d| {
            let dims: Vec<Dim> =
                d.dims.iter().map(|s| s.parse().map(Dim::Fixed).unwrap_or_else(|_| Dim::Param(s.clone()))).collect();
            let elem = pb::tensor_proto::DataType::try_from(d.elem_type).unwrap_or(pb::tensor_proto::DataType::Float);
            onnx::value_info(&d.name, elem, &dims)
        })
        .collect();
    Ok(Model {
        dir: dir.to_path_buf(),
        info: manifest.model,
        opsets: manifest.opsets.into_iter().map(|(domain, version)| OperatorSetIdProto { domain, version }).collect(),
        layers: manifest.layers,
        units,
        inputs,
    })
}

fn find_tensor<'a>(model: &'a Model, name: &str) -> Option<&'a TensorProto> {
    model.units.iter().flat_map(|u| &u.graph.initializer).find(|t| t.name == name)
}

/// Writes a tensor's little-endian bytes, from inline data or the export's external file.
fn copy_tensor_data(t: &TensorProto, dir: &Path, out: &mut impl Write) -> Result<u64, ImportError> {
    let fail = |path: PathBuf, reason: String| ImportError::Unreadable { path, reason };
    if onnx::is_external(t) {
        let location = onnx::external_entry(t, "location")
            .ok_or_else(|| fail(dir.into(), format!("{} has no location", t.name)))?;
        let offset: u64 = onnx::external_entry(t, "offset").and_then(|v| v.parse().ok()).unwrap_or(0);
        let length =
            onnx::external_entry(t, "length").and_then(|v| v.parse().ok()).unwrap_or_else(|| onnx::tensor_bytes(t));
        let path = dir.join(location);
        let mut file = std::fs::File::open(&path).map_err(|e| fail(path.clone(), e.to_string()))?;
        file.seek(SeekFrom::Start(offset)).map_err(|e| fail(path.clone(), e.to_string()))?;
        let copied = std::io::copy(&mut file.take(length), out).map_err(|e| fail(path.clone(), e.to_string()))?;
        if copied != length {
            return Err(fail(
                path,
                format!("{} needs {length} bytes at offset {offset}; the file is truncated", t.name),
            ));
        }
        return Ok(copied);
    }
    if !t.raw_data.is_empty() {
        out.write_all(&t.raw_data).map_err(|e| fail(dir.into(), e.to_string()))?;
        return Ok(t.raw_data.len() as u64);
    }
    // Typed fields: re-encoded little-endian at the declared width.
    let bytes: Vec<u8> = if !t.float_data.is_empty() {
        t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !t.int64_data.is_empty() {
        t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !t.int32_data.is_empty() {
        // int32_data also carries narrower types.
        let width = onnx::elem_size(t.data_type) as usize;
        t.int32_data.iter().flat_map(|v| v.to_le_bytes()[..width.min(4)].to_vec()).collect()
    } else {
        t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    out.write_all(&bytes).map_err(|e| fail(dir.into(), e.to_string()))?;
    Ok(bytes.len() as u64)
}

fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() { stack.push(path) } else { files.push(path) }
        }
    }
    files.sort();
    Ok(files)
}
