//! The CPU executor: runs a Cranelift-compiled plan.
//!
//! A plan that keeps symbols (a decoder's past length) runs every value of
//! them from the one compile: each call works the values out of its
//! inputs' shapes, writes the symbolic sizes each map kernel reads into the
//! argument slots after its operands, then the blocks that hold them
//! (`cpu::call_blocks`: attention's parameters, a product's epilogue
//! program), gives reference ops their types, and lays the arena
//! out again, larger, when the values pass the capacity it was laid out
//! for. Nothing is compiled per call.

use crate::{Executable, RunError};
use egret_backends::cpu::kernels::pool::{self, Pool, Split};
use egret_backends::cpu::{any_kernel_may_split, call_blocks, parallel_extent, split_at, split_of, CompiledPlan};
use egret_backends::plan::{BufferId, Kernel, KernelKind, Storage};
use egret_ir::{Bindings, Dim, DimValues, Op, Tensor, TensorRef, Type};

/// A 64-byte-aligned byte buffer, so that every element type (and vector
/// loads) sees natural alignment.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf { lines: vec![Line([0; 64]); len.div_ceil(64).max(1)], len }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // `lines` holds at least `len` bytes of plain data.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, self.len) }
    }

    fn ptr(&self) -> *mut u8 {
        self.lines.as_ptr() as *mut u8
    }
}

/// The memory one run uses besides the constants.
struct Workspace {
    /// Every arena byte a kernel reads was written earlier in the same run,
    /// so a reused arena needs no clearing.
    arena: AlignedBuf,
    /// The inputs, copied in aligned where a kernel writes one (none does
    /// as lowering plans them; see `CpuExecutable::inputs_in_place`).
    inputs: Vec<AlignedBuf>,
}

pub struct CpuExecutable {
    compiled: CompiledPlan,
    pool: Pool,
    /// Memory of finished runs, reused: no allocation, clearing or copying
    /// through a temporary per run (and a buffer the allocator maps afresh
    /// each time, as glibc does above its mmap threshold, costs a page
    /// fault per 4 KiB on first touch).
    workspaces: std::sync::Mutex<Vec<Workspace>>,
    /// Constant buffers: the plan's tensors themselves, read in place (the
    /// kernels need their elements' natural alignment only, which every
    /// tensor's storage has; artifacts hold them at that alignment too).
    constants: Vec<Option<std::sync::Arc<Tensor>>>,
    /// Per kernel, the buffers of its operands in ABI order.
    operands: Vec<Vec<BufferId>>,
    /// Per kernel, how the scheduler may split it.
    splits: Vec<Split>,
    /// Per graph output, whether the kernels write it straight into the
    /// tensor returned (see `Plan::direct_output`).
    direct_outputs: Vec<bool>,
    /// Per kernel, the symbolic sizes its code reads after its operands
    /// (`Kernel::runtime_dims`).
    runtime_dims: Vec<Vec<Dim>>,
    /// Per kernel, whether any of its sizes is symbolic (`Kernel::is_known`).
    symbolic: Vec<bool>,
    /// Per kernel, whether a call checks its walks (`Plan::walks_to_check`).
    checked: Vec<bool>,
    /// Where the arena buffers are: the plan's layout, or (symbolic plans)
    /// a larger one made when a call's values passed it.
    layout: std::sync::RwLock<std::sync::Arc<Layout>>,
    /// The inputs' declared types, by position (symbolic plans solve their
    /// values from them per call).
    declared: Vec<(String, Type)>,
    /// The setups of the last few sets of values calls had, most recent
    /// last: a server alternating between a few shapes reuses them.
    recent: std::sync::Mutex<Vec<std::sync::Arc<Setup>>>,
    /// Whether kernels read the caller's input tensors where they are (no
    /// kernel writes an input's buffer, and a tensor's elements are
    /// naturally aligned, as every kernel needs) instead of copies: a
    /// decoder's past is then not copied in on every token.
    inputs_in_place: bool,
}

/// What a call with these values of the plan's symbols needs, worked out
/// (and checked) once for them: a server's repeated shape reuses it; a
/// decoder's next token has new values and a new setup.
struct Setup {
    values: Bindings,
    layout: std::sync::Arc<Layout>,
    /// Per kernel: its runtime dims' values, the slots after its operands.
    sizes: Vec<Vec<i64>>,
    /// Per kernel: the blocks after those (`cpu::call_blocks`), as words.
    blocks: Vec<Vec<Vec<u64>>>,
    /// Per kernel: the extent of its parallel dim.
    extents: Vec<i64>,
    /// Per kernel: whether it splits across threads, a symbolic one's
    /// decided at these values (`split_at`).
    splits: Vec<Split>,
    /// The outputs' types at these values.
    output_types: Vec<Type>,
}

