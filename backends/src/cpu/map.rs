//! Map kernels: a loop nest over the iteration space, every operand walked by
//! its own strides. Operand addresses are loop-carried block parameters, so
//! each step costs one add per operand and no index arithmetic.
//!
//! The innermost loop runs four lanes at a time (f32x4) when every operand is
//! f32, unit-stride or broadcast there, and the expression has a vector form;
//! a scalar loop finishes the remainder.
//!
//! Extents, strides and offsets that depend on a symbol (`Kernel::runtime_dims`)
//! are loaded once on entry from the argument slots after the operands'
//! addresses, where the runtime writes their values for the call; every
//! loop already runs to an end held in a register, so only the stride
//! steps differ (an add of a register instead of an immediate).

use super::loops::{counted_dyn, while_fits};
use super::runtime_fns::FuncRefs;
use super::vmath::VMath;
use crate::plan::{Binary, Compare, Expr, Logic, MapKernel, Unary};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;
use egret_ir::{DType, Dim};

const LANES: i64 = 4;

fn elem_type(d: DType) -> Type {
    match d {
        DType::Bool => types::I8,
        DType::I64 => types::I64,
        DType::I32 => types::I32,
        _ => types::F32,
    }
}

/// A size the code uses: an immediate, or a register holding a symbolic
/// size's value for this call.
#[derive(Clone, Copy)]
enum Size {
    Imm(i64),
    Reg(Value),
}

impl Size {
    /// `self * by` (bytes from elements, steps of several lanes).
    fn times(self, b: &mut FunctionBuilder, by: i64) -> Size {
        match self {
            Size::Imm(x) => Size::Imm(x * by),
            Size::Reg(v) if by == 1 => Size::Reg(v),
            Size::Reg(v) => Size::Reg(b.ins().imul_imm_s(v, by)),
        }
    }

    fn value(self, b: &mut FunctionBuilder) -> Value {
        match self {
            Size::Imm(x) => b.ins().iconst(types::I64, x),
            Size::Reg(v) => v,
        }
    }

    /// `addr + self`.
    fn add_to(self, b: &mut FunctionBuilder, addr: Value) -> Value {
        match self {
            Size::Imm(0) => addr,
            Size::Imm(x) => b.ins().iadd_imm_s(addr, x),
            Size::Reg(v) => b.ins().iadd(addr, v),
        }
    }
}

struct Ctx<'a> {
    m: &'a MapKernel,
    fns: &'a FuncRefs,
    /// The iteration space's extents.
    shape: Vec<Size>,
    /// Per operand (inputs, then the output), per dim: the stride in bytes.
    strides: Vec<Vec<Size>>,
    /// The innermost strides times `LANES`: one vector step (computed on
    /// entry, not in the loop, when a stride is symbolic).
    lane_strides: Vec<Size>,
}

/// Emits the kernel for iterations `begin..end` of dim 0 (the whole kernel
/// for a rank-0 iteration space, where the range is `0..1`). `runtime_dims`
/// are the kernel's symbolic sizes in slot order (`Kernel::runtime_dims`).
pub fn emit(
    b: &mut FunctionBuilder,
    ptr: Type,
    args: Value,
    range: (Value, Value),
    m: &MapKernel,
    fns: &FuncRefs,
    runtime_dims: &[Dim],
) {
    let operands: Vec<_> = m.inputs.iter().chain([&m.output]).collect();
    let elem: Vec<i64> = operands.iter().map(|o| o.dtype.size_bytes() as i64).collect();
    let flags = MemFlagsData::new().with_notrap();
    // The symbols' values for this call, loaded once.
    let loaded: Vec<Value> = (0..runtime_dims.len())
        .map(|slot| b.ins().load(types::I64, flags, args, (8 * (operands.len() + slot)) as i32))
        .collect();
    let size = |d: Dim| match d.known() {
        Some(v) => Size::Imm(v),
        None => Size::Reg(loaded[runtime_dims.iter().position(|&r| r == d).expect("a runtime dim of the kernel")]),
    };
    let shape: Vec<Size> = m.shape.iter().map(|&d| size(d)).collect();
    let strides: Vec<Vec<Size>> = operands
        .iter()
        .enumerate()
        .map(|(k, o)| o.strides.iter().map(|&st| size(st).times(b, elem[k])).collect())
        .collect();
    let bases: Vec<Value> = operands
        .iter()
        .enumerate()
        .map(|(k, o)| {
            let base = b.ins().load(ptr, flags, args, (k * 8) as i32);
            size(o.offset).times(b, elem[k]).add_to(b, base)
        })
        .collect();
    let last = m.shape.len().saturating_sub(1);
    let lane_strides: Vec<Size> =
        strides.iter().map(|st| st.get(last).map_or(Size::Imm(0), |&s| s.times(b, LANES))).collect();
    let cx = Ctx { m, fns, shape, strides, lane_strides };
    if m.shape.is_empty() {
        cx.scalar_step(b, &bases);
        return;
    }
    // Start every operand at iteration `begin` of dim 0.
    let bases: Vec<Value> = bases
        .iter()
        .enumerate()
        .map(|(k, &a)| match cx.strides[k][0] {
            Size::Imm(0) => a,
            Size::Imm(step) => {
                let off = b.ins().imul_imm_s(range.0, step);
                b.ins().iadd(a, off)
            }
            Size::Reg(step) => {
                let off = b.ins().imul(range.0, step);
                b.ins().iadd(a, off)
            }
        })
        .collect();
    cx.level(b, 0, bases, Some(range));
}

