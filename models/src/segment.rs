//! Cutting a decoder graph into units at layer boundaries: a prologue
//! (embeddings, masks, rotary tables), one unit per decoder layer, an epilogue
//! (final norm, LM head).
//!
//! Boundaries come from the graph's structure, not from node names. Every
//! path from `input_ids` to `logits` runs through the residual stream, so the
//! residual tensors are *dominators* of `logits` in the value-flow graph from
//! `input_ids` (edges into `Shape`/`Size` carry no values and are ignored;
//! masks and rotary tables hang off other inputs). Each node gets a layer tag,
//! the highest `N` whose `past_key_values.N` its value depends on. The hidden
//! state entering layer `N` is the last dominator tagged below `N`; the one
//! entering the epilogue sits in the last layer's tail at the same place as the
//! other layers' boundaries sit in theirs.
//!
//! Nodes go to the earliest unit their inputs allow; constant subgraphs (fed
//! only by initializers) are copied into every unit that uses them, so a unit
//! never waits on a constant from elsewhere. Tensors that cross more than one
//! boundary (a mask used by every layer) are skip tensors: see
//! [`crate::transmission`].

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tract_onnx::pb::{GraphProto, NodeProto};

/// What a unit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    Prologue,
    Layer(usize),
    Epilogue,
}

/// Who uses a tensor a unit produces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitOutput {
    pub name: String,
    /// Later units that consume it.
    pub consumers: Vec<usize>,
    /// Whether the whole model returns it (`logits`, `present.N.*`).
    pub graph_output: bool,
}

/// One unit: which nodes of the source graph it runs and what crosses its edges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitSpec {
    pub name: String,
    pub kind: UnitKind,
    /// Indices into the source graph's nodes, in topological order, constant
    /// subgraphs it needs included. Meaningless once imported, so not saved.
    #[serde(skip)]
    pub nodes: Vec<usize>,
    /// Tensors it reads from outside: graph inputs or earlier units' outputs.
    pub inputs: Vec<String>,
    /// Graph inputs it reads only for their shape (token count, context
    /// length): never sent, the runner makes zeros of the right shape.
    #[serde(default)]
    pub shape_inputs: Vec<String>,
    pub outputs: Vec<UnitOutput>,
    pub initializers: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segmentation {
    pub units: Vec<UnitSpec>,
    pub layers: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SegmentError {
    #[error("not a decoder with past: {0}; export with `optimum-cli export onnx --task text-generation-with-past`")]
    NotDecoderWithPast(String),
    #[error("the graph has a cycle or reads a tensor nobody makes ({0}); the file is corrupt")]
    Malformed(String),
    #[error("could not find the layer boundaries: {0}; this architecture's graph is not supported yet")]
    NoBoundary(String),
}

/// Which layer a `past_key_values.N.*` input or `present.N.*` output belongs to.
pub fn cache_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("past_key_values.").or_else(|| name.strip_prefix("present."))?;
    let (layer, kind) = rest.split_once('.')?;
    matches!(kind, "key" | "value").then_some(())?;
    layer.parse().ok()
}

pub fn is_past(name: &str) -> bool {
    name.starts_with("past_key_values.") && cache_layer(name).is_some()
}

pub fn is_present(name: &str) -> bool {
    name.starts_with("present.") && cache_layer(name).is_some()
}

/// Ops whose outputs depend on their input's shape only, never its values.
fn shape_only(op: &str) -> bool {
    matches!(op, "Shape" | "Size")
}

const SOURCE: usize = usize::MAX;

