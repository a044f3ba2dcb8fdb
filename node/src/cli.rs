//! Command-line interface. Every option has an `LLNODE_*` environment override.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use llnode_models::sampling::SamplingConfig;

#[derive(Parser)]
#[command(name = "llnode", version, about = "Distributed LLM inference across a mesh of phones and small devices")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate text on this device from an export or a package.
    Run(RunArgs),
    /// Cut an Optimum export into units and write an llnode package.
    Import {
        /// The export directory (model.onnx, tokenizer.json, config.json…).
        export: PathBuf,
        /// Where to write the package; must not exist yet.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Built-in models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Make the built-in model, import it, and answer a prompt through several segments.
    Demo {
        /// Where the demo keeps its model.
        #[arg(long, env = "LLNODE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        segments: usize,
        #[arg(long, default_value_t = 24)]
        max_tokens: usize,
        #[arg(default_value = "The mesh of phones")]
        prompt: String,
    },
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write the deterministic built-in model (a Llama-style Optimum export).
    Synth {
        /// `tiny` for tests, `bench` (~100M parameters) for benchmarks.
        #[arg(long, default_value = "tiny")]
        size: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Check a package's files against its manifest and print its id.
    Verify { package: PathBuf },
    /// Show how a model is cut: each unit's inputs, outputs, weights and FLOPs.
    Inspect {
        /// An Optimum export directory or an llnode package.
        model: PathBuf,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// An Optimum export directory or an llnode package.
    #[arg(short, long, env = "LLNODE_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Run the model as K segments chained in one process (the mesh's code path).
    #[arg(long, default_value_t = 1)]
    pub segments: usize,
    /// Print timings to stderr when done.
    #[arg(long)]
    pub stats: bool,
    /// The text to continue.
    pub prompt: String,
}

#[derive(Args, Clone)]
pub struct GenerationArgs {
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl GenerationArgs {
    pub fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

impl Command {
    pub fn execute(self) -> anyhow::Result<()> {
        match self {
            Command::Run(args) => crate::run::run(&args),
            Command::Import { export, out } => crate::run::import(&export, &out),
            Command::Model(ModelCommand::Synth { size, seed, out }) => crate::run::synth(&size, seed, &out),
            Command::Model(ModelCommand::Verify { package }) => {
                let id = llnode_models::package::verify(&package)?;
                crate::outln!("{id}");
                Ok(())
            }
            Command::Model(ModelCommand::Inspect { model }) => crate::run::inspect(&model),
            Command::Demo { data_dir, segments, max_tokens, prompt } => {
                crate::demo::demo(data_dir, segments, max_tokens, &prompt)
            }
        }
    }
}
