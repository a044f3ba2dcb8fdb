//! A pipeline of segments in one process: the same segment runners and
//! transmission map a mesh uses, with the hops replaced by a map lookup.
//! `llnode run --segments K` and the composition tests run through it.

use std::ops::Range;
use std::time::Instant;

use tract_onnx::prelude::*;

use crate::model::Model;
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
        let specs: Vec<_> = model.units.iter().map(|u| u.spec.clone()).collect();
        let map = TransmissionMap::new(&specs, segments)?;
        let runners = segments
            .iter()
            .enumerate()
            .map(|(s, range)| SegmentRunner::load(model, range.clone(), &map.output_names(s)))
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
    /// One step; adds each segment's seconds to `times` when given.
    fn step(&mut self, tokens: &[u32], mut times: Option<&mut [f64]>) -> Result<Vec<f32>, RunError> {
        let mut acts = step_inputs(tokens, self.past, self.with_positions);
        for (s, (runner, state)) in self.runners.iter().zip(self.states.iter_mut()).enumerate() {
            let started = Instant::now();
            let out = runner.run(state, tokens.len(), &acts)?;
            if let Some(t) = times.as_deref_mut() {
                t[s] += started.elapsed().as_secs_f64();
            }
            acts.extend(out);
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
}

/// Times every unit of `model` on this device, each as its own segment: a
/// prefill of `prompt` tokens, then `steps` single-token decode steps.
pub fn time_units(model: &Model, prompt: usize, steps: usize) -> Result<Vec<UnitTiming>, PipelineError> {
    let n = model.units.len();
    let segments: Vec<Range<usize>> = (0..n).map(|i| i..i + 1).collect();
    let mut pipeline = LocalPipeline::load(model, &segments)?;
    let tokens: Vec<u32> = (0..prompt.max(1) as u32).map(|t| t % 64 + 1).collect();
    let mut prefill = vec![0.0; n];
    pipeline.step(&tokens, Some(&mut prefill))?;
    let mut decode: Vec<Vec<f64>> = vec![Vec::with_capacity(steps); n];
    for step in 0..steps.max(1) {
        let mut t = vec![0.0; n];
        pipeline.step(&[(step % 64 + 1) as u32], Some(&mut t))?;
        for (unit, secs) in t.into_iter().enumerate() {
            decode[unit].push(secs);
        }
    }
    Ok(prefill
        .into_iter()
        .zip(decode)
        .map(|(prefill_s, mut d)| {
            d.sort_by(f64::total_cmp);
            UnitTiming { prefill_s, decode_s: d[d.len() / 2] }
        })
        .collect())
}

impl Forward for LocalPipeline {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RunError> {
        self.step(tokens, None)
    }

    fn position(&self) -> usize {
        self.past
    }
}
