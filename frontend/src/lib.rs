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
mod wire;
pub use registry::supported_ops;
pub mod tensor;

pub use error::ImportError;
pub use tensor::{carrier_from_onnx, dtype_from_onnx, dtype_to_onnx, tensor_from_proto, tensor_to_proto};

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
    /// Read every weight into memory. By default a weight of 64 KiB or more
    /// that lies aligned in the model file or its external data is mapped
    /// and read in place (`egret_ir::Buf`): a backend that packs it copies
    /// it once, and one that does not never copies it.
    pub read_weights: bool,
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
    let (model, _) = read_structure(path)?;
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
        let dtype = tensor::carrier_from_onnx(tt.elem_type).map_err(err)?.0;
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
    let base = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    match read_structure(path)? {
        (model, Some((file, raw))) => import_model(model, base, opts, Some((&file, &raw))),
        (model, None) => import_model(model, base, opts, None),
    }
}

/// Parses the model at `path` with its inline weights left in the file
/// (`wire`): the structure, and the open file with each initializer's
/// `raw_data` range. A file the walk does not understand is read and
/// parsed whole, weights and all, which reports what is wrong with it.
fn read_structure(path: &Path) -> Result<(onnx_protobuf::ModelProto, Option<WeightsInFile>), ImportError> {
    let io = |error| ImportError::Io { path: path.to_path_buf(), error };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if let Ok(set) = wire::set_aside_raw_data(&file, len) {
        let model = parse(&set.structure, path)?;
        let initializers = model.graph.as_ref().map_or(0, |g| g.initializer.len());
        if initializers == set.raw.len() {
            return Ok((model, Some((file, set.raw))));
        }
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let model = parse(&bytes, path)?;
    // The file's bytes go before the weights are decoded: at most one copy
    // of a weight in flight beside the decoded ones.
    drop(bytes);
    Ok((model, None))
}

/// A model file and where each initializer's `raw_data` lies in it.
type WeightsInFile = (std::fs::File, Vec<Option<std::ops::Range<u64>>>);

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
    import_model(parse(bytes, path)?, base, opts, None)
}

