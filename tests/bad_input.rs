//! Bad input gets a clear error and a non-zero exit status, never a panic.
//! Each test writes a broken model (or input) to a temporary folder and runs
//! the real `egret` binary on it.

mod common;

use common::onnx::{model, node, value_info};
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use protobuf::Message;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An integer attribute (`ints` empty) or a list of integers (`i` unused).
fn int_attr(name: &str, i: i64, ints: &[i64]) -> onnx_protobuf::AttributeProto {
    use onnx_protobuf::attribute_proto::AttributeType;
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = name.into();
    a.type_ = if ints.is_empty() { AttributeType::INT } else { AttributeType::INTS }.into();
    a.i = i;
    a.ints = ints.to_vec();
    a
}

/// `y = x + w` with x: f32[2, 3] and an initializer w: f32[3].
fn add_model() -> ModelProto {
    let mut g = GraphProto::new();
    g.name = "add".into();
    g.input.push(value_info("x", 1, &[2, 3]));
    g.output.push(value_info("y", 1, &[2, 3]));
    g.node.push(node("Add", &["x", "w"], &["y"]));
    let mut w = TensorProto::new();
    w.name = "w".into();
    w.data_type = 1;
    w.dims = vec![3];
    w.float_data = vec![1.0, 2.0, 3.0];
    g.initializer.push(w);
    model(g)
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("egret-bad-input-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_model(dir: &Path, m: &ModelProto) -> PathBuf {
    let p = dir.join("model.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    p
}

/// Runs `egret ARGS`, expects failure, and returns stderr.
fn egret_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_egret")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "egret {args:?} should fail; stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1), "egret {args:?} should exit with 1, not crash; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "egret {args:?} panicked: {stderr}");
    stderr
}

fn run_fails(model: &Path) -> String {
    egret_fails(&["run", model.to_str().unwrap()])
}

#[test]
fn the_well_formed_model_runs() {
    let dir = tempdir("ok");
    let p = write_model(&dir, &add_model());
    let out = Command::new(env!("CARGO_BIN_EXE_egret")).args(["run", p.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("y: f32[2,3]"));
}

#[test]
fn truncated_file() {
    let dir = tempdir("truncated");
    let bytes = add_model().write_to_bytes().unwrap();
    let p = dir.join("model.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = run_fails(&p);
    assert!(err.contains("is not a valid ONNX model"), "{err}");
}

#[test]
fn file_that_is_not_protobuf() {
    let dir = tempdir("garbage");
    let p = dir.join("model.onnx");
    std::fs::write(&p, b"this is a text file, not a protobuf message \xff\xfe").unwrap();
    let err = run_fails(&p);
    assert!(err.contains("is not a valid ONNX model"), "{err}");
}

#[test]
fn empty_file() {
    let dir = tempdir("empty");
    let p = dir.join("model.onnx");
    std::fs::write(&p, b"").unwrap();
    let err = run_fails(&p);
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn missing_file() {
    let err = egret_fails(&["run", "/nonexistent/model.onnx"]);
    assert!(err.contains("cannot read `/nonexistent/model.onnx`"), "{err}");
    // The I/O error is said once, not once more as the error's cause.
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn folder_without_a_model() {
    let dir = tempdir("no-model");
    let err = egret_fails(&["run", dir.to_str().unwrap()]);
    assert!(err.contains(&format!("`{}` is a folder without a `model.onnx` in it", dir.display())), "{err}");
}

#[test]
fn unknown_op() {
    let dir = tempdir("unknown-op");
    let mut m = add_model();
    m.graph.as_mut().unwrap().node[0].op_type = "FrobnicateTensor".into();
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("unsupported op `FrobnicateTensor`"), "{err}");
    assert!(err.contains("opset 17") && err.contains("Add_0"), "{err}");
}

#[test]
fn op_from_another_domain() {
    let dir = tempdir("domain");
    let mut m = add_model();
    m.graph.as_mut().unwrap().node[0].domain = "com.example".into();
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("domain `com.example`"), "{err}");
}

#[test]
fn unsupported_attribute() {
    let dir = tempdir("attr");
    let mut m = add_model();
    m.graph.as_mut().unwrap().node[0].attribute.push(int_attr("frobnication", 3, &[]));
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("attribute `frobnication` is not supported"), "{err}");
}

/// An input the op does not take is an error, not dropped (a `Tanh` given
/// two inputs computed `tanh` of the first).
#[test]
fn input_the_op_does_not_take() {
    let dir = tempdir("unread-input");
    let mut m = add_model();
    m.graph.as_mut().unwrap().node[0].op_type = "Tanh".into();
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("(Tanh, opset") && err.contains("input 1 (`w`) is not supported"), "{err}");
}

