//! onnxruntime's contrib ops (domain `com.microsoft`, version 1): the fused
//! ops its transformer optimizer writes (optimum's O1-O4 files), its
//! quantizers' fused products, and the 4-bit weights of LLM exports.
//!
//! Each is imported as the primitives it stands for, in the order
//! onnxruntime's CPU kernels compute them, so the e-graph fuses them again
//! (norms with their residual sums, attention) and every backend runs them
//! unchanged. 4-bit and 8-bit weights are dequantized at import; they must
//! be initializers. Not supported, with an error: training outputs (a norm's
//! mean and inverse deviation), `Attention`'s past and rotary forms,
//! `MatMulNBits`' `g_idx` and float zero points.

use crate::context::{BuildResult, NodeCtx};
use crate::ops::nn::{rotate, rotate_by};
use crate::ops::quant::integer_product;
use crate::registry::Registry;
use crate::ImportError;
use egret_ir::op::ReduceKind;
use egret_ir::{BlockCodes, DType, Dim, Op, Tensor, ValueId};

pub fn register(r: &mut Registry) {
    r.insert("SkipLayerNormalization", |c| skip_norm(c, false));
    r.insert("SkipSimplifiedLayerNormalization", |c| skip_norm(c, true));
    r.insert("SimplifiedLayerNormalization", simplified_norm);
    r.insert("BiasGelu", |c| {
        let (a, b) = (c.req(0)?, c.req(1)?);
        let x = c.add(Op::Add, &[a, b])?;
        c.add_node(Op::Gelu { approximate_tanh: false }, &[x])
    });
    r.insert("FastGelu", |c| {
        let x = with_bias(c, 0, 1)?;
        c.add_node(Op::Gelu { approximate_tanh: true }, &[x])
    });
    r.insert("Gelu", |c| {
        let x = c.req(0)?;
        c.add_node(Op::Gelu { approximate_tanh: false }, &[x])
    });
    r.insert("QuickGelu", |c| {
        let x = c.req(0)?;
        let alpha = c.f("alpha", 1.702)?;
        let alpha = c.f32_const(alpha);
        let scaled = c.add(Op::Mul, &[x, alpha])?;
        let gate = c.add(Op::Sigmoid, &[scaled])?;
        c.add_node(Op::Mul, &[x, gate])
    });
    r.insert("BiasAdd", |c| {
        let (x, bias, skip) = (c.req(0)?, c.req(1)?, c.req(2)?);
        let y = c.add(Op::Add, &[x, bias])?;
        c.add_node(Op::Add, &[y, skip])
    });
    r.insert("EmbedLayerNormalization", embed_layer_norm);
    r.insert("Attention", attention);
    r.insert("GroupQueryAttention", group_query_attention);
    r.insert("RotaryEmbedding", |c| {
        let (x, positions, cos, sin) = (c.req(0)?, c.req(1)?, c.req(2)?, c.req(3)?);
        if c.f("scale", 1.0)? != 1.0 {
            return Err(c.err("`scale` other than 1 is not supported"));
        }
        if c.flag("is_packed_batching", false)? {
            return Err(c.err("packed batching is not supported"));
        }
        let positions = match c.ty(positions).shape.as_slice() {
            // One offset: positions offset..offset + sequence for every batch.
            [one] if one.known() == Some(1) => {
                let shape = c.ty(x).shape.clone();
                let (batch, seq) = (shape[0], if shape.len() == 4 { shape[2] } else { shape[1] });
                let zero = c.constant(Tensor::scalar(0i64));
                let step = c.constant(Tensor::scalar(1i64));
                let iota = c.add(Op::Range { len: seq }, &[zero, step])?;
                let at = c.add(Op::Add, &[iota, positions])?;
                let at = c.add(Op::Reshape { shape: vec![Dim::new(1), seq] }, &[at])?;
                c.add(Op::Expand { shape: vec![batch, seq] }, &[at])?
            }
            _ => positions,
        };
        rotate(c, x, cos, sin, Some(positions))
    });
    r.insert("MatMulIntegerToFloat", |c| {
        let (a, b, a_scale, b_scale) = (c.req(0)?, c.req(1)?, c.req(2)?, c.req(3)?);
        let (a_zero, b_zero, bias) = (c.input(4), c.input(5), c.input(6));
        let product = integer_product(c, a, b, a_zero, b_zero)?;
        let scales = c.add(Op::Mul, &[a_scale, b_scale])?;
        let y = c.add(Op::Mul, &[product, scales])?;
        match bias {
            Some(b) => c.add_node(Op::Add, &[y, b]),
            None => Ok(vec![y]),
        }
    });
    r.insert("DynamicQuantizeMatMul", |c| {
        let (a, b, b_scale) = (c.req(0)?, c.req(1)?, c.req(2)?);
        let (b_zero, bias) = (c.input(3), c.input(4));
        let [q, a_scale, a_zero] = crate::ops::quant::dynamic_quantize_of(c, a)?[..] else {
            unreachable!("DynamicQuantizeLinear has three outputs")
        };
        let product = integer_product(c, q, b, Some(a_zero), b_zero)?;
        let scales = c.add(Op::Mul, &[a_scale, b_scale])?;
        let y = c.add(Op::Mul, &[product, scales])?;
        match bias {
            Some(b) => c.add_node(Op::Add, &[y, b]),
            None => Ok(vec![y]),
        }
    });
    r.insert("MatMulNBits", matmul_nbits);
    r.insert("GatherBlockQuantized", gather_block_quantized);
}

