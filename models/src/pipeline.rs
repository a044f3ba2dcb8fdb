//! A pipeline of segments in one process: the same segment runners and
//! transmission map a mesh uses, with the hops replaced by a map lookup.
//! `llnode run --segments K` and the composition tests run through it.

use std::ops::Range;
use std::time::Instant;

use tract_onnx::prelude::*;

use crate::model::Model;
use crate::progress::{Progress, Silent};
use crate::runner::{Activations, RunError, SegmentRunner, SegmentState};
use crate::transmission::{GroupingError, TransmissionMap};

/// One forward step of a model: feed tokens, get the next-token logits.
pub trait Forward {
    /// Runs `tokens` after everything fed so far; returns the logits of the last one.
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RunError>;
    /// Tokens fed so far (the past length).
    fn position(&self) -> usize;
}

/// The inputs the initiator supplies for one step.
pub fn step_inputs(tokens: &[u32], past: usize, with_positions: bool) -> Activations {
    let s = tokens.len();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let mut acts = Activations::new();
    let tensor = |shape: &[usize], data: &[i64]| Tensor::from_shape(shape, data).expect("sizes match").into_tvalue();
    acts.insert("input_ids".into(), tensor(&[1, s], &ids));
    acts.insert("attention_mask".into(), tensor(&[1, past + s], &vec![1; past + s]));
    if with_positions {
        let positions: Vec<i64> = (past..past + s).map(|p| p as i64).collect();
        acts.insert("position_ids".into(), tensor(&[1, s], &positions));
    }
    acts
}

/// The last position's logits as f32, whatever the model's float type.
pub fn last_logits(logits: &TValue) -> Result<Vec<f32>, RunError> {
    let fail = |e: TractError| RunError::Run { units: 0..0, reason: format!("reading logits: {e:#}") };
    let logits = logits.cast_to::<f32>().map_err(fail)?;
    let shape = logits.shape();
    let vocab = *shape.last().unwrap_or(&0);
    let view = logits.try_as_plain_ram().map_err(fail)?;
    let data = view.as_slice::<f32>().map_err(fail)?;
    if vocab == 0 || data.len() < vocab {
        return Err(RunError::Run { units: 0..0, reason: format!("logits have shape {shape:?}") });
    }
    Ok(data[data.len() - vocab..].to_vec())
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Grouping(#[from] GroupingError),
    #[error(transparent)]
    Run(#[from] RunError),
}

pub struct LocalPipeline {
    runners: Vec<SegmentRunner>,
    states: Vec<SegmentState>,
    with_positions: bool,
    past: usize,
}

impl LocalPipeline {
    /// Loads `model` as the given consecutive segments.
    pub fn load(model: &Model, segments: &[Range<usize>]) -> Result<LocalPipeline, PipelineError> {
        LocalPipeline::load_with(model, segments, &Silent)
    }

    /// [`LocalPipeline::load`], counting the weight bytes of each segment as it is ready.
    pub fn load_with(
        model: &Model,
        segments: &[Range<usize>],
        progress: &dyn Progress,
    ) -> Result<LocalPipeline, PipelineError> {
        let specs: Vec<_> = model.units.iter().map(|u| u.spec.clone()).collect();
        let map = TransmissionMap::new(&specs, segments)?;
        let bytes = |range: &Range<usize>| -> u64 {
            model.units[range.clone()].iter().flat_map(|u| &u.graph.initializer).map(crate::onnx::tensor_bytes).sum()
        };
        progress.phase("loading", segments.iter().map(bytes).sum());
        let runners = segments
            .iter()
            .enumerate()
            .map(|(s, range)| {
                let runner = SegmentRunner::load(model, range.clone(), &map.output_names(s));
                progress.advance(bytes(range));
                runner
            })
            .collect::<Result<Vec<_>, _>>()?;
        let with_positions = model.inputs.iter().any(|i| i.name == "position_ids");
        Ok(LocalPipeline::new(runners, with_positions))
    }

    pub fn new(runners: Vec<SegmentRunner>, with_positions: bool) -> LocalPipeline {
        let states = runners.iter().map(SegmentRunner::new_state).collect();
        LocalPipeline { runners, states, with_positions, past: 0 }
    }

    /// Forgets the session: empty caches, position 0.
    pub fn reset(&mut self) {
        self.states = self.runners.iter().map(SegmentRunner::new_state).collect();
        self.past = 0;
    }
}

impl LocalPipeline {
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RunError> {
        let mut acts = step_inputs(tokens, self.past, self.with_positions);
        for (runner, state) in self.runners.iter().zip(self.states.iter_mut()) {
            acts.extend(runner.run(state, tokens.len(), &acts)?);
        }
        let logits = acts.get("logits").ok_or_else(|| RunError::MissingInput { units: 0..0, name: "logits".into() })?;
        self.past += tokens.len();
        last_logits(logits)
    }
}

/// What one unit costs on this device, measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnitTiming {
    /// Seconds for a prefill of the measured prompt length.
    pub prefill_s: f64,
    /// Seconds per decoded token (the median step).
    pub decode_s: f64,
    /// Seconds to load its runner: reading its weights and optimising its graph.
    pub load_s: f64,
    /// Bytes of weights that runner loaded (lookup tables cut short, see [`time_units`]).
    pub loaded_bytes: u64,
}

/// Token ids and positions of the unit timing run are below this.
const TIMED_IDS: usize = 64;

/// Before each timed step, at least this many bytes (when the other units
/// have them) are read through, so that the unit's weights come from
/// memory, not the CPU's caches: more than a phone's or a laptop's
/// last-level cache.
const EVICT_MIN_BYTES: u64 = 32 << 20;
/// On a machine whose last-level cache is bigger, as many bytes as it
/// holds are read through, up to this.
///
/// On this project's server (480 MiB of L3), the bench model's units timed
/// alone promised 11.3–11.9 GFLOP/s with 32 MiB read through and 7.5–7.8
/// with all the other units' 376 MB (which `llnode run` then decodes at:
/// 26.7 ms per token promised, 26.6 run); with 128 MiB, 9.1, about 1.2× the
/// pace, inside the balancer's threshold (1.5×). Measuring then takes 2.3 s
/// rather than 1.2 (5.5 s for all of them) and peaks at 210 MB rather than
/// 115 (566 MB): the bytes read through are memory of their own.
const EVICT_MAX_BYTES: u64 = 128 << 20;

/// How many bytes to read through before a timed step: this machine's
/// last-level cache, within [`EVICT_MIN_BYTES`]..=[`EVICT_MAX_BYTES`].
fn eviction_bytes() -> u64 {
    last_level_cache(std::path::Path::new("/sys/devices/system/cpu/cpu0/cache"))
        .unwrap_or(0)
        .clamp(EVICT_MIN_BYTES, EVICT_MAX_BYTES)
}

/// The biggest cache the CPU lists under `dir` (Linux's
/// `/sys/devices/system/cpu/cpu0/cache`: `index*/size`, as in "491520K");
/// `None` where it lists none (some phones and containers).
fn last_level_cache(dir: &std::path::Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("index"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("size")).ok())
        .filter_map(|size| {
            let size = size.trim();
            let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len()));
            let scale = match unit {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                _ => return None,
            };
            digits.parse::<u64>().ok().map(|n| n * scale)
        })
        .max()
}

