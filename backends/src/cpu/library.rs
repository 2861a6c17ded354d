//! The plan's side of the kernel library (`egret-kernels`): the parameter
//! blocks and epilogue programs its kernels read, filled in from plan
//! kernels, and how the scheduler may split each kernel. The library
//! defines the layouts; this module is the only writer of them.

use crate::plan::{known, AttentionKernel, Binary, Epilogue, Expr, KernelKind, RowKernel, RowOp, Unary};
use egret_ir::Dim;
use egret_kernels::attention::AttentionParams;
use egret_kernels::epilogue as program;
use egret_kernels::pool::Split;
use egret_kernels::rows::{RowParams, OP_LAYER_NORM, OP_RMS_NORM, OP_SOFTMAX};

/// An attention kernel's parameter block.
///
/// `k` must be known (`AttentionKernel::at` gives a symbolic kernel's
/// values for one call; the runtime builds its block per call then).
pub fn attention_params(k: &AttentionKernel) -> AttentionParams {
    // A symbolic batch axis is listed out by `AttentionKernel::at` first.
    assert!(k.outer.is_none(), "attention parameters of a kernel with a symbolic batch axis");
    let s = |st: [Dim; 2]| st.map(|x| known(x) as i64);
    AttentionParams {
        sq: known(k.sq) as i64,
        sk: known(k.sk) as i64,
        d: k.d as i64,
        dv: k.dv as i64,
        block: k.block as i64,
        key_block: k.key_block as i64,
        has_mask: k.mask.is_some() as i64,
        nan_to_zero: k.nan_to_zero as i64,
        out_rs: known(k.out_row_stride) as i64,
        batches: k.batches.len() as i64,
        has_spans: k.key_spans.is_some() as i64,
        q_strides: s(k.q_strides),
        kt_strides: s(k.kt_strides),
        v_strides: s(k.v_strides),
        mask_strides: s(k.mask_strides),
        scale: k.scale as f64,
        softcap: k.softcap.unwrap_or(0.0) as f64,
    }
}

/// An attention kernel's table: its per-batch offsets, then its key spans
/// if it has them, as the library reads them (i64 each). `k` must be known,
/// as for `attention_params`.
pub fn attention_table(k: &AttentionKernel) -> Vec<u8> {
    let offsets = k.batches.iter().flatten().map(|&d| known(d) as i64);
    let spans = k.key_spans.iter().flatten().flatten().map(|&x| x as i64);
    offsets.chain(spans).flat_map(|x| x.to_le_bytes()).collect()
}

/// A row kernel's parameter block, if the library has its op.
pub fn row_params(k: &RowKernel) -> Option<RowParams> {
    let (op, epsilon) = match k.op {
        RowOp::LayerNorm { epsilon } => (OP_LAYER_NORM, epsilon),
        RowOp::RmsNorm { epsilon } => (OP_RMS_NORM, epsilon),
        RowOp::Softmax => (OP_SOFTMAX, 0.0),
        _ => return None,
    };
    Some(RowParams {
        op,
        // A symbolic length: the generated kernel (`rows::emit`) reads its slot.
        len: k.len.known()?,
        has_scale: k.scale.is_some() as i64,
        has_bias: k.bias.is_some() as i64,
        has_residual: k.residual.is_some() as i64,
        epsilon: epsilon as f64,
    })
}

const _: () = assert!(crate::plan::EPILOGUE_MAX_DEPTH <= program::MAX_DEPTH);

