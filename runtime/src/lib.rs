//! Egret's runtime: runs compiled graphs.
//!
//! A `Program` pairs a model's signature (input and output names and types,
//! plus any input values the graph was specialised on) with an `Executable`
//! from some backend. The signature checks every call's inputs once, for all
//! backends, so an executable may assume its inputs have the compiled types.
//!
//! The GPU devices are features: `gpu` (wgsl through wgpu) and `cuda` (the
//! CUDA driver for ptx); a build without one has a stand-in whose
//! constructor says how to build with it (`absent`). The PTX executable is
//! always here, for any `PtxDevice` (the tests' interpreter among them).
//!
//! `CpuExecutable` runs a plan compiled by the Cranelift backend. The
//! `reference` backend lives here too: it walks the graph in topological
//! order with the IR's reference semantics. It is the oracle other backends
//! are tested against.

mod absent;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod ptx;
mod reference;
mod steps;

#[cfg(not(feature = "cuda"))]
pub use absent::CudaDevice;
#[cfg(not(feature = "gpu"))]
pub use absent::{WgpuDevice, WgpuExecutable};
pub use cpu::CpuExecutable;
#[cfg(feature = "cuda")]
pub use cuda::{CudaDevice, NO_DRIVER_HINT};
#[cfg(feature = "gpu")]
pub use gpu::{WgpuDevice, WgpuExecutable};
pub use ptx::{LaunchOf, PtxDevice, PtxExecutable};
pub use reference::ReferenceExecutable;

use egret_ir::{Tensor, TensorRef, Type};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("missing input `{0}`")]
    MissingInput(String),
    #[error("the model has no input `{name}` (its inputs: {known})")]
    UnknownInput { name: String, known: String },
    #[error("input `{name}` should be {expected} but is {got}")]
    WrongType { name: String, expected: Type, got: Type },
    #[error(
        "input `{name}` was fixed when the model was compiled (it sets a shape); this call passes a different value"
    )]
    SpecializedMismatch { name: String },
    /// The inputs' shapes do not agree on the model's symbolic dims.
    #[error("{0}")]
    Shape(String),
    /// A program for a new binding of the symbolic dims failed to compile.
    #[error("{0}")]
    Compile(String),
    #[error("node `{node}` ({op}): {message}")]
    Eval { node: String, op: String, message: String },
}

/// A compiled graph a backend can run on inputs of the compiled types,
/// given positionally in the signature's input order.
pub trait Executable: Send + Sync {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError>;

    /// Runs on inputs borrowed where they lie (a caller's arrays, the last
    /// run's outputs). Backends that read their inputs in place (the JIT)
    /// copy nothing; the default copies them for `run`.
    fn run_refs(&self, inputs: &[TensorRef<'_>]) -> Result<Vec<Tensor>, RunError> {
        self.run(inputs.iter().map(TensorRef::to_tensor).collect())
    }

    /// Bytes of working memory one run uses, where the backend plans it.
    fn arena_bytes(&self) -> Option<usize> {
        None
    }

    /// The device the executable runs on, for GPU backends (reports name it).
    fn device_name(&self) -> Option<String> {
        None
    }

    /// Device time of the last run in milliseconds, where the backend
    /// measures it (GPU timestamp queries).
    fn device_ms(&self) -> Option<f64> {
        None
    }

    /// How many programs an executable for symbolic dims compiled, one per
    /// binding of them it was run with; `None` for one compiled program.
    fn specializations(&self) -> Option<usize> {
        None
    }

    /// Runs once, timing each step: (kind, label, milliseconds) per kernel.
    /// Backends without per-kernel steps report one entry for the whole run.
    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<(String, String, f64)>, RunError> {
        let t = std::time::Instant::now();
        self.run(inputs)?;
        Ok(vec![("run".into(), "the whole graph".into(), t.elapsed().as_secs_f64() * 1e3)])
    }
}

#[derive(Clone, Debug)]
pub struct Signature {
    pub inputs: Vec<(String, Type)>,
    pub outputs: Vec<(String, Type)>,
    /// Inputs the graph was specialised on: each call must pass this value.
    pub specialized: Vec<(String, Tensor)>,
    /// Declared bounds of symbolic dims (`--dim name=LO..HI`): a call whose
    /// shapes give one a value outside them is refused.
    pub bounds: DimBounds,
}

/// Bounds of symbolic dims, by name: `(lowest, highest)`, both allowed.
pub type DimBounds = std::collections::BTreeMap<String, (usize, usize)>;

impl Signature {
    pub fn of(graph: &egret_ir::Graph, specialized: Vec<(String, Tensor)>) -> Signature {
        Signature {
            inputs: graph.inputs().iter().map(|&v| (graph.input_name(v).to_string(), graph.ty(v).clone())).collect(),
            outputs: graph.outputs().iter().map(|(n, v)| (n.clone(), graph.ty(*v).clone())).collect(),
            specialized,
            bounds: DimBounds::new(),
        }
    }

    /// The signature with these bounds on its symbolic dims.
    pub fn with_bounds(self, bounds: DimBounds) -> Signature {
        Signature { bounds, ..self }
    }

