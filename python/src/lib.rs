//! Egret from Python, with onnxruntime's `InferenceSession` API: existing
//! code swaps the import. Arrays go in and come out as numpy arrays; the
//! GIL is released while a model compiles and while it runs; Egret's
//! errors (a bad model, a wrong input name, dtype or shape) raise
//! `egret.EgretError` with Egret's message.

/// Large blocks (a run's inputs and outputs, numpy arrays made from them)
/// reused rather than mapped afresh each run (`egret::alloc`).
#[global_allocator]
static ALLOC: egret::alloc::Recycling = egret::alloc::Recycling;

use numpy::{PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use egret::ir::{DType, Data, Tensor, TensorRef, Type};

pyo3::create_exception!(egret, EgretError, pyo3::exceptions::PyException);

fn error(e: impl std::fmt::Display) -> PyErr {
    EgretError::new_err(e.to_string())
}

/// onnxruntime's spelling of an element type.
fn type_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "tensor(float)",
        DType::F64 => "tensor(double)",
        DType::F16 => "tensor(float16)",
        DType::BF16 => "tensor(bfloat16)",
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
                    // One copy of a C-ordered array's memory; element by
                    // element, in logical order, for any other layout
                    // (`as_slice` would give a Fortran-ordered one's
                    // elements in memory order).
                    let data: Vec<$t> = match a.as_slice() {
                        Ok(contiguous) if a.is_c_contiguous() => contiguous.to_vec(),
                        _ => a.as_array().iter().copied().collect(),
                    };
                    return Ok(Tensor::from_vec(shape, data));
                }
            )*
        };
    }
    try_as!(f32, f64, egret::ir::half::f16, i64, i32, i16, i8, u8, u16, u32, u64, bool);
    match value.cast::<numpy::PyUntypedArray>() {
        Ok(a) => {
            let dtype = a.dtype().str().map(|s| s.to_string()).unwrap_or_else(|_| "?".into());
            Err(error(format!("input `{name}` has numpy dtype {dtype}, which Egret does not take")))
        }
        Err(_) => Err(error(format!("input `{name}` must be a numpy array, not {}", value.get_type().name()?))),
    }
}

/// A contiguous, aligned numpy array of a type Egret takes, as Egret reads
/// it in place: its element type, shape and bytes (`None` for an array
/// that needs `tensor_of`'s copy: strided, unaligned, another type). The
/// bytes are the array's own memory, valid while the array lives; the
/// caller keeps a reference to it for as long as it reads them.
fn borrowed_parts(value: &Bound<'_, PyAny>) -> Option<(DType, Vec<usize>, *const u8, usize)> {
    macro_rules! try_as {
        ($($t:ty => $d:ident),*) => {
            $(
                if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'_, $t>>() {
                    // `as_slice` takes Fortran order too, in memory order.
                    if !a.is_c_contiguous() {
                        return None;
                    }
                    let slice = a.as_slice().ok()?;
                    let ptr = slice.as_ptr() as *const u8;
                    return (ptr as usize % std::mem::align_of::<$t>() == 0)
                        .then(|| (DType::$d, a.shape().to_vec(), ptr, std::mem::size_of_val(slice)));
                }
            )*
        };
    }
    try_as!(f32 => F32, f64 => F64, egret::ir::half::f16 => F16, i64 => I64, i32 => I32, i16 => I16, i8 => I8,
        u8 => U8, u16 => U16, u32 => U32, u64 => U64, bool => Bool);
    None
}

/// A run's inputs: each numpy array borrowed where it lies when it can be
/// (no copy: a decoder's past is most of a step's inputs), else copied.
struct Feed<'py> {
    held: Vec<(String, Fed, Bound<'py, PyAny>)>,
}

enum Fed {
    Borrowed { dtype: DType, shape: Vec<usize>, ptr: *const u8, len: usize },
    Copied(Tensor),
}

