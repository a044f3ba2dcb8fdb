//! How a graph's weights reach tract with as little memory as the weights
//! themselves. Left to itself, tract holds a big weight two or three times
//! while it loads: it reads an external initializer into a buffer and copies
//! it into a tensor, folds `Transpose(W)` into a transposed copy, and its
//! optimiser moves the contracted axis back (cloning the copy first) before
//! packing it for the matrix product. On the tied LM head of a small model
//! that made loading the 94 MiB unit peak at 294 MiB.
//!
//! [`prepare`] changes the graph before tract parses it, and
//! [`Deferred::fill`] completes the parsed model:
//! - `MatMul(x, Transpose(W))` on a 2-D external weight becomes `Einsum`
//!   (`mk,nk->mn`, with `x`'s leading axes) over row blocks of `W` (each
//!   block its own initializer, a byte range of the same file) and a
//!   `Concat`: nothing is transposed, and each block is packed while the
//!   others wait, so packing holds one block twice, not the whole weight;
//! - external initializers leave the graph tract parses and are read
//!   straight into their tensors.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, bail};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModelExt};

use crate::onnx::{self, Dim, external_entry, is_external, set_external, value_info};

/// Row blocks of a split weight are at most this big (and a multiple of
/// [`BLOCK_ROWS`] rows), so packing one holds at most this much twice.
const BLOCK_BYTES: u64 = 16 << 20;
/// Blocks start at multiples of this many rows: a multiple of every
/// kernel's panel width, so each block packs as its rows of the whole would.
const BLOCK_ROWS: i64 = 256;

/// Where an external initializer's bytes are.
struct Extent {
    location: String,
    offset: u64,
    length: u64,
}

fn extent(t: &TensorProto) -> Option<Extent> {
    let location = external_entry(t, "location")?.to_string();
    let offset = external_entry(t, "offset").map_or(Some(0), |o| o.parse().ok())?;
    let length = external_entry(t, "length").map_or(Some(onnx::tensor_bytes(t)), |l| l.parse().ok())?;
    Some(Extent { location, offset, length })
}

/// Readies `proto` (from model directory `dir`) for tract: splits its
/// transposed weights (`split_transposed`) and takes its external weights
/// out (`defer`). The parsed model must then go through [`Deferred::fill`].
pub fn prepare(proto: &mut ModelProto, dir: &Path) -> TractResult<Deferred> {
    let graph = proto.graph.as_mut().context("no graph")?;
    if !transposed(graph).is_empty() {
        // The rewrite spells out the axes of each product's left operand: a
        // weightless parse tells their ranks.
        let mut weightless = proto.clone();
        defer(weightless.graph.as_mut().expect("checked above"));
        let mut parsed = crate::shape::frontend().parse(&weightless, dir.to_str())?.model;
        parsed.analyse(false)?;
        // Graph inputs are nodes of their name; other tensors, outlet labels.
        let outlet = |name: &str| {
            parsed.find_outlet_label(name).or_else(|| parsed.node_by_name(name).ok().map(|n| OutletId::new(n.id, 0)))
        };
        let rank = |name: &str| outlet(name).and_then(|o| parsed.outlet_fact(o).ok()?.shape.rank().concretize());
        split_transposed(proto.graph.as_mut().expect("checked above"), BLOCK_BYTES, BLOCK_ROWS, |x| {
            rank(x).and_then(|r| usize::try_from(r).ok())
        });
    }
    Ok(defer(proto.graph.as_mut().expect("checked above")))
}

/// A 2-D external weight `W` read through `Transpose(W, perm=[1, 0])`
/// (`transposed`) by MatMuls only, as their second operand (`readers`).
struct Transposed {
    weight: String,
    transposed: String,
    readers: Vec<usize>,
}

fn transposed(graph: &GraphProto) -> Vec<Transposed> {
    let matmul_b =
        |n: &NodeProto, t: &str| n.op_type == "MatMul" && n.input.len() == 2 && n.input[1] == t && n.input[0] != t;
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "Transpose" && n.input.len() == 1 && n.output.len() == 1)
        .filter(|n| n.attribute.iter().find(|a| a.name == "perm").is_none_or(|a| a.ints == [1, 0]))
        .filter(|n| {
            graph
                .initializer
                .iter()
                .any(|w| w.name == n.input[0] && w.dims.len() == 2 && is_external(w) && extent(w).is_some())
        })
        .filter_map(|n| {
            let (weight, transposed) = (n.input[0].clone(), n.output[0].clone());
            let readers: Vec<usize> =
                (0..graph.node.len()).filter(|&i| graph.node[i].input.contains(&transposed)).collect();
            let only_matmuls = readers.iter().all(|&i| matmul_b(&graph.node[i], &transposed));
            (only_matmuls && !graph.output.iter().any(|o| o.name == transposed)).then_some(Transposed {
                weight,
                transposed,
                readers,
            })
        })
        .collect()
}

