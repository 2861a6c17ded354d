//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod onnx;

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The zoo models shipped with the repository.
pub fn zoo_dir() -> PathBuf {
    repo_root().join("tests/data/zoo")
}

/// Real exports of more of the families Egret targets (see its README).
pub fn exports_dir() -> PathBuf {
    repo_root().join("tests/data/exports")
}

/// Small models of the families the zoo lacks, written by
/// `tools/make_synthetic_models.py` with onnxruntime's outputs.
pub fn synthetic_dir() -> PathBuf {
    repo_root().join("tests/data/synthetic")
}

/// `../shared/<name>` beside the checkout, or `None` with a note when absent.
pub fn shared_dir(name: &str, env_override: Option<&str>) -> Option<PathBuf> {
    if let Some(var) = env_override {
        if let Ok(p) = std::env::var(var) {
            return Some(PathBuf::from(p));
        }
    }
    let p = repo_root().join("../shared").join(name);
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} not found (set {} or put shared/ beside the checkout)",
            p.display(),
            env_override.unwrap_or("it")
        );
        None
    }
}

/// Runs every case under `dir` with `backend`, panicking with a readable list of failures.
pub fn check_all(dir: &std::path::Path, backend: egret::Backend, tol: egret::check::Tolerance) -> usize {
    let cases = egret::check::discover(dir).expect("discover cases");
    assert!(!cases.is_empty(), "no cases under {}", dir.display());
    let mut failures = Vec::new();
    let mut n = 0;
    for case in &cases {
        for r in egret::check::check_case(case, backend, tol) {
            n += 1;
            if !r.passed() {
                failures.push(format!(
                    "{}: {:?} {:?}",
                    r.case,
                    r.error,
                    r.outputs.iter().filter_map(|o| o.failure.clone()).collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {n} cases failed:\n{}", failures.len(), failures.join("\n"));
    n
}

/// Whether the WGSL tests can run: a WebGPU adapter exists (lavapipe in
/// CI). Without one they skip with a note, except under `CI=true`, where
/// a missing adapter is a failure: `.ci/run` installs lavapipe.
pub fn wgsl_adapter() -> bool {
    match egret::runtime::WgpuDevice::shared() {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI runs the WGSL tests on lavapipe, and found no adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipping the WGSL part: {e}");
            false
        }
    }
}

/// The PTX interpreter as a `PtxDevice`: what runs the PTX backend's
/// kernels in the tests, on machines without an NVIDIA GPU.
pub struct InterpretedDevice {
    memory: std::sync::Mutex<egret_ptx_interp::Memory>,
    /// Instructions run so far, for reports.
    pub executed: std::sync::atomic::AtomicU64,
    /// Recordings made and replayed so far.
    pub records: std::sync::atomic::AtomicU64,
    pub replays: std::sync::atomic::AtomicU64,
}

impl InterpretedDevice {
    pub fn new() -> InterpretedDevice {
        InterpretedDevice {
            memory: std::sync::Mutex::new(egret_ptx_interp::Memory { buffers: vec![], banks: None }),
            executed: Default::default(),
            records: Default::default(),
            replays: Default::default(),
        }
    }

    /// An interpreter that counts the shared-memory bank conflicts of the
    /// kernels it runs (`banks`).
    #[allow(dead_code)]
    pub fn counting_banks() -> InterpretedDevice {
        let d = InterpretedDevice::new();
        d.memory.lock().unwrap().banks = Some(Default::default());
        d
    }

    /// The bank statistics so far, if counted.
    #[allow(dead_code)]
    pub fn banks(&self) -> Option<egret_ptx_interp::BankStats> {
        self.memory.lock().unwrap().banks
    }

    fn locate(address: u64, len: usize, buffers: &[Vec<u8>]) -> Result<(usize, usize), String> {
        let b = (address >> 40) as usize;
        let off = (address & ((1 << 40) - 1)) as usize;
        match b.checked_sub(1).and_then(|i| buffers.get(i)) {
            Some(buf) if off + len <= buf.len() => Ok((b - 1, off)),
            _ => Err(format!("host copy of {len} bytes at {address:#x} is outside every buffer")),
        }
    }
}

impl egret::runtime::PtxDevice for InterpretedDevice {
    type Function = egret_ptx_interp::Kernel;

    fn name(&self) -> String {
        "the PTX interpreter".into()
    }

    fn alloc(&self, bytes: usize) -> Result<u64, String> {
        let mut m = self.memory.lock().unwrap();
        m.buffers.push(vec![0; bytes]);
        Ok(egret_ptx_interp::global_address(m.buffers.len() - 1))
    }

    fn free(&self, at: u64) {
        // Buffers keep their ids (addresses name them): free the bytes only.
        let mut m = self.memory.lock().unwrap();
        if let Some(buf) = ((at >> 40) as usize).checked_sub(1).and_then(|b| m.buffers.get_mut(b)) {
            *buf = Vec::new();
        }
    }

    fn upload(&self, at: u64, bytes: &[u8]) -> Result<(), String> {
        let mut m = self.memory.lock().unwrap();
        let (b, off) = Self::locate(at, bytes.len(), &m.buffers)?;
        m.buffers[b][off..off + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn download(&self, at: u64, bytes: &mut [u8]) -> Result<(), String> {
        let m = self.memory.lock().unwrap();
        let (b, off) = Self::locate(at, bytes.len(), &m.buffers)?;
        bytes.copy_from_slice(&m.buffers[b][off..off + bytes.len()]);
        Ok(())
    }

    fn load(&self, ptx: &str, entry: &str) -> Result<egret_ptx_interp::Kernel, String> {
        let k = egret_ptx_interp::parse(ptx)?;
        if k.name != entry {
            return Err(format!("the module's entry is `{}`, not `{entry}`", k.name));
        }
        Ok(k)
    }

    fn launch(&self, f: &egret_ptx_interp::Kernel, grid: [u32; 3], threads: u32, args: &[u64]) -> Result<(), String> {
        let mut m = self.memory.lock().unwrap();
        let n = egret_ptx_interp::launch(f, grid, threads, args, &mut m)?;
        self.executed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn synchronize(&self) -> Result<(), String> {
        Ok(())
    }

    type Recording = Vec<(egret_ptx_interp::Kernel, [u32; 3], u32, Vec<u64>)>;

    /// Records the launches as a list, which `replay` launches: what a
    /// CUDA graph does, so that the executor's recording is tested here.
    fn record(
        &self,
        launches: &[(&egret_ptx_interp::Kernel, [u32; 3], u32, &[u64])],
    ) -> Result<Option<Self::Recording>, String> {
        self.records.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(
            launches.iter().map(|(f, grid, threads, args)| ((*f).clone(), *grid, *threads, args.to_vec())).collect(),
        ))
    }

    fn replay(&self, recording: &Self::Recording) -> Result<(), String> {
        self.replays.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        recording.iter().try_for_each(|(f, grid, threads, args)| self.launch(f, *grid, *threads, args))
    }
}

/// A graph compiled for the PTX backend (at its limits), run by the
/// interpreter.
pub fn interpreted_ptx(
    graph: &egret::ir::Graph,
    opts: &egret::CompileOptions,
) -> egret::runtime::PtxExecutable<InterpretedDevice> {
    let gpu = egret::gpu_plan(graph, opts, egret::PTX_LIMITS).unwrap();
    egret::runtime::PtxExecutable::new(InterpretedDevice::new(), gpu).unwrap()
}

/// A graph compiled for the PTX backend: on the CUDA device when
/// `EGRET_PTX_DEVICE=cuda` (what `tools/gpu_check.sh` sets on a GPU
/// machine), else run by the interpreter.
pub fn ptx_executable(graph: &egret::ir::Graph, opts: &egret::CompileOptions) -> Box<dyn egret::runtime::Executable> {
    if std::env::var("EGRET_PTX_DEVICE").is_ok_and(|v| v == "cuda") {
        let device = egret::runtime::CudaDevice::open().expect("EGRET_PTX_DEVICE=cuda needs a CUDA driver");
        let gpu = egret::gpu_plan(graph, opts, egret::PTX_LIMITS).unwrap();
        return Box::new(egret::runtime::PtxExecutable::new(device, gpu).unwrap());
    }
    Box::new(interpreted_ptx(graph, opts))
}

/// The sizes data set `set` of `case` gives the model's symbolic dims: each
/// graph input dim declared as a `dim_param` takes the size of the stored
/// input there. A model whose dims are all fixed gets none.
#[allow(dead_code)]
pub fn data_set_dims(case: &std::path::Path, set: usize) -> Vec<(String, usize)> {
    use egret::frontend::DeclaredDim;
    let (inputs, _) = egret::frontend::declared_io(&case.join("model.onnx")).unwrap();
    let stored = egret::check::numbered(&case.join(format!("test_data_set_{set}")), "input").unwrap();
    let mut dims: Vec<(String, usize)> = Vec::new();
    for input in inputs {
        let Some((_, t)) = stored.iter().find(|(n, _)| *n == input.name) else { continue };
        for (i, d) in input.dims.iter().flatten().enumerate() {
            if let DeclaredDim::Symbol(p) = d {
                if !dims.iter().any(|(n, _)| n == p) {
                    dims.push((p.clone(), t.shape()[i]));
                }
            }
        }
    }
    dims
}

/// `base` with `case`'s symbolic dims bound as its first data set binds them.
#[allow(dead_code)]
pub fn options_for(case: &std::path::Path, base: egret::CompileOptions) -> egret::CompileOptions {
    egret::CompileOptions { dims: data_set_dims(case, 0).into_iter().collect(), ..base }
}
