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

use crate::{Executable, RunError};
use egret_backends::gpu::form::Space;
use egret_backends::gpu::{ptx, tensor_of_words, words_of, GpuPlan, Place, Step};
use egret_ir::{Tensor, Type};
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
}

struct Launch {
    function: usize,
    grid: [u32; 3],
    threads: u32,
    args: Vec<u64>,
}

pub struct PtxExecutable<D: PtxDevice> {
    device: D,
    plan: GpuPlan,
    arena: u64,
    error: u64,
    weights: u64,
    /// Word offset of each weight chunk in the weights allocation.
    chunk_at: Vec<usize>,
    functions: Vec<D::Function>,
    /// Per step, its launch (`None` for host steps).
    launches: Vec<Option<Launch>>,
    /// Every allocation, freed with the executable.
    allocations: Vec<u64>,
    running: Mutex<()>,
}

impl<D: PtxDevice> Drop for PtxExecutable<D> {
    fn drop(&mut self) {
        for &at in &self.allocations {
            self.device.free(at);
        }
    }
}

fn bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl<D: PtxDevice> PtxExecutable<D> {
    pub fn new(device: D, plan: GpuPlan) -> Result<PtxExecutable<D>, String> {
        let mut functions = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            let text = ptx::print(k);
            let f = device.load(&text, &ptx::entry_name(k)).map_err(|e| format!("kernel `{}`: {e}", k.name))?;
            functions.push(f);
        }
        let arena = device.alloc(plan.arena_words.max(1) * 4)?;
        let error = device.alloc(4)?;
        let mut chunk_at = Vec::new();
        let mut all = Vec::new();
        for c in &plan.weights {
            chunk_at.push(all.len());
            all.extend_from_slice(c);
        }
        let weights = device.alloc(all.len().max(1) * 4)?;
        device.upload(weights, &bytes(&all))?;
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
        let params_base = device.alloc(params.len().max(1) * 4)?;
        let allocations = vec![arena, error, weights, params_base];
        device.upload(params_base, &bytes(&params))?;
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
                    Space::Error => error,
                    Space::Params => params_base + (param_at[i] * 4) as u64,
                    Space::Weights(c) => weights + (chunk_at[c as usize] * 4) as u64,
                    Space::WeightsSpan { .. } => unreachable!("spaces() binds a span's chunks"),
                })
                .collect();
            launches.push(Some(Launch {
                function: *kernel,
                grid: *grid,
                threads: plan.kernels[*kernel].threads,
                args,
            }));
        }
        Ok(PtxExecutable {
            device,
            plan,
            arena,
            error,
            weights,
            chunk_at,
            functions,
            launches,
            allocations,
            running: Mutex::new(()),
        })
    }

    pub fn plan(&self) -> &GpuPlan {
        &self.plan
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device address of a place.
    fn address(&self, p: Place) -> u64 {
        let base = match p.space {
            Space::Arena => self.arena,
            Space::Error => self.error,
            Space::Weights(c) | Space::WeightsSpan { first: c, .. } => {
                self.weights + (self.chunk_at[c as usize] * 4) as u64
            }
            Space::Params => unreachable!("parameters are not values"),
        };
        base + (p.word * 4) as u64
    }

    fn read(&self, p: Place, ty: &Type) -> Result<Tensor, String> {
        let mut buf = vec![0u8; ty.numel() * 4];
        if !buf.is_empty() {
            self.device.download(self.address(p), &mut buf)?;
        }
        let words: Vec<u32> = buf.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(tensor_of_words(ty, &words))
    }

    fn write(&self, p: Place, t: &Tensor, what: &str) -> Result<(), String> {
        let words = words_of(t, what).map_err(|e| e.to_string())?;
        if !words.is_empty() {
            self.device.upload(self.address(p), &bytes(&words))?;
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
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let device_error =
            |node: &str, op: &str, message: String| RunError::Eval { node: node.into(), op: op.into(), message };
        for ((place, ty), t) in self.plan.inputs.iter().zip(inputs) {
            self.write(*place, t, "an input").map_err(|m| device_error(&format!("input of {ty}"), "upload", m))?;
        }
        self.device.upload(self.error, &[0; 4]).map_err(|m| device_error("the error word", "upload", m))?;
        for (i, step) in self.plan.steps.iter().enumerate() {
            let start = std::time::Instant::now();
            match step {
                Step::Dispatch { label, kind, .. } => {
                    let l = self.launches[i].as_ref().expect("a dispatch has a launch");
                    self.device
                        .launch(&self.functions[l.function], l.grid, l.threads, &l.args)
                        .map_err(|m| device_error(label, kind, m))?;
                    if let Some(times) = times.as_deref_mut() {
                        self.device.synchronize().map_err(|m| device_error(label, kind, m))?;
                        times.push((kind.clone(), label.clone(), start.elapsed().as_secs_f64() * 1e3));
                    }
                }
                Step::Host { op, inputs, outputs, label } => {
                    let fail = |m: String| device_error(label, op.name(), m);
                    self.device.synchronize().map_err(fail)?;
                    let ts: Vec<Tensor> =
                        inputs.iter().map(|(p, t)| self.read(*p, t)).collect::<Result<_, _>>().map_err(fail)?;
                    let outs = crate::steps::eval_host(op, label, &ts)?;
                    for ((p, _), t) in outputs.iter().zip(&outs) {
                        self.write(*p, t, "a host result").map_err(fail)?;
                    }
                    if let Some(times) = times.as_deref_mut() {
                        times.push((format!("host:{}", op.name()), label.clone(), start.elapsed().as_secs_f64() * 1e3));
                    }
                }
            }
        }
        self.device.synchronize().map_err(|m| device_error("the whole graph", "ptx", m))?;
        let code = self
            .read(Place { space: Space::Error, word: 0 }, &Type::new(egret_ir::DType::I32, Vec::<usize>::new()))
            .map_err(|m| device_error("the error word", "download", m))?
            .to_i64_vec()[0] as usize;
        if let Some(e) = crate::steps::failure(&self.plan, code) {
            return Err(e);
        }
        self.plan
            .outputs
            .iter()
            .map(|(p, t)| self.read(*p, t).map_err(|m| device_error("an output", "download", m)))
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
        Some(self.plan.arena_words * 4)
    }

    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, String, f64)>, RunError> {
        let mut times = Vec::new();
        self.run_steps(&inputs, Some(&mut times))?;
        Ok(times)
    }
}

