//! `libegret_kernels_archive.a`: the kernel library's C ABI (`egret_*`
//! kernels, `egret_rt_*` scheduler) with everything it needs from Rust's
//! standard library, for `egret compile` to link into shared libraries.
//! The `egret` package's `build.rs` builds it (release, `panic = "abort"`)
//! and carries it inside `egret`.

// Linked for its `#[no_mangle]` functions, which the archive keeps.
pub use egret_kernels::*;
