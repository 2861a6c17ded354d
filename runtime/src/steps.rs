//! What the GPU executors (`gpu`, `ptx`) share about a `GpuPlan`'s steps:
//! evaluating a host step, reading the error word, and, for a program
//! whose plan keeps symbols, each run's values and the arena's capacity.

use crate::RunError;
use egret_backends::gpu::{ArenaLayout, GpuPlan, Step, SymbolicGpuPlan};
use egret_ir::{Bindings, DType, DimValues, Op, Tensor, Type};

/// A GPU program for every value of its plan's symbols: what both GPU
/// executors keep to build each new set of values' program.
pub(crate) struct Sizing {
    pub program: SymbolicGpuPlan,
    /// The inputs' declared types, by position.
    declared: Vec<(String, Type)>,
}

impl Sizing {
    pub fn new(program: SymbolicGpuPlan) -> Sizing {
        let declared =
            program.plan().inputs.iter().enumerate().map(|(i, (_, t))| (format!("input {i}"), t.clone())).collect();
        Sizing { program, declared }
    }

    /// A run's values of the symbols, from its inputs' shapes.
    pub fn values(&self, inputs: &[Tensor]) -> Result<Bindings, RunError> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
        crate::solve_dims(&self.declared, &shapes)
    }

    /// Refuses new `values` that would take a kernel outside one of its
    /// buffers (the inputs' sizes follow from the values, so a run that
    /// repeats them needs no check again).
    pub fn check(&self, values: &Bindings, inputs: &[Tensor]) -> Result<(), RunError> {
        let dims = DimValues::new(values);
        let input_bytes: Vec<usize> = inputs.iter().map(|t| t.numel() * t.dtype().size_bytes()).collect();
        let plan = self.program.plan();
        plan.check_sizes(&dims).map_err(RunError::Shape)?;
        for k in &plan.kernels {
            check_spans(plan, k, values, &dims, &input_bytes)?;
        }
        Ok(())
    }

    /// The arena layout a run with `values` uses: `current` if they fit
    /// it, else one for the declared bounds or the values, at least twice
    /// the old capacity of a symbol that passed it (so a growing decoder
    /// lays its arena out a few times, not at every token).
    pub fn layout_for(
        &self,
        current: Option<&ArenaLayout>,
        values: &Bindings,
    ) -> Result<Option<ArenaLayout>, RunError> {
        if current.is_some_and(|l| l.holds(values)) {
            return Ok(None);
        }
        let old = current.map_or_else(|| self.program.bounded_capacity(), |l| l.capacity.clone());
        let grown = |double: bool| {
            let mut capacity = old.clone();
            for (k, &v) in values {
                let c = capacity.entry(k.clone()).or_insert(0);
                if v > *c {
                    *c = if double { v.max(2 * *c) } else { v };
                }
            }
            capacity
        };
        // Doubled, unless that passes what one binding holds and the values
        // themselves do not.
        self.program
            .layout(&grown(true))
            .or_else(|_| self.program.layout(&grown(false)))
            .map(Some)
            .map_err(|e| RunError::Shape(e.to_string()))
    }

    /// The program at `values` in `layout`.
    pub fn at(&self, values: &Bindings, layout: &ArenaLayout) -> Result<GpuPlan, RunError> {
        self.program.at(values, layout).map_err(|e| RunError::Shape(e.to_string()))
    }
}

