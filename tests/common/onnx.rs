//! ONNX protobuf pieces for tests that write their own models.

use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::{type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto};
use onnx_protobuf::{TypeProto, ValueInfoProto};

/// A tensor value of element type `elem_type` (ONNX's numbering) whose dims
/// are sizes or `dim_param` names.
pub fn value_info_dims(name: &str, elem_type: i32, dims: &[dimension::Value]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = Dimension::new();
        dim.value = Some(d.clone());
        shape.dim.push(dim);
    }
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = elem_type;
    tt.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(tt));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(ty).into();
    v
}

/// `value_info_dims` with known sizes.
pub fn value_info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    let dims: Vec<dimension::Value> = dims.iter().map(|&d| dimension::Value::DimValue(d)).collect();
    value_info_dims(name, elem_type, &dims)
}

pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = format!("{op}_0");
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n
}

/// A model of `graph` at IR version 8, opset 17.
pub fn model(graph: GraphProto) -> ModelProto {
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let mut opset = OperatorSetIdProto::new();
    opset.version = 17;
    m.opset_import.push(opset);
    m.graph = Some(graph).into();
    m
}
