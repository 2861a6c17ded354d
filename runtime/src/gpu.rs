//! The WebGPU executor: runs a plan compiled by `egret_backends::gpu` and
//! printed as WGSL, through wgpu (its Vulkan backend, the one this build
//! enables: a GPU's driver, or Mesa's lavapipe in CI).
//!
//! Weights are uploaded once, when the executable is created; the arena is
//! one device buffer. A run writes the inputs into the arena, records every
//! dispatch into one command encoder (split only around host steps), and
//! reads back the outputs and the error word in one copy.

use crate::steps::Sizing;
use crate::{Executable, RunError};
use egret_backends::gpu::form::{Kernel, Space};
use egret_backends::gpu::{tensor_of_words, words_of, ArenaLayout, GpuPlan, Place, Step, SymbolicGpuPlan};
use egret_ir::{Bindings, Tensor, Type};
use std::sync::{Arc, Mutex, OnceLock};

/// What to install when there is no adapter.
pub const NO_ADAPTER_HINT: &str = "no WebGPU adapter found: install a GPU driver, or Mesa's software Vulkan \
     (`apt-get install mesa-vulkan-drivers libvulkan1`)";

/// An opened adapter and device, shared by every executable of the process.
pub struct WgpuDevice {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// The adapter's name and backend, for reports.
    pub name: String,
    pub limits: egret_backends::gpu::Limits,
    timestamps: bool,
    params_align: usize,
}

impl WgpuDevice {
    /// The process's device, opened on first use.
    pub fn shared() -> Result<Arc<WgpuDevice>, String> {
        static DEVICE: OnceLock<Result<Arc<WgpuDevice>, String>> = OnceLock::new();
        DEVICE.get_or_init(|| WgpuDevice::open().map(Arc::new)).clone()
    }

    fn open() -> Result<WgpuDevice, String> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| format!("{NO_ADAPTER_HINT} ({e})"))?;
        let info = adapter.get_info();
        let have = adapter.limits();
        // Request what the kernels need: the portable defaults, with the
        // adapter's own binding and buffer sizes (the arena and the weight
        // chunks are a few large buffers), storage-buffer count and
        // workgroup memory (kernels are shaped to it and checked against it).
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: have.max_storage_buffer_binding_size,
            max_buffer_size: have.max_buffer_size,
            max_storage_buffers_per_shader_stage: have.max_storage_buffers_per_shader_stage,
            max_compute_workgroup_storage_size: have.max_compute_workgroup_storage_size,
            ..wgpu::Limits::downlevel_defaults()
        };
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let features = if timestamps { wgpu::Features::TIMESTAMP_QUERY } else { wgpu::Features::empty() };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("egret"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| format!("the adapter `{}` refused a device: {e}", info.name))?;
        let binding = (limits.max_storage_buffer_binding_size as u64).min(limits.max_buffer_size) as usize;
        Ok(WgpuDevice {
            device,
            queue,
            name: format!("{} ({:?})", info.name, info.backend),
            limits: egret_backends::gpu::Limits {
                // Whole words, below the limit.
                max_binding_bytes: binding / 256 * 256,
                max_groups_per_dim: limits.max_compute_workgroups_per_dimension,
                max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
                max_workgroup_bytes: limits.max_compute_workgroup_storage_size as usize,
                ..Default::default()
            },
            timestamps,
            params_align: limits.min_storage_buffer_offset_alignment as usize,
        })
    }
}

struct Dispatch {
    pipeline: usize,
    bind_group: wgpu::BindGroup,
    grid: [u32; 3],
}

/// What one set of the symbols' values runs (the one set of a bound plan):
/// the program at them, the arena it runs in, its pipelines, and each
/// step's dispatch with its parameters bound.
struct Setup {
    values: Bindings,
    plan: GpuPlan,
    arena: Arc<wgpu::Buffer>,
    pipelines: Vec<Arc<wgpu::ComputePipeline>>,
    /// Per step, its dispatch (`None` for host steps).
    dispatches: Vec<Option<Dispatch>>,
}

/// What runs change: the current setup, the arena, and every pipeline
/// compiled so far by its kernel (a program with symbols builds its
/// kernels again for new values; they are the same shaders).
#[derive(Default)]
struct State {
    setup: Option<Arc<Setup>>,
    arena: Option<(ArenaLayout, Arc<wgpu::Buffer>)>,
    pipelines: Vec<(Kernel, Arc<wgpu::ComputePipeline>)>,
}

