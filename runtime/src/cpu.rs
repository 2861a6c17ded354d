//! The CPU executor: runs a Cranelift-compiled plan.

use crate::{Executable, RunError};
use egret_backends::cpu::kernels::pool::{self, Pool, Split};
use egret_backends::cpu::{any_kernel_splits, parallel_extent, split_of, CompiledPlan};
use egret_backends::plan::{BufferId, KernelKind, Storage};
use egret_ir::{Tensor, Type};

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

    fn from_bytes(bytes: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(bytes.len());
        b.bytes_mut().copy_from_slice(bytes);
        b
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
    /// The inputs, copied in aligned.
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
    /// Constant buffers, converted to bytes once at compile time.
    constants: Vec<Option<AlignedBuf>>,
    /// Per kernel, the buffers of its operands in ABI order.
    operands: Vec<Vec<BufferId>>,
    /// Per kernel, how the scheduler may split it.
    splits: Vec<Split>,
    /// Per graph output, whether the kernels write it straight into the
    /// tensor returned (see `Plan::direct_output`).
    direct_outputs: Vec<bool>,
}

impl CpuExecutable {
    /// Wraps a compiled plan; large kernels split across `threads` threads.
    pub fn new(compiled: CompiledPlan, threads: usize) -> CpuExecutable {
        let plan = &compiled.plan;
        let splits: Vec<Split> = plan.kernels.iter().map(|k| split_of(&k.kind)).collect();
        let pool = Pool::new(if any_kernel_splits(plan) { threads.max(1) } else { 1 });
        let used = plan.used_buffers();
        let constants = plan
            .buffers
            .iter()
            .zip(used)
            .map(|(b, used)| match (&b.storage, used) {
                (Storage::Constant(t), true) => Some(AlignedBuf::from_bytes(&t.to_bytes())),
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
        CpuExecutable {
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
    inputs: &'a [AlignedBuf],
    constants: &'a [Option<AlignedBuf>],
    arena: *mut u8,
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
            Storage::Input(i) => self.inputs[*i].ptr(),
            Storage::Constant(_) => self.constants[b].as_ref().expect("constants are converted up front").ptr(),
            // Offsets come from the memory plan, inside the arena.
            Storage::Arena { offset } => unsafe { self.arena.add(*offset) },
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
        self.pool.install(|| self.execute(inputs, None))
    }

    fn arena_bytes(&self) -> Option<usize> {
        Some(self.compiled.plan.arena_bytes)
    }

    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, String, f64)>, RunError> {
        let mut times = Vec::with_capacity(self.compiled.plan.kernels.len());
        self.pool.install(|| self.execute(inputs, Some(&mut times)))?;
        Ok(times)
    }
}

impl CpuExecutable {
    /// Runs the plan; with `times`, records each kernel's duration.
    fn execute(
        &self,
        inputs: Vec<Tensor>,
        times: Option<&mut Vec<(String, String, f64)>>,
    ) -> Result<Vec<Tensor>, RunError> {
        let plan = &self.compiled.plan;
        let mut ws = self
            .workspaces
            .lock()
            .ok()
            .and_then(|mut w| w.pop())
            .unwrap_or_else(|| Workspace { arena: AlignedBuf::zeroed(plan.arena_bytes), inputs: Vec::new() });
        ws.inputs.resize_with(inputs.len(), || AlignedBuf::zeroed(0));
        for (buf, t) in ws.inputs.iter_mut().zip(&inputs) {
            let len = t.numel() * t.dtype().size_bytes();
            if buf.len != len {
                *buf = AlignedBuf::zeroed(len);
            }
            t.write_bytes(buf.bytes_mut());
        }
        let result = self.execute_in(plan, &ws.inputs, &ws.arena, times);
        if let Ok(mut w) = self.workspaces.lock() {
            w.push(ws);
        }
        result
    }

    fn execute_in(
        &self,
        plan: &egret_backends::Plan,
        inputs: &[AlignedBuf],
        arena: &AlignedBuf,
        mut times: Option<&mut Vec<(String, String, f64)>>,
    ) -> Result<Vec<Tensor>, RunError> {
        // The direct outputs' memory: allocated, not initialised, since the
        // run writes every element (`Plan::direct_output`).
        let mut direct: Vec<(usize, Vec<f32>)> = self
            .direct_outputs
            .iter()
            .enumerate()
            .filter(|(_, &d)| d)
            .map(|(i, _)| (i, Vec::with_capacity(plan.outputs[i].1.numel())))
            .collect();
        let redirected: Vec<(BufferId, *mut u8)> =
            direct.iter_mut().map(|(i, v)| (plan.outputs[*i].0, v.as_mut_ptr() as *mut u8)).collect();
        let mem = Memory { inputs, constants: &self.constants, arena: arena.ptr(), outputs: &redirected };
        let mut args: Vec<*mut u8> = Vec::new();
        for (i, k) in plan.kernels.iter().enumerate() {
            let start = times.as_ref().map(|_| std::time::Instant::now());
            match (&k.kind, self.compiled.entries[i]) {
                (KernelKind::Reference { op, inputs, outputs }, _) => {
                    let ts: Vec<Tensor> = inputs.iter().map(|(b, ty)| mem.read(plan, *b, ty)).collect();
                    let refs: Vec<&Tensor> = ts.iter().collect();
                    let outs = egret_ir::eval_op(op, &refs).map_err(|message| RunError::Eval {
                        node: k.label.clone(),
                        op: op.name().to_string(),
                        message,
                    })?;
                    for ((b, _), t) in outputs.iter().zip(outs) {
                        let bytes = t.to_bytes();
                        // The arena slot was planned for exactly this type.
                        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.ptr(plan, *b), bytes.len()) };
                    }
                }
                (kind, Some(f)) => {
                    args.clear();
                    args.extend(self.operands[i].iter().map(|&b| mem.ptr(plan, b)));
                    let extent = parallel_extent(kind) as i64;
                    // The function was generated for exactly these operands.
                    let status = unsafe { pool::launch(f, args.as_ptr(), extent, self.splits[i]) };
                    if status != 0 {
                        let message = match (&k.kind, status) {
                            (KernelKind::Gather(g), egret_backends::cpu::STATUS_INDEX_OUT_OF_RANGE) => {
                                format!("gather index out of range for an axis of length {}", g.axis_len)
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
        for (i, (b, ty)) in plan.outputs.iter().enumerate() {
            if !self.direct_outputs[i] {
                results[i] = Some(mem.read(plan, *b, ty));
            }
        }
        for (i, mut v) in direct {
            let ty = &plan.outputs[i].1;
            // The run's kernels wrote all `numel` elements (`Plan::direct_output`).
            unsafe { v.set_len(ty.numel()) };
            results[i] = Some(Tensor::from_vec(ty.sizes(), v));
        }
        Ok(results.into_iter().map(|t| t.expect("every output is read or direct")).collect())
    }
}
