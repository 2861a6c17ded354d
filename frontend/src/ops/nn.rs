//! Neural-network ops: contractions, convolution, pooling, normalisation,
//! softmax, reductions.

use crate::context::{BuildResult, NodeCtx};
use crate::registry::Registry;
use crate::ImportError;
use egret_ir::op::ReduceKind;
use egret_ir::{Op, Tensor, ValueId};

const REDUCTIONS: [(&str, ReduceKind); 10] = [
    ("ReduceSum", ReduceKind::Sum),
    ("ReduceMean", ReduceKind::Mean),
    ("ReduceMax", ReduceKind::Max),
    ("ReduceMin", ReduceKind::Min),
    ("ReduceProd", ReduceKind::Prod),
    ("ReduceL1", ReduceKind::L1),
    ("ReduceL2", ReduceKind::L2),
    ("ReduceLogSum", ReduceKind::LogSum),
    ("ReduceLogSumExp", ReduceKind::LogSumExp),
    ("ReduceSumSquare", ReduceKind::SumSquare),
];

pub fn register(r: &mut Registry) {
    r.insert("MatMul", |c| {
        let (a, b) = (c.req(0)?, c.req(1)?);
        c.add_node(Op::MatMul, &[a, b])
    });
    r.insert("Gemm", gemm);
    r.insert("Einsum", einsum);
    r.insert("Conv", conv);
    r.insert("MaxPool", |c| pool(c, true));
    r.insert("AveragePool", |c| pool(c, false));
    r.insert("GlobalAveragePool", |c| global_pool(c, ReduceKind::Mean));
    r.insert("GlobalMaxPool", |c| global_pool(c, ReduceKind::Max));
    r.insert("Softmax", |c| softmax_like(c, |axis| Op::Softmax { axis }));
    r.insert("LogSoftmax", |c| softmax_like(c, |axis| Op::LogSoftmax { axis }));
    r.insert("Hardmax", |c| softmax_like(c, |axis| Op::Hardmax { axis }));
    r.insert("LayerNormalization", |c| norm(c, false));
    r.insert("RMSNormalization", |c| norm(c, true));
    r.insert("BatchNormalization", |c| {
        let epsilon = c.f("epsilon", 1e-5)?;
        c.ignore_attr("momentum"); // Only used in training.
        if c.i("training_mode", 0)? != 0 || c.num_outputs() > 1 {
            return Err(c.err("training mode is not supported"));
        }
        if c.opset() < 9 {
            if c.i("spatial", 1)? != 1 {
                return Err(c.err("spatial=0 is not supported"));
            }
            c.ignore_attr("is_test");
        }
        let inputs: Vec<ValueId> = (0..5).map(|i| c.req(i)).collect::<Result<_, _>>()?;
        c.add_node(Op::BatchNorm { epsilon }, &inputs)
    });
    r.insert("InstanceNormalization", |c| {
        let epsilon = c.f("epsilon", 1e-5)?;
        let inputs: Vec<ValueId> = (0..3).map(|i| c.req(i)).collect::<Result<_, _>>()?;
        c.add_node(Op::InstanceNorm { epsilon }, &inputs)
    });
    for (name, _) in REDUCTIONS {
        r.insert(name, |c| {
            let kind = REDUCTIONS.iter().find(|(n, _)| *n == c.node.op_type).map(|(_, k)| *k);
            reduce(c, kind.expect("registered from REDUCTIONS"))
        });
    }
    r.insert("ArgMax", |c| arg_reduce(c, true));
    r.insert("ArgMin", |c| arg_reduce(c, false));
}

/// `Gemm` lowers to primitives: `alpha * op(A) @ op(B) + beta * C`.
fn gemm(c: &mut NodeCtx) -> BuildResult {
    let alpha = c.f("alpha", 1.0)?;
    let beta = c.f("beta", 1.0)?;
    let (ta, tb) = (c.i("transA", 0)? != 0, c.i("transB", 0)? != 0);
    if c.opset() < 7 {
        c.ignore_attr("broadcast");
    }
    let (mut a, mut b) = (c.req(0)?, c.req(1)?);
    if c.rank(a) != 2 || c.rank(b) != 2 {
        return Err(c.err("A and B must be matrices"));
    }
    if ta {
        a = c.add(Op::Transpose { perm: vec![1, 0] }, &[a])?;
    }
    if tb {
        b = c.add(Op::Transpose { perm: vec![1, 0] }, &[b])?;
    }
    let mut y = c.add(Op::MatMul, &[a, b])?;
    let dt = c.ty(y).dtype;
    if alpha != 1.0 {
        let s = c.constant(Tensor::scalar(alpha as f64).cast(dt));
        y = c.add(Op::Mul, &[y, s])?;
    }
    if let Some(mut bias) = c.input(2) {
        if beta != 1.0 {
            let s = c.constant(Tensor::scalar(beta as f64).cast(dt));
            bias = c.add(Op::Mul, &[bias, s])?;
        }
        y = c.add(Op::Add, &[y, bias])?;
    }
    Ok(vec![y])
}

