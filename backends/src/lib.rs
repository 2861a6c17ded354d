//! Code generators. **A backend sees only the kernel plan (and the IR it was
//! lowered from), never ONNX.**
//!
//! `plan` lowers a canonical graph to a backend-neutral list of kernels with
//! a memory plan; `cpu` compiles each kernel to machine code with Cranelift.

pub mod cpu;
pub mod plan;

pub use plan::{lower, Plan};