/// Input `x` plus the optional input `bias`.
fn with_bias(c: &mut NodeCtx, x: usize, bias: usize) -> Result<ValueId, ImportError> {
    let x = c.req(x)?;
    match c.input(bias) {
        Some(b) => c.add(Op::Add, &[x, b]),
        None => Ok(x),
    }
}

/// The training outputs of the fused norms (mean, inverse deviation) are
/// refused; an unnamed one gets a placeholder the importer drops.
fn no_statistics(c: &NodeCtx, outputs: &[usize]) -> Result<(), ImportError> {
    for &i in outputs {
        if c.wants_output(i) {
            return Err(c.err(format!("output {i} (the statistics, for training) is not supported")));
        }
    }
    Ok(())
}

/// `SkipLayerNormalization` / `SkipSimplifiedLayerNormalization`: the norm
/// of `input + skip + bias` over the last axis; output 3 is that sum.
fn skip_norm(c: &mut NodeCtx, rms: bool) -> BuildResult {
    let epsilon = c.f("epsilon", 1e-12)?;
    let (x, skip, gamma) = (c.req(0)?, c.req(1)?, c.req(2)?);
    let (beta, bias) = if rms { (None, c.input(3)) } else { (c.input(3), c.input(4)) };
    no_statistics(c, &[1, 2])?;
    let mut sum = c.add(Op::Add, &[x, skip])?;
    if let Some(b) = bias {
        sum = c.add(Op::Add, &[sum, b])?;
    }
    let axis = c.rank(x).checked_sub(1).ok_or_else(|| c.err("input must have at least one axis"))?;
    let mut inputs = vec![sum, gamma];
    inputs.extend(beta);
    let y = if rms {
        c.add(Op::RmsNorm { axis, epsilon }, &inputs)?
    } else {
        c.add(Op::LayerNorm { axis, epsilon }, &inputs)?
    };
    Ok(vec![y, sum, sum, sum])
}

/// `SimplifiedLayerNormalization` (onnxruntime registers it in the default
/// domain too): RMS normalisation over the axes from `axis` on.
pub(crate) fn simplified_norm(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    let scale = c.req(1)?;
    let axis = c.axis(c.i("axis", -1)?, c.rank(x))?;
    let epsilon = c.f("epsilon", 1e-5)?;
    c.ignore_attr("stash_type"); // Egret's norms accumulate in f32 or wider.
    no_statistics(c, &[1])?;
    let y = c.add(Op::RmsNorm { axis, epsilon }, &[x, scale])?;
    Ok(vec![y, y])
}

/// `EmbedLayerNormalization`: the layer norm of the word, position and
/// segment embeddings' sum; output 1 counts each row's mask ones (0 without
/// a mask), output 2 is the sum before the norm.
fn embed_layer_norm(c: &mut NodeCtx) -> BuildResult {
    let epsilon = c.f("epsilon", 1e-12)?;
    if c.i("mask_index_type", 1)? != 1 {
        return Err(c.err("mask_index_type other than 1 is not supported"));
    }
    let ids = c.req(0)?;
    let segments = c.input(1);
    let (words, positions) = (c.req(2)?, c.req(3)?);
    let segment_table = c.input(4);
    let (gamma, beta) = (c.req(5)?, c.req(6)?);
    let mask = c.input(7);
    let position_ids = c.input(8);
    let shape = c.ty(ids).shape.clone();
    let [batch, seq] = shape[..] else {
        return Err(c.err(format!("input_ids must be [batch, sequence], not {}", c.ty(ids))));
    };
    let mut sum = c.add(Op::Gather { axis: 0 }, &[words, ids])?;
    let at = match position_ids {
        Some(p) => c.add(Op::Gather { axis: 0 }, &[positions, p])?,
        None => {
            let width = c.ty(positions).shape[1];
            let starts = vec![Dim::new(0), Dim::new(0)];
            c.add(Op::Slice { starts, ends: vec![seq, width], steps: vec![1, 1] }, &[positions])?
        }
    };
    sum = c.add(Op::Add, &[sum, at])?;
    match (segments, segment_table) {
        (Some(s), Some(t)) => {
            let e = c.add(Op::Gather { axis: 0 }, &[t, s])?;
            sum = c.add(Op::Add, &[sum, e])?;
        }
        (None, None) => {}
        _ => return Err(c.err("segment_ids and segment_embedding come together")),
    }
    let y = c.add(Op::LayerNorm { axis: 2, epsilon }, &[sum, gamma, beta])?;
    let mask_index = match mask {
        Some(m) => {
            let one = c.constant(Tensor::scalar(1i32).cast(c.ty(m).dtype));
            let ones = c.add(Op::Equal, &[m, one])?;
            let ones = c.add(Op::Cast { to: DType::I32 }, &[ones])?;
            c.add(Op::Reduce { kind: ReduceKind::Sum, axes: vec![1], keepdims: false }, &[ones])?
        }
        None => {
            let zero = c.constant(Tensor::scalar(0i32));
            c.add(Op::Expand { shape: vec![batch] }, &[zero])?
        }
    };
    Ok(vec![y, mask_index, sum])
}

