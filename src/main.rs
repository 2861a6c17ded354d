//! The `egret` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use egret::check::{check_case, discover, Tolerance};
use egret::{compile, Backend, CompileOptions};
use egret_ir::text::{self, Constants};
use egret_ir::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "egret", version, about = "An ahead-of-time compiler for transformer models: ONNX in, fast code out.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// The IR's reference semantics, node by node (the oracle).
    Reference,
    /// Native code generated with Cranelift.
    Cpu,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Reference => Backend::Reference,
            BackendArg::Cpu => Backend::Cpu,
        }
    }
}

#[derive(clap::Args)]
struct ModelArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Bind a symbolic dimension: --dim batch=1 (repeatable).
    #[arg(long = "dim", value_name = "NAME=VALUE")]
    dims: Vec<String>,
    /// Optimisation level: 0 = one kernel per op, 1 = fuse elementwise chains.
    #[arg(long = "opt", default_value_t = egret::MAX_OPT_LEVEL, value_parser = clap::value_parser!(u8).range(0..=egret::MAX_OPT_LEVEL as i64))]
    opt: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a model and run it once, printing (or saving) its outputs.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// An input value: --input NAME=FILE.npy|FILE.pb (repeatable). Inputs
        /// not given are filled with deterministic random values.
        #[arg(long = "input", value_name = "NAME=FILE")]
        inputs: Vec<String>,
        /// Save each output as DIR/NAME.npy.
        #[arg(long, value_name = "DIR")]
        save_outputs: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Print the graph after canonicalisation before running.
        #[arg(long)]
        print_ir: bool,
        /// Seed for random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Worker threads (default: the number of cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check models in the ONNX test layout against their stored outputs.
    Check {
        /// A folder with model.onnx and test_data_set_N/, or a folder of such folders.
        path: PathBuf,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Relative tolerance for float outputs.
        #[arg(long, default_value_t = 1e-4)]
        rtol: f64,
        /// Absolute tolerance for float outputs.
        #[arg(long, default_value_t = 1e-5)]
        atol: f64,
        /// Print only failures and the summary.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Print the graph after canonicalisation, in Egret's IR text format.
    Ir {
        #[command(flatten)]
        model: ModelArgs,
        /// Print every constant in full (the output then parses back).
        #[arg(long)]
        full: bool,
    },
    /// Time a model: compile once, warm up, then report median/min/max latency.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long = "input", value_name = "NAME=FILE")]
        inputs: Vec<String>,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Timed runs after warm-up.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Worker threads (default: the number of cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also time each kernel once and print where the time goes.
        #[arg(long)]
        profile: bool,
    },
    /// List the ONNX ops the importer supports.
    Ops,
}

fn parse_dims(dims: &[String]) -> Result<HashMap<String, usize>> {
    dims.iter()
        .map(|d| {
            let (k, v) = d.split_once('=').with_context(|| format!("--dim `{d}` should be NAME=VALUE"))?;
            Ok((k.to_string(), v.parse().with_context(|| format!("--dim `{d}`: `{v}` is not a size"))?))
        })
        .collect()
}

fn main() {
    if let Err(e) = run_cli() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_cli() -> Result<()> {
    match Cli::parse().command {
        Command::Run { model, inputs, save_outputs, backend, print_ir, seed, threads } => {
            run(model, inputs, save_outputs, backend.into(), print_ir, seed, threads)
        }
        Command::Check { path, backend, rtol, atol, quiet } => {
            check(&path, backend.into(), Tolerance { rtol, atol }, quiet)
        }
        Command::Ir { model, full } => {
            let opts = CompileOptions { dims: parse_dims(&model.dims)?, opt_level: model.opt, ..Default::default() };
            let m = compile(&model.model, &opts)?;
            print!("{}", text::print_with(&m.graph, if full { Constants::Full } else { Constants::ElideOver(16) }));
            Ok(())
        }
        Command::Bench { model, inputs, backend, iters, warmup, threads, json, profile } => {
            run_bench(model, inputs, backend.into(), iters, warmup, threads, json, profile)
        }
        Command::Ops => {
            for op in egret::frontend::supported_ops() {
                println!("{op}");
            }
            Ok(())
        }
    }
}

/// Reads `--input` files, compiles, and completes the inputs with random ones.
fn compile_with_inputs(
    model: &ModelArgs,
    inputs: &[String],
    backend: Backend,
    seed: u64,
    threads: Option<usize>,
) -> Result<(egret::Model, Vec<(String, Tensor)>)> {
    let mut given: Vec<(String, Tensor)> = Vec::new();
    for spec in inputs {
        let (name, file) = spec.split_once('=').with_context(|| format!("--input `{spec}` should be NAME=FILE"))?;
        given.push((name.to_string(), egret::io::read_tensor(Path::new(file))?));
    }
    let opts = CompileOptions {
        backend,
        dims: parse_dims(&model.dims)?,
        input_shapes: given.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect(),
        input_values: given.iter().cloned().collect(),
        threads,
        opt_level: model.opt,
    };
    let m = compile(&model.model, &opts)?;
    let mut all = given.clone();
    for (name, t) in egret::io::random_inputs(&m.graph, seed)? {
        if !given.iter().any(|(n, _)| *n == name) {
            eprintln!("note: input `{name}` {} is random (seed {seed})", t.ty());
            all.push((name, t));
        }
    }
    Ok((m, all))
}

#[allow(clippy::too_many_arguments)]
fn run_bench(
    model: ModelArgs,
    inputs: Vec<String>,
    backend: Backend,
    iters: usize,
    warmup: usize,
    threads: Option<usize>,
    json: bool,
    profile: bool,
) -> Result<()> {
    let threads = threads.unwrap_or_else(egret::default_threads);
    let t = std::time::Instant::now();
    let (m, all) = compile_with_inputs(&model, &inputs, backend, 0, Some(threads))?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    for _ in 0..warmup {
        m.run(all.clone())?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let input = all.clone();
        let t = std::time::Instant::now();
        m.run(input)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let (min, max) = (times[0], times[times.len() - 1]);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "model": model.model.display().to_string(),
                "backend": backend.name(),
                "threads": threads,
                "iters": times.len(),
                "median_ms": median,
                "min_ms": min,
                "max_ms": max,
                "compile_ms": compile_ms,
            })
        );
    } else {
        println!(
            "{} on {} ({threads} threads, {} runs after {warmup} warm-up)",
            model.model.display(),
            backend.name(),
            times.len()
        );
        println!("  median {median:.3} ms   min {min:.3} ms   max {max:.3} ms   compile {compile_ms:.1} ms");
    }
    if profile {
        print_profile(&m.program.profile(all)?);
    }
    Ok(())
}