impl<'py> Feed<'py> {
    fn of(input_feed: &Bound<'py, PyDict>) -> PyResult<Feed<'py>> {
        let mut held = Vec::with_capacity(input_feed.len());
        for (k, v) in input_feed.iter() {
            let name: String = k.extract().map_err(|_| error("input names must be strings"))?;
            let fed = match borrowed_parts(&v) {
                Some((dtype, shape, ptr, len)) => Fed::Borrowed { dtype, shape, ptr, len },
                None => Fed::Copied(tensor_of(&name, &v)?),
            };
            // The reference keeps the array (and so its memory) alive for
            // the run, whatever else happens to the dict meanwhile.
            held.push((name, fed, v));
        }
        Ok(Feed { held })
    }

    fn refs(&self) -> PyResult<Vec<(&str, TensorRef<'_>)>> {
        self.held
            .iter()
            .map(|(name, fed, _)| {
                let t = match fed {
                    // The array is held by `self.held` and was checked
                    // contiguous and aligned with exactly `len` bytes.
                    Fed::Borrowed { dtype, shape, ptr, len } => {
                        TensorRef::new(*dtype, shape, unsafe { std::slice::from_raw_parts(*ptr, *len) })
                            .map_err(|m| error(format!("input `{name}`: {m}")))?
                    }
                    Fed::Copied(t) => t.view(),
                };
                Ok((name.as_str(), t))
            })
            .collect()
    }
}

/// A tensor's values as a new numpy array (a copy: the tensor stays).
fn array_of<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    array_from(py, t.clone())
}

/// A tensor as a numpy array that takes over its memory: no copy. A run's
/// outputs are fresh memory the size of the model's outputs (a decoder's
/// presents: 70 MB a step for GPT-2 small at 960 past positions); a copy
/// would be a second such allocation, every page of it faulted in.
fn array_from<'py>(py: Python<'py>, t: Tensor) -> PyResult<Bound<'py, PyAny>> {
    let shape = t.shape().to_vec();
    macro_rules! arr {
        ($v:expr) => {
            numpy::PyArray1::from_vec(py, Vec::from($v)).reshape(shape)?.into_any()
        };
    }
    Ok(match t.into_data() {
        Data::F32(v) => arr!(v),
        Data::F64(v) => arr!(v),
        Data::F16(v) => arr!(v),
        // numpy has no bfloat16 of its own: the values as float32, exactly.
        Data::BF16(v) => arr!(v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>()),
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
    /// once for all their values; each run's shapes give them values, and
    /// the backend compiles a program per value of the dims its kernels
    /// need known, if any (keeping `max_compiled_shapes`).
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
    /// dim left unbound takes each run's value from its input shapes: the
    /// CPU's program keeps it symbolic where its kernels can (compiled now),
    /// else compiles per value of the dims they need, as a GPU does per
    /// binding; the session keeps `max_compiled_shapes` of those programs.
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
            // The session runs the program: the compiled graph (every weight
            // in f32, besides the program's packed copies) is not needed.
            keep_graph: false,
            ..Default::default()
        };
        let model = Arc::new(py.detach(|| egret::compile(&path, &opts)).map_err(error)?);
        let declared = if model.program.signature.is_symbolic() {
            let file = if path.is_dir() { path.join("model.onnx") } else { path.clone() };
            Some(egret::frontend::declared_io(&file).map_err(error)?)
        } else {
            None
        };
        // What the compile and the graph freed leaves the process (`egret::alloc`).
        egret::alloc::release_kept();
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
        let feed = Feed::of(input_feed)?;
        let named = feed.refs()?;
        let wanted = self.output_positions(output_names.as_deref())?;
        // Another Python thread writing an input array during the run races
        // with it, as it does with onnxruntime, which also reads in place.
        let results = py.detach(|| self.model.run_refs(&named)).map_err(error)?;
        drop(named);
        drop(feed);
        // Each output handed over whole at its last mention (a name asked
        // for twice is copied for the earlier one).
        let mut results: Vec<Option<Tensor>> = results.into_iter().map(|(_, t)| Some(t)).collect();
        let last = |at: usize| !wanted[at + 1..].contains(&wanted[at]);
        (0..wanted.len())
            .map(|at| {
                let i = wanted[at];
                match last(at) {
                    true => array_from(py, results[i].take().expect("an output taken at its last mention")),
                    false => array_of(py, results[i].as_ref().expect("an output not yet taken")),
                }
            })
            .collect()
    }

    /// An `IOBinding`, as onnxruntime's: inputs and outputs bound by name,
    /// outputs kept on Egret's side as `OrtValue`s that can be bound as the
    /// next run's inputs (a decoder's presents fed back as its past)
    /// without passing through numpy.
    fn io_binding(&self) -> IOBinding {
        IOBinding::default()
    }

    /// Runs on the inputs bound to `iobinding` and stores the bound outputs
    /// (all of them if none is bound) in it.
    #[pyo3(signature = (iobinding, run_options = None))]
    fn run_with_iobinding(
        &self,
        py: Python<'_>,
        iobinding: &IOBinding,
        run_options: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if run_options.is_some_and(|o| !o.is_none()) {
            return Err(error("run_options are not supported"));
        }
        let names = lock(&iobinding.outputs).clone();
        let wanted = self.output_positions(if names.is_empty() { None } else { Some(&names) })?;
        // The bound tensors shared, not copied: the run reads them in place.
        let bound: Vec<(String, Arc<Tensor>)> = lock(&iobinding.inputs).clone();
        let named: Vec<(&str, TensorRef)> = bound.iter().map(|(n, t)| (n.as_str(), t.view())).collect();
        let results = py.detach(|| self.model.run_refs(&named)).map_err(error)?;
        let mut results: Vec<Option<Tensor>> = results.into_iter().map(|(_, t)| Some(t)).collect();
        let outputs = &self.model.program.signature.outputs;
        *lock(&iobinding.results) = wanted
            .into_iter()
            // `bind_output` keeps each name once, so each result is taken once.
            .map(|i| (outputs[i].0.clone(), Arc::new(results[i].take().expect("each output is bound once"))))
            .collect();
        Ok(())
    }

    /// The number of programs the backend has compiled: one for a model
    /// whose dims were all bound when the session was made; with unbound
    /// symbolic dims, one per value of the dims the backend needs known
    /// that the runs have had (the session keeps the last
    /// `max_compiled_shapes` of them).
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

