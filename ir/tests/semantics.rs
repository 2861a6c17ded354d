//! Spot checks of reference semantics that the ONNX node suite does not pin down.

use egret_ir::{eval_op, op::PadMode, Op, Tensor};

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v.to_vec())
}

#[test]
fn slice_with_a_negative_step_walks_backwards() {
    let x = f32s(&[2, 4], &[0., 1., 2., 3., 4., 5., 6., 7.]);
    let op = Op::Slice {
        starts: egret_ir::dims_of_ints(&[1, 3]).unwrap(),
        ends: egret_ir::dims_of_ints(&[-1, -1]).unwrap(),
        steps: vec![-1, -2],
    };
    let y = &eval_op(&op, &[&x]).unwrap()[0];
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(y.as_f32().unwrap(), &[7., 5., 3., 1.]);
}

#[test]
fn out_of_range_indices_are_errors() {
    let x = f32s(&[3], &[1., 2., 3.]);
    let idx = Tensor::from_vec(vec![1], vec![-4i64]);
    let err = eval_op(&Op::Gather { axis: 0 }, &[&x, &idx]).unwrap_err();
    assert!(err.contains("index -4 is out of range"), "{err}");
    let idx = Tensor::from_vec(vec![1, 1], vec![3i64]);
    let upd = f32s(&[1], &[9.]);
    assert!(eval_op(&Op::ScatterND { reduction: egret_ir::op::Reduction::None }, &[&x, &idx, &upd]).is_err());
}

#[test]
fn integer_division_by_zero_is_an_error() {
    let a = Tensor::from_vec(vec![2], vec![4i32, 5]);
    let b = Tensor::from_vec(vec![2], vec![2i32, 0]);
    assert!(eval_op(&Op::Div, &[&a, &b]).unwrap_err().contains("division by zero"));
    assert!(eval_op(&Op::Mod { fmod: false }, &[&a, &b]).is_err());
}

#[test]
fn reflect_pad_mirrors_without_repeating_the_edge() {
    let x = f32s(&[3], &[1., 2., 3.]);
    let y = &eval_op(&Op::Pad { pads: vec![2, 2], mode: PadMode::Reflect }, &[&x]).unwrap()[0];
    assert_eq!(y.as_f32().unwrap(), &[3., 2., 1., 2., 3., 2., 1.]);
}

#[test]
fn softmax_is_stable_for_large_logits() {
    let x = f32s(&[3], &[1000., 1000., -1000.]);
    let y = &eval_op(&Op::Softmax { axis: 0 }, &[&x]).unwrap()[0];
    assert_eq!(y.as_f32().unwrap(), &[0.5, 0.5, 0.0]);
}

/// The fused norms keep their statistics in f64 but round the variance to
/// the tensor's type, so a row whose squares overflow f32 normalises as the
/// exporters' decomposed form (ReduceMean of Pow) and onnxruntime do: the
/// variance is inf and the row becomes the bias. Found by fuzzing: a 1e30 in
/// a weight made the fused reference disagree with every other backend.
#[test]
fn a_norm_whose_variance_overflows_f32_gives_the_bias() {
    let x = f32s(&[1, 4], &[1e30, 1., 2., 3.]);
    let (scale, bias) = (f32s(&[4], &[1., 2., 3., 4.]), f32s(&[4], &[0.5, -0.5, 0.25, 0.]));
    let norm = Op::LayerNorm { axis: 1, epsilon: 1e-5 };
    let y = &eval_op(&norm, &[&x, &scale, &bias]).unwrap()[0];
    assert_eq!(y.as_f32().unwrap(), bias.as_f32().unwrap());
    let rms = Op::RmsNorm { axis: 1, epsilon: 1e-5 };
    let y = &eval_op(&rms, &[&x, &scale, &bias]).unwrap()[0];
    assert_eq!(y.as_f32().unwrap(), bias.as_f32().unwrap());
    // The decomposed form: x - mean over sqrt(mean((x - mean)^2) + eps).
    let mean = &eval_op(&Op::Reduce { kind: egret_ir::op::ReduceKind::Mean, axes: vec![1], keepdims: true }, &[&x])
        .unwrap()[0];
    let centred = &eval_op(&Op::Sub, &[&x, mean]).unwrap()[0];
    let square = &eval_op(&Op::Mul, &[centred, centred]).unwrap()[0];
    assert!(square.as_f32().unwrap()[0].is_infinite());
}

/// A graph over a symbolic dim prints and parses back, and binding the
/// symbol checks what the slice assumed of it.
#[test]
fn symbolic_graphs_print_parse_and_bind() {
    use egret_ir::{DType, Dim, Graph, Type};
    let n = Dim::symbol("n");
    let mut g = Graph::new();
    let x = g.add_input("x", Type::new(DType::F32, [Dim::symbol("batch"), n]));
    let two = Dim::new(2);
    let tail = g
        .add(
            Op::Slice { starts: vec![Dim::new(0), two], ends: vec![Dim::symbol("batch"), n], steps: vec![1, 1] },
            &[x],
            "tail",
        )
        .unwrap();
    let flat = g
        .add(
            Op::Reshape { shape: vec![Dim::symbol("batch").checked_mul(n.checked_sub(two).unwrap()).unwrap()] },
            &[tail],
            "flat",
        )
        .unwrap();
    g.set_output("y", flat);
    assert_eq!(g.ty(flat).to_string(), "f32[batch*n - 2*batch]");
    let text = egret_ir::text::print(&g);
    let back = egret_ir::text::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(egret_ir::text::print(&back), text);
    assert_eq!(g.symbols(), vec!["batch", "n"]);

    let bound = g.bind(&|s| Some(if s == "n" { 5 } else { 2 })).unwrap();
    assert!(bound.is_bound());
    let y = bound.outputs()[0].1;
    assert_eq!(bound.ty(y).sizes(), vec![6]);
    let x = Tensor::from_vec(vec![2, 5], (0..10).map(|i| i as f32).collect::<Vec<_>>());
    let sliced = &eval_op(&bound.node(bound.producer(bound.node(bound.producer(y)).inputs[0])).op, &[&x]).unwrap()[0];
    assert_eq!(sliced.as_f32().unwrap(), &[2., 3., 4., 7., 8., 9.]);
    // The slice assumed n >= 2.
    let err = g.bind(&|s| Some(if s == "n" { 1 } else { 2 })).unwrap_err();
    assert!(err.to_string().contains("tail") && err.to_string().contains("outside"), "{err}");
}