pub struct WgpuExecutable {
    gpu: Arc<WgpuDevice>,
    weights: Vec<wgpu::Buffer>,
    error: wgpu::Buffer,
    /// Device time of the last run, where the adapter has timestamps.
    last_device_ms: Mutex<Option<f64>>,
    timer: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    /// One run at a time: runs share the arena.
    state: Mutex<State>,
    /// For a plan that keeps symbols: what builds each values' program.
    sizing: Option<Sizing>,
}

/// Bytes of a word slice.
fn bytes(words: &[u32]) -> &[u8] {
    // u32 has no padding and any bit pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 4) }
}

const STORAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

fn storage_buffer(d: &wgpu::Device, label: &str, words: usize) -> wgpu::Buffer {
    d.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (words.max(1) * 4) as u64,
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

impl WgpuExecutable {
    /// Creates the pipelines from `shaders` (one WGSL text per kernel of
    /// the plan), uploads the weights and lays out the arena.
    pub fn new(gpu: Arc<WgpuDevice>, plan: GpuPlan, shaders: &[String]) -> Result<WgpuExecutable, String> {
        let exe = WgpuExecutable::with_weights(gpu, &plan.weights, None)?;
        let arena = Arc::new(storage_buffer(&exe.gpu.device, "arena", plan.arena_words));
        let pipelines: Vec<Arc<wgpu::ComputePipeline>> =
            plan.kernels.iter().zip(shaders).map(|(k, source)| exe.pipeline(k, source)).collect::<Result<_, _>>()?;
        let compiled = plan.kernels.iter().cloned().zip(pipelines.iter().cloned()).collect();
        let setup = exe.setup(Bindings::new(), plan, arena, pipelines)?;
        let mut state = exe.state.lock().unwrap();
        (state.setup, state.pipelines) = (Some(Arc::new(setup)), compiled);
        drop(state);
        Ok(exe)
    }

    /// An executable for every value of `program`'s symbols: the weights
    /// are uploaded now; each run with new values builds the program at
    /// them, compiling only kernels no earlier values had, and lays the
    /// arena out again only when the values pass its capacity.
    pub fn symbolic(gpu: Arc<WgpuDevice>, program: SymbolicGpuPlan) -> Result<WgpuExecutable, String> {
        let weights = program.weights().clone();
        WgpuExecutable::with_weights(gpu, &weights, Some(Sizing::new(program)))
    }

    fn with_weights(
        gpu: Arc<WgpuDevice>,
        chunks: &[Vec<u32>],
        sizing: Option<Sizing>,
    ) -> Result<WgpuExecutable, String> {
        let d = &gpu.device;
        let scope = d.push_error_scope(wgpu::ErrorFilter::Validation);
        let error = storage_buffer(d, "error word", 1);
        let weights: Vec<wgpu::Buffer> = chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let b = storage_buffer(d, &format!("weights{i}"), chunk.len());
                gpu.queue.write_buffer(&b, 0, bytes(chunk));
                b
            })
            .collect();
        let timer = gpu.timestamps.then(|| {
            let set = d.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("run time"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let buf = d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (set, buf)
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("the device refused the weights: {e}"));
        }
        Ok(WgpuExecutable {
            gpu,
            weights,
            error,
            last_device_ms: Mutex::new(None),
            timer,
            state: Mutex::new(State::default()),
            sizing,
        })
    }

    /// The pipeline of `kernel` from its WGSL `source`.
    fn pipeline(
        &self,
        kernel: &egret_backends::gpu::form::Kernel,
        source: &str,
    ) -> Result<Arc<wgpu::ComputePipeline>, String> {
        let d = &self.gpu.device;
        let scope = d.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&kernel.name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&kernel.name),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("the device refused kernel `{}`: {e}", kernel.name));
        }
        Ok(Arc::new(pipeline))
    }

    /// `plan`'s dispatches: every step's parameters in one buffer, each
    /// at an aligned offset, and its bind group.
    fn setup(
        &self,
        values: Bindings,
        plan: GpuPlan,
        arena: Arc<wgpu::Buffer>,
        pipelines: Vec<Arc<wgpu::ComputePipeline>>,
    ) -> Result<Setup, String> {
        let d = &self.gpu.device;
        let scope = d.push_error_scope(wgpu::ErrorFilter::Validation);
        let align = self.gpu.params_align.max(4) / 4;
        let mut params: Vec<u32> = Vec::new();
        let mut param_at = Vec::new();
        for step in &plan.steps {
            if let Step::Dispatch { params: p, .. } = step {
                param_at.push(params.len());
                params.extend(p);
                params.resize(params.len().div_ceil(align) * align + align, 0);
            } else {
                param_at.push(0);
            }
        }
        let params_buffer = storage_buffer(d, "params", params.len());
        self.gpu.queue.write_buffer(&params_buffer, 0, bytes(&params));
        let mut dispatches = Vec::new();
        for (i, step) in plan.steps.iter().enumerate() {
            let Step::Dispatch { kernel, params: p, grid, .. } = step else {
                dispatches.push(None);
                continue;
            };
            let spaces = plan.kernels[*kernel].spaces();
            let entries: Vec<wgpu::BindGroupEntry> = spaces
                .iter()
                .map(|&space| {
                    let resource = match space {
                        Space::Arena => arena.as_entire_binding(),
                        Space::Error => self.error.as_entire_binding(),
                        Space::Weights(c) => self.weights[c as usize].as_entire_binding(),
                        Space::WeightsSpan { .. } => unreachable!("spaces() binds a span's chunks"),
                        Space::Params => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params_buffer,
                            offset: (param_at[i] * 4) as u64,
                            size: wgpu::BufferSize::new((p.len().max(1) * 4) as u64),
                        }),
                    };
                    wgpu::BindGroupEntry { binding: egret_backends::gpu::wgsl::binding(space), resource }
                })
                .collect();
            let bind_group = d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipelines[*kernel].get_bind_group_layout(0),
                entries: &entries,
            });
            dispatches.push(Some(Dispatch { pipeline: *kernel, bind_group, grid: *grid }));
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("the device refused the compiled program: {e}"));
        }
        Ok(Setup { values, plan, arena, pipelines, dispatches })
    }

    /// The setup a run on `inputs` uses: the current one, or, for a plan
    /// with symbols and new values, the program built at them.
    fn setup_for(&self, state: &mut State, inputs: &[Tensor]) -> Result<Arc<Setup>, RunError> {
        let Some(sizing) = &self.sizing else {
            return Ok(state.setup.clone().expect("a bound executable has its setup from the start"));
        };
        let values = sizing.values(inputs)?;
        if let Some(s) = state.setup.as_ref().filter(|s| s.values == values) {
            return Ok(s.clone());
        }
        sizing.check(&values, inputs)?;
        let device = |message: String| RunError::Eval { node: "the whole graph".into(), op: "wgsl".into(), message };
        if let Some(layout) = sizing.layout_for(state.arena.as_ref().map(|(l, _)| l), &values)? {
            let buffer = Arc::new(storage_buffer(&self.gpu.device, "arena", layout.words));
            state.arena = Some((layout, buffer));
        }
        let (layout, arena) = state.arena.clone().expect("laid out above");
        let plan = sizing.at(&values, &layout)?;
        let mut pipelines = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            if let Some((_, p)) = state.pipelines.iter().find(|(known, _)| known == k) {
                pipelines.push(p.clone());
                continue;
            }
            let text = egret_backends::gpu::wgsl::print(k);
            egret_backends::gpu::wgsl::validate(&text).map_err(|e| {
                device(format!("kernel `{}` fails WGSL validation ({e}); this is a compiler bug", k.name))
            })?;
            let p = self.pipeline(k, &text).map_err(device)?;
            state.pipelines.push((k.clone(), p.clone()));
            pipelines.push(p);
        }
        let setup = Arc::new(self.setup(values, plan, arena, pipelines).map_err(device)?);
        state.setup = Some(setup.clone());
        Ok(setup)
    }

    /// How many distinct pipelines the executable has compiled.
    pub fn pipelines_compiled(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).pipelines.len()
    }

    fn buffer_of<'a>(&'a self, setup: &'a Setup, space: Space) -> &'a wgpu::Buffer {
        match space {
            Space::Arena => &setup.arena,
            Space::Error => &self.error,
            Space::Weights(c) => &self.weights[c as usize],
            Space::WeightsSpan { first, .. } => &self.weights[first as usize],
            Space::Params => unreachable!("parameters are never read back"),
        }
    }

    /// Copies word ranges of device memory to the host, after everything
    /// submitted so far.
    fn read(
        &self,
        setup: &Setup,
        mut encoder: wgpu::CommandEncoder,
        ranges: &[(Space, usize, usize)],
    ) -> Result<Vec<Vec<u32>>, String> {
        let total: usize = ranges.iter().map(|r| r.2).sum();
        let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: (total.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut at = 0u64;
        for &(space, word, len) in ranges {
            if len > 0 {
                encoder.copy_buffer_to_buffer(
                    self.buffer_of(setup, space),
                    (word * 4) as u64,
                    &staging,
                    at,
                    Some((len * 4) as u64),
                );
            }
            at += (len * 4) as u64;
        }
        let timed = self.timer.as_ref().map(|(set, buf)| {
            encoder.resolve_query_set(set, 0..2, buf, 0);
            buf
        });
        let times = timed.map(|buf| {
            let t = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps readback"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            encoder.copy_buffer_to_buffer(buf, 0, &t, 0, Some(16));
            t
        });
        self.gpu.queue.submit([encoder.finish()]);
        let mapped = |b: &wgpu::Buffer| -> Result<Vec<u32>, String> {
            let (tx, rx) = std::sync::mpsc::channel();
            b.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
            self.gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| format!("the device failed: {e}"))?;
            rx.recv().map_err(|e| e.to_string())?.map_err(|e| format!("reading back failed: {e}"))?;
            let view = b.get_mapped_range(..).map_err(|e| format!("reading back failed: {e}"))?;
            let words = view.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            drop(view);
            b.unmap();
            Ok(words)
        };
        let all = mapped(&staging)?;
        if let Some(t) = times {
            let w = mapped(&t)?;
            let (start, end) = (w[0] as u64 | (w[1] as u64) << 32, w[2] as u64 | (w[3] as u64) << 32);
            let ns = end.saturating_sub(start) as f64 * self.gpu.queue.get_timestamp_period() as f64;
            *self.last_device_ms.lock().unwrap() = Some(ns / 1e6);
        }
        let mut out = Vec::new();
        let mut at = 0;
        for &(_, _, len) in ranges {
            out.push(all[at..at + len].to_vec());
            at += len;
        }
        Ok(out)
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") })
    }

    /// The words of a constant, from the host's copy (a constant that
    /// spans chunks is not one device range).
    fn constant_words(setup: &Setup, place: Place, len: usize) -> Option<Vec<u32>> {
        let (first, chunk_words) = match place.space {
            Space::Weights(c) => (c as usize, usize::MAX),
            Space::WeightsSpan { first, chunk_words, .. } => (first as usize, chunk_words as usize),
            _ => return None,
        };
        let chunks = &setup.plan.weights[first..];
        Some(
            (place.word..place.word + len)
                .map(
                    |i| if chunk_words == usize::MAX { chunks[0][i] } else { chunks[i / chunk_words][i % chunk_words] },
                )
                .collect(),
        )
    }

    /// Reads `values` (places and types) after the work in `encoder`.
    fn read_values(
        &self,
        setup: &Setup,
        encoder: wgpu::CommandEncoder,
        values: &[(Place, Type)],
    ) -> Result<Vec<Tensor>, String> {
        // Constants come from the host's copy; the rest in one readback.
        let ranges: Vec<_> = values
            .iter()
            .map(|(p, t)| match Self::constant_words(setup, *p, t.numel()) {
                Some(_) => (Space::Arena, 0, 0),
                None => (p.space, p.word, t.numel()),
            })
            .collect();
        let read = self.read(setup, encoder, &ranges)?;
        Ok(values
            .iter()
            .zip(read)
            .map(|((p, t), w)| tensor_of_words(t, &Self::constant_words(setup, *p, t.numel()).unwrap_or(w)))
            .collect())
    }

    /// One run: the dispatches between host steps in one compute pass, or,
    /// when `times` is given (profiling), each in its own and timed.
    fn run_steps(
        &self,
        inputs: &[Tensor],
        mut times: Option<&mut Vec<(String, String, f64)>>,
    ) -> Result<Vec<Tensor>, RunError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let setup = self.setup_for(&mut state, inputs)?;
        let setup = &*setup;
        let device_error =
            |message: String| RunError::Eval { node: "the whole graph".into(), op: "wgsl".into(), message };
        for ((place, ty), t) in setup.plan.inputs.iter().zip(inputs) {
            let words = words_of(t, "an input").map_err(|e| RunError::Eval {
                node: format!("input of {ty}"),
                op: "upload".into(),
                message: e.to_string(),
            })?;
            self.gpu.queue.write_buffer(&setup.arena, (place.word * 4) as u64, bytes(&words));
        }
        self.gpu.queue.write_buffer(&self.error, 0, bytes(&[0]));
        let mut encoder = self.encoder();
        let mut i = 0;
        let steps = &setup.plan.steps;
        while i < steps.len() {
            match &steps[i] {
                Step::Host { op, inputs, outputs, label } => {
                    let start = std::time::Instant::now();
                    let done = std::mem::replace(&mut encoder, self.encoder());
                    let ts = self.read_values(setup, done, inputs).map_err(device_error)?;
                    let types: Vec<&Type> = outputs.iter().map(|(_, t)| t).collect();
                    let outs = crate::steps::eval_host(op, label, &ts, &types)?;
                    for ((place, _), t) in outputs.iter().zip(outs) {
                        let words = words_of(&t, "a host result").map_err(|e| RunError::Eval {
                            node: label.clone(),
                            op: op.name().to_string(),
                            message: e.to_string(),
                        })?;
                        self.gpu.queue.write_buffer(&setup.arena, (place.word * 4) as u64, bytes(&words));
                    }
                    if let Some(times) = times.as_deref_mut() {
                        times.push((format!("host:{}", op.name()), label.clone(), start.elapsed().as_secs_f64() * 1e3));
                    }
                    i += 1;
                }
                Step::Dispatch { .. } => {
                    // Every dispatch up to the next host step, in one pass
                    // (one per dispatch when profiling, each timed alone).
                    let end = if times.is_some() {
                        i + 1
                    } else {
                        (i..steps.len()).find(|&j| matches!(steps[j], Step::Host { .. })).unwrap_or(steps.len())
                    };
                    let whole_run = i == 0 && end == steps.len();
                    let start = std::time::Instant::now();
                    {
                        let timestamp_writes = match (&self.timer, whole_run) {
                            (Some((set, _)), true) => Some(wgpu::ComputePassTimestampWrites {
                                query_set: set,
                                beginning_of_pass_write_index: Some(0),
                                end_of_pass_write_index: Some(1),
                            }),
                            _ => None,
                        };
                        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some("kernels"),
                            timestamp_writes,
                        });
                        for d in setup.dispatches[i..end].iter().flatten() {
                            pass.set_pipeline(&setup.pipelines[d.pipeline]);
                            pass.set_bind_group(0, &d.bind_group, &[]);
                            pass.dispatch_workgroups(d.grid[0], d.grid[1], d.grid[2]);
                        }
                    }
                    if let (Some(times), Step::Dispatch { kind, label, .. }) = (times.as_deref_mut(), &steps[i]) {
                        let done = std::mem::replace(&mut encoder, self.encoder());
                        self.read(setup, done, &[]).map_err(device_error)?;
                        times.push((kind.clone(), label.clone(), start.elapsed().as_secs_f64() * 1e3));
                    }
                    i = end;
                }
            }
        }
        let error_word = (Place { space: Space::Error, word: 0 }, Type::new(egret_ir::DType::I32, Vec::<usize>::new()));
        let mut values = vec![error_word];
        values.extend(setup.plan.outputs.iter().cloned());
        let mut read = self.read_values(setup, encoder, &values).map_err(device_error)?;
        if let Some(e) = crate::steps::failure(&setup.plan, read[0].to_i64_vec()[0] as usize) {
            return Err(e);
        }
        Ok(read.drain(1..).collect())
    }
}

impl Executable for WgpuExecutable {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        self.run_steps(&inputs, None)
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

    fn device_ms(&self) -> Option<f64> {
        *self.last_device_ms.lock().unwrap()
    }

    fn device_name(&self) -> Option<String> {
        Some(self.gpu.name.clone())
    }
}
