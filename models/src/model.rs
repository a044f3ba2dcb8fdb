//! A model cut into units, whichever form it came in: a Hugging Face Optimum
//! export directory (cut in memory) or an llnode package (cut at import). It
//! assembles the ONNX graph of any range of consecutive units; weights stay
//! where they are (inline, or external files under [`Model::dir`]).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto, TensorProto, ValueInfoProto};

use crate::onnx;
use crate::segment::{self, SegmentError, UnitSpec, is_past};
use crate::shape;

/// What generation needs to know about a model, from `config.json` and
/// `generation_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub model_type: String,
    pub vocab_size: Option<usize>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    pub max_positions: Option<usize>,
}

impl ModelInfo {
    fn read(dir: &Path) -> Result<ModelInfo, ImportError> {
        let config: serde_json::Value = read_json(&dir.join("config.json"))?;
        let generation = match dir.join("generation_config.json") {
            p if p.exists() => read_json(&p)?,
            _ => serde_json::Value::Null,
        };
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            match v {
                serde_json::Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                serde_json::Value::Array(a) => a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32).collect(),
                _ => vec![],
            }
        };
        let mut eos = ids(&generation["eos_token_id"]);
        if eos.is_empty() {
            eos = ids(&config["eos_token_id"]);
        }
        let int = |keys: &[&str]| keys.iter().find_map(|k| config[*k].as_u64()).map(|v| v as usize);
        Ok(ModelInfo {
            model_type: config["model_type"].as_str().unwrap_or("unknown").to_string(),
            vocab_size: int(&["vocab_size"]),
            eos_token_ids: eos,
            max_positions: int(&["max_position_embeddings", "n_positions", "seq_length"]),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path} is missing: {hint}")]
    MissingFile { path: PathBuf, hint: &'static str },
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{0}")]
    Segment(#[from] SegmentError),
    #[error("tract cannot run this model: {reason}")]
    Unsupported { reason: String },
}

fn read_json(path: &Path) -> Result<serde_json::Value, ImportError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ImportError::Unreadable { path: path.into(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| ImportError::Unreadable { path: path.into(), reason: e.to_string() })
}

pub(crate) fn require(path: PathBuf, hint: &'static str) -> Result<PathBuf, ImportError> {
    if path.is_file() { Ok(path) } else { Err(ImportError::MissingFile { path, hint }) }
}

/// One unit: its place in the model and its own graph (nodes, weights,
/// declared inputs and outputs).
#[derive(Clone, Debug)]
pub struct Unit {
    pub spec: UnitSpec,
    pub graph: GraphProto,
}

#[derive(Clone, Debug)]
pub struct Model {
    /// Where external weight files are resolved and `tokenizer.json` lives.
    pub dir: PathBuf,
    pub info: ModelInfo,
    pub opsets: Vec<OperatorSetIdProto>,
    pub layers: usize,
    pub units: Vec<Unit>,
    /// The whole model's declared inputs (token ids, mask, positions, caches).
    pub inputs: Vec<ValueInfoProto>,
}

impl Model {
    /// Opens an export directory or a package, whichever `dir` holds.
    pub fn open(dir: &Path) -> Result<Model, ImportError> {
        if dir.join(crate::package::MANIFEST).is_file() { crate::package::load(dir) } else { Model::from_export(dir) }
    }

    /// Reads an Optimum "decoder with past" export and cuts it into units.
    pub fn from_export(dir: &Path) -> Result<Model, ImportError> {
        if !dir.is_dir() {
            return Err(ImportError::MissingFile {
                path: dir.into(),
                hint: "give the directory an Optimum export or `llnode import` wrote",
            });
        }
        let model_path = require(
            dir.join("model.onnx"),
            "export the model with `optimum-cli export onnx --task text-generation-with-past`",
        )?;
        require(dir.join("tokenizer.json"), "copy the model's tokenizer.json next to model.onnx")?;
        let info = ModelInfo::read(dir)?;
        let mut proto = onnx::read_model(&model_path)
            .map_err(|e| ImportError::Unreadable { path: model_path.clone(), reason: e.to_string() })?;
        let graph = proto
            .graph
            .as_mut()
            .ok_or_else(|| ImportError::Unreadable { path: model_path.clone(), reason: "no graph".into() })?;
        shape::normalize(graph);
        let unsupported = |e: anyhow::Error| ImportError::Unsupported { reason: format!("{e:#}") };
        let mut infos = shape::infer(&proto, dir).map_err(unsupported)?;
        let graph = proto.graph.as_mut().expect("checked above");
        shape::rewrite_shapes(graph, &infos);
        let segmentation = segment::segment(graph)?;
        for v in graph.input.iter().chain(graph.output.iter()) {
            infos.insert(v.name.clone(), v.clone());
        }
        for unit in &segmentation.units {
            for name in unit.inputs.iter().chain(unit.outputs.iter().map(|o| &o.name)) {
                if !infos.contains_key(name) {
                    return Err(ImportError::Unsupported {
                        reason: format!("tract cannot tell the shape of {name}, which crosses units"),
                    });
                }
            }
        }
        let graph = proto.graph.take().expect("checked above");
        let units = split_units(graph.node, graph.initializer, segmentation.units, &infos);
        Ok(Model {
            dir: dir.to_path_buf(),
            info,
            opsets: proto.opset_import,
            layers: segmentation.layers,
            units,
            inputs: graph.input,
        })
    }

    /// The ONNX model running units `range` as one graph. It returns the
    /// tensors in `outputs` plus the caches of its layers.
    pub fn segment_proto(&self, range: Range<usize>, outputs: &[String]) -> ModelProto {
        let mut graph = GraphProto { name: format!("units_{}_{}", range.start, range.end), ..Default::default() };
        let mut produced = HashSet::new();
        let mut initializers = HashSet::new();
        let mut declared = HashMap::new();
        for unit in &self.units[range.clone()] {
            for node in &unit.graph.node {
                // Constant subgraphs are copied into every unit that needs them.
                if node.output.iter().all(|o| produced.contains(o)) {
                    continue;
                }
                produced.extend(node.output.iter().cloned());
                graph.node.push(node.clone());
            }
            for t in &unit.graph.initializer {
                if initializers.insert(t.name.clone()) {
                    graph.initializer.push(t.clone());
                }
            }
            for v in unit.graph.input.iter().chain(unit.graph.output.iter()) {
                declared.entry(v.name.clone()).or_insert_with(|| v.clone());
            }
        }
        for unit in &self.units[range.clone()] {
            for input in unit.spec.inputs.iter().chain(&unit.spec.shape_inputs) {
                if !produced.contains(input) && !graph.input.iter().any(|v| &v.name == input) {
                    graph.input.push(declared[input].clone());
                }
            }
            for out in &unit.spec.outputs {
                let wanted = outputs.contains(&out.name) || (segment::is_present(&out.name) && out.graph_output);
                if wanted && !graph.output.iter().any(|v| v.name == out.name) {
                    graph.output.push(declared[&out.name].clone());
                }
            }
        }
        onnx::model(graph, self.opsets.clone())
    }

    /// The declared cache input `name`: element type and shape before any token.
    pub fn empty_cache_shape(&self, name: &str) -> Option<(i32, Vec<usize>)> {
        let info = self.inputs.iter().find(|i| i.name == name && is_past(&i.name))?;
        shape::concrete(info, 0, 0)
    }
}

/// Gives each unit its nodes, weights and declarations. Weights read by one
/// unit only are moved, not copied.
fn split_units(
    nodes: Vec<tract_onnx::pb::NodeProto>,
    initializers: Vec<TensorProto>,
    specs: Vec<UnitSpec>,
    infos: &HashMap<String, ValueInfoProto>,
) -> Vec<Unit> {
    let mut uses: HashMap<String, usize> = HashMap::new();
    for spec in &specs {
        for name in &spec.initializers {
            *uses.entry(name.clone()).or_default() += 1;
        }
    }
    let mut pool: HashMap<String, TensorProto> = initializers.into_iter().map(|t| (t.name.clone(), t)).collect();
    specs
        .into_iter()
        .map(|spec| {
            let mut graph = GraphProto { name: spec.name.clone(), ..Default::default() };
            graph.node = spec.nodes.iter().map(|&i| nodes[i].clone()).collect();
            for name in &spec.initializers {
                let left = uses.get_mut(name).expect("counted");
                *left -= 1;
                let tensor = if *left == 0 { pool.remove(name) } else { pool.get(name).cloned() };
                graph.initializer.extend(tensor);
            }
            graph.input = spec.inputs.iter().chain(&spec.shape_inputs).map(|n| infos[n].clone()).collect();
            graph.output = spec.outputs.iter().map(|o| infos[&o.name].clone()).collect();
            Unit { spec, graph }
        })
        .collect()
}
