//! Replays the committed fuzz corpora (`fuzz/corpus/TARGET/`) through the
//! fuzz targets' bodies (`fuzz/src/lib.rs`, included here as a module), so
//! plain `cargo test` catches a regression in the importer, the IR text
//! parser or the compile-and-run path without libFuzzer or nightly. Long
//! runs: `tools/fuzz.sh` (see BENCHMARKS.md).
//!
//! A crash the fuzzer found is kept as a minimised input in the corpus of
//! its target (named `crash-*`), so it is replayed here once fixed.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    files
}

/// Runs every file of `target`'s corpus through `body`, naming the file
/// that panics.
fn replay(target: &str, body: fn(&[u8])) -> usize {
    let files = corpus(target);
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            panic!("fuzz target {target} panicked on {}", f.display());
        }
    }
    files.len()
}

#[test]
fn import_bytes_corpus() {
    let n = replay("import_bytes", targets::import_bytes_target);
    eprintln!("import_bytes: {n} inputs replayed");
}

#[test]
fn ir_text_corpus() {
    let n = replay("ir_text", targets::ir_text_target);
    eprintln!("ir_text: {n} inputs replayed");
}

#[test]
fn compile_run_corpus() {
    let n = replay("compile_run", targets::compile_run_target);
    eprintln!("{n} inputs replayed; {}", targets::COUNTERS.summary());
    // The corpus is there to reach compile-and-run, not to stop at import.
    let reached = targets::COUNTERS.reached_compile_run.load(std::sync::atomic::Ordering::Relaxed);
    assert!(reached * 4 >= n as u64, "only {reached} of {n} corpus inputs reached compile-and-run");
}

/// The ONNX files under `dir`, sorted.
fn models(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    files
}

/// Crashes the fuzzers found, fixed, kept as models (`fuzz/regressions/`):
/// each goes through the importer, and through compile-and-run on the
/// reference and CPU backends at every `--opt`.
#[test]
fn fixed_crashes_stay_fixed() {
    let files = models("fuzz/regressions");
    assert!(!files.is_empty());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| {
            targets::import_bytes_target(&data);
            targets::compile_run_model(&data);
        })
        .is_err()
        {
            panic!("{} panicked", f.display());
        }
    }
}

/// `fuzz/regressions/raw_data_length_check_overflows.onnx`: an
/// initializer of dims `[2^62]` (f32) with 4 bytes of `raw_data`. The
/// importer's length check in `from_le_bytes` (`frontend/src/tensor.rs`)
/// multiplied without a check: a panic where overflow checks are on
/// (tests, fuzzing), and in a release build the product wrapped
/// (`(2^62 + 1) * 4` is 4), so the check passed and only
/// `Tensor::try_new` refused the tensor. Now the product is checked.
#[test]
fn raw_data_length_check_overflows() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/raw_data_length_check_overflows.onnx");
    targets::import_bytes_target(&std::fs::read(f).unwrap());
}

/// The compile_run target on random bytes, without libFuzzer and without
/// its instrumentation (about 50 times faster than under it): a sweep of
/// `EGRET_FUZZ_SWEEP` inputs (default 10,000) of 32 to 431 bytes from a
/// SplitMix seed (`EGRET_FUZZ_SEED`, default 1000), for the long runs in
/// BENCHMARKS.md:
/// `EGRET_FUZZ_SWEEP=1000000 cargo test --test fuzz_corpus -- --ignored --nocapture random_compile_run_sweep`
#[test]
#[ignore = "a long run; see its comment"]
fn random_compile_run_sweep() {
    let var = |name: &str, default: u64| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let (n, seed) = (var("EGRET_FUZZ_SWEEP", 10_000), var("EGRET_FUZZ_SEED", 1000));
    let mut rng = egret::io::SplitMix::new(seed);
    let t = std::time::Instant::now();
    let mut slowest = std::time::Duration::ZERO;
    let mut panics = vec![];
    for i in 0..n {
        let len = 32 + (rng.next_u64() as usize % 400);
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let t0 = std::time::Instant::now();
        if std::panic::catch_unwind(|| targets::compile_run_target(&data)).is_err() {
            let p = std::env::temp_dir().join(format!("egret-sweep-crash-{seed}-{i}"));
            std::fs::write(&p, &data).unwrap();
            panics.push(p);
        }
        slowest = slowest.max(t0.elapsed());
    }
    eprintln!("{} in {:.1?}; slowest input {slowest:.1?}", targets::COUNTERS.summary(), t.elapsed());
    assert!(panics.is_empty(), "{} inputs panicked, saved to {:?}", panics.len(), panics);
}

