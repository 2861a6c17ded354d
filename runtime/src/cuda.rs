//! The CUDA driver's device for the PTX backend (feature `cuda`): kernels
//! loaded and launched through `cudarc`'s dynamically loaded driver API.

use crate::ptx::{LaunchOf, PtxDevice};

/// What to do when there is no CUDA driver.
pub const NO_DRIVER_HINT: &str =
    "no CUDA driver found (libcuda): the ptx backend needs an NVIDIA GPU and its driver; `egret compile --emit ptx` needs neither";

/// The CUDA driver's device 0, through its primary context. Kernels run
/// on a stream of its own, which stream capture records (CUDA graphs)
/// and which, being a blocking stream, the synchronous copies on the
/// legacy default stream wait for and are waited for by.
pub struct CudaDevice {
    context: cudarc::driver::sys::CUcontext,
    stream: cudarc::driver::sys::CUstream,
    name: String,
}

// The context is the driver's, shared by every thread that makes it current.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

/// A loaded kernel.
pub struct CudaFunction(cudarc::driver::sys::CUfunction);
unsafe impl Send for CudaFunction {}
unsafe impl Sync for CudaFunction {}

/// An instantiated CUDA graph of launches.
pub struct CudaGraph(cudarc::driver::sys::CUgraphExec);
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        let _ = unsafe { cudarc::driver::result::graph::exec_destroy(self.0) };
    }
}

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
        unsafe { result::ctx::set_current(context) }.map_err(driver)?;
        let stream = result::stream::create(result::stream::StreamKind::Default).map_err(driver)?;
        Ok(CudaDevice { context, stream, name })
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
        self.launch_on_stream(f, grid, threads, args)
    }

    fn synchronize(&self) -> Result<(), String> {
        self.current()?;
        cudarc::driver::result::ctx::synchronize().map_err(driver)
    }

    type Recording = CudaGraph;

    /// Stream capture: the launches are recorded on the device's stream,
    /// not run, and instantiated as one graph. `EGRET_CUDA_GRAPHS=0` turns
    /// it off (each run launches its kernels one by one), to measure what
    /// the graphs save.
    fn record(&self, launches: &[LaunchOf<'_, CudaFunction>]) -> Result<Option<CudaGraph>, String> {
        use cudarc::driver::{result, sys};
        if std::env::var("EGRET_CUDA_GRAPHS").is_ok_and(|v| v == "0") {
            return Ok(None);
        }
        self.current()?;
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        unsafe { result::stream::begin_capture(self.stream, mode) }.map_err(driver)?;
        let launched =
            launches.iter().try_for_each(|(f, grid, threads, args)| self.launch_on_stream(f, *grid, *threads, args));
        // The capture ends whether or not every launch was recorded.
        let graph = unsafe { result::stream::end_capture(self.stream) }.map_err(driver);
        launched?;
        let graph = graph?;
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }.map_err(driver);
        let _ = unsafe { result::graph::destroy(graph) };
        Ok(Some(CudaGraph(exec?)))
    }

    fn replay(&self, graph: &CudaGraph) -> Result<(), String> {
        self.current()?;
        unsafe { cudarc::driver::result::graph::launch(graph.0, self.stream) }.map_err(driver)
    }
}

impl CudaDevice {
    fn launch_on_stream(&self, f: &CudaFunction, grid: [u32; 3], threads: u32, args: &[u64]) -> Result<(), String> {
        let mut values: Vec<u64> = args.to_vec();
        let mut params: Vec<*mut std::ffi::c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut _).collect();
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.0,
                (grid[0], grid[1], grid[2]),
                (threads, 1, 1),
                0,
                self.stream,
                &mut params,
            )
        }
        .map_err(driver)
    }
}