/// A host step of a GPU program: `op` on its inputs with the IR's
/// reference semantics, an error naming the node. GPU programs carry
/// integers as i32, so a float cast to an integer saturates at i32's range
/// where the float is infinite or NaN (as the devices' own conversions do:
/// T5's position buckets cast `log(0)`, which the next ops discard), and a
/// finite float past that range is an error naming the node (it was
/// saturated too: a wrong answer, silently).
pub(crate) fn eval_host(op: &Op, label: &str, inputs: &[Tensor], types: &[&Type]) -> Result<Vec<Tensor>, RunError> {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let fail = |message: String| RunError::Eval { node: label.to_string(), op: op.name().to_string(), message };
    let outs = egret_ir::eval_op(op, &refs).map_err(fail)?;
    check_output_types(&outs, types).map_err(fail)?;
    let float_to_int =
        matches!(op, Op::Cast { .. }) && inputs.first().is_some_and(|t| matches!(t.dtype(), DType::F32 | DType::F64));
    if !float_to_int {
        return Ok(outs);
    }
    let floats = inputs[0].to_f64_vec();
    outs.into_iter()
        .map(|t| match t.dtype() {
            DType::I64 | DType::I32 => {
                let ints = t.to_i64_vec();
                let mut v = Vec::with_capacity(ints.len());
                for (x, f) in ints.into_iter().zip(&floats) {
                    let fits = (i32::MIN as i64..=i32::MAX as i64).contains(&x);
                    if !fits && f.is_finite() {
                        return Err(fail(format!(
                            "{f} cast to {} is {x}, outside the i32 range GPU kernels carry integers in",
                            t.dtype()
                        )));
                    }
                    v.push(x.clamp(i32::MIN as i64, i32::MAX as i64));
                }
                Ok(Tensor::new(t.shape().to_vec(), egret_ir::Data::from_i64s(t.dtype(), &v)))
            }
            _ => Ok(t),
        })
        .collect()
}

/// Refuses values the evaluator made of another type than the plan gave
/// their buffers: the evaluator clamps what ONNX clamps (a slice past a
/// shorter axis), where the plan's types took the model's shapes as
/// holding, and a value copied over its slot would overwrite its
/// neighbours or run past the arena.
pub(crate) fn check_output_types(outs: &[Tensor], types: &[&Type]) -> Result<(), String> {
    for (t, ty) in outs.iter().zip(types) {
        if t.shape() != ty.sizes().as_slice() || t.dtype() != ty.dtype {
            return Err(format!(
                "the value is {}{:?} where the model's shapes make it {ty}: they do not hold at these inputs' dims",
                t.dtype(),
                t.shape()
            ));
        }
    }
    Ok(())
}

/// The failure the error word reports, if any: `code` is the failing
/// step's index plus one (zero: no failure).
pub(crate) fn failure(plan: &GpuPlan, code: usize) -> Option<RunError> {
    match plan.steps.get(code.checked_sub(1)?)? {
        Step::Dispatch { label, kind, on_error, .. } => Some(RunError::Eval {
            node: label.clone(),
            op: kind.clone(),
            message: on_error.clone().unwrap_or_else(|| "kernel failed".into()),
        }),
        Step::Host { .. } => None,
    }
}

/// Refuses a call whose values would take a kernel outside one of its
/// buffers (`Plan::spans_at`), naming the node, the values and
/// the buffer. `input_bytes`: each graph input's bytes at this call.
pub(crate) fn check_spans(
    plan: &egret_backends::Plan,
    k: &egret_backends::plan::Kernel,
    values: &egret_ir::Bindings,
    dims: &egret_ir::DimValues,
    input_bytes: &[usize],
) -> Result<(), RunError> {
    use egret_backends::plan::Storage;
    let shown = || values.iter().map(|(s, v)| format!("{s}={v}")).collect::<Vec<_>>().join(", ");
    let spans = plan.spans_at(k, dims).map_err(RunError::Shape)?;
    for (b, first, end) in spans {
        let (what, size) = match &plan.buffers[b].storage {
            Storage::Input(i) => (format!("input {i}"), input_bytes[*i]),
            Storage::Constant(t) => {
                (format!("a constant of {} elements", t.numel()), t.numel() * t.dtype().size_bytes())
            }
            Storage::Arena { .. } => ("an intermediate value".to_string(), dims.size(plan.buffers[b].bytes)),
        };
        if first < 0 || end as u64 > size as u64 {
            return Err(RunError::Shape(format!(
                "node `{}` would read or write outside {what} at {}: the model does not allow these sizes",
                k.label,
                shown()
            )));
        }
    }
    Ok(())
}
