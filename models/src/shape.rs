//! Symbolic shapes of the tensors that cross unit boundaries, from tract's
//! analysis of the whole model. Unit graphs declare them as their inputs and
//! outputs (`past_sequence_length + sequence_length` and the like), so each
//! unit file is a self-describing ONNX model.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, bail};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{GraphProto, ModelProto, ValueInfoProto};
use tract_onnx::prelude::*;

use crate::onnx::{Dim, GraphBuilder, attr_int, tensor_type, value_info};
use crate::segment::is_past;

/// The tract frontend with the settings every llnode load uses: declared
/// output shapes and intermediate value_info are ignored (exports often get
/// them wrong for dynamic lengths); graph inputs are trusted.
pub fn frontend() -> tract_onnx::Onnx {
    tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true)
}

/// Makes an export's graph uniform before it is cut or run:
/// - batch is 1: llnode runs one sequence per session (sessions are pipelined,
///   not batched), and a symbolic batch makes tract's shape inference give up
///   on products such as `batch * (past + seq)`;
/// - the declared shapes of the standard inputs type-check for prefill and
///   decode alike: `attention_mask` is `[1, past + seq]` (some exports say
///   `past + 1`) and `position_ids` is `[1, seq]`;
pub fn normalize(graph: &mut GraphProto) {
    let dims_of = |name: &str| graph.input.iter().find(|i| i.name == name).and_then(tensor_type).map(|t| t.1);
    let Some(ids) = dims_of("input_ids") else { return };
    let (Some(Dim::Param(batch)), Some(Dim::Param(seq))) = (ids.first().cloned(), ids.get(1).cloned()) else {
        return;
    };
    let past = dims_of("past_key_values.0.key").and_then(|dims| {
        dims.into_iter().find_map(|d| match d {
            Dim::Param(p) if p != batch && !p.contains(&batch) => Some(p),
            _ => None,
        })
    });
    let Some(past) = past else { return };
    for input in graph.input.iter_mut() {
        let Some((elem, dims)) = tensor_type(input) else { continue };
        let one = Dim::Fixed(1);
        let dims = match input.name.as_str() {
            "attention_mask" => vec![one, Dim::Param(format!("{past} + {seq}"))],
            "position_ids" => vec![one, Dim::Param(seq.clone())],
            _ => dims.into_iter().map(|d| if d == Dim::Param(batch.clone()) { Dim::Fixed(1) } else { d }).collect(),
        };
        let elem = DataType::try_from(elem).unwrap_or(DataType::Int64);
        *input = value_info(&input.name, elem, &dims);
    }
    cumsum_in_int32(graph);
}

/// tract-onnx reads `Cast(to=int64)` as a cast to its symbolic dimension type,
/// which its CumSum cannot add (BLOOM's ALiBi positions are a CumSum of the
/// attention mask). Integer CumSums are computed in int32 and cast back.
fn cumsum_in_int32(graph: &mut GraphProto) {
    let int64: HashSet<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Cast" && n.attribute.iter().any(|a| a.name == "to" && a.i == DataType::Int64 as i64))
        .flat_map(|n| n.output.clone())
        .chain(
            graph
                .input
                .iter()
                .filter(|i| tensor_type(i).is_some_and(|t| t.0 == DataType::Int64 as i32))
                .map(|i| i.name.clone()),
        )
        .collect();
    let mut g = GraphBuilder::default();
    g.scope("/llnode/cumsum");
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        if node.op_type != "CumSum" || !int64.contains(&node.input[0]) {
            nodes.push(node);
            continue;
        }
        let narrow = g.op("Cast", &[&node.input[0]], vec![attr_int("to", DataType::Int32 as i64)]);
        let output = std::mem::replace(&mut node.output[0], format!("{narrow}_cumsum"));
        node.input[0] = narrow;
        let summed = node.output[0].clone();
        nodes.append(&mut g.graph.node);
        nodes.push(node);
        g.op_to("Cast", &[&summed], vec![attr_int("to", DataType::Int64 as i64)], Some(&output));
        nodes.append(&mut g.graph.node);
    }
    graph.node = nodes;
}