/// A boolean attribute outside 0 and 1 is an error, not read as true.
#[test]
fn boolean_attribute_that_is_neither_zero_nor_one() {
    let dir = tempdir("flag");
    let mut m = add_model();
    let n = &mut m.graph.as_mut().unwrap().node[0];
    n.op_type = "Mod".into();
    n.attribute.push(int_attr("fmod", -100, &[]));
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("(Mod, opset") && err.contains("attribute `fmod` must be 0 or 1, not -100"), "{err}");
}

/// A transpose's `perm` is a permutation of 0..rank; a negative entry is
/// not read as counted from the end.
#[test]
fn transpose_perm_with_a_negative_entry() {
    let dir = tempdir("perm");
    let mut m = add_model();
    let g = m.graph.as_mut().unwrap();
    g.output[0] = value_info("y", 1, &[3, 2]);
    let mut t = node("Transpose", &["x"], &["y"]);
    t.attribute.push(int_attr("perm", 0, &[1, -2]));
    g.node[0] = t;
    g.initializer.clear();
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("perm [1, -2] is not a permutation of 0..2"), "{err}");
}

/// A declared intermediate type that contradicts the graph is an error
/// naming the tensor (value_info is a hint, but a wrong one means a broken
/// model or a wrong shape rule).
#[test]
fn intermediate_declared_with_another_shape() {
    let dir = tempdir("value-info");
    let mut m = add_model();
    let g = m.graph.as_mut().unwrap();
    g.node.push(node("Relu", &["y"], &["z"]));
    g.output[0] = value_info("z", 1, &[2, 3]);
    g.value_info.push(value_info("y", 1, &[3, 2]));
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("tensor `y`: the model declares dim 0 = 3 but the graph computes f32[2,3]"), "{err}");
}

/// An op newer than the opset the model imports is an error (Mish is in
/// opset 18; the model imports 17), as in onnxruntime.
#[test]
fn op_newer_than_the_models_opset() {
    let dir = tempdir("op-opset");
    let mut m = add_model();
    let g = m.graph.as_mut().unwrap();
    g.node[0] = node("Mish", &["x"], &["y"]);
    g.initializer.clear();
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("(Mish, opset 17): the op is defined from opset 18 on; the model imports opset 17"), "{err}");
}

#[test]
fn missing_initializer() {
    let dir = tempdir("missing-init");
    let mut m = add_model();
    m.graph.as_mut().unwrap().initializer.clear();
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("reads `w`, which no node, initializer or graph input defines"), "{err}");
}

#[test]
fn graph_with_a_cycle() {
    let dir = tempdir("cycle");
    let mut m = add_model();
    let g = m.graph.as_mut().unwrap();
    g.node.clear();
    g.node.push(node("Add", &["x", "b"], &["a"]));
    g.node.push(node("Relu", &["a"], &["b"]));
    g.node.push(node("Relu", &["a"], &["y"]));
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("cycle"), "{err}");
}

fn external_model(location: &str) -> ModelProto {
    let mut m = add_model();
    let w = &mut m.graph.as_mut().unwrap().initializer[0];
    w.float_data.clear();
    w.data_location = DataLocation::EXTERNAL.into();
    let mut kv = StringStringEntryProto::new();
    kv.key = "location".into();
    kv.value = location.into();
    w.external_data.push(kv);
    m
}

