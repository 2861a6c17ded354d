//! Egret: an ahead-of-time compiler for transformer models.
//!
//! `compile` is the one pipeline every entry point (the CLI, tests, benches)
//! goes through, top to bottom:
//!
//! 1. `frontend`: ONNX protobuf to IR, the dims the options give bound (the
//!    others stay symbolic), verified;
//! 2. `passes`: canonicalisation (constant folding, no-ops, dead code) and
//!    the e-graph, verified;
//! 3. a backend turns the graph into an `Executable`, wrapped with the
//!    model's signature into a `runtime::Program`. A graph whose symbolic
//!    dims the CPU's plan keeps is compiled like a bound one (one program
//!    for every value); otherwise it gets a `specialize::Specializing`
//!    executable, which works their values out of each call's inputs and
//!    compiles a program per value of the dims its kernels need known.

pub mod alloc;
pub mod aot;
pub mod check;
pub mod explain;
pub mod io;
pub mod progress;
pub mod specialize;

pub use egret_backends as backends;
pub use egret_frontend as frontend;
pub use egret_ir as ir;
pub use egret_passes as passes;
pub use egret_runtime as runtime;

use egret_frontend::{ImportError, ImportOptions};
use egret_ir::{Graph, IrError, Tensor, TensorRef};
use egret_runtime::{Program, RunError};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("code generation failed: {0}")]
    Codegen(String),
    /// No device for a GPU backend, or the device failed.
    #[error("{0}")]
    Device(String),
    /// A problem with files or values the user passed (not with the model).
    #[error("{0}")]
    Usage(String),
}

/// Which backend executes the compiled graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The IR's reference semantics, node by node: the oracle.
    Reference,
    /// Native code from the Cranelift backend.
    #[default]
    Cpu,
    /// WGSL compute shaders run through wgpu on a Vulkan adapter (a GPU's
    /// driver; Mesa's lavapipe on a machine without one).
    Wgsl,
    /// PTX kernels run through the CUDA driver (NVIDIA GPUs).
    Ptx,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Reference => "reference",
            Backend::Cpu => "cpu",
            Backend::Wgsl => "wgsl",
            Backend::Ptx => "ptx",
        }
    }
}

#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub backend: Backend,
    /// Values of symbolic dimensions.
    pub dims: HashMap<String, usize>,
    /// Shapes of inputs with symbolic dims.
    pub input_shapes: HashMap<String, Vec<usize>>,
    /// Input values the compiler may specialise on when an op needs one at
    /// compile time (see `frontend::ImportOptions::input_values`).
    pub input_values: HashMap<String, Tensor>,
    /// Threads the CPU backend may use; `None` means one per core.
    pub threads: Option<usize>,
    /// Optimisation level: 0 gives one kernel per op, 1 fuses elementwise
    /// chains, 2 also runs the e-graph optimiser and fuses elementwise tails
    /// into matmul epilogues.
    pub opt_level: u8,
    /// Force the matmul implementation instead of letting the compiler choose.
    pub matmul: Option<egret_backends::plan::MatMulImpl>,
    /// The arithmetic of matrix products on the PTX backend: f32 (the
    /// default), or tensor cores on tf32 or bf16 inputs.
    pub precision: egret_backends::gpu::form::Precision,
    /// The CPU ahead-of-time code is generated for (`egret compile
    /// --target-cpu`); the JIT always generates for the host.
    pub target_cpu: egret_backends::cpu::TargetCpu,
    /// Keep the model's symbolic dims symbolic even where `input_shapes`
    /// or `input_values` give the inputs' shapes: one program for every
    /// shape (see `frontend::ImportOptions::keep_symbolic`).
    pub keep_symbolic: bool,
    /// How many programs a model with symbolic dims keeps compiled, one per
    /// binding of them (see `specialize::Specializing`).
    pub max_specializations: usize,
    /// Bounds of dims kept symbolic (`--dim name=LO..HI`): a call outside
    /// them is refused, and the CPU's arena is laid out for the highest
    /// values at once. A symbol without bounds takes any value the model
    /// allows; the arena is laid out for the first call's and grows
    /// (without compiling) when a call needs more.
    pub dim_bounds: DimBounds,
    /// Whether `Model::graph` keeps the compiled graph, weights and all.
    /// Without it the model keeps the graph's inputs only (as a model
    /// compiled per binding does), and on the CPU each weight is freed as
    /// soon as the backend has packed its own copy, so a compile peaks near
    /// the model's size rather than twice it. The CLI's `run`, `check` and
    /// `bench` and the Python package compile this way.
    pub keep_graph: bool,
    /// Where `egret compile` puts a library's weights (`aot`).
    pub weights_file: WeightsFile,
    /// Read every weight into memory rather than mapping the large ones
    /// where they lie in the model file or its external data (see
    /// `frontend::ImportOptions::read_weights`).
    pub read_weights: bool,
}

