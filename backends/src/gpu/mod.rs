//! The GPU half of the backends: the plan's kernels written once in a GPU
//! kernel form (`form`), by one algorithm per kernel kind (`map`, `matmul`,
//! `rows`, `attention`, `gather`, and `integer` for the integer ops the plan
//! leaves to the reference evaluator), and rendered by a printer per target
//! (`wgsl`, `ptx`). Nothing here touches a device: `egret-runtime` uploads
//! the weights, lays out the arena and dispatches what `compile` returns.
//!
//! Memory is word-addressed (see `form`): every plan buffer gets a `Place`,
//! a space and a word offset. Arena buffers are laid out again by liveness
//! with one word per element; graph inputs follow the arena; constants are
//! packed into weight chunks no larger than one binding.

pub mod attention;
pub mod builder;
pub mod form;
pub mod gather;
pub mod integer;
pub mod map;
pub mod matmul;
pub mod ptx;
pub mod roofline;
pub mod rows;
pub mod wgsl;

use crate::plan::{BufferId, KernelKind, Plan, Storage};
use egret_ir::{Bindings, DType, Op, Tensor, Type};
use form::{Kernel, Space};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{what} is {dtype}, which the GPU backends do not carry (f32, f16 and bf16 as f32, bool, and integers that fit i32 only)")]
    DType { what: String, dtype: DType },
    #[error("{what} holds {value}, outside the i32 range GPU kernels carry integers in")]
    IntRange { what: String, value: i64 },
    #[error("kernel `{kernel}` ({label}) binds {bindings} storage buffers, more than the adapter's {limit}")]
    TooManyBindings { kernel: String, label: String, bindings: usize, limit: u32 },
    #[error("the plan keeps symbolic dims ({symbols}); `gpu::compile` takes a bound plan (`SymbolicGpuPlan` serves every value)")]
    Symbolic { symbols: String },
    #[error("kernel `{kind}` ({label}): {message}")]
    Unsupported { kind: String, label: String, message: String },
    #[error("kernel `{kernel}` ({label}) needs {bytes} bytes of workgroup memory, more than the adapter's {limit}")]
    WorkgroupMemory { kernel: String, label: String, bytes: usize, limit: usize },
    #[error("the sizes of this run: {message}")]
    Sizes { message: String },
    #[error("the arena needs {bytes} bytes, more than one storage binding ({limit} bytes) on this adapter")]
    ArenaTooLarge { bytes: usize, limit: usize },
    #[error("kernel `{kernel}` ({label}): its WGSL fails validation ({message}); this is a compiler bug, the shader is saved at {path}")]
    Invalid { kernel: String, label: String, message: String, path: String },
}

/// What the device allows, read from the adapter.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes one storage binding may span.
    pub max_binding_bytes: usize,
    /// Workgroups along one grid dimension.
    pub max_groups_per_dim: u32,
    /// Storage buffers one kernel may bind.
    pub max_storage_buffers: u32,
    /// Bytes of workgroup (shared) memory one workgroup may use.
    pub max_workgroup_bytes: usize,
    /// The multiprocessors (SMs, compute units) workgroups run on at once:
    /// a product takes the largest tile that still makes this many
    /// workgroups, one full wave (`matmul::matmul`). WebGPU does not say;
    /// the default is a mid-sized discrete GPU's.
    pub multiprocessors: u32,
}

impl Default for Limits {
    /// The portable defaults every WebGPU adapter has.
    fn default() -> Limits {
        Limits {
            max_binding_bytes: 128 << 20,
            max_groups_per_dim: 65_535,
            max_storage_buffers: 8,
            // WebGPU's downlevel default (16 KiB less 32 bytes).
            max_workgroup_bytes: 16_352,
            multiprocessors: 32,
        }
    }
}

/// Where a buffer lives on the device: a space and a word offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub space: Space,
    pub word: usize,
}