#[test]
fn external_data_inside_the_folder_loads() {
    let dir = tempdir("external-ok");
    let bytes: Vec<u8> = [1f32, 2.0, 3.0].iter().flat_map(|f| f.to_le_bytes()).collect();
    std::fs::write(dir.join("weights.bin"), bytes).unwrap();
    let p = write_model(&dir, &external_model("weights.bin"));
    let out = Command::new(env!("CARGO_BIN_EXE_egret")).args(["run", p.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn external_data_path_that_escapes_the_folder() {
    let dir = tempdir("external-escape");
    std::fs::write(dir.join("../egret-secret.bin"), [0u8; 12]).unwrap();
    let err = run_fails(&write_model(&dir, &external_model("../egret-secret.bin")));
    assert!(err.contains("escapes the model's folder"), "{err}");
    let err = run_fails(&write_model(&dir, &external_model("sub/../../egret-secret.bin")));
    assert!(err.contains("escapes the model's folder"), "{err}");
}

#[test]
fn external_data_with_an_absolute_path() {
    let dir = tempdir("external-abs");
    let err = run_fails(&write_model(&dir, &external_model("/etc/passwd")));
    assert!(err.contains("is absolute"), "{err}");
}

#[test]
fn external_data_range_past_the_end() {
    let dir = tempdir("external-short");
    std::fs::write(dir.join("weights.bin"), [0u8; 4]).unwrap();
    let err = run_fails(&write_model(&dir, &external_model("weights.bin")));
    assert!(err.contains("raw data has 4 bytes"), "{err}");
}

/// An offset and length beyond the file (one cut short after export) are
/// checked against its size before anything is read.
#[test]
fn external_data_offset_and_length_past_the_end() {
    let dir = tempdir("external-offset");
    std::fs::write(dir.join("weights.bin"), [0u8; 16]).unwrap();
    let mut m = external_model("weights.bin");
    for (key, value) in [("offset", "8"), ("length", "12")] {
        let mut kv = StringStringEntryProto::new();
        kv.key = key.into();
        kv.value = value.into();
        m.graph.as_mut().unwrap().initializer[0].external_data.push(kv);
    }
    let err = run_fails(&write_model(&dir, &m));
    assert!(
        err.contains("tensor `w`") && err.contains("range 8..20 is past the end of `weights.bin` (16 bytes)"),
        "{err}"
    );
}

#[test]
fn initializer_with_too_few_values() {
    let dir = tempdir("short-init");
    let mut m = add_model();
    m.graph.as_mut().unwrap().initializer[0].float_data.pop();
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("tensor `w`") && err.contains("holds 2 values"), "{err}");
}

#[test]
fn shapes_that_do_not_broadcast() {
    let dir = tempdir("broadcast");
    let mut m = add_model();
    m.graph.as_mut().unwrap().initializer[0].dims = vec![1, 3, 1];
    m.graph.as_mut().unwrap().initializer[0].float_data = vec![1.0, 2.0, 3.0];
    m.graph.as_mut().unwrap().input[0] = value_info("x", 1, &[2, 2]);
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("do not broadcast") && err.contains("Add_0"), "{err}");
}

fn write_npy(path: &Path, t: &egret::ir::Tensor) {
    egret::io::write_npy(path, t).unwrap();
}

#[test]
fn input_of_the_wrong_shape() {
    let dir = tempdir("wrong-shape");
    let p = write_model(&dir, &add_model());
    let x = dir.join("x.npy");
    write_npy(&x, &egret::ir::Tensor::from_vec(vec![3, 3], vec![0f32; 9]));
    let err = egret_fails(&["run", p.to_str().unwrap(), "--input", &format!("x={}", x.display())]);
    assert!(err.contains("input `x`") && err.contains("[3, 3]"), "{err}");
}

#[test]
fn input_of_the_wrong_dtype() {
    let dir = tempdir("wrong-dtype");
    let p = write_model(&dir, &add_model());
    let x = dir.join("x.npy");
    write_npy(&x, &egret::ir::Tensor::from_vec(vec![2, 3], vec![0i64; 6]));
    let err = egret_fails(&["run", p.to_str().unwrap(), "--input", &format!("x={}", x.display())]);
    assert!(err.contains("input `x` should be f32[2,3] but is i64[2,3]"), "{err}");
}

#[test]
fn input_that_the_model_does_not_have() {
    let dir = tempdir("extra-input");
    let p = write_model(&dir, &add_model());
    let x = dir.join("z.npy");
    write_npy(&x, &egret::ir::Tensor::from_vec(vec![2, 3], vec![0f32; 6]));
    let err = egret_fails(&["run", p.to_str().unwrap(), "--input", &format!("z={}", x.display())]);
    assert!(err.contains("no input `z`"), "{err}");
}

#[test]
fn input_file_that_is_not_npy() {
    let dir = tempdir("bad-npy");
    let p = write_model(&dir, &add_model());
    let x = dir.join("x.npy");
    std::fs::write(&x, b"not numpy").unwrap();
    let err = egret_fails(&["run", p.to_str().unwrap(), "--input", &format!("x={}", x.display())]);
    assert!(err.contains("not a valid .npy file"), "{err}");
}

#[test]
fn gather_index_out_of_range_is_an_error_not_a_crash() {
    let dir = tempdir("gather-oob");
    let mut m = add_model();
    let g = m.graph.as_mut().unwrap();
    g.node.clear();
    g.node.push(node("Gather", &["w", "i"], &["y"]));
    g.input[0] = value_info("i", 7, &[2]);
    g.output[0] = value_info("y", 1, &[2]);
    let p = write_model(&dir, &m);
    let i = dir.join("i.npy");
    write_npy(&i, &egret::ir::Tensor::from_vec(vec![2], vec![0i64, 7]));
    let err = egret_fails(&["run", p.to_str().unwrap(), "--input", &format!("i={}", i.display())]);
    assert!(err.contains("out of range for an axis of length 3"), "{err}");
    assert!(err.contains("Gather_0"), "{err}");
}

#[test]
fn opset_newer_than_supported() {
    let dir = tempdir("opset");
    let mut m = add_model();
    m.opset_import[0].version = 99;
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("opset 99"), "{err}");
}

