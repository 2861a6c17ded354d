//! Writing kernels in the GPU form: a builder that allocates variables and
//! parameters and nests blocks, and the math every kernel shares (the
//! plan's `Expr` language, erf, tanh, GELU, the grid's linear index).
//!
//! Functions without a native instruction everywhere (erf, tanh, pow,
//! sigmoid) are expanded here, once, from exp and log, so that both printers
//! render the same arithmetic.

use super::form::*;
use crate::plan::{Binary, Compare, Expr, Logic, Unary};

/// Builds one kernel. Parameters are words the runtime passes to the
/// dispatch (sizes, offsets, strides, tables), recorded with their values,
/// so kernels that differ only in them print the same text.
pub struct Builder {
    vars: Vec<Ty>,
    shared: Vec<u32>,
    locals: Vec<u32>,
    blocks: Vec<Vec<S>>,
    pub params: Vec<u32>,
    threads: u32,
}

impl Builder {
    pub fn new(threads: u32) -> Builder {
        Builder { vars: vec![], shared: vec![], locals: vec![], blocks: vec![vec![]], params: vec![], threads }
    }

    pub fn threads(&self) -> u32 {
        self.threads
    }

    pub fn finish(mut self, name: impl Into<String>) -> (Kernel, Vec<u32>) {
        assert_eq!(self.blocks.len(), 1, "unclosed block");
        let body = self.blocks.pop().unwrap();
        (
            Kernel {
                name: name.into(),
                threads: self.threads,
                vars: self.vars,
                shared: self.shared,
                locals: self.locals,
                body,
            },
            self.params,
        )
    }

    fn push(&mut self, s: S) {
        self.blocks.last_mut().unwrap().push(s);
    }

    pub fn ty(&self, e: &E) -> Ty {
        ty_of(&self.vars, e)
    }

    /// A new variable holding `e` (evaluated once here).
    pub fn let_(&mut self, e: E) -> E {
        E::Var(self.var(e))
    }

    /// A new variable holding `e`, assignable later.
    pub fn var(&mut self, e: E) -> Var {
        let v = Var(self.vars.len() as u32);
        self.vars.push(self.ty(&e));
        self.push(S::Let(v, e));
        v
    }

    pub fn set(&mut self, v: Var, e: E) {
        debug_assert_eq!(self.vars[v.0 as usize], self.ty(&e));
        self.push(S::Set(v, e));
    }

    /// Stores an f32, bool (as 0 or 1) or i32 value as a word.
    pub fn store(&mut self, space: Space, index: E, value: E) {
        let word = self.word(value);
        self.push(S::Store(space, index, word));
    }

    /// A value as the word that stores it.
    fn word(&self, value: E) -> E {
        match self.ty(&value) {
            Ty::F32 | Ty::I32 => value.bits(Ty::U32),
            Ty::U32 => value,
            Ty::Bool => E::select(value, E::U32(1), E::U32(0)),
        }
    }

    pub fn shared(&mut self, len: u32) -> Shared {
        self.shared.push(len);
        Shared(self.shared.len() as u32 - 1)
    }

    pub fn local(&mut self, len: u32) -> Local {
        self.locals.push(len);
        Local(self.locals.len() as u32 - 1)
    }

    pub fn store_shared(&mut self, a: Shared, index: E, value: E) {
        self.push(S::StoreShared(a, index, value));
    }

    pub fn store_local(&mut self, a: Local, index: E, value: E) {
        self.push(S::StoreLocal(a, index, value));
    }

    /// Records a failure: the step's `code` in the error word, unless an
    /// earlier step already failed (steps run in order, so the word names
    /// the first failure; within one step every writer writes the same).
    pub fn fail(&mut self, code: E) {
        let clear = E::load(Space::Error, E::I32(0)).eq(E::U32(0));
        self.if_(clear, |b| b.store(Space::Error, E::I32(0), code));
    }

