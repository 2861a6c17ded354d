//! The attention kernel's code: a stub that hands the kernel's parameters
//! (`kernels::attention::AttentionParams`), its per-batch offsets and the
//! operand addresses to the hand-written flash-style kernel in
//! `kernels::attention`, which runs the GEMMs and the online softmax. The
//! parameters and offsets are data objects beside the code, or, for a
//! kernel whose sizes are symbolic, blocks the runtime fills per call.

use super::runtime_fns::FuncRefs;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// `params` and `table` are the blocks' addresses.
pub fn emit(b: &mut FunctionBuilder, args: Value, range: (Value, Value), params: Value, table: Value, fns: &FuncRefs) {
    let attention = fns.attention.expect("attention kernels are compiled where the kernel library links");
    b.ins().call(attention, &[params, table, args, range.0, range.1]);
}
