//! `TensorProto` to `Tensor`: typed fields, `raw_data`, and external data.

use crate::ImportError;
use egret_ir::{DType, Data, NarrowType, Tensor};
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::TensorProto;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

/// Maps an ONNX `TensorProto.DataType` code to a dtype, or says which type it is.
pub fn dtype_from_onnx(code: i32) -> Result<DType, String> {
    Ok(match code {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        4 => DType::U16,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        11 => DType::F64,
        12 => DType::U32,
        13 => DType::U64,
        8 => return Err("string tensors are not supported".into()),
        10 => DType::F16,
        16 => DType::BF16,
        14 | 15 => return Err("complex tensors are not supported".into()),
        17..=26 => {
            let t = NarrowType::from_onnx(code).expect("codes 17 to 26 are narrow");
            return Err(format!(
                "{} is taken as inputs, outputs and constants and by Cast, CastLike, QuantizeLinear and \
                 DequantizeLinear (carried in {}), not here",
                t.word(),
                t.carrier()
            ));
        }
        0 => return Err("the element type is undefined".into()),
        other => return Err(format!("unknown element type {other}")),
    })
}

/// The dtype Egret stores an ONNX element type in, and the narrow type it
/// carries if it is one (`egret_ir::narrow`): 8- and 4-bit floats in f32,
/// 4- and 2-bit integers in 8-bit ones.
pub fn carrier_from_onnx(code: i32) -> Result<(DType, Option<NarrowType>), String> {
    match NarrowType::from_onnx(code) {
        Some(t) => Ok((t.carrier(), Some(t))),
        None => Ok((dtype_from_onnx(code)?, None)),
    }
}

pub fn dtype_to_onnx(d: DType) -> i32 {
    match d {
        DType::F32 => 1,
        DType::F16 => 10,
        DType::BF16 => 16,
        DType::U8 => 2,
        DType::I8 => 3,
        DType::U16 => 4,
        DType::I16 => 5,
        DType::I32 => 6,
        DType::I64 => 7,
        DType::Bool => 9,
        DType::F64 => 11,
        DType::U32 => 12,
        DType::U64 => 13,
    }
}

/// Resolves an external-data location inside `base`, refusing absolute paths
/// and any path that climbs out of the model's folder.
pub fn resolve_external_path(base: &Path, location: &str) -> Result<PathBuf, String> {
    let rel = Path::new(location);
    if location.is_empty() {
        return Err("external data has an empty location".into());
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(format!("external data path `{location}` escapes the model's folder")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "external data path `{location}` is absolute; it must be relative to the model's folder"
                ))
            }
        }
    }
    let joined = base.join(rel);
    // A symlink inside the folder could still point outside it.
    if let (Ok(real), Ok(real_base)) = (joined.canonicalize(), base.canonicalize()) {
        if !real.starts_with(&real_base) {
            return Err(format!("external data path `{location}` resolves outside the model's folder"));
        }
    }
    Ok(joined)
}

/// Opens the file an external tensor's data lies in and finds its bytes,
/// checked against the file's size (the weights are read from there into
/// the tensor, never the whole file into memory).
fn external_range(t: &TensorProto, base: Option<&Path>) -> Result<(File, Range<u64>), String> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        match kv.key.as_str() {
            "location" => location = Some(kv.value.clone()),
            "offset" => offset = kv.value.parse().map_err(|_| format!("bad external data offset `{}`", kv.value))?,
            "length" => {
                length = Some(kv.value.parse::<u64>().map_err(|_| format!("bad external data length `{}`", kv.value))?)
            }
            _ => {}
        }
    }
    let location = location.ok_or("external data has no location")?;
    let base = base.ok_or("external data needs the model's folder; load the model from a file")?;
    let path = resolve_external_path(base, &location)?;
    let file = File::open(&path).map_err(|e| format!("cannot read external data `{}`: {e}", path.display()))?;
    let size = file.metadata().map_err(|e| format!("cannot read external data `{}`: {e}", path.display()))?.len();
    let end = match length {
        Some(l) => offset.checked_add(l).ok_or("external data range overflows")?,
        None => size,
    };
    if offset > size || end > size {
        return Err(format!("external data range {offset}..{end} is past the end of `{location}` ({size} bytes)"));
    }
    Ok((file, offset..end))
}

