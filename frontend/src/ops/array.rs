//! Array ops: shapes, slicing, indexing, resampling. Parameters that ONNX
//! passes as tensors (shapes, axes, pads, starts) must be known at compile
//! time; they become static attributes of the IR op.

use crate::context::{BuildResult, NodeCtx};
use crate::registry::Registry;
use crate::ImportError;
use egret_ir::op::{CoordMode, NearestMode, PadMode, Reduction, ResizeMode};
use egret_ir::{shape_text, DType, Data, Dim, Op, Tensor, ValueId};

/// Constants are materialised at compile time; past this size that is a
/// mistake (or an attack), not a model.
const MAX_CONSTANT_ELEMENTS: usize = 1 << 28;

pub fn register(r: &mut Registry) {
    r.insert("Reshape", reshape);
    r.insert("Flatten", |c| {
        let x = c.req(0)?;
        let shape = c.ty(x).shape.clone();
        let a = c.i("axis", 1)?;
        let r = shape.len() as i64;
        if a < -r || a > r {
            return Err(c.err(format!("axis {a} out of range for rank {r}")));
        }
        let a = if a < 0 { a + r } else { a } as usize;
        let dim_err = |e: egret_ir::DimOverflow| c.err(e.to_string());
        let to =
            vec![egret_ir::product(&shape[..a]).map_err(dim_err)?, egret_ir::product(&shape[a..]).map_err(dim_err)?];
        c.add_node(Op::Reshape { shape: to }, &[x])
    });
    r.insert("Squeeze", squeeze);
    r.insert("Unsqueeze", unsqueeze);
    r.insert("Transpose", |c| {
        let x = c.req(0)?;
        let r = c.rank(x);
        let perm = match c.ints("perm")? {
            Some(p) => {
                // A permutation of 0..rank: no negative entries, unlike axes.
                if p.len() != r || p.iter().any(|&a| a < 0 || a >= r as i64) || c.axes(&p, r).is_err() {
                    return Err(c.err(format!("perm {p:?} is not a permutation of 0..{r}")));
                }
                p.iter().map(|&a| a as usize).collect()
            }
            None => (0..r).rev().collect(),
        };
        c.add_node(Op::Transpose { perm }, &[x])
    });
    r.insert("Concat", |c| {
        let inputs: Vec<ValueId> = (0..c.num_inputs()).filter_map(|i| c.input(i)).collect();
        let first = *inputs.first().ok_or_else(|| c.err("needs at least one input"))?;
        let axis = c.axis(
            c.i("axis", 0).and_then(|a| if c.has_attr("axis") { Ok(a) } else { Err(c.err("axis is required")) })?,
            c.rank(first),
        )?;
        c.add_node(Op::Concat { axis }, &inputs)
    });
    r.insert("Split", split);
    r.insert("Slice", slice);
    r.insert("Expand", |c| {
        let x = c.req(0)?;
        let target = c.need_dims(1, "shape")?;
        if target.iter().any(|d| d.is_nonneg() == Some(false)) {
            return Err(c.err(format!("shape {} has a negative dim", shape_text(&target))));
        }
        let out = egret_ir::ops::broadcast_dims(&c.ty(x).shape, &target).map_err(|m| c.err(m))?;
        c.add_node(Op::Expand { shape: out }, &[x])
    });
    r.insert("Tile", |c| {
        let x = c.req(0)?;
        let reps = c.need_ints(1, "repeats")?;
        if reps.iter().any(|&r| r < 0) {
            return Err(c.err(format!("repeats {reps:?} must not be negative")));
        }
        c.add_node(Op::Tile { repeats: reps.into_iter().map(|r| r as usize).collect() }, &[x])
    });
    r.insert("Pad", pad);
    r.insert("Gather", |c| {
        let (x, i) = (c.req(0)?, c.req(1)?);
        let axis = c.axis(c.i("axis", 0)?, c.rank(x))?;
        // A half-precision table (an fp16 model's embeddings) is gathered
        // at its width and only the rows read are widened: the whole table
        // is never held in f32.
        if let Some(t) = c.known_value(x).filter(|t| t.is_derived()) {
            if let Some(half) = t.half() {
                let table = c.constant_at_width(Tensor::new(t.shape().to_vec(), half.clone()));
                let rows = c.add(Op::Gather { axis }, &[table, i])?;
                return c.add_node(Op::Cast { to: DType::F32 }, &[rows]);
            }
        }
        c.add_node(Op::Gather { axis }, &[x, i])
    });
    r.insert("GatherElements", |c| {
        let (x, i) = (c.req(0)?, c.req(1)?);
        let axis = c.axis(c.i("axis", 0)?, c.rank(x))?;
        c.add_node(Op::GatherElements { axis }, &[x, i])
    });
    r.insert("GatherND", |c| {
        let (x, i) = (c.req(0)?, c.req(1)?);
        let batch_dims = c.i("batch_dims", 0)?;
        if batch_dims < 0 {
            return Err(c.err("batch_dims must not be negative"));
        }
        c.add_node(Op::GatherND { batch_dims: batch_dims as usize }, &[x, i])
    });
    r.insert("ScatterND", |c| {
        let reduction = reduction(c)?;
        let (x, i, u) = (c.req(0)?, c.req(1)?, c.req(2)?);
        c.add_node(Op::ScatterND { reduction }, &[x, i, u])
    });
    r.insert("ScatterElements", scatter_elements);
    r.insert("Scatter", scatter_elements);
    r.insert("Shape", |c| {
        let x = c.req(0)?;
        let r = c.rank(x) as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let start = clamp(c.i("start", 0)?);
        let end = clamp(c.i("end", r)?).max(start);
        c.add_node(Op::Shape { start, end }, &[x])
    });
    r.insert("Size", |c| {
        let x = c.req(0)?;
        let ty = c.ty(x).clone();
        if let Some(n) = ty.known_shape().map(|s| s.iter().product::<usize>()) {
            return Ok(vec![c.constant(Tensor::scalar(n as i64))]);
        }
        // A symbolic size: the product of the shape, computed in the graph
        // and known to the importer as its expression.
        let n = ty.numel_dim().map_err(|e| c.err(e.to_string()))?;
        let shape = c.add(Op::Shape { start: 0, end: ty.rank() }, &[x])?;
        let kind = egret_ir::op::ReduceKind::Prod;
        let size = c.add(Op::Reduce { kind, axes: vec![0], keepdims: false }, &[shape])?;
        c.set_known_dims(size, vec![], vec![n]);
        Ok(vec![size])
    });
    r.insert("CenterCropPad", center_crop_pad);
    r.insert("ReverseSequence", reverse_sequence);
    r.insert("MaxUnpool", max_unpool);
    r.insert("EyeLike", |c| {
        // A constant: ones on the diagonal `k` above the main one (below,
        // for a negative `k`), in the input's shape and `dtype` (the
        // input's by default); the input's values are not read.
        let x = c.req(0)?;
        let &[rows, cols] = c.sizes(x)?.as_slice() else {
            return Err(c.err(format!("input is {}; EyeLike takes a 2-d input", c.ty(x))));
        };
        let dtype = match c.has_attr("dtype") {
            true => crate::tensor::dtype_from_onnx(c.i("dtype", 1)? as i32).map_err(|m| c.err(m))?,
            false => c.ty(x).dtype,
        };
        let k = c.i("k", 0)?;
        let on = |i: usize, j: usize| j as i64 - i as i64 == k;
        let values: Vec<f64> = (0..rows * cols).map(|e| if on(e / cols, e % cols) { 1.0 } else { 0.0 }).collect();
        Ok(vec![c.constant(Tensor::new(vec![rows, cols], Data::from_f64s(dtype, &values)))])
    });
    r.insert("ConstantOfShape", |c| {
        let dims = c.need_dims(0, "shape")?;
        if dims.iter().any(|d| d.is_nonneg() == Some(false)) {
            return Err(c.err(format!("shape {} has a negative dim", shape_text(&dims))));
        }
        let value = c.tensor_attr("value")?.unwrap_or_else(|| Tensor::from_vec(vec![1], vec![0f32]));
        if value.numel() != 1 {
            return Err(c.err("value must hold exactly one element"));
        }
        let Some(shape) = egret_ir::known_shape(&dims) else {
            // A symbolic shape: the value broadcast to it, in the graph.
            let scalar = c.constant(Tensor::new(vec![], value.data().clone()));
            return c.add_node(Op::Expand { shape: dims }, &[scalar]);
        };
        let n = egret_ir::Type::new(value.dtype(), shape.clone())
            .checked_numel()
            .filter(|&n| n <= MAX_CONSTANT_ELEMENTS)
            .ok_or_else(|| c.err(format!("shape {shape:?} is too large for a constant")))?;
        let data = value.data().gather(&vec![0; n]);
        Ok(vec![c.constant(Tensor::new(shape, data))])
    });
    r.insert("Range", range);
    r.insert("Trilu", |c| {
        let x = c.req(0)?;
        let upper = c.flag("upper", true)?;
        let k = match c.input(1) {
            Some(_) => *c.need_ints(1, "k")?.first().ok_or_else(|| c.err("k is empty"))?,
            None => 0,
        };
        c.add_node(Op::Trilu { upper, k }, &[x])
    });
    r.insert("CumSum", |c| cumulative(c, false));
    r.insert("CumProd", |c| cumulative(c, true));
    r.insert("TopK", |c| {
        let x = c.req(0)?;
        let k = if c.opset() < 10 {
            c.i("k", 0)?
        } else {
            *c.need_ints(1, "K")?.first().ok_or_else(|| c.err("K is empty"))?
        };
        if k < 0 {
            return Err(c.err(format!("K = {k} must not be negative")));
        }
        let axis = c.axis(c.i("axis", -1)?, c.rank(x))?;
        let largest = c.flag("largest", true)?;
        let sorted = c.flag("sorted", true)?;
        c.add_node(Op::TopK { axis, k: k as usize, largest, sorted }, &[x])
    });
    r.insert("OneHot", |c| {
        let (idx, vals) = (c.req(0)?, c.req(2)?);
        let depth = c.need_known(1, "depth")?.to_f64_vec().first().copied().ok_or_else(|| c.err("depth is empty"))?;
        if depth < 1.0 {
            return Err(c.err(format!("depth {depth} must be positive")));
        }
        let axis = c.axis(c.i("axis", -1)?, c.rank(idx) + 1)?;
        c.add_node(Op::OneHot { axis, depth: depth as usize }, &[idx, vals])
    });
    r.insert("DepthToSpace", |c| {
        let x = c.req(0)?;
        let blocksize = c.i("blocksize", 0)?;
        let mode = c.s("mode", "DCR")?;
        let column_row_depth = match mode.as_str() {
            "DCR" => false,
            "CRD" => true,
            other => return Err(c.err(format!("mode `{other}` is not DCR or CRD"))),
        };
        if blocksize < 1 {
            return Err(c.err("blocksize must be positive"));
        }
        c.add_node(Op::DepthToSpace { blocksize: blocksize as usize, column_row_depth }, &[x])
    });
    r.insert("SpaceToDepth", |c| {
        let x = c.req(0)?;
        let blocksize = c.i("blocksize", 0)?;
        if blocksize < 1 {
            return Err(c.err("blocksize must be positive"));
        }
        let b = blocksize as usize;
        match c.s("mode", "DCR")?.as_str() {
            "DCR" => c.add_node(Op::SpaceToDepth { blocksize: b }, &[x]),
            // Channels outermost, then the block's rows and columns:
            // [n, c, h/b, b, w/b, b] -> [n, c, b, b, h/b, w/b].
            "CRD" => {
                let &[n, ch, h, w] = c.sizes(x)?.as_slice() else {
                    return Err(c.err(format!("input is {}; SpaceToDepth takes N, C, H, W", c.ty(x))));
                };
                if h % b != 0 || w % b != 0 {
                    return Err(c.err(format!("H {h} and W {w} must be multiples of blocksize {b}")));
                }
                let d = |v: usize| Dim::new(v);
                let split = c.add(Op::Reshape { shape: vec![d(n), d(ch), d(h / b), d(b), d(w / b), d(b)] }, &[x])?;
                let moved = c.add(Op::Transpose { perm: vec![0, 1, 3, 5, 2, 4] }, &[split])?;
                c.add_node(Op::Reshape { shape: vec![d(n), d(ch * b * b), d(h / b), d(w / b)] }, &[moved])
            }
            other => Err(c.err(format!("mode `{other}` is not DCR or CRD"))),
        }
    });
    r.insert("HannWindow", |c| window_function(c, [0.5, 0.5, 0.0]));
    r.insert("HammingWindow", |c| window_function(c, [25.0 / 46.0, 21.0 / 46.0, 0.0]));
    r.insert("BlackmanWindow", |c| window_function(c, [0.42, 0.5, 0.08]));
    r.insert("Resize", |c| resize(c, "half_pixel", "round_prefer_floor"));
    // Deprecated at opset 10 for Resize, which it is with opset 10's
    // defaults: asymmetric coordinates, nearest rounding down.
    r.insert("Upsample", |c| resize(c, "asymmetric", "floor"));
}

