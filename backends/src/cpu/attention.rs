//! The attention kernel: for each (batch, block of query rows) in its
//! range, scores into a tile on the stack with the GEMM, then per row:
//! scale and mask, softmax (the row kernel's code), the NaN guard; then
//! the tile times `v` with the GEMM, straight into the output. Only a tile
//! of the score matrix ever exists, sized to stay in cache.

use super::loops::{counted, counted_dyn};
use super::rows::{emit_row, Row};
use super::runtime_fns::FuncRefs;
use super::vmath::VMath;
use crate::plan::{AttentionKernel, RowOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, GlobalValue, InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Type, Value};
use cranelift_frontend::FunctionBuilder;

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

pub fn emit(
    b: &mut FunctionBuilder,
    ptr: Type,
    args: Value,
    range: (Value, Value),
    k: &AttentionKernel,
    table: GlobalValue,
    fns: &FuncRefs,
) {
    let sgemm = fns.sgemm.expect("attention kernels are compiled where the GEMM library links");
    let mut slot = 0;
    let mut arg = |b: &mut FunctionBuilder| {
        let v = b.ins().load(ptr, flags(), args, slot * 8);
        slot += 1;
        v
    };
    let (q, kt, v) = (arg(b), arg(b), arg(b));
    let mask = k.mask.map(|_| arg(b));
    let out = arg(b);
    let table = b.ins().symbol_value(ptr, table);
    let tile_bytes = (k.block * k.sk * 4) as u32;
    let tile_slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, tile_bytes.max(64), 6));
    let blocks = k.blocks_per_batch() as i64;
    let i64c = |b: &mut FunctionBuilder, x: i64| b.ins().iconst(types::I64, x);
    counted_dyn(b, range.0, range.1, 1, vec![], &mut |b, t, _| {
        let batch = b.ins().udiv_imm_u(t, blocks);
        let qb = b.ins().urem_imm_u(t, blocks);
        let row0 = b.ins().imul_imm_s(qb, k.block as i64);
        // Rows in this block: the last block may be short.
        let sq = i64c(b, k.sq as i64);
        let left = b.ins().isub(sq, row0);
        let full = i64c(b, k.block as i64);
        let is_short = b.ins().icmp(IntCC::SignedLessThan, left, full);
        let rows = b.ins().select(is_short, left, full);
        // This batch's offsets (elements) from the table.
        let entry = b.ins().imul_imm_s(batch, 40);
        let entry = b.ins().iadd(table, entry);
        let offset = |b: &mut FunctionBuilder, k: i32| b.ins().load(types::I64, flags(), entry, k * 8);
        let elem = |b: &mut FunctionBuilder, base: Value, off: Value| {
            let bytes = b.ins().ishl_imm_u(off, 2);
            b.ins().iadd(base, bytes)
        };
        let q_off = offset(b, 0);
        let q_rows = b.ins().imul_imm_s(row0, k.q_strides[0] as i64);
        let q_off = b.ins().iadd(q_off, q_rows);
        let pq = elem(b, q, q_off);
        let kt_off = offset(b, 1);
        let pkt = elem(b, kt, kt_off);
        let v_off = offset(b, 2);
        let pv = elem(b, v, v_off);
        let out_off = offset(b, 4);
        let out_rows = b.ins().imul_imm_s(row0, k.dv as i64);
        let out_off = b.ins().iadd(out_off, out_rows);
        let pout = elem(b, out, out_off);
        let tile = b.ins().stack_addr(ptr, tile_slot, 0);

        // scores[rows, sk] = q[rows, d] @ kt[d, sk]
        let (dd, sk, dv) = (i64c(b, k.d as i64), i64c(b, k.sk as i64), i64c(b, k.dv as i64));
        let [q_rs, q_cs] = k.q_strides.map(|s| i64c(b, s as i64));
        let [kt_rs, kt_cs] = k.kt_strides.map(|s| i64c(b, s as i64));
        b.ins().call(sgemm, &[rows, dd, sk, pq, q_rs, q_cs, pkt, kt_rs, kt_cs, tile]);

        // Each row: scale and mask, softmax, guard.
        let zero = i64c(b, 0);
        let mask_row0 = mask.map(|m| {
            let off = offset(b, 3);
            let rows_off = b.ins().imul_imm_s(row0, k.mask_strides[0] as i64);
            let off = b.ins().iadd(off, rows_off);
            elem(b, m, off)
        });
        counted_dyn(b, zero, rows, 1, vec![], &mut |b, r, _| {
            let row_off = b.ins().imul_imm_s(r, (k.sk * 4) as i64);
            let row = b.ins().iadd(tile, row_off);
            let mask_row = mask_row0.map(|m| {
                let off = b.ins().imul_imm_s(r, k.mask_strides[0] as i64 * 4);
                b.ins().iadd(m, off)
            });
            scale_and_mask(b, k, row, mask_row);
            emit_row(b, &Row::new(k.sk, fns), RowOp::Softmax, row, row, None, None);
            if k.nan_to_zero {
                zero_nans(b, k.sk, row);
            }
            vec![]
        });

        // out[rows, dv] = probabilities[rows, sk] @ v[sk, dv]
        let (one, sk_stride) = (i64c(b, 1), i64c(b, k.sk as i64));
        let [v_rs, v_cs] = k.v_strides.map(|s| i64c(b, s as i64));
        b.ins().call(sgemm, &[rows, sk, dv, tile, sk_stride, one, pv, v_rs, v_cs, pout]);
        vec![]
    });
}

