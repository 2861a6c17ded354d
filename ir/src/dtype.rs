//! Element types.
//!
//! The set is the ONNX numeric types a transformer graph uses. Half and 8-bit
//! float formats are deliberately absent: an input that uses them is refused at
//! import with a clear error rather than silently widened.

use crate::dim::{Dim, DimOverflow};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F64,
    /// IEEE half precision. Egret stores it at its width at a program's
    /// edges and computes in f32 (the importer widens every half value).
    F16,
    /// bfloat16: stored like `F16`, computed in f32.
    BF16,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl DType {
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    /// Whether this is a half-precision type (`F16`, `BF16`).
    pub fn is_half(self) -> bool {
        matches!(self, DType::F16 | DType::BF16)
    }

    pub fn is_int(self) -> bool {
        !self.is_float() && self != DType::Bool
    }

    pub fn is_signed(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::F64 | DType::F16 | DType::BF16 | DType::I8 | DType::I16 | DType::I32 | DType::I64
        )
    }

    /// Size of one element in bytes, as stored in ONNX `raw_data` and `.npy` files.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::Bool | DType::I8 | DType::U8 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DType::ALL.into_iter().find(|d| d.name() == s).ok_or_else(|| format!("unknown dtype `{s}`"))
    }
}

/// The type of a value: element type and shape.
///
/// A dim may be symbolic (`Dim`): a model's `dim_param`s stay symbols through
/// import, canonicalisation and the e-graph, and `Graph::bind` gives them
/// values before lowering, where every shape is known.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl Type {
    pub fn new<D: Into<Dim>>(dtype: DType, shape: impl IntoIterator<Item = D>) -> Self {
        Type { dtype, shape: shape.into_iter().map(Into::into).collect() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Whether no dim is symbolic.
    pub fn is_known(&self) -> bool {
        self.shape.iter().all(|d| d.is_known())
    }

    /// The shape's sizes, if every dim is known.
    pub fn known_shape(&self) -> Option<Vec<usize>> {
        crate::dim::known_shape(&self.shape)
    }

    /// The shape of a type in a bound graph. Lowering, the backends and the
    /// runtime see only graphs `Graph::bind` has bound (`lower` checks), so a
    /// symbolic dim here is a bug in the pipeline, not in the model.
    pub fn sizes(&self) -> Vec<usize> {
        self.known_shape().unwrap_or_else(|| panic!("type {self} is symbolic where a bound graph was expected"))
    }

    /// The element count of a bound type (see `sizes`).
    pub fn numel(&self) -> usize {
        self.sizes().iter().product()
    }

    /// The type with every symbol given its value from `values` (the
    /// runtime's view of a symbolic program's types on one call).
    pub fn at(&self, values: &crate::dim::Bindings) -> Result<Type, String> {
        let shape = self
            .shape
            .iter()
            .map(|d| {
                let v = d.at(values)?;
                usize::try_from(v).map(Dim::new).map_err(|_| format!("dim {d} is {v} in {self}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Type { dtype: self.dtype, shape })
    }

    /// The shape with each symbol at its nominal value (`Dim::estimate`),
    /// for cost models.
    pub fn estimated_shape(&self) -> Vec<usize> {
        self.shape.iter().map(|d| d.estimate()).collect()
    }

    /// The element count at the symbols' nominal values (saturating).
    pub fn estimated_numel(&self) -> usize {
        self.shape.iter().fold(1usize, |a, d| a.saturating_mul(d.estimate()))
    }

    /// The element count as a dim (symbolic when the shape is).
    pub fn numel_dim(&self) -> Result<Dim, DimOverflow> {
        crate::dim::product(&self.shape)
    }

    /// The element count, or `None` if the shape is symbolic, or the count
    /// overflows or exceeds `MAX_ELEMENTS`, or one dim does (an empty
    /// `[0, 2^60]` too: its strides would overflow). (A symbolic shape's
    /// sizes are checked when the graph is bound.)
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d.size().filter(|&s| s <= MAX_ELEMENTS)?))
            .filter(|&n| n <= MAX_ELEMENTS)
    }
}

/// The largest tensor Egret accepts (2^36 elements, 256 GiB of f32). A shape
/// past it is an error at graph construction, so no later `numel` overflows
/// and no allocation is attempted that could only abort.
pub const MAX_ELEMENTS: usize = 1 << 36;

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}
