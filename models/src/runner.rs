//! Segment runners: any range of consecutive units loaded once as one
//! optimised tract plan (shared, in an `Arc`), with symbolic sequence and past
//! lengths. Per-session state, the KV cache of the segment's own layers,
//! lives apart in [`SegmentState`], so one loaded segment serves many
//! sessions.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb::{ModelProto, ValueInfoProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::SimplePlan;
use tract_onnx::tract_core::runtime::RunOptions;

use crate::model::Model;
use crate::onnx;
use crate::segment::{cache_layer, is_past, is_present};
use crate::shape;
use crate::weight;

/// Named tensors flowing between segments.
pub type Activations = HashMap<String, TValue>;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot load units {units:?}: {reason}")]
    Load { units: Range<usize>, reason: String },
    #[error("units {units:?} need tensor {name}, which nobody sent")]
    MissingInput { units: Range<usize>, name: String },
    #[error("running units {units:?} failed: {reason}")]
    Run { units: Range<usize>, reason: String },
    /// A step that other devices run failed there or on the way (a `Forward` across the mesh).
    #[error("{0}")]
    Remote(String),
}

/// Cuts output `ix` (`logits`, batch × positions × vocabulary) to the last
/// position, the only one generation reads. tract pushes the slice up
/// through the LM head and the final norm, so a prompt's prefill projects one
/// position onto the vocabulary instead of all of them.
fn last_position_only(model: &mut TypedModel, ix: usize) -> TractResult<()> {
    use tract_onnx::tract_core::ops::array::Slice;
    let outlet = model.outputs[ix];
    let fact = model.outlet_fact(outlet)?;
    if fact.rank() != 3 {
        return Ok(());
    }
    let len = fact.shape[1].clone();
    let name = format!("{}.last_position", model.node(outlet.node).name);
    model.outputs[ix] = model.wire_node(name, Slice::new(1, len.clone() - 1, len), &[outlet])?[0];
    Ok(())
}

/// Gives every reader of a large constant its own `Const` node (sharing the
/// same tensor). tract folds a constant into what reads it (a weight packed
/// for the matrix product) only when that reader is its sole one; a tied
/// embedding read by both the prologue's `Gather` and the epilogue's LM head
/// would otherwise be re-packed on every step, 4× slower decoding when one
/// segment holds both ends of the model.
fn unshare_big_consts(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::optim::CONST_FOLD_MEM_BUDGET;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(konst) = node.op_as::<Const>() else { continue };
        let readers = node.outputs[0].successors.clone();
        let big = node.outputs[0].fact.mem_size().as_i64().is_some_and(|m| m as u64 > CONST_FOLD_MEM_BUDGET);
        if readers.len() < 2 || !big {
            continue;
        }
        let (name, konst) = (node.name.clone(), konst.clone());
        for (ix, inlet) in readers.into_iter().enumerate().skip(1) {
            let copy = model.add_node(
                format!("{name}.reader{ix}"),
                konst.clone(),
                tvec!(model.nodes[id].outputs[0].fact.clone()),
            )?;
            model.add_edge(copy.into(), inlet)?;
        }
    }
    Ok(())
}

/// A cache input, the output that replaces it, and its value before any token.
struct CacheSlot {
    past: String,
    empty: TValue,
}

pub struct SegmentRunner {
    plan: Arc<TypedRunnableModel>,
    /// For a segment that makes `logits`: which output they are, and the
    /// same model planned for its other outputs only. A step whose logits
    /// nobody reads (one replayed onto a new plan) skips the LM head, a large
    /// share of a small model's work, and still leaves the very caches a full
    /// step would.
    headless: Option<(usize, Arc<TypedRunnableModel>)>,
    units: Range<usize>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    caches: Vec<CacheSlot>,
    /// Inputs read only for their shape: made here, never sent.
    shape_inputs: Vec<ValueInfoProto>,
}

/// One session's state in one segment: its layers' keys and values so far.
#[derive(Clone, Default)]
pub struct SegmentState {
    cache: HashMap<String, TValue>,
    /// Tokens this session has run through the segment.
    past: usize,
}

impl SegmentState {
    /// Tokens this session has run through the segment.
    pub fn past(&self) -> usize {
        self.past
    }

