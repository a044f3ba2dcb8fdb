//! What running the model costs, unit by unit: weights, arithmetic, the
//! tensor each unit hands to the next one, the KV cache it keeps, and the
//! skip tensors that jump over units (an attention mask made once in the
//! prologue and read by every layer).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One unit of the model: the prologue, one decoder layer, or the epilogue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitCost {
    pub name: String,
    /// Bytes of weights the unit keeps in memory.
    pub weight_bytes: u64,
    /// Arithmetic for one decoded token.
    pub flops_per_token: u64,
    /// Bytes of the tensor this unit hands to the next unit for one token (the
    /// residual stream). For the last unit (the epilogue, which also samples)
    /// this is the sampled token that goes back to the prologue's device.
    pub out_bytes_per_token: u64,
}

/// A tensor made by one unit and read by later, not necessarily adjacent,
/// units. It travels from the producer's device straight to each device that
/// runs one of its consumers, once per device, and only when that device is
/// not the producer's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipTensor {
    pub name: String,
    /// Index of the unit that makes the tensor.
    pub producer: usize,
    /// Indices of the units that read it; each comes after the producer.
    pub consumers: Vec<usize>,
    pub bytes_per_token: u64,
}

/// The cost of a whole model, cut into units in execution order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCost {
    pub units: Vec<UnitCost>,
    pub skips: Vec<SkipTensor>,
    /// KV cache bytes each unit keeps per token of context (0 for the
    /// prologue and epilogue).
    pub kv_bytes_per_token: Vec<u64>,
}

/// Why a [`ModelCost`] cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ModelCostError {
    #[error("the model has no units")]
    Empty,
    #[error(
        "the model has {units} units but {kv} KV cache figures; give one per unit (0 for the prologue and epilogue)"
    )]
    KvLength { units: usize, kv: usize },
    #[error("skip tensor '{skip}' is made by unit {producer}, but the model only has units 0..{units}")]
    SkipProducer { skip: String, producer: usize, units: usize },
    #[error(
        "skip tensor '{skip}' is read by unit {consumer}, which is not a unit after its producer (unit {producer}) in a model of {units} units"
    )]
    SkipConsumer { skip: String, producer: usize, consumer: usize, units: usize },
    #[error("skip tensor '{skip}' has no consumers")]
    SkipUnused { skip: String },
}

/// A byte count that prints for people: "3.1 GiB", "512.0 MiB".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const KIB: f64 = 1024.0;
        let b = self.0 as f64;
        if b >= KIB * KIB * KIB {
            write!(f, "{:.1} GiB", b / (KIB * KIB * KIB))
        } else if b >= KIB * KIB {
            write!(f, "{:.1} MiB", b / (KIB * KIB))
        } else if b >= KIB {
            write!(f, "{:.1} KiB", b / KIB)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

/// The shape of a decoder-only transformer, to build its [`ModelCost`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformerShape {
    pub layers: usize,
    pub hidden: u64,
    pub intermediate: u64,
    pub vocab: u64,
    pub heads: u64,
    pub kv_heads: u64,
    /// Bytes per stored weight (2 for fp16, 1 for int8).
    pub weight_bytes: u64,
    /// Bytes per activation on the wire and in the KV cache (4 for fp32).
    pub activation_bytes: u64,
    /// Context length the attention mask row is sized for.
    pub context_tokens: u64,
}

impl TransformerShape {
    /// A Llama-style model of about 1.1 billion parameters (TinyLlama).
    pub fn tiny_llama() -> Self {
        TransformerShape {
            layers: 22,
            hidden: 2048,
            intermediate: 5632,
            vocab: 32_000,
            heads: 32,
            kv_heads: 4,
            weight_bytes: 2,
            activation_bytes: 4,
            context_tokens: 1024,
        }
    }

    /// A Llama-style model of about 3 billion parameters (OpenLLaMA 3B shape).
    pub fn llama_3b() -> Self {
        TransformerShape {
            layers: 26,
            hidden: 3200,
            intermediate: 8640,
            vocab: 32_000,
            heads: 32,
            kv_heads: 32,
            weight_bytes: 2,
            activation_bytes: 4,
            context_tokens: 1024,
        }
    }
}