#[test]
fn constant_of_absurd_size() {
    let dir = tempdir("huge");
    let mut m = add_model();
    let g = m.graph.as_mut().unwrap();
    g.node.clear();
    let mut shape = TensorProto::new();
    shape.name = "s".into();
    shape.data_type = 7;
    shape.dims = vec![2];
    shape.int64_data = vec![1 << 40, 1 << 40];
    g.initializer.push(shape);
    g.node.push(node("ConstantOfShape", &["s"], &["y"]));
    g.output[0] = value_info("y", 1, &[]);
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("too large"), "{err}");
}

#[test]
fn input_of_absurd_declared_size() {
    let dir = tempdir("huge-input");
    let mut m = add_model();
    m.graph.as_mut().unwrap().input[0] = value_info("x", 1, &[1 << 40, 1 << 40]);
    let err = run_fails(&write_model(&dir, &m));
    assert!(err.contains("too large"), "{err}");
}

/// A copy of `tests/data/formats/ops/<case>` (model and data sets) in a
/// temporary folder, its model changed by `edit`.
fn format_case(case: &str, edit: &dyn Fn(&mut ModelProto)) -> PathBuf {
    let src = common::repo_root().join("tests/data/formats/ops").join(case);
    let dir = tempdir(case);
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            let to = dir.join(p.file_name().unwrap());
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    let mut m = ModelProto::parse_from_bytes(&std::fs::read(src.join("model.onnx")).unwrap()).unwrap();
    edit(&mut m);
    write_model(&dir, &m);
    dir
}