impl InferenceSession {
    /// Positions of the named outputs (all of them for `None`), in order.
    fn output_positions(&self, names: Option<&[String]>) -> PyResult<Vec<usize>> {
        let outputs = &self.model.program.signature.outputs;
        match names {
            None => Ok((0..outputs.len()).collect()),
            Some(names) => names
                .iter()
                .map(|n| {
                    outputs.iter().position(|(o, _)| o == n).ok_or_else(|| {
                        let known: Vec<&str> = outputs.iter().map(|(o, _)| o.as_str()).collect();
                        error(format!("the model has no output `{n}` (its outputs: {})", known.join(", ")))
                    })
                })
                .collect(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while the lock was held leaves the value as it was.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A tensor held on Egret's side, as onnxruntime's `OrtValue` (on the CPU).
#[pyclass(frozen, module = "egret")]
struct OrtValue {
    tensor: Arc<Tensor>,
}

#[pymethods]
impl OrtValue {
    /// A copy of `array` held by Egret.
    #[staticmethod]
    #[pyo3(signature = (array, device_type = "cpu", device_id = 0))]
    fn ortvalue_from_numpy(array: &Bound<'_, PyAny>, device_type: &str, device_id: i64) -> PyResult<OrtValue> {
        cpu_device(device_type, device_id)?;
        Ok(OrtValue { tensor: Arc::new(tensor_of("array", array)?) })
    }

    /// The values as a new numpy array.
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        array_of(py, &self.tensor)
    }

    fn shape(&self) -> Vec<usize> {
        self.tensor.shape().to_vec()
    }

    /// The element type in onnxruntime's spelling (`tensor(float)`).
    fn data_type(&self) -> &'static str {
        type_name(self.tensor.dtype())
    }

    fn device_name(&self) -> &'static str {
        "cpu"
    }

    fn is_tensor(&self) -> bool {
        true
    }

    fn __repr__(&self) -> String {
        format!("OrtValue({})", self.tensor.ty())
    }
}

/// Where a value lives: Egret's runs take and give tensors in host memory.
fn cpu_device(device_type: &str, device_id: i64) -> PyResult<()> {
    if device_type != "cpu" || device_id != 0 {
        return Err(error(format!(
            "values live in host memory (device_type \"cpu\", device_id 0), not {device_type}:{device_id}"
        )));
    }
    Ok(())
}

/// Inputs and outputs bound by name for `run_with_iobinding`, as
/// onnxruntime's `IOBinding` (on the CPU).
#[pyclass(frozen, module = "egret")]
#[derive(Default)]
struct IOBinding {
    inputs: Mutex<Vec<(String, Arc<Tensor>)>>,
    outputs: Mutex<Vec<String>>,
    /// The last run's bound outputs.
    results: Mutex<Vec<(String, Arc<Tensor>)>>,
}

impl IOBinding {
    fn bind(&self, name: &str, tensor: Arc<Tensor>) {
        let mut inputs = lock(&self.inputs);
        inputs.retain(|(n, _)| n != name);
        inputs.push((name.to_string(), tensor));
    }
}

#[pymethods]
impl IOBinding {
    /// Binds input `name` to a copy of `array`.
    fn bind_cpu_input(&self, name: &str, array: &Bound<'_, PyAny>) -> PyResult<()> {
        self.bind(name, Arc::new(tensor_of(name, array)?));
        Ok(())
    }

