//! Ahead-of-time code: the whole plan as one relocatable object file.
//!
//! The object holds every kernel, generated exactly as the JIT generates
//! it (the same matmul choices, packed weights, epilogues, attention and
//! row kernels), the constants (packed weights among them) as aligned
//! read-only data, and a driver, `{prefix}_run_plan(inputs, outputs,
//! arena)`, that launches the kernels in order on the caller's buffers and
//! a caller-provided arena of `plan.arena_bytes`, returning the first
//! non-zero kernel status. Each launch goes through the kernel library's
//! scheduler (`egret_rt_launch`, with the split the JIT's executor uses), so
//! a driver run inside a context's pool (`egret_rt_pool_run`) splits
//! kernels across that pool's threads as the JIT does. Outputs that
//! `Plan::direct_output` allows are written straight into the caller's
//! buffers, as the JIT writes them into the tensors it returns.
//!
//! A plan that keeps symbolic sizes compiles to one object for every value
//! of them: its driver takes a fourth argument, `words`, that the caller
//! fills for each set of values (`ObjectCode::words` lists what each word
//! holds: the arena offsets laid out for those values, each symbolic
//! kernel's sizes, block addresses and extent, the bytes of each output
//! copied at the end). The kernels are the JIT's symbolic kernels, which
//! read the same slots.
//!
//! The constants are in the object's data, or, for weights too large for
//! it (`WeightsAt::Beside`: an object's data is addressed within 2 GB),
//! in a file beside the library: the object then reads them at offsets
//! from a pointer, `{prefix}_weights`, that the C shim sets where it maps
//! that file (`ObjectCode::weights` lays the file out).
//!
//! The object imports the kernel library's entry points (`egret_*`,
//! `egret_rt_launch`) and libm's; the `egret` crate links it with the
//! kernel archive and a generated C shim into a shared library.

use super::call::{self, Word};
use super::{define_kernels, library::split_of, runtime_fns, target_isa, CodegenError, TargetCpu};
use crate::plan::{BufferId, KernelKind, Plan, Storage};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{
    types, AbiParam, Function, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, UserFuncName,
};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataDescription, Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};
use egret_ir::{Dim, DimValues};
use std::collections::HashMap;

/// A compiled object file.
pub struct ObjectCode {
    pub bytes: Vec<u8>,
    /// The Cranelift IR of every function, kernels then driver.
    pub clif: String,
    /// The driver's symbol.
    pub entry: String,
    /// The plan compiled, after the CPU backend's own choices.
    pub plan: Plan,
    /// What each of the driver's run-time words holds, for a plan with
    /// symbolic sizes (empty for a bound plan, whose driver has them all
    /// as constants).
    pub words: Vec<DriverWord>,
    /// Where each constant lies in the weights file, for an object whose
    /// weights are beside it (`WeightsAt::Beside`).
    pub weights: Option<WeightsLayout>,
}

/// Where an object's constants live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsAt {
    /// In the object's read-only data.
    Embedded,
    /// In a file the library maps at load, read through `{prefix}_weights`.
    Beside,
}

/// The constants of an object whose weights are beside it: each buffer's
/// offset in the file's payload (64-byte aligned), and the payload's size.
#[derive(Clone, Debug, Default)]
pub struct WeightsLayout {
    pub offsets: Vec<(BufferId, u64)>,
    pub bytes: u64,
}

/// Alignment of each constant in a weights file, as in the object's data.
pub const WEIGHTS_ALIGN: u64 = 64;

/// A word (eight bytes) the driver of a symbolic plan reads from its
/// `words` argument, filled by the caller for each set of values.
#[derive(Clone, Debug, PartialEq)]
pub enum DriverWord {
    /// The arena offset of a buffer, in bytes.
    Offset(BufferId),
    /// A kernel's size slot, its parallel extent, or an output's bytes.
    Value(Word),
    /// The address of block `block` of kernel `kernel` (`call::blocks`).
    Block { kernel: usize, block: usize },
}

/// Where each run-time quantity of a symbolic plan lives in `words`.
#[derive(Default)]
struct WordTable {
    words: Vec<DriverWord>,
}

impl WordTable {
    /// The byte offset of word `w`, added if no earlier use has it.
    fn push(&mut self, w: DriverWord) -> i32 {
        let at = self.words.iter().position(|x| *x == w).unwrap_or_else(|| {
            self.words.push(w);
            self.words.len() - 1
        });
        (8 * at) as i32
    }
}

