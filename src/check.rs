//! `egret check`: run models in the ONNX test layout against stored outputs.
//!
//! A case is a folder with `model.onnx` and `test_data_set_N/` folders of
//! `input_K.pb` / `output_K.pb`. Inputs are bound by the names stored in the
//! `.pb` files (falling back to position), outputs compared by position.

use crate::io::read_pb;
use crate::{compile, Backend, CompileOptions, Error, Model};
use egret_ir::Tensor;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance { rtol: 1e-4, atol: 1e-5 }
    }
}

/// How one output compared.
#[derive(Clone, Debug)]
pub struct OutputReport {
    pub name: String,
    pub max_abs: f64,
    pub max_rel: f64,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

/// How one case (a model and one data set) went.
#[derive(Clone, Debug)]
pub struct CaseReport {
    pub case: String,
    pub outputs: Vec<OutputReport>,
    /// A failure before any output could be compared (import, run, files).
    pub error: Option<String>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.outputs.iter().all(|o| o.failure.is_none())
    }
}

/// The case folders under `path`: itself if it holds `model.onnx`, else
/// every folder below it that does, sorted.
pub fn discover(path: &Path) -> Result<Vec<PathBuf>, Error> {
    if path.join("model.onnx").is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(path).map_err(|e| Error::Usage(format!("cannot read `{}`: {e}", path.display())))?;
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for d in dirs {
        out.extend(discover(&d)?);
    }
    Ok(out)
}

/// The `test_data_set_N` folders of a case, in order.
pub fn data_sets(case: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut sets: Vec<PathBuf> = std::fs::read_dir(case)
        .map_err(|e| Error::Usage(format!("cannot read `{}`: {e}", case.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_")))
        .collect();
    sets.sort();
    Ok(sets)
}

/// `prefix_0.pb`, `prefix_1.pb`, ... in index order.
pub fn numbered(dir: &Path, prefix: &str) -> Result<Vec<(String, Tensor)>, Error> {
    let mut out = Vec::new();
    for k in 0.. {
        let p = dir.join(format!("{prefix}_{k}.pb"));
        if !p.exists() {
            break;
        }
        out.push(read_pb(&p)?);
    }
    Ok(out)
}

/// Runs every data set of one case.
pub fn check_case(case: &Path, backend: Backend, tol: Tolerance) -> Vec<CaseReport> {
    check_case_with(case, &CompileOptions { backend, ..Default::default() }, tol)
}

/// `check_case` with full compile options (the stored inputs are added to
/// `input_values`).
pub fn check_case_with(case: &Path, opts: &CompileOptions, tol: Tolerance) -> Vec<CaseReport> {
    check_case_counting(case, opts, tol).0
}

/// How many times `check` compiled a case's model: the front of the
/// pipeline (import, canonicalisation, the e-graph), and the programs the
/// back (lowering, code generation) made for its bindings of symbolic dims.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compiles {
    pub models: usize,
    /// Programs compiled for bindings of symbolic dims, over all models.
    pub specializations: usize,
}

/// `check_case_with`, also returning how many compiles the data sets took.
/// The model keeps its symbolic dims symbolic, so data sets of different
/// shapes share one compile of the model; the backend makes a program per
/// value of the dims its kernels need known (on the CPU, the batch: the
/// sequence and past lengths stay symbolic). A set whose inputs a compiled model does not accept
/// (a value the model was specialised on differs) compiles it again.
pub fn check_case_counting(case: &Path, opts: &CompileOptions, tol: Tolerance) -> (Vec<CaseReport>, Compiles) {
    let sets = match data_sets(case) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => return (vec![failed(case, "no test_data_set_N folders".into())], Compiles::default()),
        Err(e) => return (vec![failed(case, e.to_string())], Compiles::default()),
    };
    let mut models: Vec<Model> = Vec::new();
    let opts = CompileOptions { keep_symbolic: true, ..opts.clone() };
    let reports = sets
        .iter()
        .map(|set| check_set(case, set, &opts, tol, &mut models).unwrap_or_else(|e| failed(set, e.to_string())))
        .collect();
    let specializations = models.iter().filter_map(|m| m.program.executable.specializations()).sum();
    (reports, Compiles { models: models.len(), specializations })
}

fn failed(case: &Path, error: String) -> CaseReport {
    CaseReport { case: case.display().to_string(), outputs: vec![], error: Some(error) }
}

fn check_set(
    case: &Path,
    set: &Path,
    opts: &CompileOptions,
    tol: Tolerance,
    models: &mut Vec<Model>,
) -> Result<CaseReport, Error> {
    let inputs = numbered(set, "input")?;
    let expected = numbered(set, "output")?;
    let model_path = case.join("model.onnx");
    if inputs.iter().any(|(n, _)| n.is_empty()) {
        return Err(Error::Usage(format!("`{}`: input files without tensor names are not supported", set.display())));
    }
    let named = inputs;
    let model = match models.iter().position(|m| m.program.signature.accepts(&named)) {
        Some(i) => &models[i],
        None => {
            let opts = CompileOptions { input_values: named.iter().cloned().collect(), ..opts.clone() };
            models.push(compile(&model_path, &opts)?);
            models.last().expect("just pushed")
        }
    };
    let outs = model.run(named)?;
    if outs.len() != expected.len() {
        return Err(Error::Usage(format!(
            "the model has {} outputs but {} reference outputs are stored",
            outs.len(),
            expected.len()
        )));
    }
    let outputs = outs.iter().zip(&expected).map(|((name, got), (_, want))| compare(name, got, want, tol)).collect();
    Ok(CaseReport { case: format!("{}", set.display()), outputs, error: None })
}

/// Compares one output. Floats: `|got - want| <= atol + rtol * |want|`, NaN
/// matching NaN; integers and bools exactly.
pub fn compare(name: &str, got: &Tensor, want: &Tensor, tol: Tolerance) -> OutputReport {
    let mut r = OutputReport { name: name.to_string(), max_abs: 0.0, max_rel: 0.0, failure: None };
    if got.shape() != want.shape() || got.dtype() != want.dtype() {
        r.failure = Some(format!("got {} but expected {}", got.ty(), want.ty()));
        return r;
    }
    let exact = !want.dtype().is_float();
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let mut bad = 0usize;
    let mut first_bad = None;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        if a.is_nan() && b.is_nan() || a == b {
            continue;
        }
        let abs = (a - b).abs();
        let rel = abs / b.abs().max(f64::MIN_POSITIVE);
        if abs.is_nan() || abs > r.max_abs {
            r.max_abs = if abs.is_nan() { f64::INFINITY } else { abs };
        }
        r.max_rel = r.max_rel.max(if rel.is_nan() { f64::INFINITY } else { rel });
        let ok = !exact && abs <= tol.atol + tol.rtol * b.abs();
        if !ok {
            bad += 1;
            first_bad.get_or_insert((i, a, b));
        }
    }
    if let Some((i, a, b)) = first_bad {
        r.failure =
            Some(format!("{bad} of {} elements differ; first at flat index {i}: got {a}, expected {b}", g.len()));
    }
    r
}
