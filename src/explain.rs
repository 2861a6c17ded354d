//! What the compiler did with a model, for `egret explain` and the Python
//! package's `explain()`: the fusions, rules and tilings of the optimiser,
//! the kernels with each backend's own choices, and the time per stage.

use crate::{canonical, Backend, Canonical, CompileOptions, Error};
use egret_backends::gpu::GpuPlan;
use egret_backends::Plan;
use std::collections::BTreeMap;
use std::path::Path;

pub struct Explanation {
    pub canonical: Canonical,
    /// The kernel plan with the CPU's choices (for the CPU and reference
    /// backends), or the neutral plan the GPU compiled (for wgsl and ptx).
    /// `None` while some dims are symbolic that the backend needs values
    /// of (it plans them when a run first needs them); a CPU plan may keep
    /// the others (`Plan::symbols`).
    pub plan: Option<Plan>,
    /// The GPU's kernels, grids and host steps, for wgsl and ptx.
    pub gpu: Option<GpuPlan>,
    pub stages: Vec<(&'static str, f64)>,
    pub fusions: Vec<(String, usize)>,
    pub tilings: Vec<(String, usize)>,
    pub backend: Backend,
    /// Why there is no plan: the nodes whose kernels need symbols known.
    pub per_binding: Vec<egret_backends::BindingReason>,
}

/// Compiles `model` far enough to explain it for `backend`: no device is
/// needed (GPU kernels are compiled for the portable limits).
pub fn explain(model: &Path, opts: &CompileOptions, backend: Backend) -> Result<Explanation, Error> {
    let c = canonical(model, opts)?;
    let t = std::time::Instant::now();
    let gpu = matches!(backend, Backend::Wgsl | Backend::Ptx);
    // A plan keeps the symbols its kernels read at run time; a GPU's
    // program is shown at their nominal values (`Plan::capacity`).
    let per_binding = match c.graph.is_bound() {
        true => vec![],
        false => crate::binding_reasons(&c.graph, &CompileOptions { backend, ..opts.clone() }),
    };
    let plannable = per_binding.is_empty();
    let (plan, gpu_plan) = if plannable {
        let lowering = if gpu { crate::lower_options(opts).gpu() } else { crate::lower_options(opts) };
        let mut plan = egret_backends::lower(&c.graph, lowering)?;
        crate::lay_out_for_bounds(&mut plan, &opts.dim_bounds);
        // Each backend's own choices: the CPU's implementations and weight
        // layouts here, the GPU's kernels below.
        let plan = if gpu { plan } else { egret_backends::cpu::choose::choose(plan) };
        let limits = if backend == Backend::Ptx { crate::PTX_LIMITS } else { Default::default() };
        let gpu_plan = match (gpu, c.graph.is_bound()) {
            (false, _) => None,
            (true, true) => Some(crate::gpu_plan(&c.graph, opts, limits)?),
            (true, false) => {
                let program = crate::symbolic_gpu_plan(&c.graph, opts, limits)?;
                let codegen = |e: egret_backends::gpu::GpuError| Error::Codegen(e.to_string());
                // At the nominal values, or at 1 each where those would
                // not fit the device's binding (a run lays it out for its own).
                let ones = plan.capacity.keys().map(|k| (k.clone(), 1)).collect();
                let (values, layout) = match program.layout(&plan.capacity) {
                    Ok(layout) => (plan.capacity.clone(), layout),
                    Err(_) => {
                        let layout = program.layout(&ones).map_err(codegen)?;
                        (ones, layout)
                    }
                };
                Some(program.at(&values, &layout).map_err(codegen)?)
            }
        };
        (Some(plan), gpu_plan)
    } else {
        (None, None)
    };
    let lower_ms = t.elapsed().as_secs_f64() * 1e3;
    let fusions = egret_passes::egraph::count_fused(&c.graph);
    let tilings = egret_passes::egraph::count_tilings(&c.graph);
    let mut stages = vec![("import", c.import_ms), ("canonicalize", c.canonicalize_ms)];
    if let Some(report) = &c.optimized {
        stages.push(("egraph_saturate", report.saturate_ms));
        stages.push(("egraph_extract", report.extract_ms));
    }
    if plan.is_some() {
        stages.push(("lower", lower_ms));
    }
    Ok(Explanation { canonical: c, plan, gpu: gpu_plan, stages, fusions, tilings, backend, per_binding })
}

impl Explanation {
    /// The optimiser's report (empty below `--opt 2`).
    pub fn report(&self) -> egret_passes::egraph::Report {
        self.canonical.optimized.clone().unwrap_or_default()
    }

    /// The graph's inputs and outputs with their types, symbolic dims by
    /// their expressions (`f32[batch,sequence,64]`).
    pub fn signature(&self) -> (Vec<(String, String)>, Vec<(String, String)>) {
        let g = &self.canonical.graph;
        let inputs = g.inputs().iter().map(|&v| (g.input_name(v).to_string(), g.ty(v).to_string())).collect();
        let outputs = g.outputs().iter().map(|(n, v)| (n.clone(), g.ty(*v).to_string())).collect();
        (inputs, outputs)
    }

