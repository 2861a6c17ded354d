//! Egret from Python, with onnxruntime's `InferenceSession` API: existing
//! code swaps the import. Arrays go in and come out as numpy arrays; the
//! GIL is released while a model compiles and while it runs; Egret's
//! errors (a bad model, a wrong input name, dtype or shape) raise
//! `egret.EgretError` with Egret's message.

use numpy::{PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use egret::ir::{DType, Data, Tensor, Type};

pyo3::create_exception!(egret, EgretError, pyo3::exceptions::PyException);

fn error(e: impl std::fmt::Display) -> PyErr {
    EgretError::new_err(e.to_string())
}

/// onnxruntime's spelling of an element type.
fn type_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "tensor(float)",
        DType::F64 => "tensor(double)",
        DType::I8 => "tensor(int8)",
        DType::I16 => "tensor(int16)",
        DType::I32 => "tensor(int32)",
        DType::I64 => "tensor(int64)",
        DType::U8 => "tensor(uint8)",
        DType::U16 => "tensor(uint16)",
        DType::U32 => "tensor(uint32)",
        DType::U64 => "tensor(uint64)",
        DType::Bool => "tensor(bool)",
    }
}

/// A dim of a `NodeArg`'s shape: a size, a symbol's name, or unknown
/// (`None`), as onnxruntime reports them.
#[derive(Clone, Debug, IntoPyObject)]
enum DimArg {
    Size(usize),
    Symbol(String),
    Unknown(Option<usize>),
}

/// A graph input or output, as onnxruntime describes one.
#[pyclass(frozen, module = "egret")]
struct NodeArg {
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    shape: Vec<DimArg>,
    #[pyo3(get, name = "type")]
    ty: String,
}

#[pymethods]
impl NodeArg {
    fn __repr__(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| match d {
                DimArg::Size(n) => n.to_string(),
                DimArg::Symbol(s) => format!("{s:?}"),
                DimArg::Unknown(_) => "None".into(),
            })
            .collect();
        format!("NodeArg(name={:?}, type={:?}, shape=[{}])", self.name, self.ty, dims.join(", "))
    }
}

fn node_args(values: &[(String, Type)]) -> Vec<NodeArg> {
    values
        .iter()
        .map(|(name, t)| NodeArg {
            name: name.clone(),
            shape: t
                .shape
                .iter()
                .map(|d| d.size().map_or_else(|| DimArg::Symbol(d.to_string()), DimArg::Size))
                .collect(),
            ty: type_name(t.dtype).into(),
        })
        .collect()
}

/// As the model file declares them, symbolic dims by name.
fn declared_args(values: &[egret::frontend::Declared]) -> Vec<NodeArg> {
    use egret::frontend::DeclaredDim;
    values
        .iter()
        .map(|d| NodeArg {
            name: d.name.clone(),
            shape: d
                .dims
                .iter()
                .flatten()
                .map(|dim| match dim {
                    DeclaredDim::Fixed(n) => DimArg::Size(*n),
                    DeclaredDim::Symbol(s) => DimArg::Symbol(s.clone()),
                    DeclaredDim::Unknown => DimArg::Unknown(None),
                })
                .collect(),
            ty: type_name(d.dtype).into(),
        })
        .collect()
}

/// A numpy array as a tensor of its own element type.
fn tensor_of(name: &str, value: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    macro_rules! try_as {
        ($($t:ty),*) => {
            $(
                if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'_, $t>>() {
                    let shape = a.shape().to_vec();
                    let data: Vec<$t> = a.as_array().iter().copied().collect();
                    return Ok(Tensor::from_vec(shape, data));
                }
            )*
        };
    }
    try_as!(f32, f64, i64, i32, i16, i8, u8, u16, u32, u64, bool);
    match value.cast::<numpy::PyUntypedArray>() {
        Ok(a) => {
            let dtype = a.dtype().str().map(|s| s.to_string()).unwrap_or_else(|_| "?".into());
            Err(error(format!("input `{name}` has numpy dtype {dtype}, which Egret does not take")))
        }
        Err(_) => Err(error(format!("input `{name}` must be a numpy array, not {}", value.get_type().name()?))),
    }
}