/// What a dim of a tensor's shape is, in terms of the step.
#[derive(Clone, Copy, PartialEq)]
enum Length {
    Fixed(i64),
    Seq,
    Past,
    Total,
}

fn classify(d: &Dim) -> Option<Length> {
    if let Dim::Fixed(v) = d {
        return Some(Length::Fixed(*v));
    }
    match (eval_dim(d, 3, 5)?, eval_dim(d, 7, 2)?) {
        (5, 2) => Some(Length::Seq),
        (3, 7) => Some(Length::Past),
        (8, 9) => Some(Length::Total),
        _ => None,
    }
}

/// Rewrites every `Shape(x)` whose dims tract knows as constants, the new
/// tokens, the past or their sum into the same vector computed from the
/// shapes of `input_ids` and `attention_mask`. Exporters take shapes of
/// intermediate tensors (the past cache, the embeddings) to build masks and
/// reshape targets; rewritten, those computations hang off graph inputs only,
/// so segmentation copies them into each unit instead of sending them, and the
/// mask is made in the prologue.
pub fn rewrite_shapes(graph: &mut GraphProto, facts: &HashMap<String, ValueInfoProto>) {
    if !graph.input.iter().any(|i| i.name == "attention_mask") {
        return;
    }
    let inputs: HashSet<String> = graph.input.iter().filter(|i| !is_past(&i.name)).map(|i| i.name.clone()).collect();
    let mut g = GraphBuilder::default();
    g.scope("/llnode/shape");
    let (one, two) = (g.ints(&[1]), g.ints(&[2]));
    let ids_shape = g.op("Shape", &["input_ids"], vec![]);
    let mask_shape = g.op("Shape", &["attention_mask"], vec![]);
    let seq_len = g.op("Slice", &[&ids_shape, &one, &two], vec![]);
    let total_len = g.op("Slice", &[&mask_shape, &one, &two], vec![]);
    let past_len = g.op("Sub", &[&total_len, &seq_len], vec![]);
    let prelude_len = g.graph.node.len();
    let mut rewritten = Vec::with_capacity(graph.node.len());
    let mut used = false;
    for node in std::mem::take(&mut graph.node) {
        let dims = (node.op_type == "Shape" && !inputs.contains(&node.input[0]))
            .then(|| facts.get(&node.input[0]).and_then(tensor_type))
            .flatten();
        let parts: Option<Vec<String>> = dims.and_then(|(_, dims)| {
            dims.iter()
                .map(|d| match classify(d)? {
                    Length::Fixed(v) => Some(g.ints(&[v])),
                    Length::Seq => Some(seq_len.clone()),
                    Length::Past => Some(past_len.clone()),
                    Length::Total => Some(total_len.clone()),
                })
                .collect()
        });
        let Some(parts) = parts else {
            rewritten.push(node);
            continue;
        };
        used = true;
        let attr = |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| a.i);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let output = node.output[0].as_str();
        let start = g.graph.node.len();
        if attr("start").is_some() || attr("end").is_some() {
            let whole = g.op("Concat", &parts, vec![attr_int("axis", 0)]);
            let begin = g.ints(&[attr("start").unwrap_or(0)]);
            let end = g.ints(&[attr("end").unwrap_or(i64::MAX)]);
            g.op_to("Slice", &[&whole, &begin, &end], vec![], Some(output));
        } else {
            g.op_to("Concat", &parts, vec![attr_int("axis", 0)], Some(output));
        }
        rewritten.extend(g.graph.node.drain(start..));
    }
    if used {
        let mut nodes: Vec<_> = g.graph.node.drain(..prelude_len).collect();
        nodes.extend(rewritten);
        graph.node = nodes;
        graph.initializer.append(&mut g.graph.initializer);
    } else {
        graph.node = rewritten;
    }
}

