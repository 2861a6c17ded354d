//! Dense host tensors: the values the reference semantics compute with.
//!
//! Storage is one `Buf` (a vector, a mapped range or lazily computed
//! elements) per element type behind an enum, so generic kernels are written
//! once over the `Elem` trait and dispatched with `dispatch!`.

use crate::buf::Buf;
use crate::dtype::{DType, Type};
use std::fmt;
use std::sync::Arc;

/// Storage of a tensor, row-major: owned, or read in place from a mapped
/// file (`Buf`).
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Buf<f32>),
    F64(Buf<f64>),
    F16(Buf<half::f16>),
    BF16(Buf<half::bf16>),
    I8(Buf<i8>),
    I16(Buf<i16>),
    I32(Buf<i32>),
    I64(Buf<i64>),
    U8(Buf<u8>),
    U16(Buf<u16>),
    U32(Buf<u32>),
    U64(Buf<u64>),
    Bool(Buf<bool>),
}

/// Runs `$body` with `$v` bound to the typed vector inside a `Data`, for every
/// element type. `$T` names the element type inside the body.
#[macro_export]
macro_rules! dispatch {
    ($data:expr, $v:ident : $T:ident => $body:expr) => {
        match $data {
            $crate::Data::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::Data::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            $crate::Data::F16($v) => {
                #[allow(dead_code)]
                type $T = $crate::half::f16;
                $body
            }
            $crate::Data::BF16($v) => {
                #[allow(dead_code)]
                type $T = $crate::half::bf16;
                $body
            }
            $crate::Data::I8($v) => {
                #[allow(dead_code)]
                type $T = i8;
                $body
            }
            $crate::Data::I16($v) => {
                #[allow(dead_code)]
                type $T = i16;
                $body
            }
            $crate::Data::I32($v) => {
                #[allow(dead_code)]
                type $T = i32;
                $body
            }
            $crate::Data::I64($v) => {
                #[allow(dead_code)]
                type $T = i64;
                $body
            }
            $crate::Data::U8($v) => {
                #[allow(dead_code)]
                type $T = u8;
                $body
            }
            $crate::Data::U16($v) => {
                #[allow(dead_code)]
                type $T = u16;
                $body
            }
            $crate::Data::U32($v) => {
                #[allow(dead_code)]
                type $T = u32;
                $body
            }
            $crate::Data::U64($v) => {
                #[allow(dead_code)]
                type $T = u64;
                $body
            }
            $crate::Data::Bool($v) => {
                #[allow(dead_code)]
                type $T = bool;
                $body
            }
        }
    };
}

/// Like `dispatch!`, for numeric element types only: a bool tensor makes the
/// enclosing function return `Err` naming `$what`.
#[macro_export]
macro_rules! dispatch_num {
    ($data:expr, $what:expr, $v:ident : $T:ident => $body:expr) => {
        match $data {
            $crate::Data::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::Data::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            $crate::Data::I8($v) => {
                #[allow(dead_code)]
                type $T = i8;
                $body
            }
            $crate::Data::I16($v) => {
                #[allow(dead_code)]
                type $T = i16;
                $body
            }
            $crate::Data::I32($v) => {
                #[allow(dead_code)]
                type $T = i32;
                $body
            }
            $crate::Data::I64($v) => {
                #[allow(dead_code)]
                type $T = i64;
                $body
            }
            $crate::Data::U8($v) => {
                #[allow(dead_code)]
                type $T = u8;
                $body
            }
            $crate::Data::U16($v) => {
                #[allow(dead_code)]
                type $T = u16;
                $body
            }
            $crate::Data::U32($v) => {
                #[allow(dead_code)]
                type $T = u32;
                $body
            }
            $crate::Data::U64($v) => {
                #[allow(dead_code)]
                type $T = u64;
                $body
            }
            $crate::Data::Bool(_) => return Err(format!("{} is not defined on bool tensors", $what)),
            $crate::Data::F16(_) | $crate::Data::BF16(_) => {
                return Err(format!("{} computes half-precision values in f32; cast them first", $what))
            }
        }
    };
}

/// Like `dispatch!`, for f32 and f64 only.
#[macro_export]
macro_rules! dispatch_float {
    ($data:expr, $what:expr, $v:ident : $T:ident => $body:expr) => {
        match $data {
            $crate::Data::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::Data::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            other => return Err(format!("{} needs a float tensor, not {}", $what, other.dtype())),
        }
    };
}