    /// The workgroup's combination of every invocation's `value` (see
    /// `S::Reduce`); `scratch` holds one f32 per invocation.
    pub fn reduce(&mut self, how: Reduction, value: E, scratch: Shared) -> E {
        let into = self.var(E::F32(0.0));
        self.push(S::Reduce { how, value, into, scratch });
        E::Var(into)
    }

    /// The 4 words at `index` (a multiple of 4) of `space`, as u32 values.
    pub fn load4(&mut self, space: Space, index: E) -> [E; 4] {
        let into = [0; 4].map(|_| self.var(E::U32(0)));
        self.push(S::Load4 { space, index, into });
        into.map(E::Var)
    }

    /// The 4 f32 at `index` (a multiple of 4) of a workgroup array.
    pub fn load_shared4(&mut self, shared: Shared, index: E) -> [E; 4] {
        let into = [0; 4].map(|_| self.var(E::F32(0.0)));
        self.push(S::LoadShared4 { shared, index, into });
        into.map(E::Var)
    }

    /// Stores 4 f32 at `index` (a multiple of 4) of a workgroup array.
    pub fn store_shared4(&mut self, shared: Shared, index: E, values: [E; 4]) {
        self.push(S::StoreShared4 { shared, index, values });
    }

    /// Starts an asynchronous copy of 4 words (see `S::CopyAsync`).
    pub fn copy_async(&mut self, shared: Shared, index: E, space: Space, src: E, words: E) {
        self.push(S::CopyAsync { shared, index, space, src, words });
    }

    /// Waits for this invocation's asynchronous copies (see `S::CopyWait`).
    pub fn copy_wait(&mut self) {
        self.push(S::CopyWait);
    }

    /// `lo` and `hi` rounded to bf16 and packed (see `S::PackBf16`).
    pub fn pack_bf16(&mut self, lo: E, hi: E) -> E {
        let into = self.var(E::U32(0));
        self.push(S::PackBf16 { lo, hi, into });
        E::Var(into)
    }

    /// A warp's `ldmatrix.x4` (see `S::LoadMatrix`): four u32 values.
    pub fn load_matrix(&mut self, shared: Shared, index: E, trans: bool) -> [E; 4] {
        let into = [0; 4].map(|_| self.var(E::U32(0)));
        self.push(S::LoadMatrix { shared, index, trans, into });
        into.map(E::Var)
    }

    /// A warp's m16n8k16 bf16 product into `acc` (see `S::MmaBf16`).
    pub fn mma_bf16(&mut self, a: [E; 4], b: [E; 2], acc: [Var; 4]) {
        self.push(S::MmaBf16 { a, b, acc });
    }

    /// A warp's m16n8k8 tensor-core product into `acc` (see `S::Mma`).
    pub fn mma(&mut self, precision: Precision, a: [E; 4], b: [E; 2], acc: [Var; 4]) {
        self.push(S::Mma { precision, a, b, acc });
    }

    pub fn barrier(&mut self) {
        self.push(S::Barrier);
    }

    /// A parameter word with its value; read as an i32 (values may be
    /// negative strides or offsets, stored as two's complement).
    pub fn param(&mut self, value: i64) -> E {
        self.params.push(value as i32 as u32);
        E::param(self.params.len() as u32 - 1)
    }

    /// A parameter word whose value is set later (`set_param`): where a
    /// table that follows one of varying length starts, so that the
    /// kernel's text does not depend on that length.
    pub fn param_later(&mut self) -> (usize, E) {
        self.params.push(0);
        (self.params.len() - 1, E::param(self.params.len() as u32 - 1))
    }

    pub fn set_param(&mut self, index: usize, value: i64) {
        self.params[index] = value as i32 as u32;
    }

    /// A table of parameters; returns the index of its first word.
    pub fn param_table(&mut self, values: impl IntoIterator<Item = i64>) -> u32 {
        let at = self.params.len() as u32;
        self.params.extend(values.into_iter().map(|v| v as i32 as u32));
        at
    }