fn array_of<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let shape = t.shape().to_vec();
    macro_rules! arr {
        ($v:expr) => {
            numpy::PyArray1::from_vec(py, $v.clone()).reshape(shape)?.into_any()
        };
    }
    Ok(match t.data() {
        Data::F32(v) => arr!(v),
        Data::F64(v) => arr!(v),
        Data::I8(v) => arr!(v),
        Data::I16(v) => arr!(v),
        Data::I32(v) => arr!(v),
        Data::I64(v) => arr!(v),
        Data::U8(v) => arr!(v),
        Data::U16(v) => arr!(v),
        Data::U32(v) => arr!(v),
        Data::U64(v) => arr!(v),
        Data::Bool(v) => arr!(v),
    })
}

fn backend_of(name: &str) -> PyResult<egret::Backend> {
    Ok(match name {
        "cpu" => egret::Backend::Cpu,
        "wgsl" => egret::Backend::Wgsl,
        "ptx" => egret::Backend::Ptx,
        "reference" => egret::Backend::Reference,
        other => return Err(error(format!("unknown backend `{other}` (cpu, wgsl, ptx or reference)"))),
    })
}

/// A compiled model, run like an `onnxruntime.InferenceSession`.
#[pyclass(frozen, module = "egret")]
struct InferenceSession {
    /// The compiled model. With symbolic dims left unbound it is compiled
    /// once for all their values; each run's shapes bind them, and the
    /// backend lowers it once per binding it has not seen (keeping
    /// `max_compiled_shapes` of those programs).
    model: Arc<egret::Model>,
    /// The model's inputs and outputs as the file declares them, for a
    /// model with unbound symbolic dims: `get_inputs` names them as
    /// onnxruntime does.
    declared: Option<(Vec<egret::frontend::Declared>, Vec<egret::frontend::Declared>)>,
    path: PathBuf,
    opts: egret::CompileOptions,
}

#[pymethods]
impl InferenceSession {
    /// Compiles the model at `path` (a file, or a folder holding
    /// `model.onnx`) for `backend`. `dims` binds symbolic dimensions by
    /// name; `threads` is the CPU's (default: one per core). A symbolic
    /// dim left unbound is bound by each run's input shapes, compiling once
    /// per new binding; the session keeps `max_compiled_shapes` of those
    /// programs.
    #[new]
    #[pyo3(signature = (path, backend = "cpu", threads = None, opt_level = 2, dims = None, max_compiled_shapes = 16))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        backend: &str,
        threads: Option<usize>,
        opt_level: u8,
        dims: Option<HashMap<String, usize>>,
        max_compiled_shapes: usize,
    ) -> PyResult<InferenceSession> {
        if max_compiled_shapes == 0 {
            return Err(error("max_compiled_shapes must be at least 1"));
        }
        if opt_level > egret::MAX_OPT_LEVEL {
            return Err(error(format!("opt_level {opt_level} is past the highest, {}", egret::MAX_OPT_LEVEL)));
        }
        let opts = egret::CompileOptions {
            backend: backend_of(backend)?,
            threads,
            opt_level,
            dims: dims.unwrap_or_default(),
            max_specializations: max_compiled_shapes,
            ..Default::default()
        };
        let model = Arc::new(py.detach(|| egret::compile(&path, &opts)).map_err(error)?);
        let declared = if model.program.signature.is_symbolic() {
            let file = if path.is_dir() { path.join("model.onnx") } else { path.clone() };
            Some(egret::frontend::declared_io(&file).map_err(error)?)
        } else {
            None
        };
        Ok(InferenceSession { model, declared, path, opts })
    }

    fn get_inputs(&self) -> Vec<NodeArg> {
        match &self.declared {
            Some((inputs, _)) => declared_args(inputs),
            None => node_args(&self.model.program.signature.inputs),
        }
    }

    fn get_outputs(&self) -> Vec<NodeArg> {
        match &self.declared {
            Some((_, outputs)) => declared_args(outputs),
            None => node_args(&self.model.program.signature.outputs),
        }
    }

    /// Runs on `input_feed` (name to numpy array) and returns the outputs
    /// named in `output_names`, or all of them for `None`, in that order.
    #[pyo3(signature = (output_names, input_feed, run_options = None))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        output_names: Option<Vec<String>>,
        input_feed: &Bound<'py, PyDict>,
        run_options: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        if run_options.is_some_and(|o| !o.is_none()) {
            return Err(error("run_options are not supported"));
        }
        let mut named = Vec::with_capacity(input_feed.len());
        for (k, v) in input_feed.iter() {
            let name: String = k.extract().map_err(|_| error("input names must be strings"))?;
            let t = tensor_of(&name, &v)?;
            named.push((name, t));
        }
        let model = &self.model;
        let outputs = &model.program.signature.outputs;
        let wanted: Vec<usize> = match output_names {
            None => (0..outputs.len()).collect(),
            Some(names) => names
                .iter()
                .map(|n| {
                    outputs.iter().position(|(o, _)| o == n).ok_or_else(|| {
                        let known: Vec<&str> = outputs.iter().map(|(o, _)| o.as_str()).collect();
                        error(format!("the model has no output `{n}` (its outputs: {})", known.join(", ")))
                    })
                })
                .collect::<PyResult<_>>()?,
        };
        let results = py.detach(|| model.run(named)).map_err(error)?;
        wanted.into_iter().map(|i| array_of(py, &results[i].1)).collect()
    }

    /// The number of programs the backend has compiled: one for a model
    /// whose dims were all bound when the session was made; with unbound
    /// symbolic dims, one per binding the runs have needed (the session
    /// keeps the last `max_compiled_shapes` of them).
    fn compiled_shapes(&self) -> usize {
        self.model.program.executable.specializations().unwrap_or(1)
    }

    /// What the compiler did: the same data as `egret explain --json`.
    fn explain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (path, opts) = (self.path.clone(), self.opts.clone());
        let text = py
            .detach(|| {
                egret::explain::explain(&path, &opts, opts.backend)
                    .map(|e| e.to_json(&path.display().to_string(), opts.opt_level).to_string())
            })
            .map_err(error)?;
        py.import("json")?.call_method1("loads", (text,))
    }
}