/// What to do when there is no CUDA driver.
pub const NO_DRIVER_HINT: &str =
    "no CUDA driver found (libcuda): the ptx backend needs an NVIDIA GPU and its driver; `egret compile --emit ptx` needs neither";

/// The CUDA driver's device 0, through its primary context.
pub struct CudaDevice {
    context: cudarc::driver::sys::CUcontext,
    name: String,
}

// The context is the driver's, shared by every thread that makes it current.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

/// A loaded kernel.
pub struct CudaFunction(cudarc::driver::sys::CUfunction);
unsafe impl Send for CudaFunction {}
unsafe impl Sync for CudaFunction {}

fn driver(e: cudarc::driver::DriverError) -> String {
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    format!("CUDA driver error {:?} {text}", e.0)
}

impl CudaDevice {
    pub fn open() -> Result<CudaDevice, String> {
        use cudarc::driver::result;
        // Without libcuda the first driver call would panic: look first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(NO_DRIVER_HINT.into());
        }
        result::init().map_err(driver)?;
        let dev = result::device::get(0).map_err(driver)?;
        let name = result::device::get_name(dev).map_err(driver)?;
        let context = unsafe { result::primary_ctx::retain(dev) }.map_err(driver)?;
        Ok(CudaDevice { context, name })
    }

    fn current(&self) -> Result<(), String> {
        unsafe { cudarc::driver::result::ctx::set_current(self.context) }.map_err(driver)
    }
}

impl PtxDevice for CudaDevice {
    type Function = CudaFunction;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<u64, String> {
        self.current()?;
        unsafe { cudarc::driver::result::malloc_sync(bytes.max(4)) }.map_err(driver)
    }

    fn free(&self, at: u64) {
        // Nothing to report from a drop: a failure leaves the memory to the
        // context, which the driver frees at the process's end.
        if self.current().is_ok() {
            let _ = unsafe { cudarc::driver::result::free_sync(at) };
        }
    }

    fn upload(&self, at: u64, bytes: &[u8]) -> Result<(), String> {
        self.current()?;
        unsafe { cudarc::driver::result::memcpy_htod_sync(at, bytes) }.map_err(driver)
    }

    fn download(&self, at: u64, bytes: &mut [u8]) -> Result<(), String> {
        self.current()?;
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(bytes, at) }.map_err(driver)
    }

    fn load(&self, ptx: &str, entry: &str) -> Result<CudaFunction, String> {
        self.current()?;
        let image = std::ffi::CString::new(ptx).map_err(|e| e.to_string())?;
        let module =
            unsafe { cudarc::driver::result::module::load_data(image.as_ptr() as *const _) }.map_err(driver)?;
        let name = std::ffi::CString::new(entry).map_err(|e| e.to_string())?;
        let f = unsafe { cudarc::driver::result::module::get_function(module, name) }.map_err(driver)?;
        Ok(CudaFunction(f))
    }

    fn launch(&self, f: &CudaFunction, grid: [u32; 3], threads: u32, args: &[u64]) -> Result<(), String> {
        self.current()?;
        let mut values: Vec<u64> = args.to_vec();
        let mut params: Vec<*mut std::ffi::c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut _).collect();
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.0,
                (grid[0], grid[1], grid[2]),
                (threads, 1, 1),
                0,
                std::ptr::null_mut(),
                &mut params,
            )
        }
        .map_err(driver)
    }

    fn synchronize(&self) -> Result<(), String> {
        self.current()?;
        cudarc::driver::result::ctx::synchronize().map_err(driver)
    }
}