/// Times the first `upto` units of `model` on this device, each as its own
/// segment: a prefill of `prompt` tokens, then `steps` single-token decode
/// steps. One unit is loaded at a time, fed what the units before it
/// produced at each step, and dropped before the next loads, so measuring
/// takes the memory of the biggest unit timed, not of the whole model; units
/// from `upto` on are not loaded at all.
///
/// When a device runs a unit among others, their weights pass through its
/// caches between two steps of the unit; run again and again alone, a unit
/// keeps its weights in a big cache and times up to twice as fast as it
/// runs (a layer of the built-in `bench` model: 1.3 ms warm, 2.5–2.9 ms
/// cold, on a server with a big last-level cache; the whole model decodes at
/// the cold figures). So before each step the other units' weight bytes (as
/// many as the last-level cache holds, 32–128 MiB) are read through.
pub fn time_units(model: &Model, prompt: usize, steps: usize, upto: usize) -> Result<Vec<UnitTiming>, PipelineError> {
    let n = model.units.len();
    let unit_bytes: Vec<u64> =
        model.units.iter().map(|u| u.graph.initializer.iter().map(crate::onnx::tensor_bytes).sum()).collect();
    let all_bytes: u64 = unit_bytes.iter().sum();
    let evict = eviction_bytes();
    let evictor = Evictor::new(all_bytes.min(evict));
    let specs: Vec<_> = model.units.iter().map(|u| u.spec.clone()).collect();
    let singles: Vec<Range<usize>> = (0..n).map(|i| i..i + 1).collect();
    let map = TransmissionMap::new(&specs, &singles)?;
    let with_positions = model.inputs.iter().any(|i| i.name == "position_ids");
    let prompt: Vec<u32> = (0..prompt.max(1) as u32).map(|t| t % TIMED_IDS as u32 + 1).collect();
    let mut past = 0;
    let mut feeds: Vec<(usize, Activations)> = Vec::new();
    for step in std::iter::once(prompt).chain((0..steps.max(1)).map(|s| vec![(s % TIMED_IDS + 1) as u32])) {
        feeds.push((step.len(), step_inputs(&step, past, with_positions)));
        past += step.len();
    }
    let mut timings = Vec::with_capacity(n);
    for (unit, own_bytes) in unit_bytes.iter().enumerate().take(upto.min(n)) {
        let rows = (TIMED_IDS + past + 1) as i64;
        let short = with_short_tables(model, unit, rows);
        let timed = short.as_ref().unwrap_or(model);
        let loaded_bytes = timed.units[unit].graph.initializer.iter().map(crate::onnx::tensor_bytes).sum();
        let loading = Instant::now();
        let runner = SegmentRunner::load(timed, unit..unit + 1, &map.output_names(unit))?;
        let load_s = loading.elapsed().as_secs_f64();
        let mut state = runner.new_state();
        let mut secs = Vec::with_capacity(feeds.len());
        let others = (all_bytes - own_bytes).min(evict);
        for (tokens, acts) in &mut feeds {
            evictor.sweep(others);
            let started = Instant::now();
            let out = runner.run(&mut state, *tokens, acts)?;
            secs.push(started.elapsed().as_secs_f64());
            acts.extend(out);
        }
        let prefill_s = secs.remove(0);
        secs.sort_by(f64::total_cmp);
        timings.push(UnitTiming { prefill_s, decode_s: secs[secs.len() / 2], load_s, loaded_bytes });
    }
    Ok(timings)
}