/// Where an ahead-of-time library's weights go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsFile {
    /// In the library up to 1 GiB (`aot::EMBED_WEIGHTS_UP_TO`), else beside it.
    #[default]
    Auto,
    /// In the library's read-only data.
    Embedded,
    /// In `NAME.weights` beside the library, mapped when the first model is
    /// created and checked (size and checksum) before it runs.
    Beside,
}

impl WeightsFile {
    pub const NAMES: [&'static str; 3] = ["auto", "embedded", "beside"];

    pub fn parse(name: &str) -> Option<WeightsFile> {
        match name {
            "auto" => Some(WeightsFile::Auto),
            "embedded" => Some(WeightsFile::Embedded),
            "beside" => Some(WeightsFile::Beside),
            _ => None,
        }
    }
}

pub use egret_runtime::DimBounds;

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            backend: Backend::default(),
            dims: HashMap::new(),
            input_shapes: HashMap::new(),
            input_values: HashMap::new(),
            threads: None,
            opt_level: MAX_OPT_LEVEL,
            matmul: None,
            precision: Default::default(),
            target_cpu: Default::default(),
            keep_symbolic: false,
            max_specializations: specialize::MAX_SPECIALIZATIONS,
            dim_bounds: DimBounds::new(),
            keep_graph: true,
            weights_file: WeightsFile::Auto,
            read_weights: false,
        }
    }
}

/// The highest `--opt` level (the default).
pub const MAX_OPT_LEVEL: u8 = 2;

/// The default thread count: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Milliseconds spent in each stage of `compile`.
#[derive(Clone, Debug, Default)]
pub struct StageTimes {
    pub import_ms: f64,
    pub canonicalize_ms: f64,
    pub backend_ms: f64,
}

/// A compiled model, ready to run.
pub struct Model {
    pub program: Program,
    /// What the e-graph optimiser did, at `--opt 2`.
    pub optimized: Option<egret_passes::egraph::Report>,
    /// The graph after canonicalisation: what the backend compiled (only
    /// the inputs, for a model compiled whole per binding of its dims).
    pub graph: Graph,
    /// The index range of each integer input the graph shows (a `Gather`'s
    /// table; `io::index_bounds`), kept where the graph is not.
    pub index_bounds: Vec<(String, usize)>,
    pub canon: egret_passes::CanonStats,
    pub times: StageTimes,
    pub opset: i64,
}

