//! Contractions: matmul, einsum, convolution.

use super::elementwise::Arith;
use super::{arity, broadcast_index, sizes, Extent, OpResult};
use crate::dim::{shape_text, Dim};
use crate::dispatch_num;
use crate::dtype::Type;
use crate::op::Op;
use crate::tensor::{Data, Elem, Tensor};

/// Shapes of a matmul after numpy's promotion of 1-d operands:
/// (batch shape, m, k, n, output shape).
#[allow(clippy::type_complexity)]
fn matmul_dims<D: Extent>(a: &[D], b: &[D]) -> OpResult<(Vec<D>, D, D, D, Vec<D>)> {
    if a.is_empty() || b.is_empty() {
        return Err("matmul operands must have rank >= 1".into());
    }
    let a2: Vec<D> = if a.len() == 1 { vec![D::ONE, a[0]] } else { a.to_vec() };
    let b2: Vec<D> = if b.len() == 1 { vec![b[0], D::ONE] } else { b.to_vec() };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(format!("matmul inner dims differ: {a:?} x {b:?}"));
    }
    let batch = D::broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    let mut out = batch.clone();
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok((batch, m, k, n, out))
}

pub fn infer(op: &Op, inputs: &[&Type]) -> OpResult<Vec<Type>> {
    match op {
        Op::MatMul | Op::MatMulTiled { .. } => {
            arity(inputs, 2, 2)?;
            super::same_dtype(inputs[0], inputs[1], "matmul")?;
            if inputs[0].dtype == crate::DType::Bool {
                return Err("matmul is not defined on bool".into());
            }
            let (_, _, _, _, out) = matmul_dims(&inputs[0].shape, &inputs[1].shape)?;
            Ok(vec![Type::new(inputs[0].dtype, out)])
        }
        Op::Attention { .. } | Op::AttentionTiled { .. } => {
            arity(inputs, 3, 4)?;
            if let Op::AttentionTiled { block, key_block, .. } = op {
                if *block == 0 || *key_block == 0 {
                    return Err("attention tiles need at least one query row and one key".into());
                }
            }
            for t in inputs {
                super::expect_float(t, "attention input")?;
                super::same_dtype(inputs[0], t, "attention")?;
            }
            let (q, kt, v) = (inputs[0], inputs[1], inputs[2]);
            if q.rank() < 2 || kt.rank() < 2 || v.rank() < 2 {
                return Err("q, kt and v need rank >= 2".into());
            }
            let (_, _, _, _, scores) = matmul_dims(&q.shape, &kt.shape)?;
            if let Some(mask) = inputs.get(3) {
                let s = Dim::broadcast(&mask.shape, &scores)?;
                if s != scores {
                    return Err(format!(
                        "mask {} does not broadcast to the scores {}",
                        shape_text(&mask.shape),
                        shape_text(&scores)
                    ));
                }
            }
            let (_, _, _, _, out) = matmul_dims(&scores, &v.shape)?;
            Ok(vec![Type::new(q.dtype, out)])
        }
        Op::Einsum { equation } => {
            let shapes = inputs.iter().map(|t| sizes(&t.shape, "an einsum operand")).collect::<OpResult<Vec<_>>>()?;
            let spec = EinsumSpec::parse(equation, &shapes)?;
            for t in inputs {
                super::same_dtype(inputs[0], t, "einsum")?;
            }
            Ok(vec![Type::new(inputs[0].dtype, spec.out_shape())])
        }
        Op::Conv { strides, pads, dilations, group } => {
            arity(inputs, 2, 3)?;
            let (x, w) = (inputs[0], inputs[1]);
            super::expect_float(x, "input")?;
            super::same_dtype(x, w, "conv")?;
            let sp = x.rank().checked_sub(2).ok_or("conv input needs rank >= 3")?;
            if w.rank() != x.rank() || strides.len() != sp || dilations.len() != sp || pads.len() != 2 * sp {
                return Err(format!("conv parameters do not match a {sp}-d convolution"));
            }
            // The batch may be symbolic; channels and the window need known sizes.
            let (xs, ws) = (sizes(&x.shape[1..], "the convolved input")?, sizes(&w.shape, "the weight")?);
            let (c, m) = (xs[0], ws[0]);
            if *group == 0 || c % group != 0 || m % group != 0 || ws[1] * group != c {
                return Err(format!("weight {ws:?} does not fit {c} input channels in {group} groups"));
            }
            if let Some(b) = inputs.get(2) {
                if b.shape != [Dim::new(m)] {
                    return Err(format!("bias shape {} must be [{m}]", shape_text(&b.shape)));
                }
            }
            let mut out = vec![x.shape[0], Dim::new(m)];
            for i in 0..sp {
                let len = pooled_len(xs[1 + i], ws[2 + i], strides[i], pads[i], pads[i + sp], dilations[i], false)?;
                out.push(super::size_dim(len)?);
            }
            Ok(vec![Type::new(x.dtype, out)])
        }
        other => Err(format!("no inference rule for {}", other.name())),
    }
}

