//! Transcendental functions as Cranelift instruction sequences, for f32 and
//! f32x4 alike, so kernels using them stay vectorised instead of calling
//! libm per element.
//!
//! - `exp`: Cephes `expf` (range reduction by ln 2 in two parts, a degree-5
//!   polynomial, 2^n built in the exponent bits); about 1 ulp. Polynomials
//!   and the reduction use fused multiply-adds (one rounding, fewer ops).
//! - `erf`: Abramowitz & Stegun 7.1.26; absolute error below 1.5e-7.
//! - `tanh`: `1 - 2 / (exp(2x) + 1)`, with a Taylor polynomial near 0 where
//!   that form loses relative precision.
//! - `sigmoid`: `1 / (1 + exp(-x))`.
//! - `gelu`, `gelu_tanh`, `silu`: the activations, from the functions above.
//!   Tanh GELU is computed as the equal `x sigmoid(2u)`, with
//!   `u = sqrt(2/pi) (x + 0.044715 x^3)`: one exponential and one division,
//!   where tanh would take a second polynomial near 0, and no cancellation
//!   in `1 + tanh(u)` for very negative `x`.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

/// Emits math on either scalars or vectors of f32.
pub struct VMath {
    vector: bool,
}

impl VMath {
    pub fn new(vector: bool) -> VMath {
        VMath { vector }
    }

    fn float_ty(&self) -> Type {
        if self.vector {
            types::F32X4
        } else {
            types::F32
        }
    }

    fn int_ty(&self) -> Type {
        if self.vector {
            types::I32X4
        } else {
            types::I32
        }
    }

    pub fn c(&self, b: &mut FunctionBuilder, x: f32) -> Value {
        let s = b.ins().f32const(x);
        if self.vector {
            b.ins().splat(types::F32X4, s)
        } else {
            s
        }
    }

    fn ci(&self, b: &mut FunctionBuilder, x: i64) -> Value {
        let s = b.ins().iconst(types::I32, x);
        if self.vector {
            b.ins().splat(types::I32X4, s)
        } else {
            s
        }
    }

    /// `acc * x + c` for each coefficient, highest degree first (Horner),
    /// one fused multiply-add per step.
    fn poly(&self, b: &mut FunctionBuilder, x: Value, coeffs: &[f32]) -> Value {
        let mut acc = self.c(b, coeffs[0]);
        for &k in &coeffs[1..] {
            let kc = self.c(b, k);
            acc = b.ins().fma(acc, x, kc);
        }
        acc
    }

    /// `e^x`: the kernel library's `exp` (about 1 ulp from `EXP_LOW`, 0
    /// below, infinity above the overflow), written in CLIF.
    pub fn exp(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let unclamped = x;
        let x = self.min_const(b, x, EXP_OVERFLOW);
        let x = self.max_const(b, x, EXP_LOW);
        // n = round(x / ln 2); r = x - n ln 2, with ln 2 split for precision.
        let log2e = self.c(b, std::f32::consts::LOG2_E);
        let half = self.c(b, 0.5);
        let t = b.ins().fma(x, log2e, half);
        let n = b.ins().floor(t);
        let c1 = self.c(b, -0.693_359_4);
        let c2 = self.c(b, 2.121_944_4e-4);
        let r = b.ins().fma(n, c1, x);
        let r = b.ins().fma(n, c2, r);
        let z = b.ins().fmul(r, r);
        let p = self.poly(b, r, &[1.987_569_2e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5]);
        let p = b.ins().fma(p, z, r);
        let one = self.c(b, 1.0);
        let p = b.ins().fadd(p, one);
        // 2^n from the exponent bits, as 2^(n - 1) doubled: n reaches 128
        // at the top of the range, one past the largest exponent. NaN
        // inputs saturate to 0 here and stay NaN in `p`.
        let ni = b.ins().fcvt_to_sint_sat(self.int_ty(), n);
        let bias = self.ci(b, 126);
        let e = b.ins().iadd(ni, bias);
        let e = b.ins().ishl_imm_u(e, 23);
        let scale = b.ins().bitcast(self.float_ty(), MemFlagsData::new(), e);
        let y = b.ins().fmul(p, scale);
        let two = self.c(b, 2.0);
        let y = b.ins().fmul(y, two);
        // Past f32's range, infinity (the clamp above keeps the polynomial
        // finite): sigmoid(-inf) is then exactly 0, as libm's gives it.
        // Below `EXP_LOW`, 0 (flushed, as the kernel library).
        let (hi, lo) = (self.c(b, EXP_OVERFLOW), self.c(b, EXP_LOW));
        let inf = self.c(b, f32::INFINITY);
        let over = b.ins().fcmp(FloatCC::GreaterThan, unclamped, hi);
        let y = self.select(b, over, inf, y);
        let zero = self.c(b, 0.0);
        let under = b.ins().fcmp(FloatCC::LessThan, unclamped, lo);
        self.select(b, under, zero, y)
    }

    /// `max(x, c)` as CLIF's `fmax` gives it (NaN where `x` is NaN, and
    /// `max(-0, +0) = +0`), for a constant `c` that is not NaN: `x < c ? c
    /// : x`, which x64 lowers to one `maxps c, x` where `fmax` is a
    /// sequence of nine (it handles NaN and zeros on both sides), and an
    /// added +0 where `c` is +0 (`maxps` gives `x` on a tie, so -0).
    pub fn max_const(&self, b: &mut FunctionBuilder, x: Value, c: f32) -> Value {
        debug_assert!(!c.is_nan(), "max_const by NaN");
        let k = self.c(b, c);
        let less = b.ins().fcmp(FloatCC::LessThan, x, k);
        let max = self.select(b, less, k, x);
        if c.to_bits() == 0 {
            let zero = self.c(b, 0.0);
            b.ins().fadd(max, zero)
        } else {
            max
        }
    }

