//! The built-in model's graph: a Llama-style decoder (RMSNorm, rotary
//! position embeddings, grouped-query attention with a KV cache, SwiGLU MLP,
//! tied embeddings) in the Optimum "decoder with past" interface.

use tract_onnx::pb::GraphProto;
use tract_onnx::pb::tensor_proto::DataType;

use super::SynthConfig;
use crate::onnx::{Dim, GraphBuilder, attr_int, attr_ints, value_info};

/// A weight the graph needs; the generator fills it in.
pub struct WeightSpec {
    pub name: String,
    pub dims: Vec<i64>,
    pub init: Init,
}

/// How a weight is initialised.
#[derive(Clone, Copy)]
pub enum Init {
    /// Uniform with the given standard deviation, centred on `mean`.
    Uniform { mean: f32, std: f32 },
    /// Rotary inverse frequencies.
    InvFreq { theta: f32, head_dim: usize },
}

/// Builds the graph; initializers are left to the caller (see [`WeightSpec`]).
pub fn build(c: &SynthConfig) -> (GraphProto, Vec<WeightSpec>) {
    let mut g = GraphBuilder::default();
    let mut weights = Vec::new();
    let mut weight = |name: String, dims: Vec<i64>, init: Init| {
        weights.push(WeightSpec { name: name.clone(), dims, init });
        name
    };
    let (h, hd, nh, nkv) = (c.hidden as i64, c.head_dim() as i64, c.heads as i64, c.kv_heads as i64);
    let group = nh / nkv;
    let batch = Dim::param("batch_size");
    let seq = Dim::param("sequence_length");
    let past = Dim::param("past_sequence_length");
    let total = Dim::param("past_sequence_length + sequence_length");

    let inputs = &mut g.graph.input;
    inputs.push(value_info("input_ids", DataType::Int64, &[batch.clone(), seq.clone()]));
    inputs.push(value_info("attention_mask", DataType::Int64, &[batch.clone(), total.clone()]));
    inputs.push(value_info("position_ids", DataType::Int64, &[batch.clone(), seq.clone()]));
    for i in 0..c.layers {
        for kind in ["key", "value"] {
            let dims = [batch.clone(), Dim::Fixed(nkv), past.clone(), Dim::Fixed(hd)];
            inputs.push(value_info(&format!("past_key_values.{i}.{kind}"), DataType::Float, &dims));
        }
    }
    let outputs = &mut g.graph.output;
    let vocab = c.vocab as i64;
    outputs.push(value_info("logits", DataType::Float, &[batch.clone(), seq.clone(), Dim::Fixed(vocab)]));
    for i in 0..c.layers {
        for kind in ["key", "value"] {
            let dims = [batch.clone(), Dim::Fixed(nkv), total.clone(), Dim::Fixed(hd)];
            outputs.push(value_info(&format!("present.{i}.{kind}"), DataType::Float, &dims));
        }
    }

    // Prologue: embeddings, the additive causal/padding mask, rotary tables.
    g.scope("/model");
    // Small embeddings and strong layer outputs: with tied embeddings, a large
    // embedding makes the model predict its input token forever.
    let embed = weight("model.embed_tokens.weight".into(), vec![vocab, h], Init::Uniform { mean: 0.0, std: 0.1 });
    let zero = g.scalar_i64(0);
    let one = g.scalar_i64(1);
    let mut hidden = g.op("Gather", &["model.embed_tokens.weight", "input_ids"], vec![attr_int("axis", 0)]);
    let ids_shape = g.op("Shape", &["input_ids"], vec![]);
    let mask_shape = g.op("Shape", &["attention_mask"], vec![]);
    let seq_len = g.op("Gather", &[&ids_shape, &one], vec![attr_int("axis", 0)]);
    let total_len = g.op("Gather", &[&mask_shape, &one], vec![attr_int("axis", 0)]);
    let past_len = g.op("Sub", &[&total_len, &seq_len], vec![]);
    let q_index = g.op("Range", &[&past_len, &total_len, &one], vec![]);
    let k_index = g.op("Range", &[&zero, &total_len, &one], vec![]);
    let axes1 = g.ints(&[1]);
    let axes0 = g.ints(&[0]);
    let q_index = g.op("Unsqueeze", &[&q_index, &axes1], vec![]);
    let k_index = g.op("Unsqueeze", &[&k_index, &axes0], vec![]);
    let causal = g.op("LessOrEqual", &[&k_index, &q_index], vec![]);
    let padding = g.op("Cast", &["attention_mask"], vec![attr_int("to", DataType::Bool as i64)]);
    let axes12 = g.ints(&[1, 2]);
    let padding = g.op("Unsqueeze", &[&padding, &axes12], vec![]);
    let allowed = g.op("And", &[&causal, &padding], vec![]);
    let (open, closed) = (g.scalar(0.0), g.scalar(-1e9));
    let mask = g.op("Where", &[&allowed, &open, &closed], vec![]);
    let mask = g.op("Unsqueeze", &[&mask, &axes1], vec![]);

    let inv_freq = weight(
        "model.rotary_emb.inv_freq".into(),
        vec![hd / 2],
        Init::InvFreq { theta: c.rope_theta, head_dim: c.head_dim() },
    );
    let positions = g.op("Cast", &["position_ids"], vec![attr_int("to", DataType::Float as i64)]);
    let axes2 = g.ints(&[2]);
    let positions = g.op("Unsqueeze", &[&positions, &axes2], vec![]);
    let freqs = g.op("Mul", &[&positions, &inv_freq], vec![]);
    let angles = g.op("Concat", &[&freqs, &freqs], vec![attr_int("axis", -1)]);
    let cos = g.op("Cos", &[&angles], vec![]);
    let sin = g.op("Sin", &[&angles], vec![]);
    let cos = g.op("Unsqueeze", &[&cos, &axes1], vec![]);
    let sin = g.op("Unsqueeze", &[&sin, &axes1], vec![]);

    let linear_std = |fan_in: i64| 1.0 / (fan_in as f32).sqrt();
    let norm_init = Init::Uniform { mean: 1.0, std: 0.1 };
    for i in 0..c.layers {
        g.scope(&format!("/model/layers.{i}"));
        let p = format!("model.layers.{i}");
        let mut w = |suffix: &str, dims: Vec<i64>, init: Init| weight(format!("{p}.{suffix}"), dims, init);
        let ln1 = w("input_layernorm.weight", vec![h], norm_init);
        let wq = w("self_attn.q_proj.weight", vec![h, nh * hd], Init::Uniform { mean: 0.0, std: linear_std(h) });
        let wk = w("self_attn.k_proj.weight", vec![h, nkv * hd], Init::Uniform { mean: 0.0, std: linear_std(h) });
        let wv = w("self_attn.v_proj.weight", vec![h, nkv * hd], Init::Uniform { mean: 0.0, std: linear_std(h) });
        let wo =
            w("self_attn.o_proj.weight", vec![nh * hd, h], Init::Uniform { mean: 0.0, std: 2.0 * linear_std(nh * hd) });
        let ln2 = w("post_attention_layernorm.weight", vec![h], norm_init);
        let inter = c.intermediate as i64;
        let wg = w("mlp.gate_proj.weight", vec![h, inter], Init::Uniform { mean: 0.0, std: linear_std(h) });
        let wu = w("mlp.up_proj.weight", vec![h, inter], Init::Uniform { mean: 0.0, std: linear_std(h) });
        let wd = w("mlp.down_proj.weight", vec![inter, h], Init::Uniform { mean: 0.0, std: 2.0 * linear_std(inter) });

        let x = hidden.clone();
        let normed = rms_norm(&mut g, &x, &ln1, c.rms_eps);
        let heads = |g: &mut GraphBuilder, weight: &str, n: i64| {
            let shape = g.ints(&[0, 0, n, hd]);
            let y = g.op("MatMul", &[&normed, weight], vec![]);
            let y = g.op("Reshape", &[&y, &shape], vec![]);
            g.op("Transpose", &[&y], vec![attr_ints("perm", &[0, 2, 1, 3])])
        };
        let q = heads(&mut g, &wq, nh);
        let k = heads(&mut g, &wk, nkv);
        let v = heads(&mut g, &wv, nkv);
        let q = rotary(&mut g, &q, &cos, &sin, hd);
        let k = rotary(&mut g, &k, &cos, &sin, hd);
        let concat = vec![attr_int("axis", 2)];
        let past_k = format!("past_key_values.{i}.key");
        let past_v = format!("past_key_values.{i}.value");
        let present_k = g.op_to("Concat", &[&past_k, &k], concat.clone(), Some(&format!("present.{i}.key")));
        let present_v = g.op_to("Concat", &[&past_v, &v], concat, Some(&format!("present.{i}.value")));

        // Grouped-query attention without copying keys: queries are grouped
        // [B, kv, group, S, hd] and broadcast against [B, kv, 1, T, hd].
        let grouped = g.ints(&[0, nkv, group, -1, hd]);
        let q = g.op("Reshape", &[&q, &grouped], vec![]);
        let kt = g.op("Transpose", &[&present_k], vec![attr_ints("perm", &[0, 1, 3, 2])]);
        let axes2 = g.ints(&[2]);
        let kt = g.op("Unsqueeze", &[&kt, &axes2], vec![]);
        let scores = g.op("MatMul", &[&q, &kt], vec![]);
        let scale = g.scalar(1.0 / (hd as f32).sqrt());
        let scores = g.op("Mul", &[&scores, &scale], vec![]);
        let scores = g.op("Add", &[&scores, &mask], vec![]);
        let probs = g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let values = g.op("Unsqueeze", &[&present_v, &axes2], vec![]);
        let ctx = g.op("MatMul", &[&probs, &values], vec![]);
        let ungrouped = g.ints(&[0, nh, -1, hd]);
        let ctx = g.op("Reshape", &[&ctx, &ungrouped], vec![]);
        let ctx = g.op("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let flat = g.ints(&[0, 0, nh * hd]);
        let ctx = g.op("Reshape", &[&ctx, &flat], vec![]);
        let attn = g.op("MatMul", &[&ctx, &wo], vec![]);
        let x = g.op("Add", &[&x, &attn], vec![]);

        let normed = rms_norm(&mut g, &x, &ln2, c.rms_eps);
        let gate = g.op("MatMul", &[&normed, &wg], vec![]);
        let up = g.op("MatMul", &[&normed, &wu], vec![]);
        let sig = g.op("Sigmoid", &[&gate], vec![]);
        let act = g.op("Mul", &[&gate, &sig], vec![]);
        let act = g.op("Mul", &[&act, &up], vec![]);
        let down = g.op("MatMul", &[&act, &wd], vec![]);
        hidden = g.op("Add", &[&x, &down], vec![]);
    }

    // Epilogue: final norm and the LM head, tied to the embeddings.
    g.scope("/model/norm");
    let norm = weight("model.norm.weight".into(), vec![h], norm_init);
    let normed = rms_norm(&mut g, &hidden, &norm, c.rms_eps);
    g.scope("/lm_head");
    let head = g.op("Transpose", &[&embed], vec![attr_ints("perm", &[1, 0])]);
    g.op_to("MatMul", &[&normed, &head], vec![], Some("logits"));
    g.graph.name = "main_graph".into();
    (g.graph, weights)
}

fn rms_norm(g: &mut GraphBuilder, x: &str, weight: &str, eps: f32) -> String {
    let square = g.op("Mul", &[x, x], vec![]);
    let mean = g.op("ReduceMean", &[&square], vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)]);
    let eps = g.scalar(eps);
    let var = g.op("Add", &[&mean, &eps], vec![]);
    let std = g.op("Sqrt", &[&var], vec![]);
    let y = g.op("Div", &[x, &std], vec![]);
    g.op("Mul", &[&y, weight], vec![])
}

/// `x * cos + rotate_half(x) * sin` on the last axis.
fn rotary(g: &mut GraphBuilder, x: &str, cos: &str, sin: &str, hd: i64) -> String {
    let (start, mid, end, axis) = (g.ints(&[0]), g.ints(&[hd / 2]), g.ints(&[hd]), g.ints(&[-1]));
    let x1 = g.op("Slice", &[x, &start, &mid, &axis], vec![]);
    let x2 = g.op("Slice", &[x, &mid, &end, &axis], vec![]);
    let neg = g.op("Neg", &[&x2], vec![]);
    let rotated = g.op("Concat", &[&neg, &x1], vec![attr_int("axis", -1)]);
    let a = g.op("Mul", &[x, cos], vec![]);
    let b = g.op("Mul", &[&rotated, sin], vec![]);
    g.op("Add", &[&a, &b], vec![])
}
