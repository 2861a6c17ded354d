//! Algebra: identities that bring the many ways exporters write one
//! computation to a common form, so that one fusion rule matches them all.
//! Each rule states the identity it relies on; elementwise ops broadcast,
//! and every identity here holds under broadcasting.

use super::{is_float_scalar, Rule};
use egg::rewrite as rw;

pub fn rules() -> Vec<Rule> {
    vec![
        // a * b = b * a
        rw!("mul-commute"; "(mul ?a ?b)" => "(mul ?b ?a)"),
        // a + b = b + a
        rw!("add-commute"; "(add ?a ?b)" => "(add ?b ?a)"),
        // a / c = a * (1 / c) for a float constant c (1 / c folds to a
        // constant; the two differ by at most one rounding). Integer
        // division has no such identity.
        rw!("div-by-constant"; "(div ?a ?c)" => "(mul ?a (reciprocal ?c))" if is_float_scalar("?c")),
        // (a * c) * b = (a * b) * c for a float scalar constant c: constants
        // move outward, so `0.5 * x * y` and `x * y * 0.5` meet.
        rw!("scalar-outward"; "(mul (mul ?a ?c) ?b)" => "(mul (mul ?a ?b) ?c)" if is_float_scalar("?c")),
    ]
}