/// How many sets of values' setups a symbolic executable keeps.
const RECENT_SETUPS: usize = 8;

/// Arena offsets (by buffer) for symbol values up to `capacity`.
struct Layout {
    capacity: Bindings,
    offsets: Vec<Option<usize>>,
    arena_bytes: usize,
}

impl Layout {
    /// Whether every value fits the capacity.
    fn holds(&self, values: &Bindings) -> bool {
        values.iter().all(|(k, v)| self.capacity.get(k).is_some_and(|c| v <= c))
    }
}

impl CpuExecutable {
    /// Wraps a compiled plan; large kernels split across `threads` threads.
    pub fn new(compiled: CompiledPlan, threads: usize) -> CpuExecutable {
        let plan = &compiled.plan;
        let splits: Vec<Split> = plan.kernels.iter().map(|k| split_of(&k.kind)).collect();
        let pool = Pool::new(if any_kernel_may_split(plan) { threads.max(1) } else { 1 });
        let used = plan.used_buffers();
        let constants = plan
            .buffers
            .iter()
            .zip(used)
            .map(|(b, used)| match (&b.storage, used) {
                (Storage::Constant(t), true) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let operands = plan
            .kernels
            .iter()
            .map(|k| {
                let (reads, writes) = k.buffers();
                reads.into_iter().chain(writes).collect()
            })
            .collect();
        let direct_outputs = (0..plan.outputs.len()).map(|i| plan.direct_output(i)).collect();
        let runtime_dims = plan.kernels.iter().map(Kernel::runtime_dims).collect();
        let symbolic = plan.kernels.iter().map(|k| !k.is_known()).collect();
        let checked = plan.kernels.iter().map(|k| !plan.walks_to_check(k).is_empty()).collect();
        let inputs_in_place = !plan
            .kernels
            .iter()
            .any(|k| k.buffers().1.iter().any(|&b| matches!(plan.buffers[b].storage, Storage::Input(_))));
        let offsets = plan
            .buffers
            .iter()
            .map(|b| match b.storage {
                Storage::Arena { offset } => Some(offset),
                _ => None,
            })
            .collect();
        // A plan with symbols without declared bounds is laid out at its
        // first call (`Plan::bounded`).
        let layout = match plan.symbols.iter().all(|s| plan.bounded.contains(s)) {
            true => Layout { capacity: plan.capacity.clone(), offsets, arena_bytes: plan.arena_bytes },
            false => {
                let capacity = plan.capacity.iter().filter(|(k, _)| plan.bounded.contains(k));
                Layout { capacity: capacity.map(|(k, &v)| (k.clone(), v)).collect(), offsets, arena_bytes: 0 }
            }
        };
        let declared = plan.inputs.iter().enumerate().map(|(i, (_, ty))| (format!("input {i}"), ty.clone())).collect();
        CpuExecutable {
            runtime_dims,
            symbolic,
            checked,
            layout: std::sync::RwLock::new(std::sync::Arc::new(layout)),
            declared,
            recent: std::sync::Mutex::new(Vec::new()),
            inputs_in_place,
            compiled,
            pool,
            splits,
            workspaces: std::sync::Mutex::new(Vec::new()),
            constants,
            operands,
            direct_outputs,
        }
    }

    pub fn compiled(&self) -> &CompiledPlan {
        &self.compiled
    }
}

/// Where each buffer's bytes are during one run.
struct Memory<'a> {
    inputs: &'a [*mut u8],
    constants: &'a [Option<std::sync::Arc<Tensor>>],
    arena: *mut u8,
    /// Arena offsets by buffer (`Layout::offsets`).
    offsets: &'a [Option<usize>],
    /// Output buffers that live in the returned tensors' memory instead
    /// of the arena.
    outputs: &'a [(BufferId, *mut u8)],
}

impl Memory<'_> {
    fn ptr(&self, plan: &egret_backends::Plan, b: BufferId) -> *mut u8 {
        if let Some(&(_, at)) = self.outputs.iter().find(|(out, _)| *out == b) {
            return at;
        }
        match &plan.buffers[b].storage {
            Storage::Input(i) => self.inputs[*i],
            // Kernels never write a constant.
            Storage::Constant(_) => {
                self.constants[b].as_ref().expect("constants are kept up front").bytes().as_ptr() as *mut u8
            }
            // Offsets come from the memory plan, inside the arena.
            Storage::Arena { .. } => unsafe { self.arena.add(self.offsets[b].expect("arena buffers have offsets")) },
        }
    }