/// `s[j] = s[j] * scale (+ mask[j])` over one row of the tile.
fn scale_and_mask(b: &mut FunctionBuilder, k: &AttentionKernel, row: Value, mask: Option<Value>) {
    let vector = mask.is_none() || k.mask_strides[1] == 1;
    let n = k.sk as i64;
    let vec_end = if vector { n / 4 * 4 } else { 0 };
    for (start, end, lanes) in [(0, vec_end, 4i64), (vec_end, n, 1)] {
        counted(b, start, end, lanes, vec![], &mut |b, j, _| {
            let ty = if lanes == 4 { types::F32X4 } else { types::F32 };
            let m = VMath::new(lanes == 4);
            let off = b.ins().ishl_imm_u(j, 2);
            let at = b.ins().iadd(row, off);
            let s = b.ins().load(ty, flags(), at, 0);
            let c = m.c(b, k.scale);
            let mut s = b.ins().fmul(s, c);
            if let Some(mask) = mask {
                let moff = b.ins().imul_imm_s(j, k.mask_strides[1] as i64 * 4);
                let mat = b.ins().iadd(mask, moff);
                let mv = if lanes == 4 && k.mask_strides[1] == 0 {
                    let x = b.ins().load(types::F32, flags(), mat, 0);
                    b.ins().splat(types::F32X4, x)
                } else {
                    b.ins().load(ty, flags(), mat, 0)
                };
                s = b.ins().fadd(s, mv);
            }
            b.ins().store(flags(), s, at, 0);
            vec![]
        });
    }
}

/// `s[j] = isnan(s[j]) ? 0 : s[j]` over one row (a fully masked row's
/// softmax is NaN; the exporters' guard turns it into zeros).
fn zero_nans(b: &mut FunctionBuilder, n: usize, row: Value) {
    counted(b, 0, n as i64, 1, vec![], &mut |b, j, _| {
        let off = b.ins().ishl_imm_u(j, 2);
        let at = b.ins().iadd(row, off);
        let s = b.ins().load(types::F32, flags(), at, 0);
        let nan = b.ins().fcmp(FloatCC::Unordered, s, s);
        let z = b.ins().f32const(0.0);
        let s = b.ins().select(nan, z, s);
        b.ins().store(flags(), s, at, 0);
        vec![]
    });
}