/// A declared dim's value at `past` cached and `seq` new tokens, batch 1.
/// Symbols are recognised by name: `*batch*` is 1, `*past*` the past length,
/// any other (`sequence_length`) the new tokens.
pub fn eval_dim(d: &Dim, past: i64, seq: i64) -> Option<i64> {
    match d {
        Dim::Fixed(v) => Some(*v),
        Dim::Param(expr) => {
            let scope = SymbolScope::default();
            let tdim = scope.parse_tdim(expr).ok()?;
            let mut values = SymbolValues::default();
            for sym in tdim.symbols() {
                let name = format!("{sym}");
                let v = if name.contains("batch") {
                    1
                } else if name.contains("past") {
                    past
                } else {
                    seq
                };
                values = values.with(&sym, v);
            }
            tdim.eval(&values).to_i64().ok()
        }
    }
}

/// Element type and concrete shape of a declared tensor at `past` and `seq`.
pub fn concrete(info: &ValueInfoProto, past: i64, seq: i64) -> Option<(i32, Vec<usize>)> {
    let (elem, dims) = tensor_type(info)?;
    let shape = dims.iter().map(|d| eval_dim(d, past, seq).map(|v| v.max(0) as usize)).collect::<Option<_>>()?;
    Some((elem, shape))
}

fn onnx_type(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::F32 => DataType::Float,
        DatumType::F16 => DataType::Float16,
        DatumType::F64 => DataType::Double,
        // tract-onnx's `Cast(to=int64)` yields its dimension type; on the wire it is int64.
        DatumType::I64 | DatumType::TDim => DataType::Int64,
        DatumType::I32 => DataType::Int32,
        DatumType::I8 => DataType::Int8,
        DatumType::U8 => DataType::Uint8,
        DatumType::Bool => DataType::Bool,
        _ => return None,
    })
}

/// Declarations (type and symbolic shape) of every tensor the nodes of
/// `proto` make, as tract infers them on the whole model loaded from `proto`
/// with external data under `dir`. Tensors tract cannot type are left out.
pub fn infer(proto: &ModelProto, dir: &Path) -> TractResult<HashMap<String, ValueInfoProto>> {
    let parsed = frontend().parse(proto, dir.to_str()).context("parsing the model")?;
    if !parsed.unresolved_inputs.is_empty() {
        bail!("the graph reads tensors nobody makes: {:?}", parsed.unresolved_inputs);
    }
    let mut inference = parsed.model;
    inference.analyse(false).context("inferring types and shapes")?;
    let typed = inference.clone().into_typed().context("inferring types and shapes")?;
    let mut outlets = HashMap::new();
    for node in typed.nodes() {
        for ix in 0..node.outputs.len() {
            let outlet = OutletId::new(node.id, ix);
            if let Some(label) = typed.outlet_label(outlet) {
                outlets.insert(label.to_string(), outlet);
            }
        }
    }
    let graph = proto.graph.as_ref().context("no graph")?;
    let mut infos = HashMap::new();
    for name in graph.node.iter().flat_map(|n| &n.output).filter(|n| !n.is_empty()) {
        // Typing may fold a tensor away (a shape computation); the analysed
        // inference graph still knows it.
        let fact = match outlets.get(name) {
            Some(outlet) => typed.outlet_fact(*outlet)?.clone(),
            None => {
                let Some(fact) = parsed.outlets_by_name.get(name).and_then(|o| inference.outlet_fact(*o).ok()) else {
                    continue;
                };
                let Ok(fact) = fact.to_typed_fact() else { continue };
                fact.into_owned()
            }
        };
        let Some(dt) = onnx_type(fact.datum_type) else { continue };
        let dims: Vec<Dim> = fact
            .shape
            .iter()
            .map(|d| match d.to_i64() {
                Ok(v) => Dim::Fixed(v),
                Err(_) => Dim::Param(d.to_string()),
            })
            .collect();
        infos.insert(name.clone(), value_info(name, dt, &dims));
    }
    Ok(infos)
}