impl ModelCost {
    /// The costs of a decoder-only transformer: a prologue (embedding, mask,
    /// rotary tables), one unit per layer and an epilogue (final norm, LM
    /// head and sampling). The prologue's mask and rotary rows are skip
    /// tensors read by every layer. Attention's arithmetic over the context is
    /// left out; it is small beside the matrix products at phone context
    /// lengths.
    pub fn transformer(shape: &TransformerShape) -> ModelCost {
        let s = shape;
        let head_dim = s.hidden / s.heads.max(1);
        let kv_dim = head_dim * s.kv_heads;
        let residual = s.hidden * s.activation_bytes;
        let layer_params = 2 * s.hidden * s.hidden + 2 * s.hidden * kv_dim + 3 * s.hidden * s.intermediate;
        let mut units = Vec::with_capacity(s.layers + 2);
        units.push(UnitCost {
            name: "prologue".into(),
            weight_bytes: s.vocab * s.hidden * s.weight_bytes,
            flops_per_token: s.hidden,
            out_bytes_per_token: residual,
        });
        for layer in 0..s.layers {
            units.push(UnitCost {
                name: format!("layer {layer}"),
                weight_bytes: layer_params * s.weight_bytes,
                flops_per_token: 2 * layer_params,
                out_bytes_per_token: residual,
            });
        }
        units.push(UnitCost {
            name: "epilogue".into(),
            weight_bytes: s.vocab * s.hidden * s.weight_bytes,
            flops_per_token: 2 * s.vocab * s.hidden,
            out_bytes_per_token: 4,
        });
        let layers: Vec<usize> = (1..=s.layers).collect();
        let mut kv_bytes_per_token = vec![2 * kv_dim * s.activation_bytes; s.layers + 2];
        kv_bytes_per_token[0] = 0;
        kv_bytes_per_token[s.layers + 1] = 0;
        ModelCost {
            units,
            skips: vec![
                SkipTensor {
                    name: "attention mask".into(),
                    producer: 0,
                    consumers: layers.clone(),
                    bytes_per_token: s.context_tokens * s.activation_bytes,
                },
                SkipTensor {
                    name: "rotary tables".into(),
                    producer: 0,
                    consumers: layers,
                    bytes_per_token: 2 * head_dim * s.activation_bytes,
                },
            ],
            kv_bytes_per_token,
        }
    }

    /// Checks that the figures describe a model that can be planned.
    pub fn validate(&self) -> Result<(), ModelCostError> {
        let units = self.units.len();
        if units == 0 {
            return Err(ModelCostError::Empty);
        }
        if self.kv_bytes_per_token.len() != units {
            return Err(ModelCostError::KvLength { units, kv: self.kv_bytes_per_token.len() });
        }
        for skip in &self.skips {
            if skip.producer >= units {
                return Err(ModelCostError::SkipProducer { skip: skip.name.clone(), producer: skip.producer, units });
            }
            if skip.consumers.is_empty() {
                return Err(ModelCostError::SkipUnused { skip: skip.name.clone() });
            }
            if let Some(&consumer) = skip.consumers.iter().find(|&&c| c <= skip.producer || c >= units) {
                return Err(ModelCostError::SkipConsumer {
                    skip: skip.name.clone(),
                    producer: skip.producer,
                    consumer,
                    units,
                });
            }
        }
        Ok(())
    }

    /// Memory unit `unit` needs: its weights plus its KV cache for
    /// `context_tokens` tokens.
    pub fn unit_memory(&self, unit: usize, context_tokens: u64) -> u64 {
        let kv = self.kv_bytes_per_token.get(unit).copied().unwrap_or(0);
        self.units[unit].weight_bytes.saturating_add(kv.saturating_mul(context_tokens))
    }

    /// Memory the whole model needs with a KV cache of `context_tokens`.
    pub fn total_memory(&self, context_tokens: u64) -> u64 {
        (0..self.units.len()).fold(0u64, |sum, unit| sum.saturating_add(self.unit_memory(unit, context_tokens)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_llama_has_about_a_billion_parameters() {
        let model = ModelCost::transformer(&TransformerShape::tiny_llama());
        assert_eq!(model.units.len(), 24);
        model.validate().unwrap();
        let bytes: u64 = model.units.iter().map(|u| u.weight_bytes).sum();
        let params = bytes / 2;
        assert!((1_000_000_000..1_200_000_000).contains(&params), "{params}");
        assert_eq!(model.kv_bytes_per_token[0], 0);
        assert_eq!(model.kv_bytes_per_token[23], 0);
        assert!(model.kv_bytes_per_token[5] > 0);
    }

    #[test]
    fn validate_names_the_problem() {
        let mut model = ModelCost::transformer(&TransformerShape::tiny_llama());
        model.skips[0].consumers.push(0);
        let message = model.validate().unwrap_err().to_string();
        assert!(message.contains("attention mask"), "{message}");
        model.skips.clear();
        model.kv_bytes_per_token.pop();
        assert_eq!(model.validate(), Err(ModelCostError::KvLength { units: 24, kv: 23 }));
        assert_eq!(
            ModelCost { units: vec![], skips: vec![], kv_bytes_per_token: vec![] }.validate(),
            Err(ModelCostError::Empty)
        );
    }

    #[test]
    fn bytes_print_for_people() {
        assert_eq!(Bytes(3_328_599_654).to_string(), "3.1 GiB");
        assert_eq!(Bytes(512 << 20).to_string(), "512.0 MiB");
        assert_eq!(Bytes(2048).to_string(), "2.0 KiB");
        assert_eq!(Bytes(12).to_string(), "12 B");
    }

    #[test]
    fn memory_counts_weights_and_kv_cache() {
        let model = ModelCost::transformer(&TransformerShape::tiny_llama());
        let layer = model.unit_memory(1, 1000);
        assert_eq!(layer, model.units[1].weight_bytes + 1000 * model.kv_bytes_per_token[1]);
        assert!(model.total_memory(1000) > model.total_memory(0));
    }
}
