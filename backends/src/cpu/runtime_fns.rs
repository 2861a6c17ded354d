//! Functions generated code calls: scalar math Cranelift has no instruction
//! for (log, sin, cos, pow), the GEMM library, and the hand-written kernels
//! of `kernels` (JIT only: objects link libm and nothing else).

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

static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// How many threads a GEMM (or a matmul's epilogue) may use.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn threads() -> usize {
    THREADS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `c[m, n] = a[m, k] @ b[k, n]`; `a` and `b` with the given row and column
/// strides (in elements), `c` row-major.
#[allow(clippy::too_many_arguments)]
extern "C" fn egret_sgemm(
    m: i64,
    k: i64,
    n: i64,
    a: *const f32,
    a_rs: i64,
    a_cs: i64,
    b: *const f32,
    b_rs: i64,
    b_cs: i64,
    c: *mut f32,
) {
    let (m, k, n) = (m as usize, k as usize, n as usize);
    let threads = threads();
    // Splitting small products across threads costs more than it saves.
    let parallelism = if threads > 1 && m * n * k >= super::MATMUL_PARALLEL_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // The plan guarantees the three buffers hold these matrices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            false,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The GEMM entry point's symbol (JIT only: objects use generated matmuls).
pub const SGEMM: &str = "egret_sgemm";
/// The attention kernel's symbol (JIT only: objects use the composite).
pub const ATTENTION: &str = "egret_attention";
/// The matmul epilogue's symbol (JIT only: objects have no epilogues).
pub const EPILOGUE: &str = "egret_epilogue";
/// The packed-weight GEMM's symbol (JIT only).
pub const SGEMM_PACKED: &str = "egret_sgemm_packed";
/// The norm and softmax row kernel's symbol (JIT only).
pub const ROWS: &str = "egret_rows";

pub fn register(jb: &mut JITBuilder) {
    jb.symbol("logf", egret_logf as *const u8);
    jb.symbol("sinf", egret_sinf as *const u8);
    jb.symbol("cosf", egret_cosf as *const u8);
    jb.symbol("powf", egret_powf as *const u8);
    jb.symbol(SGEMM, egret_sgemm as *const u8);
    jb.symbol(ATTENTION, super::kernels::attention::egret_attention as *const u8);
    jb.symbol(EPILOGUE, super::kernels::epilogue::egret_epilogue as *const u8);
    jb.symbol(SGEMM_PACKED, super::kernels::gemm::egret_sgemm_packed as *const u8);
    jb.symbol(ROWS, super::kernels::rows::egret_rows as *const u8);
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
