//! Row kernels for the fused norms and the softmax: layer norm, RMS norm
//! (each with an optional scale and bias) and softmax over contiguous rows,
//! the same arithmetic as the generated `cpu::rows` code at the host's
//! full vector width.

use super::{exp_and_sum, multiversion, row_max, LANES};

/// A row kernel as the JIT stub hands it over (a data object of i64 words).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowParams {
    /// `OP_LAYER_NORM`, `OP_RMS_NORM` or `OP_SOFTMAX`.
    pub op: i64,
    pub len: i64,
    pub has_scale: i64,
    pub has_bias: i64,
    pub has_residual: i64,
    pub epsilon: f64,
}

pub const OP_LAYER_NORM: i64 = 0;
pub const OP_RMS_NORM: i64 = 1;
pub const OP_SOFTMAX: i64 = 2;

impl RowParams {
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.op, self.len, self.has_scale, self.has_bias, self.has_residual, self.epsilon.to_bits() as i64]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }
}

/// Rows `begin..end`; `args` holds x, [residual,] [scale,] [bias,] out, [sum].
///
/// # Safety
/// `params` came from `RowParams::to_bytes` for this kernel and the buffers
/// hold its rows.
#[no_mangle]
pub unsafe extern "C" fn egret_rows(params: *const RowParams, args: *const *mut u8, begin: i64, end: i64) {
    let p = unsafe { &*params };
    let mut slot = 0;
    let mut next = || {
        let a = unsafe { *args.add(slot) as *mut f32 };
        slot += 1;
        a
    };
    let x = next();
    let residual = if p.has_residual != 0 { next() } else { std::ptr::null_mut() };
    let scale = if p.has_scale != 0 { next() } else { std::ptr::null_mut() };
    let bias = if p.has_bias != 0 { next() } else { std::ptr::null_mut() };
    let out = next();
    let sum = if p.has_residual != 0 { next() } else { std::ptr::null_mut() };
    let operands = Operands { x, residual, scale, bias, out, sum };
    unsafe { rows(p, &operands, begin as usize, end as usize) };
}

/// A row kernel's buffers; `residual` and `sum` are null without a residual.
struct Operands {
    x: *const f32,
    residual: *const f32,
    scale: *const f32,
    bias: *const f32,
    out: *mut f32,
    sum: *mut f32,
}

multiversion! {
    unsafe fn rows(p: &RowParams, o: &Operands, begin: usize, end: usize) = rows_impl;
}

#[inline(always)]
unsafe fn rows_impl<const FMA: bool>(p: &RowParams, o: &Operands, begin: usize, end: usize) {
    let n = p.len as usize;
    let vector = |v: *const f32| (!v.is_null()).then(|| unsafe { std::slice::from_raw_parts(v, n) });
    let (scale, bias) = (vector(o.scale), vector(o.bias));
    for r in begin..end {
        let mut src = unsafe { o.x.add(r * n) };
        if !o.residual.is_null() {
            // Normalise x + residual, and keep the sum for the residual stream
            // (x, the residual and the sum are three buffers).
            let x = unsafe { std::slice::from_raw_parts(src, n) };
            let res = unsafe { std::slice::from_raw_parts(o.residual.add(r * n), n) };
            let sum = unsafe { std::slice::from_raw_parts_mut(o.sum.add(r * n), n) };
            for ((s, &a), &b) in sum.iter_mut().zip(x).zip(res) {
                *s = a + b;
            }
            src = sum.as_ptr();
        }
        // A softmax may run in place (the composite attention's scores):
        // the input is then never borrowed beside the output.
        let out = unsafe { o.out.add(r * n) };
        let in_place = std::ptr::eq(src, out);
        let y = unsafe { std::slice::from_raw_parts_mut(out, n) };
        match p.op {
            OP_SOFTMAX => {
                if !in_place {
                    y.copy_from_slice(unsafe { std::slice::from_raw_parts(src, n) });
                }
                softmax::<FMA>(y);
            }
            op if in_place => {
                // Lowering never normalises in place; stay sound if it does.
                let x = y.to_vec();
                norm(op == OP_RMS_NORM, p.epsilon as f32, &x, scale, bias, y);
            }
            op => {
                let x = unsafe { std::slice::from_raw_parts(src, n) };
                norm(op == OP_RMS_NORM, p.epsilon as f32, x, scale, bias, y);
            }
        }
    }
}

/// `y = (x - mean) / sqrt(var + epsilon) * scale + bias` (no mean for RMS).
#[inline(always)]
fn norm(rms: bool, epsilon: f32, x: &[f32], scale: Option<&[f32]>, bias: Option<&[f32]>, y: &mut [f32]) {
    let n = x.len() as f32;
    let mean = if rms { 0.0 } else { sum(x, |v| v) / n };
    let var = sum(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + epsilon).sqrt();
    for (j, (out, &v)) in y.iter_mut().zip(x).enumerate() {
        let mut t = (v - mean) * inv;
        if let Some(g) = scale {
            t *= g[j];
        }
        if let Some(b) = bias {
            t += b[j];
        }
        *out = t;
    }
}

/// The sum of `f` over the row, in lanes.
#[inline(always)]
fn sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for l in 0..LANES {
            lanes[l] += f(c[l]);
        }
    }
    tail + lanes.iter().sum::<f32>()
}

/// The row's softmax in place: exponentiated against its max, then scaled
/// by the inverse sum.
#[inline(always)]
fn softmax<const FMA: bool>(y: &mut [f32]) {
    let max = row_max(y);
    let inv = 1.0 / exp_and_sum::<FMA>(y, max);
    for v in y.iter_mut() {
        *v *= inv;
    }
}