    /// `body(i)` for `i` in `from..to` by `step` (i32).
    pub fn for_(&mut self, from: E, to: E, step: E, body: impl FnOnce(&mut Builder, E)) {
        let var = Var(self.vars.len() as u32);
        self.vars.push(self.ty(&from));
        self.blocks.push(vec![]);
        body(self, E::Var(var));
        let inner = self.blocks.pop().unwrap();
        self.push(S::For { var, from, to, step, body: inner });
    }

    pub fn if_(&mut self, cond: E, then: impl FnOnce(&mut Builder)) {
        self.if_else(cond, then, |_| {});
    }

    pub fn if_else(&mut self, cond: E, then: impl FnOnce(&mut Builder), otherwise: impl FnOnce(&mut Builder)) {
        self.blocks.push(vec![]);
        then(self);
        let a = self.blocks.pop().unwrap();
        self.blocks.push(vec![]);
        otherwise(self);
        let b = self.blocks.pop().unwrap();
        self.push(S::If(cond, a, b));
    }

    /// The workgroup's index in a grid laid out by `grid_of` (i32).
    pub fn group(&mut self) -> E {
        let g = E::Builtin(Builtin::Group(0)) + E::Builtin(Builtin::Group(1)) * E::Builtin(Builtin::Groups(0));
        self.let_(g.bits(Ty::I32))
    }

    /// The invocation's index in its workgroup (i32).
    pub fn thread(&mut self) -> E {
        self.let_(E::Builtin(Builtin::Thread).bits(Ty::I32))
    }

    /// The invocation's index over the whole grid (i32).
    pub fn global_index(&mut self) -> E {
        let (g, t) = (self.group(), self.thread());
        self.let_(g * E::I32(self.threads as i32) + t)
    }

    // Math shared by the kernels.

    /// `tanh(x)`: an odd Taylor polynomial below |x| = 0.25 (relative
    /// error under 1e-8 there, where the closed form cancels), else
    /// `sign(x) (1 - t) / (1 + t)` with `t = exp(-2|x|)`, which cannot
    /// overflow (t goes to 0 for large |x|).
    pub fn tanh(&mut self, x: E) -> E {
        let x = self.let_(x);
        let a = self.let_(E::un(UnOp::Abs, x.clone()));
        let x2 = self.let_(x.clone() * x.clone());
        let mut poly = E::F32(62.0 / 2835.0);
        for c in [-17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0] {
            poly = E::fma(poly, x2.clone(), E::F32(c));
        }
        let small = self.let_(E::fma(poly * x2, x.clone(), x.clone()));
        let t = self.let_((a.clone() * E::F32(-2.0)).exp());
        let r = self.let_((E::F32(1.0) - t.clone()) / (E::F32(1.0) + t));
        let large = E::select(x.lt(E::F32(0.0)), E::un(UnOp::Neg, r.clone()), r);
        E::select(a.lt(E::F32(0.25)), small, large)
    }

    /// Whether `x` is infinite or NaN, from its bits: Vulkan does not
    /// promise IEEE infinities and NaNs in float arithmetic (lavapipe folds
    /// `0 * x` to 0), so tests on them are integer tests.
    pub fn is_non_finite(&mut self, x: E) -> E {
        E::bin(BinOp::And, x.bits(Ty::U32), E::U32(0x7f80_0000)).eq(E::U32(0x7f80_0000))
    }

    /// `erf(x)`: Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7),
    /// and the Taylor series below `|x| = 0.5`.
    pub fn erf(&mut self, x: E) -> E {
        let x = self.let_(x);
        let a = self.let_(E::un(UnOp::Abs, x.clone()));
        let t = self.let_(E::F32(1.0) / E::fma(E::F32(0.327_591_1), a.clone(), E::F32(1.0)));
        let mut poly = E::F32(1.061_405_4);
        for c in [-1.453_152_1, 1.421_413_8, -0.284_496_72, 0.254_829_6] {
            poly = E::fma(poly, t.clone(), E::F32(c));
        }
        let poly = self.let_(poly * t);
        let e = self.let_((E::un(UnOp::Neg, a.clone()) * a.clone()).exp());
        let r = self.let_(E::F32(1.0) - poly * e);
        let far = E::select(x.clone().lt(E::F32(0.0)), E::un(UnOp::Neg, r.clone()), r);
        // Near 0, the Taylor series (`egret_kernels::ERF_NEAR_ZERO`): the
        // form above is exact only to 1.5e-7 absolute (22% off at 6e-7).
        let x2 = self.let_(x.clone() * x.clone());
        let mut near = E::F32(egret_kernels::ERF_NEAR_ZERO[0]);
        for &c in &egret_kernels::ERF_NEAR_ZERO[1..] {
            near = E::fma(near, x2.clone(), E::F32(c));
        }
        E::select(a.lt(E::F32(0.5)), near * x, far)
    }

