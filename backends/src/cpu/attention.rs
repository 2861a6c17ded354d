//! The attention kernel's code: a stub that hands the kernel's parameters
//! (a data object, `kernels::attention::AttentionParams`), its per-batch
//! offsets and the operand addresses to the hand-written flash-style kernel
//! in `kernels::attention`, which runs the GEMMs and the online softmax.

use super::runtime_fns::FuncRefs;
use cranelift_codegen::ir::{GlobalValue, InstBuilder, Type, Value};
use cranelift_frontend::FunctionBuilder;

pub fn emit(
    b: &mut FunctionBuilder,
    ptr: Type,
    args: Value,
    range: (Value, Value),
    params: GlobalValue,
    table: GlobalValue,
    fns: &FuncRefs,
) {
    let attention = fns.attention.expect("attention kernels are compiled where the kernel library links");
    let params = b.ins().symbol_value(ptr, params);
    let table = b.ins().symbol_value(ptr, table);
    b.ins().call(attention, &[params, table, args, range.0, range.1]);
}
