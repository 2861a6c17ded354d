//! Matmul epilogue fusion, a pass over the finished kernel list (before
//! the memory plan, which then sees the fused kernels' lifetimes).
//!
//! A map kernel that is the only reader of a single-batch matmul's product,
//! iterates over exactly that product, and computes float arithmetic of it
//! (a bias add, GELU, a residual add...) is folded into the matmul: the
//! product goes straight to the map's output buffer and the map's
//! expression runs on it in place as the matmul's `Epilogue`.
//!
//! A product with an epilogue already takes a second map the same way, the
//! map's expression composed after the first (`composed`).
//!
//! The fused kernel takes the map's place in the order. That is always
//! sound: the matmul's operands were written before the matmul, so before
//! the map, and the check below makes sure nothing in between rewrites them.

use crate::lower::is_dense;
use crate::plan::*;
use egret_ir::Dim;
use std::collections::HashMap;

/// A row stride that walks `strides` over `shape` (all dims but the last
/// flattened into rows), or `None` when the leading dims do not flatten.
/// Dims may be symbolic (a sequence's rows).
fn row_stride(shape: &[Dim], strides: &[Dim]) -> Option<Dim> {
    let lead = shape.len().checked_sub(1)?;
    let mut rs: Option<Dim> = None;
    let mut inner = Dim::new(1);
    for d in (0..lead).rev() {
        if shape[d] == 1 {
            continue;
        }
        match rs {
            None => rs = Some(strides[d]),
            Some(r) if strides[d] == r * inner => {}
            Some(_) => return None,
        }
        inner = inner * shape[d];
    }
    Some(rs.unwrap_or(Dim::new(0)))
}

/// The map's expression and operands as an epilogue of an `m x n` product
/// in buffer `c` at `c_offset`, if it is one. The rows may be symbolic;
/// the epilogue's operands' offsets and strides must be known.
fn as_epilogue(map: &MapKernel, m: Dim, n: usize, c: BufferId, c_offset: isize) -> Option<Epilogue> {
    if !map.inputs.iter().chain([&map.output]).all(Operand::is_known) {
        return None;
    }
    let shape = &map.shape;
    if egret_ir::product(shape).ok()? != m * Dim::new(n) || !Epilogue::supports(&map.expr) {
        return None;
    }
    let two_d = |o: &Operand| -> Option<[isize; 2]> {
        if o.dtype != egret_ir::DType::F32 {
            return None;
        }
        // Lowering flattens maps whose operands are all dense or
        // broadcast scalars, so the map's shape need not end in `n`.
        if is_dense(shape, &o.strides) {
            return Some([n as isize, 1]);
        }
        if shape.iter().zip(&o.strides).all(|(&d, &s)| d == 1 || s == 0) {
            return Some([0, 0]);
        }
        if shape.last() != Some(&Dim::new(n)) {
            return None;
        }
        Some([row_stride(shape, &o.strides)?.known()? as isize, known(*o.strides.last()?)])
    };
    // The output is dense, so the product can be written there.
    let out = two_d(&map.output)?;
    if out != [n as isize, 1] && !(m == 1 && out[1] == 1) {
        return None;
    }
    // Map inputs: the product (read densely where it was written) is
    // `in0`; the others follow in order.
    let mut renumber = Vec::with_capacity(map.inputs.len());
    let mut inputs: Vec<EpilogueInput> = Vec::new();
    for o in &map.inputs {
        let strides = two_d(o)?;
        if o.buffer == c {
            if o.known_offset() != c_offset || (strides != [n as isize, 1] && !(m == 1 && strides[1] == 1)) {
                return None;
            }
            renumber.push(0);
        } else {
            inputs.push(EpilogueInput { buffer: o.buffer, offset: o.known_offset(), strides });
            renumber.push(inputs.len());
        }
    }
    if inputs.len() > EPILOGUE_MAX_INPUTS || !renumber.contains(&0) {
        return None;
    }
    Some(Epilogue { expr: renumbered(&map.expr, &renumber), inputs })
}

/// `second` run on what `first` makes: an epilogue whose `in0` is the raw
/// product, `first`'s operands then `second`'s, with `first`'s expression
/// where `second` read the product (copied where it reads it twice: a bias
/// add before an activation written out, `x * (1 + erf(x / c))`, costs an
/// add more, not a pass over memory). `None` past the limits of inputs,
/// depth or size.
fn composed(first: &Epilogue, second: &Epilogue) -> Option<Epilogue> {
    fn substitute(e: &Expr, first: &Expr, shift: usize) -> Expr {
        match e {
            Expr::Input(0) => first.clone(),
            Expr::Input(i) => Expr::Input(i + shift),
            Expr::Unary(u, x) => Expr::unary(*u, substitute(x, first, shift)),
            Expr::Binary(b, x, y) => Expr::binary(*b, substitute(x, first, shift), substitute(y, first, shift)),
            other => other.clone(),
        }
    }
    let inputs: Vec<EpilogueInput> = first.inputs.iter().chain(&second.inputs).cloned().collect();
    let expr = substitute(&second.expr, &first.expr, first.inputs.len());
    let small = expr.op_count() <= EPILOGUE_MAX_OPS;
    (inputs.len() <= EPILOGUE_MAX_INPUTS && small && Epilogue::supports(&expr)).then_some(Epilogue { expr, inputs })
}

