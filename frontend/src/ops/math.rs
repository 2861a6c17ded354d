//! Elementwise math: unary maps, broadcasting binaries, variadics, casts.

use crate::context::{BuildResult, NodeCtx};
use crate::registry::Registry;
use crate::tensor::{carrier_from_onnx, dtype_to_onnx};
use egret_ir::{Op, RoundMode, Tensor};

pub fn register(r: &mut Registry) {
    macro_rules! unary {
        ($($name:literal => $op:expr),* $(,)?) => {$(
            r.insert($name, |c: &mut NodeCtx| { let x = c.req(0)?; c.add_node($op, &[x]) });
        )*};
    }
    unary! {
        "Abs" => Op::Abs, "Neg" => Op::Neg, "Exp" => Op::Exp, "Log" => Op::Log, "Sqrt" => Op::Sqrt,
        "Reciprocal" => Op::Reciprocal, "Sin" => Op::Sin, "Cos" => Op::Cos, "Tan" => Op::Tan,
        "Asin" => Op::Asin, "Acos" => Op::Acos, "Atan" => Op::Atan, "Sinh" => Op::Sinh, "Cosh" => Op::Cosh,
        "Asinh" => Op::Asinh, "Acosh" => Op::Acosh, "Atanh" => Op::Atanh, "Tanh" => Op::Tanh, "Erf" => Op::Erf,
        "Sigmoid" => Op::Sigmoid, "Relu" => Op::Relu, "Floor" => Op::Floor, "Ceil" => Op::Ceil,
        "Round" => Op::Round, "Sign" => Op::Sign, "Not" => Op::Not, "IsNaN" => Op::IsNaN,
        "Softsign" => Op::Softsign, "Softplus" => Op::Softplus, "HardSwish" => Op::HardSwish,
        "Mish" => Op::Mish, "BitwiseNot" => Op::BitwiseNot,
    }
    macro_rules! binary {
        ($($name:literal => $op:expr),* $(,)?) => {$(
            r.insert($name, |c: &mut NodeCtx| { let (a, b) = (c.req(0)?, c.req(1)?); c.add_node($op, &[a, b]) });
        )*};
    }
    binary! {
        "Add" => Op::Add, "Sub" => Op::Sub, "Mul" => Op::Mul, "Div" => Op::Div, "Pow" => Op::Pow,
        "And" => Op::And, "Or" => Op::Or, "Xor" => Op::Xor, "Equal" => Op::Equal, "Less" => Op::Less,
        "LessOrEqual" => Op::LessOrEqual, "Greater" => Op::Greater, "GreaterOrEqual" => Op::GreaterOrEqual,
        "PRelu" => Op::PRelu, "BitwiseAnd" => Op::BitwiseAnd, "BitwiseOr" => Op::BitwiseOr, "BitwiseXor" => Op::BitwiseXor,
    }
    r.insert("Mod", |c| {
        let fmod = c.flag("fmod", false)?;
        let (a, b) = (c.req(0)?, c.req(1)?);
        c.add_node(Op::Mod { fmod }, &[a, b])
    });
    r.insert("BitShift", |c| {
        let dir = c.s("direction", "")?;
        let left = match dir.as_str() {
            "LEFT" => true,
            "RIGHT" => false,
            other => return Err(c.err(format!("direction must be LEFT or RIGHT, not `{other}`"))),
        };
        let (a, b) = (c.req(0)?, c.req(1)?);
        c.add_node(Op::BitShift { left }, &[a, b])
    });
    r.insert("IsInf", |c| {
        let op = Op::IsInf {
            detect_negative: c.flag("detect_negative", true)?,
            detect_positive: c.flag("detect_positive", true)?,
        };
        let x = c.req(0)?;
        c.add_node(op, &[x])
    });
    r.insert("Elu", |c| unary_with(c, |c| Ok(Op::Elu { alpha: c.f("alpha", 1.0)? })));
    r.insert("Selu", |c| {
        unary_with(c, |c| Ok(Op::Selu { alpha: c.f("alpha", 1.673_263_2)?, gamma: c.f("gamma", 1.050_701)? }))
    });
    r.insert("Celu", |c| unary_with(c, |c| Ok(Op::Celu { alpha: c.f("alpha", 1.0)? })));
    r.insert("LeakyRelu", |c| unary_with(c, |c| Ok(Op::LeakyRelu { alpha: c.f("alpha", 0.01)? })));
    r.insert("HardSigmoid", |c| {
        unary_with(c, |c| Ok(Op::HardSigmoid { alpha: c.f("alpha", 0.2)?, beta: c.f("beta", 0.5)? }))
    });
    r.insert("ThresholdedRelu", |c| unary_with(c, |c| Ok(Op::ThresholdedRelu { alpha: c.f("alpha", 1.0)? })));
    r.insert("Shrink", |c| unary_with(c, |c| Ok(Op::Shrink { bias: c.f("bias", 0.0)?, lambd: c.f("lambd", 0.5)? })));
    r.insert("Gelu", |c| {
        unary_with(c, |c| match c.s("approximate", "none")?.as_str() {
            "none" => Ok(Op::Gelu { approximate_tanh: false }),
            "tanh" => Ok(Op::Gelu { approximate_tanh: true }),
            other => Err(c.err(format!("approximate must be none or tanh, not `{other}`"))),
        })
    });
    // Swish (opset 24) and SwiGLU (opset 28) as their function bodies:
    // x * sigmoid(alpha * x), times `b` for SwiGLU. The e-graph recognises
    // SiLU and the gated form in these primitives.
    r.insert("Swish", |c| {
        let x = c.req(0)?;
        let y = swish(c, x)?;
        Ok(vec![y])
    });
    r.insert("SwiGLU", |c| {
        let (a, b) = (c.req(0)?, c.req(1)?);
        let gate = swish(c, a)?;
        c.add_node(Op::Mul, &[gate, b])
    });
    r.insert("Max", |c| variadic(c, Op::Max));
    r.insert("Min", |c| variadic(c, Op::Min));
    r.insert("Sum", |c| variadic(c, Op::Add));
    r.insert("Mean", |c| {
        let sum = variadic(c, Op::Add)?[0];
        let n = c.num_inputs() as f64;
        let d = scalar_like(c, sum, n)?;
        c.add_node(Op::Div, &[sum, d])
    });
    r.insert("Where", |c| {
        let (k, x, y) = (c.req(0)?, c.req(1)?, c.req(2)?);
        c.add_node(Op::Where, &[k, x, y])
    });
    r.insert("Clip", clip);
    r.insert("Cast", |c| {
        let x = c.req(0)?;
        cast(c, x, c.i("to", 0)? as i32)
    });
    r.insert("CastLike", |c| {
        let (x, like) = (c.req(0)?, c.req(1)?);
        let to = match c.narrow(like) {
            Some(t) => t.onnx_code(),
            None => dtype_to_onnx(c.ty(like).dtype),
        };
        cast(c, x, to)
    });
    r.insert("BitCast", |c| {
        let x = c.req(0)?;
        let (to, narrow) = carrier_from_onnx(c.i("to", 0)? as i32).map_err(|m| c.err(m))?;
        if let Some(t) = narrow.or(c.narrow(x)) {
            return Err(c.err(format!(
                "bit casts of {} are not supported (it is carried in {})",
                t.word(),
                t.carrier()
            )));
        }
        // A half target is computed in f32 like every half value.
        if to.is_half() {
            let bits = c.add(Op::BitCast { to }, &[x])?;
            return c.add_node(Op::Cast { to: egret_ir::DType::F32 }, &[bits]);
        }
        c.add_node(Op::BitCast { to }, &[x])
    });
    r.insert("If", |c| {
        // A condition known at compile time (a shape test, most often, as
        // the exporters write them) picks its branch, whose nodes join this
        // graph; one known only at run time is refused.
        let Some(cond) = c.known(0) else {
            c.req(0)?;
            return Err(
                c.err("the condition is known only at run time; only a condition known when compiling is supported")
            );
        };
        if cond.numel() != 1 {
            return Err(c.err(format!("the condition is {}; it must be one value", cond.ty())));
        }
        let take = cond.to_f64_vec()[0] != 0.0;
        let (name, other) = if take { ("then_branch", "else_branch") } else { ("else_branch", "then_branch") };
        c.graph_attr(other)?;
        let body = c.graph_attr(name)?.ok_or_else(|| c.err(format!("{name} is missing")))?;
        c.inline_body(&body, name)
    });
    r.insert("Identity", |c| {
        let x = c.req(0)?;
        c.add_node(Op::Identity, &[x])
    });
    r.insert("Dropout", |c| {
        // Inference: the identity, with an all-true mask.
        c.ignore_attr("seed");
        if c.opset() < 12 {
            c.ignore_attr("ratio");
        }
        // The ratio input only matters in training mode, refused below.
        c.ignore_input(1);
        if let Some(t) = c.known(2) {
            if t.to_f64_vec().first().copied().unwrap_or(0.0) != 0.0 {
                return Err(c.err("training mode is not supported"));
            }
        } else if c.input(2).is_some() {
            return Err(c.err("training_mode must be a compile-time constant"));
        }
        let x = c.req(0)?;
        let y = c.add(Op::Identity, &[x])?;
        let mut outs = vec![y];
        if c.num_outputs() > 1 {
            let shape = c.sizes(x)?;
            let n = shape.iter().product();
            outs.push(c.constant(Tensor::from_vec(shape, vec![true; n])));
        }
        Ok(outs)
    });
    r.insert("Constant", constant);
}

