//! The WebGPU executor: runs a plan compiled by `egret_backends::gpu` and
//! printed as WGSL, through wgpu (its Vulkan backend, the one this build
//! enables: a GPU's driver, or Mesa's lavapipe in CI).
//!
//! Weights are uploaded once, when the executable is created; the arena is
//! one device buffer. A run writes the inputs into the arena, records every
//! dispatch into one command encoder (split only around host steps), and
//! reads back the outputs and the error word in one copy.

use crate::{Executable, RunError};
use egret_backends::gpu::form::Space;
use egret_backends::gpu::{tensor_of_words, words_of, GpuPlan, Place, Step};
use egret_ir::{Tensor, Type};
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
        // chunks are a few large buffers) and storage-buffer count.
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: have.max_storage_buffer_binding_size,
            max_buffer_size: have.max_buffer_size,
            max_storage_buffers_per_shader_stage: have.max_storage_buffers_per_shader_stage,
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

pub struct WgpuExecutable {
    gpu: Arc<WgpuDevice>,
    plan: GpuPlan,
    arena: wgpu::Buffer,
    weights: Vec<wgpu::Buffer>,
    error: wgpu::Buffer,
    pipelines: Vec<wgpu::ComputePipeline>,
    /// Per step, its dispatch (`None` for host steps).
    dispatches: Vec<Option<Dispatch>>,
    /// Device time of the last run, where the adapter has timestamps.
    last_device_ms: Mutex<Option<f64>>,
    timer: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    /// One run at a time: runs share the arena.
    running: Mutex<()>,
}

/// Bytes of a word slice.
fn bytes(words: &[u32]) -> &[u8] {
    // u32 has no padding and any bit pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 4) }
}

