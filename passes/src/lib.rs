//! Graph passes. **This crate never sees protobuf types**: it takes and
//! returns `egret_ir::Graph`.
//!
//! Today: canonicalisation. The e-graph optimiser and lowering arrive as
//! further stages of the pipeline in `egret::compile`.

mod canonicalize;
pub mod egraph;

pub use canonicalize::{canonicalize, CanonStats};
