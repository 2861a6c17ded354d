//! What the GPU executors (`gpu`, `ptx`) share about a `GpuPlan`'s steps:
//! evaluating a host step, and reading the error word.

use crate::RunError;
use egret_backends::gpu::{GpuPlan, Step};
use egret_ir::{Op, Tensor};

/// A host step: `op` on its inputs with the IR's reference semantics, an
/// error naming the node.
pub(crate) fn eval_host(op: &Op, label: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    egret_ir::eval_op(op, &refs).map_err(|message| RunError::Eval {
        node: label.to_string(),
        op: op.name().to_string(),
        message,
    })
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