/// onnxruntime's `Attention`: the input times one packed weight (q, k and v
/// side by side, plus the bias), split into heads, `softmax(scale * q k^T +
/// mask) v`. The mask is added as onnxruntime adds it: `mask_filter_value`
/// (-10000 by default) where a raw mask is 0 or past a row's length
/// (`mask_index` per batch), and again above the diagonal when
/// `unidirectional`.
fn attention(c: &mut NodeCtx) -> BuildResult {
    let (x, weights) = (c.req(0)?, c.req(1)?);
    let bias = c.input(2);
    let mask = c.input(3);
    if c.input(4).is_some() || c.input(6).is_some() {
        return Err(c.err("`past` is not supported (export without a cache, or use GroupQueryAttention)"));
    }
    let extra_bias = c.input(5);
    let heads = c.i("num_heads", 0)?;
    if c.flag("do_rotary", false)? {
        return Err(c.err("do_rotary is not supported"));
    }
    c.ignore_attr("rotary_embedding_dim");
    c.ignore_attr("past_present_share_buffer");
    let causal = c.flag("unidirectional", false)?;
    let filter = c.f("mask_filter_value", -10000.0)?;
    let shape = c.ty(x).shape.clone();
    let [batch, seq, _] = shape[..] else {
        return Err(c.err(format!("input must be [batch, sequence, hidden], not {}", c.ty(x))));
    };
    let total = c.ty(weights).shape.get(1).and_then(|d| d.size()).ok_or_else(|| c.err("weights must be 2-D"))?;
    let sizes = match c.ints("qkv_hidden_sizes")? {
        Some(s) if s.len() == 3 && s.iter().all(|&d| d > 0) && s.iter().sum::<i64>() as usize == total => {
            [s[0] as usize, s[1] as usize, s[2] as usize]
        }
        Some(s) => return Err(c.err(format!("qkv_hidden_sizes {s:?} must be three sizes adding to {total}"))),
        None if total % 3 == 0 => [total / 3; 3],
        None => return Err(c.err(format!("the packed weight's {total} columns are not three equal parts"))),
    };
    if heads <= 0 || sizes.iter().any(|s| s % heads as usize != 0) || sizes[0] != sizes[1] {
        return Err(c.err(format!("num_heads {heads} must divide the q, k and v sizes {sizes:?} (q and k equal)")));
    }
    let heads = heads as usize;
    let head = sizes[0] / heads;
    let scale = match c.f("scale", 0.0)? {
        0.0 => 1.0 / (head as f32).sqrt(),
        s => s,
    };
    let mut qkv = c.add(Op::MatMul, &[x, weights])?;
    if let Some(b) = bias {
        qkv = c.add(Op::Add, &[qkv, b])?;
    }
    let parts = c.add_node(Op::Split { axis: 2, sizes: egret_ir::dims_of(&sizes) }, &[qkv])?;
    let split = |c: &mut NodeCtx, v: ValueId, width: usize| -> Result<ValueId, ImportError> {
        let shape = vec![batch, seq, Dim::new(heads), Dim::new(width / heads)];
        let v = c.add(Op::Reshape { shape }, &[v])?;
        c.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[v])
    };
    let q = split(c, parts[0], sizes[0])?;
    let k = split(c, parts[1], sizes[1])?;
    let v = split(c, parts[2], sizes[2])?;
    let kt = c.add(Op::Transpose { perm: vec![0, 1, 3, 2] }, &[k])?;
    let qk = c.add(Op::MatMul, &[q, kt])?;
    let alpha = c.f32_const(scale);
    let mut scores = c.add(Op::Mul, &[qk, alpha])?;
    let filter_v = c.f32_const(filter);
    let zero = c.f32_const(0.0);
    if let Some(m) = mask {
        let ms = c.ty(m).shape.clone();
        let additive = match ms.len() {
            // Each batch's valid length: keys at or past it are masked.
            1 if ms[0] == batch => {
                let z = c.constant(Tensor::scalar(0i64));
                let one = c.constant(Tensor::scalar(1i64));
                let keys = c.add(Op::Range { len: seq }, &[z, one])?;
                let keys = c.add(Op::Cast { to: c.ty(m).dtype }, &[keys])?;
                let lengths = c.add(Op::Reshape { shape: vec![batch, Dim::new(1)] }, &[m])?;
                let valid = c.add(Op::Less, &[keys, lengths])?;
                let a = c.add(Op::Where, &[valid, zero, filter_v])?;
                c.add(Op::Reshape { shape: vec![batch, Dim::new(1), Dim::new(1), seq] }, &[a])?
            }
            2 | 3 => {
                let z = c.constant(Tensor::scalar(0i32).cast(c.ty(m).dtype));
                let valid = c.add(Op::Greater, &[m, z])?;
                let a = c.add(Op::Where, &[valid, zero, filter_v])?;
                let mut s4 = ms.clone();
                s4.insert(1, Dim::new(1));
                if ms.len() == 2 {
                    s4.insert(1, Dim::new(1));
                }
                c.add(Op::Reshape { shape: s4 }, &[a])?
            }
            _ => {
                return Err(c.err(format!(
                    "mask_index {} is not supported (a length per batch, or a raw 2-D or 3-D mask)",
                    c.ty(m)
                )))
            }
        };
        scores = c.add(Op::Add, &[scores, additive])?;
    }
    if causal {
        let z = c.constant(Tensor::scalar(0i64));
        let one = c.constant(Tensor::scalar(1i64));
        let keys = c.add(Op::Range { len: seq }, &[z, one])?;
        let queries = c.add(Op::Reshape { shape: vec![seq, Dim::new(1)] }, &[keys])?;
        let future = c.add(Op::Greater, &[keys, queries])?;
        let a = c.add(Op::Where, &[future, filter_v, zero])?;
        scores = c.add(Op::Add, &[scores, a])?;
    }
    if let Some(b) = extra_bias {
        scores = c.add(Op::Add, &[scores, b])?;
    }
    let probs = c.add(Op::Softmax { axis: 3 }, &[scores])?;
    let y = c.add(Op::MatMul, &[probs, v])?;
    let y = c.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[y])?;
    let y = c.add(Op::Reshape { shape: vec![batch, seq, Dim::new(sizes[2])] }, &[y])?;
    if c.wants_output(1) {
        return Err(c.err("output `present` is not supported"));
    }
    Ok(vec![y, y])
}

