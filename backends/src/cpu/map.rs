//! Map kernels: a loop nest over the iteration space, every operand walked by
//! its own strides. Operand addresses are loop-carried block parameters, so
//! each step costs one add per operand and no index arithmetic.
//!
//! The innermost loop runs four lanes at a time (f32x4) when every operand is
//! f32, unit-stride or broadcast there, and the expression has a vector form;
//! a scalar loop finishes the remainder.

use super::loops::{counted_dyn, while_fits};
use super::runtime_fns::FuncRefs;
use super::vmath::VMath;
use crate::plan::{Binary, Compare, Expr, Logic, MapKernel, Unary};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;
use egret_ir::DType;

const LANES: i64 = 4;

fn elem_type(d: DType) -> Type {
    match d {
        DType::Bool => types::I8,
        DType::I64 => types::I64,
        DType::I32 => types::I32,
        _ => types::F32,
    }
}

struct Ctx<'a> {
    m: &'a MapKernel,
    fns: &'a FuncRefs,
    /// Per operand (inputs, then the output): element size in bytes.
    sizes: Vec<i64>,
}

/// Emits the kernel for iterations `begin..end` of dim 0 (the whole kernel
/// for a rank-0 iteration space, where the range is `0..1`).
pub fn emit(b: &mut FunctionBuilder, ptr: Type, args: Value, range: (Value, Value), m: &MapKernel, fns: &FuncRefs) {
    let operands: Vec<_> = m.inputs.iter().chain([&m.output]).collect();
    let sizes: Vec<i64> = operands.iter().map(|o| o.dtype.size_bytes() as i64).collect();
    let flags = MemFlagsData::new().with_notrap();
    let bases: Vec<Value> = operands
        .iter()
        .enumerate()
        .map(|(k, o)| {
            let base = b.ins().load(ptr, flags, args, (k * 8) as i32);
            if o.offset != 0 {
                b.ins().iadd_imm_s(base, o.offset as i64 * sizes[k])
            } else {
                base
            }
        })
        .collect();
    let cx = Ctx { m, fns, sizes };
    if m.shape.is_empty() {
        cx.scalar_step(b, &bases);
        return;
    }
    // Start every operand at iteration `begin` of dim 0.
    let bases: Vec<Value> = bases
        .iter()
        .enumerate()
        .map(|(k, &a)| {
            let step = cx.stride_bytes(k, 0);
            if step == 0 {
                return a;
            }
            let off = b.ins().imul_imm_s(range.0, step);
            b.ins().iadd(a, off)
        })
        .collect();
    cx.level(b, 0, bases, Some(range));
}

impl Ctx<'_> {
    fn rank(&self) -> usize {
        self.m.shape.len()
    }

    fn stride_bytes(&self, k: usize, d: usize) -> i64 {
        let o = if k < self.m.inputs.len() { &self.m.inputs[k] } else { &self.m.output };
        o.strides[d] as i64 * self.sizes[k]
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
            None => (b.ins().iconst(types::I64, 0), b.ins().iconst(types::I64, self.m.shape[d] as i64)),
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
                let step = self.stride_bytes(k, d) * lanes;
                if step == 0 {
                    a
                } else {
                    b.ins().iadd_imm_s(a, step)
                }
            })
            .collect()
    }

    fn vectorizable(&self) -> bool {
        let d = self.rank() - 1;
        // With a parallel split, dim 0 may be cut short: no length check there.
        (d == 0 || self.m.shape[d] as i64 >= LANES)
            && self.m.inputs.iter().all(|o| o.dtype == DType::F32 && matches!(o.strides[d], 0 | 1))
            && self.m.output.dtype == DType::F32
            && self.m.output.strides[d] == 1
            && vector_safe(&self.m.expr)
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
            .map(|(k, o)| {
                if o.strides[d] == 0 {
                    let s = b.ins().load(types::F32, flags, addrs[k], 0);
                    b.ins().splat(types::F32X4, s)
                } else {
                    b.ins().load(types::F32X4, flags, addrs[k], 0)
                }
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
                    Unary::Relu => {
                        // max(x, 0) that keeps NaN, as ONNX Relu does.
                        let zero = self.f32_const(b, 0.0, vector);
                        b.ins().fmax(x, zero)
                    }
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
                b.ins().select(c, x, y)
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

/// Whether an expression has an f32x4 form (no libm calls, no bools).
fn vector_safe(e: &Expr) -> bool {
    match e {
        Expr::Input(_) | Expr::F32(_) => true,
        Expr::Unary(u, x) => !matches!(u, Unary::Log | Unary::Sin | Unary::Cos) && vector_safe(x),
        Expr::Binary(op, x, y) => !matches!(op, Binary::Pow) && vector_safe(x) && vector_safe(y),
        _ => false,
    }
}