    /// `min(x, c)` as CLIF's `fmin` gives it, for a constant `c` that is not
    /// NaN: `c < x ? c : x`, one `minps c, x`. Where `c` is -0 (`minps`
    /// would give +0 for `min(+0, -0)`), `fmin` itself.
    pub fn min_const(&self, b: &mut FunctionBuilder, x: Value, c: f32) -> Value {
        debug_assert!(!c.is_nan(), "min_const by NaN");
        let k = self.c(b, c);
        if c.to_bits() == (-0f32).to_bits() {
            return b.ins().fmin(x, k);
        }
        let less = b.ins().fcmp(FloatCC::LessThan, k, x);
        self.select(b, less, k, x)
    }

    /// `cond ? yes : no` lane by lane, `cond` an `fcmp` of this width.
    fn select(&self, b: &mut FunctionBuilder, cond: Value, yes: Value, no: Value) -> Value {
        if self.vector {
            // The lane mask is I32X4; bitselect wants it in the operands' type.
            let mask = b.ins().bitcast(types::F32X4, MemFlagsData::new(), cond);
            b.ins().bitselect(mask, yes, no)
        } else {
            b.ins().select(cond, yes, no)
        }
    }

    pub fn erf(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let ax = b.ins().fabs(x);
        let p = self.c(b, 0.327_591_1);
        let one = self.c(b, 1.0);
        let t = b.ins().fma(p, ax, one);
        let t = b.ins().fdiv(one, t);
        let q = self.poly(b, t, &[1.061_405_4, -1.453_152_1, 1.421_413_8, -0.284_496_72, 0.254_829_6]);
        let q = b.ins().fmul(q, t);
        let x2 = b.ins().fmul(ax, ax);
        let nx2 = b.ins().fneg(x2);
        let e = self.exp(b, nx2);
        let q = b.ins().fmul(q, e);
        let y = b.ins().fsub(one, q);
        let far = if self.vector {
            // No vector copysign on x86: take the sign bit (the bits of -0.0) from x.
            let sign = self.c(b, -0.0);
            b.ins().bitselect(sign, x, y)
        } else {
            b.ins().fcopysign(y, x)
        };
        // Near 0 the form above is exact only to 1.5e-7 absolute (22% off
        // at 6e-7): the Taylor series there (`kernels::ERF_NEAR_ZERO`).
        let x2 = b.ins().fmul(x, x);
        let p = self.poly(b, x2, &egret_kernels::ERF_NEAR_ZERO);
        let near = b.ins().fmul(p, x);
        let small = self.c(b, 0.5);
        let is_near = b.ins().fcmp(FloatCC::LessThan, ax, small);
        self.select(b, is_near, near, far)
    }

    pub fn tanh(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let two = self.c(b, 2.0);
        let one = self.c(b, 1.0);
        let x2 = b.ins().fmul(x, two);
        let e = self.exp(b, x2);
        let d = b.ins().fadd(e, one);
        let q = b.ins().fdiv(two, d);
        let far = b.ins().fsub(one, q);
        // Near 0: x - x^3/3 + 2x^5/15 - 17x^7/315.
        let s = b.ins().fmul(x, x);
        let p = self.poly(b, s, &[-17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0, 1.0]);
        let near = b.ins().fmul(p, x);
        let ax = b.ins().fabs(x);
        let small = self.c(b, 0.125);
        let is_near = b.ins().fcmp(FloatCC::LessThan, ax, small);
        self.select(b, is_near, near, far)
    }

    pub fn sigmoid(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let nx = b.ins().fneg(x);
        let e = self.exp(b, nx);
        let one = self.c(b, 1.0);
        let d = b.ins().fadd(one, e);
        b.ins().fdiv(one, d)
    }

    /// `0.5 x (1 + erf(x / sqrt 2))`.
    pub fn gelu(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let k = self.c(b, std::f32::consts::FRAC_1_SQRT_2);
        let scaled = b.ins().fmul(x, k);
        let e = self.erf(b, scaled);
        let one = self.c(b, 1.0);
        let half = self.c(b, 0.5);
        let s = b.ins().fadd(e, one);
        let hx = b.ins().fmul(x, half);
        b.ins().fmul(hx, s)
    }

    /// GELU's tanh form as `x sigmoid(2u)` (see the module comment).
    pub fn gelu_tanh(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let (c1, c3) = gelu_tanh_coefficients();
        let c3 = self.c(b, c3);
        let c1 = self.c(b, c1);
        let x2 = b.ins().fmul(x, x);
        let inner = b.ins().fma(x2, c3, c1);
        let two_u = b.ins().fmul(inner, x);
        let s = self.sigmoid(b, two_u);
        b.ins().fmul(x, s)
    }

    /// `x sigmoid(x)`.
    pub fn silu(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let s = self.sigmoid(b, x);
        b.ins().fmul(x, s)
    }
}

pub use egret_kernels::{gelu_tanh_coefficients, EXP_LOW, EXP_OVERFLOW};
