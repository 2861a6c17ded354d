//! Matmul kernels: a loop over the batch table around either a call to the
//! GEMM library or a register-tiled product generated here, then a call to
//! the kernel library's epilogue when one is fused in (the packed GEMM
//! takes its epilogue as an argument and applies it itself).
//!
//! The generated product keeps a 4 x 8 tile of `c` in eight f32x4
//! accumulators: per step of `k` it loads two vectors of a `b` row, splats
//! four `a` elements and issues eight fused multiply-adds. Rows and columns
//! past the last whole tile take a scalar loop.

use super::loops::{counted, counted_dyn};
use super::runtime_fns::FuncRefs;
use crate::plan::{known, known_size, MatMulImpl, MatMulKernel};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, GlobalValue, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

const TILE_M: usize = 4;
const TILE_N: usize = 8;

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// `base + 4 * (row * row_stride + col * col_stride)` for i64 row/col values.
fn addr(b: &mut FunctionBuilder, base: Value, row: Value, rs: isize, col: Value, cs: isize) -> Value {
    let r = b.ins().imul_imm_s(row, rs as i64 * 4);
    let c = b.ins().imul_imm_s(col, cs as i64 * 4);
    let off = b.ins().iadd(r, c);
    b.ins().iadd(base, off)
}

/// The address of `b[0, j]` and the distance between rows of column `j`,
/// for either layout of `b`.
fn column_of_b(b: &mut FunctionBuilder, mm: &MatMulKernel, pb: Value, j: Value, n8: i64) -> (Value, Value) {
    if !mm.b_packed {
        let zero = b.ins().iconst(types::I64, 0);
        let col = addr(b, pb, zero, 0, j, 1);
        return (col, b.ins().iconst(types::I64, mm.b_strides[0] as i64 * 4));
    }
    let k = mm.k as i64;
    // In a panel: (j & !7) * k + (j & 7), rows 8 apart.
    let group = b.ins().band_imm_s(j, !7);
    let lane = b.ins().band_imm_s(j, 7);
    let in_panel = b.ins().imul_imm_s(group, k);
    let in_panel = b.ins().iadd(in_panel, lane);
    let panel_step = b.ins().iconst(types::I64, (TILE_N * 4) as i64);
    // Past the panels: n8 * k + (j - n8), rows n - n8 apart.
    let tail = b.ins().iadd_imm_s(j, n8 * k - n8);
    let tail_step = b.ins().iconst(types::I64, (mm.n as i64 - n8) * 4);
    let is_panel = b.ins().icmp_imm_s(IntCC::SignedLessThan, j, n8);
    let elem = b.ins().select(is_panel, in_panel, tail);
    let step = b.ins().select(is_panel, panel_step, tail_step);
    let bytes = b.ins().ishl_imm_u(elem, 2);
    (b.ins().iadd(pb, bytes), step)
}

#[allow(clippy::too_many_arguments)]
pub fn emit(
    b: &mut FunctionBuilder,
    ptr: Type,
    args: Value,
    range: (Value, Value),
    mm: &MatMulKernel,
    table: GlobalValue,
    epilogue: Option<Value>,
    row_tables: [Option<GlobalValue>; 2],
    fns: &FuncRefs,
    rows: Option<Value>,
) {
    // The rows: known, or this call's value of a symbolic count (`rows`).
    let m = match rows {
        Some(m) => m,
        None => b.ins().iconst(types::I64, known(mm.m) as i64),
    };
    let a = b.ins().load(ptr, flags(), args, 0);
    let bm = b.ins().load(ptr, flags(), args, 8);
    // The epilogue's operands come between `b` and `c`.
    let c_slot = 2 + mm.epilogue.as_ref().map_or(0, |e| e.inputs.len());
    let c = b.ins().load(ptr, flags(), args, (c_slot * 8) as i32);
    let table = b.ins().symbol_value(ptr, table);
    counted_dyn(b, range.0, range.1, 1, vec![], &mut |b, i, _| {
        // Row `i` of the table: element offsets of a, b and c.
        let row = b.ins().imul_imm_s(i, 24);
        let row = b.ins().iadd(table, row);
        let at = |base, slot: i32, b: &mut FunctionBuilder| {
            let off = b.ins().load(types::I64, flags(), row, slot * 8);
            let bytes = b.ins().ishl_imm_u(off, 2);
            b.ins().iadd(base, bytes)
        };
        let (pa, pb, pc) = (at(a, 0, b), at(bm, 1, b), at(c, 2, b));
        // Whether the epilogue (if any) still has to run after the product.
        let epilogue_after = match mm.implementation {
            MatMulImpl::Library => {
                let dims = [m, b.ins().iconst(types::I64, mm.k as i64), b.ins().iconst(types::I64, mm.n as i64)];
                let [a_rs, a_cs] = mm.a_strides.map(|s| b.ins().iconst(types::I64, s as i64));
                let [b_rs, b_cs] = mm.b_strides.map(|s| b.ins().iconst(types::I64, s as i64));
                let sgemm = fns.sgemm.expect("library matmuls are only compiled where the GEMM library links");
                b.ins().call(sgemm, &[dims[0], dims[1], dims[2], pa, a_rs, a_cs, pb, b_rs, b_cs, pc]);
                epilogue
            }
            MatMulImpl::Generated => {
                emit_tiled(b, mm, pa, pb, pc);
                epilogue
            }
            MatMulImpl::Packed => {
                let dims = [m, b.ins().iconst(types::I64, mm.k as i64), b.ins().iconst(types::I64, mm.n as i64)];
                let [a_rs, a_cs] = mm.a_strides.map(|s| b.ins().iconst(types::I64, s as i64));
                let gemm = fns.sgemm_packed.expect("packed matmuls are only compiled where the kernel library links");
                // The packed GEMM runs the epilogue itself, on each
                // thread's columns while they are still in its cache.
                let program = epilogue.unwrap_or_else(|| b.ins().iconst(ptr, 0));
                // The row tables for `a` and `c`, null where absent.
                let [a_rows, c_rows] = row_tables.map(|t| match t {
                    Some(rows) => b.ins().symbol_value(ptr, rows),
                    None => b.ins().iconst(ptr, 0),
                });
                b.ins().call(gemm, &[dims[0], dims[1], dims[2], pa, a_rs, a_cs, pb, pc, a_rows, c_rows, program, args]);
                None
            }
            MatMulImpl::Unchosen => unreachable!("`compile_with` refuses neutral plans"),
        };
        if let Some(program) = epilogue_after {
            let f = fns.epilogue.expect("epilogues are only compiled where the kernel library links");
            b.ins().call(f, &[program, args, pc]);
        }
        vec![]
    });
}

