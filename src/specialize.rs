//! Programs for graphs whose dims stay symbolic.
//!
//! The import, canonicalisation and the e-graph run once, on the symbolic
//! graph. The backends plan memory and pick tiles for known sizes, so a
//! `Specializing` executable binds the symbols from each call's input
//! shapes and keeps the programs it compiled for the bindings it has seen:
//! a binding it has seen runs at once; a new one is bound
//! (`Graph::bind`), canonicalised (the exporters' shape arithmetic and
//! masks fold to constants) and handed to the backend, which is the
//! lowering and code generation, not the whole pipeline.

use crate::{backend_executable, CompileOptions};
use egret_ir::{Bindings, Graph, Tensor};
use egret_runtime::{Executable, RunError};
use std::sync::{Arc, Mutex};

/// How many bindings a program keeps compiled by default
/// (`CompileOptions::max_specializations`): a decoder's past length takes a
/// new value every token, and each compiled binding holds its arena, code
/// and packed weights.
pub const MAX_SPECIALIZATIONS: usize = 16;

pub struct Specializing {
    graph: Graph,
    opts: CompileOptions,
    /// Most recently used last.
    compiled: Mutex<Vec<(Bindings, Arc<dyn Executable>)>>,
    compiles: std::sync::atomic::AtomicUsize,
}

impl Specializing {
    pub fn new(graph: Graph, opts: CompileOptions) -> Specializing {
        Specializing { graph, opts, compiled: Mutex::new(Vec::new()), compiles: Default::default() }
    }

    fn bindings(&self, inputs: &[Tensor]) -> Result<Bindings, RunError> {
        let g = &self.graph;
        let given: Vec<(&str, &[egret_ir::Dim], &[usize])> = g
            .inputs()
            .iter()
            .zip(inputs)
            .map(|(&v, t)| (g.input_name(v), g.ty(v).shape.as_slice(), t.shape()))
            .collect();
        egret_ir::solve_bindings(&given).map_err(RunError::Shape)
    }

    /// The program for `values`, compiled now if it is new.
    fn executable_for(&self, values: &Bindings) -> Result<Arc<dyn Executable>, RunError> {
        {
            let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = compiled.iter().position(|(b, _)| b == values) {
                let entry = compiled.remove(i);
                let exe = entry.1.clone();
                compiled.push(entry);
                return Ok(exe);
            }
        }
        let shown = || values.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
        let failed = |e: crate::Error| RunError::Compile(format!("compiling for {}: {e}", shown()));
        let bound = self.graph.bind(&|s| values.get(s).copied()).map_err(|e| failed(e.into()))?;
        let (bound, _) = egret_passes::canonicalize(&bound).map_err(|e| failed(e.into()))?;
        let exe: Arc<dyn Executable> = Arc::from(backend_executable(&bound, &self.opts).map_err(failed)?);
        self.compiles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if compiled.len() >= self.opts.max_specializations.max(1) {
            compiled.remove(0);
        }
        compiled.push((values.clone(), exe.clone()));
        Ok(exe)
    }
}

impl Executable for Specializing {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let values = self.bindings(&inputs)?;
        self.executable_for(&values)?.run(inputs)
    }

    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, String, f64)>, RunError> {
        let values = self.bindings(&inputs)?;
        self.executable_for(&values)?.profile(inputs)
    }

    fn specializations(&self) -> Option<usize> {
        Some(self.compiles.load(std::sync::atomic::Ordering::Relaxed))
    }
}