/// A compiled program gives its JIT code back when dropped: the
/// compile_run sweep compiled about 213,000 programs in one process, and
/// from the ~32,700th on (two mappings leaked per program, against Linux's
/// `vm.max_map_count` of 65,530) every CPU compile failed with "unable to
/// make memory readonly".
#[cfg(target_os = "linux")]
#[test]
fn compiled_programs_give_their_code_back() {
    let maps = || std::fs::read_to_string("/proc/self/maps").unwrap().lines().count();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/matmul_no_rows.onnx");
    let opts = egret::CompileOptions { threads: Some(1), opt_level: 0, ..Default::default() };
    drop(egret::compile(&model, &opts).unwrap());
    let before = maps();
    for _ in 0..400 {
        drop(egret::compile(&model, &opts).unwrap());
    }
    // Other tests of this file compile at the same time: a margin for theirs.
    let grown = maps().saturating_sub(before);
    assert!(grown < 200, "400 compiles left {grown} more memory mappings");
}

/// Findings of the compile_run sweep and of libFuzzer, kept as the
/// generator's inputs (`fuzz/regressions/sweep/`: they build their models
/// with this generator only; the models themselves are beside them in
/// `fuzz/regressions/`), each replayed through the target:
/// - an output shape that differed between the CPU (`f32[63,0]`) and the
///   reference (`f32[64,0]`), a slice's symbolic length (`-s0 + 3` for
///   `s0 - 3 .. 0`) negative at run time where ONNX clamps it to 0: the
///   CPU now refuses such a call naming the node (`Plan::check_sizes`;
///   inputs 92467 and 356507);
/// - "s0 is symbolic in a bound plan" (112973): a product of known shapes
///   over a view with a symbolic stride on a dim of one element;
/// - `Tensor::new`'s shape assertion (22153): lowering replayed a reshape
///   of an empty tensor on row indices (rows of width 0);
/// - two value disagreements (272006, 310543) of 1/x near x = 0, which
///   the generator now counts as fragile, as it does a floor;
/// - the `raw_data` length overflow (libFuzzer's input).
#[test]
fn fixed_sweep_findings_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/sweep");
    let mut failed = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        if std::panic::catch_unwind(|| targets::compile_run_target(&data)).is_err() {
            failed.push(p);
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
}

/// compile_run run 9 (twenty-second session): a backward slice of an empty
/// axis (`Slice` of a `Softmax` over 0 elements, starts 0, ends -1, step
/// -1) was typed one element long, and the CPU's code read it from the
/// empty buffer's null address (ASan: SEGV at address 4). The importer now
/// keeps an empty axis empty, and the IR refuses a slice whose first or
/// last element lies outside its axis, as the evaluator does.
#[test]
fn a_backward_slice_of_an_empty_axis_is_empty() {
    use egret::ir::Tensor;
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/backward_slice_of_an_empty_axis.onnx");
    let inputs = vec![
        ("x1".to_string(), Tensor::from_vec(vec![2, 7], vec![0.5f32; 14])),
        ("x2".to_string(), Tensor::from_vec(vec![64], vec![0.25f32; 64])),
    ];
    for backend in [egret::Backend::Cpu, egret::Backend::Reference] {
        let opts = egret::CompileOptions { backend, threads: Some(1), ..Default::default() };
        let out = egret::compile(&model, &opts).unwrap().run(inputs.clone()).unwrap();
        assert!(out.iter().all(|(_, t)| t.shape() == [0]), "{backend:?}: {out:?}");
    }
    let text = "v0: f32[0] = input{name=\"x\"}
v1: f32[1] = slice{starts=[0], ends=[-1], steps=[-1]} v0  # backwards
output \"y\" = v1
";
    let err = egret::ir::text::parse(text).unwrap_err();
    assert!(err.contains("backwards") && err.contains("outside its 0 elements"), "{err}");
}
