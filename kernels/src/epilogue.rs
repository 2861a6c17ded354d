//! Matmul epilogues: an elementwise expression of the product and of other
//! operands (a bias row, a residual), applied to the product's rows right
//! after the GEMM wrote them, in place.
//!
//! The expression arrives as a small postfix program (encoded by
//! `egret-backends`, `cpu::library::encode_epilogue`), kept in a
//! data object beside the kernel's code. It is interpreted a block of
//! `BLOCK` columns at a time: every instruction runs over a whole block of
//! lanes, so the dispatch costs once per block and the arithmetic is
//! vectorised like any lane loop here.

use super::{erf, exp, multiversion, tanh};

/// Columns per interpreted block: wide enough that dispatching an
/// instruction costs little next to running it over the block.
pub const BLOCK: usize = 256;

/// The most values an epilogue program's stack holds (the plan admits
/// only expressions that fit).
pub const MAX_DEPTH: usize = 8;

// Program layout (i64 words), as `egret-backends` encodes it:
//   m, n, slot of c, number of operands,
//   per operand: slot, offset, row stride, column stride (elements),
//   number of instructions, then three words per instruction: kind, a, b.
// Leaves (`b` of a push or of a binary-with-leaf) are the product, an
// operand (its index) or a constant (its bits).
/// Push leaf `b` of kind `a`.
pub const OP_PUSH: i64 = 0;
/// Replace the top with unary `a` of it.
pub const OP_UNARY: i64 = 1;
/// Pop the top, combine it into the new top: `below = a(below, top)`.
pub const OP_BINARY: i64 = 2;
/// `top = a(top, leaf)` for the three kinds of leaf: no push, no pop.
pub const OP_BINARY_PRODUCT: i64 = 3;
pub const OP_BINARY_OPERAND: i64 = 4;
pub const OP_BINARY_CONST: i64 = 5;

pub const LEAF_PRODUCT: i64 = 0;
pub const LEAF_OPERAND: i64 = 1;
pub const LEAF_CONST: i64 = 2;

/// The unary operators a program applies, by code (`a` of `OP_UNARY`):
/// the plan's `Unary` operators, with the same semantics.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    Neg,
    Abs,
    Sqrt,
    Recip,
    Relu,
    Floor,
    Ceil,
    Round,
    Exp,
    Log,
    Tanh,
    Erf,
    Sigmoid,
    Sin,
    Cos,
    Gelu,
    GeluTanh,
    Silu,
}

const UNARIES: [Unary; 18] = [
    Unary::Neg,
    Unary::Abs,
    Unary::Sqrt,
    Unary::Recip,
    Unary::Relu,
    Unary::Floor,
    Unary::Ceil,
    Unary::Round,
    Unary::Exp,
    Unary::Log,
    Unary::Tanh,
    Unary::Erf,
    Unary::Sigmoid,
    Unary::Sin,
    Unary::Cos,
    Unary::Gelu,
    Unary::GeluTanh,
    Unary::Silu,
];

/// The binary operators, by code (`a` of the binary instructions).
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

const BINARIES: [Binary; 7] =
    [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div, Binary::Max, Binary::Min, Binary::Pow];

/// Applies the epilogue program to the product at `c` (`m` rows of `n`,
/// contiguous), in place.
///
/// # Safety
/// `program` is what `egret-backends` encoded for this kernel, `args` its operand
/// addresses, and every operand holds the elements the program addresses.
#[no_mangle]
pub unsafe extern "C" fn egret_epilogue(program: *const i64, args: *const *mut u8, c: *mut f32) {
    let m = unsafe { *program } as usize;
    let n = unsafe { *program.add(1) } as usize;
    let threads = super::threads();
    let work = m * n;
    // Splitting rows across threads pays only for big products.
    if threads > 1 && m > 1 && work >= 1 << 15 {
        let parts = threads.min(m);
        let (program, args, c) = (program as usize, args as usize, c as usize);
        rayon::scope(|s| {
            for p in 0..parts {
                s.spawn(move |_| unsafe {
                    rows(
                        program as *const i64,
                        args as *const *mut u8,
                        c as *mut f32,
                        m * p / parts,
                        m * (p + 1) / parts,
                        0,
                        n,
                    )
                });
            }
        });
    } else {
        unsafe { rows(program, args, c, 0, m, 0, n) };
    }
}

