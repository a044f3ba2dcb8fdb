//! Thin helpers over tract's ONNX protobuf types (`tract_onnx::pb`): reading a
//! model file, naming tensors and dims, and a small graph builder used by the
//! built-in model generator and by segmentation to assemble unit graphs.

use std::path::Path;

use prost::Message;
pub use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// Opset the built-in generator writes and segmentation keeps.
pub const OPSET: i64 = 17;

/// Reads and decodes an ONNX model file. External data stays on disk: the
/// initializers keep their `location`/`offset`/`length` references.
pub fn read_model(path: &Path) -> std::io::Result<ModelProto> {
    let bytes = std::fs::read(path)?;
    ModelProto::decode(bytes.as_slice())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an ONNX model: {e}")))
}

/// A model wrapping `graph` with our opset and producer.
pub fn model(graph: GraphProto, opsets: Vec<OperatorSetIdProto>) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: opsets,
        producer_name: "llnode".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    }
}

pub fn default_opsets() -> Vec<OperatorSetIdProto> {
    vec![OperatorSetIdProto { domain: String::new(), version: OPSET }]
}

pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// One dimension of a declared input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Param(String),
}

impl Dim {
    pub fn param(s: &str) -> Dim {
        Dim::Param(s.to_string())
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Param(p) => f.write_str(p),
        }
    }
}

pub fn value_info(name: &str, elem_type: DataType, dims: &[Dim]) -> ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => Value::DimValue(*v),
                Dim::Param(p) => Value::DimParam(p.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Element type and dims of a declared input or output, when it has them.
pub fn tensor_type(info: &ValueInfoProto) -> Option<(i32, Vec<Dim>)> {
    use pb::tensor_shape_proto::dimension::Value;
    let Some(pb::type_proto::Value::TensorType(t)) = info.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(Value::DimValue(v)) => Dim::Fixed(*v),
                    Some(Value::DimParam(p)) => Dim::Param(p.clone()),
                    None => Dim::Param("?".into()),
                })
                .collect()
        })
        .unwrap_or_default();
    Some((t.elem_type, dims))
}

/// Size in bytes of one element of an ONNX data type (0 when unknown).
pub fn elem_size(elem_type: i32) -> u64 {
    match DataType::try_from(elem_type).unwrap_or(DataType::Undefined) {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Int64 | DataType::Uint64 | DataType::Double | DataType::Complex64 => 8,
        DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => 2,
        DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
        DataType::Complex128 => 16,
        _ => 0,
    }
}

/// Bytes an initializer's data takes, wherever it is stored.
pub fn tensor_bytes(t: &TensorProto) -> u64 {
    let count: i64 = t.dims.iter().product();
    count.max(0) as u64 * elem_size(t.data_type)
}

/// The `key` entry of an external-data initializer.
pub fn external_entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data.iter().find(|e| e.key == key).map(|e| e.value.as_str())
}

pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
}

/// Points `t` at `length` bytes at `offset` of `location`, relative to the model directory.
pub fn set_external(t: &mut TensorProto, location: &str, offset: u64, length: u64) {
    t.raw_data.clear();
    t.float_data.clear();
    t.int64_data.clear();
    t.int32_data.clear();
    t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
    let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v };
    t.external_data = vec![
        entry("location", location.into()),
        entry("offset", offset.to_string()),
        entry("length", length.to_string()),
    ];
}

pub fn attr_int(name: &str, i: i64) -> AttributeProto {
    use pb::attribute_proto::AttributeType;
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i, ..Default::default() }
}

pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    use pb::attribute_proto::AttributeType;
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: ints.to_vec(), ..Default::default() }
}

pub fn attr_string(name: &str, s: &str) -> AttributeProto {
    use pb::attribute_proto::AttributeType;
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, f: f32) -> AttributeProto {
    use pb::attribute_proto::AttributeType;
    AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f, ..Default::default() }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    use pb::attribute_proto::AttributeType;
    AttributeProto { name: name.into(), r#type: AttributeType::Tensor as i32, t: Some(t), ..Default::default() }
}

pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int64 as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Builds a graph node by node with generated, readable tensor names.
#[derive(Default)]
pub struct GraphBuilder {
    pub graph: GraphProto,
    scope: String,
    counter: usize,
}

impl GraphBuilder {
    /// Prefix for the names of the nodes and tensors made next (e.g. `/layers.3`).
    pub fn scope(&mut self, scope: &str) {
        self.scope = scope.to_string();
    }

    /// Adds a node with one output and returns the output's name.
    pub fn op(&mut self, op_type: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.op_to(op_type, inputs, attrs, None)
    }

    /// Adds a node whose output gets `output` as its name when given (graph
    /// outputs such as `logits`), a generated one otherwise.
    pub fn op_to(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        output: Option<&str>,
    ) -> String {
        self.counter += 1;
        let name = format!("{}/{}_{}", self.scope, op_type, self.counter);
        let output = output.map_or_else(|| format!("{name}_output_0"), str::to_string);
        self.graph.node.push(NodeProto {
            name,
            op_type: op_type.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            attribute: attrs,
            ..Default::default()
        });
        output
    }

    pub fn initializer(&mut self, t: TensorProto) -> String {
        let name = t.name.clone();
        self.graph.initializer.push(t);
        name
    }

    /// A small int64 constant, stored as an initializer.
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.counter += 1;
        let name = format!("{}/const_{}", self.scope, self.counter);
        self.initializer(tensor_i64(&name, &[values.len() as i64], values))
    }

    /// A scalar float constant, stored as an initializer.
    pub fn scalar(&mut self, value: f32) -> String {
        self.counter += 1;
        let name = format!("{}/const_{}", self.scope, self.counter);
        self.initializer(tensor_f32(&name, &[], &[value]))
    }

    /// A scalar int64 constant.
    pub fn scalar_i64(&mut self, value: i64) -> String {
        self.counter += 1;
        let name = format!("{}/const_{}", self.scope, self.counter);
        self.initializer(tensor_i64(&name, &[], &[value]))
    }
}