    fn read(&self, plan: &egret_backends::Plan, b: BufferId, ty: &Type) -> Tensor {
        let n = ty.numel() * ty.dtype.size_bytes();
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr(plan, b), n) };
        Tensor::from_bytes(ty, bytes).expect("buffer sizes come from the types")
    }
}

impl Executable for CpuExecutable {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let refs: Vec<TensorRef> = inputs.iter().map(Tensor::view).collect();
        self.run_refs(&refs)
    }

    fn run_refs(&self, inputs: &[TensorRef<'_>]) -> Result<Vec<Tensor>, RunError> {
        self.pool.install(|| self.execute(inputs, None))
    }

    fn arena_bytes(&self) -> Option<usize> {
        Some(self.layout.read().map_or(self.compiled.plan.arena_bytes, |l| l.arena_bytes))
    }

    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, String, f64)>, RunError> {
        let mut times = Vec::with_capacity(self.compiled.plan.kernels.len());
        let refs: Vec<TensorRef> = inputs.iter().map(Tensor::view).collect();
        self.pool.install(|| self.execute(&refs, Some(&mut times)))?;
        Ok(times)
    }
}

impl CpuExecutable {
    /// Runs the plan; with `times`, records each kernel's duration.
    fn execute(
        &self,
        inputs: &[TensorRef<'_>],
        times: Option<&mut Vec<(String, String, f64)>>,
    ) -> Result<Vec<Tensor>, RunError> {
        let plan = &self.compiled.plan;
        let values = self.values(inputs)?;
        let setup = self.setup(values, inputs)?;
        let arena_bytes = setup.layout.arena_bytes;
        let mut ws = self
            .workspaces
            .lock()
            .ok()
            .and_then(|mut w| w.pop())
            .unwrap_or_else(|| Workspace { arena: AlignedBuf::zeroed(arena_bytes), inputs: Vec::new() });
        if ws.arena.len < arena_bytes {
            ws.arena = AlignedBuf::zeroed(arena_bytes);
        }
        let input_ptrs: Vec<*mut u8> = match self.inputs_in_place {
            // Read only, so the shared reference's memory is never written.
            true => inputs.iter().map(|t| t.bytes().as_ptr() as *mut u8).collect(),
            false => {
                ws.inputs.resize_with(inputs.len(), || AlignedBuf::zeroed(0));
                for (buf, t) in ws.inputs.iter_mut().zip(inputs) {
                    let len = t.bytes().len();
                    if buf.len != len {
                        *buf = AlignedBuf::zeroed(len);
                    }
                    buf.bytes_mut().copy_from_slice(t.bytes());
                }
                ws.inputs.iter().map(AlignedBuf::ptr).collect()
            }
        };
        let result = self.execute_in(plan, &input_ptrs, &ws.arena, &setup, times);
        if let Ok(mut w) = self.workspaces.lock() {
            w.push(ws);
        }
        result
    }

    /// The plan's symbols' values for a call (none for a bound plan).
    fn values(&self, inputs: &[TensorRef]) -> Result<Bindings, RunError> {
        let plan = &self.compiled.plan;
        if plan.symbols.is_empty() {
            return Ok(Bindings::new());
        }
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
        crate::solve_dims(&self.declared, &shapes)
    }

    /// The setup for a call with `values`: a recent one if it had the
    /// same (its arena layout holds them, whatever was laid out since), else
    /// a new one, after checking that no kernel reaches outside a buffer
    /// at them (`Plan::walks_to_check`), so that a call the model does not
    /// allow fails before any kernel runs.
    fn setup(&self, values: Bindings, inputs: &[TensorRef]) -> Result<std::sync::Arc<Setup>, RunError> {
        if let Some(s) = self.recent.lock().ok().and_then(|r| r.iter().rev().find(|s| s.values == values).cloned()) {
            return Ok(s);
        }
        let plan = &self.compiled.plan;
        let layout = self.layout_for(&values);
        let dims = DimValues::new(&values);
        plan.check_sizes(&dims).map_err(RunError::Shape)?;
        let input_bytes: Vec<usize> = inputs.iter().map(|t| t.bytes().len()).collect();
        let (mut sizes, mut blocks, mut extents, mut splits) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, k) in plan.kernels.iter().enumerate() {
            if self.checked[i] {
                crate::steps::check_spans(plan, k, &values, &dims, &input_bytes)?;
            }
            let at = |d: &Dim| dims.get(*d).map_err(RunError::Shape);
            sizes.push(self.runtime_dims[i].iter().map(at).collect::<Result<Vec<i64>, RunError>>()?);
            blocks.push(match self.symbolic[i] {
                false => vec![],
                true => call_blocks(k, &dims).map_err(RunError::Shape)?.into_iter().map(words).collect(),
            });
            extents.push(parallel_extent(&k.kind, &dims) as i64);
            splits.push(if self.symbolic[i] { split_at(&k.kind, &dims) } else { self.splits[i] });
        }
        let output_types = plan.outputs.iter().map(|(_, ty)| bound_type(ty, &values)).collect::<Result<_, _>>()?;
        let setup = std::sync::Arc::new(Setup { values, layout, sizes, blocks, extents, splits, output_types });
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT_SETUPS {
                recent.remove(0);
            }
            recent.push(setup.clone());
        }
        Ok(setup)
    }

    /// The arena layout a call with `values` runs in: the current one if
    /// they fit its capacity, else a new one for at least twice the old
    /// capacity of each symbol that passed it (so a growing decoder lays
    /// its arena out a few times, not at every token).
    fn layout_for(&self, values: &Bindings) -> std::sync::Arc<Layout> {
        if let Ok(l) = self.layout.read() {
            if l.holds(values) {
                return l.clone();
            }
        }
        let mut l = self.layout.write().unwrap_or_else(|p| p.into_inner());
        if !l.holds(values) {
            let mut capacity = l.capacity.clone();
            for (k, &v) in values {
                let c = capacity.entry(k.clone()).or_insert(0);
                if v > *c {
                    *c = v.max(2 * *c);
                }
            }
            let (offsets, arena_bytes) = egret_backends::memory::layout_at(&self.compiled.plan, &capacity);
            *l = std::sync::Arc::new(Layout { capacity, offsets, arena_bytes });
        }
        l.clone()
    }

    fn execute_in(
        &self,
        plan: &egret_backends::Plan,
        inputs: &[*mut u8],
        arena: &AlignedBuf,
        setup: &Setup,
        mut times: Option<&mut Vec<(String, String, f64)>>,
    ) -> Result<Vec<Tensor>, RunError> {
        let values = &setup.values;
        let bound = |ty: &Type| bound_type(ty, values);
        let output_types = &setup.output_types;
        // The direct outputs' memory: allocated, not initialised, since the
        // run writes every element (`Plan::direct_output`).
        let mut direct: Vec<(usize, Vec<f32>)> = self
            .direct_outputs
            .iter()
            .enumerate()
            .filter(|(_, &d)| d)
            .map(|(i, _)| (i, Vec::with_capacity(output_types[i].numel())))
            .collect();
        let redirected: Vec<(BufferId, *mut u8)> =
            direct.iter_mut().map(|(i, v)| (plan.outputs[*i].0, v.as_mut_ptr() as *mut u8)).collect();
        let mem = Memory {
            inputs,
            constants: &self.constants,
            arena: arena.ptr(),
            offsets: &setup.layout.offsets,
            outputs: &redirected,
        };
        let mut args: Vec<*mut u8> = Vec::new();
        let eval_error = |k: &Kernel, op: &Op, message: String| RunError::Eval {
            node: k.label.clone(),
            op: op.name().to_string(),
            message,
        };
        for (i, k) in plan.kernels.iter().enumerate() {
            let start = times.as_ref().map(|_| std::time::Instant::now());
            match (&k.kind, self.compiled.entries[i]) {
                // The shape of a symbolic value: its type at this call's values.
                (KernelKind::Reference { op: Op::Shape { start, end }, inputs, outputs }, _) => {
                    let dims: Vec<i64> = bound(&inputs[0].1)?.sizes()[*start..*end].iter().map(|&d| d as i64).collect();
                    let bytes = Tensor::from_vec(vec![dims.len()], dims).to_bytes();
                    // The arena slot was planned for exactly this type.
                    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.ptr(plan, outputs[0].0), bytes.len()) };
                }
                (KernelKind::Reference { op, inputs, outputs }, _) => {
                    let ts = inputs.iter().map(|(b, ty)| Ok(mem.read(plan, *b, &bound(ty)?))).collect::<Result<
                        Vec<Tensor>,
                        RunError,
                    >>(
                    )?;
                    let refs: Vec<&Tensor> = ts.iter().collect();
                    let op = match op.dims().iter().all(|d| d.is_known()) {
                        true => std::borrow::Cow::Borrowed(op),
                        false => {
                            let value = |s: &str| values.get(s).and_then(|&v| i64::try_from(v).ok());
                            let op = op.map_dims(|d| d.substitute(&value).map_err(|e| e.to_string()));
                            std::borrow::Cow::Owned(op.map_err(|m| eval_error(k, op_name(&k.kind), m))?)
                        }
                    };
                    let outs = egret_ir::eval_op(&op, &refs).map_err(|m| eval_error(k, &op, m))?;
                    let types = outputs.iter().map(|(_, ty)| bound(ty)).collect::<Result<Vec<Type>, RunError>>()?;
                    crate::steps::check_output_types(&outs, &types.iter().collect::<Vec<_>>())
                        .map_err(|m| eval_error(k, &op, m))?;
                    for ((b, _), t) in outputs.iter().zip(outs) {
                        let bytes = t.to_bytes();
                        // The arena slot was planned for this type (checked above).
                        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.ptr(plan, *b), bytes.len()) };
                    }
                }
                (_, Some(f)) => {
                    args.clear();
                    args.extend(self.operands[i].iter().map(|&b| mem.ptr(plan, b)));
                    // A symbolic kernel's sizes for this call after its
                    // operands, then the blocks that hold its sizes.
                    args.extend(setup.sizes[i].iter().map(|&v| v as usize as *mut u8));
                    args.extend(setup.blocks[i].iter().map(|w| w.as_ptr() as *mut u8));
                    let extent = setup.extents[i];
                    // The function was generated for exactly these operands.
                    let status = unsafe { pool::launch(f, args.as_ptr(), extent, setup.splits[i]) };
                    if status != 0 {
                        let message = match (&k.kind, status) {
                            (KernelKind::Gather(g), egret_backends::cpu::STATUS_INDEX_OUT_OF_RANGE) => {
                                let value = |s: &str| values.get(s).and_then(|&v| i64::try_from(v).ok());
                                let len = match (g.axis_len.known(), g.axis_len.eval(&value)) {
                                    (Some(n), _) => n.to_string(),
                                    (None, Ok(n)) => format!("{} = {n}", g.axis_len),
                                    (None, Err(_)) => g.axis_len.to_string(),
                                };
                                format!("gather index out of range for an axis of length {len}")
                            }
                            (KernelKind::Loop { op, .. }, egret_backends::cpu::STATUS_INDEX_OUT_OF_RANGE) => {
                                format!("{} index out of range", op.name())
                            }
                            _ => format!("kernel failed with status {status}"),
                        };
                        return Err(RunError::Eval { node: k.label.clone(), op: k.kind_name().to_string(), message });
                    }
                }
                (_, None) => unreachable!("native kernels are compiled"),
            }
            if let (Some(times), Some(start)) = (times.as_deref_mut(), start) {
                let kind = k.detailed_kind();
                times.push((kind, k.label.clone(), start.elapsed().as_secs_f64() * 1e3));
            }
        }
        let mut results: Vec<Option<Tensor>> = plan.outputs.iter().map(|_| None).collect();
        // Later outputs may name a direct output's buffer: read them first.
        for (i, (b, _)) in plan.outputs.iter().enumerate() {
            if !self.direct_outputs[i] {
                results[i] = Some(mem.read(plan, *b, &output_types[i]));
            }
        }
        for (i, mut v) in direct {
            let ty = &output_types[i];
            // The run's kernels wrote all `numel` elements (`Plan::direct_output`).
            unsafe { v.set_len(ty.numel()) };
            results[i] = Some(Tensor::from_vec(ty.sizes(), v));
        }
        Ok(results.into_iter().map(|t| t.expect("every output is read or direct")).collect())
    }
}

/// A type at a call's values of the symbols.
fn bound_type(ty: &Type, values: &Bindings) -> Result<Type, RunError> {
    match ty.is_known() {
        true => Ok(ty.clone()),
        false => ty.at(values).map_err(RunError::Shape),
    }
}

/// Bytes as 8-byte words, so the kernel library reads its blocks aligned.
fn words(bytes: Vec<u8>) -> Vec<u64> {
    bytes.chunks(8).map(|c| c.iter().rev().fold(0u64, |w, &b| (w << 8) | b as u64)).collect()
}

fn op_name(kind: &KernelKind) -> &Op {
    match kind {
        KernelKind::Reference { op, .. } | KernelKind::Loop { op, .. } => op,
        _ => unreachable!("only reference kernels have an op"),
    }
}