/// `cpu::choose` generates only products of known rows.
fn emit_tiled(b: &mut FunctionBuilder, mm: &MatMulKernel, pa: Value, pb: Value, pc: Value) {
    let rows = known_size(mm.m);
    let (m4, n8) = ((rows / TILE_M * TILE_M) as i64, (mm.n / TILE_N * TILE_N) as i64);
    let [a_rs, a_cs] = mm.a_strides;
    let b_rs = mm.b_strides[0];
    let n = mm.n as isize;
    counted(b, 0, m4, TILE_M as i64, vec![], &mut |b, i, _| {
        counted(b, 0, n8, TILE_N as i64, vec![], &mut |b, j, _| {
            let zero = b.ins().f32const(0.0);
            let zero = b.ins().splat(types::F32X4, zero);
            // The k-loop carries the accumulators and two pointers: `a[i, p]`
            // (the tile's other rows are immediate offsets from it) and `b[p, j]`.
            let zero_i = b.ins().iconst(types::I64, 0);
            let a0 = addr(b, pa, i, a_rs, zero_i, a_cs);
            // Packed: the panel of columns j..j+8 starts at j * k and its rows are 8 apart.
            let b0 = if mm.b_packed {
                let off = b.ins().imul_imm_s(j, (mm.k * 4) as i64);
                b.ins().iadd(pb, off)
            } else {
                addr(b, pb, zero_i, b_rs, j, 1)
            };
            let mut carried = vec![zero; TILE_M * 2];
            carried.extend([a0, b0]);
            let out = counted(b, 0, mm.k as i64, 1, carried, &mut |b, _, c| {
                let (acc, pa_p, pb_p) = (&c[..TILE_M * 2], c[TILE_M * 2], c[TILE_M * 2 + 1]);
                let v0 = b.ins().load(types::F32X4, flags(), pb_p, 0);
                let v1 = b.ins().load(types::F32X4, flags(), pb_p, 16);
                let mut next = Vec::with_capacity(TILE_M * 2 + 2);
                for r in 0..TILE_M {
                    let x = b.ins().load(types::F32, flags(), pa_p, (r as isize * a_rs * 4) as i32);
                    let xv = b.ins().splat(types::F32X4, x);
                    next.push(b.ins().fma(xv, v0, acc[2 * r]));
                    next.push(b.ins().fma(xv, v1, acc[2 * r + 1]));
                }
                next.push(b.ins().iadd_imm_s(pa_p, a_cs as i64 * 4));
                next.push(b.ins().iadd_imm_s(pb_p, if mm.b_packed { (TILE_N * 4) as i64 } else { b_rs as i64 * 4 }));
                next
            });
            let acc = &out[..TILE_M * 2];
            for r in 0..TILE_M {
                let ir = b.ins().iadd_imm_s(i, r as i64);
                let dst = addr(b, pc, ir, n, j, 1);
                b.ins().store(flags(), acc[2 * r], dst, 0);
                b.ins().store(flags(), acc[2 * r + 1], dst, 16);
            }
            vec![]
        });
        vec![]
    });
    // Everything outside the whole tiles, one element at a time: columns
    // n8.. of the tiled rows, then every column of rows m4...
    let n_end = b.ins().iconst(types::I64, mm.n as i64);
    counted(b, 0, rows as i64, 1, vec![], &mut |b, i, _| {
        let tiled_row = b.ins().icmp_imm_s(IntCC::SignedLessThan, i, m4);
        let from_tile = b.ins().iconst(types::I64, n8);
        let from_zero = b.ins().iconst(types::I64, 0);
        let j0 = b.ins().select(tiled_row, from_tile, from_zero);
        counted_dyn(b, j0, n_end, 1, vec![], &mut |b, j, _| {
            let (b_col, b_step) = column_of_b(b, mm, pb, j, n8);
            let zero = b.ins().f32const(0.0);
            let zero_i = b.ins().iconst(types::I64, 0);
            let a_row = addr(b, pa, i, a_rs, zero_i, a_cs);
            let sum = counted(b, 0, mm.k as i64, 1, vec![zero, a_row, b_col], &mut |b, _, c| {
                let x = b.ins().load(types::F32, flags(), c[1], 0);
                let y = b.ins().load(types::F32, flags(), c[2], 0);
                let next_a = b.ins().iadd_imm_s(c[1], a_cs as i64 * 4);
                let next_b = b.ins().iadd(c[2], b_step);
                vec![b.ins().fma(x, y, c[0]), next_a, next_b]
            })[0];
            let dst = addr(b, pc, i, n, j, 1);
            b.ins().store(flags(), sum, dst, 0);
            vec![]
        });
        vec![]
    });
}