impl WgpuExecutable {
    /// Creates the pipelines from `shaders` (one WGSL text per kernel of
    /// the plan), uploads the weights and lays out the arena.
    pub fn new(gpu: Arc<WgpuDevice>, plan: GpuPlan, shaders: &[String]) -> Result<WgpuExecutable, String> {
        let d = &gpu.device;
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let buffer = |label: &str, words: usize| {
            d.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: (words.max(1) * 4) as u64,
                usage: storage,
                mapped_at_creation: false,
            })
        };
        let scope = d.push_error_scope(wgpu::ErrorFilter::Validation);
        let arena = buffer("arena", plan.arena_words);
        let error = buffer("error word", 1);
        let weights: Vec<wgpu::Buffer> = plan
            .weights
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let b = buffer(&format!("weights{i}"), chunk.len());
                gpu.queue.write_buffer(&b, 0, bytes(chunk));
                b
            })
            .collect();
        let pipelines: Vec<wgpu::ComputePipeline> = plan
            .kernels
            .iter()
            .zip(shaders)
            .map(|(k, source)| {
                let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&k.name),
                    source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
                });
                d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&k.name),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                })
            })
            .collect();
        // Every dispatch's parameters in one buffer, each at an aligned offset.
        let align = gpu.params_align.max(4) / 4;
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
        let params_buffer = buffer("params", params.len());
        gpu.queue.write_buffer(&params_buffer, 0, bytes(&params));
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
                        Space::Error => error.as_entire_binding(),
                        Space::Weights(c) => weights[c as usize].as_entire_binding(),
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
            return Err(format!("the device refused the compiled program: {e}"));
        }
        Ok(WgpuExecutable {
            gpu,
            plan,
            arena,
            weights,
            error,
            pipelines,
            dispatches,
            last_device_ms: Mutex::new(None),
            timer,
            running: Mutex::new(()),
        })
    }

    pub fn plan(&self) -> &GpuPlan {
        &self.plan
    }

    fn buffer_of(&self, space: Space) -> &wgpu::Buffer {
        match space {
            Space::Arena => &self.arena,
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
                    self.buffer_of(space),
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
    fn constant_words(&self, place: Place, len: usize) -> Option<Vec<u32>> {
        let (first, chunk_words) = match place.space {
            Space::Weights(c) => (c as usize, usize::MAX),
            Space::WeightsSpan { first, chunk_words, .. } => (first as usize, chunk_words as usize),
            _ => return None,
        };
        let chunks = &self.plan.weights[first..];
        Some(
            (place.word..place.word + len)
                .map(
                    |i| if chunk_words == usize::MAX { chunks[0][i] } else { chunks[i / chunk_words][i % chunk_words] },
                )
                .collect(),
        )
    }

    /// Reads `values` (places and types) after the work in `encoder`.
    fn read_values(&self, encoder: wgpu::CommandEncoder, values: &[(Place, Type)]) -> Result<Vec<Tensor>, String> {
        // Constants come from the host's copy; the rest in one readback.
        let ranges: Vec<_> = values
            .iter()
            .map(|(p, t)| match self.constant_words(*p, t.numel()) {
                Some(_) => (Space::Arena, 0, 0),
                None => (p.space, p.word, t.numel()),
            })
            .collect();
        let read = self.read(encoder, &ranges)?;
        Ok(values
            .iter()
            .zip(read)
            .map(|((p, t), w)| tensor_of_words(t, &self.constant_words(*p, t.numel()).unwrap_or(w)))
            .collect())
    }

    /// One run: the dispatches between host steps in one compute pass, or,
    /// when `times` is given (profiling), each in its own and timed.
    fn run_steps(
        &self,
        inputs: &[Tensor],
        mut times: Option<&mut Vec<(String, String, f64)>>,
    ) -> Result<Vec<Tensor>, RunError> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let device_error =
            |message: String| RunError::Eval { node: "the whole graph".into(), op: "wgsl".into(), message };
        for ((place, ty), t) in self.plan.inputs.iter().zip(inputs) {
            let words = words_of(t, "an input").map_err(|e| RunError::Eval {
                node: format!("input of {ty}"),
                op: "upload".into(),
                message: e.to_string(),
            })?;
            self.gpu.queue.write_buffer(&self.arena, (place.word * 4) as u64, bytes(&words));
        }
        self.gpu.queue.write_buffer(&self.error, 0, bytes(&[0]));
        let mut encoder = self.encoder();
        let mut i = 0;
        let steps = &self.plan.steps;
        while i < steps.len() {
            match &steps[i] {
                Step::Host { op, inputs, outputs, label } => {
                    let start = std::time::Instant::now();
                    let done = std::mem::replace(&mut encoder, self.encoder());
                    let ts = self.read_values(done, inputs).map_err(device_error)?;
                    let outs = crate::steps::eval_host(op, label, &ts)?;
                    for ((place, _), t) in outputs.iter().zip(outs) {
                        let words = words_of(&t, "a host result").map_err(|e| RunError::Eval {
                            node: label.clone(),
                            op: op.name().to_string(),
                            message: e.to_string(),
                        })?;
                        self.gpu.queue.write_buffer(&self.arena, (place.word * 4) as u64, bytes(&words));
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
                        for d in self.dispatches[i..end].iter().flatten() {
                            pass.set_pipeline(&self.pipelines[d.pipeline]);
                            pass.set_bind_group(0, &d.bind_group, &[]);
                            pass.dispatch_workgroups(d.grid[0], d.grid[1], d.grid[2]);
                        }
                    }
                    if let (Some(times), Step::Dispatch { kind, label, .. }) = (times.as_deref_mut(), &steps[i]) {
                        let done = std::mem::replace(&mut encoder, self.encoder());
                        self.read(done, &[]).map_err(device_error)?;
                        times.push((kind.clone(), label.clone(), start.elapsed().as_secs_f64() * 1e3));
                    }
                    i = end;
                }
            }
        }
        let error_word = (Place { space: Space::Error, word: 0 }, Type::new(egret_ir::DType::I32, Vec::<usize>::new()));
        let mut values = vec![error_word];
        values.extend(self.plan.outputs.iter().cloned());
        let mut read = self.read_values(encoder, &values).map_err(device_error)?;
        if let Some(e) = crate::steps::failure(&self.plan, read[0].to_i64_vec()[0] as usize) {
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
        Some(self.plan.arena_words * 4)
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
