//! `libegret_kernels_archive.a`: the kernel library's C ABI (`egret_*`
//! kernels, `egret_rt_*` scheduler) with everything it needs from Rust's
//! standard library, for `egret compile` to link into shared libraries.
//! Not linked by `egret compile` yet: built here so that it keeps building
//! (`cargo build --release -p egret-kernels-archive`; 45 s, 9 MB with fat LTO).

// Linked for its `#[no_mangle]` functions, which the archive keeps.
pub use egret_kernels::*;