multiversion! {
    /// Rows `r0..r1`, columns `j_begin..j_end` of the epilogue (the packed
    /// GEMM calls this for the columns each thread computed).
    pub unsafe fn rows(
        program: *const i64,
        args: *const *mut u8,
        c: *mut f32,
        r0: usize,
        r1: usize,
        j_begin: usize,
        j_end: usize,
    ) = rows_impl;
}

/// One operand of the program: its first element and strides.
#[derive(Clone, Copy)]
struct Operand {
    base: *const f32,
    rs: isize,
    cs: isize,
}

#[inline(always)]
unsafe fn rows_impl<const FMA: bool>(
    program: *const i64,
    args: *const *mut u8,
    c: *mut f32,
    r0: usize,
    r1: usize,
    j_begin: usize,
    j_end: usize,
) {
    let word = |i: usize| unsafe { *program.add(i) };
    let n = word(1) as usize;
    let n_operands = word(3) as usize;
    let mut operands = [Operand { base: std::ptr::null(), rs: 0, cs: 0 }; 8];
    for (k, op) in operands.iter_mut().enumerate().take(n_operands.min(8)) {
        let at = 4 + 4 * k;
        let base = unsafe { *args.add(word(at) as usize) as *const f32 };
        *op = Operand {
            base: unsafe { base.offset(word(at + 1) as isize) },
            rs: word(at + 2) as isize,
            cs: word(at + 3) as isize,
        };
    }
    let code_at = 4 + 4 * n_operands;
    let n_code = word(code_at) as usize;
    let code = unsafe { std::slice::from_raw_parts(program.add(code_at + 1), 3 * n_code) };
    let mut stack = [[0f32; BLOCK]; MAX_DEPTH];
    // A strided operand is gathered here before it is combined.
    let mut gathered = [0f32; BLOCK];
    for r in r0..r1 {
        let row = unsafe { c.add(r * n) };
        let mut j0 = j_begin;
        while j0 < j_end {
            let w = BLOCK.min(j_end - j0);
            let product = unsafe { std::slice::from_raw_parts(row.add(j0), w) };
            let operand = |i: i64| {
                let op = operands[i as usize];
                (unsafe { op.base.offset(r as isize * op.rs + j0 as isize * op.cs) }, op.cs)
            };
            let mut sp = 0;
            for ins in code.chunks_exact(3) {
                let (kind, a, b) = (ins[0], ins[1], ins[2]);
                match kind {
                    OP_PUSH => {
                        let top = &mut stack[sp];
                        match a {
                            LEAF_PRODUCT => top[..w].copy_from_slice(product),
                            LEAF_OPERAND => {
                                let (start, cs) = operand(b);
                                unsafe { load(top, start, cs, w) };
                            }
                            _ => top.fill(f32::from_bits(b as u32)),
                        }
                        sp += 1;
                    }
                    OP_UNARY => unary::<FMA>(UNARIES[a as usize], &mut stack[sp - 1][..w]),
                    OP_BINARY => {
                        let (lower, upper) = stack.split_at_mut(sp - 1);
                        binary(BINARIES[a as usize], &mut lower[sp - 2][..w], &upper[0][..w]);
                        sp -= 1;
                    }
                    OP_BINARY_PRODUCT => binary(BINARIES[a as usize], &mut stack[sp - 1][..w], product),
                    OP_BINARY_OPERAND => {
                        let (start, cs) = operand(b);
                        let top = &mut stack[sp - 1][..w];
                        match cs {
                            1 => binary(BINARIES[a as usize], top, unsafe { std::slice::from_raw_parts(start, w) }),
                            0 => binary_scalar(BINARIES[a as usize], top, unsafe { *start }),
                            _ => {
                                unsafe { load(&mut gathered, start, cs, w) };
                                binary(BINARIES[a as usize], top, &gathered[..w]);
                            }
                        }
                    }
                    _ => binary_scalar(BINARIES[a as usize], &mut stack[sp - 1][..w], f32::from_bits(b as u32)),
                }
            }
            let dst = unsafe { std::slice::from_raw_parts_mut(row.add(j0), w) };
            dst.copy_from_slice(&stack[0][..w]);
            j0 += w;
        }
    }
}