/// An i64 scalar constant.
fn int(c: &mut NodeCtx, x: i64) -> ValueId {
    c.constant(Tensor::scalar(x))
}

/// The length of axis `axis` of `v` at run time, as an i64 scalar.
fn length_of(c: &mut NodeCtx, v: ValueId, axis: usize) -> Result<ValueId, ImportError> {
    let d = c.ty(v).shape[axis];
    if let Some(n) = d.known() {
        return Ok(int(c, n));
    }
    let shape = c.add(Op::Shape { start: axis, end: axis + 1 }, &[v])?;
    c.add(Op::Reshape { shape: vec![] }, &[shape])
}

/// onnxruntime's `GroupQueryAttention` (as onnxruntime-genai and optimum
/// write it for LLaMA-family decoders): query heads over fewer key/value
/// heads, the new keys and values appended to `past_key`/`past_value`
/// (`present_key`/`present_value`), a causal mask at the past's offset
/// limited to each batch's `seqlens_k + 1` keys, optionally rotary
/// embeddings (`do_rotary`, at positions past + i), a soft cap and a local
/// window.
///
/// The cache is the past followed by the new tokens, which is where
/// onnxruntime writes them when every batch's past fills the buffer. A
/// batch whose `seqlens_k` says otherwise after a past (a padded batch
/// decoding), or a `total_sequence_length` other than past + sequence, is
/// an error when the program runs, not a wrong answer. Not supported:
/// `smooth_softmax`, `head_sink`, `qk_output`.
fn group_query_attention(c: &mut NodeCtx) -> BuildResult {
    let query = c.req(0)?;
    let (key, value) = (c.input(1), c.input(2));
    let (past_key, past_value) = (c.input(3), c.input(4));
    let (seqlens, total) = (c.req(5)?, c.req(6)?);
    let (cos, sin) = (c.input(7), c.input(8));
    let position_ids = c.input(9);
    let bias = c.input(10);
    if c.input(11).is_some() {
        return Err(c.err("head_sink is not supported"));
    }
    let heads = c.i("num_heads", 0)?;
    let kv_heads = c.i("kv_num_heads", 0)?;
    let softcap = c.f("softcap", 0.0)?;
    let window = c.i("local_window_size", -1)?;
    let rotary = c.flag("do_rotary", false)?;
    let interleaved = c.flag("rotary_interleaved", false)?;
    if c.flag("smooth_softmax", false)? || c.i("qk_output", 0)? != 0 {
        return Err(c.err("smooth_softmax and qk_output are not supported"));
    }
    if heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 {
        return Err(c.err(format!("num_heads {heads} must be a positive multiple of kv_num_heads {kv_heads}")));
    }
    let (heads, kv_heads) = (heads as usize, kv_heads as usize);
    let shape = c.ty(query).shape.clone();
    let [batch, seq, width] = shape[..] else {
        return Err(c.err(format!("query must be [batch, sequence, hidden], not {}", c.ty(query))));
    };
    let width = width.size().ok_or_else(|| c.err("the query's hidden size must be known"))?;
    // q, k and v as [batch, sequence, heads * head], unpacked if packed.
    let (q, k, v, head) = match (key, value) {
        (Some(k), Some(v)) => {
            if width % heads != 0 {
                return Err(c.err(format!("hidden size {width} is not a multiple of {heads} heads")));
            }
            (query, k, v, width / heads)
        }
        (None, None) => {
            let parts = heads + 2 * kv_heads;
            if width % parts != 0 {
                return Err(c.err(format!("packed width {width} is not {parts} heads of one size")));
            }
            let head = width / parts;
            let sizes = egret_ir::dims_of(&[heads * head, kv_heads * head, kv_heads * head]);
            let qkv = c.add_node(Op::Split { axis: 2, sizes }, &[query])?;
            (qkv[0], qkv[1], qkv[2], head)
        }
        _ => return Err(c.err("key and value come together (or neither, for packed QKV)")),
    };
    for (x, n, name) in [(k, kv_heads, "key"), (v, kv_heads, "value")] {
        if c.ty(x).shape != [batch, seq, Dim::new(n * head)] {
            return Err(c.err(format!("{name} is {}, not [{batch}, {seq}, {}]", c.ty(x), n * head)));
        }
    }
    let heads_first = |c: &mut NodeCtx, x: ValueId, n: usize| -> Result<ValueId, ImportError> {
        let x = c.add(Op::Reshape { shape: vec![batch, seq, Dim::new(n), Dim::new(head)] }, &[x])?;
        c.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[x])
    };
    let (mut q, mut k) = (heads_first(c, q, heads)?, heads_first(c, k, kv_heads)?);
    let v = heads_first(c, v, kv_heads)?;
    // The past's length (the cache buffer's), and each token's position.
    let past_len = match past_key {
        Some(p) => c.ty(p).shape.get(2).copied().ok_or_else(|| c.err("past_key must be 4-D"))?,
        None => Dim::new(0),
    };
    let past = match past_key {
        Some(p) => length_of(c, p, 2)?,
        None => int(c, 0),
    };
    let zero = int(c, 0);
    let one = int(c, 1);
    let steps = c.add(Op::Range { len: seq }, &[zero, one])?;
    let at = c.add(Op::Add, &[steps, past])?; // [seq]: past + i
    if rotary {
        let (Some(cos), Some(sin)) = (cos, sin) else {
            return Err(c.err("do_rotary needs cos_cache and sin_cache"));
        };
        let positions = match position_ids {
            Some(p) => p,
            None => {
                let row = c.add(Op::Reshape { shape: vec![Dim::new(1), seq] }, &[at])?;
                c.add(Op::Expand { shape: vec![batch, seq] }, &[row])?
            }
        };
        let half = c.ty(cos).shape.get(1).and_then(|d| d.size()).ok_or_else(|| c.err("cos_cache must be 2-D"))?;
        let dim = 2 * half as i64;
        q = rotate_by(c, q, cos, sin, Some(positions), interleaved, None, dim)?[0];
        k = rotate_by(c, k, cos, sin, Some(positions), interleaved, None, dim)?[0];
    } else if cos.is_some() || sin.is_some() || position_ids.is_some() {
        return Err(c.err("cos_cache, sin_cache and position_ids need do_rotary = 1"));
    }
    let cache = |c: &mut NodeCtx, past: Option<ValueId>, new: ValueId, name: &str| -> Result<ValueId, ImportError> {
        let Some(p) = past else { return Ok(new) };
        let ps = c.ty(p).shape.clone();
        if ps.len() != 4 || ps[0] != batch || ps[1] != Dim::new(kv_heads) || ps[3] != Dim::new(head) {
            return Err(c.err(format!("{name} is {}, not [{batch}, {kv_heads}, past, {head}]", c.ty(p))));
        }
        c.add(Op::Concat { axis: 2 }, &[p, new])
    };
    let present_key = cache(c, past_key, k, "past_key")?;
    let present_value = cache(c, past_value, v, "past_value")?;
    let keys_len = past_len.checked_add(seq).map_err(|e| c.err(e.to_string()))?;
    // Grouped heads: each key/value head serves heads / kv_heads queries.
    let repeat = |c: &mut NodeCtx, x: ValueId| -> Result<ValueId, ImportError> {
        if heads == kv_heads {
            return Ok(x);
        }
        let group = Dim::new(heads / kv_heads);
        let (kv, h) = (Dim::new(kv_heads), Dim::new(head));
        let x = c.add(Op::Reshape { shape: vec![batch, kv, Dim::new(1), keys_len, h] }, &[x])?;
        let x = c.add(Op::Expand { shape: vec![batch, kv, group, keys_len, h] }, &[x])?;
        c.add(Op::Reshape { shape: vec![batch, Dim::new(heads), keys_len, h] }, &[x])
    };
    let (keys, values) = (repeat(c, present_key)?, repeat(c, present_value)?);
    let scale = match c.f("scale", 0.0)? {
        0.0 => 1.0 / (head as f32).sqrt(),
        s => s,
    };
    let kt = c.add(Op::Transpose { perm: vec![0, 1, 3, 2] }, &[keys])?;
    let qk = c.add(Op::MatMul, &[q, kt])?;
    let alpha = c.f32_const(scale);
    let mut scores = c.add(Op::Mul, &[qk, alpha])?;
    if softcap > 0.0 {
        let cap = c.f32_const(softcap);
        let x = c.add(Op::Div, &[scores, cap])?;
        let x = c.add(Op::Tanh, &[x])?;
        scores = c.add(Op::Mul, &[x, cap])?;
    }
    if let Some(b) = bias {
        scores = c.add(Op::Add, &[scores, b])?;
    }
    // Key j is seen by query i of batch b when j <= past + i, j <= seqlens_k[b]
    // and, with a window w, j >= past + i - w.
    let key_index = c.add(Op::Range { len: keys_len }, &[zero, one])?; // [keys]
    let query_at = c.add(Op::Reshape { shape: vec![seq, Dim::new(1)] }, &[at])?; // [seq, 1]
    let mut allowed = c.add(Op::LessOrEqual, &[key_index, query_at])?; // [seq, keys]
    if window >= 0 {
        let w = int(c, window);
        let first = c.add(Op::Sub, &[query_at, w])?;
        let inside = c.add(Op::GreaterOrEqual, &[key_index, first])?;
        allowed = c.add(Op::And, &[allowed, inside])?;
    }
    if c.ty(seqlens).shape != [batch] || !matches!(c.ty(seqlens).dtype, DType::I32 | DType::I64) {
        return Err(c.err(format!("seqlens_k is {}, not i32[{batch}]", c.ty(seqlens))));
    }
    let last = c.add(Op::Cast { to: DType::I64 }, &[seqlens])?;
    let last = c.add(Op::Reshape { shape: vec![batch, Dim::new(1), Dim::new(1), Dim::new(1)] }, &[last])?;
    let within = c.add(Op::LessOrEqual, &[key_index, last])?; // [batch, 1, 1, keys]
    let allowed = c.add(Op::And, &[allowed, within])?; // [batch, 1, seq, keys]
    let minus_inf = c.f32_const(f32::NEG_INFINITY);
    let scores = c.add(Op::Where, &[allowed, scores, minus_inf])?;
    let probs = c.add(Op::Softmax { axis: 3 }, &[scores])?;
    let y = c.add(Op::MatMul, &[probs, values])?;
    let y = c.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[y])?;
    let y = c.add(Op::Reshape { shape: vec![batch, seq, Dim::new(heads * head)] }, &[y])?;
    let y = cache_layout_check(c, y, seqlens, total, past, seq)?;
    Ok(vec![y, present_key, present_value])
}

