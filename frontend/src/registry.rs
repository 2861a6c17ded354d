//! The op registry: ONNX op type to builder, filled per family.

use crate::context::{BuildResult, NodeCtx};
use std::collections::HashMap;
use std::sync::OnceLock;

pub type Builder = fn(&mut NodeCtx) -> BuildResult;
pub type Registry = HashMap<&'static str, Builder>;

/// The domain of onnxruntime's contrib ops (optimum's O1-O4 exports, its
/// quantizers, onnxruntime-genai's LLMs).
pub const MICROSOFT: &str = "com.microsoft";

fn default_domain() -> Registry {
    let mut r = Registry::new();
    crate::ops::math::register(&mut r);
    crate::ops::nn::register(&mut r);
    crate::ops::array::register(&mut r);
    crate::ops::quant::register(&mut r);
    r
}

fn microsoft_domain() -> Registry {
    let mut r = Registry::new();
    crate::ops::contrib::register(&mut r);
    r
}

/// The builder of `op_type` in `domain` ("" for the default domain).
pub fn get(domain: &str, op_type: &str) -> Option<Builder> {
    static DEFAULT: OnceLock<Registry> = OnceLock::new();
    static MS: OnceLock<Registry> = OnceLock::new();
    let r = match domain {
        "" | "ai.onnx" => DEFAULT.get_or_init(default_domain),
        MICROSOFT => MS.get_or_init(microsoft_domain),
        _ => return None,
    };
    r.get(op_type).copied()
}

/// Every op type the registry knows, sorted (for `egret ops` and docs):
/// the default domain's by name, then the contrib ops as
/// `com.microsoft.Name`.
pub fn supported_ops() -> Vec<String> {
    let mut v: Vec<String> = default_domain().keys().map(|s| s.to_string()).collect();
    v.sort();
    let mut ms: Vec<String> = microsoft_domain().keys().map(|s| format!("{MICROSOFT}.{s}")).collect();
    ms.sort();
    v.extend(ms);
    v
}

/// The opset each op first appears in, for the ops that are not in opset 1
/// (from the ONNX operator schemas). A model stamped with an older opset
/// cannot use them: onnxruntime refuses such a model, and so does Egret.
const FIRST_OPSET: &[(&str, i64)] = &[
    ("Acos", 7),
    ("Acosh", 9),
    ("AffineGrid", 20),
    ("Asin", 7),
    ("Asinh", 9),
    ("Atan", 7),
    ("Atanh", 9),
    ("Attention", 23),
    ("BitCast", 26),
    ("BitShift", 11),
    ("BitwiseAnd", 18),
    ("BitwiseNot", 18),
    ("BitwiseOr", 18),
    ("BitwiseXor", 18),
    ("BlackmanWindow", 17),
    ("CastLike", 15),
    ("Celu", 12),
    ("CenterCropPad", 18),
    ("ConstantOfShape", 9),
    ("Cos", 7),
    ("Cosh", 9),
    ("CumProd", 26),
    ("CumSum", 11),
    ("Einsum", 12),
    ("Erf", 9),
    ("Expand", 8),
    ("EyeLike", 9),
    ("GatherElements", 11),
    ("GatherND", 11),
    ("Gelu", 20),
    ("GreaterOrEqual", 12),
    ("GroupNormalization", 18),
    ("HammingWindow", 17),
    ("HannWindow", 17),
    ("HardSwish", 14),
    ("IsInf", 10),
    ("IsNaN", 9),
    ("LayerNormalization", 17),
    ("LessOrEqual", 12),
    ("MaxUnpool", 9),
    ("MeanVarianceNormalization", 9),
    ("Mish", 18),
    ("Mod", 10),
    ("NegativeLogLikelihoodLoss", 12),
    ("OneHot", 9),
    ("RMSNormalization", 23),
    ("Range", 11),
    ("Resize", 10),
    ("ReverseSequence", 10),
    ("RotaryEmbedding", 23),
    ("Round", 11),
    ("Scatter", 9),
    ("ScatterElements", 11),
    ("ScatterND", 11),
    ("Shrink", 9),
    ("Sign", 9),
    ("Sin", 7),
    ("Sinh", 9),
    ("SoftmaxCrossEntropyLoss", 12),
    ("SwiGLU", 28),
    ("Swish", 24),
    ("Tan", 7),
    ("ThresholdedRelu", 10),
    ("Trilu", 14),
    ("Where", 9),
];

/// The first opset of the default domain that defines `op_type`.
pub fn first_opset(op_type: &str) -> i64 {
    FIRST_OPSET.iter().find(|(op, _)| *op == op_type).map_or(1, |&(_, v)| v)
}