fn reshape(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let allowzero = c.flag("allowzero", false)?;
    let spec = c.need_dims(1, "shape")?;
    let in_shape = c.ty(x).shape.clone();
    // Over symbolic dims, a reshape the algebra cannot prove may still hold for their values.
    let symbolic = egret_ir::known_shape(&in_shape).is_none() || spec.iter().any(|d| !d.is_known());
    let hint = if symbolic { format!(" {}", egret_ir::BIND_DIMS_HINT) } else { String::new() };
    let bad = |c: &NodeCtx| c.err(format!("cannot reshape {} to {}{hint}", shape_text(&in_shape), shape_text(&spec)));
    let mut out = Vec::with_capacity(spec.len());
    let mut infer_at = None;
    for (i, &d) in spec.iter().enumerate() {
        match d.known() {
            Some(0) if !allowzero => {
                out.push(*in_shape.get(i).ok_or_else(|| {
                    c.err(format!("shape {} copies dim {i}, which the input lacks", shape_text(&spec)))
                })?)
            }
            Some(-1) if infer_at.is_none() => {
                infer_at = Some(i);
                out.push(Dim::new(1));
            }
            Some(v) if v < 0 => return Err(c.err(format!("shape {} is invalid", shape_text(&spec)))),
            _ => out.push(d),
        }
    }
    let n = egret_ir::product(&in_shape).map_err(|e| c.err(e.to_string()))?;
    if let Some(i) = infer_at {
        let rest = egret_ir::product(&out).map_err(|e| c.err(e.to_string()))?;
        // The inferred dim must be exact for every value of the symbols.
        out[i] = n.div_exact(rest).ok_or_else(|| bad(c))?;
    }
    if egret_ir::product(&out).ok() != Some(n) {
        return Err(bad(c));
    }
    c.add_node(Op::Reshape { shape: out }, &[x])
}

