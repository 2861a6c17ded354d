//! ONNX import: protobuf in, a verified `egret_ir::Graph` out.
//!
//! The importer walks the ONNX nodes in dependency order and hands each to a
//! builder from the op registry (`registry`), which reads attributes with
//! their ONNX defaults and emits IR ops in Egret's normalised form. A
//! `dim_param` the options give a value (`dims`, or an input's shape) is
//! bound before any node is built; the others stay symbolic (`egret_ir::Dim`),
//! `past_sequence + sequence` read as the expression it spells.
//!
//! Values that later ops need at compile time (a `Reshape`'s shape, a
//! `Slice`'s starts) are tracked as *known* while importing: the output of
//! `Shape` is known from the static type, and any small op whose inputs are
//! all known is evaluated with the IR's reference semantics, or, when some
//! are symbolic, over dim expressions (`symbolic.rs`). The graph itself keeps
//! those nodes; the canonicaliser folds them away once the dims are known.

mod context;
mod error;
mod ops;
mod registry;
mod symbolic;
pub use registry::supported_ops;
pub mod tensor;

pub use error::ImportError;
pub use tensor::{dtype_from_onnx, dtype_to_onnx, tensor_from_proto, tensor_to_proto};

use egret_ir::{DType, Graph, Tensor};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The oldest and newest default-domain opsets the importer accepts. Opsets
/// 13 to 21 are what the op registry is written against; older and newer
/// ones are accepted because the ops a transformer uses kept their meaning,
/// and builders check the version where it did change.
pub const MIN_OPSET: i64 = 1;
pub const MAX_OPSET: i64 = 28;

#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Values of symbolic dimensions (`batch=1`).
    pub dims: HashMap<String, usize>,
    /// Shapes of graph inputs, for inputs whose declared shape is symbolic.
    pub input_shapes: HashMap<String, Vec<usize>>,
    /// Input values the caller can offer. If an op needs an input's value at
    /// compile time (a shape given as a graph input), the importer
    /// specialises the graph on it; the runtime then checks every call
    /// passes that same value.
    pub input_values: HashMap<String, Tensor>,
    /// Keep `dim_param`s symbolic even where `input_shapes` or
    /// `input_values` give the inputs' shapes (they are then only checked
    /// for rank): one graph for every value of the symbols. `dims` still
    /// binds the symbols it names.
    pub keep_symbolic: bool,
}

/// An imported model.
#[derive(Clone, Debug)]
pub struct Imported {
    pub graph: Graph,
    /// Graph inputs the graph was specialised on, with the value it assumes.
    pub specialized: Vec<(String, Tensor)>,
    /// The inputs' `dim_param`s that were bound, in order of first use, with
    /// their sizes. The others stay symbolic (`Graph::symbols`).
    pub symbols: Vec<(String, usize)>,
    pub opset: i64,
    pub producer: String,
}

/// A dim of a graph input or output as the model file declares it.
#[derive(Clone, Debug, PartialEq)]
pub enum DeclaredDim {
    Fixed(usize),
    /// A `dim_param`: `batch`, `sequence`, `past_sequence + 1`, ...
    Symbol(String),
    Unknown,
}

/// A graph input or output as the model file declares it, before any dim
/// is bound: what onnxruntime's `get_inputs` reports.
#[derive(Clone, Debug)]
pub struct Declared {
    pub name: String,
    pub dtype: DType,
    /// `None` where the model gives no shape.
    pub dims: Option<Vec<DeclaredDim>>,
}

