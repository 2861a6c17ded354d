//! The Cranelift CPU backend.
//!
//! Every native kernel becomes one function with the ABI
//! `extern "C" fn(args: *const *mut u8, begin: i64, end: i64) -> i32`:
//! `args` holds the base address of each operand's buffer, in the kernel's
//! operand order; `begin..end` is the slice of the kernel's parallel
//! dimension to compute, so the runtime can hand disjoint slices to threads;
//! the result is 0 or an error code. One ABI for every kind keeps the runtime
//! a plain loop over function pointers.
//!
//! ISA flags come from the host (`cranelift-native` detects AVX, AVX2, FMA).
//! Cranelift's x86-64 backend vectorises at 128 bits, so map kernels use
//! f32x4 where every operand of the inner loop is unit-stride or broadcast.
//! Matrix products either call a tuned GEMM (the `gemm` crate) per batch or
//! run a register-tiled f32x4 product generated here; lowering picks one per
//! kernel and the plan records which. Attention calls a hand-written
//! flash-style kernel (`egret-kernels`), compiled by rustc for AVX-512 or AVX2.

mod attention;
pub mod call;
pub mod choose;
pub mod library;
mod loop_nest;
mod loops;
mod map;
mod matmul;
pub mod object;
mod rows;
mod runtime_fns;
mod vmath;

use crate::plan::{known_size, Kernel, KernelKind, Plan};
use cranelift_codegen::ir::{types, AbiParam, Function, InstBuilder, MemFlagsData, Signature, UserFuncName};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module};
use std::collections::HashMap;
use std::sync::Arc;

pub use egret_kernels as kernels;
pub use egret_kernels::pool::KernelFn;
pub use egret_kernels::MATMUL_PARALLEL_MACS;
pub use library::{any_kernel_may_split, any_kernel_splits, split_at, split_of};

/// The length of the dimension a kernel's work is split along across
/// threads: dim 0 of a map, the rows of a row kernel, the batches of a matmul.
/// `values` gives the plan's symbols (a map's dim 0 may be one).
pub fn parallel_extent(k: &KernelKind, values: &egret_ir::DimValues) -> usize {
    call::extent(k).at(values).map_or(0, |e| e.max(0) as usize)
}

/// The blocks a kernel with symbolic sizes reads through argument slots
/// after its operands' addresses and its `runtime_dims`' values, built by
/// the runtime for each call's `values` because they hold sizes: an
/// attention kernel's parameters and batch table, a symbolic product's
/// epilogue program (whose first word is the rows). Empty for known kernels.
pub fn call_blocks(kernel: &Kernel, values: &egret_ir::DimValues) -> Result<Vec<Vec<u8>>, String> {
    call::blocks(kernel).iter().map(|b| b.bytes_at(values)).collect()
}

/// The address in argument slot `slot` (after the operands, the sizes,
/// then the blocks: see `call_blocks`).
fn slot(
    b: &mut FunctionBuilder,
    ty: types::Type,
    args: cranelift_codegen::ir::Value,
    slot: usize,
) -> cranelift_codegen::ir::Value {
    b.ins().load(ty, MemFlagsData::new().with_notrap(), args, (8 * slot) as i32)
}

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("kernel {kernel} (`{label}`): {message}")]
    Kernel { kernel: usize, label: String, message: String },
    #[error("cannot set up Cranelift for this host: {0}")]
    Isa(String),
}

/// The packed GEMM's register tile on this machine and how its weight is
/// stored, for reports: the plan names the implementation, the CPU backend
/// its tile and the weight's coding (`choose::pack_weight`).
pub fn describe_packed(plan: &Plan, mm: &crate::plan::MatMulKernel) -> String {
    let (rows, cols) = kernels::gemm::register_tile();
    let coding = match &plan.buffers[mm.b].storage {
        crate::plan::Storage::Constant(t) => choose::packed_coding(t).map_or("", |c| c.name()),
        _ => "",
    };
    format!("{rows}x{cols} register tile, weight in {coding}")
}