/// `egret check --backend BACKEND DIR`, which must fail (exit status 1,
/// no panic): what it printed, stdout and stderr.
fn check_fails(dir: &Path, backend: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["check", "--backend", backend, dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "check should fail, not crash: {text}");
    assert!(!text.contains("panicked"), "{text}");
    text
}

fn initializer<'m>(m: &'m mut ModelProto, name: &str) -> &'m mut TensorProto {
    m.graph.as_mut().unwrap().initializer.iter_mut().find(|t| t.name == name).unwrap()
}

/// Quantized models' parameters that contradict each other or their
/// definitions are refused at compile time, naming the node and the
/// parameter: a zero scale, a 4-bit weight whose bytes disagree with its
/// K, N, bits and block size, an unsupported bit width, a blocked scale of
/// the wrong shape.
#[test]
fn quantization_parameters_that_contradict_themselves() {
    let dir = format_case("dequantize_linear_int8", &|m| {
        let s = initializer(m, "scale");
        s.float_data = vec![0.0];
        s.raw_data.clear();
    });
    let err = check_fails(&dir, "cpu");
    assert!(err.contains("DequantizeLinear") && err.contains("x_scale") && err.contains("positive"), "{err}");

    let set_attr = |name: &'static str, v: i64| {
        move |m: &mut ModelProto| {
            let n = &mut m.graph.as_mut().unwrap().node[0];
            n.attribute.iter_mut().find(|a| a.name == name).unwrap().i = v;
        }
    };
    let dir = format_case("matmul_nbits_b32_acc0", &set_attr("N", 24));
    let err = check_fails(&dir, "cpu");
    assert!(err.contains("MatMulNBits") && err.contains("B holds 736 bytes"), "{err}");
    let dir = format_case("matmul_nbits_b32_acc0", &set_attr("bits", 3));
    let err = check_fails(&dir, "cpu");
    assert!(err.contains("bits 3 is not supported"), "{err}");
    let dir = format_case("gather_block_quantized_int4", &set_attr("block_size", 64));
    let err = check_fails(&dir, "cpu");
    assert!(err.contains("GatherBlockQuantized") && err.contains("scales are [53, 3]"), "{err}");
}

/// A 4-bit table read at an index past its rows is the gather's clear
/// error, not a read outside the table.
#[test]
fn a_quantized_gather_out_of_range() {
    let dir = format_case("gather_block_quantized_int4", &|_| {});
    let input = dir.join("test_data_set_0/input_0.pb");
    let (name, t) = egret::io::read_pb(&input).unwrap();
    let big = egret::ir::Tensor::new(t.shape().to_vec(), egret::ir::Data::from_i64s(t.dtype(), &vec![53; t.numel()]));
    egret::io::write_pb(&input, &name, &big).unwrap();
    let err = check_fails(&dir, "cpu");
    assert!(err.contains("out of range") || err.contains("outside"), "{err}");
}

/// `GroupQueryAttention` keeps its cache as the past followed by the new
/// tokens; a batch whose `seqlens_k` says its past is shorter (a padded
/// batch decoding) would be attended at the wrong positions, so it is an
/// error naming the condition, on every backend.
#[test]
fn group_query_attention_with_a_shorter_past_is_an_error() {
    let dir = format_case("group_query_attention", &|_| {});
    let input = dir.join("test_data_set_1/input_5.pb");
    let (name, t) = egret::io::read_pb(&input).unwrap();
    assert_eq!(name, "seqlens_k");
    let mut lengths = t.to_i64_vec();
    lengths[1] -= 2;
    egret::io::write_pb(
        &input,
        &name,
        &egret::ir::Tensor::from_vec(t.shape().to_vec(), lengths.iter().map(|&x| x as i32).collect::<Vec<_>>()),
    )
    .unwrap();
    for backend in ["reference", "cpu"] {
        let err = check_fails(&dir, backend);
        assert!(err.contains("seqlens_k + 1 and total_sequence_length must be past + sequence"), "{backend}: {err}");
    }
}