    /// The session's caches, by the name of the input that reads them: what
    /// moves with the layers when they move to another segment.
    pub fn caches(&self) -> impl Iterator<Item = (&str, &TValue)> {
        self.cache.iter().map(|(name, value)| (name.as_str(), value))
    }
}

impl SegmentRunner {
    /// Loads units `units` of `model`, returning `outputs` (plus its caches).
    pub fn load(model: &Model, units: Range<usize>, outputs: &[String]) -> Result<SegmentRunner, RunError> {
        let proto = model.segment_proto(units.clone(), outputs);
        let specs = || model.units[units.clone()].iter().map(|u| &u.spec);
        let shape_only: Vec<String> = specs()
            .flat_map(|s| s.shape_inputs.iter())
            .filter(|n| !specs().any(|s| s.inputs.contains(n)))
            .cloned()
            .collect();
        SegmentRunner::from_proto(proto, &model.dir, units.clone(), &shape_only, true, |name| {
            model.empty_cache_shape(name)
        })
    }

    /// Units `units` of `model`, returning every tensor they make that a
    /// later unit or the caller reads: such a runner fits in any segment that
    /// ends at or after it (see [`Chain`]).
    pub fn load_range(model: &Model, units: Range<usize>) -> Result<SegmentRunner, RunError> {
        let outputs: Vec<String> = model.units[units.clone()]
            .iter()
            .flat_map(|u| &u.spec.outputs)
            .filter(|o| !is_present(&o.name) && (o.graph_output || o.consumers.iter().any(|&c| c >= units.end)))
            .map(|o| o.name.clone())
            .collect();
        SegmentRunner::load(model, units, &outputs)
    }

    /// The units it runs.
    pub fn units(&self) -> Range<usize> {
        self.units.clone()
    }

    /// The whole export in `dir`, unsegmented: the slow, obviously correct
    /// reference the segmented and distributed paths are tested against.
    pub fn load_reference(dir: &Path) -> Result<SegmentRunner, RunError> {
        let fail = |reason: String| RunError::Load { units: 0..0, reason };
        let mut proto = onnx::read_model(&dir.join("model.onnx")).map_err(|e| fail(e.to_string()))?;
        let graph = proto.graph.as_mut().ok_or_else(|| fail("no graph".into()))?;
        shape::normalize(graph);
        let declared = graph.input.clone();
        let empty = |name: &str| shape::concrete(declared.iter().find(|i| i.name == name)?, 0, 0);
        SegmentRunner::from_proto(proto, dir, 0..0, &[], false, empty)
    }