/// Output length of a window op along one axis.
pub fn pooled_len(n: usize, k: usize, stride: usize, pb: usize, pe: usize, dil: usize, ceil: bool) -> OpResult<usize> {
    if stride == 0 || dil == 0 || k == 0 {
        return Err("kernel, strides and dilations must be positive".into());
    }
    let span = dil * (k - 1) + 1;
    let padded = n + pb + pe;
    if padded < span {
        return Err(format!("window of {span} does not fit input length {n} with pads ({pb}, {pe})"));
    }
    let room = padded - span;
    let mut out = if ceil { room.div_ceil(stride) + 1 } else { room / stride + 1 };
    // A ceil-mode window must start inside the input or its left padding.
    if ceil && (out - 1) * stride >= n + pb {
        out -= 1;
    }
    Ok(out)
}

pub fn eval(op: &Op, inputs: &[&Tensor]) -> OpResult<Vec<Tensor>> {
    match op {
        Op::MatMul | Op::MatMulTiled { .. } => Ok(vec![matmul(inputs[0], inputs[1])?]),
        Op::Attention { scale, nan_to_zero, softcap } | Op::AttentionTiled { scale, nan_to_zero, softcap, .. } => {
            // The definition, step by step: scores, scale, soft cap, mask, softmax, values.
            let scores = matmul(inputs[0], inputs[1])?;
            let s = Tensor::scalar(*scale).cast(scores.dtype());
            let mut scores = super::elementwise::eval_binary(&Op::Mul, &scores, &s)?;
            if let Some(cap) = softcap {
                let c = Tensor::scalar(*cap).cast(scores.dtype());
                let scaled = super::elementwise::eval_binary(&Op::Div, &scores, &c)?;
                let capped = super::elementwise::eval_unary(&Op::Tanh, &scaled)?;
                scores = super::elementwise::eval_binary(&Op::Mul, &capped, &c)?;
            }
            if let Some(mask) = inputs.get(3) {
                scores = super::elementwise::eval_binary(&Op::Add, &scores, mask)?;
            }
            let axis = scores.rank() - 1;
            let mut p = super::nn::eval(&Op::Softmax { axis }, &[&scores])?.remove(0);
            if *nan_to_zero {
                let zero = Tensor::scalar(0f32).cast(p.dtype());
                let nan = super::elementwise::eval_unary(&Op::IsNaN, &p)?;
                p = super::elementwise::eval_where(&nan, &zero, &p)?;
            }
            Ok(vec![matmul(&p, inputs[2])?])
        }
        Op::Einsum { equation } => Ok(vec![einsum(equation, inputs)?]),
        Op::Conv { strides, pads, dilations, group } => Ok(vec![conv(inputs, strides, pads, dilations, *group)?]),
        other => Err(format!("no evaluation rule for {}", other.name())),
    }
}