/// `w` elements `cs` apart from `start` into the block.
#[inline(always)]
unsafe fn load(block: &mut [f32; BLOCK], start: *const f32, cs: isize, w: usize) {
    match cs {
        1 => block[..w].copy_from_slice(unsafe { std::slice::from_raw_parts(start, w) }),
        0 => block.fill(unsafe { *start }),
        _ => {
            for (l, x) in block[..w].iter_mut().enumerate() {
                *x = unsafe { *start.offset(l as isize * cs) };
            }
        }
    }
}

/// NaN-propagating max and min, as the generated code's `fmax`/`fmin`.
#[inline(always)]
fn max_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn min_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a < b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn unary<const FMA: bool>(u: Unary, x: &mut [f32]) {
    #[inline(always)]
    fn each(x: &mut [f32], f: impl Fn(f32) -> f32) {
        for v in x.iter_mut() {
            *v = f(*v);
        }
    }
    match u {
        Unary::Neg => each(x, |v| -v),
        Unary::Abs => each(x, f32::abs),
        Unary::Sqrt => each(x, f32::sqrt),
        Unary::Recip => each(x, |v| 1.0 / v),
        Unary::Relu => each(x, |v| if v > 0.0 || v.is_nan() { v } else { 0.0 }),
        Unary::Floor => each(x, f32::floor),
        Unary::Ceil => each(x, f32::ceil),
        Unary::Round => each(x, f32::round_ties_even),
        Unary::Exp => each(x, exp::<FMA>),
        Unary::Log => each(x, f32::ln),
        Unary::Tanh => each(x, tanh::<FMA>),
        Unary::Erf => each(x, erf::<FMA>),
        Unary::Sigmoid => each(x, sigmoid::<FMA>),
        Unary::Sin => each(x, f32::sin),
        Unary::Cos => each(x, f32::cos),
        Unary::Gelu => each(x, |v| v * 0.5 * (erf::<FMA>(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0)),
        Unary::GeluTanh => {
            let (c1, c3) = super::gelu_tanh_coefficients();
            each(x, |v| v * sigmoid::<FMA>(super::madd::<FMA>(v * v, c3, c1) * v))
        }
        Unary::Silu => each(x, |v| v * sigmoid::<FMA>(v)),
    }
}

#[inline(always)]
fn sigmoid<const FMA: bool>(v: f32) -> f32 {
    1.0 / (1.0 + exp::<FMA>(-v))
}

/// The binary operator on two floats, as the generated code computes it.
#[inline(always)]
fn apply(b: Binary, x: f32, y: f32) -> f32 {
    match b {
        Binary::Add => x + y,
        Binary::Sub => x - y,
        Binary::Mul => x * y,
        Binary::Div => x / y,
        Binary::Max => max_nan(x, y),
        Binary::Min => min_nan(x, y),
        Binary::Pow => x.powf(y),
    }
}

/// `x = b(x, y)` lane by lane; one loop per operator so each vectorises.
#[inline(always)]
fn binary(b: Binary, x: &mut [f32], y: &[f32]) {
    macro_rules! each {
        ($op:expr) => {
            for (a, &c) in x.iter_mut().zip(y) {
                *a = apply($op, *a, c);
            }
        };
    }
    match b {
        Binary::Add => each!(Binary::Add),
        Binary::Sub => each!(Binary::Sub),
        Binary::Mul => each!(Binary::Mul),
        Binary::Div => each!(Binary::Div),
        Binary::Max => each!(Binary::Max),
        Binary::Min => each!(Binary::Min),
        Binary::Pow => each!(Binary::Pow),
    }
}

/// `x = b(x, y)` for a scalar `y`.
#[inline(always)]
fn binary_scalar(b: Binary, x: &mut [f32], y: f32) {
    macro_rules! each {
        ($op:expr) => {
            for a in x.iter_mut() {
                *a = apply($op, *a, y);
            }
        };
    }
    match b {
        Binary::Add => each!(Binary::Add),
        Binary::Sub => each!(Binary::Sub),
        Binary::Mul => each!(Binary::Mul),
        Binary::Div => each!(Binary::Div),
        Binary::Max => each!(Binary::Max),
        Binary::Min => each!(Binary::Min),
        Binary::Pow => each!(Binary::Pow),
    }
}
