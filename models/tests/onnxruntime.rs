//! The whole model, run by llnode, equals onnxruntime: the built-in model and
//! small GPT-2-, Llama-, Qwen2-, BLOOM- and Phi-shaped Optimum exports, against
//! the references `scripts/ort_reference.py` wrote (and CI recomputes):
//! logits within 1e-3 and identical greedy 32-token continuations, both
//! unsegmented and cut into one segment per unit.

mod common;

use std::path::{Path, PathBuf};

use llnode_models::model::Model;
use llnode_models::pipeline::{Forward, LocalPipeline};
use llnode_models::runner::SegmentRunner;
use llnode_models::sampling::argmax;
use llnode_models::tokenizer::TextTokenizer;
use serde_json::Value;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs the reference's prompt greedily through `forward` and compares.
fn check(name: &str, forward: &mut dyn Forward, reference: &Value) {
    let prompt = ids(&reference["prompt_ids"]);
    let expected = ids(&reference["generated_ids"]);
    let mut logits = forward.forward(&prompt).unwrap();
    let diff = max_diff(&logits, &floats(&reference["prefill_last_logits"]));
    assert!(diff < 1e-3, "{name}: prefill logits differ by {diff}");
    let mut generated = Vec::new();
    for step in 0..expected.len() {
        let token = argmax(&logits);
        generated.push(token);
        logits = forward.forward(&[token]).unwrap();
        if step == 0 {
            let diff = max_diff(&logits, &floats(&reference["decode_logits_step1"]));
            assert!(diff < 1e-3, "{name}: first decode logits differ by {diff}");
        }
    }
    assert_eq!(generated, expected, "{name}: greedy continuation");
}

fn check_family(dir: &Path, reference: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let tokenizer = TextTokenizer::load(dir, None).unwrap();
    let prompt = reference["prompt"].as_str().unwrap();
    assert_eq!(tokenizer.encode(prompt).unwrap(), ids(&reference["prompt_ids"]), "{name}: tokenizer");

    let whole = SegmentRunner::load_reference(dir).unwrap();
    let with_positions = reference["inputs"].get("position_ids").is_some();
    check(&format!("{name} (whole)"), &mut LocalPipeline::new(vec![whole], with_positions), &reference);

    let model = Model::from_export(dir).unwrap();
    let per_unit: Vec<_> = (0..model.units.len()).map(|u| u..u + 1).collect();
    check(&format!("{name} (per unit)"), &mut LocalPipeline::load(&model, &per_unit).unwrap(), &reference);
}

#[test]
fn built_in_model_matches_onnxruntime() {
    check_family(common::tiny_export(), &testdata().join("builtin-tiny-reference.json"));
}

#[test]
fn gpt2_matches_onnxruntime() {
    let dir = testdata().join("exports/gpt2");
    check_family(&dir, &dir.join("reference.json"));
}

#[test]
fn llama_matches_onnxruntime() {
    let dir = testdata().join("exports/llama");
    check_family(&dir, &dir.join("reference.json"));
}

#[test]
fn qwen2_matches_onnxruntime() {
    let dir = testdata().join("exports/qwen2");
    check_family(&dir, &dir.join("reference.json"));
}

#[test]
fn bloom_matches_onnxruntime() {
    let dir = testdata().join("exports/bloom");
    check_family(&dir, &dir.join("reference.json"));
}

#[test]
fn phi_matches_onnxruntime() {
    let dir = testdata().join("exports/phi");
    check_family(&dir, &dir.join("reference.json"));
}