/// An op of a domain Egret does not import (onnxruntime's NCHWc layouts)
/// is refused naming the op, its domain and the node.
#[test]
fn an_op_of_an_unknown_domain() {
    let dir = format_case("gelu", &|m| {
        m.graph.as_mut().unwrap().node[0].domain = "com.microsoft.nchwc".into();
    });
    let err = check_fails(&dir, "cpu");
    assert!(err.contains("unsupported op `Gelu` (domain `com.microsoft.nchwc`"), "{err}");
}

/// The ops imported as compositions (the losses, the pools and grids the
/// node suite has) refuse what they cannot mean with the node and the
/// reason, at import.
#[test]
fn composite_ops_refuse_bad_attributes_and_shapes_by_node() {
    use onnx_protobuf::AttributeProto;
    let string_attr = |name: &str, s: &str| {
        let mut a = AttributeProto::new();
        a.name = name.into();
        a.type_ = onnx_protobuf::attribute_proto::AttributeType::STRING.into();
        a.s = s.as_bytes().to_vec();
        a
    };
    let with = |mut n: onnx_protobuf::NodeProto, attributes: Vec<AttributeProto>| {
        n.attribute.extend(attributes);
        n
    };
    let ints = |name: &str, values: Vec<i64>| {
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = 7;
        t.dims = vec![values.len() as i64];
        t.int64_data = values;
        t
    };
    let f32s = |name: &str, dims: Vec<i64>| {
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = 1;
        t.float_data = vec![0.5; dims.iter().product::<i64>() as usize];
        t.dims = dims;
        t
    };
    // An `If` whose condition is a constant: its body's outputs must be
    // the node's.
    let if_node = |outputs: &[&str]| {
        let mut body = GraphProto::new();
        body.name = "then".into();
        body.node.push(node("Identity", &["x"], &["a"]));
        for o in outputs {
            body.output.push(value_info(o, 1, &[]));
        }
        let mut a = AttributeProto::new();
        a.name = "then_branch".into();
        a.type_ = onnx_protobuf::attribute_proto::AttributeType::GRAPH.into();
        a.g = protobuf::MessageField::some(body);
        with(node("If", &["cond"], &["y"]), vec![a])
    };
    let cond = {
        let mut t = TensorProto::new();
        t.name = "cond".into();
        t.data_type = 9;
        t.dims = vec![];
        t.int32_data = vec![1];
        t
    };
    // (opset, node, initializers, the input `x`'s shape, what the error says)
    let cases: Vec<(i64, onnx_protobuf::NodeProto, Vec<TensorProto>, Vec<i64>, &str)> = vec![
        (
            13,
            node("NegativeLogLikelihoodLoss", &["x", "t"], &["y"]),
            vec![ints("t", vec![0, 1, 2, 0])],
            vec![2, 3],
            "the target needs an integer class per element",
        ),
        (
            13,
            with(node("NegativeLogLikelihoodLoss", &["x", "t"], &["y"]), vec![string_attr("reduction", "average")]),
            vec![ints("t", vec![0, 1])],
            vec![2, 3],
            "reduction `average` is not one of none, sum, mean",
        ),
        (
            17,
            with(node("LpPool", &["x"], &["y"]), vec![int_attr("kernel_shape", 0, &[2]), int_attr("p", 0, &[])]),
            vec![],
            vec![1, 2, 6],
            "p = 0; it must be positive",
        ),
        (
            18,
            node("CenterCropPad", &["x", "s"], &["y"]),
            vec![ints("s", vec![-1, 2])],
            vec![2, 3],
            "needs one length of at least 0 per axis",
        ),
        (
            21,
            with(node("GroupNormalization", &["x", "s", "s"], &["y"]), vec![int_attr("num_groups", 4, &[])]),
            vec![f32s("s", vec![6])],
            vec![1, 6, 2],
            "num_groups 4 must be positive and divide C 6",
        ),
        (
            13,
            with(node("LRN", &["x"], &["y"]), vec![int_attr("size", 0, &[])]),
            vec![],
            vec![1, 6, 2],
            "size 0 must be positive",
        ),
        (
            20,
            node("AffineGrid", &["x", "s"], &["y"]),
            vec![ints("s", vec![2, 1, 4, 4])],
            vec![2, 3, 3],
            "theta is f32[2,3,3]",
        ),
        (17, if_node(&["a", "a"]), vec![cond.clone()], vec![2, 3], "then_branch has 2 outputs; the node has 1"),
        (17, if_node(&["b"]), vec![cond.clone()], vec![2, 3], "then_branch never computes its output `b`"),
        (
            17,
            {
                let mut n = if_node(&["a"]);
                n.attribute[0].g.as_mut().unwrap().node.push(node("Identity", &["x"], &["x"]));
                n
            },
            vec![cond],
            vec![2, 3],
            "then_branch defines `x` again, a name the graph already has",
        ),
        (
            17,
            node("ConvTranspose", &["x", "w"], &["y"]),
            vec![f32s("w", vec![2, 1, 3])],
            vec![1, 3, 4],
            "weight [2, 1, 3] takes 2 channels in 1 group(s); the input has 3",
        ),
        (
            17,
            with(node("ConvTranspose", &["x", "w"], &["y"]), vec![int_attr("pads", 0, &[9, 9])]),
            vec![f32s("w", vec![3, 1, 3])],
            vec![1, 3, 4],
            "crop the input to nothing",
        ),
        (
            25,
            with(node("Cast", &["x"], &["y"]), vec![int_attr("to", 24, &[]), string_attr("round_mode", "sideways")]),
            vec![],
            vec![2, 3],
            "round_mode `sideways` is not up, down or nearest",
        ),
        (
            26,
            with(node("BitCast", &["x"], &["y"]), vec![int_attr("to", 7, &[])]),
            vec![],
            vec![2, 3],
            "bit_cast needs types of one width: f32 is 32 bits, i64 is 64",
        ),
        (
            26,
            with(node("BitCast", &["x"], &["y"]), vec![int_attr("to", 17, &[])]),
            vec![],
            vec![2, 3],
            "bit casts of f8e4m3fn are not supported (it is carried in f32)",
        ),
    ];
    for (i, (opset, n, inits, shape, want)) in cases.into_iter().enumerate() {
        let dir = tempdir(&format!("composite-{i}"));
        let mut g = GraphProto::new();
        g.name = "g".into();
        g.input.push(value_info("x", 1, &shape));
        g.output.push(value_info("y", 1, &[]));
        let op = n.op_type.clone();
        g.node.push(n);
        g.initializer.extend(inits);
        let mut m = model(g);
        m.opset_import[0].version = opset;
        let err = run_fails(&write_model(&dir, &m));
        assert!(err.contains(&format!("{op}_0")) && err.contains(want), "{op}: {err}");
    }
}