/// The Einsum equation of `x · Wᵀ` for an `x` of rank `rank` (batch axes first).
fn equation(rank: usize) -> Option<String> {
    let batch: String = ['a', 'b', 'c', 'd', 'e', 'f'].iter().take(rank.checked_sub(2)?).collect();
    (rank - 2 <= 6).then(|| format!("{batch}mk,nk->{batch}mn"))
}

/// Rewrites every `MatMul(x, Transpose(W, perm=[1, 0]))` whose `W` is a 2-D
/// external initializer into `Einsum` over row blocks of `W` of at most
/// `block_bytes` (rows in multiples of `block_rows`), concatenated along the
/// last axis; `rank` tells the rank of each `x`, by name. Each output element
/// is the same dot product of the same rows, so the results do not change.
/// A weight read otherwise, or by an `x` of unknown rank, is left alone.
fn split_transposed(graph: &mut GraphProto, block_bytes: u64, block_rows: i64, rank: impl Fn(&str) -> Option<usize>) {
    for Transposed { weight, transposed, readers } in transposed(graph) {
        let equations: Option<Vec<String>> =
            readers.iter().map(|&i| rank(&graph.node[i].input[0]).and_then(equation)).collect();
        let Some(equations) = equations else { continue };
        let w = graph.initializer.iter().find(|t| t.name == weight).expect("found by transposed()");
        let at = extent(w).expect("found by transposed()");
        let (rows, cols) = (w.dims[0], w.dims[1]);
        let row_bytes = at.length / rows.max(1) as u64;
        let per_block = ((block_bytes / row_bytes.max(1)) as i64 / block_rows).max(1) * block_rows;
        let mut blocks = Vec::new();
        for (b, start) in (0..rows).step_by(per_block as usize).enumerate() {
            let mut block = w.clone();
            block.name = format!("{weight}.rows{b}");
            block.dims = vec![(rows - start).min(per_block), cols];
            let length = onnx::tensor_bytes(&block);
            set_external(&mut block, &at.location, at.offset + start as u64 * row_bytes, length);
            blocks.push(block);
        }
        let mut rewritten = Vec::new();
        for (&i, equation) in readers.iter().zip(equations) {
            let matmul = &graph.node[i];
            let (x, out) = (matmul.input[0].clone(), matmul.output[0].clone());
            let mut parts = Vec::new();
            for block in &blocks {
                let part = format!("{out}.{}", block.name);
                rewritten.push(NodeProto {
                    name: part.clone(),
                    op_type: "Einsum".into(),
                    input: vec![x.clone(), block.name.clone()],
                    output: vec![part.clone()],
                    attribute: vec![onnx::attr_string("equation", &equation)],
                    ..Default::default()
                });
                parts.push(part);
            }
            rewritten.push(NodeProto {
                name: format!("{out}.blocks"),
                op_type: "Concat".into(),
                input: parts,
                output: vec![out],
                attribute: vec![onnx::attr_int("axis", -1)],
                ..Default::default()
            });
        }
        // The new nodes take the first MatMul's place; the graph stays in topological order.
        let first = readers[0];
        let mut node = std::mem::take(&mut graph.node);
        let tail = node.split_off(first);
        node.extend(rewritten);
        node.extend(tail.into_iter().enumerate().filter(|(j, _)| !readers.contains(&(j + first))).map(|(_, n)| n));
        node.retain(|n| !(n.op_type == "Transpose" && n.output.first() == Some(&transposed)));
        graph.node = node;
        if !graph.node.iter().any(|n| n.input.contains(&weight)) && !graph.output.iter().any(|o| o.name == weight) {
            graph.initializer.retain(|t| t.name != weight);
        }
        graph.initializer.extend(blocks);
    }
}

/// External initializers taken out of a graph, to be read into the parsed
/// model by [`Deferred::fill`].
pub struct Deferred(Vec<TensorProto>);