/// Imports a parsed model. Its initializers are decoded once, each one's
/// bytes released as it is (a retry for input values reuses them); those
/// the parse left in the file (`in_file`) are read from it.
fn import_model(
    mut model: onnx_protobuf::ModelProto,
    base: Option<&Path>,
    opts: &ImportOptions,
    in_file: Option<(&std::fs::File, &[Option<std::ops::Range<u64>>])>,
) -> Result<Imported, ImportError> {
    let weights = context::decode_initializers(&mut model, base, in_file, !opts.read_weights)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use onnx_protobuf::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
    use protobuf::Message;

    /// A model that adds an initializer of each stored kind to a graph input
    /// (cast to f32 where it needs to be).
    fn model() -> ModelProto {
        let mut g = GraphProto::new();
        g.name = "g".into();
        let mut add = |name: &str, data_type: i32, dims: Vec<i64>, raw: Vec<u8>| {
            let mut t = TensorProto::new();
            t.name = name.into();
            t.data_type = data_type;
            t.dims = dims;
            t.raw_data = raw;
            g.initializer.push(t);
        };
        add("w32", 1, vec![2, 3], [1.5f32, -2.0, 3.25, 0.0, 7.0, -1.0].iter().flat_map(|f| f.to_le_bytes()).collect());
        add("w16", 10, vec![3], [0x3c00u16, 0xc000, 0x3800].iter().flat_map(|f| f.to_le_bytes()).collect());
        add("wb", 9, vec![3], vec![1, 0, 1]);
        add("w4", egret_ir::NarrowType::I4.onnx_code(), vec![3], vec![0x7f, 0x08]);
        let node = |op: &str, i: &[&str], o: &str| {
            let mut n = NodeProto::new();
            n.op_type = op.into();
            n.input = i.iter().map(|s| s.to_string()).collect();
            n.output = vec![o.into()];
            n
        };
        g.node.push(node("Add", &["w32", "w16"], "a"));
        g.node.push(node("Cast", &["wb"], "b"));
        g.node.push(node("Cast", &["w4"], "c"));
        g.node[1].attribute.push({
            let mut a = onnx_protobuf::AttributeProto::new();
            a.name = "to".into();
            a.type_ = onnx_protobuf::attribute_proto::AttributeType::INT.into();
            a.i = 1;
            a
        });
        let to = g.node[1].attribute[0].clone();
        g.node[2].attribute.push(to);
        g.node.push(node("Add", &["a", "b"], "d"));
        g.node.push(node("Add", &["d", "c"], "y"));
        let mut y = onnx_protobuf::ValueInfoProto::new();
        y.name = "y".into();
        g.output.push(y);
        let mut m = ModelProto::new();
        m.ir_version = 9;
        let mut opset = OperatorSetIdProto::new();
        opset.version = 21;
        m.opset_import.push(opset);
        m.graph = Some(g).into();
        m
    }

    #[test]
    fn weights_read_from_the_file_are_the_weights_parsed_from_its_bytes() {
        let bytes = model().write_to_bytes().unwrap();
        let dir = std::env::temp_dir().join(format!("egret-frontend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.onnx");
        std::fs::write(&path, &bytes).unwrap();
        let opts = ImportOptions::default();
        let from_file = import_file(&path, &opts).unwrap();
        let from_bytes = import_bytes(&bytes, Some(&dir), &path, &opts).unwrap();
        assert_eq!(egret_ir::text::print(&from_file.graph), egret_ir::text::print(&from_bytes.graph));
        let text = egret_ir::text::print(&from_file.graph);
        for values in ["[1.5, -2.0, 3.25, 0.0, 7.0, -1.0]", "[1.0, -2.0, 0.5]", "[true, false, true]", "[-1, 7, -8]"] {
            assert!(text.contains(values), "{values} in {text}");
        }
        // A file cut short reads as the parse reports it, not as a fault.
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        assert!(matches!(import_file(&path, &opts), Err(ImportError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `y = x + a + b + c` over three f32 weights of 20,480 elements (80
    /// KiB, over `MAP_AT_LEAST`): `a` inline in the model file, `b` and `c`
    /// in external data at an aligned offset and at an odd one.
    fn model_with_large_weights(dir: &Path) -> (std::path::PathBuf, Vec<Vec<f32>>) {
        use onnx_protobuf::tensor_proto::DataLocation;
        let n = 20_480usize;
        let values: Vec<Vec<f32>> = (0..3).map(|w| (0..n).map(|i| (i * 7 + w) as f32 * 0.25 - 9.0).collect()).collect();
        let le = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let mut data = le(&values[1]);
        data.push(0xAB); // `c` starts one byte later: not aligned for f32.
        data.extend(le(&values[2]));
        std::fs::write(dir.join("weights.bin"), &data).unwrap();
        let mut g = GraphProto::new();
        g.name = "g".into();
        let mut add = |name: &str, v: &[f32], external: Option<(usize, usize)>| {
            let mut t = TensorProto::new();
            t.name = name.into();
            t.data_type = 1;
            t.dims = vec![v.len() as i64];
            match external {
                None => t.raw_data = le(v),
                Some((offset, length)) => {
                    t.data_location = DataLocation::EXTERNAL.into();
                    for (key, value) in [
                        ("location", "weights.bin".to_string()),
                        ("offset", offset.to_string()),
                        ("length", length.to_string()),
                    ] {
                        let mut kv = onnx_protobuf::StringStringEntryProto::new();
                        kv.key = key.into();
                        kv.value = value;
                        t.external_data.push(kv);
                    }
                }
            }
            g.initializer.push(t);
        };
        add("a", &values[0], None);
        add("b", &values[1], Some((0, 4 * n)));
        add("c", &values[2], Some((4 * n + 1, 4 * n)));
        let mut x = onnx_protobuf::ValueInfoProto::new();
        x.name = "x".into();
        let mut tt = onnx_protobuf::type_proto::Tensor::new();
        tt.elem_type = 1;
        let mut shape = onnx_protobuf::TensorShapeProto::new();
        let mut dim = onnx_protobuf::tensor_shape_proto::Dimension::new();
        dim.set_dim_value(n as i64);
        shape.dim.push(dim);
        tt.shape = Some(shape).into();
        let mut ty = onnx_protobuf::TypeProto::new();
        ty.set_tensor_type(tt);
        x.type_ = Some(ty).into();
        g.input.push(x.clone());
        let node = |i: &[&str], o: &str| {
            let mut nd = NodeProto::new();
            nd.op_type = "Add".into();
            nd.input = i.iter().map(|s| s.to_string()).collect();
            nd.output = vec![o.into()];
            nd
        };
        g.node.push(node(&["x", "a"], "p"));
        g.node.push(node(&["p", "b"], "q"));
        g.node.push(node(&["q", "c"], "y"));
        x.name = "y".into();
        g.output.push(x);
        let mut m = ModelProto::new();
        m.ir_version = 8;
        let mut opset = OperatorSetIdProto::new();
        opset.version = 17;
        m.opset_import.push(opset);
        m.graph = Some(g).into();
        let path = dir.join("model.onnx");
        std::fs::write(&path, m.write_to_bytes().unwrap()).unwrap();
        (path, values)
    }

    /// The graph's constants, by label, with whether each is mapped.
    fn constants(g: &egret_ir::Graph) -> Vec<(Vec<f32>, bool)> {
        (0..g.value_count() as u32)
            .filter_map(|v| g.const_value(egret_ir::ValueId(v)))
            .map(|t| match t.data() {
                egret_ir::Data::F32(b) => (b.to_vec(), b.is_mapped()),
                other => panic!("an f32 weight, not {:?}", other.dtype()),
            })
            .collect()
    }

    #[test]
    fn large_aligned_weights_are_read_in_place_and_the_rest_read_into_memory() {
        let dir = std::env::temp_dir().join(format!("egret-frontend-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, values) = model_with_large_weights(&dir);
        let mapped = constants(&import_file(&path, &ImportOptions::default()).unwrap().graph);
        let read =
            constants(&import_file(&path, &ImportOptions { read_weights: true, ..Default::default() }).unwrap().graph);
        for (w, want) in values.iter().enumerate() {
            let got = mapped.iter().find(|(v, _)| v == want).unwrap_or_else(|| panic!("weight {w} imported"));
            assert!(read.iter().any(|(v, m)| v == want && !m), "weight {w} read into memory when asked");
            // `b` lies aligned in the external data; `c` does not. Whether
            // `a` is aligned depends on where protobuf put it.
            match w {
                1 => assert!(got.1, "an aligned external weight is mapped"),
                2 => assert!(!got.1, "a misaligned one is read"),
                _ => {}
            }
        }
        // A data file cut below a weight's range is refused at import, mapped or not.
        let data = std::fs::read(dir.join("weights.bin")).unwrap();
        std::fs::write(dir.join("weights.bin"), &data[..data.len() - 4]).unwrap();
        let err = import_file(&path, &ImportOptions::default()).unwrap_err().to_string();
        assert!(err.contains("past the end of `weights.bin`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
