//! Flash-style attention: for one block of query rows at a time, the keys
//! are visited in blocks; each block's scores go to a small tile (GEMM),
//! are scaled, masked and exponentiated against a running row maximum (the
//! online softmax), and the tile times that block of `v` is added into the
//! output rows, which are first rescaled when the maximum grew. The output
//! is divided by the running sum at the end. Only a `block x key_block`
//! tile of scores ever exists.
//!
//! With a mask known at compile time, each query block visits only the
//! span of keys its rows can weigh (`ir::ops::linalg::live_key_spans`): a
//! causal mask halves the work. The output rows may be strided, so that
//! the heads write straight into the `[.., sq, heads, dv]` layout the
//! output projection reads.

use super::{exp, exp_and_sum, multiversion, row_max};
use std::cell::RefCell;

/// An attention kernel's shape and strides, as the JIT stub hands it over:
/// a read-only data object with this layout (eight-byte fields).
///
/// Generic over its integer fields' type so that one definition gives the
/// layout twice: `AttentionParams<i64>` is the object the kernel reads, and
/// a compiler may fill the fields with expressions of sizes only known at
/// run time and list them in this order (`words`) for code that computes
/// the object per call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams<W = i64> {
    pub sq: W,
    pub sk: W,
    pub d: W,
    pub dv: W,
    pub block: W,
    pub key_block: W,
    pub has_mask: W,
    pub nan_to_zero: W,
    /// Elements between consecutive output rows (`dv` when dense).
    pub out_rs: W,
    /// The number of batches; with `has_spans`, the offsets table is
    /// followed by each task's key span (two words).
    pub batches: W,
    pub has_spans: W,
    pub q_strides: [W; 2],
    pub kt_strides: [W; 2],
    pub v_strides: [W; 2],
    pub mask_strides: [W; 2],
    pub scale: f64,
    /// The scores' soft cap, 0 for none.
    pub softcap: f64,
}

/// Eight-byte fields in an `AttentionParams`.
pub const ATTENTION_PARAM_WORDS: usize = 21;

impl<W: Clone> AttentionParams<W> {
    /// The fields in layout order, the two floats through `bits` (which
    /// gets each one's value; the object holds its IEEE bits).
    pub fn words(&self, bits: impl Fn(f64) -> W) -> [W; ATTENTION_PARAM_WORDS] {
        [
            self.sq.clone(),
            self.sk.clone(),
            self.d.clone(),
            self.dv.clone(),
            self.block.clone(),
            self.key_block.clone(),
            self.has_mask.clone(),
            self.nan_to_zero.clone(),
            self.out_rs.clone(),
            self.batches.clone(),
            self.has_spans.clone(),
            self.q_strides[0].clone(),
            self.q_strides[1].clone(),
            self.kt_strides[0].clone(),
            self.kt_strides[1].clone(),
            self.v_strides[0].clone(),
            self.v_strides[1].clone(),
            self.mask_strides[0].clone(),
            self.mask_strides[1].clone(),
            bits(self.scale),
            bits(self.softcap),
        ]
    }
}

impl AttentionParams {
    /// The bytes of the data object (little-endian, this struct's layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let words = self.words(|f| f.to_bits() as i64);
        const _: () = assert!(ATTENTION_PARAM_WORDS * 8 == std::mem::size_of::<AttentionParams>());
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// Per-thread scratch: the score tile and each row's running max and sum.
#[derive(Default)]
struct Scratch {
    tile: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs tasks `begin..end` (task = batch * blocks_per_batch + query block)
/// of the attention kernel described by `params`; `table` holds five
/// element offsets per batch (q, kt, v, mask, out), then (with
/// `has_spans`) the first and end key of each task, and `args` the operand
/// base addresses (q, kt, v, [mask,] out).
///
/// # Safety
/// The pointers describe buffers that hold every element the parameters
/// address, as the plan guarantees.
#[no_mangle]
pub unsafe extern "C" fn egret_attention(
    params: *const AttentionParams,
    table: *const i64,
    args: *const *mut u8,
    begin: i64,
    end: i64,
) {
    let p = unsafe { &*params };
    let arg = |i: usize| unsafe { *args.add(i) as *mut f32 };
    let (q, kt, v) = (arg(0), arg(1), arg(2));
    let (mask, out) = if p.has_mask != 0 { (arg(3), arg(4)) } else { (std::ptr::null_mut(), arg(3)) };
    let blocks = (p.sq + p.block - 1) / p.block;
    let (block, key_block) = (p.block as usize, p.key_block.min(p.sk) as usize);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let s = &mut *s;
        s.tile.resize(block * key_block, 0.0);
        s.max.resize(block, 0.0);
        s.sum.resize(block, 0.0);
        for task in begin..end {
            let (batch, qb) = (task / blocks, task % blocks);
            let row0 = qb * p.block;
            let rows = p.block.min(p.sq - row0) as usize;
            let offs = unsafe { std::slice::from_raw_parts(table.add(batch as usize * 5), 5) };
            let at = |base: *mut f32, off: i64| unsafe { base.offset(off as isize) };
            let q = at(q, offs[0] + row0 * p.q_strides[0]);
            let kt = at(kt, offs[1]);
            let v = at(v, offs[2]);
            let mask = if mask.is_null() { mask } else { at(mask, offs[3] + row0 * p.mask_strides[0]) };
            let out = at(out, offs[4] + row0 * p.out_rs);
            let keys = if p.has_spans != 0 {
                let span = unsafe { table.add(p.batches as usize * 5 + task as usize * 2) };
                unsafe { (*span as usize, *span.add(1) as usize) }
            } else {
                (0, p.sk as usize)
            };
            unsafe { query_block(p, rows, keys, q, kt, v, mask, out, s) };
        }
    })
}