/// An additive attention mask value at or below this masks its key out:
/// exporters write `-inf` or the dtype's lowest value (-3.4e38).
pub const MASKED_OUT: f32 = -1e30;
/// Mask values of the keys that are not masked out must be at least this,
/// so that a masked key's score sits more than 1e29 below every live score
/// of its row and its weight `exp(score - max)` is exactly zero in f32.
const LIVE_AT_LEAST: f32 = -1e25;

/// The keys each query row of an attention can give weight to, for an
/// additive mask known at compile time (`mask(row, key)`, `sq` rows of `sk`
/// keys): per row, the span `first..last + 1` of its keys that are not
/// masked out. Kernels may skip the keys outside a row's span: their
/// weights are exactly zero. `None` when nothing may be skipped: a row
/// with every key masked out (its softmax is then uniform or NaN, and
/// every key counts), or a value that is NaN, `+inf`, or between the two
/// thresholds, too close to its row's live scores to call.
pub fn live_key_spans(mask: impl Fn(usize, usize) -> f32, sq: usize, sk: usize) -> Option<Vec<(usize, usize)>> {
    let mut spans = Vec::with_capacity(sq);
    for row in 0..sq {
        let mut span: Option<(usize, usize)> = None;
        for key in 0..sk {
            let m = mask(row, key);
            if m <= MASKED_OUT {
                continue;
            }
            if !(LIVE_AT_LEAST..f32::INFINITY).contains(&m) {
                return None;
            }
            span = Some(span.map_or((key, key + 1), |(first, _)| (first, key + 1)));
        }
        spans.push(span?);
    }
    Some(spans)
}

/// The keys a block of query rows needs: the hull of its rows' spans.
pub fn block_key_span(spans: &[(usize, usize)]) -> (usize, usize) {
    spans.iter().fold((usize::MAX, 0), |(lo, hi), &(a, b)| (lo.min(a), hi.max(b)))
}

/// `c[m, n] += a[m, k] * b[k, n]` for contiguous row-major blocks. The i-k-j
/// order streams rows of `b` and `c`, which the compiler vectorises.
pub fn gemm_block<T: Arith>(a: &[T], b: &[T], c: &mut [T], m: usize, k: usize, n: usize) {
    for i in 0..m {
        let crow = &mut c[i * n..(i + 1) * n];
        for p in 0..k {
            let aip = a[i * k + p];
            let brow = &b[p * n..(p + 1) * n];
            for (cj, &bj) in crow.iter_mut().zip(brow) {
                *cj = T::add(*cj, T::mul(aip, bj));
            }
        }
    }
}

fn matmul_typed<T: Arith>(a: &[T], sa: &[usize], b: &[T], sb: &[usize]) -> OpResult<Vec<T>> {
    let (batch, m, k, n, _) = matmul_dims(sa, sb)?;
    let a_batch: Vec<usize> = if sa.len() > 2 { sa[..sa.len() - 2].to_vec() } else { vec![] };
    let b_batch: Vec<usize> = if sb.len() > 2 { sb[..sb.len() - 2].to_vec() } else { vec![] };
    let ia = broadcast_index(&a_batch, &batch);
    let ib = broadcast_index(&b_batch, &batch);
    let nb: usize = batch.iter().product();
    let mut out = vec![T::default(); nb * m * n];
    for bi in 0..nb {
        let ab = &a[ia[bi] * m * k..(ia[bi] + 1) * m * k];
        let bb = &b[ib[bi] * k * n..(ib[bi] + 1) * k * n];
        gemm_block(ab, bb, &mut out[bi * m * n..(bi + 1) * m * n], m, k, n);
    }
    Ok(out)
}

pub fn matmul(a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    let (_, _, _, _, out_shape) = matmul_dims(a.shape(), b.shape())?;
    let data = dispatch_num!(a.data(), "matmul", x: T => {
        let y = T::unwrap(b.data()).ok_or("matmul operands differ in dtype")?;
        T::wrap(matmul_typed(x, a.shape(), y, b.shape())?)
    });
    Ok(Tensor::new(out_shape, data))
}

