//! Functions generated code calls: scalar math Cranelift has no instruction
//! for, and the GEMM microkernels.

use cranelift_codegen::ir::{types, AbiParam, FuncRef, Function, Signature};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, ModuleResult};

extern "C" fn egret_expf(x: f32) -> f32 {
    x.exp()
}
extern "C" fn egret_logf(x: f32) -> f32 {
    x.ln()
}
extern "C" fn egret_tanhf(x: f32) -> f32 {
    x.tanh()
}
extern "C" fn egret_erff(x: f32) -> f32 {
    libm::erff(x)
}
extern "C" fn egret_sigmoidf(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
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

/// How many threads a GEMM may use.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
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
    let threads = THREADS.load(std::sync::atomic::Ordering::Relaxed);
    // Splitting small products across threads costs more than it saves.
    let parallelism =
        if threads > 1 && m * n * k >= 1 << 18 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
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

const UNARY: [(&str, extern "C" fn(f32) -> f32); 7] = [
    ("egret_expf", egret_expf),
    ("egret_logf", egret_logf),
    ("egret_tanhf", egret_tanhf),
    ("egret_erff", egret_erff),
    ("egret_sigmoidf", egret_sigmoidf),
    ("egret_sinf", egret_sinf),
    ("egret_cosf", egret_cosf),
];

pub fn register(jb: &mut JITBuilder) {
    for (name, f) in UNARY {
        jb.symbol(name, f as *const u8);
    }
    jb.symbol("egret_powf", egret_powf as *const u8);
    jb.symbol("egret_sgemm", egret_sgemm as *const u8);
}

/// The imported functions, declared once per module.
pub struct Imports {
    unary: Vec<FuncId>,
    pow: FuncId,
    sgemm: FuncId,
}

/// The imports as seen from one function being built.
pub struct FuncRefs {
    /// In the order of `UNARY`: exp, log, tanh, erf, sigmoid, sin, cos.
    pub unary: Vec<FuncRef>,
    pub pow: FuncRef,
    pub sgemm: FuncRef,
}

pub fn declare(module: &mut JITModule) -> ModuleResult<Imports> {
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
    let unary = UNARY
        .iter()
        .map(|(name, _)| module.declare_function(name, Linkage::Import, &f1))
        .collect::<ModuleResult<_>>()?;
    let pow = module.declare_function("egret_powf", Linkage::Import, &f2)?;
    let sgemm = module.declare_function("egret_sgemm", Linkage::Import, &g)?;
    Ok(Imports { unary, pow, sgemm })
}

impl Imports {
    pub fn in_func(&self, module: &mut JITModule, func: &mut Function) -> FuncRefs {
        FuncRefs {
            unary: self.unary.iter().map(|&id| module.declare_func_in_func(id, func)).collect(),
            pow: module.declare_func_in_func(self.pow, func),
            sgemm: module.declare_func_in_func(self.sgemm, func),
        }
    }
}