/// Takes `graph`'s external initializers of the element types tract reads
/// as plain bytes out of it, declaring each as a graph input of its type
/// and shape. The graph must then go through [`Deferred::fill`].
fn defer(graph: &mut GraphProto) -> Deferred {
    if cfg!(target_endian = "big") {
        // ONNX stores little-endian bytes; tract's own reader converts them.
        return Deferred(Vec::new());
    }
    let (deferred, kept): (Vec<TensorProto>, Vec<TensorProto>) = std::mem::take(&mut graph.initializer)
        .into_iter()
        .partition(|t| is_external(t) && datum_type(t.data_type).is_some() && extent(t).is_some());
    graph.initializer = kept;
    let declared: Vec<ValueInfoProto> = deferred
        .iter()
        .filter(|t| !graph.input.iter().any(|i| i.name == t.name))
        .map(|t| {
            let dims: Vec<Dim> = t.dims.iter().map(|&d| Dim::Fixed(d)).collect();
            value_info(&t.name, DataType::try_from(t.data_type).unwrap_or(DataType::Float), &dims)
        })
        .collect();
    graph.input.extend(declared);
    Deferred(deferred)
}

fn datum_type(data_type: i32) -> Option<DatumType> {
    Some(match DataType::try_from(data_type).ok()? {
        DataType::Float => f32::datum_type(),
        DataType::Float16 => f16::datum_type(),
        DataType::Double => f64::datum_type(),
        DataType::Int64 => i64::datum_type(),
        DataType::Int32 => i32::datum_type(),
        DataType::Int16 => i16::datum_type(),
        DataType::Int8 => i8::datum_type(),
        DataType::Uint8 => u8::datum_type(),
        _ => return None,
    })
}

impl Deferred {
    /// Turns each deferred weight's input of `model` (parsed from the graph
    /// `defer` changed) into a constant read from `dir`, straight into its tensor.
    pub fn fill(self, model: &mut InferenceModel, dir: &Path) -> TractResult<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let dir = dir.canonicalize().with_context(|| format!("opening {}", dir.display()))?;
        for t in self.0 {
            let tensor = read(&t, &dir).with_context(|| format!("reading weight {}", t.name))?;
            let id = model.node_by_name(&t.name)?.id;
            let tensor = tensor.into_arc_tensor();
            model.nodes[id].op = Box::new(tract_onnx::tract_core::ops::konst::Const::new(tensor.clone())?);
            model.set_outlet_fact(OutletId::new(id, 0), InferenceFact::from(TypedFact::try_from(tensor)?))?;
            model.inputs.retain(|o| o.node != id);
        }
        Ok(())
    }
}