/// One step of a run.
#[derive(Clone, Debug)]
pub enum Step {
    /// Dispatches `kernels[kernel]` over `grid` workgroups with `params`.
    /// A kernel that can fail (a gather, an integer op) says how in
    /// `on_error`: the message the run returns when its code (the step's
    /// index plus one) is in the error word.
    Dispatch {
        kernel: usize,
        params: Vec<u32>,
        grid: [u32; 3],
        /// Workgroups that have work (the grid may round up past them).
        groups: u64,
        label: String,
        kind: String,
        on_error: Option<String>,
        /// Its flops and operand bytes, for `roofline::estimate`.
        cost: roofline::Cost,
    },
    /// An op with no GPU kernel: the runtime copies its inputs to the host,
    /// evaluates it with the IR's reference semantics and copies the
    /// results back.
    Host { op: Op, inputs: Vec<(Place, Type)>, outputs: Vec<(Place, Type)>, label: String },
}

/// A plan compiled for a GPU: distinct kernels (shared by the steps that
/// differ only in their parameters), the steps of a run, and the memory.
#[derive(Clone, Debug)]
pub struct GpuPlan {
    pub kernels: Vec<Kernel>,
    pub steps: Vec<Step>,
    /// Words of the arena, the graph inputs included.
    pub arena_words: usize,
    /// The constants, in chunks of at most one binding (shared by the
    /// programs of one `SymbolicGpuPlan` at every value).
    pub weights: Arc<Vec<Vec<u32>>>,
    pub inputs: Vec<(Place, Type)>,
    pub outputs: Vec<(Place, Type)>,
}

impl GpuPlan {
    /// Kernels run on the host, by label and op (what `explain` lists).
    pub fn host_steps(&self) -> Vec<(String, String)> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Host { op, label, .. } => Some((label.clone(), op.name().to_string())),
                _ => None,
            })
            .collect()
    }
}

/// Workgroups laid out as a grid of at most `max` per dimension; kernels
/// recover the linear index with `Builder::group` and skip the ones past
/// `groups`.
pub fn grid_of(groups: u64, max: u32) -> [u32; 3] {
    let x = groups.min(max as u64).max(1);
    [x as u32, groups.div_ceil(x).max(1) as u32, 1]
}

/// A tensor as device words (see `form`); `what` names it in errors.
pub fn words_of(t: &Tensor, what: &str) -> Result<Vec<u32>, GpuError> {
    use egret_ir::Data;
    Ok(match t.data() {
        Data::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        Data::Bool(v) => v.iter().map(|&b| b as u32).collect(),
        // Half values travel as f32 words (their values exactly).
        Data::F16(v) => v.iter().map(|x| x.to_f32().to_bits()).collect(),
        Data::BF16(v) => v.iter().map(|x| x.to_f32().to_bits()).collect(),
        Data::F64(_) => return Err(GpuError::DType { what: what.into(), dtype: DType::F64 }),
        _ => {
            let mut out = Vec::with_capacity(t.numel());
            for value in t.to_i64_vec() {
                let w = i32::try_from(value).map_err(|_| GpuError::IntRange { what: what.into(), value })?;
                out.push(w as u32);
            }
            out
        }
    })
}

/// Device words back as a tensor of `ty`.
pub fn tensor_of_words(ty: &Type, words: &[u32]) -> Tensor {
    use egret_ir::Data;
    let data = match ty.dtype {
        DType::F32 => Data::F32(words.iter().map(|&w| f32::from_bits(w)).collect()),
        DType::Bool => Data::Bool(words.iter().map(|&w| w != 0).collect()),
        d if d.is_half() => Data::F32(words.iter().map(|&w| f32::from_bits(w)).collect()).cast(d),
        d => Data::from_i64s(d, &words.iter().map(|&w| w as i32 as i64).collect::<Vec<_>>()),
    };
    Tensor::new(ty.sizes(), data)
}

