//! `llnode demo`: the built-in model, made and imported on first use, answers
//! a prompt through several segments chained on this device.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use llnode_models::model::Model;
use llnode_models::package;
use llnode_models::pipeline::LocalPipeline;
use llnode_models::synth::{self, SynthConfig};
use llnode_models::transmission::even_split;

use crate::bar::Bar;
use crate::cli::GenerationArgs;

pub fn demo(data_dir: Option<PathBuf>, segments: usize, max_tokens: usize, prompt: &str) -> anyhow::Result<()> {
    let data_dir = match data_dir {
        Some(d) => d,
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".llnode")).context("set --data-dir or HOME")?,
    };
    let export = data_dir.join("builtin-tiny-export");
    let package_dir = data_dir.join("builtin-tiny");
    if !package_dir.join(package::MANIFEST).is_file() {
        if !export.join("model.onnx").is_file() {
            synth::write_export(&SynthConfig::tiny(), &export, &Bar::new())?;
        }
        package::write(&Model::from_export(&export)?, &package_dir, &Bar::new())?;
    }
    let id = package::verify(&package_dir)?;
    let model = Model::open(&package_dir)?;
    let plan = even_split(model.units.len(), segments);
    crate::outln!("model: built-in tiny (package {}), {} units", &id[..16], model.units.len());
    for (i, range) in plan.iter().enumerate() {
        let names: Vec<&str> = model.units[range.clone()].iter().map(|u| u.spec.name.as_str()).collect();
        crate::outln!("segment {i}: {}", names.join(", "));
    }
    let mut pipeline = LocalPipeline::load(&model, &plan)?;
    let args = GenerationArgs {
        max_tokens,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 0,
        stop: vec![],
        chat: false,
        ignore_eos: false,
    };
    crate::out(&format!("prompt: {prompt}\nanswer: "));
    let mut out = std::io::stdout().lock();
    let generation = crate::run::generate_text(&model, &mut pipeline, &args, prompt, &mut |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
    })?;
    crate::outln!();
    crate::outln!("({} tokens, {:.1} tokens/s; the built-in model has random weights, so the text is gibberish)", generation.tokens.len(), generation.decode_tokens_per_s());
    Ok(())
}