/// Axes from the input (opset >= 13) or the attribute (older).
fn axes_param(c: &NodeCtx) -> Result<Option<Vec<i64>>, ImportError> {
    if c.opset() >= 13 {
        match c.input(1) {
            Some(_) => Ok(Some(c.need_ints(1, "axes")?)),
            None => Ok(None),
        }
    } else {
        c.ints("axes")
    }
}

fn squeeze(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let shape = c.ty(x).shape.clone();
    let axes = match axes_param(c)? {
        Some(a) => c.axes(&a, shape.len())?,
        // Without axes, the dims that are 1; a symbolic dim is not assumed to be.
        None => (0..shape.len()).filter(|&i| shape[i] == 1).collect(),
    };
    if let Some(&a) = axes.iter().find(|&&a| shape[a] != 1) {
        return Err(c.err(format!("cannot squeeze axis {a} of {}: it is not 1", shape_text(&shape))));
    }
    let out: Vec<Dim> = shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
    c.add_node(Op::Reshape { shape: out }, &[x])
}

fn unsqueeze(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let shape = c.ty(x).shape.clone();
    let axes = axes_param(c)?.ok_or_else(|| c.err("axes are required"))?;
    let axes = c.axes(&axes, shape.len() + axes.len())?;
    let mut out = Vec::with_capacity(shape.len() + axes.len());
    let mut src = shape.iter();
    for i in 0..shape.len() + axes.len() {
        if axes.contains(&i) {
            out.push(Dim::new(1));
        } else {
            out.push(*src.next().ok_or_else(|| c.err("axes do not fit the output rank"))?);
        }
    }
    c.add_node(Op::Reshape { shape: out }, &[x])
}

