//! The PTX executor: runs a plan compiled by `egret_backends::gpu` and
//! printed as PTX, on any `PtxDevice`: the CUDA driver (`CudaDevice`,
//! loaded at run time, so Egret builds and links with no CUDA installed),
//! or, in the tests, the PTX interpreter.
//!
//! Each kernel's module is loaded once. Weights are uploaded once, all
//! chunks back to back in one allocation (so a constant spanning chunks
//! is one range); the arena is one allocation; every step's parameter
//! words sit in one more. A run writes the inputs, launches every step in
//! order on one stream, and copies back the outputs and the error word.

use crate::steps::Sizing;
use crate::{Executable, RunError};
use egret_backends::gpu::form::{Kernel, Space};
use egret_backends::gpu::{ptx, tensor_of_words, words_of, ArenaLayout, GpuPlan, Place, Step, SymbolicGpuPlan};
use egret_ir::{Bindings, Tensor, Type};
use std::sync::Mutex;

/// What the PTX executor needs of a device. Addresses are device
/// pointers; one device runs one launch at a time, in order.
pub trait PtxDevice: Send + Sync {
    type Function: Send + Sync;
    fn name(&self) -> String;
    fn alloc(&self, bytes: usize) -> Result<u64, String>;
    /// Frees what `alloc` returned.
    fn free(&self, at: u64);
    fn upload(&self, at: u64, bytes: &[u8]) -> Result<(), String>;
    fn download(&self, at: u64, bytes: &mut [u8]) -> Result<(), String>;
    /// Loads a module's PTX and finds its entry.
    fn load(&self, ptx: &str, entry: &str) -> Result<Self::Function, String>;
    fn launch(&self, f: &Self::Function, grid: [u32; 3], threads: u32, args: &[u64]) -> Result<(), String>;
    /// Waits for every launch so far.
    fn synchronize(&self) -> Result<(), String>;
    /// Launches recorded once and replayed as one: a CUDA graph.
    type Recording: Send + Sync;
    /// Records `launches` (function, grid, threads, arguments), in order,
    /// without running them; `None` where the device has no recordings
    /// (each run then launches them one by one).
    fn record(&self, launches: &[LaunchOf<'_, Self::Function>]) -> Result<Option<Self::Recording>, String>;
    /// Runs a recording's launches, in order, after every launch so far.
    fn replay(&self, recording: &Self::Recording) -> Result<(), String>;
}

/// One launch as `PtxDevice::record` takes it: the function, its grid,
/// threads per block and arguments.
pub type LaunchOf<'a, F> = (&'a F, [u32; 3], u32, &'a [u64]);

struct Launch {
    function: usize,
    grid: [u32; 3],
    threads: u32,
    args: Vec<u64>,
}

/// What one set of the symbols' values runs (the one set of a bound plan):
/// the program at them, its arena, its functions and each step's launch.
struct Setup {
    values: Bindings,
    plan: GpuPlan,
    arena: u64,
    /// Per step, its launch (`None` for host steps).
    launches: Vec<Option<Launch>>,
    /// The parameter words' allocation, freed with the setup.
    params: u64,
}

/// What runs change: the current setup, the arena, and every module
/// loaded so far, by kernel (new values build the same kernels again).
struct State<F, R> {
    setup: Option<Setup>,
    arena: Option<(ArenaLayout, u64)>,
    /// Each kernel loaded so far, with its function.
    functions: Vec<(Kernel, F)>,
    /// The setup's runs of dispatches between host steps, each recorded
    /// at its first run and replayed after (by the index of its first
    /// step); emptied with the setup.
    recordings: Vec<(usize, R)>,
}

pub struct PtxExecutable<D: PtxDevice> {
    device: D,
    error: u64,
    weights: u64,
    /// Word offset of each weight chunk in the weights allocation.
    chunk_at: Vec<usize>,
    /// One run at a time: runs share the arena.
    state: Mutex<State<D::Function, D::Recording>>,
    /// For a plan that keeps symbols: what builds each values' program.
    sizing: Option<Sizing>,
}

impl<D: PtxDevice> Drop for PtxExecutable<D> {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = state.setup.take() {
            self.device.free(s.params);
            if state.arena.is_none() {
                self.device.free(s.arena);
            }
        }
        if let Some((_, arena)) = state.arena.take() {
            self.device.free(arena);
        }
        self.device.free(self.error);
        self.device.free(self.weights);
    }
}

fn bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl<D: PtxDevice> PtxExecutable<D> {
    pub fn new(device: D, plan: GpuPlan) -> Result<PtxExecutable<D>, String> {
        let exe = PtxExecutable::with_weights(device, &plan.weights, None)?;
        let arena = exe.device.alloc(plan.arena_words.max(1) * 4)?;
        let mut state = exe.state.lock().unwrap();
        let setup = exe.setup(&mut state, Bindings::new(), plan, arena);
        let setup = setup.inspect_err(|_| exe.device.free(arena))?;
        state.setup = Some(setup);
        drop(state);
        Ok(exe)
    }

    /// An executable for every value of `program`'s symbols: the weights
    /// are uploaded now; each run with new values builds the program at
    /// them, loading only kernels no earlier values had, and allocates the
    /// arena again only when the values pass its capacity.
    pub fn symbolic(device: D, program: SymbolicGpuPlan) -> Result<PtxExecutable<D>, String> {
        let weights = program.weights().clone();
        PtxExecutable::with_weights(device, &weights, Some(Sizing::new(program)))
    }

    fn with_weights(device: D, chunks: &[Vec<u32>], sizing: Option<Sizing>) -> Result<PtxExecutable<D>, String> {
        let error = device.alloc(4)?;
        let mut chunk_at = Vec::new();
        let mut all = Vec::new();
        for c in chunks {
            chunk_at.push(all.len());
            all.extend_from_slice(c);
        }
        let weights = device.alloc(all.len().max(1) * 4)?;
        device.upload(weights, &bytes(&all))?;
        let state = State { setup: None, arena: None, functions: Vec::new(), recordings: Vec::new() };
        Ok(PtxExecutable { device, error, weights, chunk_at, state: Mutex::new(state), sizing })
    }

    /// `plan`'s launches in `arena`, loading the kernels `state` lacks.
    fn setup(
        &self,
        state: &mut State<D::Function, D::Recording>,
        values: Bindings,
        plan: GpuPlan,
        arena: u64,
    ) -> Result<Setup, String> {
        let mut functions = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            let f = match state.functions.iter().position(|(known, _)| known == k) {
                Some(f) => f,
                None => {
                    let text = ptx::print(k);
                    let f = self
                        .device
                        .load(&text, &ptx::entry_name(k))
                        .map_err(|e| format!("kernel `{}`: {e}", k.name))?;
                    state.functions.push((k.clone(), f));
                    state.functions.len() - 1
                }
            };
            functions.push(f);
        }
        // Every step's parameter words, each block 16-byte aligned.
        let mut params: Vec<u32> = Vec::new();
        let mut param_at = Vec::new();
        for step in &plan.steps {
            param_at.push(params.len());
            if let Step::Dispatch { params: p, .. } = step {
                params.extend(p);
                params.resize(params.len().div_ceil(4) * 4 + 4, 0);
            }
        }
        let params_base = self.device.alloc(params.len().max(1) * 4)?;
        self.device.upload(params_base, &bytes(&params)).inspect_err(|_| self.device.free(params_base))?;
        let mut launches = Vec::new();
        for (i, step) in plan.steps.iter().enumerate() {
            let Step::Dispatch { kernel, grid, .. } = step else {
                launches.push(None);
                continue;
            };
            let args = plan.kernels[*kernel]
                .spaces()
                .into_iter()
                .map(|space| match space {
                    Space::Arena => arena,
                    Space::Error => self.error,
                    Space::Params => params_base + (param_at[i] * 4) as u64,
                    Space::Weights(c) => self.weights + (self.chunk_at[c as usize] * 4) as u64,
                    Space::WeightsSpan { .. } => unreachable!("spaces() binds a span's chunks"),
                })
                .collect();
            launches.push(Some(Launch {
                function: functions[*kernel],
                grid: *grid,
                threads: plan.kernels[*kernel].threads,
                args,
            }));
        }
        Ok(Setup { values, plan, arena, launches, params: params_base })
    }

