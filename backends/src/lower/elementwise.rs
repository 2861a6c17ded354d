//! Elementwise ops as map expressions: which ops and dtypes the map
//! kernels take, and the cheaper forms of powers and divisions.

use super::*;

/// Dtypes map kernels compute with.
pub(super) fn mappable(d: DType) -> bool {
    matches!(d, DType::F32 | DType::Bool)
}

/// `x^p` for a constant exponent with an exact cheaper form: exporters
/// write `Pow(x, 2)` in layer norms and `Pow(x, 3)` in tanh-GELU, and a
/// libm call would keep the whole fused kernel scalar.
pub(super) fn pow_by_constant(p: f32) -> Option<Expr> {
    use Expr::Input as I;
    let mul = |a, b| Expr::binary(Binary::Mul, a, b);
    Some(match p {
        1.0 => I(0),
        2.0 => mul(I(0), I(0)),
        3.0 => mul(mul(I(0), I(0)), I(0)),
        4.0 => {
            let sq = mul(I(0), I(0));
            mul(sq.clone(), sq)
        }
        0.5 => Expr::unary(Unary::Sqrt, I(0)),
        -1.0 => Expr::unary(Unary::Recip, I(0)),
        _ => return None,
    })
}

/// The expression of an elementwise op over inputs `in0, in1, ...`, if map
/// kernels support it.
pub(super) fn elementwise_expr(op: &Op, in_types: &[&Type], out: &Type) -> Option<Expr> {
    use Expr::Input as I;
    let all_f32 = in_types.iter().all(|t| t.dtype == DType::F32);
    let all_bool = in_types.iter().all(|t| t.dtype == DType::Bool);
    let b = |x| Box::new(x);
    let un = |f| all_f32.then(|| Expr::unary(f, I(0)));
    let bin = |f| all_f32.then(|| Expr::binary(f, I(0), I(1)));
    let cmp = |c| all_f32.then(|| Expr::Compare(c, b(I(0)), b(I(1))));
    let logic = |l| all_bool.then(|| Expr::Logic(l, b(I(0)), b(I(1))));
    match op {
        Op::Neg => un(Unary::Neg),
        Op::Abs => un(Unary::Abs),
        Op::Sqrt => un(Unary::Sqrt),
        Op::Reciprocal => un(Unary::Recip),
        Op::Relu => un(Unary::Relu),
        Op::Floor => un(Unary::Floor),
        Op::Ceil => un(Unary::Ceil),
        Op::Round => un(Unary::Round),
        Op::Exp => un(Unary::Exp),
        Op::Log => un(Unary::Log),
        Op::Tanh => un(Unary::Tanh),
        Op::Erf => un(Unary::Erf),
        Op::Sigmoid => un(Unary::Sigmoid),
        Op::Sin => un(Unary::Sin),
        Op::Cos => un(Unary::Cos),
        Op::Add => bin(Binary::Add),
        Op::Sub => bin(Binary::Sub),
        Op::Mul => bin(Binary::Mul),
        Op::Div => bin(Binary::Div),
        Op::Max => bin(Binary::Max),
        Op::Min => bin(Binary::Min),
        Op::Pow => bin(Binary::Pow),
        Op::Equal => cmp(Compare::Eq),
        Op::Less => cmp(Compare::Lt),
        Op::LessOrEqual => cmp(Compare::Le),
        Op::Greater => cmp(Compare::Gt),
        Op::GreaterOrEqual => cmp(Compare::Ge),
        Op::And => logic(Logic::And),
        Op::Or => logic(Logic::Or),
        Op::Xor => logic(Logic::Xor),
        Op::Gelu { approximate_tanh: false } => un(Unary::Gelu),
        Op::Gelu { approximate_tanh: true } => un(Unary::GeluTanh),
        Op::Silu => un(Unary::Silu),
        Op::Not if all_bool => Some(Expr::Not(b(I(0)))),
        Op::IsNaN if all_f32 => Some(Expr::IsNaN(b(I(0)))),
        Op::Where if in_types[0].dtype == DType::Bool && in_types[1].dtype == DType::F32 => {
            Some(Expr::Select(b(I(0)), b(I(1)), b(I(2))))
        }
        Op::Cast { to } => match (in_types[0].dtype, to) {
            (DType::Bool, DType::F32) => Some(Expr::BoolToF32(b(I(0)))),
            (DType::F32, DType::Bool) => Some(Expr::F32ToBool(b(I(0)))),
            (DType::I64 | DType::I32, DType::F32) => Some(Expr::IntToF32(b(I(0)))),
            (DType::I64 | DType::I32, DType::Bool) => Some(Expr::IntToBool(b(I(0)))),
            (a, b2) if a == *b2 && mappable(a) => Some(I(0)),
            _ => None,
        },
        _ => None,
    }
    .filter(|_| mappable(out.dtype))
}

/// `x / c` for a constant `c` becomes `x * (1 / c)`: a multiply instead of
/// a divide, at most one ulp away (exactly equal when `c` is a power of two).
pub(super) fn divide_by_constant_as_multiply(e: Expr) -> Expr {
    match e {
        Expr::Binary(Binary::Div, x, c) => match *c {
            Expr::F32(v) if (1.0 / v).is_normal() => Expr::binary(Binary::Mul, *x, Expr::F32(1.0 / v)),
            c => Expr::Binary(Binary::Div, x, Box::new(c)),
        },
        other => other,
    }
}
