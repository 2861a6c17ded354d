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
        // (a * c) @ b = (a @ b) * c for a scalar c: scales applied to q or k
        // before the scores matmul move after it.
        rw!("matmul-scalar-left"; "(matmul (mul ?a ?c) ?b)" => "(mul (matmul ?a ?b) ?c)" if is_float_scalar("?c")),
        // a @ (b * c) = (a @ b) * c for a scalar c.
        rw!("matmul-scalar-right"; "(matmul ?a (mul ?b ?c))" => "(mul (matmul ?a ?b) ?c)" if is_float_scalar("?c")),
        // transpose(a * c) = transpose(a) * c for a scalar c.
        rw!("transpose-scalar"; "(transpose ?p (mul ?a ?c))" => "(mul (transpose ?p ?a) ?c)" if is_float_scalar("?c")),
        // reshape(a * c) = reshape(a) * c for a scalar c.
        rw!("reshape-scalar"; "(reshape ?s (mul ?a ?c))" => "(mul (reshape ?s ?a) ?c)" if is_float_scalar("?c")),
        // 1 / y = reciprocal(y): `Div(1, Sqrt(v))` and `Reciprocal(Sqrt(v))` meet.
        rw!("one-over"; "(div ?one ?y)" => "(reciprocal ?y)" if super::is_scalar("?one", 1.0, 0.0)),
        // (x * c1) * c2 = x * (c1 * c2) for scalars: the product folds to one constant.
        rw!("scalars-combine"; "(mul (mul ?x ?c1) ?c2)" => "(mul ?x (mul ?c1 ?c2))" if is_float_scalar("?c1") if is_float_scalar("?c2")),
    ]
}