/// A plan with machine code for its native kernels.
pub struct CompiledPlan {
    pub plan: Plan,
    /// Per kernel: its function, or `None` for reference kernels.
    pub entries: Vec<Option<KernelFn>>,
    /// Per kernel: the Cranelift IR it was compiled from (empty for reference kernels).
    pub clif: Vec<String>,
    /// The modules holding the code: this plan's, and those of kernels
    /// reused from a `KernelCache`.
    _modules: Vec<Arc<CodeModule>>,
}

/// A finalised JIT module, kept alive while any kernel in it may run, and
/// its memory given back when the last plan or cache holding it goes.
/// (Dropping a `JITModule` keeps its code's mappings: a process that
/// compiled about 32,000 programs ran out of them, `vm.max_map_count`, and
/// every later compile failed; found by the compile_run fuzz target.)
struct CodeModule(Option<JITModule>);

impl Drop for CodeModule {
    fn drop(&mut self) {
        if let Some(module) = self.0.take() {
            // Safety: the module's functions are reachable only through the
            // plans and caches that hold this `Arc`; the last of them is gone.
            unsafe { module.free_memory() };
        }
    }
}

// A module's code and data are immutable after finalisation.
unsafe impl Send for CodeModule {}
unsafe impl Sync for CodeModule {}

/// Kernels compiled before, by their definition: a plan for a new binding
/// of a model's symbolic dims (a decoder's next past length) reuses the
/// machine code of every kernel whose definition did not change, and only
/// the kernels that depend on the new sizes are generated. A kernel's code
/// is a function of its kind alone (buffers arrive as base addresses, its
/// parameter blocks and tables are built from the kind), so the kind's full
/// `Debug` text is the key.
#[derive(Default)]
pub struct KernelCache {
    entries: std::sync::Mutex<HashMap<String, CachedKernel>>,
}

struct CachedKernel {
    entry: KernelFn,
    clif: String,
    module: Arc<CodeModule>,
}

/// Past this many kernels the cache starts over (each holds its module).
const KERNEL_CACHE_LIMIT: usize = 4096;

impl KernelCache {
    fn key(kernel: &Kernel, kernel_library: bool) -> String {
        format!("{kernel_library}:{:?}", kernel.kind)
    }
}

/// The CPU generated code is compiled for: the compiling machine's, for the
/// JIT and by default, or one of the x86-64 micro-architecture levels, so
/// that an artifact built on a developer's machine runs on the servers.
/// The kernel library is not affected: it picks its variant at load time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TargetCpu {
    #[default]
    Native,
    X86_64V2,
    X86_64V3,
    X86_64V4,
}

