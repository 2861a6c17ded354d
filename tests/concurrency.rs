//! One compiled model shared by many threads, as a server shares it: each
//! thread runs inputs of its own (other shapes, through a decoder whose
//! batch, sequence and past lengths are symbolic) many times, and every
//! result must be bit for bit what one thread alone gets. Calls of one
//! program share its arena and its per-shape setups (`runtime/src/cpu.rs`);
//! this is what would catch one call reading another's.
//!
//! `EGRET_CONCURRENCY_RUNS=N` sets the runs per thread (20 by default; the
//! recorded run in `BENCHMARKS.md` used 200).

mod common;

use egret::ir::Tensor;
use egret::{compile, CompileOptions};

const THREADS: usize = 8;

fn runs() -> usize {
    std::env::var("EGRET_CONCURRENCY_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// Thread `t`'s inputs for `gpt2_kv`: its own batch, past and sequence
/// lengths, token ids and cache values.
fn inputs(t: usize) -> Vec<(String, Tensor)> {
    let (batch, past, sequence) = (1 + t % 2, 3 * (t % 4), 1 + t % 3);
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as u32
    };
    let ids: Vec<i64> = (0..batch * sequence).map(|_| (next() % 96) as i64).collect();
    let mut feeds = vec![
        ("input_ids".to_string(), Tensor::from_vec(vec![batch, sequence], ids)),
        (
            "attention_mask".to_string(),
            Tensor::from_vec(vec![batch, past + sequence], vec![1i64; batch * (past + sequence)]),
        ),
    ];
    for layer in 0..2 {
        for kind in ["key", "value"] {
            let values: Vec<f32> = (0..batch * 2 * past * 16).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            feeds.push((format!("past_key_values.{layer}.{kind}"), Tensor::from_vec(vec![batch, 2, past, 16], values)));
        }
    }
    feeds
}

#[test]
fn threads_sharing_a_program_get_what_one_thread_gets() {
    let model_dir = common::synthetic_dir().join("gpt2_kv");
    for threads in [1, 2] {
        let opts = CompileOptions { threads: Some(threads), ..Default::default() };
        let model = compile(&model_dir, &opts).unwrap();
        let alone: Vec<Vec<(String, Tensor)>> = (0..THREADS).map(|t| model.run(inputs(t)).unwrap()).collect();
        let runs = runs();
        std::thread::scope(|s| {
            for (t, want) in alone.iter().enumerate() {
                let model = &model;
                s.spawn(move || {
                    let feeds = inputs(t);
                    for run in 0..runs {
                        let got = model.run(feeds.clone()).unwrap();
                        for ((name, w), (_, g)) in want.iter().zip(&got) {
                            assert!(
                                w.shape() == g.shape() && w.bytes() == g.bytes(),
                                "thread {t}, run {run}, {threads} kernel threads: `{name}` differs from one thread's"
                            );
                        }
                    }
                });
            }
        });
    }
}

/// A symbolic kernel splits across threads or not by its work at each
/// call's values (`cpu::split_at`): a concatenation and an exponential over
/// `n` rows stay on one thread at small `n` and split at large, with the
/// same bits as one thread and as the reference.
#[test]
fn symbolic_kernels_split_by_their_size_at_each_call() {
    let g = egret::ir::text::parse(
        "v0: f32[n,1024] = input{name=\"past\"}
v1: f32[1,1024] = input{name=\"new\"}
v2: f32[n + 1,1024] = concat{axis=0} v0, v1
v3: f32[n + 1,1024] = exp v2
output \"present\" = v2
output \"exp\" = v3
",
    )
    .unwrap();
    let run = |threads: usize, backend: egret::Backend, rows: usize| {
        let opts = CompileOptions { threads: Some(threads), backend, ..Default::default() };
        let exe = egret::backend_executable(&g, &opts).unwrap();
        let past: Vec<f32> = (0..rows * 1024).map(|i| (i % 97) as f32 * 0.01 - 0.5).collect();
        let inputs =
            vec![Tensor::from_vec(vec![rows, 1024], past), Tensor::from_vec(vec![1, 1024], vec![0.25f32; 1024])];
        exe.run(inputs).unwrap()
    };
    // 2 rows are below the work that splits; 700 rows above it.
    for rows in [2, 700] {
        let want = run(1, egret::Backend::Reference, rows);
        for threads in [1, 2] {
            let got = run(threads, egret::Backend::Cpu, rows);
            for (w, g) in want.iter().zip(&got) {
                assert_eq!(w.shape(), g.shape(), "{rows} rows, {threads} threads");
                let close = w
                    .as_f32()
                    .unwrap()
                    .iter()
                    .zip(g.as_f32().unwrap())
                    .all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1.0));
                assert!(close, "{rows} rows, {threads} threads");
            }
        }
        assert_eq!(
            run(1, egret::Backend::Cpu, rows),
            run(2, egret::Backend::Cpu, rows),
            "{rows} rows: threads changed bits"
        );
    }
}
