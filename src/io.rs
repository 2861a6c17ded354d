//! Tensor files (`.npy`, ONNX `.pb`) and deterministic random inputs.

use crate::Error;
// The protobuf types come through the frontend, so the facade needs no
// protobuf dependency of its own.
use egret_frontend::proto::{Message, TensorProto};
use egret_ir::{DType, Data, Graph, Op, Tensor, Type, ValueId};
use std::path::Path;

fn usage(m: impl Into<String>) -> Error {
    Error::Usage(m.into())
}

/// Reads a tensor from `.npy` or `.pb` (a serialised ONNX TensorProto).
pub fn read_tensor(path: &Path) -> Result<Tensor, Error> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => read_npy(path),
        Some("pb") => read_pb(path).map(|(_, t)| t),
        _ => Err(usage(format!("`{}`: input files must be .npy or .pb", path.display()))),
    }
}

/// Reads an ONNX `TensorProto` file; returns its name (possibly empty) and value.
pub fn read_pb(path: &Path) -> Result<(String, Tensor), Error> {
    use egret_frontend::tensor::tensor_from_proto;
    let bytes = std::fs::read(path).map_err(|e| usage(format!("cannot read `{}`: {e}", path.display())))?;
    let proto = TensorProto::parse_from_bytes(&bytes)
        .map_err(|e| usage(format!("`{}` is not an ONNX TensorProto: {e}", path.display())))?;
    let t = tensor_from_proto(&proto, path.parent())?;
    Ok((proto.name.clone(), t))
}

pub fn write_pb(path: &Path, name: &str, t: &Tensor) -> Result<(), Error> {
    let bytes = egret_frontend::tensor::tensor_to_proto(t, name).write_to_bytes().map_err(|e| usage(e.to_string()))?;
    std::fs::write(path, bytes).map_err(|e| usage(format!("cannot write `{}`: {e}", path.display())))
}

