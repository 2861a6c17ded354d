//! The op set.
//!
//! Ops carry their parameters as static, normalised attributes: axes are
//! non-negative, shapes and pads are resolved, auto-padding is explicit. The
//! frontend does that work once (it knows every shape), so inference, the
//! reference semantics, the passes and the backends each read one canonical
//! form instead of re-deriving ONNX's many spellings.
//!
//! The table below is the single source of truth: it generates the enum, the
//! text-format name of each op, and the printing and parsing of attributes.

use crate::dim::Dim;
use crate::dtype::DType;
use crate::tensor::Tensor;
use std::fmt::Write as _;
use std::sync::Arc;

/// A token of an attribute value in the text format.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrTok {
    /// A number as written, so that each attribute type parses it exactly.
    Num(String),
    Ident(String),
    Str(String),
    List(Vec<AttrTok>),
}

/// A type that can be an op attribute.
pub trait AttrValue: Sized {
    fn write(&self, out: &mut String);
    fn parse(tok: &AttrTok) -> Result<Self, String>;
    /// The value of an attribute the text leaves out, if it may be left out.
    fn absent() -> Option<Self> {
        None
    }
}

/// An optional attribute: written only when present, absent when left out.
impl<T: AttrValue> AttrValue for Option<T> {
    fn write(&self, out: &mut String) {
        if let Some(x) = self {
            x.write(out);
        }
    }
    fn parse(tok: &AttrTok) -> Result<Self, String> {
        T::parse(tok).map(Some)
    }
    fn absent() -> Option<Self> {
        Some(None)
    }
}

impl AttrValue for f32 {
    fn write(&self, out: &mut String) {
        // `Debug` for floats is the shortest text that parses back to the same bits.
        let _ = write!(out, "{self:?}");
    }
    fn parse(tok: &AttrTok) -> Result<Self, String> {
        match tok {
            AttrTok::Num(s) => s.parse().map_err(|_| format!("`{s}` is not a float")),
            AttrTok::Ident(s) if s == "inf" => Ok(f32::INFINITY),
            AttrTok::Ident(s) if s == "NaN" => Ok(f32::NAN),
            other => Err(format!("expected a float, found {other:?}")),
        }
    }
}

