//! Code generators. **A backend sees only the kernel plan (and the IR it was
//! lowered from), never ONNX.**
//!
//! `plan` defines the backend-neutral kernel plan; `lower` lowers a canonical
//! graph to it (with `epilogue` folding elementwise tails into matmuls and
//! `memory` planning the arena); `cpu` compiles each kernel to machine code
//! with Cranelift.

pub mod cpu;
mod epilogue;
pub mod gpu;
mod lower;
pub mod memory;
pub mod plan;

pub use lower::{binding_reasons, lower, symbols_to_bind, BindingReason, LowerOptions};
pub use plan::Plan;