/// A two-operand einsum that is one batched matrix product, as layout ops
/// around a `matmul`: `a` transposed by `perm_a` and reshaped to
/// `[batch dims.., m, k]`, `b` by `perm_b` to `[batch dims.., k, n]`; the
/// product reshaped to `out_dims` (batch letters, then `a`'s free letters,
/// then `b`'s) and transposed by `perm_out` into the equation's output
/// order. Batch dims stay apart, so `bhid,bhjd->bhij` is a plain matmul of
/// `a` and `b` transposed, the form the attention rules know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EinsumAsMatmul {
    pub perm_a: Vec<usize>,
    pub a3: Vec<usize>,
    pub perm_b: Vec<usize>,
    pub b3: Vec<usize>,
    pub out_dims: Vec<usize>,
    pub perm_out: Vec<usize>,
}

/// The matmul form of `eq` over operands of `shapes`, when it has one: two
/// operands, no letter repeated within an operand or the output, every
/// letter of an operand either shared with the other or kept in the output
/// (no letter summed within one operand), shared letters of equal sizes
/// (no broadcasting).
pub fn einsum_as_matmul(eq: &str, shapes: &[Vec<usize>]) -> Option<EinsumAsMatmul> {
    let spec = EinsumSpec::parse(eq, shapes).ok()?;
    let [a, b] = spec.inputs.as_slice() else { return None };
    let distinct = |v: &[char]| v.iter().enumerate().all(|(i, c)| !v[..i].contains(c));
    if !distinct(a) || !distinct(b) || !distinct(&spec.output) {
        return None;
    }
    let out = &spec.output;
    if a.iter().chain(b).any(|c| !out.contains(c) && !(a.contains(c) && b.contains(c))) {
        return None;
    }
    let size_in = |letters: &[char], shape: &[usize], c: char| shape[letters.iter().position(|&x| x == c).unwrap()];
    if a.iter().filter(|c| b.contains(c)).any(|&c| size_in(a, &shapes[0], c) != size_in(b, &shapes[1], c)) {
        return None;
    }
    let batch: Vec<char> = a.iter().copied().filter(|c| b.contains(c) && out.contains(c)).collect();
    let left: Vec<char> = a.iter().copied().filter(|c| !b.contains(c)).collect();
    let contracted: Vec<char> = a.iter().copied().filter(|c| b.contains(c) && !out.contains(c)).collect();
    let right: Vec<char> = b.iter().copied().filter(|c| !a.contains(c)).collect();
    let position = |letters: &[char], c: &char| letters.iter().position(|x| x == c).unwrap();
    let product = |cs: &[char]| cs.iter().map(|c| spec.dims[c]).product::<usize>();
    let a_order: Vec<char> = [&batch[..], &left, &contracted].concat();
    let b_order: Vec<char> = [&batch[..], &contracted, &right].concat();
    let mid: Vec<char> = [&batch[..], &left, &right].concat();
    let batch_dims: Vec<usize> = batch.iter().map(|c| spec.dims[c]).collect();
    Some(EinsumAsMatmul {
        perm_a: a_order.iter().map(|c| position(a, c)).collect(),
        a3: [batch_dims.clone(), vec![product(&left), product(&contracted)]].concat(),
        perm_b: b_order.iter().map(|c| position(b, c)).collect(),
        b3: [batch_dims, vec![product(&contracted), product(&right)]].concat(),
        out_dims: mid.iter().map(|c| spec.dims[c]).collect(),
        perm_out: out.iter().map(|c| position(&mid, c)).collect(),
    })
}

/// A parsed einsum equation with ellipses expanded into fresh letters.
struct EinsumSpec {
    inputs: Vec<Vec<char>>,
    output: Vec<char>,
    dims: std::collections::BTreeMap<char, usize>,
}

