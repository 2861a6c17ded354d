#![no_main]
//! See `fuzz/src/lib.rs` (`compile_run_target`).

libfuzzer_sys::fuzz_target!(|data: &[u8]| egret_fuzz::compile_run_target(data));