/// Window geometry shared by conv and pooling: (kernel, strides, pads, dilations).
fn window(
    c: &NodeCtx,
    in_sp: &[usize],
    kernel: Vec<usize>,
) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>), ImportError> {
    let sp = in_sp.len();
    let to_usize = |v: Vec<i64>, what: &str| -> Result<Vec<usize>, ImportError> {
        if v.iter().any(|&x| x < 0) {
            return Err(c.err(format!("{what} {v:?} must not be negative")));
        }
        Ok(v.into_iter().map(|x| x as usize).collect())
    };
    let strides = to_usize(c.ints("strides")?.unwrap_or(vec![1; sp]), "strides")?;
    let dilations = to_usize(c.ints("dilations")?.unwrap_or(vec![1; sp]), "dilations")?;
    let mut pads = to_usize(c.ints("pads")?.unwrap_or(vec![0; 2 * sp]), "pads")?;
    if kernel.len() != sp || strides.len() != sp || dilations.len() != sp || pads.len() != 2 * sp {
        return Err(c.err(format!("kernel/strides/dilations/pads do not describe a {sp}-d window")));
    }
    if strides.contains(&0) || dilations.contains(&0) {
        return Err(c.err("strides and dilations must be positive"));
    }
    let auto_pad = c.s("auto_pad", "NOTSET")?;
    match auto_pad.as_str() {
        "NOTSET" => {}
        "VALID" => pads = vec![0; 2 * sp],
        "SAME_UPPER" | "SAME_LOWER" => {
            for i in 0..sp {
                let out = in_sp[i].div_ceil(strides[i]);
                let span = dilations[i] * (kernel[i] - 1) + 1;
                let total = ((out - 1) * strides[i] + span).saturating_sub(in_sp[i]);
                let small = total / 2;
                let (b, e) = if auto_pad == "SAME_UPPER" { (small, total - small) } else { (total - small, small) };
                pads[i] = b;
                pads[i + sp] = e;
            }
        }
        other => return Err(c.err(format!("auto_pad `{other}` is not supported"))),
    }
    Ok((kernel, strides, pads, dilations))
}

fn conv(c: &mut NodeCtx) -> BuildResult {
    let (x, w) = (c.req(0)?, c.req(1)?);
    let xs = c.ty(x).shape.clone();
    let ws = c.ty(w).shape.clone();
    if xs.len() < 3 || ws.len() != xs.len() {
        return Err(c.err(format!("input {xs:?} and weight {ws:?} do not describe a convolution")));
    }
    let kernel = match c.ints("kernel_shape")? {
        Some(k) => k.into_iter().map(|v| v as usize).collect(),
        None => ws[2..].to_vec(),
    };
    if kernel != ws[2..] {
        return Err(c.err(format!("kernel_shape {kernel:?} disagrees with weight {ws:?}")));
    }
    let group = c.i("group", 1)?;
    if group < 1 {
        return Err(c.err("group must be positive"));
    }
    let (_, strides, pads, dilations) = window(c, &xs[2..], kernel)?;
    let mut inputs = vec![x, w];
    inputs.extend(c.input(2));
    c.add_node(Op::Conv { strides, pads, dilations, group: group as usize }, &inputs)
}

fn pool(c: &mut NodeCtx, max: bool) -> BuildResult {
    let x = c.req(0)?;
    let xs = c.ty(x).shape.clone();
    if xs.len() < 3 {
        return Err(c.err(format!("input {xs:?} needs rank >= 3")));
    }
    let kernel: Vec<usize> = c
        .ints("kernel_shape")?
        .ok_or_else(|| c.err("kernel_shape is required"))?
        .into_iter()
        .map(|v| v as usize)
        .collect();
    if kernel.contains(&0) {
        return Err(c.err("kernel_shape must be positive"));
    }
    let (kernel, strides, pads, dilations) = window(c, &xs[2..], kernel)?;
    let ceil_mode = c.i("ceil_mode", 0)? != 0;
    if max {
        if c.i("storage_order", 0)? != 0 {
            return Err(c.err("storage_order=1 (column-major indices) is not supported"));
        }
        let outs = c.add_node(Op::MaxPool { kernel, strides, pads, dilations, ceil_mode }, &[x])?;
        Ok(outs)
    } else {
        let count_include_pad = c.i("count_include_pad", 0)? != 0;
        c.add_node(Op::AveragePool { kernel, strides, pads, dilations, ceil_mode, count_include_pad }, &[x])
    }
}

fn global_pool(c: &mut NodeCtx, kind: ReduceKind) -> BuildResult {
    let x = c.req(0)?;
    let r = c.rank(x);
    if r < 3 {
        return Err(c.err("input needs rank >= 3"));
    }
    c.add_node(Op::Reduce { kind, axes: (2..r).collect(), keepdims: true }, &[x])
}