impl TargetCpu {
    pub const NAMES: [&'static str; 4] = ["native", "x86-64-v2", "x86-64-v3", "x86-64-v4"];

    pub fn parse(name: &str) -> Option<TargetCpu> {
        Some(match name {
            "native" => TargetCpu::Native,
            "x86-64-v2" => TargetCpu::X86_64V2,
            "x86-64-v3" => TargetCpu::X86_64V3,
            "x86-64-v4" => TargetCpu::X86_64V4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TargetCpu::Native => "native",
            TargetCpu::X86_64V2 => "x86-64-v2",
            TargetCpu::X86_64V3 => "x86-64-v3",
            TargetCpu::X86_64V4 => "x86-64-v4",
        }
    }
}

/// The ISA for `cpu`; `pic` for shared libraries.
fn target_isa(pic: bool, cpu: TargetCpu) -> Result<cranelift_codegen::isa::OwnedTargetIsa, CodegenError> {
    let isa_err = |e: &dyn std::fmt::Display| CodegenError::Isa(e.to_string());
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(|e| isa_err(&e))?;
    flags.set("is_pic", if pic { "true" } else { "false" }).map_err(|e| isa_err(&e))?;
    let native = cranelift_native::builder().map_err(|e| isa_err(&e))?;
    let isa = match cpu {
        TargetCpu::Native => native,
        level => {
            let triple = native.triple().clone();
            if !cfg!(target_arch = "x86_64") {
                return Err(CodegenError::Isa(format!(
                    "--target-cpu {} needs an x86-64 host, not {triple}",
                    level.name()
                )));
            }
            let mut isa = cranelift_codegen::isa::lookup(triple).map_err(|e| isa_err(&e))?;
            isa.enable(level.name()).map_err(|e| isa_err(&e))?;
            // Cranelift's presets follow LLVM's feature names, which leave
            // out what the levels imply: AVX under AVX2, AVX-512F under the
            // other AVX-512 extensions.
            if level != TargetCpu::X86_64V2 {
                isa.enable("has_avx").map_err(|e| isa_err(&e))?;
            }
            if level == TargetCpu::X86_64V4 {
                isa.enable("has_avx512f").map_err(|e| isa_err(&e))?;
            }
            isa
        }
    };
    isa.finish(settings::Flags::new(flags)).map_err(|e| isa_err(&e))
}

/// The host's ISA with its detected features; `pic` for shared libraries.
fn host_isa(pic: bool) -> Result<cranelift_codegen::isa::OwnedTargetIsa, CodegenError> {
    target_isa(pic, TargetCpu::Native)
}

/// The ISA extensions code generated for `cpu` uses (Cranelift's names,
/// such as `has_avx2`): what a CPU must have to run it.
pub fn required_features(cpu: TargetCpu) -> Result<Vec<String>, CodegenError> {
    let isa = target_isa(true, cpu)?;
    Ok(isa.isa_flags().iter().filter(|f| f.as_bool() == Some(true)).map(|f| f.name.to_string()).collect())
}

/// The description of the host ISA the code is generated for.
pub fn host_description() -> String {
    match host_isa(false) {
        Ok(isa) => {
            let flags: Vec<String> =
                isa.isa_flags().iter().filter(|f| f.as_bool() == Some(true)).map(|f| f.name.to_string()).collect();
            format!("{} [{}]", isa.triple(), flags.join(", "))
        }
        Err(e) => e.to_string(),
    }
}

/// JIT-compiles every native kernel of `plan`, calling the GEMM and kernel
/// libraries where the plan or a kernel's kind asks for them.
pub fn compile(plan: Plan) -> Result<CompiledPlan, CodegenError> {
    compile_with(plan, true)
}

/// As `compile`; without `kernel_library`, every kernel is generated code
/// (the generated matmuls and row kernels, which the tests hold to the
/// library's results; the plan must not ask for the libraries: lower it
/// with generated matmuls).
pub fn compile_with(plan: Plan, kernel_library: bool) -> Result<CompiledPlan, CodegenError> {
    compile_cached(plan, kernel_library, None)
}

/// `compile_with`, reusing the code of kernels `cache` holds and adding
/// the ones it generates.
pub fn compile_cached(
    plan: Plan,
    kernel_library: bool,
    cache: Option<&KernelCache>,
) -> Result<CompiledPlan, CodegenError> {
    let plan = choose::choose(plan);
    let keys: Vec<String> = plan.kernels.iter().map(|k| KernelCache::key(k, kernel_library)).collect();
    let mut modules: Vec<Arc<CodeModule>> = Vec::new();
    let mut reused: Vec<Option<(KernelFn, String)>> = vec![None; plan.kernels.len()];
    if let Some(cache) = cache {
        let entries = cache.entries.lock().unwrap_or_else(|p| p.into_inner());
        for (i, key) in keys.iter().enumerate() {
            if let Some(c) = entries.get(key) {
                reused[i] = Some((c.entry, c.clif.clone()));
                if !modules.iter().any(|m| Arc::ptr_eq(m, &c.module)) {
                    modules.push(c.module.clone());
                }
            }
        }
    }
    let mut jb = JITBuilder::with_isa(host_isa(false)?, cranelift_module::default_libcall_names());
    runtime_fns::register(&mut jb);
    let mut module = JITModule::new(jb);
    let imports = runtime_fns::declare(&mut module, kernel_library).map_err(|m| CodegenError::Isa(m.to_string()))?;
    let skip: Vec<bool> = reused.iter().map(Option::is_some).collect();
    let (ids, mut clif) = define_kernels_except(&mut module, &plan, &imports, &skip)?;
    module.finalize_definitions().map_err(|e| CodegenError::Isa(e.to_string()))?;
    let mut entries: Vec<Option<KernelFn>> = ids
        .iter()
        .map(|id| {
            id.map(|id| {
                let code = module.get_finalized_function(id);
                // The function was built with exactly the `KernelFn` signature.
                unsafe { std::mem::transmute::<*const u8, KernelFn>(code) }
            })
        })
        .collect();
    let own = Arc::new(CodeModule(Some(module)));
    if let Some(cache) = cache {
        let mut cached = cache.entries.lock().unwrap_or_else(|p| p.into_inner());
        if cached.len() > KERNEL_CACHE_LIMIT {
            cached.clear();
        }
        for (i, e) in entries.iter().enumerate() {
            if let (Some(entry), None) = (e, &reused[i]) {
                let c = CachedKernel { entry: *entry, clif: clif[i].clone(), module: own.clone() };
                cached.insert(keys[i].clone(), c);
            }
        }
    }
    for (i, r) in reused.into_iter().enumerate() {
        if let Some((entry, text)) = r {
            entries[i] = Some(entry);
            clif[i] = text;
        }
    }
    modules.push(own);
    Ok(CompiledPlan { plan, entries, clif, _modules: modules })
}

/// The signature every kernel has (see the module docs).
fn kernel_signature<M: Module>(module: &M) -> Signature {
    let ptr = module.target_config().pointer_type();
    let mut sig = Signature::new(module.isa().default_call_conv());
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(types::I64));
    sig.returns.push(AbiParam::new(types::I32));
    sig
}

/// Per-batch offsets as a read-only data object beside the code, and its
/// symbol inside `func`.
fn batch_table<M: Module>(
    module: &mut M,
    name: &str,
    offsets: impl Iterator<Item = isize>,
    func: &mut Function,
) -> Result<cranelift_codegen::ir::GlobalValue, String> {
    let bytes: Vec<u8> = offsets.flat_map(|x| (x as i64).to_le_bytes()).collect();
    data_object(module, name, bytes, func)
}

/// `bytes` as a read-only, 8-byte aligned data object, and its symbol
/// inside `func`.
fn data_object<M: Module>(
    module: &mut M,
    name: &str,
    bytes: Vec<u8>,
    func: &mut Function,
) -> Result<cranelift_codegen::ir::GlobalValue, String> {
    let data = module.declare_data(name, Linkage::Local, false, false).map_err(|e| e.to_string())?;
    let mut desc = cranelift_module::DataDescription::new();
    desc.define(bytes.into_boxed_slice());
    desc.set_align(8);
    module.define_data(data, &desc).map_err(|e| e.to_string())?;
    Ok(module.declare_data_in_func(data, func))
}

/// Defines one function `egret_k{i}` per native kernel in `module`; returns
/// their ids (`None` for reference kernels) and their CLIF text.
fn define_kernels<M: Module>(
    module: &mut M,
    plan: &Plan,
    imports: &runtime_fns::Imports,
) -> Result<(Vec<Option<FuncId>>, Vec<String>), CodegenError> {
    define_kernels_except(module, plan, imports, &vec![false; plan.kernels.len()])
}

/// `define_kernels` for the kernels `skip` leaves (a skipped kernel gets no
/// id and no CLIF text: its code comes from elsewhere).
fn define_kernels_except<M: Module>(
    module: &mut M,
    plan: &Plan,
    imports: &runtime_fns::Imports,
    skip: &[bool],
) -> Result<(Vec<Option<FuncId>>, Vec<String>), CodegenError> {
    let mut ctx = module.make_context();
    let mut fbc = FunctionBuilderContext::new();
    let mut ids: Vec<Option<FuncId>> = Vec::with_capacity(plan.kernels.len());
    let mut clif = Vec::with_capacity(plan.kernels.len());
    let ptr = module.target_config().pointer_type();
    let frontend_config = module.target_config();
    let sig = kernel_signature(module);
    for (i, k) in plan.kernels.iter().enumerate() {
        let err = |m: String| CodegenError::Kernel { kernel: i, label: k.label.clone(), message: m };
        if skip[i] {
            ids.push(None);
            clif.push(String::new());
            continue;
        }
        match &k.kind {
            KernelKind::Reference { .. } => {
                ids.push(None);
                clif.push(String::new());
                continue;
            }
            KernelKind::MatMul(mm)
                if mm.implementation != crate::plan::MatMulImpl::Generated && !imports.has_gemm() =>
            {
                return Err(err("this module does not link the GEMM library; lower with generated matmuls".into()));
            }
            KernelKind::MatMul(mm) if mm.epilogue.is_some() && !imports.has_gemm() => {
                return Err(err("this module does not link the kernel library that runs matmul epilogues".into()));
            }
            KernelKind::Attention(_) if !imports.has_gemm() => {
                return Err(err("the attention kernel calls the GEMM library, which this module does not link".into()));
            }
            _ => {}
        }
        ctx.func = Function::with_name_signature(UserFuncName::user(0, i as u32), sig.clone());
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let args = b.block_params(entry)[0];
            let range = (b.block_params(entry)[1], b.block_params(entry)[2]);
            let fns = imports.in_func(module, b.func);
            match &k.kind {
                KernelKind::Map(m) => map::emit(&mut b, ptr, args, range, m, &fns, &k.runtime_dims()),
                KernelKind::Rows(r) => match (library::row_params(r), fns.rows) {
                    // Norms and softmax run at full vector width where the kernel library links.
                    (Some(params), Some(f)) => {
                        let params = data_object(module, &format!("egret_k{i}_params"), params.to_bytes(), b.func)
                            .map_err(err)?;
                        let params = b.ins().symbol_value(ptr, params);
                        b.ins().call(f, &[params, args, range.0, range.1]);
                    }
                    _ => rows::emit(&mut b, ptr, args, range, r, &fns, &k.runtime_dims()),
                },
                KernelKind::Gather(g) => {
                    // A symbolic count of indices is read from its slot after the three operands.
                    let count = match k.runtime_dims().iter().position(|&d| d == g.n_indices) {
                        Some(at) => slot(&mut b, types::I64, args, 3 + at),
                        None => b.ins().iconst(types::I64, known_size(g.n_indices) as i64),
                    };
                    // A symbolic axis length likewise; a known one stays an immediate.
                    let axis_len = match (g.axis_len.known(), k.runtime_dims().iter().position(|&d| d == g.axis_len)) {
                        (None, Some(at)) => Err(slot(&mut b, types::I64, args, 3 + at)),
                        (known, _) => Ok(known.expect("a symbolic axis length is a runtime dim")),
                    };
                    emit_gather(&mut b, ptr, args, range, g, count, axis_len, frontend_config)
                }
                KernelKind::Loop { op, inputs, outputs } => {
                    loop_nest::emit(&mut b, ptr, args, op, inputs, outputs, &k.runtime_dims(), frontend_config)
                }
                KernelKind::Attention(a) if a.is_known() => {
                    let table = library::attention_table(a);
                    let table = data_object(module, &format!("egret_k{i}_batches"), table, b.func).map_err(err)?;
                    let params = library::attention_params(a).to_bytes();
                    let params = data_object(module, &format!("egret_k{i}_params"), params, b.func).map_err(err)?;
                    let (params, table) = (b.ins().symbol_value(ptr, params), b.ins().symbol_value(ptr, table));
                    attention::emit(&mut b, args, range, params, table, &fns);
                }
                // Symbolic sizes: the runtime fills the parameter block and
                // the table for each call (`call_blocks`).
                KernelKind::Attention(_) => {
                    let blocks = k.buffers().0.len() + 1;
                    let (params, table) = (slot(&mut b, ptr, args, blocks), slot(&mut b, ptr, args, blocks + 1));
                    attention::emit(&mut b, args, range, params, table, &fns);
                }
                KernelKind::MatMul(mm) => {
                    let table = batch_table(
                        module,
                        &format!("egret_k{i}_batches"),
                        mm.batches.iter().flatten().copied(),
                        b.func,
                    )
                    .map_err(err)?;
                    // Symbolic rows: their value after the operands, then the
                    // epilogue program the runtime encodes for them (`call_blocks`).
                    let operands = 3 + mm.epilogue.as_ref().map_or(0, |e| e.inputs.len());
                    let rows = (!mm.m.is_known()).then(|| slot(&mut b, types::I64, args, operands));
                    let epilogue = match (&mm.epilogue, rows) {
                        (Some(_), Some(_)) => Some(slot(&mut b, ptr, args, operands + 1)),
                        (Some(e), None) => {
                            let program = library::encode_epilogue(e, known_size(mm.m), mm.n, 2 + e.inputs.len(), 2);
                            let data =
                                data_object(module, &format!("egret_k{i}_epilogue"), program, b.func).map_err(err)?;
                            Some(b.ins().symbol_value(ptr, data))
                        }
                        (None, _) => None,
                    };
                    let mut row_table = |rows: &Option<Vec<i64>>, name: &str| match rows {
                        Some(rows) => {
                            let bytes = rows.iter().flat_map(|r| r.to_le_bytes()).collect();
                            data_object(module, &format!("egret_k{i}_{name}"), bytes, b.func).map(Some)
                        }
                        None => Ok(None),
                    };
                    let a_rows = row_table(&mm.a_rows, "a_rows").map_err(err)?;
                    let c_rows = row_table(&mm.c_rows, "c_rows").map_err(err)?;
                    matmul::emit(&mut b, ptr, args, range, mm, table, epilogue, [a_rows, c_rows], &fns, rows);
                }
                KernelKind::Reference { .. } => unreachable!("skipped above"),
            }
            let zero = b.ins().iconst(types::I32, 0);
            b.ins().return_(&[zero]);
            b.seal_all_blocks();
            b.finalize(frontend_config);
        }
        clif.push(ctx.func.display().to_string());
        let id =
            module.declare_function(&format!("egret_k{i}"), Linkage::Local, &sig).map_err(|e| err(e.to_string()))?;
        module.define_function(id, &mut ctx).map_err(|e| err(format!("{e:?}")))?;
        module.clear_context(&mut ctx);
        ids.push(Some(id));
    }
    Ok((ids, clif))
}