/// An external initializer's bytes, read into a tensor of its type and
/// shape, from a file inside `dir` (canonical).
fn read(t: &TensorProto, dir: &Path) -> TractResult<Tensor> {
    let Some(at) = extent(t) else { bail!("no location") };
    let dt = datum_type(t.data_type).context("an element type tract cannot read as bytes")?;
    let shape: Vec<usize> =
        t.dims.iter().map(|&d| usize::try_from(d)).collect::<Result<_, _>>().context("a negative dimension")?;
    let path = dir.join(&at.location);
    if !path.canonicalize()?.starts_with(dir) {
        bail!("{} is outside the model directory", at.location);
    }
    let mut tensor = Tensor::zero_dt(dt, &shape)?;
    let bytes = tensor.as_bytes_mut();
    if bytes.len() as u64 != at.length {
        bail!("{} bytes stored for a tensor of {} bytes", at.length, bytes.len());
    }
    let mut file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    file.seek(SeekFrom::Start(at.offset))?;
    file.read_exact(bytes).with_context(|| format!("{} ends before byte {}", path.display(), at.offset + at.length))?;
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{GraphBuilder, tensor_f32};

    /// `y = x · Wᵀ` and `z = x2 · Wᵀ` (two readers of one transposed
    /// weight), with `W` (`rows` × 16) stored in `w.bin` in `dir`.
    fn transposed_matmuls(dir: &Path, rows: i64) -> tract_onnx::pb::ModelProto {
        let values: Vec<f32> = (0..rows * 16).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 317.0).collect();
        std::fs::write(dir.join("w.bin"), values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let mut w = tensor_f32("w", &[rows, 16], &[]);
        set_external(&mut w, "w.bin", 0, rows as u64 * 64);
        let mut b = GraphBuilder::default();
        b.initializer(w);
        let wt = b.op("Transpose", &["w"], vec![onnx::attr_ints("perm", &[1, 0])]);
        b.op_to("MatMul", &["x", &wt], vec![], Some("y"));
        b.op_to("MatMul", &["x2", &wt], vec![], Some("z"));
        let mut graph = b.graph;
        graph.input = vec![
            value_info("x", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(16)]),
            value_info("x2", DataType::Float, &[Dim::Fixed(2), Dim::Fixed(16)]),
        ];
        graph.output = vec![
            value_info("y", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(rows)]),
            value_info("z", DataType::Float, &[Dim::Fixed(2), Dim::Fixed(rows)]),
        ];
        onnx::model(graph, onnx::default_opsets())
    }

    fn run(proto: &tract_onnx::pb::ModelProto, dir: &Path, deferred: Option<Deferred>) -> Vec<(Vec<usize>, Vec<f32>)> {
        let mut parsed = crate::shape::frontend().parse(proto, dir.to_str()).unwrap();
        if let Some(deferred) = deferred {
            deferred.fill(&mut parsed.model, dir).unwrap();
        }
        let plan = parsed.model.into_optimized().unwrap().into_runnable().unwrap();
        let x = Tensor::from_shape(&[1, 3, 16], &(0..48).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>()).unwrap();
        let x2 = Tensor::from_shape(&[2, 16], &(0..32).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>()).unwrap();
        let out = plan.run(tvec!(x.into(), x2.into())).unwrap();
        out.iter()
            .map(|t| (t.shape().to_vec(), t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()))
            .collect()
    }

    #[test]
    fn row_blocks_of_a_transposed_weight_give_the_same_products() {
        let dir = tempfile::tempdir().unwrap();
        let rows = 1000;
        let proto = transposed_matmuls(dir.path(), rows);
        let whole = run(&proto, dir.path(), None);

        let mut split = proto.clone();
        let graph = split.graph.as_mut().unwrap();
        // Blocks of 256 rows (16 KiB): 256, 256, 256, 232.
        split_transposed(graph, 16 << 10, 256, |x| Some(if x == "x" { 3 } else { 2 }));
        let blocks: Vec<&TensorProto> = graph.initializer.iter().filter(|t| t.name.starts_with("w.rows")).collect();
        assert_eq!(blocks.iter().map(|t| t.dims[0]).collect::<Vec<_>>(), [256, 256, 256, 232]);
        assert!(!graph.initializer.iter().any(|t| t.name == "w"), "the whole weight is no longer read");
        assert!(!graph.node.iter().any(|n| n.op_type == "Transpose" || n.op_type == "MatMul"));
        let deferred = defer(graph);
        assert_eq!(deferred.0.len(), 4);
        assert!(graph.initializer.is_empty());
        assert_eq!(
            run(&split, dir.path(), Some(deferred)),
            whole,
            "the blocks give exactly the whole product, in its shape"
        );
    }

    #[test]
    fn ranks_come_from_a_weightless_parse() {
        let dir = tempfile::tempdir().unwrap();
        let mut proto = transposed_matmuls(dir.path(), 300);
        let whole = run(&proto, dir.path(), None);
        let deferred = prepare(&mut proto, dir.path()).unwrap();
        let graph = proto.graph.as_ref().unwrap();
        let equations: Vec<String> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "Einsum")
            .map(|n| String::from_utf8(n.attribute[0].s.clone()).unwrap())
            .collect();
        assert_eq!(equations, ["amk,nk->amn", "mk,nk->mn"]);
        assert_eq!(run(&proto, dir.path(), Some(deferred)), whole);
    }

    #[test]
    fn a_transposed_weight_read_otherwise_stays_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut proto = transposed_matmuls(dir.path(), 300);
        let graph = proto.graph.as_mut().unwrap();
        let wt = graph.node[0].output[0].clone();
        graph.node.push(NodeProto {
            op_type: "Relu".into(),
            input: vec![wt],
            output: vec!["r".into()],
            ..Default::default()
        });
        let before = graph.clone();
        split_transposed(graph, 16 << 10, 256, |_| Some(3));
        assert_eq!(*graph, before);
    }

    #[test]
    fn a_short_weight_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut proto = transposed_matmuls(dir.path(), 300);
        std::fs::write(dir.path().join("w.bin"), [0u8; 100]).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let deferred = defer(graph);
        let mut parsed = crate::shape::frontend().parse(&proto, dir.path().to_str()).unwrap();
        let e = deferred.fill(&mut parsed.model, dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("ends before byte 19200"), "{e:#}");
    }
}