/// `$each!(T, Variant)` for the numeric element type `dtype` names (its
/// Rust type and its `Data` variant); `$bool` for bool, whose bytes are
/// not all valid.
macro_rules! each_numeric {
    ($dtype:expr, $each:ident, $bool:expr) => {
        match $dtype {
            DType::F32 => $each!(f32, F32),
            DType::F64 => $each!(f64, F64),
            DType::F16 => $each!(half::f16, F16),
            DType::BF16 => $each!(half::bf16, BF16),
            DType::I8 => $each!(i8, I8),
            DType::I16 => $each!(i16, I16),
            DType::I32 => $each!(i32, I32),
            DType::I64 => $each!(i64, I64),
            DType::U8 => $each!(u8, U8),
            DType::U16 => $each!(u16, U16),
            DType::U32 => $each!(u32, U32),
            DType::U64 => $each!(u64, U64),
            DType::Bool => $bool,
        }
    };
}

/// Weights smaller than this are read, not mapped: a mapping costs a
/// system call and an entry in the process's table of mappings, which a
/// quantized model's thousands of scales would fill.
pub const MAP_AT_LEAST: u64 = 64 << 10;

/// The `n` elements of `dtype` that `range` of `file` holds (a weight's
/// little-endian bytes): with `map`, read in place where they lie (a
/// private read-only mapping of that range, `Buf::mapped`) when they are
/// at least `MAP_AT_LEAST` bytes and start aligned for their type; else,
/// or where the mapping fails, read straight into the tensor's memory.
pub(crate) fn data_from_file(
    file: &File,
    range: Range<u64>,
    dtype: DType,
    n: usize,
    map: bool,
) -> Result<Data, String> {
    let len = range.end - range.start;
    if map && len >= MAP_AT_LEAST && dtype != DType::Bool && range.start % dtype.size_bytes() as u64 == 0 {
        if let Some(data) = mapped_data(file, range.clone(), dtype, n) {
            return Ok(data);
        }
    }
    decode(dtype, n, len, |bytes| read_at(file, range.start, bytes))
}

/// `range` of `file` mapped as `n` elements of `dtype`, or `None` (the
/// caller reads it instead, which also reports a length that is wrong).
fn mapped_data(file: &File, range: Range<u64>, dtype: DType, n: usize) -> Option<Data> {
    let len = usize::try_from(range.end - range.start).ok()?;
    if Some(len) != n.checked_mul(dtype.size_bytes()) {
        return None;
    }
    let map = egret_ir::map_range(file, range.start, len)?;
    macro_rules! mapped {
        ($T:ty, $V:ident) => {
            Data::$V(egret_ir::Buf::<$T>::mapped(&map, 0, n)?)
        };
    }
    Some(each_numeric!(dtype, mapped, return None))
}

/// The `n` elements of `dtype` whose `len` little-endian bytes `fill`
/// writes into the tensor's own memory (this host is little-endian, as
/// every target Egret generates code for is).
fn decode(
    dtype: DType,
    n: usize,
    len: u64,
    fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<Data, String> {
    let size = dtype.size_bytes() as u64;
    // Checked: a shape of 2^62 elements with a few bytes of data would
    // wrap the product (found by the import_bytes fuzz target).
    if Some(len) != (n as u64).checked_mul(size) {
        return Err(format!("raw data has {len} bytes but {n} elements of {dtype} need {}", n as u128 * size as u128));
    }
    macro_rules! direct {
        ($T:ty, $V:ident) => {{
            // Zeroed memory is mapped lazily; `fill` writes each page once.
            let mut v: Vec<$T> = vec![<$T as bytemuck::Zeroable>::zeroed(); n];
            fill(bytemuck::cast_slice_mut(&mut v))?;
            Data::$V(v.into())
        }};
    }
    Ok(each_numeric!(dtype, direct, {
        let mut v = vec![0u8; n];
        fill(&mut v)?;
        Data::Bool(v.into_iter().map(|b| b != 0).collect())
    }))
}

/// The bytes of `range` of `file`.
fn bytes_from_file(file: &File, range: Range<u64>) -> Result<Vec<u8>, String> {
    let n = usize::try_from(range.end - range.start).map_err(|_| "the data is too large".to_string())?;
    let mut v = vec![0u8; n];
    read_at(file, range.start, &mut v)?;
    Ok(v)
}

/// Fills `bytes` from `file` at `offset`; a file shorter than that (cut
/// since it was measured) is an error, not a fault.
fn read_at(file: &File, offset: u64, bytes: &mut [u8]) -> Result<(), String> {
    let mut f = file;
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(bytes))
        .map_err(|e| format!("cannot read its {} bytes at offset {offset}: {e}", bytes.len()))
}