impl EinsumSpec {
    fn parse(eq: &str, shapes: &[Vec<usize>]) -> OpResult<EinsumSpec> {
        let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
        let (lhs, rhs) = match eq.split_once("->") {
            Some((l, r)) => (l.to_string(), Some(r.to_string())),
            None => (eq.clone(), None),
        };
        let terms: Vec<&str> = lhs.split(',').collect();
        if terms.len() != shapes.len() {
            return Err(format!("einsum `{eq}` has {} operands but {} inputs were given", terms.len(), shapes.len()));
        }
        // Ellipsis dims get letters that no equation uses.
        let ell_letters: Vec<char> = ('A'..='Z').filter(|c| !eq.contains(*c)).collect();
        let mut ell_rank = 0;
        let mut inputs = Vec::new();
        let mut dims = std::collections::BTreeMap::new();
        for (term, shape) in terms.iter().zip(shapes) {
            let named = term.replace("...", "").chars().count();
            let has_ell = term.contains("...");
            if (has_ell && named > shape.len()) || (!has_ell && named != shape.len()) {
                return Err(format!("einsum term `{term}` does not match an operand of rank {}", shape.len()));
            }
            let er = if has_ell { shape.len() - named } else { 0 };
            ell_rank = ell_rank.max(er);
            let mut letters = Vec::new();
            let (pre, post) = term.split_once("...").unwrap_or((term, ""));
            letters.extend(pre.chars());
            if has_ell {
                letters.extend(ell_letters[ell_rank - er..ell_rank].iter().copied());
            }
            letters.extend(post.chars());
            for (c, &d) in letters.iter().zip(shape) {
                if !c.is_alphabetic() {
                    return Err(format!("einsum `{eq}`: `{c}` is not a letter"));
                }
                match dims.insert(*c, d) {
                    Some(prev) if prev != d && prev != 1 && d != 1 => {
                        return Err(format!("einsum `{eq}`: `{c}` is both {prev} and {d}"))
                    }
                    Some(prev) if d == 1 => {
                        dims.insert(*c, prev);
                    }
                    _ => {}
                }
            }
            inputs.push(letters);
        }
        let ell: Vec<char> = ell_letters[..ell_rank].to_vec();
        let output: Vec<char> = match rhs {
            Some(r) => {
                let (pre, post) = r.split_once("...").unwrap_or((&r, ""));
                let mut o: Vec<char> = pre.chars().collect();
                if r.contains("...") {
                    o.extend(&ell);
                }
                o.extend(post.chars());
                o
            }
            None => {
                // Implicit output: the ellipsis, then letters used once, sorted.
                let mut o = ell.clone();
                let mut once: Vec<char> = dims
                    .keys()
                    .copied()
                    .filter(|c| !ell.contains(c) && inputs.iter().flatten().filter(|x| *x == c).count() == 1)
                    .collect();
                once.sort();
                o.extend(once);
                o
            }
        };
        for c in &output {
            if !dims.contains_key(c) {
                return Err(format!("einsum `{eq}`: output letter `{c}` is not in any operand"));
            }
        }
        Ok(EinsumSpec { inputs, output, dims })
    }

    fn out_shape(&self) -> Vec<usize> {
        self.output.iter().map(|c| self.dims[c]).collect()
    }
}

