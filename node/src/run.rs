//! Running models on this device: `llnode run`, `llnode import`, `llnode model synth`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use llnode_models::generate::{GenerateOptions, Generation, generate};
use llnode_models::model::Model;
use llnode_models::package;
use llnode_models::pipeline::LocalPipeline;
use llnode_models::synth::{self, SynthConfig};
use llnode_models::tokenizer::TextTokenizer;
use llnode_models::transmission::even_split;

use crate::bar::Bar;
use crate::cli::{GenerationArgs, RunArgs};

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    args.generation.sampling().validate().map_err(anyhow::Error::msg)?;
    if args.segments == 0 {
        bail!("--segments must be at least 1");
    }
    let model = Model::open(&args.model).with_context(|| format!("cannot use model {}", args.model.display()))?;
    let segments = even_split(model.units.len(), args.segments);
    let load = Instant::now();
    let mut pipeline = crate::alloc::loading(|| LocalPipeline::load_with(&model, &segments, &Bar::new()))?;
    let load = load.elapsed();
    let mut out = std::io::stdout().lock();
    let generation = generate_text(&model, &mut pipeline, &args.generation, &args.prompt, &mut |text| {
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    if args.stats {
        eprintln!(
            "stats: segments={} load_s={:.2} prompt_tokens={} prefill_ms={:.1} prefill_tok_s={:.1} tokens={} decode_tok_s={:.2} peak_rss_mib={} finish={:?}",
            segments.len(),
            load.as_secs_f64(),
            generation.prompt_tokens,
            generation.prefill.as_secs_f64() * 1e3,
            generation.prompt_tokens as f64 / generation.prefill.as_secs_f64(),
            generation.tokens.len(),
            generation.decode_tokens_per_s(),
            peak_rss_mib().map_or("unknown".into(), |m| m.to_string()),
            generation.finish,
        );
    }
    Ok(())
}

/// Tokenises the prompt and generates through `forward`, streaming to `on_text`.
pub fn generate_text(
    model: &Model,
    forward: &mut LocalPipeline,
    args: &GenerationArgs,
    prompt: &str,
    on_text: &mut dyn FnMut(&str),
) -> anyhow::Result<Generation> {
    let tokenizer = TextTokenizer::load(&model.dir, model.info.vocab_size)?;
    let ids = if args.chat { tokenizer.encode_chat(prompt)? } else { tokenizer.encode(prompt)? };
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling(),
        stop: args.stop.clone(),
        eos: if args.ignore_eos { vec![] } else { model.info.eos_token_ids.clone() },
        context: model.info.max_positions,
    };
    Ok(generate(forward, &tokenizer, &ids, &options, on_text)?)
}

pub fn import(export: &Path, out: &Path) -> anyhow::Result<()> {
    let model = Model::from_export(export).with_context(|| format!("cannot import {}", export.display()))?;
    let id = package::write(&model, out, &Bar::new()).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("imported {} units ({} layers) into {}", model.units.len(), model.layers, out.display());
    crate::outln!("{id}");
    Ok(())
}

pub fn synth(size: &str, seed: u64, out: &Path) -> anyhow::Result<()> {
    let Some(mut config) = SynthConfig::named(size) else {
        bail!("unknown size {size:?}; use `tiny` or `bench`");
    };
    config.seed = seed;
    synth::write_export(&config, out, &Bar::new())?;
    eprintln!("wrote the built-in {size} model (seed {seed}) to {}", out.display());
    Ok(())
}

pub fn inspect(dir: &Path) -> anyhow::Result<()> {
    let model = Model::open(dir).with_context(|| format!("cannot use model {}", dir.display()))?;
    let cost = llnode_models::cost::CostProfile::of(&model);
    crate::outln!(
        "{} ({} layers, {} units, {} weight bytes of which {} shared)",
        model.info.model_type,
        model.layers,
        model.units.len(),
        cost.total_weight_bytes(),
        cost.shared_weight_bytes
    );
    for (unit, c) in model.units.iter().zip(&cost.units) {
        let s = &unit.spec;
        crate::outln!(
            "{:>10}: {:>5} nodes, {:>10} weight bytes, {:>12} FLOPs/token, {} B/token out, {} KV B/token",
            s.name,
            unit.graph.node.len(),
            c.weight_bytes,
            c.flops_per_token,
            c.out_bytes_per_token,
            c.kv_bytes_per_token
        );
        crate::outln!("            in: {}", s.inputs.join(", "));
        if !s.shape_inputs.is_empty() {
            crate::outln!("            shape of: {}", s.shape_inputs.join(", "));
        }
        let outs: Vec<String> = s.outputs.iter().map(|o| format!("{} -> {:?}", o.name, o.consumers)).collect();
        crate::outln!("            out: {}", outs.join(", "));
    }
    Ok(())
}

/// This process's peak resident memory, from /proc (Linux and Android).
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
