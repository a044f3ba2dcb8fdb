//! Command-line interface. Every option has an `LLNODE_*` environment override.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use llnode_mesh::Multiaddr;
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
    /// Run this device's node until Ctrl-C or SIGTERM; prints `ready <peer-id> <addr>...`.
    Start(StartArgs),
    /// Print this device's peer id (its key is made on first use).
    Id {
        #[command(flatten)]
        dir: DataDir,
    },
    /// The devices this node knows: name, peer id, trust, addresses, last seen, round trip.
    Peers {
        #[command(flatten)]
        dir: DataDir,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Generate text with the model spread across the mesh, from this member (same options as `run`).
    Prompt {
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        generation: GenerationArgs,
        /// Print the plan epoch and speed to stderr when done.
        #[arg(long)]
        stats: bool,
        /// Print when each token came (ms from the prompt's start) to stderr when done.
        #[arg(long)]
        timings: bool,
        /// The package id (or its first characters) to run, when the mesh knows several.
        #[arg(long, value_name = "ID")]
        model: Option<String>,
        /// Privacy mode: this device runs the first and last units itself, so
        /// the token ids and logits never leave it (the leader re-plans for it).
        #[arg(long)]
        private: bool,
        /// The text to continue.
        prompt: String,
    },
    /// The mesh's current plan: who leads, which device runs which units, expected times and memory.
    Plan {
        #[command(flatten)]
        dir: DataDir,
        /// Ask the leader to plan for this objective first, and wait for that plan.
        #[arg(long, value_enum)]
        objective: Option<ObjectiveArg>,
        /// Say why: each stage's share and what limits the plan.
        #[arg(long)]
        explain: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Test aid: make the running node behave like a slower device (its segment steps take FACTOR times as long; 1 = full speed).
    Throttle {
        #[command(flatten)]
        dir: DataDir,
        #[arg(value_parser = crate::pace::parse_factor, allow_negative_numbers = true)]
        factor: f64,
    },
    /// Create a mesh, invite and admit devices, revoke them.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// A mesh of nodes on this machine with the built-in model: plans, answers a prompt, stops.
    Demo {
        #[command(flatten)]
        dir: DataDir,
        /// How many `llnode start` processes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 24)]
        max_tokens: usize,
        #[arg(default_value = "The mesh of phones")]
        prompt: String,
    },
}

#[derive(Args, Clone)]
pub struct DataDir {
    /// Where this device keeps its key, certificates and models (default ~/.llnode).
    #[arg(long, env = "LLNODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataDir {
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.data_dir {
            Some(d) => Ok(d.clone()),
            None => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".llnode"))
                .ok_or_else(|| anyhow::anyhow!("set --data-dir (or LLNODE_DATA_DIR, or HOME)")),
        }
    }
}

#[derive(Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub dir: DataDir,
    /// Listen on this multiaddr (repeatable; default: every interface, a random TCP port, and a QUIC one in a build with `--features quic`).
    #[arg(long, env = "LLNODE_LISTEN", value_delimiter = ',')]
    pub listen: Vec<Multiaddr>,
    /// Dial this peer multiaddr at start and whenever it drops (repeatable).
    #[arg(long, env = "LLNODE_PEER", value_delimiter = ',')]
    pub peer: Vec<Multiaddr>,
    /// A model package (made by `llnode import`) this node serves to the mesh and plans for.
    /// Without it the node fetches the units the plan gives it from members that have them.
    #[arg(long, env = "LLNODE_MODEL")]
    pub model: Option<PathBuf>,
    /// Memory this device offers the mesh, in bytes or with a unit (`1.5GiB`, `800MB`); default: what is available minus 512 MiB.
    #[arg(long, env = "LLNODE_MEMORY", value_parser = parse_bytes)]
    pub memory: Option<u64>,
    /// What plans minimise.
    #[arg(long, value_enum, default_value = "latency")]
    pub objective: ObjectiveArg,
    /// The name this device asks for when it joins a mesh.
    #[arg(long, env = "LLNODE_NAME")]
    pub name: Option<String>,
    /// Do not look for peers with mDNS on the local network.
    #[arg(long, env = "LLNODE_NO_MDNS")]
    pub no_mdns: bool,
    /// How long certificates this node issues to joining devices last (owner only).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub certificate_validity: Duration,
    /// Test aid: behave like a device FACTOR times slower (every segment step is stretched); change it later with `llnode throttle`.
    #[arg(long, env = "LLNODE_THROTTLE", default_value = "1", value_parser = crate::pace::parse_factor, allow_negative_numbers = true)]
    pub throttle: f64,
    /// Ask for a new plan when this device's measured time per token drifts from its profile by more than this ratio.
    #[arg(long, env = "LLNODE_REBALANCE_THRESHOLD", default_value = "1.5", value_parser = parse_threshold, allow_negative_numbers = true)]
    pub rebalance_threshold: f64,
    /// Never ask for a new plan because of measured speed (departures still re-plan).
    #[arg(long, env = "LLNODE_NO_REBALANCE")]
    pub no_rebalance: bool,
    /// Sessions (generations) this device keeps KV caches for at once; a
    /// member's next one is answered "busy, retry".
    #[arg(long, env = "LLNODE_MAX_SESSIONS", default_value = "64", value_parser = clap::value_parser!(u16).range(1..))]
    pub max_sessions: u16,
    /// Prompts this node runs at once as their initiator (`llnode prompt`
    /// asked here); the next one is answered "busy, retry".
    #[arg(long, env = "LLNODE_MAX_PROMPTS", default_value = "4", value_parser = clap::value_parser!(u16).range(1..))]
    pub max_prompts: u16,
    /// Run on these cores only, as `0,2-3` (Linux and Android): a phone's
    /// big cores, say, or a core of its own for each node a machine hosts.
    #[arg(long, env = "LLNODE_CPUS")]
    pub cpus: Option<crate::cpus::CpuList>,
}

