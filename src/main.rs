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
#[command(
    name = "egret",
    version,
    about = "An ahead-of-time compiler for transformer models: ONNX in, fast code out."
)]
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
        #[arg(long, value_enum, default_value = "reference")]
        backend: BackendArg,
        /// Print the graph after canonicalisation before running.
        #[arg(long)]
        print_ir: bool,
        /// Seed for random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Check models in the ONNX test layout against their stored outputs.
    Check {
        /// A folder with model.onnx and test_data_set_N/, or a folder of such folders.
        path: PathBuf,
        #[arg(long, value_enum, default_value = "reference")]
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
    /// List the ONNX ops the importer supports.
    Ops,
}

fn parse_dims(dims: &[String]) -> Result<HashMap<String, usize>> {
    dims.iter()
        .map(|d| {
            let (k, v) = d
                .split_once('=')
                .with_context(|| format!("--dim `{d}` should be NAME=VALUE"))?;
            Ok((
                k.to_string(),
                v.parse()
                    .with_context(|| format!("--dim `{d}`: `{v}` is not a size"))?,
            ))
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
        Command::Run {
            model,
            inputs,
            save_outputs,
            backend,
            print_ir,
            seed,
        } => run(model, inputs, save_outputs, backend.into(), print_ir, seed),
        Command::Check {
            path,
            backend,
            rtol,
            atol,
            quiet,
        } => check(&path, backend.into(), Tolerance { rtol, atol }, quiet),
        Command::Ir { model, full } => {
            let opts = CompileOptions {
                dims: parse_dims(&model.dims)?,
                ..Default::default()
            };
            let m = compile(&model.model, &opts)?;
            print!(
                "{}",
                text::print_with(
                    &m.graph,
                    if full {
                        Constants::Full
                    } else {
                        Constants::ElideOver(16)
                    }
                )
            );
            Ok(())
        }
        Command::Ops => {
            for op in egret::frontend::supported_ops() {
                println!("{op}");
            }
            Ok(())
        }
    }
}

fn run(
    model: ModelArgs,
    inputs: Vec<String>,
    save: Option<PathBuf>,
    backend: Backend,
    print_ir: bool,
    seed: u64,
) -> Result<()> {
    let mut given: Vec<(String, Tensor)> = Vec::new();
    for spec in &inputs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input `{spec}` should be NAME=FILE"))?;
        given.push((name.to_string(), egret::io::read_tensor(Path::new(file))?));
    }
    let opts = CompileOptions {
        backend,
        dims: parse_dims(&model.dims)?,
        input_shapes: given
            .iter()
            .map(|(n, t)| (n.clone(), t.shape().to_vec()))
            .collect(),
        input_values: given.iter().cloned().collect(),
    };
    let m = compile(&model.model, &opts)?;
    if print_ir {
        print!("{}", text::print_with(&m.graph, Constants::ElideOver(16)));
    }
    let mut all = given.clone();
    let randoms = egret::io::random_inputs(&m.graph, seed)?;
    for (name, t) in randoms {
        if !given.iter().any(|(n, _)| *n == name) {
            eprintln!("note: input `{name}` {} is random (seed {seed})", t.ty());
            all.push((name, t));
        }
    }
    let outs = m.run(all)?;
    for (name, t) in &outs {
        println!("{name}: {}  {}", t.ty(), summary(t));
    }
    if let Some(dir) = save {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
        for (name, t) in &outs {
            let safe: String = name
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
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
                        o.failure
                            .as_ref()
                            .map(|f| format!(" ({f})"))
                            .unwrap_or_default()
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
