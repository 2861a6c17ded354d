//! `--opt 0` against `--opt 2` for every zoo model (and the perf models when
//! `../shared/perf` is present), one thread, criterion groups per model.
//!
//! `cargo bench --bench opt_levels`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::path::{Path, PathBuf};

fn models() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = egret::check::discover(&root.join("tests/data/zoo")).unwrap_or_default();
    let perf = root.join("../shared/perf");
    if perf.is_dir() {
        dirs.extend(egret::check::discover(&perf).unwrap_or_default());
    }
    dirs
}

fn opt_levels(c: &mut Criterion) {
    for dir in models() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut group = c.benchmark_group(format!("opt_levels/{name}"));
        group.sample_size(20);
        for opt_level in [0u8, 2] {
            let opts = egret::CompileOptions { opt_level, threads: Some(1), ..Default::default() };
            let model = egret::compile(&dir.join("model.onnx"), &opts).unwrap();
            let inputs = egret::io::random_inputs(&model.graph, 0).unwrap();
            group.bench_with_input(BenchmarkId::from_parameter(format!("opt{opt_level}")), &opt_level, |b, _| {
                b.iter(|| model.run(inputs.clone()).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, opt_levels);
criterion_main!(benches);