impl Model {
    pub fn run(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, Error> {
        // A run's large blocks are reused by the next (`alloc`).
        alloc::keep(true);
        Ok(self.program.run(inputs)?)
    }

    /// `run` on inputs borrowed where they lie: the CPU JIT reads them in
    /// place, copying nothing in (a decoder's past, fed back each step).
    pub fn run_refs(&self, inputs: &[(&str, TensorRef<'_>)]) -> Result<Vec<(String, Tensor)>, Error> {
        alloc::keep(true);
        Ok(self.program.run_refs(inputs)?)
    }

    /// Deterministic random values for the inputs not named in `given`
    /// (`io::random_inputs`), integers drawn within `index_bounds`.
    pub fn random_inputs_except(&self, seed: u64, given: &[String]) -> Result<Vec<(String, Tensor)>, Error> {
        io::random_inputs_of(&self.program.signature.inputs, &self.index_bounds, seed, given)
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A model after the front half of the pipeline: imported and canonicalised.
pub struct Canonical {
    pub graph: Graph,
    /// What the e-graph optimiser did (`--opt 2`).
    pub optimized: Option<egret_passes::egraph::Report>,
    /// Graph inputs the graph was specialised on (see `CompileOptions::input_values`).
    pub specialized: Vec<(String, Tensor)>,
    /// The model's symbolic dims with the sizes they were bound to.
    pub symbols: Vec<(String, usize)>,
    pub canon: egret_passes::CanonStats,
    pub opset: i64,
    pub import_ms: f64,
    pub canonicalize_ms: f64,
}

/// Import and canonicalisation, shared by every way of compiling.
pub fn canonical(path: &Path, opts: &CompileOptions) -> Result<Canonical, Error> {
    let t = Instant::now();
    // A model folder in the ONNX test layout (what `check` takes) stands for
    // its `model.onnx`.
    let in_folder = path.join("model.onnx");
    let path = if path.is_dir() && in_folder.is_file() { in_folder.as_path() } else { path };
    if path.is_dir() {
        return Err(Error::Usage(format!("`{}` is a folder without a `model.onnx` in it", path.display())));
    }
    let import_opts = ImportOptions {
        dims: opts.dims.clone(),
        input_shapes: opts.input_shapes.clone(),
        input_values: opts.input_values.clone(),
        keep_symbolic: opts.keep_symbolic,
        read_weights: opts.read_weights,
    };
    let stage = progress::stage(format!("importing {}", path.display()));
    let imported = egret_frontend::import_file(path, &import_opts)?;
    let import_ms = ms(t);
    let t = Instant::now();
    stage.say("canonicalising");
    let (mut graph, canon) = egret_passes::canonicalize(&imported.graph)?;
    let mut optimized = None;
    if opts.opt_level >= 2 {
        stage.say("optimising (e-graph)");
        let (g, report) = egret_passes::egraph::optimize(&graph, Default::default())?;
        // Extraction leaves constants to fold and nodes nothing reads.
        graph = egret_passes::canonicalize(&g)?.0;
        optimized = Some(report);
    }
    Ok(Canonical {
        graph,
        optimized,
        specialized: imported.specialized,
        symbols: imported.symbols,
        canon,
        opset: imported.opset,
        import_ms,
        canonicalize_ms: ms(t),
    })
}

/// How lowering is configured for these options.
pub fn lower_options(opts: &CompileOptions) -> egret_backends::LowerOptions {
    egret_backends::LowerOptions {
        fuse_elementwise: opts.opt_level >= 1,
        views: opts.opt_level >= 1,
        matmul: opts.matmul,
        epilogues: opts.opt_level >= 2,
        neutral: false,
    }
}

/// A graph through the GPU layer: lowered to a neutral plan and compiled
/// into GPU kernels, for any printer.
pub fn gpu_plan(
    graph: &Graph,
    opts: &CompileOptions,
    limits: egret_backends::gpu::Limits,
) -> Result<egret_backends::gpu::GpuPlan, Error> {
    let plan = egret_backends::lower(graph, lower_options(opts).gpu())?;
    egret_backends::gpu::compile(&plan, limits, opts.precision).map_err(|e| Error::Codegen(e.to_string()))
}

/// WGSL products are f32: tensor cores are the ptx backend's.
fn wgsl_precision(opts: &CompileOptions) -> Result<(), Error> {
    if opts.precision != egret_backends::gpu::form::Precision::F32 {
        return Err(Error::Usage(format!(
            "--precision {} runs products on tensor cores, which only the ptx backend has",
            opts.precision.name()
        )));
    }
    Ok(())
}

/// A graph through the GPU layer, printed as WGSL: the plan compiled for
/// the GPU and one validated shader per distinct kernel. Needs no device:
/// the limits are the portable defaults unless `limits` says otherwise.
pub fn wgsl_program(
    graph: &Graph,
    opts: &CompileOptions,
    limits: egret_backends::gpu::Limits,
) -> Result<(egret_backends::gpu::GpuPlan, Vec<String>), Error> {
    wgsl_precision(opts)?;
    let gpu = gpu_plan(graph, opts, limits)?;
    let mut shaders = Vec::with_capacity(gpu.kernels.len());
    for (i, k) in gpu.kernels.iter().enumerate() {
        let text = egret_backends::gpu::wgsl::print(k);
        if let Err(message) = egret_backends::gpu::wgsl::validate(&text) {
            // A compiler bug: keep the shader for the report.
            let path = std::env::temp_dir().join(format!("egret-invalid-{}-{i}.wgsl", k.name));
            let _ = std::fs::write(&path, &text);
            let label = gpu
                .steps
                .iter()
                .find_map(|s| match s {
                    egret_backends::gpu::Step::Dispatch { kernel, label, .. } if *kernel == i => Some(label.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let e = egret_backends::gpu::GpuError::Invalid {
                kernel: k.name.clone(),
                label,
                message,
                path: path.display().to_string(),
            };
            return Err(Error::Codegen(e.to_string()));
        }
        shaders.push(text);
    }
    Ok((gpu, shaders))
}

/// Compiles for the WGSL backend on the process's WebGPU device.
pub fn compile_wgsl(
    graph: &Graph,
    opts: &CompileOptions,
) -> Result<(egret_runtime::WgpuExecutable, Vec<String>), Error> {
    let device = egret_runtime::WgpuDevice::shared().map_err(Error::Device)?;
    let (gpu, shaders) = wgsl_program(graph, opts, device.limits)?;
    let exe = egret_runtime::WgpuExecutable::new(device, gpu, &shaders).map_err(Error::Device)?;
    Ok((exe, shaders))
}

/// What PTX kernels may address: indices are i32 words, CUDA has no
/// binding limit of its own, and a kernel's static shared memory is at
/// most 48 KiB on every GPU.
pub const PTX_LIMITS: egret_backends::gpu::Limits = egret_backends::gpu::Limits {
    max_binding_bytes: 1 << 32,
    max_groups_per_dim: 65_535,
    max_storage_buffers: 64,
    max_workgroup_bytes: 48 << 10,
    // An H100 SXM's (H100 PCIe: 114; A100: 108).
    multiprocessors: 132,
};

/// Compiles for the PTX backend on the CUDA driver's device 0.
pub fn compile_ptx(
    graph: &Graph,
    opts: &CompileOptions,
) -> Result<egret_runtime::PtxExecutable<egret_runtime::CudaDevice>, Error> {
    let device = egret_runtime::CudaDevice::open().map_err(Error::Device)?;
    let gpu = gpu_plan(graph, opts, PTX_LIMITS)?;
    egret_runtime::PtxExecutable::new(device, gpu).map_err(Error::Device)
}

/// A model whose symbolic dims the importer could not keep symbolic
/// (`error` says why): its declared inputs as the signature, and a
/// `Specializing` executable that compiles the file for each binding.
fn compile_per_binding(path: &Path, opts: &CompileOptions, error: Error) -> Result<Model, Error> {
    let file = if path.is_dir() { path.join("model.onnx") } else { path.to_path_buf() };
    let (inputs, outputs) = egret_frontend::declared_io(&file)?;
    let declared = |d: &egret_frontend::Declared| -> Option<egret_ir::Type> {
        let dims = d.dims.as_ref()?;
        let shape = dims.iter().enumerate().map(|(i, dim)| match dim {
            egret_frontend::DeclaredDim::Fixed(n) => egret_ir::Dim::new(*n),
            egret_frontend::DeclaredDim::Symbol(p) => match opts.dims.get(p) {
                Some(&v) => egret_ir::Dim::new(v),
                None => egret_ir::Dim::from_dim_param(p),
            },
            egret_frontend::DeclaredDim::Unknown => egret_ir::Dim::symbol(&format!("{}[{i}]", d.name)),
        });
        Some(egret_ir::Type::new(d.dtype, shape.collect::<Vec<_>>()))
    };
    let typed = |ds: &[egret_frontend::Declared]| -> Option<Vec<(String, egret_ir::Type)>> {
        ds.iter().map(|d| Some((d.name.clone(), declared(d)?))).collect()
    };
    // Without declared shapes there is nothing to bind per call.
    let (Some(inputs), Some(outputs)) = (typed(&inputs), typed(&outputs)) else { return Err(error) };
    if inputs.iter().all(|(_, t)| t.is_known()) {
        return Err(error);
    }
    let t = Instant::now();
    // The graph holds the inputs only, as `inputs_only` makes it.
    let mut graph = Graph::new();
    for (name, ty) in &inputs {
        graph.add_input(name, ty.clone());
    }
    let symbols: Vec<String> = inputs.iter().flat_map(|(_, t)| egret_ir::shape_symbols(&t.shape)).collect();
    check_bounds(opts, &symbols)?;
    let signature = egret_runtime::Signature {
        inputs: inputs.clone(),
        outputs,
        specialized: vec![],
        bounds: opts.dim_bounds.clone(),
    };
    let executable = Box::new(specialize::Specializing::from_file(file, inputs, opts.clone()));
    Ok(Model {
        program: Program { signature, executable },
        optimized: None,
        graph,
        index_bounds: vec![],
        canon: Default::default(),
        times: StageTimes { backend_ms: ms(t), ..Default::default() },
        opset: 0,
    })
}

/// The symbols whose values `opts.backend`'s kernels need known
/// (`lower::symbols_to_bind`, with that backend's lowering): the others a
/// plan keeps, on every backend but the reference one.
pub fn symbols_to_bind(graph: &Graph, opts: &CompileOptions) -> std::collections::BTreeSet<String> {
    binding_reasons(graph, opts).into_iter().flat_map(|r| r.symbols).collect()
}

/// The nodes whose kernels need symbols known on `opts.backend`, with
/// those symbols: why a model is planned per binding.
pub fn binding_reasons(graph: &Graph, opts: &CompileOptions) -> Vec<egret_backends::BindingReason> {
    let lowering = match opts.backend {
        Backend::Wgsl | Backend::Ptx => lower_options(opts).gpu(),
        Backend::Cpu | Backend::Reference => lower_options(opts),
    };
    egret_backends::binding_reasons(graph, lowering)
}

/// A plan's arena laid out for the highest values its symbols' declared
/// bounds allow, so no call lays it out again.
pub fn lay_out_for_bounds(plan: &mut egret_backends::Plan, bounds: &DimBounds) {
    if plan.symbols.iter().any(|s| bounds.contains_key(s)) {
        for (name, &(_, hi)) in bounds {
            if let Some(c) = plan.capacity.get_mut(name) {
                *c = hi;
                plan.bounded.push(name.clone());
            }
        }
        egret_backends::memory::plan_memory(plan);
    }
}

/// Bounds must name dims the model keeps symbolic.
pub(crate) fn check_bounds(opts: &CompileOptions, symbols: &[String]) -> Result<(), Error> {
    for name in opts.dim_bounds.keys() {
        if opts.dims.contains_key(name) {
            return Err(Error::Usage(format!("--dim {name} is given both a value and bounds")));
        }
        if !symbols.contains(name) {
            let known = if symbols.is_empty() { "none".to_string() } else { symbols.join(", ") };
            return Err(Error::Usage(format!(
                "--dim {name}=LO..HI: the model keeps no symbolic dim `{name}` (its symbolic dims: {known})"
            )));
        }
    }
    Ok(())
}

/// The backend's executable for a graph (bound, except for the reference
/// backend, which binds symbolic dims on each run).
pub fn backend_executable(graph: &Graph, opts: &CompileOptions) -> Result<Box<dyn egret_runtime::Executable>, Error> {
    backend_executable_with(graph, opts, None)
}

/// `backend_executable`, the CPU's kernels reused from and added to `cache`.
pub fn backend_executable_with(
    graph: &Graph,
    opts: &CompileOptions,
    cache: Option<&egret_backends::cpu::KernelCache>,
) -> Result<Box<dyn egret_runtime::Executable>, Error> {
    Ok(match opts.backend {
        Backend::Reference => Box::new(egret_runtime::ReferenceExecutable::new(graph.clone())?),
        Backend::Cpu => cpu_executable(cpu_plan(graph, opts)?, opts, cache)?,
        // A graph with symbols: one program for every value of them, its
        // kernels compiled the first time some values need them.
        Backend::Wgsl if !graph.is_bound() => {
            wgsl_precision(opts)?;
            let device = egret_runtime::WgpuDevice::shared().map_err(Error::Device)?;
            let program = symbolic_gpu_plan(graph, opts, device.limits)?;
            Box::new(egret_runtime::WgpuExecutable::symbolic(device, program).map_err(Error::Device)?)
        }
        Backend::Ptx if !graph.is_bound() => {
            let device = egret_runtime::CudaDevice::open().map_err(Error::Device)?;
            let program = symbolic_gpu_plan(graph, opts, PTX_LIMITS)?;
            Box::new(egret_runtime::PtxExecutable::symbolic(device, program).map_err(Error::Device)?)
        }
        Backend::Wgsl => Box::new(compile_wgsl(graph, opts)?.0),
        Backend::Ptx => Box::new(compile_ptx(graph, opts)?),
    })
}

/// The CPU's plan of `graph`, its arena laid out for the options' bounds.
fn cpu_plan(graph: &Graph, opts: &CompileOptions) -> Result<egret_backends::Plan, Error> {
    let mut plan = egret_backends::lower(graph, lower_options(opts))?;
    lay_out_for_bounds(&mut plan, &opts.dim_bounds);
    Ok(plan)
}

/// Chooses, packs and generates code for a CPU plan.
fn cpu_executable(
    plan: egret_backends::Plan,
    opts: &CompileOptions,
    cache: Option<&egret_backends::cpu::KernelCache>,
) -> Result<Box<dyn egret_runtime::Executable>, Error> {
    let compiled = egret_backends::cpu::compile_cached(plan, true, cache).map_err(|e| Error::Codegen(e.to_string()))?;
    let threads = opts.threads.unwrap_or_else(default_threads);
    Ok(Box::new(egret_runtime::CpuExecutable::new(compiled, threads)))
}

/// A graph holding `graph`'s inputs only: what callers that describe or
/// fill a model's inputs read (`io::random_inputs`).
fn inputs_only(graph: &Graph) -> Graph {
    let mut only = Graph::new();
    for &v in graph.inputs() {
        only.add_input(graph.input_name(v), graph.ty(v).clone());
    }
    only
}

/// A graph with symbols lowered for a GPU and compiled for every value of
/// them (`gpu::SymbolicGpuPlan`): the arena planned for declared bounds.
pub fn symbolic_gpu_plan(
    graph: &Graph,
    opts: &CompileOptions,
    limits: egret_backends::gpu::Limits,
) -> Result<egret_backends::gpu::SymbolicGpuPlan, Error> {
    let mut plan = egret_backends::lower(graph, lower_options(opts).gpu())?;
    lay_out_for_bounds(&mut plan, &opts.dim_bounds);
    egret_backends::gpu::SymbolicGpuPlan::new(&plan, limits, opts.precision).map_err(|e| Error::Codegen(e.to_string()))
}

/// The pipeline: import, canonicalise, hand to the backend.
pub fn compile(path: &Path, opts: &CompileOptions) -> Result<Model, Error> {
    // Blocks a compile frees are given back, not kept (`alloc`).
    alloc::keep(false);
    if opts.backend == Backend::Cpu {
        // A kernel path the CPU lacks, or a misspelt one, is refused here
        // rather than ignored.
        egret_backends::cpu::kernels::Isa::requested().map_err(Error::Usage)?;
    }
    let c = match canonical(path, opts) {
        Ok(c) => c,
        // Something in the model needs a symbolic dim's value at import:
        // serve it by compiling it whole for each binding instead.
        Err(e) if egret_ir::needs_bound_dims(&e.to_string()) && opts.backend != Backend::Reference => {
            return compile_per_binding(path, opts, e)
        }
        Err(e) => return Err(e),
    };
    let t = Instant::now();
    check_bounds(opts, &c.graph.symbols())?;
    let signature = egret_runtime::Signature::of(&c.graph, c.specialized).with_bounds(opts.dim_bounds.clone());
    if opts.precision != egret_backends::gpu::form::Precision::F32
        && !matches!(opts.backend, Backend::Ptx | Backend::Wgsl)
    {
        return Err(Error::Usage(format!(
            "--precision {} runs products on tensor cores, which only the ptx backend has",
            opts.precision.name()
        )));
    }
    // A plan that can keep every symbol left (a decoder given its batch) is
    // compiled now, as a bound model is: on the CPU no run compiles
    // anything; on a GPU a run builds its values' parameters and grids,
    // and compiles only kernels that earlier values did not have.
    let plannable = opts.backend != Backend::Reference && symbols_to_bind(&c.graph, opts).is_empty();
    let _stage = progress::stage(format!("compiling for {}", opts.backend.name()));
    let mut graph = c.graph;
    let index_bounds = io::index_bounds(&graph);
    let executable: Box<dyn egret_runtime::Executable> =
        if !(graph.is_bound() || opts.backend == Backend::Reference || plannable) {
            Box::new(specialize::Specializing::new(graph.clone(), opts.clone()))
        } else if opts.backend == Backend::Cpu && !opts.keep_graph {
            // Lowered, the plan holds the only reference to each weight, and
            // packing frees each as it goes (`cpu::choose`).
            let plan = cpu_plan(&graph, opts)?;
            graph = inputs_only(&graph);
            cpu_executable(plan, opts, None)?
        } else {
            backend_executable(&graph, opts)?
        };
    if !opts.keep_graph {
        graph = inputs_only(&graph);
    }
    let backend_ms = ms(t);
    // What the compile freed is not what runs will ask for (`alloc`).
    alloc::release_kept();
    Ok(Model {
        program: Program { signature, executable },
        optimized: c.optimized,
        graph,
        index_bounds,
        canon: c.canon,
        times: StageTimes { import_ms: c.import_ms, canonicalize_ms: c.canonicalize_ms, backend_ms },
        opset: c.opset,
    })
}