    /// Whether `bind` would accept these inputs (their types, the values of
    /// any symbolic dims, the values the graph was specialised on) without
    /// moving them: the test a cache of programs picks one by.
    pub fn accepts(&self, named: &[(String, Tensor)]) -> bool {
        let refs: Vec<(&str, TensorRef)> = named.iter().map(|(n, t)| (n.as_str(), t.view())).collect();
        self.order(&refs).is_ok()
    }

    /// Whether any input's shape is symbolic.
    pub fn is_symbolic(&self) -> bool {
        self.inputs.iter().any(|(_, t)| !t.is_known())
    }

    /// For each input slot, the position in `named` of the tensor for it,
    /// after checking names, types and specialised values.
    fn order(&self, named: &[(&str, TensorRef)]) -> Result<Vec<usize>, RunError> {
        let mut slots: Vec<Option<usize>> = vec![None; self.inputs.len()];
        for (at, &(name, t)) in named.iter().enumerate() {
            if let Some((_, want)) = self.specialized.iter().find(|(n, _)| n == name) {
                if !t.same_as(want) {
                    return Err(RunError::SpecializedMismatch { name: name.to_string() });
                }
                if !self.inputs.iter().any(|(n, _)| n == name) {
                    continue;
                }
            }
            let Some(i) = self.inputs.iter().position(|(n, _)| n == name) else {
                let known = self.inputs.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ");
                return Err(RunError::UnknownInput { name: name.to_string(), known });
            };
            let expected = &self.inputs[i].1;
            // A symbolic shape takes any sizes its symbols can have, checked
            // across the inputs below; a known one exactly its own.
            let fits = if expected.is_known() {
                t.ty() == *expected
            } else {
                t.dtype() == expected.dtype && t.shape().len() == expected.rank()
            };
            if !fits {
                return Err(RunError::WrongType { name: name.to_string(), expected: expected.clone(), got: t.ty() });
            }
            slots[i] = Some(at);
        }
        let order: Vec<usize> = slots
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| RunError::MissingInput(self.inputs[i].0.clone())))
            .collect::<Result<_, _>>()?;
        if self.is_symbolic() {
            let shapes: Vec<&[usize]> = order.iter().map(|&at| named[at].1.shape()).collect();
            let values = solve_dims(&self.inputs, &shapes)?;
            for (name, &(lo, hi)) in &self.bounds {
                if let Some(&v) = values.get(name).filter(|&&v| v < lo || v > hi) {
                    return Err(RunError::Shape(format!(
                        "dim `{name}` is {v} in this call, outside its declared bounds {lo}..{hi}"
                    )));
                }
            }
        }
        Ok(order)
    }

    /// Orders named inputs positionally and checks them (see `accepts`).
    pub fn bind(&self, named: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, RunError> {
        let refs: Vec<(&str, TensorRef)> = named.iter().map(|(n, t)| (n.as_str(), t.view())).collect();
        let order = self.order(&refs)?;
        drop(refs);
        let mut named: Vec<Option<Tensor>> = named.into_iter().map(|(_, t)| Some(t)).collect();
        Ok(order.into_iter().map(|at| named[at].take().expect("each input fills one slot")).collect())
    }

    /// `bind` for borrowed inputs.
    pub fn bind_refs<'a>(&self, named: &[(&str, TensorRef<'a>)]) -> Result<Vec<TensorRef<'a>>, RunError> {
        Ok(self.order(named)?.into_iter().map(|at| named[at].1).collect())
    }
}

/// The values of the symbolic dims of inputs declared as `declared` (name
/// and type, in order) for tensors of these shapes, in the same order.
pub fn solve_dims(declared: &[(String, Type)], shapes: &[&[usize]]) -> Result<egret_ir::Bindings, RunError> {
    let given: Vec<(&str, &[egret_ir::Dim], &[usize])> =
        declared.iter().zip(shapes).map(|((n, ty), &s)| (n.as_str(), ty.shape.as_slice(), s)).collect();
    egret_ir::solve_bindings(&given).map_err(RunError::Shape)
}

/// A runnable model: a signature and the backend's executable.
pub struct Program {
    pub signature: Signature,
    pub executable: Box<dyn Executable>,
}

impl Program {
    /// Like `run`, timing each kernel.
    pub fn profile(&self, named: Vec<(String, Tensor)>) -> Result<Vec<(String, String, f64)>, RunError> {
        let inputs = self.signature.bind(named)?;
        self.executable.profile(inputs)
    }

    /// Runs on named inputs; returns the outputs with their names.
    pub fn run(&self, named: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, RunError> {
        let inputs = self.signature.bind(named)?;
        let outs = self.executable.run(inputs)?;
        Ok(self.signature.outputs.iter().map(|(n, _)| n.clone()).zip(outs).collect())
    }

    /// `run` on inputs borrowed where they lie: nothing is copied in where
    /// the backend reads inputs in place (the CPU JIT).
    pub fn run_refs(&self, named: &[(&str, TensorRef<'_>)]) -> Result<Vec<(String, Tensor)>, RunError> {
        let inputs = self.signature.bind_refs(named)?;
        let outs = self.executable.run_refs(&inputs)?;
        Ok(self.signature.outputs.iter().map(|(n, _)| n.clone()).zip(outs).collect())
    }
}