impl Ctx<'_> {
    fn rank(&self) -> usize {
        self.m.shape.len()
    }

    fn n_operands(&self) -> usize {
        self.m.inputs.len() + 1
    }

    /// Emits the loops from dim `d` inwards, starting at operand addresses
    /// `addrs`; `range` bounds dim 0 when this is the outermost level. The
    /// innermost dim runs vector steps while four lanes fit, then scalars.
    fn level(&self, b: &mut FunctionBuilder, d: usize, addrs: Vec<Value>, range: Option<(Value, Value)>) {
        let (start, end) = match range {
            Some(r) => r,
            None => (b.ins().iconst(types::I64, 0), self.shape[d].value(b)),
        };
        if d + 1 == self.rank() {
            let (i, addrs) = if self.vectorizable() {
                while_fits(b, start, end, LANES, addrs, &mut |b, _, cur| {
                    self.vector_step(b, cur);
                    self.advance(b, cur, d, LANES)
                })
            } else {
                (start, addrs)
            };
            while_fits(b, i, end, 1, addrs, &mut |b, _, cur| {
                self.scalar_step(b, cur);
                self.advance(b, cur, d, 1)
            });
            return;
        }
        counted_dyn(b, start, end, 1, addrs, &mut |b, _, cur| {
            self.level(b, d + 1, cur.to_vec(), None);
            self.advance(b, cur, d, 1)
        });
    }

    /// Every operand address moved `lanes` steps along dim `d`.
    fn advance(&self, b: &mut FunctionBuilder, addrs: &[Value], d: usize, lanes: i64) -> Vec<Value> {
        addrs
            .iter()
            .enumerate()
            .map(|(k, &a)| {
                let step = match lanes {
                    1 => self.strides[k][d],
                    LANES if d + 1 == self.rank() => self.lane_strides[k],
                    _ => self.strides[k][d].times(b, lanes),
                };
                step.add_to(b, a)
            })
            .collect()
    }

    fn vectorizable(&self) -> bool {
        let d = self.rank() - 1;
        // With a parallel split, dim 0 may be cut short: no length check there.
        // A symbolic extent is taken to be long (the scalar loop finishes
        // whatever the vector steps leave).
        let long = |s: Size| !matches!(s, Size::Imm(n) if n < LANES);
        let unit_or_broadcast = |s: Dim| s == 0 || s == 1;
        let bools: Vec<bool> = self.m.inputs.iter().map(|o| o.dtype == DType::Bool).collect();
        (d == 0 || long(self.shape[d]))
            && self
                .m
                .inputs
                .iter()
                .all(|o| matches!(o.dtype, DType::F32 | DType::Bool) && unit_or_broadcast(o.strides[d]))
            && self.m.output.dtype == DType::F32
            && self.m.output.strides[d] == 1
            && vector_safe(&self.m.expr, &bools)
    }

    fn scalar_step(&self, b: &mut FunctionBuilder, addrs: &[Value]) {
        let flags = MemFlagsData::new().with_notrap();
        let loaded: Vec<Value> = self
            .m
            .inputs
            .iter()
            .enumerate()
            .map(|(k, o)| b.ins().load(elem_type(o.dtype), flags, addrs[k], 0))
            .collect();
        let v = self.eval(b, &self.m.expr, &loaded, false);
        b.ins().store(flags, v, addrs[self.n_operands() - 1], 0);
    }

    fn vector_step(&self, b: &mut FunctionBuilder, addrs: &[Value]) {
        let flags = MemFlagsData::new().with_notrap();
        let d = self.rank() - 1;
        let loaded: Vec<Value> = self
            .m
            .inputs
            .iter()
            .enumerate()
            .map(|(k, o)| match (o.dtype, o.strides[d] == 0) {
                (DType::Bool, broadcast) => bool_lanes(b, addrs[k], broadcast),
                (_, true) => {
                    let s = b.ins().load(types::F32, flags, addrs[k], 0);
                    b.ins().splat(types::F32X4, s)
                }
                (_, false) => b.ins().load(types::F32X4, flags, addrs[k], 0),
            })
            .collect();
        let v = self.eval(b, &self.m.expr, &loaded, true);
        b.ins().store(flags, v, addrs[self.n_operands() - 1], 0);
    }

    fn f32_const(&self, b: &mut FunctionBuilder, x: f32, vector: bool) -> Value {
        let s = b.ins().f32const(x);
        if vector {
            b.ins().splat(types::F32X4, s)
        } else {
            s
        }
    }

    fn call(&self, b: &mut FunctionBuilder, f: cranelift_codegen::ir::FuncRef, args: &[Value]) -> Value {
        let inst = b.ins().call(f, args);
        b.inst_results(inst)[0]
    }

    fn eval(&self, b: &mut FunctionBuilder, e: &Expr, inputs: &[Value], vector: bool) -> Value {
        match e {
            Expr::Input(i) => inputs[*i],
            Expr::F32(x) => self.f32_const(b, *x, vector),
            Expr::Unary(u, x) => {
                let x = self.eval(b, x, inputs, vector);
                match u {
                    Unary::Neg => b.ins().fneg(x),
                    Unary::Abs => b.ins().fabs(x),
                    Unary::Sqrt => b.ins().sqrt(x),
                    Unary::Recip => {
                        let one = self.f32_const(b, 1.0, vector);
                        b.ins().fdiv(one, x)
                    }
                    // max(x, 0) that keeps NaN, as ONNX Relu does.
                    Unary::Relu => VMath::new(vector).max_const(b, x, 0.0),
                    Unary::Floor => b.ins().floor(x),
                    Unary::Ceil => b.ins().ceil(x),
                    Unary::Round => b.ins().nearest(x),
                    Unary::Exp => VMath::new(vector).exp(b, x),
                    Unary::Log => self.call(b, self.fns.log, &[x]),
                    Unary::Tanh => VMath::new(vector).tanh(b, x),
                    Unary::Erf => VMath::new(vector).erf(b, x),
                    Unary::Sigmoid => VMath::new(vector).sigmoid(b, x),
                    Unary::Sin => self.call(b, self.fns.sin, &[x]),
                    Unary::Cos => self.call(b, self.fns.cos, &[x]),
                    Unary::Gelu => VMath::new(vector).gelu(b, x),
                    Unary::GeluTanh => VMath::new(vector).gelu_tanh(b, x),
                    Unary::Silu => VMath::new(vector).silu(b, x),
                }
            }
            Expr::Binary(op, x, y) => {
                // A maximum or minimum by a constant (a clamp, quantization's
                // saturation) in one instruction rather than `fmax`'s nine.
                if let (Binary::Max | Binary::Min, Some((x, c))) = (op, by_constant(x, y)) {
                    let x = self.eval(b, x, inputs, vector);
                    let math = VMath::new(vector);
                    return if *op == Binary::Max { math.max_const(b, x, c) } else { math.min_const(b, x, c) };
                }
                let x = self.eval(b, x, inputs, vector);
                let y = self.eval(b, y, inputs, vector);
                match op {
                    Binary::Add => b.ins().fadd(x, y),
                    Binary::Sub => b.ins().fsub(x, y),
                    Binary::Mul => b.ins().fmul(x, y),
                    Binary::Div => b.ins().fdiv(x, y),
                    Binary::Max => b.ins().fmax(x, y),
                    Binary::Min => b.ins().fmin(x, y),
                    Binary::Pow => self.call(b, self.fns.pow, &[x, y]),
                }
            }
            Expr::Compare(c, x, y) => {
                let x = self.eval(b, x, inputs, vector);
                let y = self.eval(b, y, inputs, vector);
                let cc = match c {
                    Compare::Eq => FloatCC::Equal,
                    Compare::Lt => FloatCC::LessThan,
                    Compare::Le => FloatCC::LessThanOrEqual,
                    Compare::Gt => FloatCC::GreaterThan,
                    Compare::Ge => FloatCC::GreaterThanOrEqual,
                };
                b.ins().fcmp(cc, x, y)
            }
            Expr::Logic(l, x, y) => {
                let x = self.eval(b, x, inputs, vector);
                let y = self.eval(b, y, inputs, vector);
                match l {
                    Logic::And => b.ins().band(x, y),
                    Logic::Or => b.ins().bor(x, y),
                    Logic::Xor => b.ins().bxor(x, y),
                }
            }
            Expr::Not(x) => {
                let x = self.eval(b, x, inputs, vector);
                b.ins().bxor_imm_s(x, 1)
            }
            Expr::IsNaN(x) => {
                let x = self.eval(b, x, inputs, vector);
                b.ins().fcmp(FloatCC::Unordered, x, x)
            }
            Expr::Select(c, x, y) => {
                let c = self.eval(b, c, inputs, vector);
                let x = self.eval(b, x, inputs, vector);
                let y = self.eval(b, y, inputs, vector);
                if vector {
                    // A lane mask (`bool_lanes`), in the operands' type for bitselect.
                    let mask = b.ins().bitcast(types::F32X4, MemFlagsData::new(), c);
                    b.ins().bitselect(mask, x, y)
                } else {
                    b.ins().select(c, x, y)
                }
            }
            Expr::BoolToF32(x) => {
                let x = self.eval(b, x, inputs, vector);
                let w = b.ins().uextend(types::I32, x);
                b.ins().fcvt_from_uint(types::F32, w)
            }
            Expr::IntToBool(x) => {
                let x = self.eval(b, x, inputs, vector);
                b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
            }
            Expr::IntToF32(x) => {
                let x = self.eval(b, x, inputs, vector);
                b.ins().fcvt_from_sint(types::F32, x)
            }
            Expr::F32ToBool(x) => {
                let x = self.eval(b, x, inputs, vector);
                let zero = self.f32_const(b, 0.0, vector);
                b.ins().fcmp(FloatCC::NotEqual, x, zero)
            }
        }
    }
}

