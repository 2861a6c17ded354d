//! Egret's intermediate representation.
//!
//! A graph of ops over typed values (`Graph`), the op set with shape/dtype
//! inference and reference semantics (`op`, `ops`), dense host tensors
//! (`Tensor`), a text format that round-trips (`text`) and a verifier.
//!
//! **This crate depends on no other workspace crate.** Everything above it
//! (frontend, passes, backends, runtime) speaks in these types.

mod buf;
mod dim;
mod dot;
mod dtype;
mod error;
mod graph;
pub mod narrow;
pub mod op;
pub mod ops;
mod tensor;
pub mod text;
mod verify;

pub use buf::{map_range, Buf, Mapping};
pub use dim::{
    bound_ints, bound_sizes, dims_of, dims_of_ints, known_shape, needs_bound_dims, product, shape_symbols, shape_text,
    solve_bindings, Bindings, Dim, DimOverflow, DimValues, BIND_DIMS_HINT, NOMINAL_SYMBOL_VALUE,
};
pub use dot::to_dot;
pub use dtype::{DType, Type, MAX_ELEMENTS};
pub use error::IrError;
pub use graph::{Graph, Node, NodeId, ValueData, ValueId};
pub use half;
pub use op::{NarrowType, Op, RoundMode};
pub use tensor::{strides_of, BlockCodes, Data, Elem, Tensor, TensorRef};
pub use verify::verify;

/// Evaluates one op with the reference semantics. Errors name the op.
pub fn eval_op(op: &Op, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
    ops::eval(op, inputs)
}