fn split(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let shape = c.ty(x).shape.clone();
    let axis = c.axis(c.i("axis", 0)?, shape.len())?;
    let len = shape[axis];
    let explicit = if c.opset() >= 13 {
        match c.input(1) {
            Some(_) => Some(c.need_dims(1, "split")?),
            None => None,
        }
    } else {
        c.ints("split")?
            .map(|s| egret_ir::dims_of_ints(&s).ok_or_else(|| c.err("split sizes are out of range")))
            .transpose()?
    };
    let n_out = if c.opset() >= 18 && c.has_attr("num_outputs") {
        c.i("num_outputs", 0)? as usize
    } else {
        c.node.output.len()
    };
    let sizes: Vec<Dim> = match explicit {
        Some(s) => {
            if s.iter().any(|d| d.is_nonneg() == Some(false)) {
                return Err(c.err(format!("split {} has a negative size", shape_text(&s))));
            }
            s
        }
        None => {
            if n_out == 0 {
                return Err(c.err("no outputs to split into"));
            }
            match len.size() {
                Some(len) => {
                    // Equal parts; with num_outputs the last part may be smaller.
                    let part = len.div_ceil(n_out);
                    let mut sizes = vec![part; n_out];
                    let last = len
                        .checked_sub(part * (n_out - 1))
                        .ok_or_else(|| c.err(format!("cannot split {len} into {n_out} parts")))?;
                    sizes[n_out - 1] = last;
                    if c.opset() < 18 && len % n_out != 0 {
                        return Err(c.err(format!("cannot split {len} evenly into {n_out} parts")));
                    }
                    egret_ir::dims_of(&sizes)
                }
                // A symbolic axis splits into equal parts only if they are exact.
                None => {
                    let part = len
                        .div_exact(Dim::new(n_out))
                        .ok_or_else(|| c.err(format!("cannot split {len} evenly into {n_out} parts")))?;
                    vec![part; n_out]
                }
            }
        }
    };
    c.add_node(Op::Split { axis, sizes }, &[x])
}

/// Bounds past this are "to the end" (exporters write INT_MAX or INT64_MAX,
/// and their negatives): with a symbolic dim they clamp to it.
const OPEN_BOUND: i64 = i32::MAX as i64;

/// One normalised slice bound: negative values count from the end, then the
/// bound is clamped to `lo..=dim + hi_off`. Over a symbolic dim the clamp is
/// assumed to leave an in-range bound alone; `Graph::bind` checks it.
fn slice_bound(v: Dim, dim: Dim, lo: i64, hi_off: i64) -> Option<Dim> {
    let hi = dim.checked_add(Dim::int(hi_off)?).ok()?;
    let Some(k) = v.known() else { return Some(v) };
    if let Some(d) = dim.known() {
        let n = if k < 0 { k.saturating_add(d) } else { k };
        return Dim::int(n.clamp(lo, (d + hi_off).max(lo)));
    }
    if k >= OPEN_BOUND {
        Some(hi)
    } else if k <= -OPEN_BOUND {
        Dim::int(lo)
    } else if k < 0 {
        dim.checked_add(Dim::int(k)?).ok()
    } else {
        Some(v)
    }
}

fn slice(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let shape = c.ty(x).shape.clone();
    let r = shape.len();
    let dims = |v: Vec<i64>, _: &NodeCtx| -> Result<Vec<Dim>, ImportError> {
        Ok(v.into_iter().map(Dim::saturating).collect())
    };
    let (starts, ends, axes, steps) = if c.opset() < 10 {
        let starts = dims(c.ints("starts")?.ok_or_else(|| c.err("starts are required"))?, c)?;
        let ends = dims(c.ints("ends")?.ok_or_else(|| c.err("ends are required"))?, c)?;
        let axes = c.ints("axes")?;
        (starts, ends, axes, None)
    } else {
        let starts = c.need_dims(1, "starts")?;
        let ends = c.need_dims(2, "ends")?;
        let axes = if c.input(3).is_some() { Some(c.need_ints(3, "axes")?) } else { None };
        let steps = if c.input(4).is_some() { Some(c.need_ints(4, "steps")?) } else { None };
        (starts, ends, axes, steps)
    };
    let axes: Vec<i64> = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(c.err("starts, ends, axes and steps must have one length"));
    }
    if r == 0 && !axes.is_empty() {
        return Err(c.err("a scalar has no axis to slice"));
    }
    let axes = c.axes(&axes, r).map(|_| axes.iter().map(|&a| c.axis(a, r)).collect::<Result<Vec<_>, _>>())??;
    let mut st = vec![Dim::new(0); r];
    let mut en: Vec<Dim> = shape.clone();
    let mut sp = vec![1i64; r];
    for (i, &a) in axes.iter().enumerate() {
        let dim = shape[a];
        let step = steps[i];
        if step == 0 {
            return Err(c.err("slice step cannot be 0"));
        }
        let bounds = if dim.known() == Some(0) {
            // An empty axis stays empty whatever the bounds (clamped
            // backwards, `0..=-1`, the start would be 0 and take one).
            (Some(Dim::new(0)), Some(Dim::new(0)))
        } else if step > 0 {
            (slice_bound(starts[i], dim, 0, 0), slice_bound(ends[i], dim, 0, 0))
        } else {
            (slice_bound(starts[i], dim, 0, -1), slice_bound(ends[i], dim, -1, -1))
        };
        let (Some(s), Some(e)) = bounds else {
            return Err(c.err(format!("slice {}..{} of axis {a} ({dim}) is out of range", starts[i], ends[i])));
        };
        st[a] = s;
        en[a] = e;
        // A step past the axis takes its first element only, as the axis's
        // length does: kept at most that (or at most `MAX_ELEMENTS` over a
        // symbolic axis), the view's stride times it cannot overflow.
        let most = dim.known().map_or(egret_ir::MAX_ELEMENTS as i64, |d| d.max(1));
        sp[a] = step.clamp(-most, most);
    }
    c.add_node(Op::Slice { starts: st, ends: en, steps: sp }, &[x])
}