/// The graph inputs (initialisers listed among them left out) and outputs
/// of the model at `path`, as declared. Reads only the graph's signature.
pub fn declared_io(path: &Path) -> Result<(Vec<Declared>, Vec<Declared>), ImportError> {
    use onnx_protobuf::tensor_shape_proto::dimension::Value as Dim;
    use protobuf::Message;
    let bytes = std::fs::read(path).map_err(|error| ImportError::Io { path: path.to_path_buf(), error })?;
    let model = onnx_protobuf::ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| ImportError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
    let g = model.graph.as_ref().ok_or(ImportError::NoGraph)?;
    let initializers: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let declared = |v: &onnx_protobuf::ValueInfoProto, input: bool| -> Result<Declared, ImportError> {
        let err = |message: String| {
            if input {
                ImportError::Input { input: v.name.clone(), message }
            } else {
                ImportError::Tensor { tensor: v.name.clone(), message }
            }
        };
        let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) = v.type_.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(err("only tensors are supported (not sequences, maps or optionals)".into()));
        };
        let dtype = tensor::dtype_from_onnx(tt.elem_type).map_err(err)?;
        let dims = tt.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(Dim::DimValue(v)) if *v >= 0 => DeclaredDim::Fixed(*v as usize),
                    Some(Dim::DimParam(p)) => DeclaredDim::Symbol(p.clone()),
                    _ => DeclaredDim::Unknown,
                })
                .collect()
        });
        Ok(Declared { name: v.name.clone(), dtype, dims })
    };
    let inputs = g
        .input
        .iter()
        .filter(|v| !initializers.contains(v.name.as_str()))
        .map(|v| declared(v, true))
        .collect::<Result<_, _>>()?;
    let outputs = g.output.iter().map(|v| declared(v, false)).collect::<Result<_, _>>()?;
    Ok((inputs, outputs))
}

/// Reads and imports a `.onnx` file. External data resolves inside its folder.
pub fn import_file(path: &Path, opts: &ImportOptions) -> Result<Imported, ImportError> {
    let bytes = std::fs::read(path).map_err(|error| ImportError::Io { path: path.to_path_buf(), error })?;
    let base = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    let model = parse(&bytes, path)?;
    // The file's bytes go before the weights are decoded: at most one copy
    // of a weight in flight beside the decoded ones.
    drop(bytes);
    import_model(model, base, opts)
}

fn parse(bytes: &[u8], path: &Path) -> Result<onnx_protobuf::ModelProto, ImportError> {
    use protobuf::Message;
    let model = onnx_protobuf::ModelProto::parse_from_bytes(bytes)
        .map_err(|e| ImportError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
    if model.graph.is_none() {
        return Err(if bytes.is_empty() {
            ImportError::Parse { path: path.to_path_buf(), message: "the file is empty".into() }
        } else {
            ImportError::NoGraph
        });
    }
    Ok(model)
}

/// Imports a serialised `ModelProto`. `base` is the folder external data
/// lives in; `path` only names the model in errors.
pub fn import_bytes(
    bytes: &[u8],
    base: Option<&Path>,
    path: &Path,
    opts: &ImportOptions,
) -> Result<Imported, ImportError> {
    import_model(parse(bytes, path)?, base, opts)
}

/// Imports a parsed model. Its initializers are decoded once, each one's
/// bytes released as it is (a retry for input values reuses them).
fn import_model(
    mut model: onnx_protobuf::ModelProto,
    base: Option<&Path>,
    opts: &ImportOptions,
) -> Result<Imported, ImportError> {
    let weights = context::decode_initializers(&mut model, base)?;
    // Specialise on input values only when some op asks for them, one retry per request.
    let mut specialize: HashSet<String> = HashSet::new();
    loop {
        match context::Importer::run(&model, &weights, base, opts, &specialize) {
            Err(ImportError::NeedsInputValue { inputs, .. })
                if inputs.iter().all(|i| opts.input_values.contains_key(i) && !specialize.contains(i)) =>
            {
                specialize.extend(inputs);
            }
            other => return other,
        }
    }
}

/// The ONNX protobuf types and the `Message` trait, for callers that read
/// or write `.pb` tensors without depending on protobuf themselves.
pub mod proto {
    pub use onnx_protobuf::{Message, TensorProto};
}