    /// Everything as one JSON object (`egret explain --json`).
    pub fn to_json(&self, model: &str, opt: u8) -> serde_json::Value {
        let report = self.report();
        let kernels: Option<Vec<serde_json::Value>> = self.plan.as_ref().map(|p| {
            p.kernels
                .iter()
                .map(|k| serde_json::json!({"kind": k.detailed_kind(), "label": k.label, "detail": k.detail(), "flops": k.flops()}))
                .collect()
        });
        let (inputs, outputs) = self.signature();
        let pairs = |xs: Vec<(String, String)>| {
            xs.into_iter().map(|(n, t)| serde_json::json!({"name": n, "type": t})).collect::<Vec<_>>()
        };
        serde_json::json!({
            "model": model,
            "opt": opt,
            "fusions": self.fusions.iter().cloned().collect::<BTreeMap<String, usize>>(),
            "tilings": self.tilings.iter().cloned().collect::<BTreeMap<String, usize>>(),
            "rules": report.rules.iter().cloned().collect::<BTreeMap<String, usize>>(),
            // Null while dims the backend needs known are symbolic.
            "kernels": kernels,
            // The nodes whose kernels need those dims known.
            "per_binding": self
                .per_binding
                .iter()
                .map(|r| serde_json::json!({"node": r.node, "op": r.op, "symbols": r.symbols}))
                .collect::<Vec<_>>(),
            "arena_bytes": self.plan.as_ref().map(|p| p.arena_bytes),
            // The model's dim_params: the sizes compilation fixed, or null
            // for those that stay symbolic.
            "symbols": self
                .canonical
                .symbols
                .iter()
                .map(|(n, v)| (n.clone(), Some(*v)))
                .chain(self.canonical.graph.symbols().into_iter().map(|n| (n, None)))
                .collect::<BTreeMap<String, Option<usize>>>(),
            "inputs": pairs(inputs),
            "outputs": pairs(outputs),
            "stage_ms": self.stages.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<String, f64>>(),
            "egraph": {"nodes": report.egraph_nodes, "classes": report.egraph_classes, "dag_extraction": report.dag_extraction},
            "backend": self.backend.name(),
            "gpu": self.gpu.as_ref().map(crate::aot::gpu_manifest),
        })
    }
}

/// `ptxas`, where this machine has one: `EGRET_PTXAS`, the one on the
/// `PATH`, or the PyPI wheel `nvidia-cuda-nvcc-cu12`'s.
pub fn find_ptxas() -> Option<std::path::PathBuf> {
    find_cuda_tool("ptxas", "EGRET_PTXAS", &["nvidia/cuda_nvcc/bin/ptxas"])
}

/// `nvdisasm` (a cubin's SASS), where this machine has one:
/// `EGRET_NVDISASM`, the one on the `PATH`, or the PyPI wheel
/// `nvidia-cuda-nvdisasm`'s.
pub fn find_nvdisasm() -> Option<std::path::PathBuf> {
    find_cuda_tool("nvdisasm", "EGRET_NVDISASM", &["nvidia/cu13/bin/nvdisasm", "nvidia/cuda_nvdisasm/bin/nvdisasm"])
}

/// A CUDA tool: the file `env` names, `tool` on the `PATH`, or the first of
/// `wheel_paths` under one of Python's package folders.
fn find_cuda_tool(tool: &str, env: &str, wheel_paths: &[&str]) -> Option<std::path::PathBuf> {
    use std::process::Command;
    if let Ok(p) = std::env::var(env) {
        return Some(p.into());
    }
    if Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(tool.into());
    }
    let out = Command::new("python3")
        .args(["-c", "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))"])
        .output()
        .ok()?;
    let dirs = String::from_utf8_lossy(&out.stdout).to_string();
    wheel_paths
        .iter()
        .flat_map(|w| dirs.lines().map(move |d| std::path::PathBuf::from(d).join(w)))
        .find(|p| p.is_file())
}

/// The registers per thread `ptxas` gives each distinct kernel of `g` for
/// sm_90 (`None` for all where there is no `ptxas`, or for a kernel it
/// refuses).
pub fn ptx_registers(g: &GpuPlan) -> Vec<Option<u32>> {
    let Some(ptxas) = find_ptxas() else { return vec![None; g.kernels.len()] };
    let dir = std::env::temp_dir().join(format!("egret-explain-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return vec![None; g.kernels.len()];
    }
    let registers = g
        .kernels
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let path = dir.join(format!("k{i}.ptx"));
            std::fs::write(&path, egret_backends::gpu::ptx::print(k)).ok()?;
            let out = std::process::Command::new(&ptxas)
                .args(["-arch=sm_90", "-v", "-o", "/dev/null"])
                .arg(&path)
                .output()
                .ok()?;
            let log = String::from_utf8_lossy(&out.stderr);
            log.split("Used ").nth(1)?.split_whitespace().next()?.parse().ok()
        })
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    registers
}
