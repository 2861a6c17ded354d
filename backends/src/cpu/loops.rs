//! Counted loops with loop-carried values, the building block of kernels.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, BlockArg, InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// `for i in (start..end).step_by(step)` with loop-carried values; `body`
/// gets the index and the carried values and returns their next values.
pub fn counted(
    b: &mut FunctionBuilder,
    start: i64,
    end: i64,
    step: i64,
    carried: Vec<Value>,
    body: &mut dyn FnMut(&mut FunctionBuilder, Value, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    if end <= start {
        return carried;
    }
    let (s, e) = (b.ins().iconst(types::I64, start), b.ins().iconst(types::I64, end));
    counted_dyn(b, s, e, step, carried, body)
}

/// `counted` with bounds known only at run time (`end - start` a multiple
/// of `step`, or `step` 1).
pub fn counted_dyn(
    b: &mut FunctionBuilder,
    start: Value,
    end: Value,
    step: i64,
    carried: Vec<Value>,
    body: &mut dyn FnMut(&mut FunctionBuilder, Value, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    while_fits(b, start, end, step, carried, body).1
}

/// `i = start; while i + step <= end { carried = body(i, carried); i += step }`.
/// Returns the final `i` and carried values, so that a scalar loop can take
/// over where a vector loop stopped.
pub fn while_fits(
    b: &mut FunctionBuilder,
    start: Value,
    end: Value,
    step: i64,
    carried: Vec<Value>,
    body: &mut dyn FnMut(&mut FunctionBuilder, Value, &[Value]) -> Vec<Value>,
) -> (Value, Vec<Value>) {
    let header = b.create_block();
    let block = b.create_block();
    let exit = b.create_block();
    b.append_block_param(header, types::I64);
    for &c in &carried {
        b.append_block_param(header, b.func.dfg.value_type(c));
    }
    let last_start = if step == 1 { end } else { b.ins().iadd_imm_s(end, 1 - step) };
    let mut args: Vec<BlockArg> = vec![start.into()];
    args.extend(carried.iter().map(|&c| BlockArg::from(c)));
    b.ins().jump(header, &args);
    b.switch_to_block(header);
    let params = b.block_params(header).to_vec();
    // i + step <= end, written as i < end - step + 1.
    let more = b.ins().icmp(IntCC::SignedLessThan, params[0], last_start);
    b.ins().brif(more, block, &[], exit, &[]);
    b.switch_to_block(block);
    let next = body(b, params[0], &params[1..]);
    let i1 = b.ins().iadd_imm_s(params[0], step);
    let mut args: Vec<BlockArg> = vec![i1.into()];
    args.extend(next.iter().map(|&c| BlockArg::from(c)));
    b.ins().jump(header, &args);
    b.switch_to_block(exit);
    (params[0], params[1..].to_vec())
}