/// `Cast` of `x` to ONNX element type `code`. Half values are computed in
/// f32 (see `context::widen`): a cast to a half type rounds to it and
/// widens back, keeping its precision and range (overflow to infinity
/// included). A narrow type is carried in a wider one
/// (`egret_ir::narrow`): a cast to it rounds onto its values there.
fn cast(c: &mut NodeCtx, x: egret_ir::ValueId, code: i32) -> BuildResult {
    let (to, narrow) = carrier_from_onnx(code).map_err(|m| c.err(m))?;
    if let Some(t) = narrow {
        let saturate = c.flag("saturate", true)?;
        let round_mode = match c.s("round_mode", "up")?.as_str() {
            "up" => RoundMode::Up,
            "down" => RoundMode::Down,
            "nearest" => RoundMode::Nearest,
            other => return Err(c.err(format!("round_mode `{other}` is not up, down or nearest"))),
        };
        let x = if t.is_float() { c.as_f32(x)? } else { x };
        let y = c.add(Op::CastNarrow { to: t, saturate, round_mode }, &[x])?;
        c.mark_narrow(y, t);
        return Ok(vec![y]);
    }
    // Both only affect casts to narrow types.
    c.ignore_attr("saturate");
    c.ignore_attr("round_mode");
    if to.is_half() {
        let wide = c.as_f32(x)?;
        let narrow = c.add(Op::Cast { to }, &[wide])?;
        return c.add_node(Op::Cast { to: egret_ir::DType::F32 }, &[narrow]);
    }
    if to == egret_ir::DType::F32 && c.ty(x).dtype != to {
        // The f32 twin of a quantized integer, if it has one.
        return Ok(vec![c.as_f32(x)?]);
    }
    c.add_node(Op::Cast { to }, &[x])
}