/// The most operations a composed epilogue may hold (GELU written out
/// after a bias is about a dozen).
const EPILOGUE_MAX_OPS: usize = 32;

fn renumbered(e: &Expr, to: &[usize]) -> Expr {
    match e {
        Expr::Input(i) => Expr::Input(to[*i]),
        Expr::Unary(u, x) => Expr::unary(*u, renumbered(x, to)),
        Expr::Binary(b, x, y) => Expr::binary(*b, renumbered(x, to), renumbered(y, to)),
        other => other.clone(),
    }
}

/// Folds every eligible map into the matmul before it (see the module docs).
/// `outputs` are the plan's output buffers, which must stay as they are.
pub fn fuse_epilogues(kernels: &mut Vec<Kernel>, outputs: &[BufferId]) {
    let mut readers: HashMap<BufferId, Vec<usize>> = HashMap::new();
    let mut writers: HashMap<BufferId, Vec<usize>> = HashMap::new();
    for (i, k) in kernels.iter().enumerate() {
        let (reads, writes) = k.buffers();
        for b in reads {
            readers.entry(b).or_default().push(i);
        }
        for b in writes {
            writers.entry(b).or_default().push(i);
        }
    }
    let written_between =
        |b: BufferId, from: usize, to: usize| writers.get(&b).is_some_and(|w| w.iter().any(|&i| i > from && i < to));
    let mut fused_away = vec![false; kernels.len()];
    for mi in 0..kernels.len() {
        let KernelKind::MatMul(mm) = &kernels[mi].kind else { continue };
        if mm.batches.len() != 1 || outputs.contains(&mm.c) {
            continue;
        }
        let (Some([reader]), Some([_])) =
            (readers.get(&mm.c).map(Vec::as_slice), writers.get(&mm.c).map(Vec::as_slice))
        else {
            continue;
        };
        let reader = *reader;
        let KernelKind::Map(map) = &kernels[reader].kind else { continue };
        if written_between(mm.a, mi, reader) || written_between(mm.b, mi, reader) {
            continue;
        }
        let Some(mut epilogue) = as_epilogue(map, mm.m, mm.n, mm.c, mm.batches[0][2]) else { continue };
        // A product that already has an epilogue (a bias whose sum the map
        // reads twice, so the two did not fuse as one map) takes the map's
        // after it, if its own operands stay unwritten until the map's turn.
        if let Some(first) = &mm.epilogue {
            if first.inputs.iter().any(|i| written_between(i.buffer, mi, reader)) {
                continue;
            }
            let Some(both) = composed(first, &epilogue) else { continue };
            epilogue = both;
        }
        let mut fused = mm.clone();
        fused.c = map.output.buffer;
        fused.batches[0][2] = map.output.known_offset();
        fused.epilogue = Some(epilogue);
        kernels[reader] = Kernel { kind: KernelKind::MatMul(fused), label: kernels[mi].label.clone() };
        fused_away[mi] = true;
    }
    let mut i = 0;
    kernels.retain(|_| {
        i += 1;
        !fused_away[i - 1]
    });
}

#[cfg(test)]
mod tests {
    use super::row_stride;
    use egret_ir::Dim;

    #[test]
    fn leading_dims_flatten_into_one_row_stride() {
        let d = |v: &[usize]| egret_ir::dims_of(v);
        let st = |v: &[isize]| v.iter().map(|&x| Dim::from(x)).collect::<Vec<_>>();
        assert_eq!(row_stride(&d(&[1, 197, 768]), &st(&[151296, 768, 1])), Some(Dim::new(768)));
        assert_eq!(row_stride(&d(&[2, 3, 8]), &st(&[24, 8, 1])), Some(Dim::new(8)));
        // A bias broadcast over every row.
        assert_eq!(row_stride(&d(&[2, 3, 8]), &st(&[0, 0, 1])), Some(Dim::new(0)));
        // Rows of a transposed view do not flatten.
        assert_eq!(row_stride(&d(&[2, 3, 8]), &st(&[8, 16, 1])), None);
        assert_eq!(row_stride(&d(&[5]), &st(&[1])), Some(Dim::new(0)));
        // A symbolic number of rows, each 8 apart.
        let seq = Dim::symbol("seq");
        assert_eq!(
            row_stride(&[Dim::new(2), seq, Dim::new(8)], &[seq * Dim::new(8), Dim::new(8), Dim::new(1)]),
            Some(Dim::new(8))
        );
    }
}
