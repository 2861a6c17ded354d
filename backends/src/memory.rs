//! The memory plan: arena offsets by liveness.

use crate::plan::{BufferId, Plan, Storage};
use egret_ir::Bindings;

/// Arena offsets are aligned for vector loads.
pub const ARENA_ALIGN: usize = 64;

/// Assigns arena offsets by liveness: a buffer is live from the kernel that
/// first writes it to the last kernel that reads it (graph outputs to the
/// end). First fit over the gaps between live buffers, every offset aligned.
///
/// A plan with symbols is laid out for `plan.capacity`: each buffer gets
/// the bytes it has there, so every call whose values are at most those
/// fits (sizes grow with the symbols); a call past them lays the arena out
/// again, larger (`bytes_at`), without compiling anything.
pub fn plan_memory(plan: &mut Plan) {
    let capacity = plan.capacity.clone();
    let (offsets, top) = assign_offsets(plan, |b| bytes_at(plan, b, &capacity), ARENA_ALIGN);
    for (b, offset) in offsets.into_iter().enumerate() {
        if let Some(offset) = offset {
            plan.buffers[b].storage = Storage::Arena { offset };
        }
    }
    plan.arena_bytes = top;
}

/// Buffer `b`'s bytes when the plan's symbols have `values` (every buffer
/// of a bound plan has its one size). A polynomial in sizes grows with
/// them, so the bytes at a capacity bound those of any call below it.
pub fn bytes_at(plan: &Plan, b: BufferId, values: &Bindings) -> usize {
    let bytes = plan.buffers[b].bytes;
    match bytes.size() {
        Some(n) => n,
        None => bytes.at(values).ok().and_then(|v| usize::try_from(v).ok()).unwrap_or(0),
    }
}

/// The arena laid out for `values` of the plan's symbols: each arena
/// buffer's offset (by buffer id) and the arena's size. The runtime calls
/// this when a call's values pass the capacity the plan was laid out for.
pub fn layout_at(plan: &Plan, values: &Bindings) -> (Vec<Option<usize>>, usize) {
    assign_offsets(plan, |b| bytes_at(plan, b, values), ARENA_ALIGN)
}

/// The liveness layout of `plan_memory` in units of the caller's choosing
/// (bytes on the CPU, words on a GPU): per buffer its offset (arena
/// buffers only), and the arena's size.
pub fn assign_offsets(plan: &Plan, size_of: impl Fn(BufferId) -> usize, align: usize) -> (Vec<Option<usize>>, usize) {
    let n = plan.kernels.len();
    let (first, last) = live_steps(plan);
    let mut offsets = vec![None; plan.buffers.len()];
    // Live intervals in the arena: (offset, size, last step).
    let mut live: Vec<(usize, usize, usize)> = Vec::new();
    let mut top = 0usize;
    for step in 0..n {
        live.retain(|&(_, _, l)| l >= step);
        let defs: Vec<BufferId> = (0..plan.buffers.len())
            .filter(|&b| first[b] == step && matches!(plan.buffers[b].storage, Storage::Arena { .. }))
            .collect();
        for b in defs {
            let size = size_of(b).div_ceil(align).max(1) * align;
            live.sort();
            // The lowest gap between live intervals that fits.
            let mut at = 0usize;
            for &(o, s, _) in &live {
                if o >= at + size {
                    break;
                }
                at = at.max(o + s);
            }
            live.push((at, size, last[b]));
            top = top.max(at + size);
            offsets[b] = Some(at);
        }
    }
    (offsets, top)
}

/// Each buffer's first and last step: from the kernel that first writes it
/// to the last that reads it (graph outputs to the end, `kernels.len()`).
/// A buffer no kernel writes has `usize::MAX` as its first step.
fn live_steps(plan: &Plan) -> (Vec<usize>, Vec<usize>) {
    let mut first = vec![usize::MAX; plan.buffers.len()];
    let mut last = vec![0usize; plan.buffers.len()];
    for (step, k) in plan.kernels.iter().enumerate() {
        let (reads, writes) = k.buffers();
        for b in writes {
            first[b] = first[b].min(step);
            last[b] = last[b].max(step);
        }
        for b in reads {
            last[b] = last[b].max(step);
        }
    }
    for (b, _) in &plan.outputs {
        last[*b] = plan.kernels.len();
    }
    (first, last)
}

/// The arena layout of a plan with symbols as a rule for any values, for
/// code that lays it out at run time without the planner (the C
/// artifact): the arena buffers in order, each with the buffers it must
/// sit above, those live at the same time as it that come before it.
/// A buffer's offset is the highest end (aligned to `ARENA_ALIGN`) of those,
/// or 0, and the arena ends at the highest end of all.
///
/// The order is that of the offsets `plan_memory` gave at the capacity,
/// so at the capacity every buffer is at most where the planner put it,
/// and at any values no two live buffers overlap: of two that are live at
/// once, the later one sits above the earlier.
pub fn layout_rule(plan: &Plan) -> Vec<(BufferId, Vec<BufferId>)> {
    let (first, last) = live_steps(plan);
    let mut order: Vec<(usize, BufferId)> = (0..plan.buffers.len())
        .filter_map(|b| match plan.buffers[b].storage {
            Storage::Arena { offset } => Some((offset, b)),
            _ => None,
        })
        .collect();
    order.sort();
    let live_together = |a: BufferId, b: BufferId| first[a] <= last[b] && first[b] <= last[a];
    order
        .iter()
        .enumerate()
        .map(|(i, &(_, b))| (b, order[..i].iter().map(|&(_, a)| a).filter(|&a| live_together(a, b)).collect()))
        .collect()
}