/// The epilogue of an `m x n` product as the program `egret_epilogue` runs;
/// `c_slot` is the product's operand slot in the kernel's arguments and
/// `first_slot` that of the epilogue's first operand.
pub fn encode_epilogue(e: &Epilogue, m: usize, n: usize, c_slot: usize, first_slot: usize) -> Vec<u8> {
    let mut w: Vec<i64> = vec![m as i64, n as i64, c_slot as i64, e.inputs.len() as i64];
    for (i, op) in e.inputs.iter().enumerate() {
        w.extend([(first_slot + i) as i64, op.offset as i64, op.strides[0] as i64, op.strides[1] as i64]);
    }
    let mut code = Vec::new();
    postfix(&e.expr, &mut code);
    w.push(code.len() as i64 / 3);
    w.extend(code);
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn unary_code(u: Unary) -> i64 {
    use program::Unary as U;
    (match u {
        Unary::Neg => U::Neg,
        Unary::Abs => U::Abs,
        Unary::Sqrt => U::Sqrt,
        Unary::Recip => U::Recip,
        Unary::Relu => U::Relu,
        Unary::Floor => U::Floor,
        Unary::Ceil => U::Ceil,
        Unary::Round => U::Round,
        Unary::Exp => U::Exp,
        Unary::Log => U::Log,
        Unary::Tanh => U::Tanh,
        Unary::Erf => U::Erf,
        Unary::Sigmoid => U::Sigmoid,
        Unary::Sin => U::Sin,
        Unary::Cos => U::Cos,
        Unary::Gelu => U::Gelu,
        Unary::GeluTanh => U::GeluTanh,
        Unary::Silu => U::Silu,
    }) as i64
}

fn binary_code(b: Binary) -> i64 {
    use program::Binary as B;
    (match b {
        Binary::Add => B::Add,
        Binary::Sub => B::Sub,
        Binary::Mul => B::Mul,
        Binary::Div => B::Div,
        Binary::Max => B::Max,
        Binary::Min => B::Min,
        Binary::Pow => B::Pow,
    }) as i64
}

/// A leaf as (kind, value), if `e` is one.
fn leaf(e: &Expr) -> Option<(i64, i64)> {
    match e {
        Expr::Input(0) => Some((program::LEAF_PRODUCT, 0)),
        Expr::Input(i) => Some((program::LEAF_OPERAND, *i as i64 - 1)),
        Expr::F32(x) => Some((program::LEAF_CONST, x.to_bits() as i64)),
        _ => None,
    }
}

fn postfix(e: &Expr, out: &mut Vec<i64>) {
    if let Some((kind, value)) = leaf(e) {
        out.extend([program::OP_PUSH, kind, value]);
        return;
    }
    match e {
        Expr::Unary(u, x) => {
            postfix(x, out);
            out.extend([program::OP_UNARY, unary_code(*u), 0]);
        }
        Expr::Binary(b, x, y) => {
            let code = binary_code(*b);
            let commutes = matches!(b, Binary::Add | Binary::Mul | Binary::Max | Binary::Min);
            // A leaf on the right combines straight from memory; on the
            // left of an operator that commutes, it moves to the right.
            let (x, y) = if commutes && leaf(x).is_some() && leaf(y).is_none() { (y, x) } else { (x, y) };
            postfix(x, out);
            match leaf(y) {
                Some((program::LEAF_PRODUCT, _)) => out.extend([program::OP_BINARY_PRODUCT, code, 0]),
                Some((program::LEAF_OPERAND, i)) => out.extend([program::OP_BINARY_OPERAND, code, i]),
                Some((_, bits)) => out.extend([program::OP_BINARY_CONST, code, bits]),
                None => {
                    postfix(y, out);
                    out.extend([program::OP_BINARY, code, 0]);
                }
            }
        }
        // `Epilogue::supports` admits nothing else.
        other => unreachable!("not an epilogue expression: {other}"),
    }
}

/// Kernels with less work than this (elements touched, or multiply-adds)
/// run on one thread: waking workers would cost more than it saves (at
/// 2^16 the zoo's small models ran slower on two threads than on one).
const PARALLEL_WORK: usize = 1 << 18;

/// How the scheduler may split a kernel across threads (at run time, the
/// split also needs a pool of more than one thread and a parallel extent
/// of more than one), its symbolic sizes at their nominal values.
pub fn split_of(kind: &KernelKind) -> Split {
    split_with(kind, &|d| d.estimate())
}

/// `split_of` at a call's values of the symbols: the JIT's runtime decides
/// per set of values (a decoder's concatenations and attention over a long
/// past split; over a short one they stay on one thread).
pub fn split_at(kind: &KernelKind, values: &egret_ir::DimValues) -> Split {
    split_with(kind, &|d| values.get(d).map_or(d.estimate(), |v| v.max(0) as usize))
}

fn split_with(kind: &KernelKind, size: &dyn Fn(Dim) -> usize) -> Split {
    let work = |kind| work(kind, size);
    match kind {
        KernelKind::Reference { .. } | KernelKind::Loop { .. } => Split::Never,
        // A product with fewer batches than threads parallelises inside
        // the GEMM instead.
        // So does one that streams a large weight (a decode step's rows).
        KernelKind::MatMul(mm)
            if work(kind) >= egret_kernels::MATMUL_PARALLEL_MACS
                || mm.k * mm.n >= egret_kernels::MATVEC_PARALLEL_WEIGHTS =>
        {
            Split::Batches
        }
        KernelKind::MatMul(_) => Split::Never,
        _ if work(kind) >= PARALLEL_WORK => Split::Always,
        _ => Split::Never,
    }
}

/// Whether any kernel of `plan` may be split across threads. Where none
/// may, a run goes on one thread whatever was asked for: handing it to a
/// pool would cost more than it saves. The JIT's executor and an
/// artifact's contexts both size their pools by this.
pub fn any_kernel_splits(plan: &crate::plan::Plan) -> bool {
    plan.kernels.iter().any(|k| split_of(&k.kind) != Split::Never)
}

/// `any_kernel_splits` for the JIT's executor, which decides a symbolic
/// kernel's split per call (`split_at`): a kernel with symbolic sizes may
/// split at some values.
pub fn any_kernel_may_split(plan: &crate::plan::Plan) -> bool {
    let symbolic = |k: &crate::plan::Kernel| {
        !k.is_known() && !matches!(k.kind, KernelKind::Reference { .. } | KernelKind::Loop { .. })
    };
    plan.kernels.iter().any(|k| split_of(&k.kind) != Split::Never || symbolic(k))
}

/// Elements touched or multiply-adds, symbolic sizes given by `size`.
fn work(kind: &KernelKind, size: &dyn Fn(Dim) -> usize) -> usize {
    match kind {
        KernelKind::Map(m) => m.shape.iter().map(|&d| size(d)).product(),
        KernelKind::Rows(r) => size(r.rows) * size(r.len),
        KernelKind::MatMul(mm) => size(mm.m) * mm.n * mm.k * mm.batches.len(),
        KernelKind::Gather(k) => size(k.outer) * size(k.n_indices) * k.inner,
        // Every score, skipped or not: an upper bound that needs no walk over
        // the key spans on every run.
        KernelKind::Attention(a) => a.estimated_batches() * size(a.sq) * size(a.sk) * (a.d + a.dv),
        KernelKind::Reference { .. } | KernelKind::Loop { .. } => 0,
    }
}
