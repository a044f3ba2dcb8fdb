//! Segments composed equal the whole model: every grouping of units, through
//! prefill and decode, against the unsegmented export run by tract.

mod common;

use std::ops::Range;

use llnode_models::model::Model;
use llnode_models::pipeline::{Forward, LocalPipeline, last_logits, step_inputs};
use llnode_models::runner::{Chain, ChainState, SegmentRunner, SegmentState};
use llnode_models::segment::UnitKind;
use llnode_models::transmission::TransmissionMap;
use proptest::prelude::*;

const PROMPT: [u32; 5] = [17, 300, 42, 9, 511];
const DECODE: [u32; 3] = [5, 77, 260];

/// Logits of every step from the unsegmented export.
fn reference_logits() -> Vec<Vec<f32>> {
    let runner = SegmentRunner::load_reference(common::tiny_export()).unwrap();
    let mut pipeline = LocalPipeline::new(vec![runner], true);
    let mut steps = vec![pipeline.forward(&PROMPT).unwrap()];
    for t in DECODE {
        steps.push(pipeline.forward(&[t]).unwrap());
    }
    steps
}

fn segmented_logits(model: &Model, segments: &[Range<usize>]) -> Vec<Vec<f32>> {
    let mut pipeline = LocalPipeline::load(model, segments).unwrap();
    let mut steps = vec![pipeline.forward(&PROMPT).unwrap()];
    for t in DECODE {
        steps.push(pipeline.forward(&[t]).unwrap());
    }
    steps
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn units_are_prologue_layers_epilogue() {
    let model = Model::from_export(common::tiny_export()).unwrap();
    let kinds: Vec<UnitKind> = model.units.iter().map(|u| u.spec.kind).collect();
    let mut expected = vec![UnitKind::Prologue];
    expected.extend((0..4).map(UnitKind::Layer));
    expected.push(UnitKind::Epilogue);
    assert_eq!(kinds, expected);
    // The mask and rotary tables are made once, in the prologue, and go to every layer.
    let prologue = &model.units[0].spec;
    let skips: Vec<_> = prologue.outputs.iter().filter(|o| o.consumers == vec![1, 2, 3, 4]).collect();
    assert_eq!(skips.len(), 3, "mask, cos and sin: {:?}", prologue.outputs);
    for (i, unit) in model.units.iter().enumerate().skip(1).take(4) {
        let past: Vec<_> = unit.spec.inputs.iter().filter(|n| n.starts_with("past_key_values")).collect();
        assert_eq!(past.len(), 2, "layer {} reads only its own cache", i - 1);
        assert!(past.iter().all(|n| n.starts_with(&format!("past_key_values.{}.", i - 1))));
    }
    // Tied embeddings: one tensor, read by the prologue and the epilogue.
    let embed = "model.embed_tokens.weight";
    let readers: Vec<usize> =
        (0..model.units.len()).filter(|&u| model.units[u].spec.initializers.iter().any(|n| n == embed)).collect();
    assert_eq!(readers, vec![0, 5]);
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // one segment holding every unit
fn whole_model_through_units_matches_reference() {
    let model = Model::from_export(common::tiny_export()).unwrap();
    let reference = reference_logits();
    let whole = segmented_logits(&model, &[0..model.units.len()]);
    assert!(max_diff(&reference, &whole) < 1e-4, "diff {}", max_diff(&reference, &whole));
    // Greedy tokens differ between steps: the model is not degenerate.
    let argmaxes: Vec<u32> = reference.iter().map(|l| llnode_models::sampling::argmax(l)).collect();
    assert!(argmaxes.windows(2).any(|w| w[0] != w[1]), "{argmaxes:?}");
}

/// Generation reads the last position's logits only, so segments project only
/// that position onto the vocabulary; the reference returns them all.
#[test]
fn segments_return_the_last_position_logits() {
    let model = Model::from_export(common::tiny_export()).unwrap();
    let units = model.units.len();
    let acts = step_inputs(&PROMPT, 0, true);
    let whole = 0..units;
    for segments in [vec![whole], vec![0..units - 1, units - 1..units]] {
        let map =
            TransmissionMap::new(&model.units.iter().map(|u| u.spec.clone()).collect::<Vec<_>>(), &segments).unwrap();
        let last = segments.len() - 1;
        let runner = SegmentRunner::load(&model, segments[last].clone(), &map.output_names(last)).unwrap();
        let mut inputs = acts.clone();
        if last > 0 {
            let first = SegmentRunner::load(&model, segments[0].clone(), &map.output_names(0)).unwrap();
            inputs.extend(first.run(&mut first.new_state(), PROMPT.len(), &acts).unwrap());
        }
        let logits = &runner.run(&mut runner.new_state(), PROMPT.len(), &inputs).unwrap()["logits"];
        assert_eq!(&logits.shape()[..2], &[1, 1], "segments {segments:?}");
    }
    let reference = SegmentRunner::load_reference(common::tiny_export()).unwrap();
    let logits = &reference.run(&mut reference.new_state(), PROMPT.len(), &acts).unwrap()["logits"];
    assert_eq!(&logits.shape()[..2], &[1, PROMPT.len()]);
}

/// Runners of `segments`, with the outputs the transmission map asks of each.
fn runners(model: &Model, segments: &[Range<usize>]) -> Vec<SegmentRunner> {
    let map = TransmissionMap::new(&model.units.iter().map(|u| u.spec.clone()).collect::<Vec<_>>(), segments).unwrap();
    segments
        .iter()
        .enumerate()
        .map(|(s, range)| SegmentRunner::load(model, range.clone(), &map.output_names(s)).unwrap())
        .collect()
}

/// One step through chained runners: the last position's logits.
fn step(runners: &[SegmentRunner], states: &mut [SegmentState], tokens: &[u32], past: usize) -> Vec<f32> {
    let mut acts = step_inputs(tokens, past, true);
    for (runner, state) in runners.iter().zip(states.iter_mut()) {
        acts.extend(runner.run(state, tokens.len(), &acts).unwrap());
    }
    last_logits(&acts["logits"]).unwrap()
}

/// A session's caches move to segments cut elsewhere (what a rebalance does
/// across devices) and the generation goes on as if nothing had moved; a
/// segment missing a cache refuses to resume rather than start empty.
#[test]
fn caches_moved_to_other_segments_carry_the_session_on() {
    let model = Model::from_export(common::tiny_export()).unwrap();
    let n = model.units.len();
    let reference = reference_logits();
    let before = runners(&model, &[0..2, 2..n]);
    let mut states: Vec<SegmentState> = before.iter().map(SegmentRunner::new_state).collect();
    let mut logits = vec![step(&before, &mut states, &PROMPT, 0)];
    logits.push(step(&before, &mut states, &DECODE[..1], PROMPT.len()));
    let past = PROMPT.len() + 1;
    assert!(states.iter().all(|s| s.past() == past));
    let held: std::collections::HashMap<String, _> =
        states.iter().flat_map(|s| s.caches()).map(|(name, value)| (name.to_string(), value.clone())).collect();
    assert_eq!(held.len(), 2 * 4, "a key and a value per layer");

    let after = runners(&model, &[0..3, 3..n - 1, n - 1..n]);
    let mut moved: Vec<SegmentState> =
        after.iter().map(|r| r.resume(past, |name| held.get(name).cloned()).unwrap()).collect();
    for (position, t) in (past..).zip(&DECODE[1..]) {
        logits.push(step(&after, &mut moved, &[*t], position));
    }
    assert!(max_diff(&reference, &logits) < 1e-4, "diff {}", max_diff(&reference, &logits));

    let missing =
        after[1].resume(past, |name| held.get(name).filter(|_| !name.starts_with("past_key_values.2.")).cloned());
    assert!(missing.is_err_and(|e| e.to_string().contains("past_key_values.2.")));
}

/// Runners loaded on their own ranges, chained into segments, run like the
/// whole model: how a device reuses the runners it holds when a plan moves.
#[test]
fn chains_of_runners_loaded_apart_run_like_the_whole_model() {
    let model = Model::from_export(common::tiny_export()).unwrap();
    let n = model.units.len();
    let part = |units: Range<usize>| std::sync::Arc::new(SegmentRunner::load_range(&model, units).unwrap());
    let chains = [Chain::new(vec![part(0..2), part(2..4)]), Chain::new(vec![part(4..n)])];
    let mut states: Vec<ChainState> = chains.iter().map(Chain::new_state).collect();
    let mut logits = Vec::new();
    let mut past = 0;
    for tokens in [&PROMPT[..], &DECODE[..1], &DECODE[1..2], &DECODE[2..]] {
        let mut acts = step_inputs(tokens, past, true);
        for (chain, state) in chains.iter().zip(states.iter_mut()) {
            acts.extend(chain.run(state, tokens.len(), &acts).unwrap());
        }
        logits.push(last_logits(&acts["logits"]).unwrap());
        past += tokens.len();
    }
    let reference = reference_logits();
    assert!(max_diff(&reference, &logits) < 1e-4, "diff {}", max_diff(&reference, &logits));
    assert_eq!(states[0].past(), past);
    assert_eq!(states[0].caches().count(), 2 * 3, "layers 0, 1 and 2: a key and a value each");
}

/// Steps run without their logits (what a replay onto a new plan does)
/// return none, skip the head, and leave exactly the caches full steps
/// leave: the steps after them give the very same logits. Both with the
/// head beside layers in one runner and alone in one of a chain.
#[test]
fn steps_without_logits_leave_the_same_caches() {
    let model = Model::from_export(common::tiny_export()).unwrap();
    let n = model.units.len();
    let part = |units: Range<usize>| std::sync::Arc::new(SegmentRunner::load_range(&model, units).unwrap());
    for chain in [Chain::new(vec![part(0..n)]), Chain::new(vec![part(0..n - 1), part(n - 1..n)])] {
        let (mut full, mut replayed) = (chain.new_state(), chain.new_state());
        let mut past = 0;
        for (i, tokens) in [&PROMPT[..], &DECODE[..1], &DECODE[1..2], &DECODE[2..]].into_iter().enumerate() {
            let acts = step_inputs(tokens, past, true);
            let expected = chain.run(&mut full, tokens.len(), &acts).unwrap();
            let last = i == 3;
            let got = chain.run_for(&mut replayed, tokens.len(), &acts, last).unwrap();
            if last {
                assert_eq!(last_logits(&got["logits"]).unwrap(), last_logits(&expected["logits"]).unwrap());
            } else {
                assert!(!got.contains_key("logits"), "{:?}", got.keys());
            }
            past += tokens.len();
        }
        assert_eq!(replayed.past(), full.past());
        let caches = |state: &ChainState| {
            let mut caches: Vec<(String, Vec<f32>)> = state
                .caches()
                .map(|(name, value)| {
                    (name.to_string(), value.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec())
                })
                .collect();
            caches.sort_by(|a, b| a.0.cmp(&b.0));
            caches
        };
        assert_eq!(caches(&replayed), caches(&full));
    }
}

#[test]
fn every_unit_is_timed_on_its_own() {
    let model = Model::from_export(common::tiny_export()).unwrap();
    let n = model.units.len();
    let timings = llnode_models::pipeline::time_units(&model, 16, 4, n).unwrap();
    assert_eq!(timings.len(), n);
    assert!(timings.iter().all(|t| t.prefill_s > 0.0 && t.decode_s > 0.0 && t.load_s > 0.0), "{timings:?}");
    // The prologue's token table is cut to the rows the run looks up (the
    // tiny model has 512); every other unit loads all its weights.
    let cost = llnode_models::cost::CostProfile::of(&model);
    assert!(timings[0].loaded_bytes < cost.units[0].weight_bytes / 4, "{timings:?}");
    for (t, c) in timings.iter().zip(&cost.units).skip(1) {
        assert_eq!(t.loaded_bytes, c.weight_bytes, "{}", c.name);
    }
    // Units from `upto` on are left alone.
    assert_eq!(llnode_models::pipeline::time_units(&model, 16, 4, n - 1).unwrap().len(), n - 1);
}

#[test]
fn step_inputs_follow_the_optimum_interface() {
    let acts = step_inputs(&[1, 2], 3, true);
    assert_eq!(acts["input_ids"].shape(), &[1, 2]);
    assert_eq!(acts["attention_mask"].shape(), &[1, 5]);
    assert_eq!(acts["position_ids"].try_as_plain_ram().unwrap().as_slice::<i64>().unwrap(), &[3, 4]);
    assert!(!step_inputs(&[1], 0, false).contains_key("position_ids"));
    use tract_onnx::prelude::IntoTValue;
    let logits = tract_onnx::prelude::Tensor::from_shape(&[1, 2, 2], &[1f32, 2., 3., 4.]).unwrap();
    assert_eq!(last_logits(&logits.into_tvalue()).unwrap(), vec![3., 4.]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn any_grouping_composes_to_the_whole_model(cuts in proptest::collection::btree_set(1usize..6, 0..5)) {
        let model = Model::from_export(common::tiny_export()).unwrap();
        let mut bounds: Vec<usize> = vec![0];
        bounds.extend(cuts);
        bounds.push(model.units.len());
        let segments: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
        let diff = max_diff(&reference_logits(), &segmented_logits(&model, &segments));
        prop_assert!(diff < 1e-4, "segments {:?}: max diff {}", segments, diff);
    }
}