/// Memory read through to push other data out of the CPU's caches.
struct Evictor(Vec<u8>);

impl Evictor {
    fn new(bytes: u64) -> Evictor {
        // Written, so that its pages are real memory and not the shared zero page.
        Evictor(vec![1; bytes as usize])
    }

    /// Reads the first `bytes`, a byte per cache line.
    fn sweep(&self, bytes: u64) {
        let seen: u64 = self.0[..(bytes as usize).min(self.0.len())].iter().step_by(64).map(|&b| u64::from(b)).sum();
        std::hint::black_box(seen);
    }
}

/// `model` with unit `unit`'s lookup tables cut to their first `rows` rows,
/// if it has any: external initializers that a `Gather` along the first axis
/// indexes by a model input (token embeddings by `input_ids`, position
/// embeddings by `position_ids`). A lookup takes as long in a table of 65
/// rows as in one of 32 000, and timing the prologue then does not hold the
/// whole embedding (twice, while it loads). `None` when there is nothing to cut.
fn with_short_tables(model: &Model, unit: usize, rows: i64) -> Option<Model> {
    let graph = &model.units[unit].graph;
    let model_input = |name: &str| model.inputs.iter().any(|i| i.name == name);
    let tables: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Gather" && n.input.len() == 2 && model_input(&n.input[1]))
        .filter(|n| n.attribute.iter().find(|a| a.name == "axis").is_none_or(|a| a.i == 0))
        .map(|n| n.input[0].clone())
        .collect();
    let cut = |t: &tract_onnx::pb::TensorProto| {
        tables.contains(&t.name) && crate::onnx::is_external(t) && t.dims.first().is_some_and(|&d| d > rows)
    };
    if !graph.initializer.iter().any(cut) {
        return None;
    }
    let mut short = model.clone();
    for t in short.units[unit].graph.initializer.iter_mut() {
        if !cut(t) {
            continue;
        }
        let Some(location) = crate::onnx::external_entry(t, "location").map(str::to_string) else { continue };
        let offset: u64 = crate::onnx::external_entry(t, "offset").and_then(|o| o.parse().ok()).unwrap_or(0);
        t.dims[0] = rows;
        let length = crate::onnx::tensor_bytes(t);
        crate::onnx::set_external(t, &location, offset, length);
    }
    Some(short)
}

impl Forward for LocalPipeline {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RunError> {
        self.step(tokens)
    }

    fn position(&self) -> usize {
        self.past
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_level_cache_is_the_biggest_listed_and_bounds_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        for (index, size) in [("index0", "48K\n"), ("index2", "2048K\n"), ("index3", "491520K\n"), ("power", "9G")] {
            std::fs::create_dir(dir.path().join(index)).unwrap();
            std::fs::write(dir.path().join(index).join("size"), size).unwrap();
        }
        assert_eq!(last_level_cache(dir.path()), Some(491520 << 10));
        std::fs::write(dir.path().join("index3").join("size"), "32M").unwrap();
        assert_eq!(last_level_cache(dir.path()), Some(32 << 20));
        std::fs::write(dir.path().join("index3").join("size"), "many").unwrap();
        assert_eq!(last_level_cache(dir.path()), Some(2048 << 10));
        assert_eq!(last_level_cache(&dir.path().join("absent")), None);
        assert!((EVICT_MIN_BYTES..=EVICT_MAX_BYTES).contains(&eviction_bytes()));
    }
}