/// `y`, unchanged, after a check at run time that the cache is laid out as
/// `group_query_attention` builds it: `total_sequence_length` is past +
/// sequence, and after a past every batch's `seqlens_k + 1` is that total
/// (in a first prompt, with no past, a batch may be shorter: padded). The
/// check is a gather from a one-element table at 0 (kept) or 1 (an error
/// at run time naming the condition).
fn cache_layout_check(
    c: &mut NodeCtx,
    y: ValueId,
    seqlens: ValueId,
    total: ValueId,
    past: ValueId,
    seq: Dim,
) -> Result<ValueId, ImportError> {
    let label = c.label.clone();
    c.label = format!("{label}: seqlens_k + 1 and total_sequence_length must be past + sequence after a past");
    let batch = c.ty(seqlens).shape[0];
    let seq_len = match seq.known() {
        Some(n) => int(c, n),
        None => length_of(c, y, 1)?,
    };
    let expected = c.add(Op::Add, &[past, seq_len])?;
    let total = c.add(Op::Cast { to: DType::I64 }, &[total])?;
    let total = c.add(Op::Reshape { shape: vec![] }, &[total])?;
    let lengths = c.add(Op::Cast { to: DType::I64 }, &[seqlens])?;
    let one = int(c, 1);
    let lengths = c.add(Op::Add, &[lengths, one])?;
    let full = c.add(Op::Equal, &[lengths, expected])?;
    let fits = c.add(Op::LessOrEqual, &[lengths, expected])?;
    let zero = int(c, 0);
    let prompt = c.add(Op::Equal, &[past, zero])?;
    let padded = c.add(Op::And, &[prompt, fits])?;
    let each = c.add(Op::Or, &[full, padded])?; // [batch]
    let total_ok = c.add(Op::Equal, &[total, expected])?;
    let ok = c.add(Op::And, &[each, total_ok])?;
    let bad = c.add(Op::Not, &[ok])?;
    let index = c.add(Op::Cast { to: DType::I64 }, &[bad])?;
    let table = c.constant(Tensor::from_vec(vec![1], vec![1f32]));
    let keep = c.add(Op::Gather { axis: 0 }, &[table, index])?; // [batch] of 1
    let keep = c.add(Op::Reshape { shape: vec![batch, Dim::new(1), Dim::new(1)] }, &[keep])?;
    c.label = label;
    c.add(Op::Mul, &[y, keep])
}

