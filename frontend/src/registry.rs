//! The op registry: ONNX op type to builder, filled per family.

use crate::context::{BuildResult, NodeCtx};
use std::collections::HashMap;
use std::sync::OnceLock;

pub type Builder = fn(&mut NodeCtx) -> BuildResult;
pub type Registry = HashMap<&'static str, Builder>;

pub fn get(op_type: &str) -> Option<Builder> {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let mut r = Registry::new();
            crate::ops::math::register(&mut r);
            crate::ops::nn::register(&mut r);
            crate::ops::array::register(&mut r);
            r
        })
        .get(op_type)
        .copied()
}

/// Every op type the registry knows, sorted (for `egret ops` and docs).
pub fn supported_ops() -> Vec<&'static str> {
    let mut r = Registry::new();
    crate::ops::math::register(&mut r);
    crate::ops::nn::register(&mut r);
    crate::ops::array::register(&mut r);
    let mut v: Vec<_> = r.keys().copied().collect();
    v.sort();
    v
}