fn from_le_bytes(dtype: DType, raw: &[u8], n: usize) -> Result<Data, String> {
    decode(dtype, n, raw.len() as u64, |bytes| {
        bytes.copy_from_slice(raw);
        Ok(())
    })
}

/// Decodes a `TensorProto`. `base` is the model's folder, for external data.
pub fn tensor_from_proto(t: &TensorProto, base: Option<&Path>) -> Result<Tensor, ImportError> {
    tensor_from_proto_in(t, base, None, false)
}

/// Where a tensor's `raw_data` lies in the model file when the parse set it
/// aside (`wire`).
pub(crate) type RawInFile<'a> = (&'a File, Range<u64>);

/// Decodes a `TensorProto` whose `raw_data`, if `raw` says so, is still in
/// the model file. With `map`, data in a file (the model's or external)
/// may be read in place (`data_from_file`).
pub(crate) fn tensor_from_proto_in(
    t: &TensorProto,
    base: Option<&Path>,
    raw: Option<RawInFile>,
    map: bool,
) -> Result<Tensor, ImportError> {
    let name = if t.name.is_empty() { "<unnamed>" } else { &t.name };
    let err = |m: String| ImportError::tensor(name, m);
    if let Some(narrow) = NarrowType::from_onnx(t.data_type) {
        return narrow_from_proto(t, narrow, base, raw);
    }
    let dtype = dtype_from_onnx(t.data_type).map_err(err)?;
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(err(format!("negative dimension {d}")));
        }
        shape.push(d as usize);
    }
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| err("shape overflows".into()))?;
    if t.segment.is_some() {
        return Err(err("segmented tensors are not supported".into()));
    }
    let external = t.data_location.enum_value() == Ok(DataLocation::EXTERNAL);
    let data = if external {
        let (file, range) = external_range(t, base).map_err(err)?;
        data_from_file(&file, range, dtype, n, map).map_err(err)?
    } else if let Some((file, range)) = raw {
        data_from_file(file, range, dtype, n, map).map_err(err)?
    } else if !t.raw_data.is_empty() {
        from_le_bytes(dtype, &t.raw_data, n).map_err(err)?
    } else {
        // Typed fields: which one holds the values depends on the dtype.
        let data = match dtype {
            DType::F32 => Data::F32(t.float_data.clone().into()),
            DType::F64 => Data::F64(t.double_data.clone().into()),
            DType::I64 => Data::I64(t.int64_data.clone().into()),
            // Half types keep their bits in the low 16 of each int32_data entry.
            DType::F16 => Data::F16(t.int32_data.iter().map(|&x| half::f16::from_bits(x as u16)).collect()),
            DType::BF16 => Data::BF16(t.int32_data.iter().map(|&x| half::bf16::from_bits(x as u16)).collect()),
            DType::U32 | DType::U64 => {
                Data::from_i64s(dtype, &t.uint64_data.iter().map(|&x| x as i64).collect::<Vec<_>>())
            }
            // int32_data carries every narrower integer type and bool.
            _ => Data::from_i64s(dtype, &t.int32_data.iter().map(|&x| x as i64).collect::<Vec<_>>()),
        };
        if data.len() != n {
            return Err(err(format!("holds {} values but its shape {shape:?} needs {n}", data.len())));
        }
        data
    };
    Tensor::try_new(shape, data).map_err(err)
}

