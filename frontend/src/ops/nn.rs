//! Neural-network ops: contractions, convolution, pooling, normalisation,
//! softmax, reductions.

use super::math::scalar_like;
use crate::context::{BuildResult, NodeCtx};
use crate::registry::Registry;
use crate::ImportError;
use egret_ir::op::ReduceKind;
use egret_ir::{DType, Dim, Op, Tensor, ValueId};

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
    r.insert("Attention", attention);
    r.insert("RotaryEmbedding", rotary_embedding);
    r.insert("Conv", conv);
    r.insert("ConvTranspose", conv_transpose);
    r.insert("MaxPool", |c| pool(c, true));
    r.insert("AveragePool", |c| pool(c, false));
    r.insert("LpPool", lp_pool);
    r.insert("GroupNormalization", group_norm);
    r.insert("LRN", lrn);
    r.insert("LpNormalization", |c| {
        // x over its L1 or L2 norm along `axis`; a zero norm (every x
        // zero) divides by one, giving zeros, as ONNX's reference does.
        let x = c.req(0)?;
        let axis = c.axis(c.i("axis", -1)?, c.rank(x))?;
        let kind = match c.i("p", 2)? {
            1 => ReduceKind::L1,
            2 => ReduceKind::L2,
            p => return Err(c.err(format!("p = {p}; it must be 1 or 2"))),
        };
        let norm = c.add(Op::Reduce { kind, axes: vec![axis], keepdims: true }, &[x])?;
        let (zero, one) = (scalar_like(c, x, 0.0)?, scalar_like(c, x, 1.0)?);
        let empty = c.add(Op::Equal, &[norm, zero])?;
        let norm = c.add(Op::Where, &[empty, one, norm])?;
        c.add_node(Op::Div, &[x, norm])
    });
    r.insert("MeanVarianceNormalization", |c| {
        // ONNX's function body: (x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9).
        let x = c.req(0)?;
        let r = c.rank(x);
        let axes = c.axes(&c.ints("axes")?.unwrap_or_else(|| vec![0, 2, 3]), r)?;
        let mean = |c: &mut NodeCtx, v: ValueId| {
            c.add(Op::Reduce { kind: ReduceKind::Mean, axes: axes.clone(), keepdims: true }, &[v])
        };
        let m = mean(c, x)?;
        let square = c.add(Op::Mul, &[x, x])?;
        let mean_square = mean(c, square)?;
        let square_mean = c.add(Op::Mul, &[m, m])?;
        let variance = c.add(Op::Sub, &[mean_square, square_mean])?;
        let std = c.add(Op::Sqrt, &[variance])?;
        let epsilon = scalar_like(c, x, 1e-9)?;
        let std = c.add(Op::Add, &[std, epsilon])?;
        let centred = c.add(Op::Sub, &[x, m])?;
        c.add_node(Op::Div, &[centred, std])
    });
    r.insert("AffineGrid", affine_grid);
    r.insert("GlobalAveragePool", |c| global_pool(c, ReduceKind::Mean));
    r.insert("GlobalMaxPool", |c| global_pool(c, ReduceKind::Max));
    r.insert("Softmax", |c| softmax_like(c, |axis| Op::Softmax { axis }));
    r.insert("LogSoftmax", |c| softmax_like(c, |axis| Op::LogSoftmax { axis }));
    r.insert("Hardmax", |c| softmax_like(c, |axis| Op::Hardmax { axis }));
    r.insert("NegativeLogLikelihoodLoss", |c| {
        let (input, target) = (c.req(0)?, c.req(1)?);
        let weight = c.input(2);
        Ok(vec![nll_loss(c, input, target, weight)?])
    });
    r.insert("SoftmaxCrossEntropyLoss", |c| {
        let (scores, labels) = (c.req(0)?, c.req(1)?);
        if c.rank(scores) < 2 {
            return Err(c.err(format!("scores are {}; they need a class axis (N, C, ...)", c.ty(scores))));
        }
        let log_prob = c.add(Op::LogSoftmax { axis: 1 }, &[scores])?;
        let weight = c.input(2);
        let loss = nll_loss(c, log_prob, labels, weight)?;
        Ok(if c.num_outputs() > 1 { vec![loss, log_prob] } else { vec![loss] })
    });
    r.insert("LayerNormalization", |c| norm(c, false));
    r.insert("RMSNormalization", |c| norm(c, true));
    r.insert("BatchNormalization", |c| {
        let epsilon = c.f("epsilon", 1e-5)?;
        c.ignore_attr("momentum"); // Only used in training.
        if c.flag("training_mode", false)? || c.num_outputs() > 1 {
            return Err(c.err("training mode is not supported"));
        }
        if c.opset() < 9 {
            if !c.flag("spatial", true)? {
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
    let (ta, tb) = (c.flag("transA", false)?, c.flag("transB", false)?);
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
fn window(c: &NodeCtx, in_sp: &[usize], kernel: Vec<usize>) -> Result<PoolWindow, ImportError> {
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
    let ws = c.sizes(w)?;
    if xs.len() < 3 || ws.len() != xs.len() {
        return Err(c.err(format!("input {xs:?} and weight {ws:?} do not describe a convolution")));
    }
    // The batch may be symbolic; the window is placed over known spatial dims.
    let in_sp = egret_ir::ops::sizes(&xs[2..], "the input's spatial dims").map_err(|m| c.err(m))?;
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
    let (_, strides, pads, dilations) = window(c, &in_sp, kernel)?;
    let mut inputs = vec![x, w];
    inputs.extend(c.input(2));
    c.add_node(Op::Conv { strides, pads, dilations, group: group as usize }, &inputs)
}

/// `ConvTranspose` as the convolution it equals: the input spread out by
/// the strides (`s - 1` zeros between neighbours), padded by `d (k - 1)`
/// less the pads on each side (cropped where that is negative, extended at
/// the end by `output_padding` or to `output_shape`), convolved at stride
/// 1 with the kernel flipped and its channels swapped within each group.
/// The input's sizes must be known (the zeros that spread it are a
/// constant).
fn conv_transpose(c: &mut NodeCtx) -> BuildResult {
    let (x, w) = (c.req(0)?, c.req(1)?);
    let xs = c.sizes(x)?;
    let ws = c.sizes(w)?;
    let rank = xs.len();
    if rank < 3 || ws.len() != rank {
        return Err(c.err(format!("input {xs:?} and weight {ws:?} do not describe a transposed convolution")));
    }
    let sp = rank - 2;
    let group =
        usize::try_from(c.i("group", 1)?).ok().filter(|&g| g > 0).ok_or_else(|| c.err("group must be positive"))?;
    if ws[0] != xs[1] || xs[1] % group != 0 {
        return Err(
            c.err(format!("weight {ws:?} takes {} channels in {group} group(s); the input has {}", ws[0], xs[1]))
        );
    }
    let kernel = &ws[2..];
    if let Some(k) = c.ints("kernel_shape")? {
        if k.iter().map(|&v| v as usize).ne(kernel.iter().copied()) {
            return Err(c.err(format!("kernel_shape {k:?} disagrees with weight {ws:?}")));
        }
    }
    let list = |c: &NodeCtx, name: &str, len: usize, default: i64| -> Result<Vec<i64>, ImportError> {
        let v = c.ints(name)?.unwrap_or(vec![default; len]);
        if v.len() != len {
            return Err(c.err(format!("{name} {v:?} needs {len} entries")));
        }
        Ok(v)
    };
    let strides = list(c, "strides", sp, 1)?;
    let dilations = list(c, "dilations", sp, 1)?;
    let output_padding = list(c, "output_padding", sp, 0)?;
    if strides.iter().chain(&dilations).any(|&v| v < 1) || output_padding.iter().any(|&v| v < 0) {
        return Err(c.err("strides and dilations must be positive, output_padding not negative"));
    }
    let output_shape = c.ints("output_shape")?;
    if output_shape.as_ref().is_some_and(|o| o.len() != sp || o.iter().any(|&v| v < 0)) {
        return Err(c.err(format!("output_shape {output_shape:?} needs {sp} sizes")));
    }
    let auto_pad = c.s("auto_pad", "NOTSET")?;
    let given_pads = c.ints("pads")?;
    // Each spatial axis: the size of the spread input, its pads before
    // and after, and the output's size.
    let mut pads = vec![0i64; 2 * sp];
    for i in 0..sp {
        let (l, k, s, d) = (xs[2 + i] as i64, kernel[i] as i64, strides[i], dilations[i]);
        let natural = s * (l - 1) + output_padding[i] + (k - 1) * d + 1;
        let (begin, end) = match (&given_pads, auto_pad.as_str()) {
            (None, "SAME_UPPER" | "SAME_LOWER") => {
                let out = output_shape.as_ref().map_or(l * s, |o| o[i]);
                let total = natural - out;
                let half = total.div_euclid(2);
                if auto_pad == "SAME_UPPER" {
                    (half, total - half)
                } else {
                    (total - half, half)
                }
            }
            (Some(p), "NOTSET" | "VALID") if p.len() == 2 * sp => (p[i], p[i + sp]),
            (Some(p), "NOTSET" | "VALID") => return Err(c.err(format!("pads {p:?} need {} entries", 2 * sp))),
            (None, "NOTSET" | "VALID") => (0, 0),
            (_, other) => return Err(c.err(format!("auto_pad `{other}` is not supported with these pads"))),
        };
        // `output_shape` beyond what the pads give extends the end.
        let extra = match (&output_shape, auto_pad.as_str()) {
            (Some(o), "NOTSET" | "VALID") => o[i] - (natural - begin - end),
            _ => 0,
        };
        let reach = d * (k - 1);
        pads[i] = reach - begin;
        pads[i + sp] = reach - end + output_padding[i] + extra;
    }
    // Spread the input: each strided axis gets `s - 1` zeros after each
    // element (a new axis of one, zeros of `s - 1` joined to it, the two
    // merged), the last ones cut. Layout ops and a concatenation, which
    // every backend runs natively (a `Pad` would not be, on the CPU).
    let dtype = c.ty(x).dtype;
    let mut spread = x;
    let mut shape: Vec<usize> = xs.clone();
    for i in 0..sp {
        let s = strides[i] as usize;
        if s == 1 || shape[2 + i] == 0 {
            continue;
        }
        let a = 2 + i;
        let mut unit = shape.clone();
        unit.insert(a + 1, 1);
        let u = c.add(Op::Reshape { shape: egret_ir::dims_of(&unit) }, &[spread])?;
        let mut gap = unit.clone();
        gap[a + 1] = s - 1;
        let zeros = c.constant(Tensor::zeros(dtype, gap));
        let joined = c.add(Op::Concat { axis: a + 1 }, &[u, zeros])?;
        let mut merged = shape.clone();
        merged[a] *= s;
        let m = c.add(Op::Reshape { shape: egret_ir::dims_of(&merged) }, &[joined])?;
        shape[a] = (shape[a] - 1) * s + 1;
        spread = slice_to(c, m, &merged, &vec![0; rank], &shape)?;
    }
    // Negative pads crop the spread input; the rest pad in the convolution.
    let starts: Vec<usize> = (0..rank).map(|a| if a < 2 { 0 } else { (-pads[a - 2]).max(0) as usize }).collect();
    let ends: Vec<usize> = (0..rank)
        .map(|a| if a < 2 { shape[a] } else { (shape[a] as i64 + pads[a - 2 + sp].min(0)).max(0) as usize })
        .collect();
    if starts.iter().zip(&ends).any(|(s, e)| s > e) {
        return Err(c.err(format!("pads {given_pads:?} crop the input to nothing")));
    }
    let cropped = if starts.iter().any(|&v| v > 0) || ends != shape {
        slice_to(c, spread, &shape, &starts, &ends)?
    } else {
        spread
    };
    let conv_pads: Vec<usize> = pads.iter().map(|&p| p.max(0) as usize).collect();
    // The kernel: [c_in, c_out / g, k...] to [c_out, c_in / g, k...],
    // channels swapped within each group, every spatial axis reversed.
    let (c_in, c_out_g) = (ws[0], ws[1]);
    let mut grouped = vec![group, c_in / group, c_out_g];
    grouped.extend_from_slice(kernel);
    let wg = c.add(Op::Reshape { shape: egret_ir::dims_of(&grouped) }, &[w])?;
    let mut perm = vec![0, 2, 1];
    perm.extend(3..grouped.len());
    let wt = c.add(Op::Transpose { perm }, &[wg])?;
    let mut flat = vec![group * c_out_g, c_in / group];
    flat.extend_from_slice(kernel);
    let mut kernel_w = c.add(Op::Reshape { shape: egret_ir::dims_of(&flat) }, &[wt])?;
    for (i, &k) in kernel.iter().enumerate() {
        if k > 1 {
            let reversed = c.constant(Tensor::from_vec(vec![k], (0..k as i64).rev().collect::<Vec<i64>>()));
            kernel_w = c.add(Op::Gather { axis: 2 + i }, &[kernel_w, reversed])?;
        }
    }
    let mut inputs = vec![cropped, kernel_w];
    inputs.extend(c.input(2));
    let op = Op::Conv {
        strides: vec![1; sp],
        pads: conv_pads,
        dilations: dilations.iter().map(|&d| d as usize).collect(),
        group,
    };
    c.add_node(op, &inputs)
}

/// `x` (of `shape`) sliced to `starts..ends` on every axis.
fn slice_to(
    c: &mut NodeCtx,
    x: ValueId,
    shape: &[usize],
    starts: &[usize],
    ends: &[usize],
) -> Result<ValueId, ImportError> {
    let op =
        Op::Slice { starts: egret_ir::dims_of(starts), ends: egret_ir::dims_of(ends), steps: vec![1; shape.len()] };
    c.add(op, &[x])
}

fn pool(c: &mut NodeCtx, max: bool) -> BuildResult {
    let x = c.req(0)?;
    let (kernel, strides, pads, dilations) = pool_window(c, x)?;
    let ceil_mode = c.flag("ceil_mode", false)?;
    if max {
        if c.flag("storage_order", false)? {
            return Err(c.err("storage_order=1 (column-major indices) is not supported"));
        }
        let outs = c.add_node(Op::MaxPool { kernel, strides, pads, dilations, ceil_mode }, &[x])?;
        Ok(outs)
    } else {
        let count_include_pad = c.flag("count_include_pad", false)?;
        c.add_node(Op::AveragePool { kernel, strides, pads, dilations, ceil_mode, count_include_pad }, &[x])
    }
}

/// A pool's window over `x`'s spatial dims (rank 3 or more): kernel,
/// strides, pads and dilations (`window`), with `kernel_shape` required
/// and positive.
fn pool_window(c: &NodeCtx, x: ValueId) -> Result<PoolWindow, ImportError> {
    let xs = c.ty(x).shape.clone();
    if xs.len() < 3 {
        return Err(c.err(format!("input {} needs rank >= 3", c.ty(x))));
    }
    let in_sp = egret_ir::ops::sizes(&xs[2..], "the input's spatial dims").map_err(|m| c.err(m))?;
    let kernel: Vec<usize> = c
        .ints("kernel_shape")?
        .ok_or_else(|| c.err("kernel_shape is required"))?
        .into_iter()
        .map(|v| usize::try_from(v).unwrap_or(0))
        .collect();
    if kernel.contains(&0) {
        return Err(c.err("kernel_shape must be positive"));
    }
    window(c, &in_sp, kernel)
}

/// Kernel, strides, pads and dilations.
type PoolWindow = (Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>);

/// `LpPool`: each window's `(sum |x|^p)^(1/p)`, as an average pool that
/// counts the pads (zeros, which add nothing to the sum) times the
/// window's size.
fn lp_pool(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let p = c.i("p", 2)?;
    if p <= 0 {
        return Err(c.err(format!("p = {p}; it must be positive")));
    }
    let (kernel, strides, pads, dilations) = pool_window(c, x)?;
    if c.flag("ceil_mode", false)? {
        // A window past the padded input would be averaged over fewer
        // elements, so the average times the window's size is no sum.
        return Err(c.err("ceil_mode=1 is not supported"));
    }
    let size = kernel.iter().product::<usize>() as f64;
    let magnitude = c.add(Op::Abs, &[x])?;
    let exponent = scalar_like(c, x, p as f64)?;
    let powered = c.add(Op::Pow, &[magnitude, exponent])?;
    let pool = Op::AveragePool { kernel, strides, pads, dilations, ceil_mode: false, count_include_pad: true };
    let mean = c.add(pool, &[powered])?;
    let count = scalar_like(c, x, size)?;
    let sum = c.add(Op::Mul, &[mean, count])?;
    let root = scalar_like(c, x, 1.0 / p as f64)?;
    c.add_node(Op::Pow, &[sum, root])
}

/// `AffineGrid`: each output position's normalised coordinates (x, y[, z],
/// 1), a constant for the known `size`, times each batch's `theta`
/// transposed: one batched product.
fn affine_grid(c: &mut NodeCtx) -> BuildResult {
    let theta = c.req(0)?;
    let size = c.need_ints(1, "size")?;
    let align = c.flag("align_corners", false)?;
    let spatial = match size.len() {
        4 | 5 => &size[2..],
        _ => return Err(c.err(format!("size {size:?} must be N, C, H, W or N, C, D, H, W"))),
    };
    let d = spatial.len();
    let t = c.ty(theta).clone();
    if t.rank() != 3
        || t.shape[1] != Dim::new(d)
        || t.shape[2] != Dim::new(d + 1)
        || t.shape[0] != Dim::new(size[0].max(0) as usize)
    {
        return Err(c.err(format!("theta is {t}; size {size:?} needs [{}, {d}, {}]", size[0], d + 1)));
    }
    if spatial.iter().any(|&s| s <= 0) {
        return Err(c.err(format!("size {size:?} has an empty spatial dim")));
    }
    let lens: Vec<usize> = spatial.iter().map(|&s| s as usize).collect();
    // Position i of n along an axis, in -1..1.
    let coord = |i: usize, n: usize| -> f64 {
        match (align, n) {
            (true, 1) => 0.0,
            (true, _) => -1.0 + 2.0 * i as f64 / (n - 1) as f64,
            (false, _) => (2.0 * i as f64 + 1.0) / n as f64 - 1.0,
        }
    };
    let points: usize = lens.iter().product();
    let mut base = Vec::with_capacity(points * (d + 1));
    for at in 0..points {
        // Spatial index (depth, height, width) of `at`; coordinates are
        // listed width first (x, y, z).
        let mut rest = at;
        let mut index = vec![0; d];
        for axis in (0..d).rev() {
            index[axis] = rest % lens[axis];
            rest /= lens[axis];
        }
        for axis in (0..d).rev() {
            base.push(coord(index[axis], lens[axis]));
        }
        base.push(1.0);
    }
    let base = c.constant(Tensor::new(vec![points, d + 1], egret_ir::Data::from_f64s(t.dtype, &base)));
    let theta_t = c.add(Op::Transpose { perm: vec![0, 2, 1] }, &[theta])?;
    let grid = c.add(Op::MatMul, &[base, theta_t])?;
    let mut shape = vec![t.shape[0]];
    shape.extend(lens.iter().map(|&n| Dim::new(n)));
    shape.push(Dim::new(d));
    c.add_node(Op::Reshape { shape }, &[grid])
}

/// `GroupNormalization`: each group of channels normalised over its
/// channels and positions together, then scaled and shifted per channel
/// (opset 21) or per group (opset 18, each group's value repeated over
/// its channels).
fn group_norm(c: &mut NodeCtx) -> BuildResult {
    let (x, scale, bias) = (c.req(0)?, c.req(1)?, c.req(2)?);
    let sizes = c.sizes(x)?;
    let groups = c.i("num_groups", 0)?;
    let epsilon = c.f("epsilon", 1e-5)?;
    c.ignore_attr("stash_type");
    let (n, ch) = match sizes[..] {
        [n, ch, ..] => (n, ch),
        _ => return Err(c.err(format!("input is {}; it needs N, C, ...", c.ty(x)))),
    };
    let g = usize::try_from(groups).ok().filter(|&g| g > 0 && ch % g == 0);
    let Some(g) = g else { return Err(c.err(format!("num_groups {groups} must be positive and divide C {ch}"))) };
    let per_channel = c.opset() >= 21;
    let want = if per_channel { ch } else { g };
    for (v, what) in [(scale, "scale"), (bias, "bias")] {
        if c.sizes(v)? != [want] {
            return Err(c.err(format!(
                "{what} is {}; it needs one value per {} ({want})",
                c.ty(v),
                if per_channel { "channel" } else { "group" }
            )));
        }
    }
    let d = |v: usize| Dim::new(v);
    let rest: usize = sizes[1..].iter().product::<usize>() / g;
    let grouped = c.add(Op::Reshape { shape: vec![d(n), d(g), d(rest)] }, &[x])?;
    let mean = c.add(Op::Reduce { kind: ReduceKind::Mean, axes: vec![2], keepdims: true }, &[grouped])?;
    let centred = c.add(Op::Sub, &[grouped, mean])?;
    let square = c.add(Op::Mul, &[centred, centred])?;
    let variance = c.add(Op::Reduce { kind: ReduceKind::Mean, axes: vec![2], keepdims: true }, &[square])?;
    let epsilon = scalar_like(c, x, epsilon as f64)?;
    let variance = c.add(Op::Add, &[variance, epsilon])?;
    let std = c.add(Op::Sqrt, &[variance])?;
    let normed = c.add(Op::Div, &[centred, std])?;
    let normed = c.add(Op::Reshape { shape: sizes.iter().map(|&v| d(v)).collect() }, &[normed])?;
    // Scale and bias as [C, 1, ...] against [N, C, ...].
    let mut column = vec![d(ch)];
    column.extend(std::iter::repeat_n(d(1), sizes.len() - 2));
    let per_channel_of = |c: &mut NodeCtx, v: ValueId| -> Result<ValueId, ImportError> {
        let v = if per_channel {
            v
        } else {
            let groups_of: Vec<i64> = (0..ch).map(|i| (i / (ch / g)) as i64).collect();
            let index = c.constant(Tensor::from_vec(vec![ch], groups_of));
            c.add(Op::Gather { axis: 0 }, &[v, index])?
        };
        c.add(Op::Reshape { shape: column.clone() }, &[v])
    };
    let (scale, bias) = (per_channel_of(c, scale)?, per_channel_of(c, bias)?);
    let scaled = c.add(Op::Mul, &[normed, scale])?;
    c.add_node(Op::Add, &[scaled, bias])
}

/// `LRN`: `x / (bias + alpha / size * s)^beta`, `s` the sum of squares over
/// the `size` channels about each one (clipped at the ends), as an average
/// pool over the channel axis that counts its pads, times `size`.
fn lrn(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let sizes = c.sizes(x)?;
    let size = c.i("size", 0)?;
    let (alpha, beta, bias) = (c.f("alpha", 1e-4)?, c.f("beta", 0.75)?, c.f("bias", 1.0)?);
    let (n, ch) = match sizes[..] {
        [n, ch, ..] => (n, ch),
        _ => return Err(c.err(format!("input is {}; it needs N, C, ...", c.ty(x)))),
    };
    let Some(size) = usize::try_from(size).ok().filter(|&s| s > 0) else {
        return Err(c.err(format!("size {size} must be positive")));
    };
    let d = |v: usize| Dim::new(v);
    let positions: usize = sizes[2..].iter().product();
    let square = c.add(Op::Mul, &[x, x])?;
    let planes = c.add(Op::Reshape { shape: vec![d(n), d(1), d(ch), d(positions)] }, &[square])?;
    let (before, after) = ((size - 1) / 2, size - 1 - (size - 1) / 2);
    let pool = Op::AveragePool {
        kernel: vec![size, 1],
        strides: vec![1, 1],
        pads: vec![before, 0, after, 0],
        dilations: vec![1, 1],
        ceil_mode: false,
        count_include_pad: true,
    };
    let mean = c.add(pool, &[planes])?;
    let mean = c.add(Op::Reshape { shape: sizes.iter().map(|&v| d(v)).collect() }, &[mean])?;
    // alpha / size * (mean * size) = alpha * mean.
    let alpha = scalar_like(c, x, alpha as f64)?;
    let scaled = c.add(Op::Mul, &[mean, alpha])?;
    let bias = scalar_like(c, x, bias as f64)?;
    let base = c.add(Op::Add, &[scaled, bias])?;
    let beta = scalar_like(c, x, beta as f64)?;
    let denominator = c.add(Op::Pow, &[base, beta])?;
    c.add_node(Op::Div, &[x, denominator])
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
    let dim_err = |e: egret_ir::DimOverflow| c.err(e.to_string());
    let rows = egret_ir::product(&shape[..axis]).map_err(dim_err)?;
    let cols = egret_ir::product(&shape[axis..]).map_err(dim_err)?;
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
    let keepdims = c.flag("keepdims", true)?;
    let noop_with_empty_axes = c.flag("noop_with_empty_axes", false)?;
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
    let keepdims = c.flag("keepdims", true)?;
    let select_last = c.flag("select_last_index", false)?;
    c.add_node(Op::ArgReduce { select_max, axis, keepdims, select_last }, &[x])
}

/// An einsum that is a batched matrix product (attention scores written as
/// `bhid,bhjd->bhij`, a projection as `bsd,df->bsf`) becomes layout ops
/// around a `matmul`, which the compiler fuses and tiles; any other stays
/// an `einsum` (the reference kernel computes it).
fn einsum(c: &mut NodeCtx) -> BuildResult {
    let equation = c.s("equation", "")?;
    let inputs: Vec<ValueId> = (0..c.num_inputs()).map(|i| c.req(i)).collect::<Result<_, _>>()?;
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|&v| c.sizes(v)).collect::<Result<_, _>>()?;
    let Some(plan) = egret_ir::ops::linalg::einsum_as_matmul(&equation, &shapes) else {
        return c.add_node(Op::Einsum { equation }, &inputs);
    };
    let identity = |perm: &[usize]| perm.iter().enumerate().all(|(i, &p)| i == p);
    // Layout ops that would change nothing are left out.
    let reshape = |c: &mut NodeCtx, v: ValueId, shape: &[usize]| -> Result<ValueId, ImportError> {
        if c.ty(v).shape == shape {
            return Ok(v);
        }
        c.add(Op::Reshape { shape: egret_ir::dims_of(&shape.to_vec()) }, &[v])
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

/// ONNX `Attention` (opset 23): scaled dot-product attention over 4D
/// `[batch, heads, seq, head]` or 3D `[batch, seq, heads * head]` inputs,
/// with grouped-query K/V heads, a boolean or additive mask, a causal mask,
/// a KV cache (past keys and values concatenated before the new ones) and a
/// soft cap. It is imported as the primitives of its function body, in the
/// exporters' spelling (q and k^T each scaled by sqrt(scale), a NaN guard
/// for fully masked rows), which the e-graph fuses into one attention.
///
/// Not supported, with an error: `qk_matmul_output_mode` other than 0 when
/// that output is wanted, and opset 24's `nonpad_kv_seqlen`. One difference
/// from the function body: its guard zeroes rows whose mask is all `-inf`,
/// this one rows whose softmax is NaN, which also takes NaN inputs.
fn attention(c: &mut NodeCtx) -> BuildResult {
    let (q, k, v) = (c.req(0)?, c.req(1)?, c.req(2)?);
    let (mask, past_key, past_value) = (c.input(3), c.input(4), c.input(5));
    if c.input(6).is_some() {
        return Err(c.err("input `nonpad_kv_seqlen` is not supported"));
    }
    let is_causal = c.flag("is_causal", false)?;
    let softcap = c.f("softcap", 0.0)?;
    let mode = c.i("qk_matmul_output_mode", 0)?;
    c.ignore_attr("softmax_precision"); // Egret's softmax is f32 throughout.
    if mode != 0 && c.wants_output(3) {
        return Err(c.err(format!("qk_matmul_output_mode {mode} is not supported (only 0, the scaled QK^T)")));
    }
    for (v, name) in [(q, "Q"), (k, "K"), (v, "V")] {
        if c.ty(v).dtype != DType::F32 {
            return Err(c.err(format!("input `{name}` is {}; Attention is supported for f32", c.ty(v).dtype)));
        }
    }
    let rank = c.rank(q);
    if rank != c.rank(k) || rank != c.rank(v) || !(rank == 3 || rank == 4) {
        return Err(c.err("Q, K and V must all be 3D or all be 4D"));
    }
    let (q, k, v) = if rank == 3 {
        let q_heads = c.i("q_num_heads", 0)?;
        let kv_heads = c.i("kv_num_heads", 0)?;
        if q_heads <= 0 || kv_heads <= 0 {
            return Err(c.err("3D inputs need positive `q_num_heads` and `kv_num_heads`"));
        }
        (
            heads_first(c, q, q_heads as usize, "Q")?,
            heads_first(c, k, kv_heads as usize, "K")?,
            heads_first(c, v, kv_heads as usize, "V")?,
        )
    } else {
        // The head counts come from the shapes; the attributes may repeat them.
        c.ignore_attr("q_num_heads");
        c.ignore_attr("kv_num_heads");
        (q, k, v)
    };
    let (qs, ks, vs) = (c.sizes(q)?, c.sizes(k)?, c.sizes(v)?);
    let (batch, q_heads, q_len, head) = (qs[0], qs[1], qs[2], qs[3]);
    let kv_heads = ks[1];
    if ks[0] != batch || vs[0] != batch || vs[1] != kv_heads || ks[2] != vs[2] || ks[3] != head {
        return Err(c.err(format!("Q {qs:?}, K {ks:?} and V {vs:?} do not fit one attention")));
    }
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(c.err(format!("{q_heads} query heads are not a multiple of {kv_heads} key/value heads")));
    }
    // The cache: past keys and values before the new ones.
    let cached = |c: &mut NodeCtx, past: Option<ValueId>, new: ValueId, name: &str| -> Result<ValueId, ImportError> {
        let Some(past) = past else { return Ok(new) };
        let (ps, ns) = (c.sizes(past)?, c.sizes(new)?);
        if ps.len() != 4 || ps[0] != ns[0] || ps[1] != ns[1] || ps[3] != ns[3] {
            return Err(c.err(format!("{name} {ps:?} does not fit the new {ns:?}")));
        }
        c.add(Op::Concat { axis: 2 }, &[past, new])
    };
    let present_key = cached(c, past_key, k, "past_key")?;
    let present_value = cached(c, past_value, v, "past_value")?;
    let past_len = match past_key {
        Some(p) => c.sizes(p)?[2],
        None => 0,
    };
    let total = c.sizes(present_key)?[2];
    if c.sizes(present_value)?[2] != total {
        return Err(c.err("past_key and past_value hold different lengths"));
    }
    // Grouped-query heads: each K/V head serves q_heads / kv_heads query heads.
    let (keys, values) = if q_heads == kv_heads {
        (present_key, present_value)
    } else {
        let group = q_heads / kv_heads;
        let repeat = |c: &mut NodeCtx, x: ValueId| -> Result<ValueId, ImportError> {
            let d = c.sizes(x)?[3];
            let x = c.add(Op::Reshape { shape: egret_ir::dims_of(&vec![batch, kv_heads, 1, total, d]) }, &[x])?;
            let x = c.add(Op::Expand { shape: egret_ir::dims_of(&vec![batch, kv_heads, group, total, d]) }, &[x])?;
            c.add(Op::Reshape { shape: egret_ir::dims_of(&vec![batch, q_heads, total, d]) }, &[x])
        };
        (repeat(c, present_key)?, repeat(c, present_value)?)
    };
    let scale = c.f("scale", 1.0 / (head as f32).sqrt())?;
    // sqrt(scale) on each side, as the function body (onnxruntime refuses
    // a scale that is not positive too: it has no real root).
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(c.err(format!("scale {scale} must be a positive finite number")));
    }
    let root = c.constant(Tensor::from_vec(vec![], vec![scale.sqrt()]));
    let q_scaled = c.add(Op::Mul, &[q, root])?;
    let kt = c.add(Op::Transpose { perm: vec![0, 1, 3, 2] }, &[keys])?;
    let kt_scaled = c.add(Op::Mul, &[kt, root])?;
    let qk = c.add(Op::MatMul, &[q_scaled, kt_scaled])?;
    let mut scores = qk;
    if softcap > 0.0 {
        let cap = c.constant(Tensor::from_vec(vec![], vec![softcap]));
        let x = c.add(Op::Div, &[scores, cap])?;
        let x = c.add(Op::Tanh, &[x])?;
        scores = c.add(Op::Mul, &[x, cap])?;
    }
    let mut bias = match mask {
        None => None,
        Some(m) if c.ty(m).dtype == DType::Bool => {
            let zero = c.constant(Tensor::from_vec(vec![], vec![0f32]));
            let minus_inf = c.constant(Tensor::from_vec(vec![], vec![f32::NEG_INFINITY]));
            Some(c.add(Op::Where, &[m, zero, minus_inf])?)
        }
        Some(m) if c.ty(m).dtype == DType::F32 => Some(m),
        Some(m) => return Err(c.err(format!("attn_mask is {}; it must be bool or f32", c.ty(m).dtype))),
    };
    if let Some(m) = bias {
        if c.ty(m).shape.last() != Some(&egret_ir::Dim::new(total)) {
            return Err(c.err(format!("attn_mask {:?} does not end in the {total} keys", c.ty(m).shape)));
        }
    }
    if is_causal {
        // Query i (at position past_len + i) sees keys 0..=past_len + i.
        let causal: Vec<f32> = (0..q_len * total)
            .map(|x| if x % total > past_len + x / total { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let causal = c.constant(Tensor::from_vec(vec![q_len, total], causal));
        bias = Some(match bias {
            Some(m) => c.add(Op::Add, &[m, causal])?,
            None => causal,
        });
    }
    if let Some(m) = bias {
        scores = c.add(Op::Add, &[scores, m])?;
    }
    let mut probs = c.add(Op::Softmax { axis: 3 }, &[scores])?;
    if bias.is_some() {
        // A row with every key masked has a NaN softmax; its output is 0.
        let nan = c.add(Op::IsNaN, &[probs])?;
        let zero = c.constant(Tensor::from_vec(vec![], vec![0f32]));
        probs = c.add(Op::Where, &[nan, zero, probs])?;
    }
    let mut y = c.add(Op::MatMul, &[probs, values])?;
    if rank == 3 {
        let dv = c.sizes(values)?[3];
        let t = c.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[y])?;
        y = c.add(Op::Reshape { shape: egret_ir::dims_of(&vec![batch, q_len, q_heads * dv]) }, &[t])?;
    }
    Ok(vec![y, present_key, present_value, qk])
}

/// ONNX `RotaryEmbedding` (opset 23): rotates the first `rotary_embedding_dim`
/// features of every head by the angles whose cosines and sines the caches
/// hold, per batch and position (looked up by `position_ids`, or given per
/// batch and position when there are none). Pairs are the two halves of the
/// rotated features, or neighbours with `interleaved`. Imported as the
/// primitives of its function body, without its transposes: the input
/// keeps its layout, `[batch, heads, seq, head]` or `[batch, seq, heads *
/// head]` seen as `[batch, seq, heads, head]`, and the angles broadcast over
/// the heads.
fn rotary_embedding(c: &mut NodeCtx) -> BuildResult {
    let (x, cos, sin) = (c.req(0)?, c.req(1)?, c.req(2)?);
    let position_ids = c.input(3);
    rotate(c, x, cos, sin, position_ids)
}

/// The rotation of `RotaryEmbedding` (opset 23, and onnxruntime's contrib
/// op, which orders its inputs differently), reading the attributes both
/// share: `interleaved`, `num_heads`, `rotary_embedding_dim`.
pub(crate) fn rotate(
    c: &mut NodeCtx,
    x: ValueId,
    cos: ValueId,
    sin: ValueId,
    position_ids: Option<ValueId>,
) -> BuildResult {
    let interleaved = c.flag("interleaved", false)?;
    // A 4D input's shape has the head count; the attribute may repeat it.
    c.ignore_attr("num_heads");
    let heads = if c.rank(x) == 3 { Some(c.i("num_heads", 0)?) } else { None };
    let rotary = c.i("rotary_embedding_dim", 0)?;
    rotate_by(c, x, cos, sin, position_ids, interleaved, heads, rotary)
}

/// `rotate` with its attributes given: `heads` for a 3D input, `rotary`
/// the rotated features of each head (0: all).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rotate_by(
    c: &mut NodeCtx,
    x: ValueId,
    cos: ValueId,
    sin: ValueId,
    position_ids: Option<ValueId>,
    interleaved: bool,
    heads: Option<i64>,
    rotary: i64,
) -> BuildResult {
    for (v, name) in [(x, "input"), (cos, "cos_cache"), (sin, "sin_cache")] {
        if c.ty(v).dtype != DType::F32 {
            return Err(c.err(format!("`{name}` is {}; RotaryEmbedding is supported for f32", c.ty(v).dtype)));
        }
    }
    // Batch and sequence may be symbolic; the head sizes must be known.
    let shape = c.ty(x).shape.clone();
    let known =
        |c: &NodeCtx, d: Dim, what: &str| d.size().ok_or_else(|| c.err(format!("the {what} ({d}) must be known")));
    // The input as [batch, heads, seq, head] or [batch, seq, heads, head],
    // and the axis of the angles' heads (1) in the matching layout.
    let (x4, batch, seq, heads_axis) = match shape.len() {
        4 => (x, shape[0], shape[2], 1),
        3 => {
            let heads = heads.unwrap_or(0);
            let hidden = known(c, shape[2], "hidden size")?;
            if heads <= 0 || hidden % heads as usize != 0 {
                return Err(c.err(format!("3D input {} needs `num_heads` that divides {hidden}", c.ty(x))));
            }
            let heads = heads as usize;
            let split = vec![shape[0], shape[1], Dim::new(heads), Dim::new(hidden / heads)];
            (c.add(Op::Reshape { shape: split }, &[x])?, shape[0], shape[1], 2)
        }
        _ => return Err(c.err(format!("input {} must be 3D or 4D", c.ty(x)))),
    };
    let s4 = c.ty(x4).shape.clone();
    let head = known(c, s4[3], "head size")?;
    let rotary = match rotary {
        0 => head,
        d if d > 0 && d as usize <= head && d % 2 == 0 => d as usize,
        d => return Err(c.err(format!("rotary_embedding_dim {d} must be even and at most the head size {head}"))),
    };
    let half = rotary / 2;
    // The angles per batch and position, [batch, seq, >= half].
    let angles = |c: &mut NodeCtx, cache: ValueId, name: &str| -> Result<ValueId, ImportError> {
        let table = match position_ids {
            Some(ids) => {
                if c.rank(cache) != 2 || c.ty(ids).shape != [batch, seq] {
                    return Err(c.err(format!(
                        "{name} {} must be [positions, features] and position_ids {} [{batch}, {seq}]",
                        c.ty(cache),
                        c.ty(ids)
                    )));
                }
                c.add(Op::Gather { axis: 0 }, &[cache, ids])?
            }
            None => cache,
        };
        let ts = c.ty(table).shape.clone();
        let width = ts.get(2).and_then(|d| d.size());
        if ts.len() != 3 || ts[0] != batch || ts[1] != seq || width.is_none_or(|w| w < half) {
            return Err(c.err(format!("{name} gives angles {}, not [{batch}, {seq}, >= {half}]", c.ty(table))));
        }
        let table = if width == Some(half) { table } else { slice_last(c, table, 0, half, 1)? };
        // One angle per head: a unit axis where the input has its heads.
        let mut broadcast = vec![batch, seq, Dim::new(half)];
        broadcast.insert(heads_axis, Dim::new(1));
        c.add(Op::Reshape { shape: broadcast }, &[table])
    };
    let (cos, sin) = (angles(c, cos, "cos_cache")?, angles(c, sin, "sin_cache")?);
    let (first, second) = if interleaved {
        (slice_last(c, x4, 0, rotary, 2)?, slice_last(c, x4, 1, rotary, 2)?)
    } else {
        (slice_last(c, x4, 0, half, 1)?, slice_last(c, x4, half, rotary, 1)?)
    };
    let (cos_first, sin_second) = (c.add(Op::Mul, &[cos, first])?, c.add(Op::Mul, &[sin, second])?);
    let real = c.add(Op::Sub, &[cos_first, sin_second])?;
    let (sin_first, cos_second) = (c.add(Op::Mul, &[sin, first])?, c.add(Op::Mul, &[cos, second])?);
    let imaginary = c.add(Op::Add, &[sin_first, cos_second])?;
    let rotated = if interleaved {
        // [.., half] pairs side by side as [.., half, 2], read as [.., rotary].
        let mut pair = s4[..3].to_vec();
        pair.extend([Dim::new(half), Dim::new(1)]);
        let real = c.add(Op::Reshape { shape: pair.clone() }, &[real])?;
        let imaginary = c.add(Op::Reshape { shape: pair }, &[imaginary])?;
        let pairs = c.add(Op::Concat { axis: 4 }, &[real, imaginary])?;
        let mut flat = s4[..3].to_vec();
        flat.push(Dim::new(rotary));
        c.add(Op::Reshape { shape: flat }, &[pairs])?
    } else {
        c.add(Op::Concat { axis: 3 }, &[real, imaginary])?
    };
    let y = if rotary == head {
        rotated
    } else {
        let rest = slice_last(c, x4, rotary, head, 1)?;
        c.add(Op::Concat { axis: 3 }, &[rotated, rest])?
    };
    if c.ty(y).shape == shape {
        return Ok(vec![y]);
    }
    c.add_node(Op::Reshape { shape }, &[y])
}

/// `x[.., start..end:step]` along the last axis, the others whole (they
/// may be symbolic).
fn slice_last(c: &mut NodeCtx, x: ValueId, start: usize, end: usize, step: i64) -> Result<ValueId, ImportError> {
    let shape = c.ty(x).shape.clone();
    let last = shape.len() - 1;
    let mut starts = vec![Dim::new(0); shape.len()];
    let mut ends = shape.clone();
    let mut steps = vec![1; shape.len()];
    (starts[last], ends[last], steps[last]) = (Dim::new(start), Dim::new(end), step);
    c.add(Op::Slice { starts, ends, steps }, &[x])
}

/// `[batch, seq, heads * head]` as `[batch, heads, seq, head]`.
fn heads_first(c: &mut NodeCtx, x: ValueId, heads: usize, name: &str) -> Result<ValueId, ImportError> {
    let s = c.sizes(x)?;
    if s[2] % heads != 0 {
        return Err(c.err(format!("{name} {s:?}: {} is not a multiple of {heads} heads", s[2])));
    }
    let x = c.add(Op::Reshape { shape: egret_ir::dims_of(&vec![s[0], s[1], heads, s[2] / heads]) }, &[x])?;
    c.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[x])
}

/// `NegativeLogLikelihoodLoss` (and `SoftmaxCrossEntropyLoss` after its log
/// softmax) as primitives: each element's loss is minus the input at its
/// target class along axis 1, times the class's weight; a target equal to
/// `ignore_index` contributes nothing, to the sum or to the mean's total
/// weight. `reduction` is `none`, `sum` or `mean` (the sum over the total
/// weight of the targets counted).
fn nll_loss(c: &mut NodeCtx, input: ValueId, target: ValueId, weight: Option<ValueId>) -> Result<ValueId, ImportError> {
    let (x, t) = (c.ty(input).clone(), c.ty(target).clone());
    let mut classless = x.shape.clone();
    if x.rank() >= 2 {
        classless.remove(1);
    }
    if x.rank() < 2 || t.shape != classless || !t.dtype.is_int() {
        return Err(c.err(format!(
            "input {x} and target {t}: the target needs an integer class per element of the input less its class axis"
        )));
    }
    let reduction = c.s("reduction", "mean")?;
    if !matches!(reduction.as_str(), "none" | "sum" | "mean") {
        return Err(c.err(format!("reduction `{reduction}` is not one of none, sum, mean")));
    }
    let target = if t.dtype == DType::I64 { target } else { c.add(Op::Cast { to: DType::I64 }, &[target])? };
    // Ignored targets read class 0 (any class would do) and are masked out.
    let kept = match c.has_attr("ignore_index") {
        true => {
            let ignore = c.constant(Tensor::scalar(c.i("ignore_index", 0)?));
            let ignored = c.add(Op::Equal, &[target, ignore])?;
            Some(c.add(Op::Not, &[ignored])?)
        }
        false => None,
    };
    let target = match kept {
        Some(kept) => {
            let zero = c.constant(Tensor::scalar(0i64));
            c.add(Op::Where, &[kept, target, zero])?
        }
        None => target,
    };
    let mut column = t.shape.clone();
    column.insert(1, Dim::new(1));
    let index = c.add(Op::Reshape { shape: column }, &[target])?;
    let picked = c.add(Op::GatherElements { axis: 1 }, &[input, index])?;
    let picked = c.add(Op::Reshape { shape: t.shape.clone() }, &[picked])?;
    let mut loss = c.add(Op::Neg, &[picked])?;
    // Each element's weight: its class's, masked; `None` for all ones.
    let mut weights = match weight {
        Some(w) => Some(c.add(Op::Gather { axis: 0 }, &[w, target])?),
        None => None,
    };
    if let Some(kept) = kept {
        let kept = c.add(Op::Cast { to: x.dtype }, &[kept])?;
        weights = Some(match weights {
            Some(w) => c.add(Op::Mul, &[w, kept])?,
            None => kept,
        });
    }
    if let Some(w) = weights {
        loss = c.add(Op::Mul, &[loss, w])?;
    }
    let all: Vec<usize> = (0..t.rank()).collect();
    let sum = |c: &mut NodeCtx, v: ValueId| {
        c.add(Op::Reduce { kind: ReduceKind::Sum, axes: all.clone(), keepdims: false }, &[v])
    };
    match (reduction.as_str(), weights) {
        ("none", _) => Ok(loss),
        ("sum", _) => sum(c, loss),
        (_, Some(w)) => {
            let (total, weight) = (sum(c, loss)?, sum(c, w)?);
            c.add(Op::Div, &[total, weight])
        }
        (_, None) => c.add(Op::Reduce { kind: ReduceKind::Mean, axes: all.clone(), keepdims: false }, &[loss]),
    }
}