fn einsum(eq: &str, inputs: &[&Tensor]) -> OpResult<Tensor> {
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
    let spec = EinsumSpec::parse(eq, &shapes)?;
    // Loop over every letter: output letters first, then the summed ones.
    let mut letters = spec.output.clone();
    letters.extend(spec.dims.keys().copied().filter(|c| !spec.output.contains(c)));
    let sizes: Vec<usize> = letters.iter().map(|c| spec.dims[c]).collect();
    let out_n: usize = spec.out_shape().iter().product();
    let inner_n: usize = sizes[spec.output.len()..].iter().product();
    // Each operand's flat stride per loop letter (0 for broadcast or absent letters).
    let strides: Vec<Vec<usize>> = spec
        .inputs
        .iter()
        .zip(&shapes)
        .map(|(ls, shape)| {
            let st = crate::tensor::strides_of(shape);
            letters
                .iter()
                .map(|c| ls.iter().enumerate().filter(|(i, l)| *l == c && shape[*i] != 1).map(|(i, _)| st[i]).sum())
                .collect()
        })
        .collect();
    let data = dispatch_num!(inputs[0].data(), "einsum", _v: T => {
        let ops: Vec<&[T]> = inputs.iter().map(|t| T::unwrap(t.data()).ok_or_else(|| "einsum operands differ in dtype".to_string())).collect::<OpResult<_>>()?;
        let mut out = vec![T::default(); out_n];
        let mut coord = vec![0usize; letters.len()];
        for o in out.iter_mut() {
            let mut acc = T::default();
            for _ in 0..inner_n {
                let mut prod: Option<T> = None;
                for (k, op) in ops.iter().enumerate() {
                    let idx: usize = coord.iter().zip(&strides[k]).map(|(c, s)| c * s).sum();
                    prod = Some(match prod { None => op[idx], Some(p) => T::mul(p, op[idx]) });
                }
                acc = T::add(acc, prod.unwrap_or_default());
                advance(&mut coord[spec.output.len()..], &sizes[spec.output.len()..]);
            }
            *o = acc;
            advance(&mut coord[..spec.output.len()], &sizes[..spec.output.len()]);
        }
        T::wrap(out)
    });
    Ok(Tensor::new(spec.out_shape(), data))
}

/// Row-major odometer step.
fn advance(coord: &mut [usize], sizes: &[usize]) {
    for a in (0..coord.len()).rev() {
        coord[a] += 1;
        if coord[a] < sizes[a] {
            return;
        }
        coord[a] = 0;
    }
}

/// For each output spatial position and kernel position, the flat spatial
/// input offset it reads, or `None` for padding. Shared by conv and pooling.
pub fn window_offsets(
    in_sp: &[usize],
    out_sp: &[usize],
    kernel: &[usize],
    strides: &[usize],
    pads: &[usize],
    dilations: &[usize],
) -> Vec<Option<usize>> {
    let sp = in_sp.len();
    let in_strides = crate::tensor::strides_of(in_sp);
    let n_out: usize = out_sp.iter().product();
    let n_k: usize = kernel.iter().product();
    let mut res = Vec::with_capacity(n_out * n_k);
    let mut oc = vec![0usize; sp];
    for _ in 0..n_out {
        let mut kc = vec![0usize; sp];
        for _ in 0..n_k {
            let mut off = Some(0usize);
            for a in 0..sp {
                let pos = (oc[a] * strides[a] + kc[a] * dilations[a]) as i64 - pads[a] as i64;
                off = match off {
                    Some(o) if pos >= 0 && (pos as usize) < in_sp[a] => Some(o + pos as usize * in_strides[a]),
                    _ => None,
                };
            }
            res.push(off);
            advance(&mut kc, kernel);
        }
        advance(&mut oc, out_sp);
    }
    res
}