    /// `1 / (1 + exp(-x))`.
    pub fn sigmoid(&mut self, x: E) -> E {
        E::F32(1.0) / (E::F32(1.0) + E::un(UnOp::Neg, x).exp())
    }

    /// `x^y` from exp and log: negative bases give a real result for
    /// integer exponents only (NaN otherwise), and `x^0` is 1 for every x.
    pub fn pow(&mut self, x: E, y: E) -> E {
        let (x, y) = (self.let_(x), self.let_(y));
        let mag = self.let_((y.clone() * E::un(UnOp::Log, E::un(UnOp::Abs, x.clone()))).exp());
        let integer = self.let_(E::un(UnOp::Floor, y.clone()).eq(y.clone()));
        let half = y.clone() * E::F32(0.5);
        let odd = E::un(UnOp::Floor, half.clone()).ne(half);
        // A negative base takes an integer exponent, except -inf, whose
        // power is +inf's (IEEE `pow`, as the reference's `powf`).
        let not_integer = E::select(x.clone().eq(E::F32(f32::NEG_INFINITY)), mag.clone(), E::F32(f32::NAN));
        let negative = E::select(integer, E::select(odd, E::un(UnOp::Neg, mag.clone()), mag.clone()), not_integer);
        let r = E::select(x.clone().lt(E::F32(0.0)), negative, mag);
        // 1 to any power, and -1 to an infinite one, is 1 (0 * inf and a
        // NaN exponent would be NaN above); so is anything to the 0th.
        let infinite = E::un(UnOp::Abs, y.clone()).eq(E::F32(f32::INFINITY));
        let one = x.clone().eq(E::F32(1.0)).or(x.eq(E::F32(-1.0)).and(infinite)).or(y.eq(E::F32(0.0)));
        E::select(one, E::F32(1.0), r)
    }

    /// NaN test without relying on `x != x` surviving a fast-math compiler:
    /// the exponent bits all set and a non-zero mantissa.
    pub fn is_nan(&mut self, x: E) -> E {
        let bits = x.bits(Ty::U32);
        E::bin(BinOp::And, bits, E::U32(0x7fff_ffff)).cmp_gt(E::U32(0x7f80_0000))
    }

    /// Maximum or minimum with NaN propagated (ONNX's Max and Min).
    pub fn max_nan(&mut self, a: E, b: E, max: bool) -> E {
        let (a, b) = (self.let_(a), self.let_(b));
        let m = if max { a.clone().max(b.clone()) } else { a.clone().min(b.clone()) };
        let an = self.is_nan(a.clone());
        let bn = self.is_nan(b.clone());
        E::select(an, a, E::select(bn, b, m))
    }

