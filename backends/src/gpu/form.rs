//! The GPU kernel form: what every GPU kernel algorithm is written in, and
//! what the WGSL (and PTX) printers render.
//!
//! A kernel is a grid of workgroups of `threads` invocations each. Its body
//! is structured code (no gotos) over four scalar types, with loads and
//! stores into a few word-addressed *spaces*: the arena (every value a run
//! computes, plus the inputs), the weights (constants, split into chunks no
//! larger than one binding), the kernel's parameters (sizes, offsets and
//! strides, read at run time so that kernels of one shape share their code)
//! and the error word. Workgroup memory holds f32 arrays; per-thread arrays
//! hold f32 values the thread indexes at run time.
//!
//! Every element in device memory is one 32-bit word: f32 as its bits, bool
//! as 0 or 1, and i32 and i64 alike as i32 (the compiler proves constants fit,
//! the runtime checks inputs; see `gpu::GpuError::IntRange`).

use std::fmt;

/// A scalar type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    F32,
    I32,
    U32,
    Bool,
}

/// Word-addressed device memory a kernel reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// Working memory of a run: intermediates, inputs and outputs (read-write).
    Arena,
    /// The i-th chunk of the constants (read-only).
    Weights(u32),
    /// A constant larger than one binding, over `chunks` consecutive
    /// chunks of `chunk_words` words from chunk `first` (GPT-2's token
    /// embedding is 154 MB; a binding may be 128 MiB). Printers with
    /// bindings split each index into a chunk and an offset.
    WeightsSpan { first: u32, chunks: u32, chunk_words: u32 },
    /// The kernel's own parameters (read-only, `u32`).
    Params,
    /// The run's error word: a kernel that finds a bad index stores its
    /// number (plus one) there and skips the access.
    Error,
}

/// A variable of the kernel body (a register).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub u32);

/// A workgroup-memory array of f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shared(pub u32);

/// A per-thread array of f32, indexed at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Local(pub u32);

