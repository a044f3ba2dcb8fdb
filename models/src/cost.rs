//! What running each unit costs, for the planner: weight bytes, FLOPs per
//! token (2 per multiply-accumulate against a weight matrix; attention over
//! the context is not counted), bytes leaving each unit per decoded token, and
//! the KV cache each layer adds per token. Lengths that grow with the context
//! (a mask row) are priced at [`REFERENCE_CONTEXT`] tokens.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::model::Model;
use crate::onnx::{self, Dim};
use crate::segment::{is_past, is_present};
use crate::shape;

pub const REFERENCE_CONTEXT: i64 = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitCost {
    pub name: String,
    pub weight_bytes: u64,
    pub flops_per_token: u64,
    /// The residual stream into the next unit, per decoded token.
    pub out_bytes_per_token: u64,
    /// Keys and values this unit stores per token of context.
    pub kv_bytes_per_token: u64,
}

/// A tensor that skips units: from its producer straight to each consumer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SkipTensor {
    pub name: String,
    pub producer: usize,
    pub consumers: Vec<usize>,
    pub bytes_per_token: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostProfile {
    pub units: Vec<UnitCost>,
    pub skips: Vec<SkipTensor>,
    /// Weights read by several units (tied embeddings), counted once.
    pub shared_weight_bytes: u64,
}

impl CostProfile {
    pub fn of(model: &Model) -> CostProfile {
        let mut declared: HashMap<&str, &tract_onnx::pb::ValueInfoProto> = HashMap::new();
        for unit in &model.units {
            for v in unit.graph.input.iter().chain(unit.graph.output.iter()) {
                declared.entry(v.name.as_str()).or_insert(v);
            }
        }
        let bytes_of = |name: &str| declared.get(name).map_or(0, |v| decode_bytes(v));
        let mut units = Vec::new();
        let mut skips = Vec::new();
        let mut seen = HashMap::new();
        for (u, unit) in model.units.iter().enumerate() {
            let weights: HashMap<&str, &tract_onnx::pb::TensorProto> =
                unit.graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
            let mut out_bytes = 0;
            for o in unit.spec.outputs.iter().filter(|o| !is_present(&o.name) && o.name != "logits") {
                if o.consumers == [u + 1] {
                    out_bytes += bytes_of(&o.name);
                } else {
                    skips.push(SkipTensor {
                        name: o.name.clone(),
                        producer: u,
                        consumers: o.consumers.clone(),
                        bytes_per_token: bytes_of(&o.name),
                    });
                }
            }
            for t in &unit.graph.initializer {
                seen.entry(t.name.clone()).or_insert((0u32, onnx::tensor_bytes(t))).0 += 1;
            }
            units.push(UnitCost {
                name: unit.spec.name.clone(),
                weight_bytes: unit.graph.initializer.iter().map(onnx::tensor_bytes).sum(),
                flops_per_token: matmul_flops(&unit.graph, &weights),
                out_bytes_per_token: out_bytes,
                kv_bytes_per_token: unit
                    .spec
                    .inputs
                    .iter()
                    .filter(|n| is_past(n))
                    .map(|n| per_token_bytes(declared.get(n.as_str()).copied()))
                    .sum(),
            });
        }
        let shared_weight_bytes = seen.values().filter(|(n, _)| *n > 1).map(|(_, b)| b).sum();
        CostProfile { units, skips, shared_weight_bytes }
    }

    pub fn total_weight_bytes(&self) -> u64 {
        self.units.iter().map(|u| u.weight_bytes).sum::<u64>() - self.shared_weight_bytes
    }
}

/// 2 FLOPs per weight element of every MatMul/Gemm with a constant operand
/// (directly, or through one constant op such as a transpose).
fn matmul_flops(graph: &tract_onnx::pb::GraphProto, weights: &HashMap<&str, &tract_onnx::pb::TensorProto>) -> u64 {
    // A constant op reads weights only: a norm's Mul reads an activation too,
    // and its output is no weight.
    let through: HashMap<&str, &str> = graph
        .node
        .iter()
        .filter(|n| !n.input.is_empty() && n.input.iter().all(|i| weights.contains_key(i.as_str())))
        .filter_map(|n| Some((n.output.first()?.as_str(), n.input.first()?.as_str())))
        .collect();
    graph
        .node
        .iter()
        .filter(|n| matches!(n.op_type.as_str(), "MatMul" | "Gemm"))
        .filter_map(|n| {
            n.input
                .iter()
                .find_map(|i| weights.get(i.as_str()).or_else(|| through.get(i.as_str()).and_then(|w| weights.get(w))))
        })
        .map(|w| 2 * w.dims.iter().product::<i64>().max(0) as u64)
        .sum()
}

fn decode_bytes(v: &tract_onnx::pb::ValueInfoProto) -> u64 {
    let Some((elem, shape)) = shape::concrete(v, REFERENCE_CONTEXT, 1) else { return 0 };
    shape.iter().product::<usize>() as u64 * onnx::elem_size(elem)
}

/// Bytes per token of context of a cache input: its size with the length dim at 1.
fn per_token_bytes(v: Option<&tract_onnx::pb::ValueInfoProto>) -> u64 {
    let Some((elem, dims)) = v.and_then(onnx::tensor_type) else { return 0 };
    let fixed: i64 = dims.iter().map(|d| if let Dim::Fixed(v) = d { *v } else { 1 }).product();
    fixed.max(0) as u64 * onnx::elem_size(elem)
}
