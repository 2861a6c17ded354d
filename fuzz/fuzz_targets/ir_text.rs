#![no_main]
//! See `fuzz/src/lib.rs` (`ir_text_target`).

libfuzzer_sys::fuzz_target!(|data: &[u8]| egret_fuzz::ir_text_target(data));