/// Compiles `plan` for `cpu` into an object whose driver is
/// `{prefix}_run_plan`, its constants where `weights` says.
pub fn compile_object(
    plan: Plan,
    prefix: &str,
    cpu: TargetCpu,
    weights: WeightsAt,
) -> Result<ObjectCode, CodegenError> {
    let plan = super::choose::choose(plan);
    let symbolic = !plan.is_bound();
    for (i, k) in plan.kernels.iter().enumerate() {
        if let KernelKind::Reference { op, .. } = &k.kind {
            return Err(CodegenError::Kernel {
                kernel: i,
                label: k.label.clone(),
                message: format!(
                    "op `{}` has no native kernel yet, so the model cannot be compiled ahead of time",
                    op.name()
                ),
            });
        }
    }
    let isa_err = |e: String| CodegenError::Isa(e);
    let builder = ObjectBuilder::new(target_isa(true, cpu)?, prefix, cranelift_module::default_libcall_names())
        .map_err(|e| isa_err(e.to_string()))?;
    let mut module = ObjectModule::new(builder);
    let imports = runtime_fns::declare(&mut module, true).map_err(|e| isa_err(e.to_string()))?;
    let (ids, kernel_clif) = define_kernels(&mut module, &plan, &imports)?;
    let launch = runtime_fns::declare_launch(&mut module).map_err(|e| isa_err(e.to_string()))?;

    let mut constants = HashMap::new();
    let used = plan.used_buffers();
    let mut layout = WeightsLayout::default();
    let weights_symbol = match weights {
        WeightsAt::Embedded => None,
        WeightsAt::Beside => Some(
            module
                .declare_data(&format!("{prefix}_weights"), Linkage::Import, false, false)
                .map_err(|e| isa_err(e.to_string()))?,
        ),
    };
    for (b, buf) in plan.buffers.iter().enumerate() {
        if let (Storage::Constant(t), true) = (&buf.storage, used[b]) {
            if weights_symbol.is_some() {
                layout.offsets.push((b, layout.bytes));
                let bytes = (t.numel() * t.dtype().size_bytes()) as u64;
                layout.bytes += bytes.div_ceil(WEIGHTS_ALIGN).max(1) * WEIGHTS_ALIGN;
                continue;
            }
            let id = module
                .declare_data(&format!("egret_c{b}"), Linkage::Local, false, false)
                .map_err(|e| isa_err(e.to_string()))?;
            let mut desc = DataDescription::new();
            // An empty tensor still needs an address.
            let bytes = if t.numel() == 0 { vec![0u8; 1] } else { t.to_bytes() };
            desc.define(bytes.into_boxed_slice());
            desc.set_align(64);
            module.define_data(id, &desc).map_err(|e| isa_err(e.to_string()))?;
            constants.insert(b, id);
        }
    }

    let ptr = module.target_config().pointer_type();
    let config = module.target_config();
    let mut sig = Signature::new(module.isa().default_call_conv());
    for _ in 0..4 {
        sig.params.push(AbiParam::new(ptr));
    }
    sig.returns.push(AbiParam::new(types::I32));
    let entry = format!("{prefix}_run_plan");
    let mut ctx = module.make_context();
    ctx.func = Function::with_name_signature(UserFuncName::user(1, 0), sig.clone());
    let mut fbc = FunctionBuilderContext::new();
    let mut table = WordTable::default();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
        let start = b.create_block();
        b.append_block_params_for_function_params(start);
        b.switch_to_block(start);
        let params = b.block_params(start).to_vec();
        let (inputs, outputs, arena, words) = (params[0], params[1], params[2], params[3]);
        // A symbolic plan's arena offsets depend on the values: one word each.
        let offset_words: HashMap<BufferId, i32> = match symbolic {
            false => HashMap::new(),
            true => (0..plan.buffers.len())
                .filter(|&b| matches!(plan.buffers[b].storage, Storage::Arena { .. }))
                .map(|b| (b, table.push(DriverWord::Offset(b))))
                .collect(),
        };
        let fail = b.create_block();
        b.append_block_param(fail, types::I32);
        let flags = MemFlagsData::new().with_notrap();
        let const_gvs: HashMap<usize, _> =
            constants.iter().map(|(&buf, &id)| (buf, module.declare_data_in_func(id, b.func))).collect();
        // Weights beside the library: the mapped file's payload, once.
        let weights_base = weights_symbol.map(|id| {
            let gv = module.declare_data_in_func(id, b.func);
            let at = b.ins().symbol_value(ptr, gv);
            b.ins().load(ptr, flags, at, 0)
        });
        let weight_offsets: HashMap<usize, u64> = layout.offsets.iter().copied().collect();
        // Each direct output's buffer, with the output it lives in.
        let direct: HashMap<usize, usize> =
            (0..plan.outputs.len()).filter(|&j| plan.direct_output(j)).map(|j| (plan.outputs[j].0, j)).collect();
        let addr = |b: &mut FunctionBuilder, buf: usize| match (&plan.buffers[buf].storage, direct.get(&buf)) {
            (_, Some(&j)) => b.ins().load(ptr, flags, outputs, (j * 8) as i32),
            (Storage::Input(i), _) => b.ins().load(ptr, flags, inputs, (*i * 8) as i32),
            (Storage::Constant(_), _) => match (weights_base, weight_offsets.get(&buf)) {
                (Some(base), Some(&offset)) => b.ins().iadd_imm_u(base, offset as i64),
                _ => b.ins().symbol_value(ptr, const_gvs[&buf]),
            },
            (Storage::Arena { offset }, _) => match offset_words.get(&buf) {
                Some(&w) => {
                    let offset = b.ins().load(types::I64, flags, words, w);
                    b.ins().iadd(arena, offset)
                }
                None => b.ins().iadd_imm_u(arena, *offset as i64),
            },
        };
        // A value: a constant when known, else a word of `words`.
        let no_symbols = egret_ir::Bindings::default();
        let value = |b: &mut FunctionBuilder, table: &mut WordTable, w: Word| match w.at(&DimValues::new(&no_symbols)) {
            Ok(c) => b.ins().iconst(types::I64, c),
            Err(_) => {
                let at = table.push(DriverWord::Value(w));
                b.ins().load(types::I64, flags, words, at)
            }
        };
        let launch = module.declare_func_in_func(launch, b.func);
        for (i, k) in plan.kernels.iter().enumerate() {
            let id = ids[i].expect("every kernel is native (checked above)");
            let callee = module.declare_func_in_func(id, b.func);
            let (reads, writes) = k.buffers();
            let operands: Vec<usize> = reads.into_iter().chain(writes).collect();
            // After the operands, as the JIT's runtime passes them: the
            // kernel's symbolic sizes, then its blocks' addresses.
            let sizes = k.runtime_dims();
            let blocks = call::blocks(k).len();
            let slots = operands.len() + sizes.len() + blocks;
            let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 8 * slots as u32, 3));
            for (n, &buf) in operands.iter().enumerate() {
                let a = addr(&mut b, buf);
                b.ins().stack_store(ptr, a, slot, (n * 8) as i32);
            }
            for (n, &d) in sizes.iter().enumerate() {
                let v = value(&mut b, &mut table, Word::Dim(d));
                b.ins().stack_store(ptr, v, slot, (8 * (operands.len() + n)) as i32);
            }
            for block in 0..blocks {
                let at = table.push(DriverWord::Block { kernel: i, block });
                let a = b.ins().load(ptr, flags, words, at);
                b.ins().stack_store(ptr, a, slot, (8 * (operands.len() + sizes.len() + block)) as i32);
            }
            let args = b.ins().stack_addr(ptr, slot, 0);
            let kernel = b.ins().func_addr(ptr, callee);
            let extent = value(&mut b, &mut table, call::extent(&k.kind));
            let split = b.ins().iconst(types::I64, split_of(&k.kind) as i64);
            let call = b.ins().call(launch, &[kernel, args, extent, split]);
            let status = b.inst_results(call)[0];
            let next = b.create_block();
            let failed = b.ins().icmp_imm_s(IntCC::NotEqual, status, 0);
            b.ins().brif(failed, fail, &[status.into()], next, &[]);
            b.switch_to_block(next);
        }
        for (j, (buf, ty)) in plan.outputs.iter().enumerate().filter(|(j, (buf, _))| direct.get(buf) != Some(j)) {
            let dst = b.ins().load(ptr, flags, outputs, (j * 8) as i32);
            let src = addr(&mut b, *buf);
            let bytes = ty.shape.iter().copied().product::<Dim>() * Dim::new(ty.dtype.size_bytes());
            let size = value(&mut b, &mut table, Word::Dim(bytes));
            b.call_memcpy(config, dst, src, size);
        }
        let ok = b.ins().iconst(types::I32, 0);
        b.ins().return_(&[ok]);
        b.switch_to_block(fail);
        let status = b.block_params(fail)[0];
        b.ins().return_(&[status]);
        b.seal_all_blocks();
        b.finalize(config);
    }
    let mut clif: String = kernel_clif.into_iter().filter(|c| !c.is_empty()).collect::<Vec<_>>().join("\n");
    clif.push('\n');
    clif.push_str(&ctx.func.display().to_string());
    let id = module.declare_function(&entry, Linkage::Hidden, &sig).map_err(|e| isa_err(e.to_string()))?;
    module.define_function(id, &mut ctx).map_err(|e| isa_err(format!("{e:?}")))?;
    let bytes = module.finish().emit().map_err(|e| isa_err(e.to_string()))?;
    let weights = weights_symbol.map(|_| layout);
    Ok(ObjectCode { bytes, clif, entry, plan, words: table.words, weights })
}
