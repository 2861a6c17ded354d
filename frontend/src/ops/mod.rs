//! Builders, one module per op family.

pub mod array;
pub mod math;
pub mod nn;