/// Compiles a model ahead of time into `out_dir`: a shared library and C
/// header (`emit="so"`), an object file (`"obj"`), Cranelift IR (`"clif"`),
/// or GPU kernels (`"wgsl"`, `"ptx"`). `target_cpu` is the CPU the
/// library's generated code is for: `"native"`, or `"x86-64-v2"`, `-v3`,
/// `-v4`. Returns the paths written.
#[pyfunction]
#[pyo3(signature = (path, out_dir, name = None, emit = "so", opt_level = 2, target_cpu = "native"))]
fn compile(
    py: Python<'_>,
    path: PathBuf,
    out_dir: PathBuf,
    name: Option<String>,
    emit: &str,
    opt_level: u8,
    target_cpu: &str,
) -> PyResult<Vec<String>> {
    let target_cpu = egret::backends::cpu::TargetCpu::parse(target_cpu).ok_or_else(|| {
        error(format!("unknown target_cpu `{target_cpu}` ({})", egret::backends::cpu::TargetCpu::NAMES.join(", ")))
    })?;
    let opts = egret::CompileOptions { opt_level, target_cpu, ..Default::default() };
    let name = name.unwrap_or_else(|| {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
        let folder = path.parent().and_then(|p| p.file_name()).and_then(|s| s.to_str());
        let base = if stem == "model" { folder.unwrap_or(stem) } else { stem };
        egret::aot::c_name(if path.is_dir() { path.file_name().and_then(|s| s.to_str()).unwrap_or(base) } else { base })
    });
    let written = py.detach(|| match emit {
        "wgsl" => egret::aot::write_wgsl(&path, &out_dir, &opts),
        "ptx" => egret::aot::write_ptx(&path, &out_dir, &opts),
        "so" | "obj" | "clif" => {
            let kind = match emit {
                "so" => egret::aot::Emit::SharedLibrary,
                "obj" => egret::aot::Emit::Object,
                _ => egret::aot::Emit::Clif,
            };
            egret::aot::compile_library(&path, &out_dir, &name, kind, &opts)
        }
        other => Err(egret::Error::Usage(format!("unknown emit `{other}` (so, obj, clif, wgsl or ptx)"))),
    });
    Ok(written.map_err(error)?.into_iter().map(|p| p.display().to_string()).collect())
}

#[pymodule(name = "egret")]
fn egret_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<InferenceSession>()?;
    m.add_class::<NodeArg>()?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add("EgretError", m.py().get_type::<EgretError>())?;
    Ok(())
}