/// An element type that can live in a `Data`.
pub trait Elem: Copy + PartialEq + PartialOrd + Default + fmt::Debug + Send + Sync + 'static {
    const DTYPE: DType;
    fn wrap(v: Vec<Self>) -> Data;
    fn to_f64(self) -> f64;
    /// Converts with ONNX `Cast` semantics: floats to ints truncate toward
    /// zero (saturating), anything non-zero to bool is `true`.
    fn from_f64(x: f64) -> Self;
    fn to_i64(self) -> i64;
    fn from_i64(x: i64) -> Self;
    /// The typed slice inside `d`, if `d` holds this element type.
    fn unwrap(d: &Data) -> Option<&[Self]>;
}

macro_rules! impl_elem_num {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn wrap(v: Vec<Self>) -> Data {
                Data::$variant(v.into())
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_i64(self) -> i64 {
                self as i64
            }
            fn from_i64(x: i64) -> Self {
                x as $t
            }
            fn unwrap(d: &Data) -> Option<&[Self]> {
                match d {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
impl_elem_num!(f32, F32);
impl_elem_num!(f64, F64);
impl_elem_num!(i8, I8);
impl_elem_num!(i16, I16);
impl_elem_num!(i32, I32);
impl_elem_num!(i64, I64);
impl_elem_num!(u8, U8);
impl_elem_num!(u16, U16);
impl_elem_num!(u32, U32);
impl_elem_num!(u64, U64);

macro_rules! impl_elem_half {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn wrap(v: Vec<Self>) -> Data {
                Data::$variant(v.into())
            }
            fn to_f64(self) -> f64 {
                self.to_f64()
            }
            /// Rounds to nearest, ties to even (NaN stays NaN).
            fn from_f64(x: f64) -> Self {
                <$t>::from_f64(x)
            }
            fn to_i64(self) -> i64 {
                self.to_f64() as i64
            }
            fn from_i64(x: i64) -> Self {
                <$t>::from_f64(x as f64)
            }
            fn unwrap(d: &Data) -> Option<&[Self]> {
                match d {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
impl_elem_half!(half::f16, F16);
impl_elem_half!(half::bf16, BF16);

impl Elem for bool {
    const DTYPE: DType = DType::Bool;
    fn wrap(v: Vec<Self>) -> Data {
        Data::Bool(v.into())
    }
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    fn from_f64(x: f64) -> Self {
        x != 0.0
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn from_i64(x: i64) -> Self {
        x != 0
    }
    fn unwrap(d: &Data) -> Option<&[Self]> {
        match d {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }
}

impl Data {
    pub fn dtype(&self) -> DType {
        dispatch!(self, _v: T => T::DTYPE)
    }

    pub fn len(&self) -> usize {
        dispatch!(self, v: T => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A zero-filled (or `false`-filled) buffer.
    pub fn zeros(dtype: DType, len: usize) -> Data {
        match dtype {
            DType::F32 => Data::F32(vec![0.0; len].into()),
            DType::F64 => Data::F64(vec![0.0; len].into()),
            DType::F16 => Data::F16(vec![half::f16::ZERO; len].into()),
            DType::BF16 => Data::BF16(vec![half::bf16::ZERO; len].into()),
            DType::I8 => Data::I8(vec![0; len].into()),
            DType::I16 => Data::I16(vec![0; len].into()),
            DType::I32 => Data::I32(vec![0; len].into()),
            DType::I64 => Data::I64(vec![0; len].into()),
            DType::U8 => Data::U8(vec![0; len].into()),
            DType::U16 => Data::U16(vec![0; len].into()),
            DType::U32 => Data::U32(vec![0; len].into()),
            DType::U64 => Data::U64(vec![0; len].into()),
            DType::Bool => Data::Bool(vec![false; len].into()),
        }
    }

    /// Gathers elements by flat index: `out[i] = self[idx[i]]`. Every layout op
    /// (transpose, slice, expand, gather, ...) reduces to this, so it is written
    /// once for every dtype. Callers guarantee the indices are in range.
    pub fn gather(&self, idx: &[usize]) -> Data {
        dispatch!(self, v: T => T::wrap(idx.iter().map(|&i| v[i]).collect()))
    }

    /// Element `i` converted to f64 (bools as 0/1).
    pub fn get_f64(&self, i: usize) -> f64 {
        dispatch!(self, v: T => v[i].to_f64())
    }

    /// All elements converted to i64 (floats truncate).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        dispatch!(self, v: T => v.iter().map(|x| x.to_i64()).collect())
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        dispatch!(self, v: T => v.iter().map(|x| x.to_f64()).collect())
    }

    /// Converts with ONNX `Cast` semantics.
    pub fn cast(&self, to: DType) -> Data {
        if self.dtype() == to {
            return self.clone();
        }
        // Integer to integer goes through i64 so large values keep their bits;
        // everything touching a float goes through f64.
        let via_int = (self.dtype().is_int() || self.dtype() == DType::Bool) && !to.is_float();
        macro_rules! conv {
            ($U:ty) => {
                if via_int {
                    dispatch!(self, v: T => <$U>::wrap(v.iter().map(|x| <$U>::from_i64(x.to_i64())).collect()))
                } else {
                    dispatch!(self, v: T => <$U>::wrap(v.iter().map(|x| <$U>::from_f64(x.to_f64())).collect()))
                }
            };
        }
        match to {
            DType::F32 => conv!(f32),
            DType::F64 => conv!(f64),
            DType::F16 => conv!(half::f16),
            DType::BF16 => conv!(half::bf16),
            DType::I8 => conv!(i8),
            DType::I16 => conv!(i16),
            DType::I32 => conv!(i32),
            DType::I64 => conv!(i64),
            DType::U8 => conv!(u8),
            DType::U16 => conv!(u16),
            DType::U32 => conv!(u32),
            DType::U64 => conv!(u64),
            DType::Bool => conv!(bool),
        }
    }

    /// Builds storage of `dtype` from f64 values (used for constants and
    /// random inputs).
    pub fn from_f64s(dtype: DType, xs: &[f64]) -> Data {
        Data::F64(xs.to_vec().into()).cast(dtype)
    }

    pub fn from_i64s(dtype: DType, xs: &[i64]) -> Data {
        Data::I64(xs.to_vec().into()).cast(dtype)
    }
}

/// A dense, row-major tensor.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Data,
    /// Where a weight came from integers: its values are these codes'
    /// (`BlockCodes`), so a backend may keep them at their width.
    codes: Option<Arc<BlockCodes>>,
    /// Where an f32 weight is a half-precision one widened: its elements
    /// (f16 or bf16), which a backend may keep instead. Set only by
    /// `Tensor::widened`, whose f32 elements are computed from these.
    half: Option<Arc<Data>>,
    /// Whether the elements are computed from `codes` or `half` (lazily,
    /// `Tensor::from_codes` and `Tensor::widened`): true by construction,
    /// so a backend trusts them without reading the f32 elements.
    derived: bool,
}

/// Two tensors are equal when their shapes and elements are: where the
/// values came from does not matter.
impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        self.shape == other.shape && self.data == other.data
    }
}

/// A claim, made by the importer, that an f32 matrix `[k, n]` is the
/// dequantization of small unsigned integer codes in blocks along `k`:
/// element `(p, j)` is `(codes[p * n + j] as f32 - zeros[b * n + j]) *
/// scales[b * n + j]` with `b = p / block`, computed in that order in f32.
/// A backend that stores the weight as codes checks the claim before it
/// trusts it (`BlockCodes::matches`), so a wrong claim costs speed, never
/// an answer.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockCodes {
    /// Bits per code (at most 8): codes are below `1 << bits`.
    pub bits: u32,
    /// Rows of `k` per block of scales and zero points.
    pub block: usize,
    pub k: usize,
    pub n: usize,
    /// `[k, n]`, one code per byte, stored plus `offset` (`code`): a signed
    /// byte weight is its own codes read as unsigned with 128 added, so it
    /// is shared (mapped, even) rather than copied.
    pub codes: Buf<u8>,
    /// Added to each stored byte, wrapping, to give its code.
    pub offset: u8,
    /// `[k.div_ceil(block), n]`.
    pub scales: Vec<f32>,
    /// `[k.div_ceil(block), n]`, whole numbers.
    pub zeros: Vec<f32>,
}

impl BlockCodes {
    /// Code `i` (row-major over `[k, n]`).
    pub fn code(&self, i: usize) -> u8 {
        self.codes[i].wrapping_add(self.offset)
    }

    /// Element `(p, j)` as the claim computes it.
    pub fn value(&self, p: usize, j: usize) -> f32 {
        let b = (p / self.block) * self.n + j;
        (self.code(p * self.n + j) as f32 - self.zeros[b]) * self.scales[b]
    }

    /// Whether the claim is well formed and gives exactly `w`'s bits.
    pub fn matches(&self, w: &[f32]) -> bool {
        self.is_well_formed()
            && self.codes_fit()
            && w.len() == self.k * self.n
            && (0..self.k).all(|p| (0..self.n).all(|j| self.value(p, j).to_bits() == w[p * self.n + j].to_bits()))
    }

    /// Whether the sizes agree: codes `[k, n]`, scales and zero points one
    /// per block and column. It reads no code (they may be lazy).
    pub fn is_well_formed(&self) -> bool {
        let blocks = self.k.div_ceil(self.block.max(1));
        self.block > 0
            && self.bits <= 8
            && self.k.checked_mul(self.n) == Some(self.codes.len())
            && self.scales.len() == blocks * self.n
            && self.zeros.len() == blocks * self.n
    }

    /// Whether every code fits in `bits`, as a backend that stores them
    /// in `bits` needs (the values are defined either way).
    pub fn codes_fit(&self) -> bool {
        self.bits >= 8 || (0..self.codes.len()).all(|i| (self.code(i) as u32) < (1 << self.bits))
    }
}

impl Tensor {
    /// Builds a tensor. Panics only on a programming error inside Egret: every
    /// caller that handles external data checks the length first (see
    /// `try_new`).
    pub fn new(shape: impl Into<Vec<usize>>, data: Data) -> Tensor {
        let shape = shape.into();
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor shape {shape:?} does not match its data");
        Tensor { shape, data, codes: None, half: None, derived: false }
    }

    pub fn try_new(shape: impl Into<Vec<usize>>, data: Data) -> Result<Tensor, String> {
        let shape = shape.into();
        // A dim past `MAX_ELEMENTS` is refused even where another is 0 (no
        // element to hold): its type's strides would overflow.
        if let Some(d) = shape.iter().find(|&&d| d > crate::MAX_ELEMENTS) {
            return Err(format!("shape {shape:?} has a dim of {d}, past the largest tensor Egret takes"));
        }
        let want = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or("the shape overflows")?;
        if want != data.len() {
            return Err(format!("shape {shape:?} needs {want} elements but {} were given", data.len()));
        }
        Ok(Tensor { shape, data, codes: None, half: None, derived: false })
    }

    pub fn from_vec<T: Elem>(shape: impl Into<Vec<usize>>, v: Vec<T>) -> Tensor {
        Tensor::new(shape, T::wrap(v))
    }

    pub fn scalar<T: Elem>(x: T) -> Tensor {
        Tensor::new(vec![], T::wrap(vec![x]))
    }

    pub fn zeros(dtype: DType, shape: impl Into<Vec<usize>>) -> Tensor {
        let shape = shape.into();
        let n = shape.iter().product();
        Tensor { shape, data: Data::zeros(dtype, n), codes: None, half: None, derived: false }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn ty(&self) -> Type {
        Type::new(self.dtype(), self.shape.clone())
    }

    pub fn data(&self) -> &Data {
        &self.data
    }

    pub fn into_data(self) -> Data {
        self.data
    }

    /// The same elements in another shape. A half-precision origin stays
    /// (it is flat); a claim about codes, which are a matrix, does not.
    pub fn reshaped(self, shape: impl Into<Vec<usize>>) -> Tensor {
        let derived = self.derived && self.half.is_some();
        Tensor { half: self.half, derived, ..Tensor::new(shape, self.data) }
    }

    /// The `[k, n]` f32 matrix that `codes` dequantize to, computed only
    /// if something reads it: a backend that keeps the codes never does.
    /// `None` for a malformed claim (`BlockCodes::is_well_formed`).
    pub fn from_codes(codes: BlockCodes) -> Option<Tensor> {
        if !codes.is_well_formed() {
            return None;
        }
        let codes = Arc::new(codes);
        let (c, len) = (codes.clone(), codes.k * codes.n);
        let data = Data::F32(Buf::lazy(len, move || (0..len).map(|i| c.value(i / c.n, i % c.n)).collect()));
        Some(Tensor { shape: vec![codes.k, codes.n], data, codes: Some(codes), half: None, derived: true })
    }

    /// A half-precision tensor (f16 or bf16) widened to f32, exactly,
    /// computed only if something reads it: a backend that keeps the
    /// half elements (`half`) never does. Any other tensor is returned as
    /// it is.
    pub fn widened(t: Tensor) -> Tensor {
        if !t.dtype().is_half() {
            return t;
        }
        // Shared, so the halves can be read as a tensor of their own
        // (`half`) without a copy.
        let half = Arc::new(match t.data {
            Data::F16(v) if !v.is_mapped() => Data::F16(Buf::shared(v.into_vec())),
            Data::BF16(v) if !v.is_mapped() => Data::BF16(Buf::shared(v.into_vec())),
            other => other,
        });
        let (h, len) = (half.clone(), half.len());
        let data = Data::F32(Buf::lazy(len, move || match &*h {
            Data::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            _ => unreachable!("a half type"),
        }));
        Tensor { shape: t.shape, data, codes: None, half: Some(half), derived: true }
    }

    /// The half-precision elements this f32 tensor is widened from, if it is.
    pub fn half(&self) -> Option<&Data> {
        self.half.as_deref()
    }

    /// Whether the f32 elements are computed from `codes` or `half`, so that
    /// those give them exactly, with no check against the elements.
    pub fn is_derived(&self) -> bool {
        self.derived
    }

    /// This `[k, n]` f32 matrix with the claim that `codes` dequantize to it.
    pub fn with_codes(mut self, codes: BlockCodes) -> Tensor {
        debug_assert!(self.shape == [codes.k, codes.n] && self.dtype() == DType::F32);
        self.codes = Some(Arc::new(codes));
        self
    }

    /// The importer's claim about this weight's codes, if it made one.
    pub fn codes(&self) -> Option<&BlockCodes> {
        self.codes.as_deref()
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Values as i64, for shape-like tensors (axes, shapes, pads, indices).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        self.data.to_i64_vec()
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.data.to_f64_vec()
    }

    pub fn cast(&self, to: DType) -> Tensor {
        Tensor { shape: self.shape.clone(), data: self.data.cast(to), codes: None, half: None, derived: false }
    }
}

/// A tensor's elements borrowed where they lie (a caller's array, another
/// run's output): what a run reads its inputs from without copying them.
/// A decoder's past is most of its inputs (70 MB a step for GPT-2 small at
/// 960 positions), so a copy per step is a cost onnxruntime does not pay.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    dtype: DType,
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// Elements of `dtype` in row-major order as native-endian bytes (a
    /// bool one byte, 0 or 1), aligned to the element's size: exactly
    /// `shape`'s elements, or an error saying why not.
    pub fn new(dtype: DType, shape: &'a [usize], bytes: &'a [u8]) -> Result<TensorRef<'a>, String> {
        let size = dtype.size_bytes();
        let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        match n.and_then(|n| n.checked_mul(size)) {
            Some(len) if len == bytes.len() => {}
            _ => return Err(format!("{} bytes do not hold {dtype} elements of shape {shape:?}", bytes.len())),
        }
        if (bytes.as_ptr() as usize) % size != 0 {
            return Err(format!("{dtype} elements at an address not aligned to {size} bytes"));
        }
        Ok(TensorRef { dtype, shape, bytes })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn ty(&self) -> Type {
        Type::new(self.dtype, self.shape.to_vec())
    }

    /// The elements' bytes, as `Tensor::bytes` gives them.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// An owned copy, for readers that need one (the reference evaluator,
    /// a GPU upload's staging).
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_bytes(&self.ty(), self.bytes).expect("a TensorRef holds exactly its shape's elements")
    }

    /// Whether `t` has this shape and these elements, bit for bit.
    pub fn same_as(&self, t: &Tensor) -> bool {
        self.dtype == t.dtype() && self.shape == t.shape() && self.bytes == t.bytes()
    }
}

impl Tensor {
    /// This tensor's elements, borrowed.
    pub fn view(&self) -> TensorRef<'_> {
        TensorRef { dtype: self.dtype(), shape: &self.shape, bytes: self.bytes() }
    }
}

/// Row-major strides of a shape, in elements.
pub fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl Tensor {
    /// The elements as native-endian bytes (bools as 0/1), the layout the
    /// compiled backends keep in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0; self.numel() * self.dtype().size_bytes()];
        self.write_bytes(&mut bytes);
        bytes
    }

    /// Writes the bytes of `to_bytes` into `dst`, which must be exactly that
    /// long, without allocating (the runtime fills reused input buffers).
    /// The elements' bytes where they are (a bool is one byte, 0 or 1, as
    /// `to_bytes` writes it), for readers that take them in place.
    pub fn bytes(&self) -> &[u8] {
        fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
            // Plain numeric types (and bool, one byte of 0 or 1) with no padding.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        crate::dispatch!(&self.data, v: T => bytes_of(v))
    }

    pub fn write_bytes(&self, dst: &mut [u8]) {
        fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
            // Plain numeric types with no padding: their bytes are well defined.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        let src = match &self.data {
            Data::Bool(v) => {
                assert_eq!(dst.len(), v.len(), "byte buffer does not fit the tensor");
                for (d, &b) in dst.iter_mut().zip(v) {
                    *d = b as u8;
                }
                return;
            }
            Data::F32(v) => bytes_of(v),
            Data::F64(v) => bytes_of(v),
            Data::F16(v) => bytes_of(v),
            Data::BF16(v) => bytes_of(v),
            Data::I8(v) => bytes_of(v),
            Data::I16(v) => bytes_of(v),
            Data::I32(v) => bytes_of(v),
            Data::I64(v) => bytes_of(v),
            Data::U8(v) => bytes_of(v),
            Data::U16(v) => bytes_of(v),
            Data::U32(v) => bytes_of(v),
            Data::U64(v) => bytes_of(v),
        };
        dst.copy_from_slice(src);
    }

    /// The inverse of `to_bytes`. `bytes` must hold exactly the elements of `ty`.
    pub fn from_bytes(ty: &Type, bytes: &[u8]) -> Result<Tensor, String> {
        let shape = ty.known_shape().ok_or_else(|| format!("{ty} is symbolic; bytes need a known shape"))?;
        let n: usize = shape.iter().product();
        if bytes.len() != n * ty.dtype.size_bytes() {
            return Err(format!("{} bytes do not hold a {ty}", bytes.len()));
        }
        macro_rules! read {
            ($T:ty, $V:ident) => {
                Data::$V(
                    bytes
                        .chunks_exact(std::mem::size_of::<$T>())
                        .map(|c| <$T>::from_ne_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            };
        }
        let data = match ty.dtype {
            DType::Bool => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
            DType::F32 => read!(f32, F32),
            DType::F64 => read!(f64, F64),
            DType::F16 => read!(half::f16, F16),
            DType::BF16 => read!(half::bf16, BF16),
            DType::I8 => read!(i8, I8),
            DType::I16 => read!(i16, I16),
            DType::I32 => read!(i32, I32),
            DType::I64 => read!(i64, I64),
            DType::U8 => read!(u8, U8),
            DType::U16 => read!(u16, U16),
            DType::U32 => read!(u32, U32),
            DType::U64 => read!(u64, U64),
        };
        Tensor::try_new(shape, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_ref_holds_exactly_its_shape_aligned_and_copies_back_bit_for_bit() {
        let t = Tensor::from_vec(vec![2, 3], vec![1.5f32, -0.0, f32::NAN, 4.0, 5.0, 6.0]);
        let r = t.view();
        assert_eq!((r.dtype(), r.shape(), r.numel()), (DType::F32, &[2usize, 3][..], 6));
        assert_eq!(r.to_tensor().bytes(), t.bytes());
        assert!(r.same_as(&t) && !r.same_as(&t.clone().reshaped(vec![3, 2])));
        let b = Tensor::from_vec(vec![3], vec![true, false, true]);
        assert_eq!(b.view().to_tensor(), b);
        // Too few bytes, too many, an overflowing shape, a misaligned start.
        let bytes = t.bytes();
        assert!(TensorRef::new(DType::F32, &[2, 3], &bytes[..20]).unwrap_err().contains("20 bytes"));
        assert!(TensorRef::new(DType::F32, &[2, 2], bytes).is_err());
        assert!(TensorRef::new(DType::F32, &[usize::MAX, 2], bytes).is_err());
        assert!(TensorRef::new(DType::F32, &[1], &bytes[1..5]).unwrap_err().contains("aligned"));
        assert!(TensorRef::new(DType::U8, &[4], &bytes[1..5]).is_ok());
    }
}