/// Scatters and `TopK` given indices or a `k` they cannot take: an index
/// past its axis (given at run time) is an error naming the node on every
/// backend, never a write outside the output; duplicate indices under a
/// reduction combine as ONNX defines (here, a sum); a `k` larger than its
/// axis is refused when the model is compiled.
#[test]
fn scatter_indices_and_top_k_out_of_range() {
    use egret::ir::Tensor;
    let ints = |name: &str, dims: Vec<i64>, values: Vec<i64>| {
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = 7;
        t.dims = dims;
        t.int64_data = values;
        t
    };
    let mut backends = vec![egret::Backend::Reference, egret::Backend::Cpu];
    if common::wgsl_adapter() {
        backends.push(egret::Backend::Wgsl);
    }
    // (node, its initializers, the index input's shape, indices, what happens)
    let x = Tensor::from_vec(vec![4, 3], (0..12).map(|v| v as f32).collect());
    let scatter_nd = |reduction: &str| {
        let mut n = node("ScatterND", &["x", "i", "u"], &["y"]);
        if !reduction.is_empty() {
            let mut a = onnx_protobuf::AttributeProto::new();
            a.name = "reduction".into();
            a.type_ = onnx_protobuf::attribute_proto::AttributeType::STRING.into();
            a.s = reduction.as_bytes().to_vec();
            n.attribute.push(a);
        }
        n
    };
    let mut elements = node("ScatterElements", &["x", "i", "u"], &["y"]);
    elements.attribute.push(int_attr("axis", 1, &[]));
    let ones = |dims: Vec<i64>| {
        let mut t = TensorProto::new();
        t.name = "u".into();
        t.data_type = 1;
        t.float_data = vec![1.0; dims.iter().product::<i64>() as usize];
        t.dims = dims;
        t
    };
    let cases: Vec<(onnx_protobuf::NodeProto, TensorProto, Vec<i64>, Vec<i64>, Result<Vec<f32>, &str>)> = vec![
        (scatter_nd(""), ones(vec![2, 3]), vec![2, 1], vec![1, 4], Err("ScatterND_0")),
        (scatter_nd(""), ones(vec![2, 3]), vec![2, 1], vec![1, -5], Err("ScatterND_0")),
        (elements.clone(), ones(vec![1, 2]), vec![1, 2], vec![0, 3], Err("ScatterElements_0")),
        (
            scatter_nd("add"),
            ones(vec![2, 3]),
            vec![2, 1],
            vec![1, 1],
            Ok(vec![0., 1., 2., 5., 6., 7., 6., 7., 8., 9., 10., 11.]),
        ),
        (
            elements,
            ones(vec![1, 2]),
            vec![1, 2],
            vec![2, -1],
            Ok(vec![0., 1., 1., 3., 4., 5., 6., 7., 8., 9., 10., 11.]),
        ),
    ];
    for (i, (n, updates, index_shape, indices, want)) in cases.into_iter().enumerate() {
        let dir = tempdir(&format!("scatter-{i}"));
        let mut g = GraphProto::new();
        g.name = "g".into();
        g.input.push(value_info("x", 1, &[4, 3]));
        g.input.push(value_info("i", 7, &index_shape));
        g.output.push(value_info("y", 1, &[4, 3]));
        g.node.push(n);
        g.initializer.push(updates);
        let path = write_model(&dir, &model(g));
        let index = Tensor::from_vec(index_shape.iter().map(|&d| d as usize).collect::<Vec<_>>(), indices.clone());
        for backend in &backends {
            let opts = egret::CompileOptions { backend: *backend, ..Default::default() };
            let m = egret::compile(&path, &opts).unwrap_or_else(|e| panic!("{i} {backend:?}: {e}"));
            let got = m.run(vec![("x".into(), x.clone()), ("i".into(), index.clone())]);
            match (&want, got) {
                (Ok(v), Ok(outs)) => assert_eq!(outs[0].1.as_f32().unwrap(), v.as_slice(), "{i} {backend:?}"),
                (Err(name), Err(e)) => {
                    let e = e.to_string();
                    assert!(e.contains(name) && e.contains("out of range"), "{i} {backend:?}: {e}");
                }
                (w, g) => panic!("{i} {backend:?} {indices:?}: expected {w:?}, got {:?}", g.map(|o| o[0].1.clone())),
            }
        }
    }
    // TopK's k past its axis, refused at compile time with the node named.
    let dir = tempdir("top-k");
    let mut g = GraphProto::new();
    g.name = "g".into();
    g.input.push(value_info("x", 1, &[4, 3]));
    g.output.push(value_info("v", 1, &[]));
    g.output.push(value_info("k_i", 7, &[]));
    g.node.push(node("TopK", &["x", "k"], &["v", "k_i"]));
    g.initializer.push(ints("k", vec![1], vec![5]));
    let err = run_fails(&write_model(&dir, &model(g)));
    assert!(err.contains("TopK_0") && err.contains("5"), "{err}");
}