fn pad(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let r = c.rank(x);
    let mode = match c.s("mode", "constant")?.as_str() {
        "constant" => PadMode::Constant,
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        "wrap" => PadMode::Wrap,
        other => return Err(c.err(format!("mode `{other}` is not supported"))),
    };
    let dt = c.ty(x).dtype;
    let (raw, value, axes) = if c.opset() < 11 {
        let pads = c.ints("pads")?.ok_or_else(|| c.err("pads are required"))?;
        let v = c.f("value", 0.0)?;
        let value = c.constant(Tensor::scalar(v as f64).cast(dt));
        (pads, Some(value), None)
    } else {
        let pads = c.need_ints(1, "pads")?;
        let axes = if c.input(3).is_some() { Some(c.need_ints(3, "axes")?) } else { None };
        (pads, c.input(2), axes)
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&v| c.axis(v, r)).collect::<Result<_, _>>()?,
        None => (0..r).collect(),
    };
    if raw.len() != 2 * axes.len() {
        return Err(c.err(format!("pads {raw:?} need 2 entries per padded axis ({})", axes.len())));
    }
    let mut pads = vec![0i64; 2 * r];
    for (i, &a) in axes.iter().enumerate() {
        pads[a] = raw[i];
        pads[a + r] = raw[i + axes.len()];
    }
    let mut inputs = vec![x];
    if mode == PadMode::Constant {
        if let Some(v) = value {
            let v = if c.ty(v).rank() != 0 { c.add(Op::Reshape { shape: vec![] }, &[v])? } else { v };
            inputs.push(v);
        }
    }
    c.add_node(Op::Pad { pads, mode }, &inputs)
}

fn reduction(c: &NodeCtx) -> Result<Reduction, ImportError> {
    Ok(match c.s("reduction", "none")?.as_str() {
        "none" => Reduction::None,
        "add" => Reduction::Add,
        "mul" => Reduction::Mul,
        "max" => Reduction::Max,
        "min" => Reduction::Min,
        other => return Err(c.err(format!("reduction `{other}` is not supported"))),
    })
}

fn scatter_elements(c: &mut NodeCtx) -> BuildResult {
    let (x, i, u) = (c.req(0)?, c.req(1)?, c.req(2)?);
    let axis = c.axis(c.i("axis", 0)?, c.rank(x))?;
    let reduction = reduction(c)?;
    c.add_node(Op::ScatterElements { axis, reduction }, &[x, i, u])
}

/// `Range` has a data-dependent length, so its inputs must be known: then
/// the result is a constant. With a start or limit from symbolic dims (the
/// positions of a decoder's new tokens after a past of symbolic length) and a
/// unit step, it is a `range` op of symbolic length.
fn range(c: &mut NodeCtx) -> BuildResult {
    if let Some(s) = c.input(0) {
        let symbolic = |c: &NodeCtx, i| c.known(i).is_none() && c.need_dims(i, "").is_ok();
        if symbolic(c, 0) || symbolic(c, 1) {
            let (start, limit) = (c.need_dims(0, "start")?[0], c.need_dims(1, "limit")?[0]);
            let delta = c.need_ints(2, "delta")?;
            let len = match delta.as_slice() {
                [1] => limit.checked_sub(start),
                [-1] => start.checked_sub(limit),
                _ => return Err(c.err(format!("a range over symbolic dims needs a step of 1 or -1, not {delta:?}"))),
            }
            .map_err(|e| c.err(e.to_string()))?;
            let d = c.req(2)?;
            return c.add_node(Op::Range { len }, &[s, d]);
        }
    }
    let start = c.need_known(0, "start")?;
    let limit = c.need_known(1, "limit")?;
    let delta = c.need_known(2, "delta")?;
    let dt = start.dtype();
    let (s, l, d) = (start.to_f64_vec()[0], limit.to_f64_vec()[0], delta.to_f64_vec()[0]);
    if d == 0.0 {
        return Err(c.err("delta cannot be 0"));
    }
    let n = ((l - s) / d).ceil().max(0.0) as usize;
    let data = if dt.is_float() {
        // Accumulate in the element type, as the ONNX reference does.
        match dt {
            DType::F32 => Data::F32((0..n).map(|i| s as f32 + i as f32 * d as f32).collect()),
            _ => Data::F64((0..n).map(|i| s + i as f64 * d).collect()),
        }
    } else {
        let (s, d) = (start.to_i64_vec()[0], delta.to_i64_vec()[0]);
        Data::from_i64s(dt, &(0..n as i64).map(|i| s + i * d).collect::<Vec<_>>())
    };
    Ok(vec![c.constant(Tensor::new(vec![n], data))])
}