    /// Makes the setup a run on `inputs` uses current: for a plan with
    /// symbols and new values, the program built at them.
    fn set_up_for(&self, state: &mut State<D::Function, D::Recording>, inputs: &[Tensor]) -> Result<(), RunError> {
        let Some(sizing) = &self.sizing else { return Ok(()) };
        let values = sizing.values(inputs)?;
        if state.setup.as_ref().is_some_and(|s| s.values == values) {
            return Ok(());
        }
        sizing.check(&values, inputs)?;
        let device = |message: String| RunError::Eval { node: "the whole graph".into(), op: "ptx".into(), message };
        if let Some(layout) = sizing.layout_for(state.arena.as_ref().map(|(l, _)| l), &values)? {
            let arena = self.device.alloc(layout.words.max(1) * 4).map_err(device)?;
            // The old arena goes with the setup that used it.
            if let Some(s) = state.setup.take() {
                state.recordings.clear();
                self.device.free(s.params);
            }
            if let Some((_, old)) = state.arena.replace((layout, arena)) {
                self.device.free(old);
            }
        }
        let (layout, arena) = state.arena.clone().expect("allocated above");
        let plan = sizing.at(&values, &layout)?;
        let setup = self.setup(state, values, plan, arena).map_err(device)?;
        state.recordings.clear();
        if let Some(old) = state.setup.replace(setup) {
            self.device.free(old.params);
        }
        Ok(())
    }