/// Softmax, LogSoftmax, Hardmax. Before opset 13 they work on the input
/// flattened to 2-d at `axis` (default 1); from 13 along one axis (default -1).
fn softmax_like(c: &mut NodeCtx, make: fn(usize) -> Op) -> BuildResult {
    let x = c.req(0)?;
    let shape = c.ty(x).shape.clone();
    if c.opset() >= 13 {
        let axis = c.axis(c.i("axis", -1)?, shape.len())?;
        return c.add_node(make(axis), &[x]);
    }
    let axis = c.axis(c.i("axis", 1)?, shape.len())?;
    let rows: usize = shape[..axis].iter().product();
    let cols: usize = shape[axis..].iter().product();
    let flat = c.add(Op::Reshape { shape: vec![rows, cols] }, &[x])?;
    let y = c.add(make(1), &[flat])?;
    c.add_node(Op::Reshape { shape }, &[y])
}

fn norm(c: &mut NodeCtx, rms: bool) -> BuildResult {
    let x = c.req(0)?;
    let axis = c.axis(c.i("axis", -1)?, c.rank(x))?;
    let epsilon = c.f("epsilon", 1e-5)?;
    // stash_type picks the precision of the statistics; Egret's f32 kernels
    // accumulate in f32 or wider either way.
    c.ignore_attr("stash_type");
    let mut inputs = vec![x, c.req(1)?];
    inputs.extend(c.input(2));
    if rms {
        c.add_node(Op::RmsNorm { axis, epsilon }, &inputs)
    } else {
        c.add_node(Op::LayerNorm { axis, epsilon }, &inputs)
    }
}

fn reduce(c: &mut NodeCtx, kind: ReduceKind) -> BuildResult {
    let x = c.req(0)?;
    let rank = c.rank(x);
    let keepdims = c.i("keepdims", 1)? != 0;
    let noop_with_empty_axes = c.i("noop_with_empty_axes", 0)? != 0;
    // Axes moved from an attribute to an input: at opset 13 for ReduceSum, 18 for the rest.
    let axes_as_input = c.opset() >= if kind == ReduceKind::Sum { 13 } else { 18 };
    let axes: Vec<i64> = if axes_as_input {
        match c.input(1) {
            Some(_) => c.need_ints(1, "axes")?,
            None => vec![],
        }
    } else {
        c.ints("axes")?.unwrap_or_default()
    };
    if axes.is_empty() && noop_with_empty_axes {
        return c.add_node(Op::Identity, &[x]);
    }
    let axes = if axes.is_empty() { (0..rank).collect() } else { c.axes(&axes, rank)? };
    c.add_node(Op::Reduce { kind, axes, keepdims }, &[x])
}

fn arg_reduce(c: &mut NodeCtx, select_max: bool) -> BuildResult {
    let x = c.req(0)?;
    let axis = c.axis(c.i("axis", 0)?, c.rank(x))?;
    let keepdims = c.i("keepdims", 1)? != 0;
    let select_last = c.i("select_last_index", 0)? != 0;
    c.add_node(Op::ArgReduce { select_max, axis, keepdims, select_last }, &[x])
}

/// An einsum that is a batched matrix product (attention scores written as
/// `bhid,bhjd->bhij`, a projection as `bsd,df->bsf`) becomes layout ops
/// around a `matmul`, which the compiler fuses and tiles; any other stays
/// an `einsum` (the reference kernel computes it).
fn einsum(c: &mut NodeCtx) -> BuildResult {
    let equation = c.s("equation", "")?;
    let inputs: Vec<ValueId> = (0..c.num_inputs()).map(|i| c.req(i)).collect::<Result<_, _>>()?;
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|&v| c.ty(v).shape.clone()).collect();
    let Some(plan) = egret_ir::ops::linalg::einsum_as_matmul(&equation, &shapes) else {
        return c.add_node(Op::Einsum { equation }, &inputs);
    };
    let identity = |perm: &[usize]| perm.iter().enumerate().all(|(i, &p)| i == p);
    // Layout ops that would change nothing are left out.
    let reshape = |c: &mut NodeCtx, v: ValueId, shape: &[usize]| -> Result<ValueId, ImportError> {
        if c.ty(v).shape == shape {
            return Ok(v);
        }
        c.add(Op::Reshape { shape: shape.to_vec() }, &[v])
    };
    let layout = |c: &mut NodeCtx, v: ValueId, perm: &[usize], shape: &[usize]| -> Result<ValueId, ImportError> {
        let v = if identity(perm) { v } else { c.add(Op::Transpose { perm: perm.to_vec() }, &[v])? };
        reshape(c, v, shape)
    };
    let a = layout(c, inputs[0], &plan.perm_a, &plan.a3)?;
    let b = layout(c, inputs[1], &plan.perm_b, &plan.b3)?;
    let product = c.add(Op::MatMul, &[a, b])?;
    let y = reshape(c, product, &plan.out_dims)?;
    if identity(&plan.perm_out) {
        return Ok(vec![y]);
    }
    c.add_node(Op::Transpose { perm: plan.perm_out.clone() }, &[y])
}