/// One block of `rows` query rows against the keys `keys.0..keys.1` (the
/// others have weight zero for every row), into `out` (`rows` rows of
/// `dv`, `out_rs` apart).
#[allow(clippy::too_many_arguments)]
unsafe fn query_block(
    p: &AttentionParams,
    rows: usize,
    keys: (usize, usize),
    q: *const f32,
    kt: *const f32,
    v: *const f32,
    mask: *const f32,
    out: *mut f32,
    s: &mut Scratch,
) {
    let (d, dv, out_rs) = (p.d as usize, p.dv as usize, p.out_rs as isize);
    let (first, end) = keys;
    let key_block = (p.key_block as usize).min(end - first).max(1);
    s.max[..rows].fill(f32::NEG_INFINITY);
    s.sum[..rows].fill(0.0);
    let mut k0 = first;
    while k0 < end {
        let n = key_block.min(end - k0);
        let tile = s.tile.as_mut_ptr();
        // tile[rows, n] = q[rows, d] @ kt[d, k0..k0 + n]
        unsafe {
            gemm::gemm(
                rows,
                n,
                d,
                tile,
                1,
                n as isize,
                false,
                q,
                p.q_strides[1] as isize,
                p.q_strides[0] as isize,
                kt.offset(k0 as isize * p.kt_strides[1] as isize),
                p.kt_strides[1] as isize,
                p.kt_strides[0] as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        let mask_block =
            if mask.is_null() { mask } else { unsafe { mask.offset(k0 as isize * p.mask_strides[1] as isize) } };
        unsafe {
            softmax_step(
                p,
                rows,
                n,
                k0 > first,
                s.tile.as_mut_ptr(),
                mask_block,
                s.max.as_mut_ptr(),
                s.sum.as_mut_ptr(),
                out,
            )
        };
        // out[rows, dv] (+)= tile[rows, n] @ v[k0..k0 + n, dv]
        unsafe {
            gemm::gemm(
                rows,
                dv,
                n,
                out,
                1,
                out_rs,
                k0 > first,
                s.tile.as_ptr(),
                1,
                n as isize,
                v.offset(k0 as isize * p.v_strides[0] as isize),
                p.v_strides[1] as isize,
                p.v_strides[0] as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        k0 += n;
    }
    // A guarded NaN row multiplies zero probabilities into every value
    // row: the reference gives NaN in the columns of `v` that hold an
    // infinite or NaN value, zero in the others. Rare (a fully masked row,
    // or NaN scores), so the columns are scanned only when one occurs.
    let nan_rows = p.nan_to_zero != 0 && s.sum[..rows].iter().any(|&t| t == 0.0 || t.is_nan());
    let bad_columns: Vec<bool> = if nan_rows {
        (0..dv)
            .map(|j| {
                (first..end).any(|k| {
                    let at = k as isize * p.v_strides[0] as isize + j as isize * p.v_strides[1] as isize;
                    !unsafe { *v.offset(at) }.is_finite()
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let bad = if nan_rows { bad_columns.as_ptr() } else { std::ptr::null() };
    unsafe { finish_rows(rows, dv, out_rs as usize, p.nan_to_zero != 0, bad, s.sum.as_ptr(), out) };
}

multiversion! {
    /// The online-softmax step for one key block: per row, scale and mask
    /// the scores, update the running max, exponentiate in place, add to the
    /// running sum, and rescale the output accumulated so far if the max grew.
    unsafe fn softmax_step(
        p: &AttentionParams,
        rows: usize,
        n: usize,
        accumulated: bool,
        tile: *mut f32,
        mask: *const f32,
        max: *mut f32,
        sum: *mut f32,
        out: *mut f32,
    ) = softmax_step_impl;
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn softmax_step_impl<const FMA: bool>(
    p: &AttentionParams,
    rows: usize,
    n: usize,
    accumulated: bool,
    tile: *mut f32,
    mask: *const f32,
    max: *mut f32,
    sum: *mut f32,
    out: *mut f32,
) {
    let scale = p.scale as f32;
    let (dv, out_rs) = (p.dv as usize, p.out_rs as usize);
    for r in 0..rows {
        let row = unsafe { std::slice::from_raw_parts_mut(tile.add(r * n), n) };
        if p.softcap > 0.0 {
            // cap * tanh(s * scale / cap), then the mask; the loops below
            // then scale by one.
            let cap = p.softcap as f32;
            let inner = scale / cap;
            for x in row.iter_mut() {
                *x = cap * super::tanh::<FMA>(*x * inner);
            }
        }
        let scale = if p.softcap > 0.0 { 1.0 } else { scale };
        if mask.is_null() {
            for x in row.iter_mut() {
                *x *= scale;
            }
        } else {
            let m = unsafe { mask.offset(r as isize * p.mask_strides[0] as isize) };
            let mcs = p.mask_strides[1] as isize;
            if mcs == 1 {
                let m = unsafe { std::slice::from_raw_parts(m, n) };
                for (x, &mk) in row.iter_mut().zip(m) {
                    *x = super::madd::<FMA>(*x, scale, mk);
                }
            } else {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = super::madd::<FMA>(*x, scale, unsafe { *m.offset(j as isize * mcs) });
                }
            }
        }
        let block_max = row_max(row);
        let (old_max, old_sum) = unsafe { (*max.add(r), *sum.add(r)) };
        let new_max = old_max.max(block_max);
        if new_max == f32::NEG_INFINITY {
            // Every score so far is masked out: no weight yet.
            row.fill(0.0);
            continue;
        }
        let block_sum = exp_and_sum::<FMA>(row, new_max);
        let correction = exp::<FMA>(old_max - new_max);
        unsafe {
            *max.add(r) = new_max;
            *sum.add(r) = old_sum * correction + block_sum;
        }
        if accumulated && correction != 1.0 {
            let o = unsafe { std::slice::from_raw_parts_mut(out.add(r * out_rs), dv) };
            for x in o {
                *x *= correction;
            }
        }
    }
}

multiversion! {
    /// Divides each output row by its softmax sum. A row whose sum is 0
    /// (every key masked out) or NaN (an infinite or NaN score) is a row of
    /// NaN probabilities in the reference softmax: its output is NaN, or
    /// under the exporters' NaN guard zero probabilities times `v`: zeros,
    /// but NaN in the columns `bad_columns` marks (non-finite values). Any
    /// other row has no NaN probability, so the guard leaves it alone, NaN
    /// values from `v` included.
    unsafe fn finish_rows(
        rows: usize,
        dv: usize,
        out_rs: usize,
        nan_to_zero: bool,
        bad_columns: *const bool,
        sum: *const f32,
        out: *mut f32,
    ) = finish_rows_impl;
}

#[inline(always)]
unsafe fn finish_rows_impl<const FMA: bool>(
    rows: usize,
    dv: usize,
    out_rs: usize,
    nan_to_zero: bool,
    bad_columns: *const bool,
    sum: *const f32,
    out: *mut f32,
) {
    for r in 0..rows {
        let total = unsafe { *sum.add(r) };
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(r * out_rs), dv) };
        if total == 0.0 || total.is_nan() {
            if !nan_to_zero {
                o.fill(f32::NAN);
                continue;
            }
            let bad = unsafe { std::slice::from_raw_parts(bad_columns, dv) };
            for (x, &b) in o.iter_mut().zip(bad) {
                *x = if b { f32::NAN } else { 0.0 };
            }
            continue;
        }
        let inv = 1.0 / total;
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
}