/// Built-in values of the invocation, all `u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Builtin {
    /// The invocation's index in its workgroup (`0..threads`).
    Thread,
    /// The workgroup's index along an axis of the grid.
    Group(u8),
    /// Workgroups in the grid along an axis.
    Groups(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Abs,
    Sqrt,
    Floor,
    Ceil,
    /// Round half to even.
    Round,
    Exp,
    Log,
    Sin,
    Cos,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// Integer remainder (operands non-negative where used).
    Rem,
    /// IEEE maximum and minimum of two non-NaN values (NaNs are handled by
    /// the algorithm where they matter).
    Max,
    Min,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A scalar expression. Types are checked by `Kernel::ty_of`; a mismatch
/// is a bug in the algorithm that built the kernel.
#[derive(Clone, Debug)]
pub enum E {
    F32(f32),
    I32(i32),
    U32(u32),
    Bool(bool),
    Var(Var),
    Builtin(Builtin),
    /// The i-th parameter word (`u32`).
    Param(u32),
    /// A `u32` word of a space at an `i32` or `u32` word index.
    Load(Space, Box<E>),
    LoadShared(Shared, Box<E>),
    LoadLocal(Local, Box<E>),
    Un(UnOp, Box<E>),
    Bin(BinOp, Box<E>, Box<E>),
    /// `a * b + c` on f32, fused where the target has it.
    Fma(Box<E>, Box<E>, Box<E>),
    Cmp(CmpOp, Box<E>, Box<E>),
    /// `cond ? a : b`, both sides evaluated.
    Select(Box<E>, Box<E>, Box<E>),
    /// A numeric conversion (f32 <-> i32 <-> u32, bool -> number).
    Cast(Ty, Box<E>),
    /// The same 32 bits as another type (f32 <-> u32 <-> i32).
    Bits(Ty, Box<E>),
}

/// Expressions are equal when they print alike: float constants compare by
/// their bits (so `-0.0` is not `0.0`, and a NaN equals itself), which is
/// what lets two kernels that are the same shader be found equal without
/// printing them (`gpu::compile` and the runtimes' caches of compiled
/// kernels compare kernels, once per step and set of values).
impl PartialEq for E {
    fn eq(&self, other: &E) -> bool {
        use E::*;
        match (self, other) {
            (F32(a), F32(b)) => a.to_bits() == b.to_bits(),
            (I32(a), I32(b)) => a == b,
            (U32(a), U32(b)) => a == b,
            (Bool(a), Bool(b)) => a == b,
            (Var(a), Var(b)) => a == b,
            (Builtin(a), Builtin(b)) => a == b,
            (Param(a), Param(b)) => a == b,
            (Load(s, a), Load(t, b)) => s == t && a == b,
            (LoadShared(s, a), LoadShared(t, b)) => s == t && a == b,
            (LoadLocal(s, a), LoadLocal(t, b)) => s == t && a == b,
            (Un(o, a), Un(p, b)) => o == p && a == b,
            (Bin(o, a, x), Bin(p, b, y)) => o == p && a == b && x == y,
            (Cmp(o, a, x), Cmp(p, b, y)) => o == p && a == b && x == y,
            (Fma(a, b, c), Fma(x, y, z)) | (Select(a, b, c), Select(x, y, z)) => a == x && b == y && c == z,
            (Cast(t, a), Cast(u, b)) | (Bits(t, a), Bits(u, b)) => t == u && a == b,
            _ => false,
        }
    }
}

/// A statement of a kernel body.
#[derive(Clone, Debug, PartialEq)]
pub enum S {
    /// Declares a variable with its first value.
    Let(Var, E),
    /// Assigns a declared variable.
    Set(Var, E),
    /// Stores a `u32` word at an index of a space.
    Store(Space, E, E),
    StoreShared(Shared, E, E),
    StoreLocal(Local, E, E),
    /// `for (var = from; var < to; var += step)` over i32 (or u32) values.
    For {
        var: Var,
        from: E,
        to: E,
        step: E,
        body: Vec<S>,
    },
    If(E, Vec<S>, Vec<S>),
    /// Every invocation of the workgroup contributes `value` (f32); after
    /// it, `into` holds their combination in every invocation. `scratch`
    /// holds one f32 per invocation. A workgroup-wide step like a barrier:
    /// only in uniform control flow. Printers render it their best way: a
    /// tree in workgroup memory (WGSL), warp shuffles and then the warps'
    /// partials (PTX).
    Reduce {
        how: Reduction,
        value: E,
        into: Var,
        scratch: Shared,
    },
    /// Loads the 4 words at `index` (a multiple of 4) of a space into
    /// `into`: one vector load where the target has them.
    Load4 {
        space: Space,
        index: E,
        into: [Var; 4],
    },
    /// Loads the 4 f32 at `index` (a multiple of 4) of a workgroup array
    /// into `into`: one 16-byte load where the target has them.
    LoadShared4 {
        shared: Shared,
        index: E,
        into: [Var; 4],
    },
    /// Stores 4 f32 at `index` (a multiple of 4) of a workgroup array: one
    /// 16-byte store where the target has them.
    StoreShared4 {
        shared: Shared,
        index: E,
        values: [E; 4],
    },
    /// A warp's tensor-core product `D = A B + C` of shape m16n8k8 in f32
    /// (`mma.sync`, tf32): each lane (group `g = lane / 4`, member `t =
    /// lane % 4`) gives its fragment of A (rows `g`, `g + 8`, `g`, `g + 8`
    /// of columns `t`, `t`, `t + 4`, `t + 4`) and B (rows `t` and `t + 4` of
    /// column `g`), rounded to `precision`, and `acc` (four values at
    /// `Precision::c_at`) becomes D. Printers without tensor
    /// cores have none of these kernels (`--precision` needs PTX).
    Mma {
        precision: Precision,
        a: [E; 4],
        b: [E; 2],
        acc: [Var; 4],
    },
    /// Starts copying the 4 words at `src` (a multiple of 4) of a space to
    /// `index` (a multiple of 4) of a workgroup array, without registers
    /// (`cp.async`, PTX only): the first `words` of them (0 to 4), zeros
    /// after. The copy lands by the next `S::CopyWait`.
    CopyAsync {
        shared: Shared,
        index: E,
        space: Space,
        src: E,
        words: E,
    },
    /// Waits for this invocation's `S::CopyAsync`s (a barrier after it
    /// makes them visible to the workgroup).
    CopyWait,
    /// Two f32 rounded to bf16 (to nearest, ties to even) and packed in one
    /// u32, `lo` in the low half: a tensor-core operand pair.
    PackBf16 {
        lo: E,
        hi: E,
        into: Var,
    },
    /// A warp's `ldmatrix.x4` (tensor-core kernels, PTX only): four 8 x 8
    /// matrices of 16-bit values from a workgroup array, lane `8i + j`
    /// giving the word of row `j` of matrix `i` (4 words, 16-byte aligned)
    /// in `index`; `into[i]` gets the lane's pair of matrix `i`: row
    /// `lane / 4`, columns `2 (lane % 4)` and one more, or with `trans` rows
    /// `2 (lane % 4)` and one more of column `lane / 4`, the first in the
    /// low half.
    LoadMatrix {
        shared: Shared,
        index: E,
        trans: bool,
        into: [Var; 4],
    },
    /// A warp's m16n8k16 tensor-core product on bf16 pairs (PTX only):
    /// `a` four u32 registers (rows `g` and `g + 8`, columns `2t` and `2t +
    /// 8` of the 16 x 16 tile, two values each), `b` two (rows `2t` and
    /// `2t + 8` of column `g`), `acc` four f32 as `Precision::c_at` says.
    MmaBf16 {
        a: [E; 4],
        b: [E; 2],
        acc: [Var; 4],
    },
    /// Waits for every invocation of the workgroup, and makes workgroup
    /// memory written before it visible after it. Only in uniform control
    /// flow: every invocation of a workgroup reaches the same barriers.
    Barrier,
}

/// The arithmetic of matrix products: f32 FMA, or tensor cores on
/// inputs rounded to tf32 or bf16 (f32 accumulation either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    #[default]
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// (row, column) in the 16 x 8 accumulator of element `i`.
    pub fn c_at(i: usize, group: u32, member: u32) -> (u32, u32) {
        (group + 8 * (i as u32 / 2), 2 * member + i as u32 % 2)
    }
}