/// Status a gather kernel returns when an index is out of range.
pub const STATUS_INDEX_OUT_OF_RANGE: i32 = 1;

/// For each outer slice in the range and each index: check it, then copy
/// one `inner`-element row. A bad index returns `STATUS_INDEX_OUT_OF_RANGE`
/// before anything is read from it.
#[allow(clippy::too_many_arguments)]
fn emit_gather(
    b: &mut FunctionBuilder,
    ptr: types::Type,
    args: cranelift_codegen::ir::Value,
    range: (cranelift_codegen::ir::Value, cranelift_codegen::ir::Value),
    k: &crate::plan::GatherKernel,
    count: cranelift_codegen::ir::Value,
    axis_len: Result<i64, cranelift_codegen::ir::Value>,
    config: cranelift_codegen::isa::TargetFrontendConfig,
) {
    use cranelift_codegen::ir::condcodes::IntCC;
    let flags = MemFlagsData::new().with_notrap();
    let data = b.ins().load(ptr, flags, args, 0);
    let indices = b.ins().load(ptr, flags, args, 8);
    let out = b.ins().load(ptr, flags, args, 16);
    let row_bytes = (k.inner * k.elem_bytes) as i64;
    let bad = b.create_block();
    let done = b.create_block();
    // for o in begin..end
    let o_head = b.create_block();
    let o_body = b.create_block();
    b.append_block_param(o_head, types::I64);
    b.ins().jump(o_head, &[range.0.into()]);
    b.switch_to_block(o_head);
    let o = b.block_params(o_head)[0];
    let more = b.ins().icmp(IntCC::SignedLessThan, o, range.1);
    b.ins().brif(more, o_body, &[], done, &[]);
    b.switch_to_block(o_body);
    // for j in 0..n_indices
    let j_head = b.create_block();
    let j_body = b.create_block();
    let j_exit = b.create_block();
    b.append_block_param(j_head, types::I64);
    let zero = b.ins().iconst(types::I64, 0);
    b.ins().jump(j_head, &[zero.into()]);
    b.switch_to_block(j_head);
    let j = b.block_params(j_head)[0];
    let more = b.ins().icmp(IntCC::SignedLessThan, j, count);
    b.ins().brif(more, j_body, &[], j_exit, &[]);
    b.switch_to_block(j_body);
    let idx = if k.wide_indices {
        let at = b.ins().ishl_imm_u(j, 3);
        let at = b.ins().iadd(indices, at);
        b.ins().load(types::I64, flags, at, 0)
    } else {
        let at = b.ins().ishl_imm_u(j, 2);
        let at = b.ins().iadd(indices, at);
        let v = b.ins().load(types::I32, flags, at, 0);
        b.ins().sextend(types::I64, v)
    };
    // Negative indices count from the end.
    let wrapped = match axis_len {
        Ok(n) => b.ins().iadd_imm_s(idx, n),
        Err(n) => b.ins().iadd(idx, n),
    };
    let neg = b.ins().icmp_imm_s(IntCC::SignedLessThan, idx, 0);
    let idx = b.ins().select(neg, wrapped, idx);
    let ok_low = b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, idx, 0);
    let ok_high = match axis_len {
        Ok(n) => b.ins().icmp_imm_s(IntCC::SignedLessThan, idx, n),
        Err(n) => b.ins().icmp(IntCC::SignedLessThan, idx, n),
    };
    let ok = b.ins().band(ok_low, ok_high);
    let copy = b.create_block();
    b.ins().brif(ok, copy, &[], bad, &[]);
    b.switch_to_block(copy);
    let src_row = match axis_len {
        Ok(n) => b.ins().imul_imm_s(o, n),
        Err(n) => b.ins().imul(o, n),
    };
    let src_row = b.ins().iadd(src_row, idx);
    let src_off = b.ins().imul_imm_s(src_row, row_bytes);
    let src = b.ins().iadd(data, src_off);
    let dst_row = b.ins().imul(o, count);
    let dst_row = b.ins().iadd(dst_row, j);
    let dst_off = b.ins().imul_imm_s(dst_row, row_bytes);
    let dst = b.ins().iadd(out, dst_off);
    let size = b.ins().iconst(ptr, row_bytes);
    b.call_memcpy(config, dst, src, size);
    let next_j = b.ins().iadd_imm_s(j, 1);
    b.ins().jump(j_head, &[next_j.into()]);
    b.switch_to_block(j_exit);
    let next_o = b.ins().iadd_imm_s(o, 1);
    b.ins().jump(o_head, &[next_o.into()]);
    b.switch_to_block(bad);
    let status = b.ins().iconst(types::I32, STATUS_INDEX_OUT_OF_RANGE as i64);
    b.ins().return_(&[status]);
    b.switch_to_block(done);
}
