//! Programs for graphs whose dims stay symbolic.
//!
//! The import, canonicalisation and the e-graph run once, on the symbolic
//! graph. The backends' plans keep the symbols their kernels read at run
//! time (a batch, a sequence's and a past's lengths), which run every value
//! from one compile; a graph whose symbols all stay is compiled with the
//! model and never reaches this module. `crate::symbols_to_bind` names the
//! others (the size of a product of two activations, a norm's
//! length), and those are bound:
//! a `Specializing` executable works them out of each call's input shapes
//! and keeps the programs it compiled for the values it has seen. A value
//! it has seen runs at once; a new one is bound (`Graph::bind`),
//! canonicalised (the exporters' shape arithmetic and masks fold to
//! constants) and handed to the backend, which is the lowering and code
//! generation, not the whole pipeline.
//!
//! A model the importer cannot keep symbolic (an op whose import needs a
//! dim's value, such as a reshape the dim algebra cannot prove) is served
//! the same way from its file instead: each new binding is the whole
//! pipeline with the dims given (`Specializing::from_file`).

use crate::{backend_executable_with, CompileOptions};
use egret_ir::{Bindings, Graph, Tensor, TensorRef, Type};
use egret_runtime::{Executable, RunError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// How many bindings a program keeps compiled by default
/// (`CompileOptions::max_specializations`): a decoder's past length takes a
/// new value every token, and each compiled binding holds its arena, code
/// and packed weights.
pub const MAX_SPECIALIZATIONS: usize = 16;

pub struct Specializing {
    source: Source,
    /// The inputs' names and types, symbolic dims included: what each
    /// call's shapes are matched against.
    inputs: Vec<(String, Type)>,
    opts: CompileOptions,
    /// Most recently used last, by the values of the symbols bound.
    compiled: Mutex<Vec<(Bindings, Arc<dyn Executable>)>>,
    /// The symbols a program is compiled for the values of (the others
    /// stay symbolic in its plan); `None` until the first compile works
    /// them out.
    bound: Mutex<Option<std::collections::BTreeSet<String>>>,
    compiles: std::sync::atomic::AtomicUsize,
    /// The CPU's kernels across bindings: most of a model's kernels do not
    /// depend on a given symbol (a decoder's matmuls on the new token do
    /// not change with the past length), and their code is reused.
    kernels: egret_backends::cpu::KernelCache,
}

/// What a binding is compiled from.
enum Source {
    /// The symbolic graph, imported and optimised once.
    Graph(Graph),
    /// The model file.
    File(PathBuf),
}

impl Specializing {
    pub fn new(graph: Graph, opts: CompileOptions) -> Specializing {
        let inputs = egret_runtime::Signature::of(&graph, vec![]).inputs;
        Specializing::serving(Source::Graph(graph), inputs, opts)
    }

    /// Serves the model at `path`, whose declared inputs are `inputs`, by
    /// compiling it whole for each binding of their symbolic dims.
    pub fn from_file(path: PathBuf, inputs: Vec<(String, Type)>, opts: CompileOptions) -> Specializing {
        let opts = CompileOptions { keep_symbolic: false, input_shapes: Default::default(), ..opts };
        Specializing::serving(Source::File(path), inputs, opts)
    }

    fn serving(source: Source, inputs: Vec<(String, Type)>, opts: CompileOptions) -> Specializing {
        Specializing {
            source,
            inputs,
            opts,
            compiled: Mutex::new(Vec::new()),
            bound: Mutex::new(None),
            compiles: Default::default(),
            kernels: Default::default(),
        }
    }

    fn bindings<'a>(&self, shapes: impl Iterator<Item = &'a [usize]>) -> Result<Bindings, RunError> {
        egret_runtime::solve_dims(&self.inputs, &shapes.collect::<Vec<_>>())
    }

    /// The symbols of `values` a program is compiled for: all of them,
    /// until a first compile has found which its plan can keep.
    fn key(&self, values: &Bindings) -> Bindings {
        match &*self.bound.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(bound) => values.iter().filter(|(k, _)| bound.contains(*k)).map(|(k, &v)| (k.clone(), v)).collect(),
            None => values.clone(),
        }
    }

    /// A program for these values of the dims: a CPU plan keeps the
    /// symbols its kernels take, found by binding what the lowering asks
    /// for until it asks for nothing (binding and canonicalising can fold
    /// more, so the question is asked again of each bound graph).
    fn compile(&self, values: &Bindings) -> Result<(Box<dyn Executable>, Bindings), crate::Error> {
        match &self.source {
            Source::Graph(graph) => {
                let runtime_symbols = self.opts.backend != crate::Backend::Reference;
                let mut bind: std::collections::BTreeSet<String> = match runtime_symbols {
                    true => self.bound.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default(),
                    false => values.keys().cloned().collect(),
                };
                loop {
                    let given = |s: &str| bind.contains(s).then(|| values.get(s).copied()).flatten();
                    let bound = graph.bind(&given)?;
                    let (bound, _) = egret_passes::canonicalize(&bound)?;
                    let more = crate::symbols_to_bind(&bound, &self.opts);
                    if more.iter().any(|s| bind.contains(s)) {
                        // Only a symbol no input gives a value stays after binding.
                        let names: Vec<&str> = more.iter().map(String::as_str).collect();
                        return Err(crate::Error::Usage(format!(
                            "dims {} need values that the inputs' shapes do not give {}",
                            names.join(", "),
                            egret_ir::BIND_DIMS_HINT
                        )));
                    }
                    if !more.is_empty() {
                        bind.extend(more);
                        continue;
                    }
                    let key = values.iter().filter(|(k, _)| bind.contains(*k)).map(|(k, &v)| (k.clone(), v)).collect();
                    if runtime_symbols {
                        *self.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(bind);
                    }
                    return Ok((backend_executable_with(&bound, &self.opts, Some(&self.kernels))?, key));
                }
            }
            Source::File(path) => {
                let mut dims = self.opts.dims.clone();
                dims.extend(values.iter().map(|(k, &v)| (k.clone(), v)));
                let opts = CompileOptions { dims, dim_bounds: Default::default(), ..self.opts.clone() };
                Ok((crate::compile(path, &opts)?.program.executable, values.clone()))
            }
        }
    }

    /// The program for `values`, compiled now if it is new.
    fn executable_for(&self, values: &Bindings) -> Result<Arc<dyn Executable>, RunError> {
        {
            let key = self.key(values);
            let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = compiled.iter().position(|(b, _)| *b == key) {
                let entry = compiled.remove(i);
                let exe = entry.1.clone();
                compiled.push(entry);
                return Ok(exe);
            }
        }
        let shown = || values.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
        let (exe, key) =
            self.compile(values).map_err(|e| RunError::Compile(format!("compiling for {}: {e}", shown())))?;
        let exe: Arc<dyn Executable> = Arc::from(exe);
        self.compiles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if compiled.len() >= self.opts.max_specializations.max(1) {
            compiled.remove(0);
        }
        compiled.push((key, exe.clone()));
        Ok(exe)
    }
}

impl Executable for Specializing {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let values = self.bindings(inputs.iter().map(|t| t.shape()))?;
        self.executable_for(&values)?.run(inputs)
    }

    fn run_refs(&self, inputs: &[TensorRef<'_>]) -> Result<Vec<Tensor>, RunError> {
        let values = self.bindings(inputs.iter().map(|t| t.shape()))?;
        self.executable_for(&values)?.run_refs(inputs)
    }

    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, String, f64)>, RunError> {
        let values = self.bindings(inputs.iter().map(|t| t.shape()))?;
        self.executable_for(&values)?.profile(inputs)
    }

    fn specializations(&self) -> Option<usize> {
        Some(self.compiles.load(std::sync::atomic::Ordering::Relaxed))
    }
}
