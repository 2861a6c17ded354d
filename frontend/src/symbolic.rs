//! Shape arithmetic over symbolic dims, evaluated while importing.
//!
//! Exporters compute reshape targets, slice bounds and expand shapes in the
//! graph: `Shape -> Gather -> Unsqueeze -> Concat -> Reshape`, with `Add`,
//! `Mul`, `Div` and `Where(Equal(s, -1), 1, s)` along the way. When the dims
//! are symbolic those values are small integer tensors whose elements are
//! `Dim` expressions (`batch`, `past_sequence + sequence`, `12*sequence`).
//! The importer tracks them here so that the op reading one as a parameter
//! gets the expression as a static attribute, exactly as it gets a number
//! when the dims are known. The graph keeps the nodes that computed them;
//! once every dim has a value the canonicaliser folds them, and until then
//! nothing reads them.

use egret_ir::{DType, Dim, Op, Tensor};
use std::sync::Arc;

/// A small integer tensor whose elements may be symbolic.
#[derive(Clone, Debug, PartialEq)]
pub struct SymInts {
    pub shape: Vec<usize>,
    pub values: Vec<Dim>,
}

/// What the importer knows of a value at compile time.
#[derive(Clone, Debug)]
pub enum Known {
    Tensor(Arc<Tensor>),
    Dims(Arc<SymInts>),
}

impl Known {
    /// The value's elements as dims, for an integer tensor.
    pub fn dims(&self) -> Option<Vec<Dim>> {
        match self {
            Known::Tensor(t) if t.dtype().is_int() => t.to_i64_vec().into_iter().map(Dim::int).collect(),
            Known::Tensor(_) => None,
            Known::Dims(s) => Some(s.values.clone()),
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Known::Tensor(t) => t.shape(),
            Known::Dims(s) => &s.shape,
        }
    }
}

/// An evaluated output: a plain tensor when every element came out known.
fn output(shape: Vec<usize>, values: Vec<Dim>, dtype: DType) -> Known {
    match values.iter().map(|d| d.known()).collect::<Option<Vec<i64>>>() {
        Some(ints) => Known::Tensor(Arc::new(Tensor::from_vec(shape, ints).cast(dtype))),
        None => Known::Dims(Arc::new(SymInts { shape, values })),
    }
}

/// Which inputs of `op` are data the op moves (rather than indices or
/// conditions it reads), for the ops that only move elements.
fn moved_inputs(op: &Op, n: usize) -> Option<Vec<usize>> {
    match op {
        Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Expand { .. }
        | Op::Identity
        | Op::Split { .. }
        | Op::Tile { .. }
        | Op::Gather { .. } => Some(vec![0]),
        Op::Cast { to } if to.is_int() => Some(vec![0]),
        Op::Concat { .. } => Some((0..n).collect()),
        Op::Where => Some(vec![1, 2]),
        _ => None,
    }
}

/// Evaluates `op` on known inputs of which at least one is symbolic;
/// `None` if the result cannot be written as dims (a symbolic value cast to
/// float, a division that is not exact, a comparison that depends on the
/// symbols' values). `out_dtypes` are the outputs' types from the graph.
pub fn eval(op: &Op, inputs: &[Known], out_dtypes: &[DType]) -> Option<Vec<Known>> {
    if let Some(moved) = moved_inputs(op, inputs.len()) {
        return eval_moves(op, inputs, &moved, out_dtypes);
    }
    match op {
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Max | Op::Min | Op::Equal => {
            let (a, b) = (&inputs[0], &inputs[1]);
            let shape = egret_ir::ops::broadcast_shapes(a.shape(), b.shape()).ok()?;
            let (ia, ib) =
                (egret_ir::ops::broadcast_index(a.shape(), &shape), egret_ir::ops::broadcast_index(b.shape(), &shape));
            let (da, db) = (a.dims()?, b.dims()?);
            let values = ia.iter().zip(&ib).map(|(&i, &j)| binary(op, da[i], db[j])).collect::<Option<Vec<Dim>>>()?;
            Some(vec![output(shape, values, out_dtypes[0])])
        }
        Op::Reduce { kind: kind @ (egret_ir::op::ReduceKind::Prod | egret_ir::op::ReduceKind::Sum), axes, .. }
            if inputs[0].shape().len() == 1 && axes == &[0] =>
        {
            let ds = inputs[0].dims()?;
            let folded = if *kind == egret_ir::op::ReduceKind::Prod {
                ds.iter().try_fold(Dim::new(1), |a, &d| a.checked_mul(d).ok())?
            } else {
                ds.iter().try_fold(Dim::new(0), |a, &d| a.checked_add(d).ok())?
            };
            let shape = egret_ir::ops::eval(op, &[&Tensor::from_vec(vec![ds.len()], vec![0i64; ds.len()])])
                .ok()?
                .remove(0)
                .shape()
                .to_vec();
            Some(vec![output(shape, vec![folded], out_dtypes[0])])
        }
        _ => None,
    }
}