/// Unpacks `count` integers of `bits` bits from `bytes`, least significant
/// first (onnxruntime's layout for 2, 4 and 8 bits).
fn unpack(bytes: &[u8], bits: usize, count: usize) -> Vec<u8> {
    let per = 8 / bits;
    let mask = ((1u16 << bits) - 1) as u8;
    (0..count).map(|i| (bytes[i / per] >> ((i % per) * bits)) & mask).collect()
}

/// A weight that must be an initializer, as u8 bytes.
fn packed_bytes(c: &NodeCtx, i: usize, what: &str) -> Result<egret_ir::Buf<u8>, ImportError> {
    let t = c.need_known(i, what)?;
    match t.data() {
        // Shared with the weight (mapped, where it was), not copied.
        egret_ir::Data::U8(v) => Ok(v.clone()),
        _ => Err(c.err(format!("{what} is {}; it must be uint8", t.dtype()))),
    }
}

fn known_f32(c: &NodeCtx, i: usize, what: &str) -> Result<Vec<f32>, ImportError> {
    let t = c.need_known(i, what)?;
    match t.as_f32() {
        Some(v) => Ok(v.to_vec()),
        None => Err(c.err(format!("{what} is {}; it must be f32", t.dtype()))),
    }
}

/// `MatMulNBits`: `A @ W^T (+ bias)` for `W` of `N x K` stored in blocks of
/// `block_size` along K, `bits` bits each, with a scale (and a zero point,
/// else 2^(bits-1)) per block. `W` is dequantized here, into an f32
/// constant of `K x N`.
fn matmul_nbits(c: &mut NodeCtx) -> BuildResult {
    let a = c.req(0)?;
    let (k, n) = (c.i("K", 0)?, c.i("N", 0)?);
    let bits = c.i("bits", 4)?;
    let block = c.i("block_size", 0)?;
    // Level 4 asks for int8 activations (onnxruntime quantizes A per block);
    // the others compute in f32 on a CPU.
    let int8_activations = c.i("accuracy_level", 0)? == 4;
    if !matches!(bits, 2 | 4 | 8) {
        return Err(c.err(format!("bits {bits} is not supported (2, 4 or 8)")));
    }
    if k <= 0 || n <= 0 || block < 16 || !(block as u64).is_power_of_two() {
        return Err(c.err(format!("K {k}, N {n} and block_size {block} must be positive (block a power of two >= 16)")));
    }
    if c.input(4).is_some() {
        return Err(c.err("g_idx (act-order) is not supported"));
    }
    let (k, n, bits, block) = (k as usize, n as usize, bits as usize, block as usize);
    if c.ty(a).shape.last() != Some(&Dim::new(k)) || c.ty(a).dtype != DType::F32 {
        return Err(c.err(format!("A is {}; it must be f32 ending in K = {k}", c.ty(a))));
    }
    let blocks = k.div_ceil(block);
    let blob = block * bits / 8;
    let q = packed_bytes(c, 1, "B")?;
    if q.len() != n * blocks * blob {
        return Err(c.err(format!(
            "B holds {} bytes; N {n} x {blocks} blocks x {blob} bytes (K {k}, {bits} bits, blocks of {block}) is {}",
            q.len(),
            n * blocks * blob
        )));
    }
    let scales = known_f32(c, 2, "scales")?;
    if scales.len() != n * blocks {
        return Err(c.err(format!("scales hold {}, not N x blocks = {}", scales.len(), n * blocks)));
    }
    if let Some(bad) = scales.iter().find(|s| !s.is_finite()) {
        return Err(c.err(format!("scales hold {bad}")));
    }
    let zero_bytes = (blocks * bits).div_ceil(8);
    let zeros: Vec<u8> = match c.input(3) {
        None => vec![1 << (bits - 1); n * blocks],
        Some(z) if c.ty(z).dtype == DType::U8 => {
            let packed = packed_bytes(c, 3, "zero_points")?;
            if packed.len() != n * zero_bytes {
                return Err(c.err(format!("zero_points hold {} bytes, not {}", packed.len(), n * zero_bytes)));
            }
            packed.chunks(zero_bytes).flat_map(|row| unpack(row, bits, blocks)).collect()
        }
        Some(z) => return Err(c.err(format!("zero_points of {} are not supported (uint8)", c.ty(z).dtype))),
    };
    // The codes (`[k, n]`, with scales and zero points `[blocks, n]`),
    // unpacked from B only when read (a backend packing them), and the
    // weight in f32 computed from them only if something reads that.
    let (mut block_scales, mut block_zeros) = (vec![0f32; blocks * n], vec![0f32; blocks * n]);
    for col in 0..n {
        for b in 0..blocks {
            (block_scales[b * n + col], block_zeros[b * n + col]) =
                (scales[col * blocks + b], zeros[col * blocks + b] as f32);
        }
    }
    let codes = egret_ir::Buf::lazy(k * n, move || {
        let mut codes = vec![0u8; k * n];
        for col in 0..n {
            for b in 0..blocks {
                let at = (col * blocks + b) * blob;
                for (i, v) in unpack(&q[at..at + blob], bits, block).into_iter().enumerate().take(k - b * block) {
                    codes[(b * block + i) * n + col] = v;
                }
            }
        }
        codes
    });
    let claim =
        BlockCodes { bits: bits as u32, block, k, n, codes, offset: 0, scales: block_scales, zeros: block_zeros };
    let w = Tensor::from_codes(claim).ok_or_else(|| c.err("B's codes, scales and zero points disagree in size"))?;
    let w = c.constant(w);
    let a = if int8_activations { int8_blocks(c, a, k, block)? } else { a };
    let y = c.add(Op::MatMul, &[a, w])?;
    match c.input(5) {
        Some(bias) => c.add_node(Op::Add, &[y, bias]),
        None => Ok(vec![y]),
    }
}