/// The GPU's choice of weight layout: a product's constant `b` that is
/// not row-major (a transposed view, as Gemm's `transB` and tied
/// embeddings give) is laid out row-major at compile time, so that the
/// matmul's tile loads walk consecutive words. The constant stays for any
/// other reader; the product reads its own copy.
fn lay_out_weights(plan: &Plan) -> Plan {
    let mut plan = plan.clone();
    for i in 0..plan.kernels.len() {
        let KernelKind::MatMul(mm) = &plan.kernels[i].kind else { continue };
        let Storage::Constant(t) = &plan.buffers[mm.b].storage else { continue };
        let Some(w) = t.as_f32() else { continue };
        let b_offset = mm.batches[0][1];
        let one_weight = mm.batches.iter().all(|o| o[1] == b_offset);
        if mm.b_strides[1] == 1 || !one_weight || mm.b_strides.iter().any(|&s| s < 0) {
            continue;
        }
        let (k, n, [rs, cs]) = (mm.k, mm.n, mm.b_strides);
        let mut dense = Vec::with_capacity(k * n);
        for p in 0..k as isize {
            for j in 0..n as isize {
                dense.push(w[(b_offset + p * rs + j * cs) as usize]);
            }
        }
        let t = Tensor::from_vec(vec![k, n], dense);
        plan.buffers.push(crate::plan::Buffer {
            bytes: egret_ir::Dim::new(k * n * 4),
            dtype: DType::F32,
            storage: Storage::Constant(std::sync::Arc::new(t)),
        });
        let b = plan.buffers.len() - 1;
        let KernelKind::MatMul(mm) = &mut plan.kernels[i].kind else { unreachable!() };
        mm.b = b;
        mm.b_strides = [n as isize, 1];
        for o in &mut mm.batches {
            o[1] = 0;
        }
    }
    plan
}

/// Compiles a bound plan's kernels for a GPU. The plan must be lowered
/// with `LowerOptions::gpu` (strided weights, no CPU row tables).
///
/// With `precision` tf32 or bf16, products run on tensor cores (PTX only);
/// attention keeps f32.
pub fn compile(plan: &Plan, limits: Limits, precision: form::Precision) -> Result<GpuPlan, GpuError> {
    if !plan.is_bound() {
        return Err(GpuError::Symbolic { symbols: plan.symbols.join(", ") });
    }
    let program = SymbolicGpuPlan::new(plan, limits, precision)?;
    let none = Bindings::new();
    let layout = program.layout(&none)?;
    program.at(&none, &layout)
}

/// A plan compiled for a GPU once for every value of its symbols: its
/// weights laid out and packed, and the rest built for each set of values
/// a run has (`at`). Every kernel takes its sizes and offsets as
/// parameters, so the kernels `at` builds for different values are the
/// same shaders with different parameter words and grids: a runtime
/// compiles each distinct kernel once and keeps it. A bound plan is the
/// case with no symbols (`compile`).
#[derive(Clone, Debug)]
pub struct SymbolicGpuPlan {
    /// The plan, its weights laid out for the GPU.
    plan: Plan,
    weights: Arc<Vec<Vec<u32>>>,
    /// Each constant's place in the weights.
    constants: Vec<Option<Place>>,
    limits: Limits,
    precision: form::Precision,
}

/// The arena of a `SymbolicGpuPlan` laid out for the values in `capacity`
/// (each symbol at most its value there): the place of every arena buffer
/// and graph input, and the words it takes.
#[derive(Clone, Debug, PartialEq)]
pub struct ArenaLayout {
    pub capacity: Bindings,
    places: Vec<Option<Place>>,
    pub words: usize,
}

impl ArenaLayout {
    /// Whether every value fits the capacity.
    pub fn holds(&self, values: &Bindings) -> bool {
        values.iter().all(|(k, v)| self.capacity.get(k).is_some_and(|c| v <= c))
    }
}