    fn from_proto(
        mut proto: ModelProto,
        dir: &Path,
        units: Range<usize>,
        shape_only: &[String],
        last_logits_only: bool,
        empty_cache: impl Fn(&str) -> Option<(i32, Vec<usize>)>,
    ) -> Result<SegmentRunner, RunError> {
        let fail = |e: TractError| RunError::Load { units: units.clone(), reason: format!("{e:#}") };
        let graph = proto.graph.as_ref().expect("segments have graphs");
        let inputs: Vec<String> = graph.input.iter().map(|i| i.name.clone()).collect();
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        let shape_inputs = graph.input.iter().filter(|i| shape_only.contains(&i.name)).cloned().collect();
        let deferred = weight::prepare(&mut proto, dir).map_err(fail)?;
        let mut parsed = shape::frontend().parse(&proto, dir.to_str()).map_err(fail)?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(RunError::Load { units, reason: format!("unresolved inputs {:?}", parsed.unresolved_inputs) });
        }
        deferred.fill(&mut parsed.model, dir).map_err(fail)?;
        let logits = outputs.iter().position(|o| o == "logits");
        let model = parsed
            .model
            .into_typed()
            .and_then(|mut m| {
                match logits {
                    Some(ix) if last_logits_only => last_position_only(&mut m, ix)?,
                    _ => (),
                }
                m.into_decluttered()
            })
            .and_then(|mut m| {
                unshare_big_consts(&mut m)?;
                m.into_optimized()
            })
            .map(Arc::new)
            .map_err(fail)?;
        // Both plans share the model, weights included.
        let headless = match logits {
            Some(ix) => {
                let others: Vec<OutletId> =
                    model.outputs.iter().enumerate().filter(|(i, _)| *i != ix).map(|(_, o)| *o).collect();
                // Deprecated for the builder it calls; that one takes no outputs.
                #[allow(deprecated)]
                let plan = SimplePlan::build_with_outputs_and_deps(model.clone(), &others, &[], &RunOptions::default())
                    .map_err(fail)?;
                Some((ix, Arc::new(plan)))
            }
            None => None,
        };
        let plan = SimplePlan::new(model).map_err(fail)?;
        let mut caches = Vec::new();
        for name in inputs.iter().filter(|n| is_past(n)) {
            let (elem, shape) = empty_cache(name).ok_or_else(|| RunError::Load {
                units: units.clone(),
                reason: format!("cache input {name} has no declared shape"),
            })?;
            let dt = if elem == onnx::pb::tensor_proto::DataType::Float16 as i32 {
                f16::datum_type()
            } else {
                f32::datum_type()
            };
            let empty = Tensor::zero_dt(dt, &shape).map_err(fail)?.into_tvalue();
            caches.push(CacheSlot { past: name.clone(), empty });
        }
        Ok(SegmentRunner { plan, headless, units, inputs, outputs, caches, shape_inputs })
    }

    /// A fresh session: empty caches.
    pub fn new_state(&self) -> SegmentState {
        let cache = self.caches.iter().map(|c| (c.past.clone(), c.empty.clone())).collect();
        SegmentState { cache, past: 0 }
    }

    /// The cache inputs of this segment's layers (`past_key_values.N.key|value`).
    pub fn cache_names(&self) -> impl Iterator<Item = &str> {
        self.caches.iter().map(|c| c.past.as_str())
    }

    /// A session that has run `past` tokens through these layers elsewhere
    /// (segments cut otherwise, on other devices): each cache comes from
    /// `take`, by name. A missing one is an error, never an empty cache.
    pub fn resume(&self, past: usize, mut take: impl FnMut(&str) -> Option<TValue>) -> Result<SegmentState, RunError> {
        let mut cache = HashMap::new();
        for name in self.cache_names() {
            let value = take(name)
                .ok_or_else(|| RunError::MissingInput { units: self.units.clone(), name: name.to_string() })?;
            cache.insert(name.to_string(), value);
        }
        Ok(SegmentState { cache, past })
    }

    /// Runs one step (prefill or decode) of `tokens` new tokens of one
    /// session: reads its inputs from `acts`, updates the session's caches,
    /// returns the other outputs.
    pub fn run(&self, state: &mut SegmentState, tokens: usize, acts: &Activations) -> Result<Activations, RunError> {
        self.run_for(state, tokens, acts, true)
    }

    /// [`run`](Self::run), without `logits` (and the work only they need) unless `logits`.
    pub fn run_for(
        &self,
        state: &mut SegmentState,
        tokens: usize,
        acts: &Activations,
        logits: bool,
    ) -> Result<Activations, RunError> {
        let (plan, skipped) = match &self.headless {
            Some((ix, plan)) if !logits => (plan, Some(*ix)),
            _ => (&self.plan, None),
        };
        let missing = |name: &str| RunError::MissingInput { units: self.units.clone(), name: name.to_string() };
        let mut inputs = TVec::with_capacity(self.inputs.len());
        for name in &self.inputs {
            let value = if is_past(name) {
                state.cache.get(name).cloned()
            } else if let Some(info) = self.shape_inputs.iter().find(|i| &i.name == name) {
                let (_, shape) =
                    shape::concrete(info, state.past as i64, tokens as i64).ok_or_else(|| missing(name))?;
                Some(Tensor::zero::<i64>(&shape).map_err(|_| missing(name))?.into_tvalue())
            } else {
                acts.get(name).cloned()
            };
            inputs.push(value.ok_or_else(|| missing(name))?);
        }
        let outputs = plan.run(inputs);
        clear_vector_upper_halves();
        let outputs = outputs.map_err(|e| RunError::Run { units: self.units.clone(), reason: format!("{e:#}") })?;
        let names = self.outputs.iter().enumerate().filter(|(i, _)| Some(*i) != skipped).map(|(_, name)| name);
        let mut result = Activations::new();
        for (name, mut value) in names.zip(outputs) {
            if value.datum_type() == TDim::datum_type() {
                // tract computes some int64 tensors as dimensions; they travel as int64.
                let fail = |e: TractError| RunError::Run { units: self.units.clone(), reason: format!("{e:#}") };
                value = value.cast_to::<i64>().map_err(fail)?.into_owned().into_tvalue();
            }
            if is_present(name) {
                let layer = cache_layer(name).expect("present names carry a layer");
                let kind = name.rsplit('.').next().expect("key or value");
                state.cache.insert(format!("past_key_values.{layer}.{kind}"), value);
            } else {
                result.insert(name.clone(), value);
            }
        }
        state.past += tokens;
        Ok(result)
    }
}