    /// The plan's expression language in the kernel form: f32 or bool,
    /// reading operand `i` through `input(i)`.
    pub fn expr(&mut self, e: &Expr, input: &dyn Fn(usize) -> E) -> E {
        let f = E::F32;
        match e {
            Expr::Input(i) => input(*i),
            Expr::F32(x) => f(*x),
            Expr::Unary(u, x) => {
                let x = self.expr(x, input);
                match u {
                    Unary::Neg => E::un(UnOp::Neg, x),
                    Unary::Abs => E::un(UnOp::Abs, x),
                    Unary::Sqrt => E::un(UnOp::Sqrt, x),
                    Unary::Recip => f(1.0) / x,
                    Unary::Relu => {
                        // max(x, 0) keeping NaN.
                        let x = self.let_(x);
                        E::select(x.clone().lt(f(0.0)), f(0.0), x)
                    }
                    Unary::Floor => E::un(UnOp::Floor, x),
                    Unary::Ceil => E::un(UnOp::Ceil, x),
                    Unary::Round => E::un(UnOp::Round, x),
                    Unary::Exp => x.exp(),
                    Unary::Log => E::un(UnOp::Log, x),
                    Unary::Tanh => self.tanh(x),
                    Unary::Erf => self.erf(x),
                    Unary::Sigmoid => self.sigmoid(x),
                    Unary::Sin => E::un(UnOp::Sin, x),
                    Unary::Cos => E::un(UnOp::Cos, x),
                    Unary::Gelu => {
                        let x = self.let_(x);
                        let e = self.erf(x.clone() * f(std::f32::consts::FRAC_1_SQRT_2));
                        f(0.5) * x * (f(1.0) + e)
                    }
                    Unary::GeluTanh => {
                        // x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): as
                        // the CPU computes it, with no cancellation in 1 + tanh.
                        let x = self.let_(x);
                        let u =
                            E::fma(f(0.044_715) * x.clone(), x.clone() * x.clone(), x.clone()) * f(2.0 * 0.797_884_6);
                        let s = self.sigmoid(u);
                        x * s
                    }
                    Unary::Silu => {
                        let x = self.let_(x);
                        let s = self.sigmoid(x.clone());
                        x * s
                    }
                }
            }
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.expr(a, input), self.expr(b, input));
                match op {
                    Binary::Add => a + b,
                    Binary::Sub => a - b,
                    Binary::Mul => a * b,
                    Binary::Div => a / b,
                    Binary::Max => self.max_nan(a, b, true),
                    Binary::Min => self.max_nan(a, b, false),
                    Binary::Pow => self.pow(a, b),
                }
            }
            Expr::Compare(c, a, b) => {
                let (a, b) = (self.expr(a, input), self.expr(b, input));
                let op = match c {
                    Compare::Eq => CmpOp::Eq,
                    Compare::Lt => CmpOp::Lt,
                    Compare::Le => CmpOp::Le,
                    Compare::Gt => CmpOp::Gt,
                    Compare::Ge => CmpOp::Ge,
                };
                E::cmp(op, a, b)
            }
            Expr::Logic(l, a, b) => {
                let (a, b) = (self.expr(a, input), self.expr(b, input));
                match l {
                    Logic::And => a.and(b),
                    Logic::Or => a.or(b),
                    Logic::Xor => a.ne(b),
                }
            }
            Expr::Not(x) => E::un(UnOp::Not, self.expr(x, input)),
            Expr::IsNaN(x) => {
                let x = self.expr(x, input);
                self.is_nan(x)
            }
            Expr::Select(c, a, b) => {
                let (c, a, b) = (self.expr(c, input), self.expr(a, input), self.expr(b, input));
                E::select(c, a, b)
            }
            Expr::BoolToF32(x) => E::select(self.expr(x, input), f(1.0), f(0.0)),
            // NaN is non-zero: tested on the bits, as drivers need not
            // keep NaN's IEEE comparisons (lavapipe's `NaN != 0` is false).
            Expr::F32ToBool(x) => {
                let x = self.expr(x, input);
                let x = self.let_(x);
                let nan = self.is_nan(x.clone());
                x.ne(f(0.0)).or(nan)
            }
            // Integer operands are i32 words (see the module docs of `form`).
            Expr::IntToF32(x) => self.expr(x, input).cast(Ty::F32),
            Expr::IntToBool(x) => self.expr(x, input).ne(E::I32(0)),
        }
    }
}

impl E {
    pub fn cmp_gt(self, o: E) -> E {
        E::cmp(CmpOp::Gt, self, o)
    }
    pub fn le(self, o: E) -> E {
        E::cmp(CmpOp::Le, self, o)
    }
}