/// Whether an expression has an f32x4 form (no libm calls, no bools but
/// a bool input choosing between two values, as a mask selected from a
/// causal table does). `bools[i]`: whether input `i` is bool.
fn vector_safe(e: &Expr, bools: &[bool]) -> bool {
    match e {
        Expr::Input(i) => !bools[*i],
        Expr::F32(_) => true,
        Expr::Unary(u, x) => !matches!(u, Unary::Log | Unary::Sin | Unary::Cos) && vector_safe(x, bools),
        Expr::Binary(op, x, y) => !matches!(op, Binary::Pow) && vector_safe(x, bools) && vector_safe(y, bools),
        Expr::Select(c, x, y) => {
            matches!(**c, Expr::Input(i) if bools[i]) && vector_safe(x, bools) && vector_safe(y, bools)
        }
        _ => false,
    }
}

/// Four bools (bytes, 0 or 1) from `addr` as an i32x4 lane mask (all ones
/// where true), or one bool in every lane when `broadcast`. Four bytes are
/// read as one i32 and each lane keeps its own byte, so nothing past the
/// four is read.
fn bool_lanes(b: &mut FunctionBuilder, addr: Value, broadcast: bool) -> Value {
    let flags = MemFlagsData::new().with_notrap();
    let zero = b.ins().iconst(types::I32, 0);
    let zero = b.ins().splat(types::I32X4, zero);
    let lanes = if broadcast {
        let byte = b.ins().uload8(types::I32, flags, addr, 0);
        b.ins().splat(types::I32X4, byte)
    } else {
        let word = b.ins().load(types::I32, flags, addr, 0);
        let word = b.ins().splat(types::I32X4, word);
        let bytes: Vec<u8> = [0xffu32, 0xff00, 0xff_0000, 0xff00_0000].iter().flat_map(|m| m.to_le_bytes()).collect();
        let handle = b.func.dfg.constants.insert(bytes.into());
        let masks = b.ins().vconst(types::I32X4, handle);
        b.ins().band(word, masks)
    };
    b.ins().icmp(IntCC::NotEqual, lanes, zero)
}

/// The other operand and the constant of a commutative op by a constant
/// that is not NaN, either side.
fn by_constant<'e>(x: &'e Expr, y: &'e Expr) -> Option<(&'e Expr, f32)> {
    match (x, y) {
        (_, &Expr::F32(c)) if !c.is_nan() => Some((x, c)),
        (&Expr::F32(c), _) if !c.is_nan() => Some((y, c)),
        _ => None,
    }
}