/// Cuts `graph` into units.
pub fn segment(graph: &GraphProto) -> Result<Segmentation, SegmentError> {
    let nodes = &graph.node;
    let input_names: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    let output_names: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let missing = |what: &str| SegmentError::NotDecoderWithPast(format!("it has no {what}"));
    if !input_names.contains("input_ids") {
        return Err(missing("`input_ids` input"));
    }
    if !output_names.contains("logits") {
        return Err(missing("`logits` output"));
    }
    let past_layers: BTreeSet<usize> =
        input_names.iter().filter(|n| is_past(n)).filter_map(|n| cache_layer(n)).collect();
    let present_layers: BTreeSet<usize> =
        output_names.iter().filter(|n| is_present(n)).filter_map(|n| cache_layer(n)).collect();
    if past_layers.is_empty() {
        return Err(missing("`past_key_values.N.key/value` inputs"));
    }
    let layers = past_layers.len();
    if past_layers != (0..layers).collect() || present_layers != past_layers {
        return Err(SegmentError::NotDecoderWithPast(format!(
            "its past_key_values inputs ({past_layers:?}) and present outputs ({present_layers:?}) do not cover the same layers 0..N"
        )));
    }

    let order = topological_order(graph)?;
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            producer.insert(o.as_str(), i);
        }
        for t in n.input.iter().filter(|t| !t.is_empty()) {
            consumers.entry(t.as_str()).or_default().push(i);
        }
    }

    // Constant nodes: fed by initializers and other constants only.
    let mut constant = vec![false; nodes.len()];
    for &i in &order {
        constant[i] = nodes[i].input.iter().all(|t| {
            t.is_empty() || initializers.contains(t.as_str()) || producer.get(t.as_str()).is_some_and(|&p| constant[p])
        });
    }

    // Shape computations: rooted at the shape of a graph input, fed by nothing
    // else but constants. Like constants, they are copied into each unit that
    // needs them: tract can only type a Reshape whose target it can compute.
    let mut copied = constant.clone();
    for &i in &order {
        let node = &nodes[i];
        if constant[i] {
            continue;
        }
        copied[i] = if shape_only(&node.op_type) {
            input_names.contains(node.input[0].as_str()) && !is_past(&node.input[0])
        } else {
            node.input.iter().any(|t| producer.get(t.as_str()).is_some_and(|&p| copied[p] && !constant[p]))
                && node.input.iter().all(|t| {
                    t.is_empty()
                        || initializers.contains(t.as_str())
                        || producer.get(t.as_str()).is_some_and(|&p| copied[p])
                })
        };
    }

    // Layer tags and dominators over value flow from `input_ids`.
    let mut tag = vec![-1i64; nodes.len()];
    let mut idom = vec![None::<usize>; nodes.len()];
    let mut depth = vec![0usize; nodes.len()];
    let dom_depth = |d: usize, depth: &[usize]| if d == SOURCE { 0 } else { depth[d] };
    for &i in &order {
        let node = &nodes[i];
        if shape_only(&node.op_type) || copied[i] {
            continue;
        }
        let mut preds = Vec::new();
        for t in node.input.iter().filter(|t| !t.is_empty()) {
            if t == "input_ids" {
                preds.push(SOURCE);
            } else if let Some(layer) = is_past(t).then(|| cache_layer(t)).flatten() {
                tag[i] = tag[i].max(layer as i64);
            } else if let Some(&p) = producer.get(t.as_str()) {
                tag[i] = tag[i].max(tag[p]);
                if idom[p].is_some() {
                    preds.push(p);
                }
            }
        }
        // Immediate dominator: the deepest common dominator of all predecessors.
        let mut dom = None;
        for p in preds {
            dom = Some(match dom {
                None => p,
                Some(mut a) => {
                    let mut b = p;
                    while a != b {
                        if dom_depth(a, &depth) >= dom_depth(b, &depth) {
                            a = idom[a].expect("dominated nodes have a dominator");
                        } else {
                            b = idom[b].expect("dominated nodes have a dominator");
                        }
                    }
                    a
                }
            });
        }
        if let Some(d) = dom {
            idom[i] = Some(d);
            depth[i] = dom_depth(d, &depth) + 1;
        }
    }
    let logits_node = *producer.get("logits").ok_or_else(|| missing("node making `logits`"))?;
    if idom[logits_node].is_none() {
        return Err(SegmentError::NoBoundary("`logits` does not depend on `input_ids`".into()));
    }
    // The dominator chain from `input_ids` to `logits`, in flow order.
    let mut chain = vec![logits_node];
    while let Some(d) = idom[*chain.last().expect("non-empty")].filter(|&d| d != SOURCE) {
        chain.push(d);
    }
    chain.reverse();

    let mut boundary_nodes = Vec::with_capacity(layers + 1);
    for layer in 0..layers as i64 {
        let node = chain.iter().rev().find(|&&d| tag[d] < layer).ok_or_else(|| {
            SegmentError::NoBoundary(format!("no single tensor carries the hidden state into layer {layer}"))
        })?;
        boundary_nodes.push(*node);
    }
    let last = layers as i64 - 1;
    let in_last: Vec<usize> = chain.iter().copied().filter(|&d| tag[d] == last).collect();
    let epilogue_start = if layers >= 2 {
        let per_layer = chain.iter().filter(|&&d| tag[d] == last - 1).count();
        in_last.get(per_layer.wrapping_sub(1)).copied()
    } else {
        in_last.iter().rev().copied().find(|&d| nodes[d].op_type == "Add")
    };
    let epilogue_start = epilogue_start.filter(|&d| d != logits_node).ok_or_else(|| {
        SegmentError::NoBoundary("cannot tell where the last layer ends and the LM head begins".into())
    })?;
    boundary_nodes.push(epilogue_start);

    let mut boundary: HashMap<&str, usize> = HashMap::new();
    for (j, &n) in boundary_nodes.iter().enumerate() {
        let outs: Vec<&String> = nodes[n].output.iter().filter(|o| !o.is_empty()).collect();
        if outs.len() != 1 {
            return Err(SegmentError::NoBoundary(format!(
                "boundary node {} has {} outputs",
                nodes[n].name,
                outs.len()
            )));
        }
        boundary.insert(outs[0].as_str(), j);
    }

    // Earliest unit each node can run in. Unit 0 is the prologue, unit N+1
    // layer N, unit L+1 the epilogue.
    let mut unit = vec![0usize; nodes.len()];
    for &i in &order {
        if copied[i] {
            continue;
        }
        unit[i] = nodes[i]
            .input
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| {
                if let Some(&j) = boundary.get(t.as_str()) {
                    j + 1
                } else if is_past(t) {
                    cache_layer(t).expect("checked") + 1
                } else {
                    producer.get(t.as_str()).filter(|&&p| !copied[p]).map_or(0, |&p| unit[p])
                }
            })
            .max()
            .unwrap_or(0);
    }
    for (j, &n) in boundary_nodes.iter().enumerate() {
        if unit[n] != j {
            return Err(SegmentError::NoBoundary(format!(
                "the hidden state into unit {} is made in unit {} ({})",
                j + 1,
                unit[n],
                nodes[n].name
            )));
        }
    }
    let epilogue = layers + 1;
    for o in &graph.output {
        let expected = if o.name == "logits" { Some(epilogue) } else { cache_layer(&o.name).map(|l| l + 1) };
        let Some(&p) = producer.get(o.name.as_str()) else {
            return Err(SegmentError::Malformed(format!("output {} has no producer", o.name)));
        };
        if expected.is_some_and(|e| e != unit[p]) {
            return Err(SegmentError::NoBoundary(format!(
                "output {} is computed in unit {} instead of {}",
                o.name,
                unit[p],
                expected.unwrap_or_default()
            )));
        }
    }

    let graph = GraphIndex { nodes, order: &order, unit: &unit, copied: &copied, producer, consumers };
    let units = (0..=epilogue).map(|u| build_unit(u, layers, &graph, &initializers, &output_names)).collect();
    Ok(Segmentation { units, layers })
}