/// `Resize` (and `Upsample`), with the coordinate and nearest-rounding
/// modes a node that names none takes.
fn resize(c: &mut NodeCtx, default_coord: &str, default_nearest: &str) -> BuildResult {
    let x = c.req(0)?;
    let in_shape = c.sizes(x)?;
    let r = in_shape.len();
    if c.flag("antialias", false)? {
        return Err(c.err("antialias=1 is not supported"));
    }
    let mode = match c.s("mode", "nearest")?.as_str() {
        "nearest" => ResizeMode::Nearest,
        "linear" => ResizeMode::Linear,
        "cubic" => ResizeMode::Cubic,
        other => return Err(c.err(format!("mode `{other}` is not supported"))),
    };
    let coord = match c.s("coordinate_transformation_mode", default_coord)?.as_str() {
        "half_pixel" => CoordMode::HalfPixel,
        "half_pixel_symmetric" => CoordMode::HalfPixelSymmetric,
        "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
        "align_corners" => CoordMode::AlignCorners,
        "asymmetric" => CoordMode::Asymmetric,
        "tf_crop_and_resize" => CoordMode::TfCropAndResize,
        other => return Err(c.err(format!("coordinate_transformation_mode `{other}` is not supported"))),
    };
    let nearest = match c.s("nearest_mode", default_nearest)?.as_str() {
        "round_prefer_floor" => NearestMode::RoundPreferFloor,
        "round_prefer_ceil" => NearestMode::RoundPreferCeil,
        "floor" => NearestMode::Floor,
        "ceil" => NearestMode::Ceil,
        other => return Err(c.err(format!("nearest_mode `{other}` is not supported"))),
    };
    let cubic_coeff_a = c.f("cubic_coeff_a", -0.75)?;
    let exclude_outside = c.flag("exclude_outside", false)?;
    let extrapolation_value = c.f("extrapolation_value", 0.0)?;
    let policy = c.s("keep_aspect_ratio_policy", "stretch")?;
    let axes: Vec<usize> = match c.ints("axes")? {
        Some(a) => a.iter().map(|&v| c.axis(v, r)).collect::<Result<_, _>>()?,
        None => (0..r).collect(),
    };
    // Opset 10 has (X, scales); later (X, roi, scales, sizes).
    let (roi_in, scales_in, sizes_in) =
        if c.opset() < 11 { (None, Some(1), None) } else { (Some(1), Some(2), Some(3)) };
    let present = |i: Option<usize>, c: &NodeCtx| {
        i.filter(|&i| c.input(i).is_some_and(|v| c.ty(v).numel_dim().ok() != Some(Dim::new(0))))
    };
    let mut scales = vec![1f32; r];
    let mut sizes = in_shape.clone();
    if let Some(i) = present(sizes_in, c) {
        let given = c.need_ints(i, "sizes")?;
        if given.len() != axes.len() {
            return Err(c.err(format!("sizes {given:?} need one entry per axis in {axes:?}")));
        }
        let ratio = |k: usize| given[k] as f64 / in_shape[axes[k]] as f64;
        match policy.as_str() {
            "stretch" => {
                for (k, &a) in axes.iter().enumerate() {
                    sizes[a] = given[k] as usize;
                    scales[a] = ratio(k) as f32;
                }
            }
            "not_larger" | "not_smaller" => {
                let rs = (0..axes.len()).map(ratio);
                let s = if policy == "not_larger" { rs.fold(f64::INFINITY, f64::min) } else { rs.fold(0.0, f64::max) };
                for &a in &axes {
                    sizes[a] = (s * in_shape[a] as f64 + 0.5).floor() as usize;
                    scales[a] = s as f32;
                }
            }
            other => return Err(c.err(format!("keep_aspect_ratio_policy `{other}` is not supported"))),
        }
    } else if let Some(i) = present(scales_in, c) {
        let given: Vec<f64> = c.need_known(i, "scales")?.to_f64_vec();
        if given.len() != axes.len() {
            return Err(c.err(format!("scales {given:?} need one entry per axis in {axes:?}")));
        }
        for (k, &a) in axes.iter().enumerate() {
            if given[k] <= 0.0 {
                return Err(c.err(format!("scale {} must be positive", given[k])));
            }
            scales[a] = given[k] as f32;
            sizes[a] = (in_shape[a] as f64 * given[k] as f32 as f64).floor() as usize;
        }
    } else {
        return Err(c.err("needs scales or sizes"));
    }
    let mut roi = vec![];
    if coord == CoordMode::TfCropAndResize {
        let given = match present(roi_in, c) {
            Some(i) => c.need_known(i, "roi")?.to_f64_vec(),
            None => return Err(c.err("tf_crop_and_resize needs roi")),
        };
        if given.len() != 2 * axes.len() {
            return Err(c.err(format!("roi needs 2 entries per axis in {axes:?}")));
        }
        roi = [vec![0f32; r], vec![1f32; r]].concat();
        for (k, &a) in axes.iter().enumerate() {
            roi[a] = given[k] as f32;
            roi[a + r] = given[k + axes.len()] as f32;
        }
    }
    c.add_node(
        Op::Resize { sizes, scales, mode, coord, nearest, cubic_coeff_a, exclude_outside, extrapolation_value, roi },
        &[x],
    )
}

