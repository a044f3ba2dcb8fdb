//! Packages: import writes units, weights and a manifest atomically and
//! deterministically; a package runs exactly like its export; corruption and
//! bad exports are refused with a reason.

mod common;

use std::path::Path;

use llnode_models::generate::{GenerateOptions, generate};
use llnode_models::model::{ImportError, Model};
use llnode_models::package::{self, Manifest};
use llnode_models::pipeline::LocalPipeline;
use llnode_models::progress::Silent;
use llnode_models::sampling::SamplingConfig;
use llnode_models::synth::{self, SynthConfig};
use llnode_models::tokenizer::TextTokenizer;
use llnode_models::transmission::even_split;

fn import(export: &Path, out: &Path) -> String {
    package::write(&Model::from_export(export).unwrap(), out, &Silent).unwrap()
}

fn greedy_text(model: &Model, segments: usize, prompt: &str) -> (Vec<u32>, String) {
    let mut pipeline = LocalPipeline::load(model, &even_split(model.units.len(), segments)).unwrap();
    let tokenizer = TextTokenizer::load(&model.dir, model.info.vocab_size).unwrap();
    let ids = tokenizer.encode(prompt).unwrap();
    let options = GenerateOptions {
        max_tokens: 24,
        sampling: SamplingConfig::default(),
        stop: vec![],
        eos: vec![],
        context: model.info.max_positions,
    };
    let mut streamed = String::new();
    let g = generate(&mut pipeline, &tokenizer, &ids, &options, &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(streamed, g.text, "streamed text is the whole text");
    (g.tokens, g.text)
}

#[test]
fn import_is_deterministic_and_runs_like_the_export() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let id_a = import(common::tiny_export(), &a);
    let id_b = import(common::tiny_export(), &b);
    assert_eq!(id_a, id_b, "same export, same package id");
    assert_eq!(package::verify(&a).unwrap(), id_a);
    let (manifest, _) = Manifest::read(&a).unwrap();
    for (name, entry) in &manifest.files {
        assert_eq!(std::fs::read(a.join(name)).unwrap(), std::fs::read(b.join(name)).unwrap(), "{name}");
        assert_eq!(entry.bytes, std::fs::metadata(a.join(name)).unwrap().len());
    }
    // Each unit has its own graph file; the tied embedding is stored once, shared.
    assert_eq!(manifest.units.len(), 6);
    assert!(manifest.files.contains_key("weights/shared-000-005.bin"), "{:?}", manifest.files.keys());
    assert!(manifest.units[2].weights == vec!["weights/002.bin".to_string()]);
    let cost = &manifest.cost;
    assert!(cost.units[1].kv_bytes_per_token == 2 * 2 * 16 * 4);
    // Two FLOPs per weight of every matrix product, not of the norms: in a
    // layer q and o 64×64, k and v 64×32, gate, up and down 64×128; in the
    // epilogue the LM head (the tied embedding, 512 × 64, read through a transpose).
    assert_eq!(cost.units[1].flops_per_token, 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128), "{:?}", cost.units[1]);
    assert_eq!(cost.units[5].flops_per_token, 2 * 512 * 64, "{:?}", cost.units[5]);
    assert_eq!(cost.units[1].out_bytes_per_token, 64 * 4, "the residual stream: hidden 64 f32");
    assert_eq!(cost.skips.len(), 3);
    assert!(cost.shared_weight_bytes == 512 * 64 * 4);

    let export = Model::from_export(common::tiny_export()).unwrap();
    let packaged = Model::open(&a).unwrap();
    let reference = greedy_text(&export, 1, "hello mesh");
    assert_eq!(greedy_text(&packaged, 1, "hello mesh"), reference);
    assert_eq!(greedy_text(&packaged, 4, "hello mesh"), reference);
    assert_eq!(reference.0.len(), 24);
}

#[test]
fn corruption_is_detected_and_failed_imports_leave_nothing() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("pkg");
    import(common::tiny_export(), &out);
    let weights = out.join("weights/003.bin");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let err = package::verify(&out).unwrap_err().to_string();
    assert!(err.contains("003.bin") && err.contains("hash"), "{err}");

    // Importing into an existing package is refused, and leaves no staging directory.
    let again = Model::from_export(common::tiny_export()).unwrap();
    let err = package::write(&again, &out, &Silent).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("pkg")]);
}

#[test]
fn bad_exports_say_what_is_wrong() {
    let root = tempfile::tempdir().unwrap();
    let err = Model::from_export(&root.path().join("nope")).unwrap_err();
    assert!(matches!(err, ImportError::MissingFile { .. }), "{err}");

    let dir = root.path().join("copy");
    std::fs::create_dir(&dir).unwrap();
    let src = common::tiny_export();
    for f in ["model.onnx", "model.onnx_data", "config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let err = Model::from_export(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("model.onnx"), b"not a protobuf at all").unwrap();
    let err = Model::from_export(&dir).unwrap_err().to_string();
    assert!(err.contains("model.onnx"), "{err}");

    // A truncated weights file.
    std::fs::copy(src.join("model.onnx"), dir.join("model.onnx")).unwrap();
    let data = std::fs::read(src.join("model.onnx_data")).unwrap();
    std::fs::write(dir.join("model.onnx_data"), &data[..data.len() / 2]).unwrap();
    assert!(Model::from_export(&dir).is_err());
}

#[test]
fn a_tokenizer_bigger_than_the_model_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let small = SynthConfig { vocab: 300, ..SynthConfig::tiny() };
    let dir = root.path().join("small");
    synth::write_export(&small, &dir, &Silent).unwrap();
    std::fs::copy(common::tiny_export().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let err = TextTokenizer::load(&dir, Some(300)).err().unwrap().to_string();
    assert!(err.contains("512 tokens") && err.contains("300"), "{err}");
}

#[test]
fn the_built_in_model_is_the_same_bytes_every_time() {
    let root = tempfile::tempdir().unwrap();
    let again = root.path().join("again");
    synth::write_export(&SynthConfig::tiny(), &again, &Silent).unwrap();
    for f in ["model.onnx", "model.onnx_data", "tokenizer.json", "config.json"] {
        assert_eq!(std::fs::read(again.join(f)).unwrap(), std::fs::read(common::tiny_export().join(f)).unwrap(), "{f}");
    }
    // Pinned: the package id covers every file's hash and the manifest's costs,
    // so a change here changes every machine's built-in model id (and, if the
    // model's bytes changed, the committed onnxruntime reference).
    let id = package::write(&Model::from_export(&again).unwrap(), &root.path().join("pkg"), &Silent).unwrap();
    assert_eq!(id, "2ee1d6062c087f73afdf3cbba32bf76d0277cd167ca90cb768094db795b7d835");
}
