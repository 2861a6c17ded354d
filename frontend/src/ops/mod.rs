//! Builders, one module per op family.

pub mod array;
pub mod contrib;
pub mod math;
pub mod nn;
pub mod quant;