fn parse_threshold(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if t > 1.0 && t.is_finite() => Ok(t),
        _ => Err(format!("`{text}` is not a ratio above 1 (such as 1.5: half again as slow)")),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ObjectiveArg {
    /// Seconds per token for one sequence.
    Latency,
    /// The slowest pipeline stage (many sequences in flight).
    Throughput,
}

impl From<ObjectiveArg> for llnode_planner::config::Objective {
    fn from(o: ObjectiveArg) -> Self {
        match o {
            ObjectiveArg::Latency => llnode_planner::config::Objective::Latency,
            ObjectiveArg::Throughput => llnode_planner::config::Objective::Throughput,
        }
    }
}

/// `1234`, `800MB`, `1.5GiB`…
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?} is not a size like 1.5GiB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => (1u64 << 20) as f64,
        "gib" => (1u64 << 30) as f64,
        other => {
            return Err(format!("unknown size unit {other:?}; use B, KB, MB, GB, KiB, MiB or GiB"));
        }
    };
    Ok((number * scale) as u64)
}

#[derive(Subcommand)]
pub enum MeshCommand {
    /// Create a new mesh owned by this device (which becomes its first member).
    Init {
        #[command(flatten)]
        dir: DataDir,
        /// This device's name in the mesh (default: the host name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
    /// Print a one-time join token (the owner's node must be running).
    Invite {
        #[command(flatten)]
        dir: DataDir,
        /// How long the token stays usable.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Join the mesh a token names: prove this device's key, receive its certificate.
    Join {
        #[command(flatten)]
        dir: DataDir,
        /// The device name to ask for (default: the host name).
        #[arg(long)]
        name: Option<String>,
        token: String,
    },
    /// Revoke a device by name or peer id, at once and everywhere (the owner's node must be running).
    Revoke {
        #[command(flatten)]
        dir: DataDir,
        device: String,
    },
    /// Offline admission, step 1 (owner device): write a certificate file for a peer id.
    Certify {
        #[command(flatten)]
        dir: DataDir,
        /// The device's peer id (`llnode id` on that device prints it).
        peer_id: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Offline admission, step 2 (the device): install the certificate file.
    Install {
        #[command(flatten)]
        dir: DataDir,
        file: PathBuf,
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
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
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
            Command::Start(args) => {
                let options = crate::start::StartOptions {
                    model: args.model,
                    memory: args.memory,
                    objective: args.objective.into(),
                    listen: args.listen,
                    peers: args.peer,
                    mdns: !args.no_mdns,
                    name: args.name.unwrap_or_else(host_name),
                    certificate_validity: args.certificate_validity,
                    throttle: args.throttle,
                    rebalance: (!args.no_rebalance).then_some(args.rebalance_threshold),
                    max_sessions: args.max_sessions.into(),
                    max_prompts: args.max_prompts.into(),
                    cpus: args.cpus,
                };
                crate::start::start(&args.dir.path()?, options)
            }
            Command::Id { dir } => crate::mesh_cmd::id(&dir.path()?),
            Command::Peers { dir, json } => crate::mesh_cmd::peers(&dir.path()?, json),
            Command::Prompt { dir, generation, stats, timings, model, private, prompt } => crate::prompt::cli(
                &dir.path()?,
                &generation,
                model,
                private,
                crate::prompt::Report { stats, timings },
                prompt,
            ),
            Command::Plan { dir, objective, explain, json } => {
                crate::plan_cmd::plan(&dir.path()?, objective.map(Into::into), explain, json)
            }
            Command::Throttle { dir, factor } => crate::pace::cli(&dir.path()?, factor),
            Command::Mesh(command) => command.execute(),
            Command::Demo { dir, nodes, max_tokens, prompt } => {
                crate::demo::demo(dir.path()?, nodes, max_tokens, &prompt)
            }
        }
    }
}

impl MeshCommand {
    fn execute(self) -> anyhow::Result<()> {
        use crate::mesh_cmd;
        match self {
            MeshCommand::Init { dir, name, valid_for } => {
                mesh_cmd::init(&dir.path()?, &name.unwrap_or_else(host_name), valid_for)
            }
            MeshCommand::Invite { dir, ttl } => mesh_cmd::invite(&dir.path()?, ttl),
            MeshCommand::Join { dir, name, token } => mesh_cmd::join(&dir.path()?, &token, name.as_deref()),
            MeshCommand::Revoke { dir, device } => mesh_cmd::revoke(&dir.path()?, &device),
            MeshCommand::Certify { dir, peer_id, name, valid_for, out } => {
                mesh_cmd::certify(&dir.path()?, &peer_id, &name, valid_for, &out)
            }
            MeshCommand::Install { dir, file } => mesh_cmd::install(&dir.path()?, &file),
        }
    }
}

/// A default device name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "device".into())
}
