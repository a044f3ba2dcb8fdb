//! The built-in model: a deterministic generator of Llama-style exports in
//! Hugging Face Optimum's "decoder with past" form (`model.onnx` with its
//! weights in `model.onnx_data`, `tokenizer.json`, `config.json`…). Same
//! size and seed, same bytes on every machine: weights come from ChaCha8
//! streams keyed by the tensor name, so tests and benchmarks need no Python
//! and no download. The weights are random: the text it writes is gibberish,
//! but it is the same gibberish everywhere, which is what tests compare.

mod graph;
pub mod vocab;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::RngCore;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::atomic::AtomicDir;
use crate::onnx::{self, pb};
use crate::progress::Progress;
use graph::{Init, WeightSpec};

/// Shape of a built-in model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub seed: u64,
}

impl SynthConfig {
    /// A few hundred thousand parameters: fast enough for every test.
    pub fn tiny() -> SynthConfig {
        SynthConfig {
            vocab: 512,
            hidden: 64,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            max_positions: 512,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            seed: 0,
        }
    }

    /// About 100M parameters, for benchmarks.
    pub fn bench() -> SynthConfig {
        SynthConfig {
            vocab: 32_000,
            hidden: 768,
            layers: 12,
            heads: 12,
            kv_heads: 4,
            intermediate: 2048,
            max_positions: 2048,
            ..SynthConfig::tiny()
        }
    }

    /// A named size: `tiny` or `bench`.
    pub fn named(size: &str) -> Option<SynthConfig> {
        match size {
            "tiny" => Some(SynthConfig::tiny()),
            "bench" => Some(SynthConfig::bench()),
            _ => None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": true,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": "float32",
            "llnode_synth_seed": self.seed,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("the built-in model {what}: heads must divide hidden and kv heads must divide heads, head size even")]
    BadShape { what: String },
    #[error("could not write the built-in model to {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Writes the export described by `config` into `dir`, all or nothing.
pub fn write_export(config: &SynthConfig, dir: &Path, progress: &dyn Progress) -> Result<PathBuf, SynthError> {
    let c = config;
    if !c.hidden.is_multiple_of(c.heads)
        || !c.heads.is_multiple_of(c.kv_heads)
        || !c.head_dim().is_multiple_of(2)
        || c.vocab <= 257
    {
        return Err(SynthError::BadShape { what: format!("{c:?}") });
    }
    let io = |source| SynthError::Io { path: dir.to_path_buf(), source };
    let out = AtomicDir::create(dir).map_err(io)?;
    let (mut graph, weights) = graph::build(c);

    let total: u64 = weights.iter().map(|w| w.dims.iter().product::<i64>() as u64 * 4).sum();
    progress.phase("generating weights", total);
    let data_name = "model.onnx_data";
    let mut data = BufWriter::new(std::fs::File::create(out.path().join(data_name)).map_err(io)?);
    let mut offset = 0u64;
    for spec in &weights {
        let bytes = weight_bytes(spec, c.seed);
        let mut tensor = pb::TensorProto {
            name: spec.name.clone(),
            dims: spec.dims.clone(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            ..Default::default()
        };
        onnx::set_external(&mut tensor, data_name, offset, bytes.len() as u64);
        data.write_all(&bytes).map_err(io)?;
        offset += bytes.len() as u64;
        graph.initializer.push(tensor);
        progress.advance(bytes.len() as u64);
    }
    data.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;

    let model = onnx::model(graph, onnx::default_opsets());
    std::fs::write(out.path().join("model.onnx"), onnx::encode(&model)).map_err(io)?;
    let files = [
        ("config.json", c.config_json()),
        ("generation_config.json", json!({"bos_token_id": 0, "eos_token_id": 0, "max_length": c.max_positions})),
        ("tokenizer.json", vocab::tokenizer_json(c.vocab)),
        ("tokenizer_config.json", vocab::tokenizer_config_json(c.max_positions)),
    ];
    for (name, value) in files {
        let text = serde_json::to_string_pretty(&value).expect("json values serialise");
        std::fs::write(out.path().join(name), text).map_err(io)?;
    }
    out.commit().map_err(io)
}

/// Little-endian f32 bytes of one weight, from its own ChaCha8 stream.
fn weight_bytes(spec: &WeightSpec, seed: u64) -> Vec<u8> {
    let count = spec.dims.iter().product::<i64>() as usize;
    let values: Vec<f32> = match spec.init {
        Init::InvFreq { theta, head_dim } => {
            (0..count).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect()
        }
        Init::Uniform { mean, std } => {
            let mut key = blake3::Hasher::new();
            key.update(&seed.to_le_bytes());
            key.update(spec.name.as_bytes());
            let mut rng = ChaCha8Rng::from_seed(*key.finalize().as_bytes());
            let half_width = std * 3f32.sqrt();
            (0..count)
                .map(|_| {
                    let unit = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32; // [0, 1)
                    mean + half_width * (2.0 * unit - 1.0)
                })
                .collect()
        }
    };
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