pub fn read_npy(path: &Path) -> Result<Tensor, Error> {
    let err = |m: String| usage(format!("`{}`: {m}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let npy =
        npyz::NpyFile::new(std::io::BufReader::new(file)).map_err(|e| err(format!("not a valid .npy file: {e}")))?;
    if npy.order() == npyz::Order::Fortran && npy.shape().len() > 1 {
        return Err(err("Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into()));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let npyz::DType::Plain(ts) = npy.dtype() else {
        return Err(err("structured arrays are not supported".into()));
    };
    let ts = ts.to_string();
    let io = |e: std::io::Error| err(format!("bad data: {e}"));
    let data = match ts.as_str() {
        "<f4" => Data::F32(npy.into_vec().map_err(io)?.into()),
        "<f8" => Data::F64(npy.into_vec().map_err(io)?.into()),
        "<f2" => Data::F16(npy.into_vec().map_err(io)?.into()),
        "|i1" | "<i1" => Data::I8(npy.into_vec().map_err(io)?.into()),
        "<i2" => Data::I16(npy.into_vec().map_err(io)?.into()),
        "<i4" => Data::I32(npy.into_vec().map_err(io)?.into()),
        "<i8" => Data::I64(npy.into_vec().map_err(io)?.into()),
        "|u1" | "<u1" => Data::U8(npy.into_vec().map_err(io)?.into()),
        "<u2" => Data::U16(npy.into_vec().map_err(io)?.into()),
        "<u4" => Data::U32(npy.into_vec().map_err(io)?.into()),
        "<u8" => Data::U64(npy.into_vec().map_err(io)?.into()),
        "|b1" => Data::Bool(npy.into_vec().map_err(io)?.into()),
        other => return Err(err(format!("dtype `{other}` is not supported"))),
    };
    Tensor::try_new(shape, data).map_err(err)
}

pub fn write_npy(path: &Path, t: &Tensor) -> Result<(), Error> {
    use npyz::WriterBuilder;
    let err = |m: String| usage(format!("cannot write `{}`: {m}", path.display()));
    let file = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| err(e.to_string()))?);
    let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    macro_rules! write {
        ($v:expr) => {{
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(file)
                .begin_nd()
                .map_err(|e| err(e.to_string()))?;
            w.extend($v.iter().copied()).map_err(|e| err(e.to_string()))?;
            w.finish().map_err(|e| err(e.to_string()))
        }};
    }
    match t.data() {
        // numpy has no bfloat16: its values are written as f32, exactly.
        Data::BF16(v) => write!(v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>()),
        Data::F32(v) => write!(v),
        Data::F64(v) => write!(v),
        Data::F16(v) => write!(v),
        Data::I8(v) => write!(v),
        Data::I16(v) => write!(v),
        Data::I32(v) => write!(v),
        Data::I64(v) => write!(v),
        Data::U8(v) => write!(v),
        Data::U16(v) => write!(v),
        Data::U32(v) => write!(v),
        Data::U64(v) => write!(v),
        Data::Bool(v) => write!(v),
    }
}

/// A small deterministic generator (SplitMix64): random inputs must be the
/// same on every machine and every run.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The exclusive upper bound for an integer input that the model uses as
/// indices: the smallest axis length any `gather` indexes with it, looking
/// through casts and reshapes.
fn index_bound(g: &Graph, input: ValueId) -> Option<usize> {
    let mut bound: Option<usize> = None;
    let mut stack = vec![input];
    while let Some(v) = stack.pop() {
        for n in g.consumers(g.producer(v)) {
            let node = g.node(n);
            let Some(slot) = node.inputs.iter().position(|&x| x == v) else {
                continue;
            };
            match &node.op {
                Op::Gather { axis } if slot == 1 => {
                    if let Some(len) = g.ty(node.inputs[0]).shape[*axis].size() {
                        bound = Some(bound.map_or(len, |b| b.min(len)));
                    }
                }
                Op::GatherElements { axis } if slot == 1 => {
                    if let Some(len) = g.ty(node.inputs[0]).shape[*axis].size() {
                        bound = Some(bound.map_or(len, |b| b.min(len)));
                    }
                }
                Op::Cast { .. }
                | Op::Reshape { .. }
                | Op::Identity
                | Op::Expand { .. }
                | Op::Transpose { .. }
                | Op::Slice { .. } => stack.extend(node.outputs.iter().copied()),
                _ => {}
            }
        }
    }
    bound
}

/// The index range of each integer input of `g` that the graph shows
/// (`index_bound`), by name: what random values for it are drawn below.
pub fn index_bounds(g: &Graph) -> Vec<(String, usize)> {
    g.inputs()
        .iter()
        .filter(|&&v| !g.ty(v).dtype.is_float() && g.ty(v).dtype != DType::Bool)
        .filter_map(|&v| Some((g.input_name(v).to_string(), index_bound(g, v)?)))
        .collect()
}

/// Deterministic random inputs for every graph input: floats uniform in
/// [-1, 1), bools fair coins, integers inside the index range the model
/// shows (and all ones for inputs named like masks). Errors name any
/// integer input whose valid range the model does not show.
pub fn random_inputs(g: &Graph, seed: u64) -> Result<Vec<(String, Tensor)>, Error> {
    random_inputs_except(g, seed, &[])
}

/// `random_inputs` for the inputs not named in `given`.
pub fn random_inputs_except(g: &Graph, seed: u64, given: &[String]) -> Result<Vec<(String, Tensor)>, Error> {
    let inputs: Vec<(String, Type)> =
        g.inputs().iter().map(|&v| (g.input_name(v).to_string(), g.ty(v).clone())).collect();
    random_inputs_of(&inputs, &index_bounds(g), seed, given)
}

/// `random_inputs_except` for inputs of these types, integer ones drawn
/// within `bounds` (`index_bounds`).
pub fn random_inputs_of(
    inputs: &[(String, Type)],
    bounds: &[(String, usize)],
    seed: u64,
    given: &[String],
) -> Result<Vec<(String, Tensor)>, Error> {
    let mut rng = SplitMix::new(seed);
    let mut out = Vec::new();
    for (name, ty) in inputs {
        if given.contains(name) {
            continue;
        }
        let Some(shape) = ty.known_shape() else {
            return Err(usage(format!(
                "input `{name}` has the symbolic shape {ty}: give its dims values with --dim NAME=N, or pass --input {name}=FILE"
            )));
        };
        let n = shape.iter().product();
        let data = match ty.dtype {
            DType::F32 | DType::F64 | DType::F16 | DType::BF16 => {
                Data::from_f64s(ty.dtype, &(0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect::<Vec<_>>())
            }
            DType::Bool => Data::Bool((0..n).map(|_| rng.next_u64() & 1 == 1).collect()),
            dt => {
                let bound = bounds.iter().find(|(b, _)| b == name).map(|&(_, b)| b);
                let vals: Vec<i64> = if let Some(b) = bound {
                    (0..n).map(|_| (rng.next_u64() % b.max(1) as u64) as i64).collect()
                } else if name.to_lowercase().contains("mask") {
                    vec![1; n]
                } else {
                    return Err(usage(format!(
                        "cannot choose values for integer input `{name}` ({ty}): the model does not show its valid range; pass --input {name}=FILE"
                    )));
                };
                Data::from_i64s(dt, &vals)
            }
        };
        out.push((name.clone(), Tensor::new(shape, data)));
    }
    Ok(out)
}