fn unary_with(c: &mut NodeCtx, make: impl Fn(&NodeCtx) -> Result<Op, crate::ImportError>) -> BuildResult {
    let op = make(c)?;
    let x = c.req(0)?;
    c.add_node(op, &[x])
}

/// Folds a variadic op into a chain of binary ones.
fn variadic(c: &mut NodeCtx, op: Op) -> BuildResult {
    let mut acc = c.req(0)?;
    for i in 1..c.num_inputs() {
        let x = c.req(i)?;
        acc = c.add(op.clone(), &[acc, x])?;
    }
    if c.num_inputs() == 1 {
        acc = c.add(Op::Identity, &[acc])?;
    }
    Ok(vec![acc])
}

/// A scalar constant with the dtype of `like`.
pub(crate) fn scalar_like(
    c: &mut NodeCtx,
    like: egret_ir::ValueId,
    x: f64,
) -> Result<egret_ir::ValueId, crate::ImportError> {
    let dt = c.ty(like).dtype;
    Ok(c.constant(Tensor::scalar(x).cast(dt)))
}

/// `x * sigmoid(alpha * x)`, the scaling left out when `alpha` is 1.
fn swish(c: &mut NodeCtx, x: egret_ir::ValueId) -> Result<egret_ir::ValueId, crate::ImportError> {
    let alpha = c.f("alpha", 1.0)?;
    let scaled = if alpha == 1.0 {
        x
    } else {
        let alpha = scalar_like(c, x, alpha as f64)?;
        c.add(Op::Mul, &[x, alpha])?
    };
    let gate = c.add(Op::Sigmoid, &[scaled])?;
    c.add(Op::Mul, &[x, gate])
}

/// `Clip(x, lo, hi)` is `min(max(x, lo), hi)`; a missing bound is no bound.
fn clip(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let dt = c.ty(x).dtype;
    let (lo, hi) = if c.opset() < 11 {
        let lo = c.f("min", f32::MIN)?;
        let hi = c.f("max", f32::MAX)?;
        (Some(c.constant(Tensor::scalar(lo as f64).cast(dt))), Some(c.constant(Tensor::scalar(hi as f64).cast(dt))))
    } else {
        (c.input(1), c.input(2))
    };
    let mut y = x;
    if let Some(lo) = lo {
        y = c.add(Op::Max, &[y, lo])?;
    }
    if let Some(hi) = hi {
        y = c.add(Op::Min, &[y, hi])?;
    }
    if y == x {
        y = c.add(Op::Identity, &[x])?;
    }
    Ok(vec![y])
}

fn constant(c: &mut NodeCtx) -> BuildResult {
    let t = if let Some(t) = c.tensor_attr("value")? {
        t
    } else if c.has_attr("value_float") {
        Tensor::scalar(c.f("value_float", 0.0)?)
    } else if let Some(v) = c.floats("value_floats")? {
        Tensor::from_vec(vec![v.len()], v)
    } else if c.has_attr("value_int") {
        Tensor::scalar(c.i("value_int", 0)?)
    } else if let Some(v) = c.ints("value_ints")? {
        Tensor::from_vec(vec![v.len()], v)
    } else if c.has_attr("sparse_value") || c.has_attr("value_string") || c.has_attr("value_strings") {
        c.ignore_attr("sparse_value");
        c.ignore_attr("value_string");
        c.ignore_attr("value_strings");
        return Err(c.err("sparse and string constants are not supported"));
    } else {
        return Err(c.err("has no value attribute"));
    };
    let v = c.constant(t);
    if let Some(t) = c.attr_narrow("value") {
        c.mark_narrow(v, t);
    }
    Ok(vec![v])
}