/// `a` (`[.., k]`) rounded to int8 per block of `block` along its last
/// axis, as onnxruntime quantizes the activations of `MatMulNBits` at
/// accuracy level 4: `round(a * 127 / max|a|) * max|a| / 127` per block (0
/// for a block of zeros).
fn int8_blocks(c: &mut NodeCtx, a: ValueId, k: usize, block: usize) -> Result<ValueId, ImportError> {
    let shape = c.ty(a).shape.clone();
    let lead = &shape[..shape.len() - 1];
    let rank = shape.len();
    let part = |c: &mut NodeCtx, from: usize, to: usize| -> Result<ValueId, ImportError> {
        let mut starts = vec![Dim::new(0); rank];
        let mut ends = shape.clone();
        (starts[rank - 1], ends[rank - 1]) = (Dim::new(from), Dim::new(to));
        let x = if from == 0 && to == k { a } else { c.add(Op::Slice { starts, ends, steps: vec![1; rank] }, &[a])? };
        let (blocks, width) = if to - from >= block { ((to - from) / block, block) } else { (1, to - from) };
        let mut split = lead.to_vec();
        split.extend([Dim::new(blocks), Dim::new(width)]);
        let x = c.add(Op::Reshape { shape: split }, &[x])?;
        let magnitude = c.add(Op::Abs, &[x])?;
        let max = c.add(Op::Reduce { kind: ReduceKind::Max, axes: vec![rank], keepdims: true }, &[magnitude])?;
        let levels = c.f32_const(127.0);
        let zero = c.f32_const(0.0);
        let none = c.add(Op::Equal, &[max, zero])?;
        let inverse = c.add(Op::Div, &[levels, max])?;
        let inverse = c.add(Op::Where, &[none, zero, inverse])?;
        let scaled = c.add(Op::Mul, &[x, inverse])?;
        let q = c.add(Op::Round, &[scaled])?;
        let scale = c.add(Op::Div, &[max, levels])?;
        let y = c.add(Op::Mul, &[q, scale])?;
        let mut back = lead.to_vec();
        back.push(Dim::new(to - from));
        c.add(Op::Reshape { shape: back }, &[y])
    };
    let whole = k / block * block;
    if whole == k || whole == 0 {
        return part(c, 0, k);
    }
    let (head, tail) = (part(c, 0, whole)?, part(c, whole, k)?);
    c.add(Op::Concat { axis: rank - 1 }, &[head, tail])
}