/// One element of a binary op over dims.
fn binary(op: &Op, a: Dim, b: Dim) -> Option<Dim> {
    if let (Some(x), Some(y)) = (a.known(), b.known()) {
        // Known operands: the reference semantics, on the scalars.
        let t = egret_ir::ops::eval(op, &[&Tensor::scalar(x), &Tensor::scalar(y)]).ok()?;
        return Dim::int(t[0].cast(DType::I64).to_i64_vec()[0]);
    }
    match op {
        Op::Add => a.checked_add(b).ok(),
        Op::Sub => a.checked_sub(b).ok(),
        Op::Mul => a.checked_mul(b).ok(),
        Op::Div => a.div_exact(b),
        Op::Max | Op::Min if a == b => Some(a),
        Op::Equal => {
            if a == b {
                return Some(Dim::new(1));
            }
            // Dims are never negative: a dim is not -1, the exporters' "infer this" marker.
            let diff = a.checked_sub(b).ok()?;
            let never = diff.known().is_some_and(|d| d != 0)
                || (a.is_nonneg() == Some(true) && b.known().is_some_and(|v| v < 0))
                || (b.is_nonneg() == Some(true) && a.known().is_some_and(|v| v < 0));
            never.then_some(Dim::new(0))
        }
        _ => None,
    }
}

/// Evaluates an op that only moves elements by running it on the
/// elements' positions, then reading the dims back at the positions it
/// produced: the reference semantics decide where each element goes.
fn eval_moves(op: &Op, inputs: &[Known], moved: &[usize], out_dtypes: &[DType]) -> Option<Vec<Known>> {
    let mut table: Vec<Dim> = Vec::new();
    let mut args: Vec<Tensor> = Vec::with_capacity(inputs.len());
    for (i, k) in inputs.iter().enumerate() {
        if moved.contains(&i) {
            let ds = k.dims()?;
            let ids: Vec<i64> = (table.len() as i64..(table.len() + ds.len()) as i64).collect();
            table.extend(ds);
            args.push(Tensor::from_vec(k.shape().to_vec(), ids));
        } else {
            match k {
                Known::Tensor(t) => args.push((**t).clone()),
                Known::Dims(_) => return None,
            }
        }
    }
    // Positions are i64; a cast between integer types keeps them.
    let op = match op {
        Op::Cast { .. } => Op::Identity,
        other => other.clone(),
    };
    let outs = egret_ir::ops::eval(&op, &args.iter().collect::<Vec<_>>()).ok()?;
    outs.into_iter()
        .zip(out_dtypes)
        .map(|(t, &dtype)| {
            let values: Option<Vec<Dim>> =
                t.to_i64_vec().into_iter().map(|i| table.get(usize::try_from(i).ok()?).copied()).collect();
            Some(output(t.shape().to_vec(), values?, dtype))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(text: &[&str]) -> Known {
        let values: Vec<Dim> = text.iter().map(|s| Dim::parse(s).unwrap()).collect();
        Known::Dims(Arc::new(SymInts { shape: vec![values.len()], values }))
    }

    fn ints(v: &[i64]) -> Known {
        Known::Tensor(Arc::new(Tensor::from_vec(vec![v.len()], v.to_vec())))
    }

    fn texts(k: &Known) -> Vec<String> {
        k.dims().unwrap().iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn gathers_and_concatenates_the_exporters_shape_arithmetic() {
        let shape = dims(&["batch", "sequence", "768"]);
        let idx = Known::Tensor(Arc::new(Tensor::scalar(1i64)));
        let seq = eval(&Op::Gather { axis: 0 }, &[shape.clone(), idx], &[DType::I64]).unwrap();
        assert_eq!(texts(&seq[0]), ["sequence"]);
        let seq = eval(&Op::Reshape { shape: egret_ir::dims_of(&[1]) }, &seq, &[DType::I64]).unwrap();
        let target =
            eval(&Op::Concat { axis: 0 }, &[ints(&[-1]), seq[0].clone(), ints(&[12, 64])], &[DType::I64]).unwrap();
        assert_eq!(texts(&target[0]), ["-1", "sequence", "12", "64"]);
    }

    #[test]
    fn arithmetic_stays_exact() {
        let a = dims(&["past + sequence", "12*sequence"]);
        let b = ints(&[1, 12]);
        assert_eq!(
            texts(&eval(&Op::Add, &[a.clone(), b.clone()], &[DType::I64]).unwrap()[0]),
            ["past + sequence + 1", "12*sequence + 12"]
        );
        assert_eq!(
            texts(&eval(&Op::Div, &[dims(&["12*sequence"]), ints(&[12])], &[DType::I64]).unwrap()[0]),
            ["sequence"]
        );
        // Not exact for every value of the symbol: unknown.
        assert!(eval(&Op::Div, &[dims(&["sequence"]), ints(&[2])], &[DType::I64]).is_none());
    }

    #[test]
    fn equality_with_the_infer_marker_is_decided() {
        let s = dims(&["batch", "sequence"]);
        let eq = eval(&Op::Equal, &[s.clone(), ints(&[-1])], &[DType::Bool]).unwrap();
        match &eq[0] {
            Known::Tensor(t) => assert_eq!(t.to_i64_vec(), vec![0, 0]),
            other => panic!("{other:?}"),
        }
        // batch == sequence depends on their values.
        assert!(eval(&Op::Equal, &[dims(&["batch"]), dims(&["sequence"])], &[DType::Bool]).is_none());
        let cond = Known::Tensor(Arc::new(Tensor::from_vec(vec![2], vec![false, true])));
        let picked = eval(&Op::Where, &[cond, s, ints(&[1, 1])], &[DType::I64]).unwrap();
        assert_eq!(texts(&picked[0]), ["1", "sequence"]);
    }
}
