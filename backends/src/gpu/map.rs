//! Map kernels: one invocation per element of the iteration space.

use super::builder::Builder;
use super::form::{Kernel, Space, Ty, E};
use super::Place;
use crate::plan::{BufferId, MapKernel, Operand};
use egret_ir::DType;

pub const THREADS: u32 = 256;

/// Reads operand `o` at element `index` as the type the expression
/// language gives it: f32, bool, or (integers) i32.
pub fn read_operand(o: &Operand, space: Space, index: E) -> E {
    let word = E::load(space, index);
    match o.dtype {
        DType::F32 => word.bits(Ty::F32),
        DType::Bool => word.ne(E::U32(0)),
        _ => word.bits(Ty::I32),
    }
}

/// The flat strided loop: the element's index is split into one index
/// per dim (sizes are parameters), and each operand's address is its
/// offset plus those indices times its strides (parameters too).
pub fn map(k: &MapKernel, at: &dyn Fn(BufferId) -> Place) -> (Kernel, Vec<u32>, u64) {
    let mut b = Builder::new(THREADS);
    let operands: Vec<(i64, Vec<isize>)> = k
        .inputs
        .iter()
        .chain(std::iter::once(&k.output))
        .map(|o| (at(o.buffer).word as i64 + o.known_offset() as i64, o.known_strides()))
        .collect();
    let groups = elementwise(&mut b, &k.sizes(), &operands, |b, address| {
        let inputs: Vec<E> =
            k.inputs.iter().zip(address).map(|(o, a)| b.let_(read_operand(o, at(o.buffer).space, a.clone()))).collect();
        let value = b.expr(&k.expr, &|i| inputs[i].clone());
        b.store(at(k.output.buffer).space, address[k.inputs.len()].clone(), value);
    });
    let rank = k.shape.len();
    let (kernel, params) = b.finish(format!("map_{rank}d"));
    (kernel, params, groups)
}

/// One invocation per element of `shape`: splits the element's flat index
/// into one index per dim and hands `body` each operand's address (its
/// base word plus the indices times its strides; all parameters). Returns
/// the workgroups to dispatch.
pub fn elementwise(
    b: &mut Builder,
    shape: &[usize],
    operands: &[(i64, Vec<isize>)],
    body: impl FnOnce(&mut Builder, &[E]),
) -> u64 {
    let total: usize = shape.iter().product();
    let n = b.param(total as i64);
    // The outermost size is implied by the total.
    let sizes: Vec<E> = shape.iter().skip(1).map(|&s| b.param(s as i64)).collect();
    let layout: Vec<(E, Vec<E>)> = operands
        .iter()
        .map(|(base, strides)| (b.param(*base), strides.iter().map(|&s| b.param(s as i64)).collect()))
        .collect();
    let gid = b.global_index();
    b.if_(gid.clone().lt(n), |b| {
        // Innermost dim first.
        let mut rest = gid;
        let mut index = vec![E::I32(0); shape.len()];
        for d in (1..shape.len()).rev() {
            index[d] = b.let_(rest.clone() % sizes[d - 1].clone());
            rest = b.let_(rest / sizes[d - 1].clone());
        }
        // The outermost index is what is left: below its size, since the
        // element is below the total.
        if let Some(first) = index.first_mut() {
            *first = rest;
        }
        let address: Vec<E> = layout
            .iter()
            .map(|(base, strides)| {
                let mut a = base.clone();
                for (i, s) in index.iter().zip(strides) {
                    a = a + i.clone() * s.clone();
                }
                b.let_(a)
            })
            .collect();
        body(b, &address);
    });
    (total as u64).div_ceil(b.threads() as u64)
}