macro_rules! int_attr {
    ($t:ty) => {
        impl AttrValue for $t {
            fn write(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
            fn parse(tok: &AttrTok) -> Result<Self, String> {
                match tok {
                    AttrTok::Num(s) => s.parse().map_err(|_| format!("`{s}` is not a {}", stringify!($t))),
                    other => Err(format!("expected an integer, found {other:?}")),
                }
            }
        }
    };
}
int_attr!(i64);
int_attr!(usize);

/// A size: a number when known, else its expression as a string
/// (`"batch*sequence"`).
impl AttrValue for Dim {
    fn write(&self, out: &mut String) {
        match self.known() {
            Some(v) => {
                let _ = write!(out, "{v}");
            }
            None => {
                let _ = write!(out, "{:?}", self.to_string());
            }
        }
    }
    fn parse(tok: &AttrTok) -> Result<Self, String> {
        match tok {
            AttrTok::Num(s) => s.parse::<i64>().ok().and_then(Dim::int).ok_or_else(|| format!("`{s}` is not a size")),
            AttrTok::Str(s) => Dim::parse(s).ok_or_else(|| format!("`{s}` is not a size expression")),
            other => Err(format!("expected a size, found {other:?}")),
        }
    }
}

impl AttrValue for bool {
    fn write(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
    fn parse(tok: &AttrTok) -> Result<Self, String> {
        match tok {
            AttrTok::Ident(s) if s == "true" => Ok(true),
            AttrTok::Ident(s) if s == "false" => Ok(false),
            other => Err(format!("expected true or false, found {other:?}")),
        }
    }
}

impl AttrValue for String {
    fn write(&self, out: &mut String) {
        let _ = write!(out, "{self:?}");
    }
    fn parse(tok: &AttrTok) -> Result<Self, String> {
        match tok {
            AttrTok::Str(s) => Ok(s.clone()),
            other => Err(format!("expected a string, found {other:?}")),
        }
    }
}

impl AttrValue for DType {
    fn write(&self, out: &mut String) {
        out.push_str(self.name());
    }
    fn parse(tok: &AttrTok) -> Result<Self, String> {
        match tok {
            AttrTok::Ident(s) => s.parse(),
            other => Err(format!("expected a dtype, found {other:?}")),
        }
    }
}

impl<T: AttrValue> AttrValue for Vec<T> {
    fn write(&self, out: &mut String) {
        out.push('[');
        for (i, x) in self.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            x.write(out);
        }
        out.push(']');
    }
    fn parse(tok: &AttrTok) -> Result<Self, String> {
        match tok {
            AttrTok::List(xs) => xs.iter().map(T::parse).collect(),
            other => Err(format!("expected a list, found {other:?}")),
        }
    }
}

/// Declares a fieldless enum used as an attribute, written as a bare word.
macro_rules! word_enum {
    ($(#[$m:meta])* $Name:ident { $($Var:ident = $word:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $Name { $($Var),* }
        impl $Name {
            pub fn word(self) -> &'static str { match self { $($Name::$Var => $word),* } }
        }
        impl AttrValue for $Name {
            fn write(&self, out: &mut String) { out.push_str(self.word()); }
            fn parse(tok: &AttrTok) -> Result<Self, String> {
                match tok {
                    $(AttrTok::Ident(s) if s == $word => Ok($Name::$Var),)*
                    other => Err(format!("expected one of {}, found {other:?}", [$($word),*].join("/"))),
                }
            }
        }
    };
}

word_enum!(
    /// What a `reduce` op computes over its axes.
    ReduceKind { Sum = "sum", Mean = "mean", Max = "max", Min = "min", Prod = "prod", L1 = "l1", L2 = "l2",
                 LogSum = "log_sum", LogSumExp = "log_sum_exp", SumSquare = "sum_square" }
);
word_enum!(
    /// How a matrix product is computed: the e-graph's cost model picks one
    /// per product (the `passes` rules in `tiling.rs`), lowering follows it.
    /// `packed`: a 6 x 32 register tile over a constant weight packed
    /// at compile time; `library`: the tuned GEMM library, which packs both
    /// operands on every call; `generated_4x8`: Egret's generated 4 x 8
    /// f32x4 tile.
    MatMulTiling { Packed = "packed", Library = "library", Generated4x8 = "generated_4x8" }
);
word_enum!(
    /// How `pad` fills the border.
    PadMode { Constant = "constant", Reflect = "reflect", Edge = "edge", Wrap = "wrap" }
);
word_enum!(
    /// How scatter ops combine an update with the existing element.
    Reduction { None = "none", Add = "add", Mul = "mul", Max = "max", Min = "min" }
);
word_enum!(
    /// Resize interpolation.
    ResizeMode { Nearest = "nearest", Linear = "linear", Cubic = "cubic" }
);
word_enum!(
    /// How resize maps an output coordinate back to the input.
    CoordMode { HalfPixel = "half_pixel", HalfPixelSymmetric = "half_pixel_symmetric", PytorchHalfPixel = "pytorch_half_pixel",
                AlignCorners = "align_corners", Asymmetric = "asymmetric", TfCropAndResize = "tf_crop_and_resize" }
);
word_enum!(
    /// How resize rounds a coordinate in nearest mode.
    NearestMode { RoundPreferFloor = "round_prefer_floor", RoundPreferCeil = "round_prefer_ceil", Floor = "floor", Ceil = "ceil" }
);

word_enum!(
    /// A type Egret carries in a wider one (`narrow.rs`): ONNX's 8- and
    /// 4-bit floats are computed and stored as f32 values on their grid, its
    /// 4- and 2-bit integers as 8-bit integers in their range.
    NarrowType { F8E4M3FN = "f8e4m3fn", F8E4M3FNUZ = "f8e4m3fnuz", F8E5M2 = "f8e5m2", F8E5M2FNUZ = "f8e5m2fnuz",
                 F8E8M0 = "f8e8m0", F4E2M1 = "f4e2m1", I4 = "i4", U4 = "u4", I2 = "i2", U2 = "u2" }
);
word_enum!(
    /// How a cast to `f8e8m0` (powers of two) rounds a value between two.
    RoundMode { Up = "up", Down = "down", Nearest = "nearest" }
);

/// Attributes parsed from text, consumed field by field.
pub struct AttrMap(pub Vec<(String, AttrTok)>);

impl AttrMap {
    fn take<T: AttrValue>(&mut self, key: &str) -> Result<T, String> {
        let Some(pos) = self.0.iter().position(|(k, _)| k == key) else {
            return T::absent().ok_or_else(|| format!("missing attribute `{key}`"));
        };
        let (_, tok) = self.0.remove(pos);
        T::parse(&tok).map_err(|e| format!("attribute `{key}`: {e}"))
    }
}

macro_rules! define_ops {
    ($( $(#[$m:meta])* $Var:ident $({ $($field:ident : $fty:ty),* $(,)? })? = $name:literal ),* $(,)?) => {
        /// An operation of the IR. See the module docs for the conventions.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            /// A compile-time constant (weights, folded shapes, ...).
            Const(Arc<Tensor>),
            $( $(#[$m])* $Var $({ $($field: $fty),* })? ),*
        }

        impl Op {
            /// The op's name in the text format.
            pub fn name(&self) -> &'static str {
                match self {
                    Op::Const(_) => "const",
                    $( Op::$Var { .. } => $name, )*
                }
            }

            /// Writes `{key=value, ...}`, or nothing for an op without attributes.
            #[allow(unused_variables, unused_mut)]
            pub fn write_attrs(&self, out: &mut String) {
                let mut fields: Vec<(&str, String)> = Vec::new();
                match self {
                    Op::Const(_) => {}
                    $( Op::$Var $({ $($field),* })? => {
                        // An absent optional attribute writes nothing and is left out.
                        $($( let mut s = String::new(); $field.write(&mut s); if !s.is_empty() { fields.push((stringify!($field), s)); } )*)?
                    } )*
                }
                if !fields.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in fields.iter().enumerate() {
                        if i > 0 { out.push_str(", "); }
                        let _ = write!(out, "{k}={v}");
                    }
                    out.push('}');
                }
            }

            /// Builds an op from its text-format name and attributes (every op but `const`).
            #[allow(unused_mut)]
            pub fn from_text(name: &str, mut attrs: AttrMap) -> Result<Op, String> {
                let op = match name {
                    $( $name => Op::$Var $({ $($field: attrs.take(stringify!($field))?),* })?, )*
                    _ => return Err(format!("unknown op `{name}`")),
                };
                if let Some((k, _)) = attrs.0.first() {
                    return Err(format!("op `{name}` has no attribute `{k}`"));
                }
                Ok(op)
            }
        }
    };
}

define_ops! {
    /// A graph input, bound at run time.
    Input { name: String } = "input",
    Identity = "identity",
    Cast { to: DType } = "cast",
    /// A cast to a narrow type, kept in its carrier (`NarrowType::carrier`):
    /// floats rounded onto its grid (`saturate`: out of range to its
    /// largest value rather than to infinity or NaN), integers wrapped.
    CastNarrow { to: NarrowType, saturate: bool, round_mode: RoundMode } = "cast_narrow",
    /// The same bits read as another type of the same width.
    BitCast { to: DType } = "bit_cast",

    // Elementwise, one input.
    Abs = "abs", Neg = "neg", Exp = "exp", Log = "log", Sqrt = "sqrt", Reciprocal = "reciprocal",
    Sin = "sin", Cos = "cos", Tan = "tan", Asin = "asin", Acos = "acos", Atan = "atan",
    Sinh = "sinh", Cosh = "cosh", Asinh = "asinh", Acosh = "acosh", Atanh = "atanh",
    Tanh = "tanh", Erf = "erf", Sigmoid = "sigmoid", Relu = "relu",
    Floor = "floor", Ceil = "ceil", Round = "round", Sign = "sign",
    Not = "not", IsNaN = "is_nan", Softsign = "softsign", Softplus = "softplus",
    HardSwish = "hard_swish", Mish = "mish", BitwiseNot = "bitwise_not",
    /// x * sigmoid(x) (SiLU, Swish); recognised by the e-graph, not imported.
    Silu = "silu",
    IsInf { detect_negative: bool, detect_positive: bool } = "is_inf",
    Elu { alpha: f32 } = "elu",
    Selu { alpha: f32, gamma: f32 } = "selu",
    Celu { alpha: f32 } = "celu",
    LeakyRelu { alpha: f32 } = "leaky_relu",
    HardSigmoid { alpha: f32, beta: f32 } = "hard_sigmoid",
    ThresholdedRelu { alpha: f32 } = "thresholded_relu",
    /// GELU; `approximate_tanh` selects the tanh approximation.
    Gelu { approximate_tanh: bool } = "gelu",
    Shrink { bias: f32, lambd: f32 } = "shrink",

    // Elementwise, two inputs, numpy broadcasting.
    Add = "add", Sub = "sub", Mul = "mul", Div = "div", Pow = "pow",
    /// `fmod` selects C's fmod (sign of the dividend) over Python's modulo.
    Mod { fmod: bool } = "mod",
    Max = "max", Min = "min",
    And = "and", Or = "or", Xor = "xor",
    Equal = "equal", Less = "less", LessOrEqual = "less_or_equal",
    Greater = "greater", GreaterOrEqual = "greater_or_equal",
    PRelu = "prelu",
    BitShift { left: bool } = "bit_shift",
    BitwiseAnd = "bitwise_and", BitwiseOr = "bitwise_or", BitwiseXor = "bitwise_xor",
    /// `where(cond, x, y)`, broadcasting all three.
    Where = "where",

    /// Batched matrix product with numpy broadcasting of the batch dims.
    MatMul = "matmul",
    /// `matmul` with the kernel that computes it chosen.
    MatMulTiled { tiling: MatMulTiling } = "matmul_tiled",
    /// Scaled dot-product attention: `softmax(q @ kt * scale [+ mask]) @ v`
    /// over the last axis. Inputs q `[.., Sq, D]`, kt `[.., D, Sk]` (K
    /// transposed, however the exporter did it), v `[.., Sk, Dv]`, and an
    /// optional additive mask broadcastable to `[.., Sq, Sk]`. With
    /// `nan_to_zero`, NaN probabilities (a fully masked row) become 0, as the
    /// exporters' `Where(IsNaN(p), 0, p)` guard does. With a `softcap` c,
    /// the scaled scores s become `c * tanh(s / c)` before the mask is added
    /// (Gemma 2's soft-capping).
    ///
    /// One departure from the definition, shared with flash-style kernels
    /// everywhere: the CPU kernel does not read the keys that a constant
    /// mask removes from a query row (`live_key_spans`), so an infinite or
    /// NaN value there does not reach the row as the definition's
    /// `0 * inf = NaN` would. The reference evaluator follows the definition.
    Attention { scale: f32, nan_to_zero: bool, softcap: Option<f32> } = "attention",
    /// `attention` with the kernel's tiles chosen: `block` query rows by
    /// `key_block` keys per scores tile (the same values).
    AttentionTiled { scale: f32, nan_to_zero: bool, softcap: Option<f32>, block: usize, key_block: usize } = "attention_tiled",
    Einsum { equation: String } = "einsum",
    /// N-d convolution. `pads` holds all begins, then all ends.
    Conv { strides: Vec<usize>, pads: Vec<usize>, dilations: Vec<usize>, group: usize } = "conv",
    MaxPool { kernel: Vec<usize>, strides: Vec<usize>, pads: Vec<usize>, dilations: Vec<usize>, ceil_mode: bool } = "max_pool",
    AveragePool { kernel: Vec<usize>, strides: Vec<usize>, pads: Vec<usize>, dilations: Vec<usize>, ceil_mode: bool, count_include_pad: bool } = "average_pool",
    Reduce { kind: ReduceKind, axes: Vec<usize>, keepdims: bool } = "reduce",
    /// Index of the max (or min) along an axis, as i64.
    ArgReduce { select_max: bool, axis: usize, keepdims: bool, select_last: bool } = "arg_reduce",
    Softmax { axis: usize } = "softmax",
    LogSoftmax { axis: usize } = "log_softmax",
    Hardmax { axis: usize } = "hardmax",
    /// Normalises over `axis..rank`. Outputs: y, mean, inverse std dev.
    LayerNorm { axis: usize, epsilon: f32 } = "layer_norm",
    /// RMS normalisation over `axis..rank`, times scale.
    RmsNorm { axis: usize, epsilon: f32 } = "rms_norm",
    /// A residual add fused into the norm that follows it: inputs x,
    /// residual (x's type), scale[, bias]; outputs `y = norm(x + residual)`
    /// (layer norm, or RMS norm with `rms`) and the sum itself, which the
    /// residual stream reads on.
    ResidualNorm { axis: usize, epsilon: f32, rms: bool } = "residual_norm",
    /// Inference-mode batch norm: x, scale, bias, mean, var; channel axis 1.
    BatchNorm { epsilon: f32 } = "batch_norm",
    InstanceNorm { epsilon: f32 } = "instance_norm",

    // Layout.
    Reshape { shape: Vec<Dim> } = "reshape",
    Transpose { perm: Vec<usize> } = "transpose",
    /// Per-axis start, end and step, already clamped as ONNX `Slice`
    /// specifies (for a symbolic dim, as it would be for every value the
    /// importer assumed; `Graph::bind` checks them again).
    Slice { starts: Vec<Dim>, ends: Vec<Dim>, steps: Vec<i64> } = "slice",
    Concat { axis: usize } = "concat",
    Split { axis: usize, sizes: Vec<Dim> } = "split",
    /// Broadcasts to `shape`, which is the output shape.
    Expand { shape: Vec<Dim> } = "expand",
    Tile { repeats: Vec<usize> } = "tile",
    /// Begins then ends, per axis; negative pads crop. Optional 2nd input: the fill value.
    Pad { pads: Vec<i64>, mode: PadMode } = "pad",
    DepthToSpace { blocksize: usize, column_row_depth: bool } = "depth_to_space",
    SpaceToDepth { blocksize: usize } = "space_to_depth",
    /// Nearest/linear/cubic resampling to the output shape `sizes`.
    Resize { sizes: Vec<usize>, scales: Vec<f32>, mode: ResizeMode, coord: CoordMode, nearest: NearestMode,
             cubic_coeff_a: f32, exclude_outside: bool, extrapolation_value: f32, roi: Vec<f32> } = "resize",

    // Indexing. Indices are checked: out of range is an evaluation error.
    Gather { axis: usize } = "gather",
    GatherElements { axis: usize } = "gather_elements",
    GatherND { batch_dims: usize } = "gather_nd",
    ScatterND { reduction: Reduction } = "scatter_nd",
    ScatterElements { axis: usize, reduction: Reduction } = "scatter_elements",
    /// The input's shape (dims `start..end`) as i64; folded once the dims are known.
    Shape { start: usize, end: usize } = "shape",
    /// `len` values `start + i * delta` (inputs: scalars start and delta), the
    /// form of ONNX `Range` whose bounds come from symbolic dims.
    Range { len: Dim } = "range",
    Trilu { upper: bool, k: i64 } = "trilu",
    CumSum { axis: usize, exclusive: bool, reverse: bool } = "cumsum",
    CumProd { axis: usize, exclusive: bool, reverse: bool } = "cumprod",
    /// Outputs: values, i64 indices.
    TopK { axis: usize, k: usize, largest: bool, sorted: bool } = "top_k",
    /// One-hot along `axis`: inputs indices, values [off, on]; `depth` classes.
    OneHot { axis: usize, depth: usize } = "one_hot",
}

impl Op {
    /// Ops whose result is the same tensor as their single input, element for element.
    pub fn is_unary_elementwise(&self) -> bool {
        crate::ops::elementwise::is_unary(self)
    }

    pub fn is_binary_elementwise(&self) -> bool {
        crate::ops::elementwise::is_binary(self)
    }

    /// The dims among the attributes (a reshape's target, a slice's bounds).
    pub fn dims(&self) -> Vec<Dim> {
        match self {
            Op::Reshape { shape } | Op::Expand { shape } => shape.clone(),
            Op::Slice { starts, ends, .. } => starts.iter().chain(ends).copied().collect(),
            Op::Split { sizes, .. } => sizes.clone(),
            Op::Range { len } => vec![*len],
            _ => vec![],
        }
    }

    /// The op with every attribute dim replaced by `f` of it.
    pub fn map_dims<E>(&self, mut f: impl FnMut(Dim) -> Result<Dim, E>) -> Result<Op, E> {
        let mut all = |ds: &[Dim]| ds.iter().map(|&d| f(d)).collect::<Result<Vec<_>, E>>();
        Ok(match self {
            Op::Reshape { shape } => Op::Reshape { shape: all(shape)? },
            Op::Expand { shape } => Op::Expand { shape: all(shape)? },
            Op::Slice { starts, ends, steps } => {
                Op::Slice { starts: all(starts)?, ends: all(ends)?, steps: steps.clone() }
            }
            Op::Split { axis, sizes } => Op::Split { axis: *axis, sizes: all(sizes)? },
            Op::Range { len } => Op::Range { len: all(&[*len])?[0] },
            other => other.clone(),
        })
    }
}