/// The source graph with the facts segmentation computed about it.
struct GraphIndex<'a> {
    nodes: &'a [NodeProto],
    order: &'a [usize],
    unit: &'a [usize],
    /// Constants and shape computations, copied into every unit that reads them.
    copied: &'a [bool],
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
}

fn build_unit(
    u: usize,
    layers: usize,
    g: &GraphIndex,
    initializers: &HashSet<&str>,
    graph_outputs: &HashSet<&str>,
) -> UnitSpec {
    let GraphIndex { nodes, order, unit, copied, producer, consumers } = g;
    let (kind, name) = match u {
        0 => (UnitKind::Prologue, "prologue".to_string()),
        u if u == layers + 1 => (UnitKind::Epilogue, "epilogue".to_string()),
        u => (UnitKind::Layer(u - 1), format!("layer.{}", u - 1)),
    };
    let mut members: HashSet<usize> = order.iter().copied().filter(|&i| !copied[i] && unit[i] == u).collect();
    // Pull in the constant and shape subgraphs the unit reads.
    let mut stack: Vec<usize> = members.iter().copied().collect();
    while let Some(i) = stack.pop() {
        for t in &nodes[i].input {
            if let Some(&p) = producer.get(t.as_str())
                && copied[p]
                && members.insert(p)
            {
                stack.push(p);
            }
        }
    }
    let node_list: Vec<usize> = order.iter().copied().filter(|i| members.contains(i)).collect();
    let produced: HashSet<&str> = node_list.iter().flat_map(|&i| nodes[i].output.iter().map(String::as_str)).collect();
    let mut inputs = Vec::new();
    let mut inits = Vec::new();
    for &i in &node_list {
        for t in nodes[i].input.iter().filter(|t| !t.is_empty()) {
            if produced.contains(t.as_str()) {
                continue;
            }
            let list = if initializers.contains(t.as_str()) { &mut inits } else { &mut inputs };
            if !list.contains(t) {
                list.push(t.clone());
            }
        }
    }
    // Graph inputs read only by Shape nodes are needed for their shape alone.
    let (shape_inputs, inputs): (Vec<String>, Vec<String>) = inputs.into_iter().partition(|t| {
        !is_past(t)
            && producer.get(t.as_str()).is_none()
            && node_list.iter().filter(|&&i| nodes[i].input.contains(t)).all(|&i| shape_only(&nodes[i].op_type))
    });
    let mut outputs = Vec::new();
    for &i in node_list.iter().filter(|&&i| !copied[i]) {
        for o in nodes[i].output.iter().filter(|o| !o.is_empty()) {
            let consumers: BTreeSet<usize> = consumers
                .get(o.as_str())
                .into_iter()
                .flatten()
                .filter(|&&j| !copied[j] && unit[j] != u)
                .map(|&j| unit[j])
                .collect();
            let graph_output = graph_outputs.contains(o.as_str());
            if graph_output || !consumers.is_empty() {
                outputs.push(UnitOutput { name: o.clone(), consumers: consumers.into_iter().collect(), graph_output });
            }
        }
    }
    UnitSpec { name, kind, nodes: node_list, inputs, shape_inputs, outputs, initializers: inits }
}

