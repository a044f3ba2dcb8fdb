//! Tensors as plain little-endian bytes with a type and a shape: what the
//! mesh carries between segments. Only the types activations use.

use tract_onnx::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawType {
    F32,
    F16,
    I64,
    I32,
    Bool,
}

impl RawType {
    pub fn size(self) -> usize {
        match self {
            RawType::F32 | RawType::I32 => 4,
            RawType::F16 => 2,
            RawType::I64 => 8,
            RawType::Bool => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: RawType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("tensors of type {0:?} do not travel between devices")]
    Unsupported(DatumType),
    #[error("{data} bytes do not make a {dtype:?} tensor of shape {shape:?}")]
    Size { dtype: RawType, shape: Vec<usize>, data: usize },
    #[error("{0}")]
    Tract(String),
}

fn bytes<T: Datum + Copy, const N: usize>(value: &Tensor, le: fn(T) -> [u8; N]) -> Result<Vec<u8>, RawError> {
    let view = value.try_as_plain_ram().map_err(|e| RawError::Tract(format!("{e:#}")))?;
    let slice = view.as_slice::<T>().map_err(|e| RawError::Tract(format!("{e:#}")))?;
    Ok(slice.iter().flat_map(|&x| le(x)).collect())
}

pub fn to_raw(value: &Tensor) -> Result<RawTensor, RawError> {
    let (dtype, data) = match value.datum_type() {
        DatumType::F32 => (RawType::F32, bytes::<f32, 4>(value, f32::to_le_bytes)?),
        DatumType::F16 => (RawType::F16, bytes::<f16, 2>(value, |x| x.to_le_bytes())?),
        DatumType::I64 => (RawType::I64, bytes::<i64, 8>(value, i64::to_le_bytes)?),
        DatumType::I32 => (RawType::I32, bytes::<i32, 4>(value, i32::to_le_bytes)?),
        DatumType::Bool => (RawType::Bool, bytes::<bool, 1>(value, |b| [b as u8])?),
        other => return Err(RawError::Unsupported(other)),
    };
    Ok(RawTensor { dtype, shape: value.shape().to_vec(), data })
}

fn tensor<T: Datum + Copy, const N: usize>(raw: &RawTensor, from: fn([u8; N]) -> T) -> Result<Tensor, RawError> {
    let values: Vec<T> = raw.data.chunks_exact(N).map(|c| from(c.try_into().expect("chunks of N"))).collect();
    Tensor::from_shape(&raw.shape, &values).map_err(|e| RawError::Tract(format!("{e:#}")))
}

pub fn from_raw(raw: &RawTensor) -> Result<TValue, RawError> {
    let expected = raw.shape.iter().product::<usize>() * raw.dtype.size();
    if expected != raw.data.len() {
        return Err(RawError::Size { dtype: raw.dtype, shape: raw.shape.clone(), data: raw.data.len() });
    }
    let value = match raw.dtype {
        RawType::F32 => tensor(raw, f32::from_le_bytes),
        RawType::F16 => tensor(raw, f16::from_le_bytes),
        RawType::I64 => tensor(raw, i64::from_le_bytes),
        RawType::I32 => tensor(raw, i32::from_le_bytes),
        RawType::Bool => tensor(raw, |[b]: [u8; 1]| b != 0),
    }?;
    Ok(value.into_tvalue())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_survive_the_trip() {
        let values = [
            Tensor::from_shape(&[2, 3], &[1.5f32, -2.0, 3.25, 0.0, 7.0, -1e-7]).unwrap(),
            Tensor::from_shape(&[3], &[1i64, -5, i64::MAX]).unwrap(),
            Tensor::from_shape(&[2], &[true, false]).unwrap(),
            Tensor::from_shape(&[1, 2], &[f16::from_f32(0.5), f16::from_f32(-3.0)]).unwrap(),
        ];
        for v in values {
            let raw = to_raw(&v).unwrap();
            assert_eq!(*from_raw(&raw).unwrap(), v);
        }
        let bad = RawTensor { dtype: RawType::F32, shape: vec![2], data: vec![0; 7] };
        assert!(matches!(from_raw(&bad), Err(RawError::Size { .. })));
    }
}
