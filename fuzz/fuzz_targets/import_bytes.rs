#![no_main]
//! See `fuzz/src/lib.rs` (`import_bytes_target`).

libfuzzer_sys::fuzz_target!(|data: &[u8]| egret_fuzz::import_bytes_target(data));