/// `CenterCropPad`: each listed axis cropped to the target length about its
/// centre (the extra element, if odd, taken from the end), or padded with
/// zeros about it (the extra one at the end), as a slice then a pad.
fn center_crop_pad(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let sizes = c.sizes(x)?;
    let r = sizes.len();
    let target = c.need_ints(1, "shape")?;
    let axes: Vec<usize> = match c.ints("axes")? {
        Some(a) => {
            c.axes(&a, r)?; // In range, none repeated.
            a.iter().map(|&v| c.axis(v, r)).collect::<Result<_, _>>()?
        }
        None => (0..r).collect(),
    };
    if target.len() != axes.len() || target.iter().any(|&t| t < 0) {
        return Err(c.err(format!("shape {target:?} needs one length of at least 0 per axis ({})", axes.len())));
    }
    let (mut starts, mut ends) = (vec![Dim::new(0); r], sizes.iter().map(|&d| Dim::new(d)).collect::<Vec<_>>());
    let mut pads = vec![0i64; 2 * r];
    for (&a, &t) in axes.iter().zip(&target) {
        let (have, want) = (sizes[a], t as usize);
        if want < have {
            let start = (have - want) / 2;
            (starts[a], ends[a]) = (Dim::new(start), Dim::new(start + want));
        } else {
            let extra = (want - have) as i64;
            (pads[a], pads[a + r]) = (extra / 2, extra - extra / 2);
        }
    }
    let cropped = c.add(Op::Slice { starts, ends, steps: vec![1; r] }, &[x])?;
    c.add_node(Op::Pad { pads, mode: PadMode::Constant }, &[cropped])
}

/// A window of the known `size` (`HannWindow`, `HammingWindow`,
/// `BlackmanWindow`): `a0 - a1 cos(2 pi n / N) + a2 cos(4 pi n / N)`, with
/// `N` the size (`periodic`, the default) or one less, as a constant of
/// `output_datatype`.
fn window_function(c: &mut NodeCtx, [a0, a1, a2]: [f64; 3]) -> BuildResult {
    let size = c.need_ints(0, "size")?;
    let &[size] = size.as_slice() else { return Err(c.err("size must be one integer")) };
    let n = usize::try_from(size).map_err(|_| c.err(format!("size {size} is negative")))?;
    if n > egret_ir::MAX_ELEMENTS {
        return Err(c.err(format!("size {size} is past the largest tensor Egret takes")));
    }
    let dtype = crate::tensor::dtype_from_onnx(c.i("output_datatype", 1)? as i32).map_err(|m| c.err(m))?;
    let periodic = c.flag("periodic", true)?;
    let span = if periodic { n as f64 } else { n.saturating_sub(1) as f64 };
    let tau = 2.0 * std::f64::consts::PI;
    let values: Vec<f64> = (0..n)
        .map(|i| {
            let x = if span > 0.0 { tau * i as f64 / span } else { 0.0 };
            a0 - a1 * x.cos() + a2 * (2.0 * x).cos()
        })
        .collect();
    Ok(vec![c.constant(Tensor::new(vec![n], Data::from_f64s(dtype, &values)))])
}

/// `ReverseSequence`: along `time_axis`, each batch's first
/// `sequence_lens[b]` elements reversed and the rest kept, as a gather
/// along the time axis from positions `t < len ? len - 1 - t : t`.
fn reverse_sequence(c: &mut NodeCtx) -> BuildResult {
    let (x, lens) = (c.req(0)?, c.req(1)?);
    let sizes = c.sizes(x)?;
    let r = sizes.len();
    if r < 2 {
        return Err(c.err(format!("input is {}; it needs a time and a batch axis", c.ty(x))));
    }
    let time = c.axis(c.i("time_axis", 0)?, r)?;
    let batch = c.axis(c.i("batch_axis", 1)?, r)?;
    if !matches!((time, batch), (0, 1) | (1, 0)) {
        return Err(c.err(format!("time_axis {time} and batch_axis {batch} must be 0 and 1, one each")));
    }
    let (steps, batches) = (sizes[time], sizes[batch]);
    if c.sizes(lens)? != [batches] || !c.ty(lens).dtype.is_int() {
        return Err(c.err(format!("sequence_lens is {}; it needs one integer per batch ({batches})", c.ty(lens))));
    }
    let lens = if c.ty(lens).dtype == DType::I64 { lens } else { c.add(Op::Cast { to: DType::I64 }, &[lens])? };
    let d = |v: usize| Dim::new(v);
    // Positions and lengths laid out as the input's first two axes.
    let (t_shape, len_shape) = if time == 0 {
        (vec![d(steps), d(1)], vec![d(1), d(batches)])
    } else {
        (vec![d(1), d(steps)], vec![d(batches), d(1)])
    };
    let positions = c.constant(Tensor::from_vec(vec![steps], (0..steps as i64).collect::<Vec<i64>>()));
    let t = c.add(Op::Reshape { shape: t_shape }, &[positions])?;
    let len = c.add(Op::Reshape { shape: len_shape }, &[lens])?;
    let inside = c.add(Op::Less, &[t, len])?;
    let one = c.constant(Tensor::scalar(1i64));
    let last = c.add(Op::Sub, &[len, one])?;
    let mirrored = c.add(Op::Sub, &[last, t])?;
    let from = c.add(Op::Where, &[inside, mirrored, t])?;
    let mut lifted: Vec<Dim> = sizes[..2].iter().map(|&v| d(v)).collect();
    lifted.extend(std::iter::repeat_n(d(1), r - 2));
    let from = c.add(Op::Reshape { shape: lifted }, &[from])?;
    let from = c.add(Op::Expand { shape: sizes.iter().map(|&v| d(v)).collect() }, &[from])?;
    c.add_node(Op::GatherElements { axis: time }, &[x, from])
}

