//! A step's tensors on the wire: the header names the session, step, plan
//! epoch and (in the name) the initiator; logits go back to an initiator
//! that reads only the highest few as just those.

use llnode_mesh::PeerId;
use llnode_mesh::wire::{DType, Tensor as WireTensor, TensorHeader};
use llnode_models::raw::{RawTensor, RawType};
use llnode_models::sampling::TopLogits;

use super::Delivery;

/// Reads a tensor off the wire.
pub(super) fn delivery(initiator_or_sender: PeerId, tensor: WireTensor) -> Result<Delivery, String> {
    let h = tensor.header;
    let dtype = match h.dtype {
        DType::F32 => RawType::F32,
        DType::F16 => RawType::F16,
        DType::I64 => RawType::I64,
        DType::I32 => RawType::I32,
        DType::Bool => RawType::Bool,
        DType::U8 => return Err("u8 tensors are not activations".into()),
    };
    // The initiator's id rides in the name: "<initiator>/<tensor>".
    let (initiator, name) = match h.name.split_once('/') {
        Some((who, name)) => (who.parse().map_err(|_| "bad initiator in tensor name".to_string())?, name.to_string()),
        None => (initiator_or_sender, h.name),
    };
    let shape = h.shape.iter().map(|&d| d as usize).collect();
    Ok(Delivery {
        session: h.session,
        epoch: h.epoch,
        initiator,
        step: h.step,
        tokens: h.tokens,
        name,
        value: RawTensor { dtype, shape, data: tensor.data },
        top_logits: h.top_logits,
        no_logits: h.no_logits,
        compute_us: h.compute_us,
    })
}

/// A step's logits for its initiator: all of them, or, for an initiator
/// that reads only the highest `top`, just those ([`TopLogits`]): 16 bytes
/// rather than 4 per token of the vocabulary for a greedy generation.
pub(super) fn logits_tensor(logits: &[f32], top: u32) -> RawTensor {
    match TopLogits::of(logits, top as usize) {
        Some(top) => {
            let words = top.to_words();
            let data = words.iter().flatten().flat_map(|w| w.to_le_bytes()).collect();
            RawTensor { dtype: RawType::I32, shape: vec![words.len(), 2], data }
        }
        None => {
            let data = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
            RawTensor { dtype: RawType::F32, shape: vec![1, 1, logits.len()], data }
        }
    }
}

/// The logits in a [`logits_tensor`], as the sampler reads them.
pub(super) fn read_logits(value: RawTensor) -> Result<Vec<f32>, String> {
    fn words(bytes: &[u8]) -> impl Iterator<Item = [u8; 4]> + '_ {
        bytes.chunks_exact(4).map(|w| w.try_into().expect("4 bytes"))
    }
    let logits = match value.dtype {
        RawType::F32 => words(&value.data).map(f32::from_le_bytes).collect(),
        RawType::I32 => {
            let ints: Vec<i32> = words(&value.data).map(i32::from_le_bytes).collect();
            let rows: Vec<[i32; 2]> = ints.chunks_exact(2).map(|r| [r[0], r[1]]).collect();
            TopLogits::from_words(&rows)?.expand()
        }
        other => return Err(format!("logits came as {other:?}")),
    };
    if logits.is_empty() {
        // The sampler needs a token to pick.
        return Err("logits came for a vocabulary of no tokens".to_string());
    }
    Ok(logits)
}

/// Puts a tensor on the wire.
pub fn wire_tensor(d: Delivery) -> WireTensor {
    let value = d.value;
    let dtype = match value.dtype {
        RawType::F32 => DType::F32,
        RawType::F16 => DType::F16,
        RawType::I64 => DType::I64,
        RawType::I32 => DType::I32,
        RawType::Bool => DType::Bool,
    };
    WireTensor {
        header: TensorHeader {
            session: d.session,
            step: d.step,
            tokens: d.tokens,
            epoch: d.epoch,
            name: format!("{}/{}", d.initiator, d.name),
            dtype,
            shape: value.shape.iter().map(|&d| d as u64).collect(),
            top_logits: d.top_logits,
            no_logits: d.no_logits,
            compute_us: d.compute_us,
        },
        data: value.data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_read_back_as_sent_and_none_is_an_error() {
        let logits = [0.5, -1.0, 2.0, 0.25];
        assert_eq!(read_logits(logits_tensor(&logits, 0)), Ok(logits.to_vec()));
        let top = read_logits(logits_tensor(&logits, 2)).unwrap();
        assert_eq!(top, vec![0.5, f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY]);
        let empty = RawTensor { dtype: RawType::F32, shape: vec![1, 1, 0], data: vec![] };
        assert!(read_logits(empty).is_err());
        let no_vocabulary = RawTensor { dtype: RawType::I32, shape: vec![1, 2], data: vec![0; 8] };
        assert!(read_logits(no_vocabulary).is_err());
    }
}