impl SymbolicGpuPlan {
    pub fn new(plan: &Plan, limits: Limits, precision: form::Precision) -> Result<SymbolicGpuPlan, GpuError> {
        let plan = lay_out_weights(plan);
        // Every value is one 32-bit word on the device: f64 has no place there.
        let wide = |b: &BufferId| plan.buffers[*b].dtype == DType::F64;
        if let Some(i) = plan.inputs.iter().position(|(b, _)| wide(b)) {
            return Err(GpuError::DType { what: format!("graph input {i} ({})", plan.inputs[i].1), dtype: DType::F64 });
        }
        for k in &plan.kernels {
            let (reads, writes) = k.buffers();
            if reads.iter().chain(&writes).any(wide) {
                return Err(GpuError::DType { what: format!("a value of node `{}`", k.label), dtype: DType::F64 });
            }
        }
        // Constants the kernels read, packed into chunks of at most one
        // binding; one larger than that starts a chunk of its own and runs
        // on over as many as it needs.
        let max_words = limits.max_binding_bytes / 4;
        let used = plan.used_buffers();
        let chunk_words = max_words / 16 * 16;
        let mut weights: Vec<Vec<u32>> = vec![];
        let mut constants = vec![None; plan.buffers.len()];
        for (b, buf) in plan.buffers.iter().enumerate() {
            let Storage::Constant(t) = &buf.storage else { continue };
            if !used[b] {
                continue;
            }
            let words = words_of(t, &format!("constant buffer {b}"))?;
            if words.len() > chunk_words {
                let first = weights.len() as u32;
                let chunks = words.len().div_ceil(chunk_words);
                weights.extend(words.chunks(chunk_words).map(|c| c.to_vec()));
                let last = weights.last_mut().unwrap();
                last.resize(last.len().div_ceil(16) * 16, 0);
                let space = Space::WeightsSpan { first, chunks: chunks as u32, chunk_words: chunk_words as u32 };
                constants[b] = Some(Place { space, word: 0 });
                continue;
            }
            if weights.last().is_none_or(|c| c.len() + words.len() > chunk_words) {
                weights.push(Vec::new());
            }
            let chunk = weights.last_mut().unwrap();
            let word = chunk.len();
            chunk.extend(words);
            chunk.resize(chunk.len().div_ceil(16) * 16, 0);
            constants[b] = Some(Place { space: Space::Weights(weights.len() as u32 - 1), word });
        }
        Ok(SymbolicGpuPlan { plan, weights: Arc::new(weights), constants, limits, precision })
    }

    /// The plan, its weights laid out for the GPU.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The weights, packed in chunks (what `at`'s programs share).
    pub fn weights(&self) -> &Arc<Vec<Vec<u32>>> {
        &self.weights
    }

    /// The values the plan's arena was planned for: declared bounds' highest
    /// values (`Plan::bounded`), for the symbols that have them.
    pub fn bounded_capacity(&self) -> Bindings {
        self.plan.bounded.iter().filter_map(|s| Some((s.clone(), *self.plan.capacity.get(s)?))).collect()
    }

    /// The arena laid out for `capacity`: by liveness, one word per element
    /// (16-word aligned), the graph inputs after it.
    pub fn layout(&self, capacity: &Bindings) -> Result<ArenaLayout, GpuError> {
        let plan = &self.plan;
        let words = |b: BufferId| crate::memory::bytes_at(plan, b, capacity) / plan.buffers[b].dtype.size_bytes();
        let (mut offsets, arena_words) = crate::memory::assign_offsets(plan, words, 16);
        let mut places: Vec<Option<Place>> =
            offsets.drain(..).map(|o| o.map(|word| Place { space: Space::Arena, word })).collect();
        let mut top = arena_words;
        for (b, _) in &plan.inputs {
            places[*b] = Some(Place { space: Space::Arena, word: top });
            top = (top + words(*b)).div_ceil(16) * 16;
        }
        if top > self.limits.max_binding_bytes / 4 {
            return Err(GpuError::ArenaTooLarge { bytes: top * 4, limit: self.limits.max_binding_bytes });
        }
        Ok(ArenaLayout { capacity: capacity.clone(), places, words: top })
    }

