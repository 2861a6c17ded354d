//! Gather: one invocation per output element, every index checked. An
//! index out of range stores the kernel's number in the error word and
//! reads nothing; the runtime turns that into an error naming the node.

use super::builder::Builder;
use super::form::{Kernel, Ty, E};
use super::Place;
use crate::plan::known_size;
use crate::plan::{BufferId, GatherKernel};

pub const THREADS: u32 = 256;

/// `code` is what a bad index stores in the error word (the step's number
/// plus one, so that zero means no error).
pub fn gather(k: &GatherKernel, at: &dyn Fn(BufferId) -> Place, code: u32) -> (Kernel, Vec<u32>, u64) {
    let mut b = Builder::new(THREADS);
    // GPU plans are bound (`gpu::compile` checks).
    let (outer, n_indices) = (known_size(k.outer), known_size(k.n_indices));
    let total = outer * n_indices * k.inner;
    let (pd, pi, po) = (at(k.data), at(k.indices), at(k.out));
    let n = b.param(total as i64);
    let inner = b.param(k.inner as i64);
    let count = b.param(n_indices as i64);
    // GPU plans are bound: the axis length is known.
    let axis = b.param(crate::plan::known_size(k.axis_len) as i64);
    let (data, indices, out) = (b.param(pd.word as i64), b.param(pi.word as i64), b.param(po.word as i64));
    let code = b.param(code as i64);
    let gid = b.global_index();
    b.if_(gid.clone().lt(n), |b| {
        let i = b.let_(gid.clone() % inner.clone());
        let rest = b.let_(gid.clone() / inner.clone());
        let j = b.let_(rest.clone() % count.clone());
        let o = b.let_(rest / count);
        // i64 indices are carried as i32 words, as every integer is.
        let raw = b.let_(E::load(pi.space, indices + j).bits(Ty::I32));
        let idx = b.let_(E::select(raw.clone().lt(E::I32(0)), raw.clone() + axis.clone(), raw));
        let ok = idx.clone().ge(E::I32(0)).and(idx.clone().lt(axis.clone()));
        b.if_else(
            ok,
            |b| {
                let v = E::load(pd.space, data + (o * axis + idx) * inner + i);
                b.store(po.space, out.clone() + gid.clone(), v);
            },
            |b| {
                b.fail(code.clone());
                b.store(po.space, out.clone() + gid.clone(), E::U32(0));
            },
        );
    });
    let (kernel, params) = b.finish("gather");
    (kernel, params, (total as u64).div_ceil(THREADS as u64))
}