/// `GatherBlockQuantized`: a gather from a table of 4- or 8-bit integers
/// with a scale (and zero point) per block along `quantize_axis`. The table
/// is dequantized here.
fn gather_block_quantized(c: &mut NodeCtx) -> BuildResult {
    let indices = c.req(1)?;
    let data = c.need_known(0, "data")?;
    let scales = c.need_known(2, "scales")?;
    let bits = c.i("bits", 4)?;
    let block = c.i("block_size", 128)?;
    let rank = data.rank();
    let gather_axis = c.axis(c.i("gather_axis", 0)?, rank)?;
    let axis = c.axis(c.i("quantize_axis", rank as i64 - 1)?, rank)?;
    if !matches!(bits, 4 | 8) || block < 16 || !(block as u64).is_power_of_two() {
        return Err(
            c.err(format!("bits {bits} and block_size {block} are not supported (4 or 8; a power of two >= 16)"))
        );
    }
    let (bits, block) = (bits as usize, block as usize);
    // int4 and uint4 tables arrive one value a byte; uint8 ones packed
    // along the last axis, 8 / bits values a byte.
    let typed = c.is_four_bit(c.req(0)?);
    let per = if typed { 1 } else { 8 / bits };
    let mut shape = data.shape().to_vec();
    *shape.last_mut().expect("rank checked by axis") *= per;
    let values: Vec<f32> = match data.data() {
        _ if typed => data.to_f64_vec().into_iter().map(|v| v as f32).collect(),
        egret_ir::Data::U8(bytes) => unpack(bytes, bits, bytes.len() * per).into_iter().map(f32::from).collect(),
        _ => return Err(c.err(format!("data is {}; it must be uint8, int4 or uint4", data.dtype()))),
    };
    // The zero point when there is none: 0 for int4, the middle of the range else.
    let middle = if data.dtype() == DType::I8 { 0.0 } else { (1 << (bits - 1)) as f32 };
    let mut scale_shape = shape.clone();
    scale_shape[axis] = shape[axis].div_ceil(block);
    if scales.shape() != scale_shape.as_slice() {
        return Err(c.err(format!(
            "scales are {:?}; blocks of {block} along axis {axis} of {shape:?} need {scale_shape:?}",
            scales.shape()
        )));
    }
    let Some(s) = scales.as_f32() else {
        return Err(c.err(format!("scales are {}; they must be f32", scales.dtype())));
    };
    let zeros: Vec<f32> = match c.input(3) {
        None => vec![middle; s.len()],
        Some(z) if c.is_four_bit(z) => {
            let z = c.need_known(3, "zero_points")?;
            if z.shape() != scale_shape.as_slice() {
                return Err(c.err(format!("zero_points are {:?}, not {scale_shape:?}", z.shape())));
            }
            z.to_f64_vec().into_iter().map(|v| v as f32).collect()
        }
        Some(_) => {
            let z = packed_bytes(c, 3, "zero_points")?;
            let last = *scale_shape.last().expect("rank >= 1");
            let row = last.div_ceil(per);
            if z.len() * last != s.len() * row {
                return Err(c.err(format!("zero_points hold {} bytes for scales {scale_shape:?}", z.len())));
            }
            z.chunks(row).flat_map(|r| unpack(r, bits, last)).map(f32::from).collect()
        }
    };
    let strides = egret_ir::strides_of(&shape);
    let scale_strides = egret_ir::strides_of(&scale_shape);
    let mut out = vec![0f32; values.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let mut at = 0;
        for d in 0..rank {
            let mut idx = (i / strides[d]) % shape[d];
            if d == axis {
                idx /= block;
            }
            at += idx * scale_strides[d];
        }
        *o = (values[i] - zeros[at]) * s[at];
    }
    let table = c.constant(Tensor::from_vec(shape, out));
    c.add_node(Op::Gather { axis: gather_axis }, &[table, indices])
}