/// `MaxUnpool`: zeros of the pooled input's shape (what the kernel,
/// strides and pads give back) with each value of `x` written at its index
/// (a `MaxPool`'s indices, flat over that shape), as a scatter into a flat
/// zero tensor; a larger `output_shape` pads the end of each axis with
/// zeros, as ONNX's reference does.
fn max_unpool(c: &mut NodeCtx) -> BuildResult {
    let (x, indices) = (c.req(0)?, c.req(1)?);
    let sizes = c.sizes(x)?;
    if sizes.len() < 3 || c.sizes(indices)? != sizes || !c.ty(indices).dtype.is_int() {
        return Err(c.err(format!(
            "x is {} and I {}: they need one shape, N, C and spatial dims",
            c.ty(x),
            c.ty(indices)
        )));
    }
    let spatial = sizes.len() - 2;
    let kernel = c.ints("kernel_shape")?.ok_or_else(|| c.err("kernel_shape is required"))?;
    let strides = c.ints("strides")?.unwrap_or_else(|| vec![1; spatial]);
    let pads = c.ints("pads")?.unwrap_or_else(|| vec![0; 2 * spatial]);
    if kernel.len() != spatial || strides.len() != spatial || pads.len() != 2 * spatial {
        return Err(c.err(format!("kernel_shape, strides and pads need {spatial} spatial dims")));
    }
    let mut unpooled = sizes[..2].to_vec();
    for a in 0..spatial {
        let size = (sizes[a + 2] as i64 - 1) * strides[a] - pads[a] - pads[a + spatial] + kernel[a];
        unpooled
            .push(usize::try_from(size).map_err(|_| c.err(format!("the output's spatial dim {a} would be {size}")))?);
    }
    let out: Vec<usize> = match c.input(2) {
        Some(_) => {
            let given = c.need_ints(2, "output_shape")?;
            let out: Option<Vec<usize>> = given.iter().map(|&d| usize::try_from(d).ok()).collect();
            match out {
                Some(out)
                    if out.len() == unpooled.len()
                        && out[..2] == unpooled[..2]
                        && out.iter().zip(&unpooled).all(|(o, u)| o >= u) =>
                {
                    out
                }
                _ => {
                    return Err(c.err(format!("output_shape {given:?} must keep N and C and be at least {unpooled:?}")))
                }
            }
        }
        None => unpooled.clone(),
    };
    let total = unpooled.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&t| t <= egret_ir::MAX_ELEMENTS);
    let Some(total) = total else { return Err(c.err(format!("output shape {unpooled:?} is too large"))) };
    let d = |v: usize| Dim::new(v);
    let numel: usize = sizes.iter().product();
    let zeros = c.constant(Tensor::zeros(c.ty(x).dtype, vec![total]));
    let flat_x = c.add(Op::Reshape { shape: vec![d(numel)] }, &[x])?;
    let flat_i = c.add(Op::Reshape { shape: vec![d(numel)] }, &[indices])?;
    let flat_i = if c.ty(flat_i).dtype == DType::I64 { flat_i } else { c.add(Op::Cast { to: DType::I64 }, &[flat_i])? };
    let scattered = c.add(Op::ScatterElements { axis: 0, reduction: Reduction::None }, &[zeros, flat_i, flat_x])?;
    let y = c.add(Op::Reshape { shape: unpooled.iter().map(|&v| d(v)).collect() }, &[scattered])?;
    if out == unpooled {
        return Ok(vec![y]);
    }
    let r = out.len();
    let mut pad = vec![0i64; 2 * r];
    for a in 0..r {
        pad[a + r] = (out[a] - unpooled[a]) as i64;
    }
    c.add_node(Op::Pad { pads: pad, mode: PadMode::Constant }, &[y])
}

/// `CumSum` and `CumProd`: a running sum or product along the axis given
/// as input 1.
fn cumulative(c: &mut NodeCtx, product: bool) -> BuildResult {
    let x = c.req(0)?;
    let axis = *c.need_ints(1, "axis")?.first().ok_or_else(|| c.err("axis is empty"))?;
    let axis = c.axis(axis, c.rank(x))?;
    let (exclusive, reverse) = (c.flag("exclusive", false)?, c.flag("reverse", false)?);
    let op = match product {
        true => Op::CumProd { axis, exclusive, reverse },
        false => Op::CumSum { axis, exclusive, reverse },
    };
    c.add_node(op, &[x])
}