    /// The program at `values` of the symbols, in an arena laid out for
    /// values at least these (`layout`): its distinct kernels, the steps
    /// with their parameter words and grids, and the shared weights.
    pub fn at(&self, values: &Bindings, layout: &ArenaLayout) -> Result<GpuPlan, GpuError> {
        if !layout.holds(values) {
            let message = format!("the arena was laid out for {:?}, less than {values:?}", layout.capacity);
            return Err(GpuError::Sizes { message });
        }
        let bound;
        let plan = if self.plan.is_bound() {
            &self.plan
        } else {
            bound = self.plan.at(values).map_err(|message| GpuError::Sizes { message })?;
            &bound
        };
        let (limits, precision) = (self.limits, self.precision);
        let at =
            |b: BufferId| layout.places[b].or(self.constants[b]).unwrap_or_else(|| panic!("buffer {b} has no place"));
        let top = layout.words;
        let weights = self.weights.clone();
        let mut kernels: Vec<Kernel> = vec![];
        // Kernels alike are one pipeline: the layers of a model.
        let mut steps = vec![];
        for k in &plan.kernels {
            let built = match &k.kind {
                KernelKind::Map(m) => map::map(m, &at),
                KernelKind::MatMul(mm) if precision != form::Precision::F32 => matmul::matmul_mma(mm, &at, precision),
                KernelKind::MatMul(mm) => matmul::matmul(mm, &at, &limits),
                KernelKind::Rows(r) => rows::rows(r, &at),
                KernelKind::Attention(a) => attention::attention(a, &at, &limits).map_err(|message| {
                    GpuError::Unsupported { kind: k.kind_name().into(), label: k.label.clone(), message }
                })?,
                KernelKind::Gather(gk) => gather::gather(gk, &at, steps.len() as u32 + 1),
                // A plan with the CPU's choices may name the same ops `Loop`.
                KernelKind::Reference { op, inputs, outputs } | KernelKind::Loop { op, inputs, outputs } => {
                    let code = steps.len() as u32 + 1;
                    if let Some(built) = integer::kernel(op, inputs, outputs, &at, code) {
                        built
                    } else {
                        steps.push(Step::Host {
                            op: op.clone(),
                            inputs: inputs.iter().map(|(b, t)| (at(*b), t.clone())).collect(),
                            outputs: outputs.iter().map(|(b, t)| (at(*b), t.clone())).collect(),
                            label: k.label.clone(),
                        });
                        continue;
                    }
                }
            };
            let (kernel, params, groups) = built;
            // A kernel with nothing to compute (an empty output) is not
            // dispatched: its addresses would start outside its operands.
            if groups == 0 {
                continue;
            }
            // Every space is a storage buffer, the parameters too.
            let bindings = kernel.spaces().len();
            if bindings > limits.max_storage_buffers as usize {
                return Err(GpuError::TooManyBindings {
                    kernel: kernel.name.clone(),
                    label: k.label.clone(),
                    bindings,
                    limit: limits.max_storage_buffers,
                });
            }
            let bytes = kernel.shared.iter().map(|&len| len as usize * 4).sum::<usize>();
            if bytes > limits.max_workgroup_bytes {
                return Err(GpuError::WorkgroupMemory {
                    kernel: kernel.name.clone(),
                    label: k.label.clone(),
                    bytes,
                    limit: limits.max_workgroup_bytes,
                });
            }
            let index = kernels.iter().position(|k| *k == kernel).unwrap_or_else(|| {
                kernels.push(kernel);
                kernels.len() - 1
            });
            // Each operand read or written once; a gather reads only the
            // rows it writes.
            let size = |b: BufferId| plan.buffers[b].bytes.size().unwrap_or(0) as u64;
            let bytes = match &k.kind {
                KernelKind::Gather(g) => 2 * size(g.out) + size(g.indices),
                _ => {
                    let (reads, writes) = k.buffers();
                    reads.iter().chain(&writes).map(|&b| size(b)).sum()
                }
            };
            steps.push(Step::Dispatch {
                kernel: index,
                params,
                grid: grid_of(groups, limits.max_groups_per_dim),
                groups,
                cost: roofline::Cost { flops: k.flops(), bytes },
                label: k.label.clone(),
                // An integer op the GPU runs for the reference evaluator is named by its op.
                kind: match &k.kind {
                    KernelKind::Reference { op, .. } | KernelKind::Loop { op, .. } => op.name().to_string(),
                    _ => k.kind_name().to_string(),
                },
                on_error: match &k.kind {
                    KernelKind::Gather(g) => {
                        Some(format!("gather index out of range for an axis of length {}", g.axis_len))
                    }
                    KernelKind::Reference { .. } | KernelKind::Loop { .. } => Some(
                        "integer overflow: a result does not fit the i32 words GPU kernels carry integers in".into(),
                    ),
                    _ => None,
                },
            });
        }
        Ok(GpuPlan {
            kernels,
            steps,
            arena_words: top,
            weights,
            inputs: plan.inputs.iter().map(|(b, t)| (at(*b), t.clone())).collect(),
            outputs: plan.outputs.iter().map(|(b, t)| (at(*b), t.clone())).collect(),
        })
    }
}