    /// The program the last run ran (or, for a bound plan, the one it runs).
    pub fn plan(&self) -> Option<GpuPlan> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.setup.as_ref().map(|s| s.plan.clone())
    }

    /// How many distinct kernels the executable has loaded.
    pub fn modules_loaded(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).functions.len()
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device address of a place.
    fn address(&self, setup: &Setup, p: Place) -> u64 {
        let base = match p.space {
            Space::Arena => setup.arena,
            Space::Error => self.error,
            Space::Weights(c) | Space::WeightsSpan { first: c, .. } => {
                self.weights + (self.chunk_at[c as usize] * 4) as u64
            }
            Space::Params => unreachable!("parameters are not values"),
        };
        base + (p.word * 4) as u64
    }

    fn read(&self, setup: &Setup, p: Place, ty: &Type) -> Result<Tensor, String> {
        let mut buf = vec![0u8; ty.numel() * 4];
        if !buf.is_empty() {
            self.device.download(self.address(setup, p), &mut buf)?;
        }
        let words: Vec<u32> = buf.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(tensor_of_words(ty, &words))
    }

    fn write(&self, setup: &Setup, p: Place, t: &Tensor, what: &str) -> Result<(), String> {
        let words = words_of(t, what).map_err(|e| e.to_string())?;
        if !words.is_empty() {
            self.device.upload(self.address(setup, p), &bytes(&words))?;
        }
        Ok(())
    }

    /// One run: every step in order, or, when `times` is given (profiling),
    /// each timed after a synchronisation.
    fn run_steps(
        &self,
        inputs: &[Tensor],
        mut times: Option<&mut Vec<(String, String, f64)>>,
    ) -> Result<Vec<Tensor>, RunError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.set_up_for(&mut state, inputs)?;
        let State { functions, setup, recordings, .. } = &mut *state;
        let setup = setup.as_ref().expect("set up above");
        let device_error =
            |node: &str, op: &str, message: String| RunError::Eval { node: node.into(), op: op.into(), message };
        for ((place, ty), t) in setup.plan.inputs.iter().zip(inputs) {
            self.write(setup, *place, t, "an input")
                .map_err(|m| device_error(&format!("input of {ty}"), "upload", m))?;
        }
        self.device.upload(self.error, &[0; 4]).map_err(|m| device_error("the error word", "upload", m))?;
        let steps = &setup.plan.steps;
        let mut i = 0;
        while i < steps.len() {
            let start = std::time::Instant::now();
            match &steps[i] {
                Step::Dispatch { label, kind, .. } if times.is_some() => {
                    let times = times.as_deref_mut().expect("profiling");
                    let l = setup.launches[i].as_ref().expect("a dispatch has a launch");
                    self.device
                        .launch(&functions[l.function].1, l.grid, l.threads, &l.args)
                        .and_then(|()| self.device.synchronize())
                        .map_err(|m| device_error(label, kind, m))?;
                    times.push((kind.clone(), label.clone(), start.elapsed().as_secs_f64() * 1e3));
                    i += 1;
                }
                Step::Dispatch { label, kind, .. } => {
                    // The dispatches up to the next host step, replayed as
                    // one after the first run (a CUDA graph: one launch, not
                    // hundreds, for a model at batch 1).
                    let end = (i..steps.len()).find(|&j| matches!(steps[j], Step::Host { .. })).unwrap_or(steps.len());
                    let fail = |m: String| device_error(label, kind, m);
                    if !recordings.iter().any(|(first, _)| *first == i) {
                        let launches: Vec<_> = setup.launches[i..end]
                            .iter()
                            .flatten()
                            .map(|l| (&functions[l.function].1, l.grid, l.threads, l.args.as_slice()))
                            .collect();
                        match self.device.record(&launches).map_err(fail)? {
                            Some(r) => recordings.push((i, r)),
                            None => {
                                for (f, grid, threads, args) in launches {
                                    self.device.launch(f, grid, threads, args).map_err(fail)?;
                                }
                                i = end;
                                continue;
                            }
                        }
                    }
                    let (_, r) = recordings.iter().find(|(first, _)| *first == i).expect("recorded above");
                    self.device.replay(r).map_err(fail)?;
                    i = end;
                }
                Step::Host { op, inputs, outputs, label } => {
                    let fail = |m: String| device_error(label, op.name(), m);
                    self.device.synchronize().map_err(fail)?;
                    let ts: Vec<Tensor> =
                        inputs.iter().map(|(p, t)| self.read(setup, *p, t)).collect::<Result<_, _>>().map_err(fail)?;
                    let types: Vec<&Type> = outputs.iter().map(|(_, t)| t).collect();
                    let outs = crate::steps::eval_host(op, label, &ts, &types)?;
                    for ((p, _), t) in outputs.iter().zip(&outs) {
                        self.write(setup, *p, t, "a host result").map_err(fail)?;
                    }
                    if let Some(times) = times.as_deref_mut() {
                        times.push((format!("host:{}", op.name()), label.clone(), start.elapsed().as_secs_f64() * 1e3));
                    }
                    i += 1;
                }
            }
        }
        self.device.synchronize().map_err(|m| device_error("the whole graph", "ptx", m))?;
        let code = self
            .read(setup, Place { space: Space::Error, word: 0 }, &Type::new(egret_ir::DType::I32, Vec::<usize>::new()))
            .map_err(|m| device_error("the error word", "download", m))?
            .to_i64_vec()[0] as usize;
        if let Some(e) = crate::steps::failure(&setup.plan, code) {
            return Err(e);
        }
        setup
            .plan
            .outputs
            .iter()
            .map(|(p, t)| self.read(setup, *p, t).map_err(|m| device_error("an output", "download", m)))
            .collect()
    }
}

impl<D: PtxDevice> Executable for PtxExecutable<D> {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        self.run_steps(&inputs, None)
    }

    fn device_name(&self) -> Option<String> {
        Some(self.device.name())
    }

    fn arena_bytes(&self) -> Option<usize> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.setup.as_ref().map(|s| s.plan.arena_words * 4)
    }

    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, String, f64)>, RunError> {
        let mut times = Vec::new();
        self.run_steps(&inputs, Some(&mut times))?;
        Ok(times)
    }
}