    /// Binds input `name` to `value` (an output of an earlier run, say).
    fn bind_ortvalue_input(&self, name: &str, value: &OrtValue) {
        self.bind(name, value.tensor.clone());
    }

    /// Asks for output `name`; without any, a run gives every output.
    #[pyo3(signature = (name, device_type = "cpu", device_id = 0, element_type = None, shape = None, buffer_ptr = None))]
    fn bind_output(
        &self,
        name: &str,
        device_type: &str,
        device_id: i64,
        element_type: Option<&Bound<'_, PyAny>>,
        shape: Option<Vec<usize>>,
        buffer_ptr: Option<usize>,
    ) -> PyResult<()> {
        cpu_device(device_type, device_id)?;
        if element_type.is_some() || shape.is_some() || buffer_ptr.is_some() {
            return Err(error("outputs are allocated by Egret: bind_output takes a name (and the cpu device) only"));
        }
        let mut outputs = lock(&self.outputs);
        if !outputs.iter().any(|n| n == name) {
            outputs.push(name.to_string());
        }
        Ok(())
    }

    /// The last run's outputs, in the order they were bound, on Egret's side.
    fn get_outputs(&self) -> Vec<OrtValue> {
        lock(&self.results).iter().map(|(_, t)| OrtValue { tensor: t.clone() }).collect()
    }

    /// The last run's outputs as numpy arrays.
    fn copy_outputs_to_cpu<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        lock(&self.results).iter().map(|(_, t)| array_of(py, t)).collect()
    }

    fn clear_binding_inputs(&self) {
        lock(&self.inputs).clear();
    }

    fn clear_binding_outputs(&self) {
        lock(&self.outputs).clear();
        lock(&self.results).clear();
    }
}

/// Compiles a model ahead of time into `out_dir`: a shared library and C
/// header (`emit="so"`), an object file (`"obj"`), Cranelift IR (`"clif"`),
/// or GPU kernels (`"wgsl"`, `"ptx"`). `target_cpu` is the CPU the
/// library's generated code is for: `"native"`, or `"x86-64-v2"`, `-v3`,
/// `-v4`. `dims` fixes symbolic dims (`{"batch": 1}`); a library keeps
/// the others symbolic, and its caller gives their values with
/// `NAME_context_set_input_dims`. Returns the paths written.
#[pyfunction]
#[pyo3(signature = (path, out_dir, name = None, emit = "so", opt_level = 2, target_cpu = "native", dims = None))]
#[allow(clippy::too_many_arguments)]
fn compile(
    py: Python<'_>,
    path: PathBuf,
    out_dir: PathBuf,
    name: Option<String>,
    emit: &str,
    opt_level: u8,
    target_cpu: &str,
    dims: Option<HashMap<String, usize>>,
) -> PyResult<Vec<String>> {
    let target_cpu = egret::backends::cpu::TargetCpu::parse(target_cpu).ok_or_else(|| {
        error(format!("unknown target_cpu `{target_cpu}` ({})", egret::backends::cpu::TargetCpu::NAMES.join(", ")))
    })?;
    let opts = egret::CompileOptions {
        opt_level,
        target_cpu,
        dims: dims.unwrap_or_default().into_iter().collect(),
        ..Default::default()
    };
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
    m.add_class::<OrtValue>()?;
    m.add_class::<IOBinding>()?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add("EgretError", m.py().get_type::<EgretError>())?;
    Ok(())
}
