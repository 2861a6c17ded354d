//! Functions generated code calls: scalar math Cranelift has no instruction
//! for (log, sin, cos, pow), and the kernel library's entry points
//! (`egret-kernels`). The JIT resolves them to this process's functions; an
//! object file imports them by name, from libm and from the kernel archive
//! an artifact links.

use cranelift_codegen::ir::{types, AbiParam, FuncRef, Function, Signature};
use cranelift_jit::JITBuilder;
use cranelift_module::{FuncId, Linkage, Module, ModuleResult};

// Scalar math Cranelift has no instruction for, under their C names: the
// JIT resolves these names to the functions below, an object file to libm.
extern "C" fn egret_logf(x: f32) -> f32 {
    x.ln()
}
extern "C" fn egret_sinf(x: f32) -> f32 {
    x.sin()
}
extern "C" fn egret_cosf(x: f32) -> f32 {
    x.cos()
}
extern "C" fn egret_powf(x: f32, y: f32) -> f32 {
    x.powf(y)
}

/// The GEMM library's entry point.
pub const SGEMM: &str = "egret_sgemm";
/// The attention kernel's symbol.
pub const ATTENTION: &str = "egret_attention";
/// The matmul epilogue's symbol.
pub const EPILOGUE: &str = "egret_epilogue";
/// The packed-weight GEMM's symbol.
pub const SGEMM_PACKED: &str = "egret_sgemm_packed";
/// The norm and softmax row kernel's symbol.
pub const ROWS: &str = "egret_rows";
/// The scheduler's kernel launch, which an artifact's driver calls per
/// kernel: `egret_rt_launch(kernel, args, extent, split) -> status`.
pub const LAUNCH: &str = "egret_rt_launch";

/// Declares `LAUNCH` (object files only: the JIT's executor launches
/// kernels itself).
pub fn declare_launch<M: Module>(module: &mut M) -> ModuleResult<FuncId> {
    let ptr = module.target_config().pointer_type();
    let mut sig = Signature::new(module.isa().default_call_conv());
    sig.params.extend([ptr, ptr, types::I64, types::I64].map(AbiParam::new));
    sig.returns.push(AbiParam::new(types::I32));
    module.declare_function(LAUNCH, Linkage::Import, &sig)
}

pub fn register(jb: &mut JITBuilder) {
    jb.symbol("logf", egret_logf as *const u8);
    jb.symbol("sinf", egret_sinf as *const u8);
    jb.symbol("cosf", egret_cosf as *const u8);
    jb.symbol("powf", egret_powf as *const u8);
    jb.symbol(SGEMM, egret_kernels::sgemm::egret_sgemm as *const u8);
    jb.symbol(ATTENTION, egret_kernels::attention::egret_attention as *const u8);
    jb.symbol(EPILOGUE, egret_kernels::epilogue::egret_epilogue as *const u8);
    jb.symbol(SGEMM_PACKED, egret_kernels::gemm::egret_sgemm_packed as *const u8);
    jb.symbol(ROWS, egret_kernels::rows::egret_rows as *const u8);
}

/// The imported functions, declared once per module.
pub struct Imports {
    log: FuncId,
    sin: FuncId,
    cos: FuncId,
    pow: FuncId,
    sgemm: Option<FuncId>,
    attention: Option<FuncId>,
    epilogue: Option<FuncId>,
    sgemm_packed: Option<FuncId>,
    rows: Option<FuncId>,
}

/// The imports as seen from one function being built.
pub struct FuncRefs {
    pub log: FuncRef,
    pub sin: FuncRef,
    pub cos: FuncRef,
    pub pow: FuncRef,
    /// Absent in modules that do not link the kernel library.
    pub sgemm: Option<FuncRef>,
    /// `egret_attention(params, batch_table, args, begin, end)`; absent
    /// where `sgemm` is.
    pub attention: Option<FuncRef>,
    /// `egret_epilogue(program, args, c)`; absent where `sgemm` is.
    pub epilogue: Option<FuncRef>,
    /// `egret_sgemm_packed(m, k, n, a, a_rs, a_cs, b_packed, c, a_rows,
    /// c_rows, epilogue, args)` (the last four but `args` null for none);
    /// absent where `sgemm` is.
    pub sgemm_packed: Option<FuncRef>,
    /// `egret_rows(params, args, begin, end)`; absent where `sgemm` is.
    pub rows: Option<FuncRef>,
}

/// Declares the imports; `with_library` adds the GEMM library's and the
/// hand-written kernels' entry points.
pub fn declare<M: Module>(module: &mut M, with_library: bool) -> ModuleResult<Imports> {
    let cc = module.isa().default_call_conv();
    let mut f1 = Signature::new(cc);
    f1.params.push(AbiParam::new(types::F32));
    f1.returns.push(AbiParam::new(types::F32));
    let mut f2 = f1.clone();
    f2.params.push(AbiParam::new(types::F32));
    let mut g = Signature::new(cc);
    for _ in 0..10 {
        g.params.push(AbiParam::new(types::I64));
    }
    let ptr = module.target_config().pointer_type();
    let mut attention = Signature::new(cc);
    attention.params.extend([ptr, ptr, ptr, types::I64, types::I64].map(AbiParam::new));
    let mut packed = Signature::new(cc);
    packed.params.extend([types::I64; 8].map(AbiParam::new));
    packed.params.extend([ptr, ptr, ptr, ptr].map(AbiParam::new));
    let mut rows = Signature::new(cc);
    rows.params.extend([ptr, ptr, types::I64, types::I64].map(AbiParam::new));
    let mut epilogue = Signature::new(cc);
    epilogue.params.extend([ptr, ptr, ptr].map(AbiParam::new));
    Ok(Imports {
        log: module.declare_function("logf", Linkage::Import, &f1)?,
        sin: module.declare_function("sinf", Linkage::Import, &f1)?,
        cos: module.declare_function("cosf", Linkage::Import, &f1)?,
        pow: module.declare_function("powf", Linkage::Import, &f2)?,
        sgemm: if with_library { Some(module.declare_function(SGEMM, Linkage::Import, &g)?) } else { None },
        attention: if with_library {
            Some(module.declare_function(ATTENTION, Linkage::Import, &attention)?)
        } else {
            None
        },
        epilogue: if with_library {
            Some(module.declare_function(EPILOGUE, Linkage::Import, &epilogue)?)
        } else {
            None
        },
        sgemm_packed: if with_library {
            Some(module.declare_function(SGEMM_PACKED, Linkage::Import, &packed)?)
        } else {
            None
        },
        rows: if with_library { Some(module.declare_function(ROWS, Linkage::Import, &rows)?) } else { None },
    })
}

impl Imports {
    pub fn has_gemm(&self) -> bool {
        self.sgemm.is_some()
    }

    pub fn in_func<M: Module>(&self, module: &mut M, func: &mut Function) -> FuncRefs {
        FuncRefs {
            log: module.declare_func_in_func(self.log, func),
            sin: module.declare_func_in_func(self.sin, func),
            cos: module.declare_func_in_func(self.cos, func),
            pow: module.declare_func_in_func(self.pow, func),
            sgemm: self.sgemm.map(|id| module.declare_func_in_func(id, func)),
            attention: self.attention.map(|id| module.declare_func_in_func(id, func)),
            epilogue: self.epilogue.map(|id| module.declare_func_in_func(id, func)),
            sgemm_packed: self.sgemm_packed.map(|id| module.declare_func_in_func(id, func)),
            rows: self.rows.map(|id| module.declare_func_in_func(id, func)),
        }
    }
}