/// How `S::Reduce` combines values. Maximum and minimum propagate NaN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduction {
    Sum,
    Max,
    Min,
}

/// One GPU kernel: a grid of workgroups running `body`.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// A name that says what the kernel does (`matmul_64x64`, `map_3d`).
    pub name: String,
    /// Invocations per workgroup (one dimension).
    pub threads: u32,
    pub vars: Vec<Ty>,
    /// Element counts of the workgroup-memory arrays.
    pub shared: Vec<u32>,
    /// Element counts of the per-thread arrays.
    pub locals: Vec<u32>,
    pub body: Vec<S>,
}

impl Kernel {
    /// The spaces the body reads or writes, in order, a span as its
    /// chunks: what it binds.
    pub fn spaces(&self) -> Vec<Space> {
        let mut out: Vec<Space> = self
            .used_spaces()
            .into_iter()
            .flat_map(|s| match s {
                Space::WeightsSpan { first, chunks, .. } => (first..first + chunks).map(Space::Weights).collect(),
                s => vec![s],
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The spaces the body names, spans as they are.
    pub fn used_spaces(&self) -> Vec<Space> {
        fn e(x: &E, out: &mut Vec<Space>) {
            match x {
                E::Load(s, i) => {
                    out.push(*s);
                    e(i, out)
                }
                E::LoadShared(_, i) | E::LoadLocal(_, i) | E::Un(_, i) | E::Cast(_, i) | E::Bits(_, i) => e(i, out),
                E::Bin(_, a, b) | E::Cmp(_, a, b) => {
                    e(a, out);
                    e(b, out)
                }
                E::Fma(a, b, c) | E::Select(a, b, c) => {
                    e(a, out);
                    e(b, out);
                    e(c, out)
                }
                E::F32(_) | E::I32(_) | E::U32(_) | E::Bool(_) | E::Var(_) | E::Builtin(_) => {}
                E::Param(_) => out.push(Space::Params),
            }
        }
        fn s(st: &[S], out: &mut Vec<Space>) {
            for x in st {
                match x {
                    S::Let(_, v) | S::Set(_, v) => e(v, out),
                    S::Store(sp, i, v) => {
                        out.push(*sp);
                        e(i, out);
                        e(v, out)
                    }
                    S::StoreShared(_, i, v) | S::StoreLocal(_, i, v) => {
                        e(i, out);
                        e(v, out)
                    }
                    S::For { from, to, step, body, .. } => {
                        e(from, out);
                        e(to, out);
                        e(step, out);
                        s(body, out)
                    }
                    S::If(c, a, b) => {
                        e(c, out);
                        s(a, out);
                        s(b, out)
                    }
                    S::Reduce { value, .. } => e(value, out),
                    S::Mma { a, b, .. } => a.iter().chain(b).for_each(|x| e(x, out)),
                    S::Load4 { space, index, .. } => {
                        out.push(*space);
                        e(index, out)
                    }
                    S::LoadShared4 { index, .. } | S::LoadMatrix { index, .. } => e(index, out),
                    S::CopyAsync { index, space, src, words, .. } => {
                        out.push(*space);
                        e(index, out);
                        e(src, out);
                        e(words, out)
                    }
                    S::CopyWait => {}
                    S::PackBf16 { lo, hi, .. } => {
                        e(lo, out);
                        e(hi, out)
                    }
                    S::MmaBf16 { a, b, .. } => a.iter().chain(b).for_each(|x| e(x, out)),
                    S::StoreShared4 { index, values, .. } => {
                        e(index, out);
                        values.iter().for_each(|x| e(x, out))
                    }
                    S::Barrier => {}
                }
            }
        }
        let mut out = Vec::new();
        s(&self.body, &mut out);
        out.sort();
        out.dedup();
        out
    }

    /// The type of an expression; panics on an ill-typed one, which is a
    /// bug in the algorithm that built it (the kernel tests build every kind).
    pub fn ty_of(&self, x: &E) -> Ty {
        ty_of(&self.vars, x)
    }
}

/// The type of `x` given the types of the variables; panics on an ill-typed
/// expression (see `Kernel::ty_of`).
pub fn ty_of(vars: &[Ty], x: &E) -> Ty {
    let ty = |e: &E| ty_of(vars, e);
    {
        match x {
            E::F32(_) => Ty::F32,
            E::I32(_) => Ty::I32,
            E::U32(_) | E::Builtin(_) | E::Param(_) | E::Load(..) => Ty::U32,
            E::Bool(_) | E::Cmp(..) => Ty::Bool,
            E::Var(v) => vars[v.0 as usize],
            E::LoadShared(..) | E::LoadLocal(..) | E::Fma(..) => Ty::F32,
            E::Un(UnOp::Not, a) => {
                let t = ty(a);
                assert!(t == Ty::Bool, "not of {t:?}");
                t
            }
            E::Un(_, a) => ty(a),
            E::Bin(_, a, b) => {
                let (ta, tb) = (ty(a), ty(b));
                assert_eq!(ta, tb, "binary operands in {x:?}");
                ta
            }
            E::Select(_, a, b) => {
                let (ta, tb) = (ty(a), ty(b));
                assert_eq!(ta, tb, "select operands in {x:?}");
                ta
            }
            E::Cast(t, _) | E::Bits(t, _) => *t,
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::F32 => "f32",
            Ty::I32 => "i32",
            Ty::U32 => "u32",
            Ty::Bool => "bool",
        })
    }
}

// Building expressions reads better with operators and short constructors.

impl std::ops::Add for E {
    type Output = E;
    fn add(self, o: E) -> E {
        E::Bin(BinOp::Add, Box::new(self), Box::new(o))
    }
}
impl std::ops::Sub for E {
    type Output = E;
    fn sub(self, o: E) -> E {
        E::Bin(BinOp::Sub, Box::new(self), Box::new(o))
    }
}
impl std::ops::Mul for E {
    type Output = E;
    fn mul(self, o: E) -> E {
        E::Bin(BinOp::Mul, Box::new(self), Box::new(o))
    }
}
impl std::ops::Div for E {
    type Output = E;
    fn div(self, o: E) -> E {
        E::Bin(BinOp::Div, Box::new(self), Box::new(o))
    }
}
impl std::ops::Rem for E {
    type Output = E;
    fn rem(self, o: E) -> E {
        E::Bin(BinOp::Rem, Box::new(self), Box::new(o))
    }
}

impl E {
    pub fn un(op: UnOp, a: E) -> E {
        E::Un(op, Box::new(a))
    }
    pub fn bin(op: BinOp, a: E, b: E) -> E {
        E::Bin(op, Box::new(a), Box::new(b))
    }
    pub fn cmp(op: CmpOp, a: E, b: E) -> E {
        E::Cmp(op, Box::new(a), Box::new(b))
    }
    pub fn lt(self, o: E) -> E {
        E::cmp(CmpOp::Lt, self, o)
    }
    pub fn ge(self, o: E) -> E {
        E::cmp(CmpOp::Ge, self, o)
    }
    pub fn eq(self, o: E) -> E {
        E::cmp(CmpOp::Eq, self, o)
    }
    pub fn ne(self, o: E) -> E {
        E::cmp(CmpOp::Ne, self, o)
    }
    pub fn and(self, o: E) -> E {
        E::bin(BinOp::And, self, o)
    }
    pub fn or(self, o: E) -> E {
        E::bin(BinOp::Or, self, o)
    }
    pub fn max(self, o: E) -> E {
        E::bin(BinOp::Max, self, o)
    }
    pub fn min(self, o: E) -> E {
        E::bin(BinOp::Min, self, o)
    }
    pub fn select(cond: E, a: E, b: E) -> E {
        E::Select(Box::new(cond), Box::new(a), Box::new(b))
    }
    pub fn fma(a: E, b: E, c: E) -> E {
        E::Fma(Box::new(a), Box::new(b), Box::new(c))
    }
    pub fn cast(self, t: Ty) -> E {
        E::Cast(t, Box::new(self))
    }
    pub fn bits(self, t: Ty) -> E {
        E::Bits(t, Box::new(self))
    }
    pub fn load(space: Space, index: E) -> E {
        E::Load(space, Box::new(index))
    }
    /// An f32 element of a space.
    pub fn load_f32(space: Space, index: E) -> E {
        E::load(space, index).bits(Ty::F32)
    }
    /// Parameter `i` as an i32 (sizes, offsets and strides; offsets and
    /// strides may be negative, stored as their two's complement).
    pub fn param(i: u32) -> E {
        E::Param(i).bits(Ty::I32)
    }
    pub fn exp(self) -> E {
        E::un(UnOp::Exp, self)
    }
}
