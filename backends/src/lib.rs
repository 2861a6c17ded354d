//! Code generators. **A backend sees only the IR (and, as they arrive,
//! lowered kernels), never ONNX.**
//!
//! Empty today: the reference backend, which needs no code generation, lives
//! in `runtime`. The Cranelift CPU backend is the next stage to land here,
//! then WGSL and PTX, each behind the same kernel plan.