/// Time per kernel kind, then the ten slowest kernels.
fn print_profile(times: &[(String, String, f64)]) {
    let total: f64 = times.iter().map(|t| t.2).sum();
    let mut by_kind: HashMap<&str, (usize, f64)> = HashMap::new();
    for (kind, _, ms) in times {
        let e = by_kind.entry(kind).or_default();
        e.0 += 1;
        e.1 += ms;
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    println!("profile: {total:.3} ms in {} kernels", times.len());
    for (kind, (n, ms)) in kinds {
        println!("  {ms:9.3} ms {:5.1}%  {n:4} x {kind}", 100.0 * ms / total);
    }
    let mut slow: Vec<_> = times.iter().collect();
    slow.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!("slowest kernels:");
    for (kind, label, ms) in slow.into_iter().take(10) {
        println!("  {ms:9.3} ms  {kind}  {label}");
    }
}

fn run(
    model: ModelArgs,
    inputs: Vec<String>,
    save: Option<PathBuf>,
    backend: Backend,
    print_ir: bool,
    seed: u64,
    threads: Option<usize>,
) -> Result<()> {
    let (m, all) = compile_with_inputs(&model, &inputs, backend, seed, threads)?;
    if print_ir {
        print!("{}", text::print_with(&m.graph, Constants::ElideOver(16)));
    }
    let outs = m.run(all)?;
    for (name, t) in &outs {
        println!("{name}: {}  {}", t.ty(), summary(t));
    }
    if let Some(dir) = save {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
        for (name, t) in &outs {
            let safe: String =
                name.chars().map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
            let path = dir.join(format!("{safe}.npy"));
            egret::io::write_npy(&path, t)?;
            println!("saved {}", path.display());
        }
    }
    Ok(())
}

/// min / max / mean and the first few values of a tensor.
fn summary(t: &Tensor) -> String {
    let v = t.to_f64_vec();
    if v.is_empty() {
        return "(empty)".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:.6}")).collect();
    format!(
        "min {min:.6}  max {max:.6}  mean {mean:.6}  [{}{}]",
        head.join(", "),
        if v.len() > 4 { ", ..." } else { "" }
    )
}

fn check(path: &Path, backend: Backend, tol: Tolerance, quiet: bool) -> Result<()> {
    let cases = discover(path)?;
    if cases.is_empty() {
        bail!("no model.onnx under `{}`", path.display());
    }
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        for report in check_case(case, backend, tol) {
            let ok = report.passed();
            if !quiet || !ok {
                println!("{} {}", if ok { "PASS" } else { "FAIL" }, report.case);
                if let Some(e) = &report.error {
                    println!("    error: {e}");
                }
                for o in &report.outputs {
                    println!(
                        "    {} {}: max abs err {:.3e}, max rel err {:.3e}{}",
                        if o.failure.is_none() { "PASS" } else { "FAIL" },
                        o.name,
                        o.max_abs,
                        o.max_rel,
                        o.failure.as_ref().map(|f| format!(" ({f})")).unwrap_or_default()
                    );
                }
            }
            if ok {
                passed += 1;
            } else {
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