/// tract's x86-64 matrix kernels (AVX2 and AVX-512 assembly) return without
/// `vzeroupper`, so after a step the upper halves of the vector registers
/// hold data. On Intel cores from Skylake on, every legacy SSE instruction
/// then waits on those halves: code built for baseline x86-64, as all of a
/// portable build is, runs several times slower on that thread until
/// something clears them. Sampling 32000 logits after a step took 4.8 ms
/// instead of 0.29 ms. Clearing them costs a cycle.
#[allow(unsafe_code)]
fn clear_vector_upper_halves() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX, checked above; `vzeroupper` zeroes the
        // registers' upper halves, which compiled code never keeps a value
        // in across a call.
        unsafe { std::arch::x86_64::_mm256_zeroupper() };
    }
}

/// A segment run as consecutive runners, each loaded with
/// [`SegmentRunner::load_range`]. When a plan gives a device other segments,
/// it keeps the runners of units it already holds (its earlier segments, or
/// spare units it loaded ahead) and loads only the units between them.
pub struct Chain {
    parts: Vec<Arc<SegmentRunner>>,
}

/// One session's state in a [`Chain`]: each part's.
#[derive(Clone, Default)]
pub struct ChainState(Vec<SegmentState>);

impl Chain {
    /// `parts` must run consecutive units.
    pub fn new(parts: Vec<Arc<SegmentRunner>>) -> Chain {
        debug_assert!(parts.windows(2).all(|w| w[0].units.end == w[1].units.start));
        Chain { parts }
    }

    /// The units the chain runs.
    pub fn units(&self) -> Range<usize> {
        match (self.parts.first(), self.parts.last()) {
            (Some(first), Some(last)) => first.units.start..last.units.end,
            _ => 0..0,
        }
    }

    pub fn new_state(&self) -> ChainState {
        ChainState(self.parts.iter().map(|p| p.new_state()).collect())
    }

    /// See [`SegmentRunner::resume`].
    pub fn resume(&self, past: usize, mut take: impl FnMut(&str) -> Option<TValue>) -> Result<ChainState, RunError> {
        self.parts.iter().map(|p| p.resume(past, &mut take)).collect::<Result<_, _>>().map(ChainState)
    }

    /// Runs one step through every part; returns every part's outputs.
    pub fn run(&self, state: &mut ChainState, tokens: usize, acts: &Activations) -> Result<Activations, RunError> {
        self.run_for(state, tokens, acts, true)
    }

    /// [`run`](Self::run), without `logits` unless `logits` ([`SegmentRunner::run_for`]).
    pub fn run_for(
        &self,
        state: &mut ChainState,
        tokens: usize,
        acts: &Activations,
        logits: bool,
    ) -> Result<Activations, RunError> {
        if let [part] = &self.parts[..] {
            return part.run_for(&mut state.0[0], tokens, acts, logits);
        }
        let mut inputs = acts.clone();
        let mut outputs = Activations::new();
        for (part, state) in self.parts.iter().zip(state.0.iter_mut()) {
            for (name, value) in part.run_for(state, tokens, &inputs, logits)? {
                inputs.insert(name.clone(), value.clone());
                outputs.insert(name, value);
            }
        }
        Ok(outputs)
    }
}

impl ChainState {
    /// Tokens this session has run through the chain.
    pub fn past(&self) -> usize {
        self.0.first().map_or(0, SegmentState::past)
    }

    /// See [`SegmentState::caches`].
    pub fn caches(&self) -> impl Iterator<Item = (&str, &TValue)> {
        self.0.iter().flat_map(SegmentState::caches)
    }
}