/// Kahn's algorithm over tensor dependencies, stable in the file's order.
fn topological_order(graph: &GraphProto) -> Result<Vec<usize>, SegmentError> {
    let nodes = &graph.node;
    let mut available: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    available.extend(graph.initializer.iter().map(|t| t.name.as_str()));
    available.insert("");
    let mut done = vec![false; nodes.len()];
    let mut order = Vec::with_capacity(nodes.len());
    let mut progress = true;
    while progress {
        progress = false;
        for (i, n) in nodes.iter().enumerate() {
            if !done[i] && n.input.iter().all(|t| available.contains(t.as_str())) {
                done[i] = true;
                order.push(i);
                available.extend(n.output.iter().map(String::as_str));
                progress = true;
            }
        }
    }
    match done.iter().position(|d| !d) {
        None => Ok(order),
        Some(i) => Err(SegmentError::Malformed(format!("node {}", nodes[i].name))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{Dim, GraphBuilder, tensor_f32, value_info};
    use tract_onnx::pb::tensor_proto::DataType;

    fn plain_decoder(with_past: bool) -> GraphProto {
        let mut g = GraphBuilder::default();
        let seq = [Dim::Fixed(1), Dim::param("sequence_length")];
        g.graph.input.push(value_info("input_ids", DataType::Int64, &seq));
        if with_past {
            let dims = [Dim::Fixed(1), Dim::Fixed(1), Dim::param("past"), Dim::Fixed(2)];
            g.graph.input.push(value_info("past_key_values.0.key", DataType::Float, &dims));
        }
        g.graph.output.push(value_info(
            "logits",
            DataType::Float,
            &[Dim::Fixed(1), Dim::param("sequence_length"), Dim::Fixed(4)],
        ));
        g.initializer(tensor_f32("embed", &[4, 4], &[0.0; 16]));
        let h = g.op("Gather", &["embed", "input_ids"], vec![]);
        g.op_to("Relu", &[&h], vec![], Some("logits"));
        g.graph
    }

    #[test]
    fn a_graph_without_a_cache_is_not_a_decoder_with_past() {
        let err = segment(&plain_decoder(false)).unwrap_err();
        assert!(matches!(err, SegmentError::NotDecoderWithPast(_)));
        assert!(err.to_string().contains("text-generation-with-past"), "{err}");
        // With a past input but no present output, the layers do not match.
        let err = segment(&plain_decoder(true)).unwrap_err();
        assert!(err.to_string().contains("present"), "{err}");
    }

    #[test]
    fn cache_names_carry_their_layer() {
        assert_eq!(cache_layer("past_key_values.12.value"), Some(12));
        assert_eq!(cache_layer("present.3.key"), Some(3));
        assert_eq!(cache_layer("present.3.other"), None);
        assert!(is_past("past_key_values.0.key") && !is_past("present.0.key"));
    }
}