/// The narrow type a `TensorProto` holds, if it holds one.
pub fn narrow_of(t: &TensorProto) -> Option<NarrowType> {
    NarrowType::from_onnx(t.data_type)
}

/// A tensor of a narrow type (8, 4 or 2 bits a value, packed from the low
/// bits of each byte up), decoded into its carrier: f32 values for the
/// floats, 8-bit integers for the integers.
fn narrow_from_proto(
    t: &TensorProto,
    narrow: NarrowType,
    base: Option<&Path>,
    raw: Option<RawInFile>,
) -> Result<Tensor, ImportError> {
    let name = if t.name.is_empty() { "<unnamed>" } else { &t.name };
    let err = |m: String| ImportError::tensor(name, m);
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| err(format!("negative dimension {d}"))))
        .collect::<Result<_, _>>()?;
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| err("shape overflows".into()))?;
    let packed: Vec<u8> = if t.data_location.enum_value() == Ok(DataLocation::EXTERNAL) {
        let (file, range) = external_range(t, base).map_err(err)?;
        bytes_from_file(&file, range).map_err(err)?
    } else if let Some((file, range)) = raw {
        bytes_from_file(file, range).map_err(err)?
    } else if !t.raw_data.is_empty() {
        t.raw_data.clone()
    } else {
        // int32_data holds one byte of the packed data per entry.
        t.int32_data.iter().map(|&x| x as u8).collect()
    };
    let bits = narrow.bits() as usize;
    let per = 8 / bits;
    if packed.len() != n.div_ceil(per) {
        return Err(err(format!("holds {} bytes but {n} {}-bit values need {}", packed.len(), bits, n.div_ceil(per))));
    }
    let code = |i: usize| packed[i / per] >> (bits * (i % per));
    let data = match narrow.carrier() {
        DType::F32 => Data::F32((0..n).map(|i| egret_ir::narrow::decode(narrow, code(i)) as f32).collect()),
        DType::I8 => Data::I8((0..n).map(|i| egret_ir::narrow::decode(narrow, code(i)) as i8).collect()),
        _ => Data::U8((0..n).map(|i| egret_ir::narrow::decode(narrow, code(i)) as u8).collect()),
    };
    Tensor::try_new(shape, data).map_err(err)
}

/// Encodes a tensor as a `TensorProto` with `raw_data` (for `.pb` outputs and tests).
pub fn tensor_to_proto(t: &Tensor, name: &str) -> TensorProto {
    let mut p = TensorProto::new();
    p.name = name.to_string();
    p.data_type = dtype_to_onnx(t.dtype());
    p.dims = t.shape().iter().map(|&d| d as i64).collect();
    let mut raw = Vec::with_capacity(t.numel() * t.dtype().size_bytes());
    egret_ir::dispatch!(t.data(), v: T => {
        for x in v.iter() {
            raw.extend_from_slice(&le_bytes_of(*x));
        }
    });
    p.raw_data = raw;
    p
}

fn le_bytes_of<T: egret_ir::Elem>(x: T) -> Vec<u8> {
    match T::DTYPE {
        DType::F32 => (x.to_f64() as f32).to_le_bytes().to_vec(),
        DType::F64 => x.to_f64().to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(x.to_f64()).to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f64(x.to_f64()).to_le_bytes().to_vec(),
        DType::Bool => vec![x.to_i64() as u8],
        DType::I8 | DType::U8 => vec![x.to_i64() as u8],
        DType::I16 | DType::U16 => (x.to_i64() as u16).to_le_bytes().to_vec(),
        DType::I32 | DType::U32 => (x.to_i64() as u32).to_le_bytes().to_vec(),
        DType::I64 | DType::U64 => (x.to_i64() as u64).to_le_bytes().to_vec(),
    }
}