fn conv(inputs: &[&Tensor], strides: &[usize], pads: &[usize], dilations: &[usize], group: usize) -> OpResult<Tensor> {
    let (x, w) = (inputs[0], inputs[1]);
    let types: Vec<Type> = inputs.iter().map(|t| t.ty()).collect();
    let out_ty = infer(
        &Op::Conv { strides: strides.to_vec(), pads: pads.to_vec(), dilations: dilations.to_vec(), group },
        &types.iter().collect::<Vec<_>>(),
    )?
    .remove(0);
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let m = w.shape()[0];
    let in_sp = &x.shape()[2..];
    let out_shape = out_ty.sizes();
    let out_sp = &out_shape[2..];
    let kernel = &w.shape()[2..];
    let offs = window_offsets(in_sp, out_sp, kernel, strides, pads, dilations);
    let (cg, mg) = (c / group, m / group);
    let (n_in, n_out, n_k) =
        (in_sp.iter().product::<usize>(), out_sp.iter().product::<usize>(), kernel.iter().product::<usize>());
    macro_rules! go {
        ($T:ty, $xv:expr, $wv:expr, $V:ident) => {{
            let xv: &[$T] = $xv;
            let wv: &[$T] = $wv;
            let bias: Option<&[$T]> = inputs.get(2).and_then(|b| <$T>::unwrap(b.data()));
            let mut out = vec![0 as $T; n * m * n_out];
            // im2col per (batch, group): cols[ck, p] then a gemm with w[mg, ck].
            let mut cols = vec![0 as $T; cg * n_k * n_out];
            for b in 0..n {
                for g in 0..group {
                    for ci in 0..cg {
                        let plane = &xv[(b * c + g * cg + ci) * n_in..][..n_in];
                        for p in 0..n_out {
                            for kk in 0..n_k {
                                cols[(ci * n_k + kk) * n_out + p] = offs[p * n_k + kk].map_or(0 as $T, |o| plane[o]);
                            }
                        }
                    }
                    let wg = &wv[g * mg * cg * n_k..(g + 1) * mg * cg * n_k];
                    let og = &mut out[(b * m + g * mg) * n_out..(b * m + (g + 1) * mg) * n_out];
                    gemm_block(wg, &cols, og, mg, cg * n_k, n_out);
                }
                if let Some(bias) = bias {
                    for mi in 0..m {
                        for v in &mut out[(b * m + mi) * n_out..(b * m + mi + 1) * n_out] {
                            *v += bias[mi];
                        }
                    }
                }
            }
            Data::$V(out.into())
        }};
    }
    let data = match (x.data(), w.data()) {
        (Data::F32(xv), Data::F32(wv)) => go!(f32, xv, wv, F32),
        (Data::F64(xv), Data::F64(wv)) => go!(f64, xv, wv, F64),
        _ => return Err("conv needs f32 or f64 input and weight of one dtype".into()),
    };
    Ok(Tensor::new(out_shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_key_spans_of_constant_masks() {
        let spans = |m: &[f32], s: usize| live_key_spans(|r, k| m[r * s + k], s, s);
        let low = f32::MIN;
        // Causal, with the lowest f32 or -inf.
        assert_eq!(spans(&[0.0, low, 0.0, 0.0], 2), Some(vec![(0, 1), (0, 2)]));
        let inf = f32::NEG_INFINITY;
        assert_eq!(spans(&[inf, 0.0, -1.0, inf], 2), Some(vec![(1, 2), (0, 1)]));
        // Masked keys inside a span stay in it.
        assert_eq!(spans(&[0.0, inf, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 3), Some(vec![(0, 3), (0, 3), (0, 3)]));
        // A row with no live key, a value too close to call, a NaN, +inf.
        assert_eq!(spans(&[0.0, 0.0, low, inf], 2), None);
        assert_eq!(spans(&[0.0, -1e28, 0.0, 0.0], 2), None);
        assert_eq!(spans(&[0.0, f32::NAN, 0.0, 0.0], 2), None);
        assert_eq!(spans(&[0.0, f32::INFINITY, 0.0, 0.0], 2), None);
        assert_eq!(block_key_span(&[(3, 5), (0, 4), (2, 9)]), (0, 9));
    }

    #[test]
    fn keys_outside_the_live_spans_have_zero_weight() {
        // The reference attention with a causal mask of the lowest f32, and
        // the same attention over only the keys each row's span keeps.
        let (s, d) = (5, 3);
        let mask: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { f32::MIN } else { 0.0 }).collect();
        let spans = live_key_spans(|r, k| mask[r * s + k], s, s).unwrap();
        let (q, kt, v) = (data(&[s, d], 1), data(&[d, s], 2), data(&[s, d], 3));
        let op = Op::Attention { scale: 0.5, nan_to_zero: false, softcap: None };
        let m = Tensor::from_vec(vec![s, s], mask);
        let full = eval(&op, &[&q, &kt, &v, &m]).unwrap().remove(0);
        let (qv, ktv, vv) = (q.as_f32().unwrap(), kt.as_f32().unwrap(), v.as_f32().unwrap());
        for (row, &(first, end)) in spans.iter().enumerate() {
            let keys = end - first;
            let q1 = Tensor::from_vec(vec![1, d], qv[row * d..(row + 1) * d].to_vec());
            let kt1 = Tensor::from_vec(
                vec![d, keys],
                (0..d).flat_map(|i| ktv[i * s + first..i * s + end].to_vec()).collect::<Vec<_>>(),
            );
            let v1 = Tensor::from_vec(vec![keys, d], vv[first * d..end * d].to_vec());
            let part = eval(&op, &[&q1, &kt1, &v1]).unwrap().remove(0);
            assert_eq!(part.as_f32().unwrap(), &full.as_f32().unwrap()[row * d..(row + 1) * d], "row {row}");
        }
    }

    fn data(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(
            shape.to_vec(),
            (0..n).map(|i| ((i * 7 + seed * 13) % 17) as f32 / 4.0 - 2.0).collect::<Vec<_>>(),
        )
    }

    fn run(op: Op, inputs: &[&Tensor]) -> Tensor {
        crate::eval_op(&op, inputs).unwrap().remove(0)
    }

    /// The layout ops and matmul of the plan compute what the einsum does.
    #[test]
    fn einsums_that_are_products_become_matmuls() {
        let cases: &[(&str, &[usize], &[usize])] = &[
            ("bhid,bhjd->bhij", &[1, 2, 5, 4], &[1, 2, 3, 4]),
            ("bhij,bhjd->bhid", &[2, 3, 5, 4], &[2, 3, 4, 6]),
            ("bsd,df->bsf", &[2, 3, 4], &[4, 5]),
            ("ij,jk->ik", &[3, 4], &[4, 2]),
            ("bid,bjd->bji", &[2, 3, 4], &[2, 5, 4]),
            ("i,j->ij", &[3], &[4]),
            ("bnd,bd->bn", &[2, 3, 4], &[2, 4]),
            ("...id,...jd->...ij", &[2, 3, 5, 4], &[2, 3, 6, 4]),
            ("abcd,cbe->dae", &[2, 3, 4, 5], &[4, 3, 6]),
        ];
        for &(eq, sa, sb) in cases {
            let (a, b) = (data(sa, 1), data(sb, 2));
            let plan = einsum_as_matmul(eq, &[sa.to_vec(), sb.to_vec()]).unwrap_or_else(|| panic!("{eq}: no plan"));
            let side = |t: &Tensor, perm: &[usize], shape: &[usize]| {
                let t = run(Op::Transpose { perm: perm.to_vec() }, &[t]);
                run(Op::Reshape { shape: crate::dims_of(shape) }, &[&t])
            };
            let product = run(Op::MatMul, &[&side(&a, &plan.perm_a, &plan.a3), &side(&b, &plan.perm_b, &plan.b3)]);
            let got = run(
                Op::Transpose { perm: plan.perm_out.clone() },
                &[&run(Op::Reshape { shape: crate::dims_of(&plan.out_dims) }, &[&product])],
            );
            let want = run(Op::Einsum { equation: eq.into() }, &[&a, &b]);
            assert_eq!(got.shape(), want.shape(), "{eq}");
            for (x, y) in got.to_f64_vec().iter().zip(want.to_f64_vec()) {
                assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{eq}: {x} vs {y}");
            }
        }
    }

    /// Einsums that are not one product keep the einsum op.
    #[test]
    fn other_einsums_have_no_matmul_form() {
        let cases: &[(&str, &[usize], &[usize])] = &[
            ("ij,jk->i", &[3, 4], &[4, 2]),           // k summed within b alone
            ("ii,ij->ij", &[3, 3], &[3, 4]),          // a diagonal
            ("bij,bjk->bik", &[1, 3, 4], &[2, 4, 5]), // b broadcast from 1
        ];
        for &(eq, sa, sb) in cases {
            assert!(einsum_as_matmul(eq, &[sa.to_vec(), sb.to_vec()]).is_none(), "{eq}");
        }
        assert!(einsum_as_matmul("ij->ji", &[vec![3, 4]]).is_none(), "one operand");
    }
}
