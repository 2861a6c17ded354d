//! The WGSL printer: renders a kernel of the GPU form as one compute
//! shader, and validates it with naga.
//!
//! Bindings are fixed per space, so the runtime binds by the same table:
//! the arena at 0, the parameters at 1, the error word at 2, weight chunk
//! `c` at `3 + c`. Only the spaces a kernel uses are declared.

use super::form::*;
use std::fmt::Write;

/// The binding a space is declared at.
pub fn binding(space: Space) -> u32 {
    match space {
        Space::Arena => 0,
        Space::Params => 1,
        Space::Error => 2,
        Space::Weights(c) => 3 + c,
        Space::WeightsSpan { first, .. } => 3 + first,
    }
}

fn space_name(space: Space) -> String {
    match space {
        Space::Arena => "arena".into(),
        Space::Params => "params".into(),
        Space::Error => "err_word".into(),
        Space::Weights(c) => format!("weights{c}"),
        Space::WeightsSpan { first, chunks, .. } => format!("weights{first}_{chunks}"),
    }
}

/// A function reading a word of a constant that spans chunks: the index
/// splits into a chunk and an offset in it.
fn span_reader(space: Space) -> Option<String> {
    let Space::WeightsSpan { first, chunks, chunk_words } = space else { return None };
    let mut f = format!(
        "fn {}(i: i32) -> u32 {{\n    let chunk = i / {chunk_words}i;\n    let at = i - chunk * {chunk_words}i;\n",
        space_name(space)
    );
    for c in 0..chunks - 1 {
        let _ = writeln!(f, "    if (chunk == {c}i) {{ return weights{}[at]; }}", first + c);
    }
    let _ = writeln!(f, "    return weights{}[at];\n}}", first + chunks - 1);
    Some(f)
}

pub fn print(k: &Kernel) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "// {}: {} invocations per workgroup", k.name, k.threads);
    for space in k.spaces() {
        let access = match space {
            Space::Arena | Space::Error => "read_write",
            Space::Params | Space::Weights(_) | Space::WeightsSpan { .. } => "read",
        };
        let _ = writeln!(
            out,
            "@group(0) @binding({}) var<storage, {access}> {}: array<u32>;",
            binding(space),
            space_name(space)
        );
    }
    if uses_nan_reduction(&k.body) {
        out.push_str(NAN_HELPERS);
    }
    for reader in k.used_spaces().into_iter().filter_map(span_reader) {
        out.push_str(&reader);
    }
    for (i, len) in k.shared.iter().enumerate() {
        let _ = writeln!(out, "var<workgroup> wg{i}: array<f32, {len}>;");
    }
    let _ = writeln!(
        out,
        "\n@compute @workgroup_size({})\nfn main(@builtin(local_invocation_index) lid: u32, \
         @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{",
        k.threads
    );
    for (i, len) in k.locals.iter().enumerate() {
        let _ = writeln!(out, "    var loc{i}: array<f32, {len}>;");
    }
    let p = Printer { k };
    p.block(&mut out, &k.body, 1);
    out.push_str("}\n");
    out
}

struct Printer<'k> {
    k: &'k Kernel,
}

impl Printer<'_> {
    fn block(&self, out: &mut String, body: &[S], depth: usize) {
        let pad = "    ".repeat(depth);
        for s in body {
            match s {
                S::Let(v, e) => {
                    let ty = self.k.vars[v.0 as usize];
                    let _ = writeln!(out, "{pad}var v{}: {ty} = {};", v.0, self.e(e));
                }
                S::Set(v, e) => {
                    let _ = writeln!(out, "{pad}v{} = {};", v.0, self.e(e));
                }
                S::Store(space, i, v) => {
                    let _ = writeln!(out, "{pad}{}[{}] = {};", space_name(*space), self.e(i), self.e(v));
                }
                S::StoreShared(a, i, v) => {
                    let _ = writeln!(out, "{pad}wg{}[{}] = {};", a.0, self.e(i), self.e(v));
                }
                S::StoreLocal(a, i, v) => {
                    let _ = writeln!(out, "{pad}loc{}[{}] = {};", a.0, self.e(i), self.e(v));
                }
                S::For { var, from, to, step, body } => {
                    let ty = self.k.vars[var.0 as usize];
                    let v = var.0;
                    let _ = writeln!(
                        out,
                        "{pad}for (var v{v}: {ty} = {}; v{v} < {}; v{v} = v{v} + {}) {{",
                        self.e(from),
                        self.e(to),
                        self.e(step)
                    );
                    self.block(out, body, depth + 1);
                    let _ = writeln!(out, "{pad}}}");
                }
                S::If(c, a, b) => {
                    let _ = writeln!(out, "{pad}if ({}) {{", self.e(c));
                    self.block(out, a, depth + 1);
                    if !b.is_empty() {
                        let _ = writeln!(out, "{pad}}} else {{");
                        self.block(out, b, depth + 1);
                    }
                    let _ = writeln!(out, "{pad}}}");
                }
                S::Barrier => {
                    let _ = writeln!(out, "{pad}workgroupBarrier();");
                }
                S::Mma { .. }
                | S::MmaBf16 { .. }
                | S::LoadMatrix { .. }
                | S::PackBf16 { .. }
                | S::CopyAsync { .. }
                | S::CopyWait => {
                    unreachable!("tensor-core kernels are built for PTX only")
                }
                S::Load4 { space, index, into } => {
                    // WGSL reads the words one by one; the driver merges them.
                    for (j, v) in into.iter().enumerate() {
                        let at = E::Load(*space, Box::new(index.clone() + E::I32(j as i32)));
                        let _ = writeln!(out, "{pad}v{} = {};", v.0, self.e(&at));
                    }
                }
                S::LoadShared4 { shared, index, into } => {
                    for (j, v) in into.iter().enumerate() {
                        let at = E::LoadShared(*shared, Box::new(index.clone() + E::I32(j as i32)));
                        let _ = writeln!(out, "{pad}v{} = {};", v.0, self.e(&at));
                    }
                }
                S::StoreShared4 { shared, index, values } => {
                    for (j, v) in values.iter().enumerate() {
                        let at = index.clone() + E::I32(j as i32);
                        let _ = writeln!(out, "{pad}wg{}[{}] = {};", shared.0, self.e(&at), self.e(v));
                    }
                }
                S::Reduce { how, value, into, scratch } => {
                    // A tree in workgroup memory: halve the live invocations
                    // each step, then everyone reads the root.
                    let w = format!("wg{}", scratch.0);
                    let _ = writeln!(out, "{pad}{w}[lid] = {};", self.e(value));
                    let _ = writeln!(out, "{pad}workgroupBarrier();");
                    let mut half = self.k.threads / 2;
                    while half > 0 {
                        let (x, y) = (format!("{w}[lid]"), format!("{w}[lid + {half}u]"));
                        let combined = combine(*how, &x, &y);
                        let _ = writeln!(out, "{pad}if (lid < {half}u) {{ {w}[lid] = {combined}; }}");
                        let _ = writeln!(out, "{pad}workgroupBarrier();");
                        half /= 2;
                    }
                    let _ = writeln!(out, "{pad}v{} = {w}[0];", into.0);
                    // Nobody overwrites the root before everyone has read it.
                    let _ = writeln!(out, "{pad}workgroupBarrier();");
                }
            }
        }
    }

    fn e(&self, x: &E) -> String {
        match x {
            E::F32(v) => f32_literal(*v),
            E::I32(v) if *v == i32::MIN => "bitcast<i32>(0x80000000u)".into(),
            E::I32(v) => format!("{v}i"),
            E::U32(v) => format!("{v}u"),
            E::Bool(b) => b.to_string(),
            E::Var(v) => format!("v{}", v.0),
            E::Builtin(Builtin::Thread) => "lid".into(),
            E::Builtin(Builtin::Group(a)) => format!("wid.{}", axis(*a)),
            E::Builtin(Builtin::Groups(a)) => format!("nwg.{}", axis(*a)),
            E::Param(i) => format!("params[{i}]"),
            E::Load(space @ Space::WeightsSpan { .. }, i) => {
                let i = match self.k.ty_of(i) {
                    Ty::I32 => self.e(i),
                    _ => format!("i32({})", self.e(i)),
                };
                format!("{}({i})", space_name(*space))
            }
            E::Load(space, i) => format!("{}[{}]", space_name(*space), self.e(i)),
            E::LoadShared(a, i) => format!("wg{}[{}]", a.0, self.e(i)),
            E::LoadLocal(a, i) => format!("loc{}[{}]", a.0, self.e(i)),
            E::Un(op, a) => {
                let a = self.e(a);
                match op {
                    UnOp::Neg => format!("(-{a})"),
                    UnOp::Not => format!("(!{a})"),
                    UnOp::Abs => format!("abs({a})"),
                    UnOp::Sqrt => format!("sqrt({a})"),
                    UnOp::Floor => format!("floor({a})"),
                    UnOp::Ceil => format!("ceil({a})"),
                    UnOp::Round => format!("round({a})"),
                    UnOp::Exp => format!("exp({a})"),
                    UnOp::Log => format!("log({a})"),
                    UnOp::Sin => format!("sin({a})"),
                    UnOp::Cos => format!("cos({a})"),
                }
            }
            E::Bin(op, a, b) => {
                let boolean = self.k.ty_of(a) == Ty::Bool;
                let (a, b) = (self.e(a), self.e(b));
                let infix = |o: &str| format!("({a} {o} {b})");
                match op {
                    BinOp::Add => infix("+"),
                    BinOp::Sub => infix("-"),
                    BinOp::Mul => infix("*"),
                    BinOp::Div => infix("/"),
                    BinOp::Rem => infix("%"),
                    BinOp::Max => format!("max({a}, {b})"),
                    BinOp::Min => format!("min({a}, {b})"),
                    BinOp::And if boolean => infix("&&"),
                    BinOp::Or if boolean => infix("||"),
                    BinOp::And => infix("&"),
                    BinOp::Or => infix("|"),
                    BinOp::Xor => infix("^"),
                    BinOp::Shl => format!("({a} << u32({b}))"),
                    BinOp::Shr => format!("({a} >> u32({b}))"),
                }
            }
            E::Fma(a, b, c) => format!("fma({}, {}, {})", self.e(a), self.e(b), self.e(c)),
            E::Cmp(op, a, b) => {
                let o = match op {
                    CmpOp::Eq => "==",
                    CmpOp::Ne => "!=",
                    CmpOp::Lt => "<",
                    CmpOp::Le => "<=",
                    CmpOp::Gt => ">",
                    CmpOp::Ge => ">=",
                };
                format!("({} {o} {})", self.e(a), self.e(b))
            }
            E::Select(c, a, b) => format!("select({}, {}, {})", self.e(b), self.e(a), self.e(c)),
            E::Cast(t, a) if self.k.ty_of(a) == *t => self.e(a),
            E::Cast(t, a) => format!("{t}({})", self.e(a)),
            E::Bits(t, a) if self.k.ty_of(a) == *t => self.e(a),
            E::Bits(t, a) => format!("bitcast<{t}>({})", self.e(a)),
        }
    }
}

/// `x` combined with `y` (WGSL text); maximum and minimum keep NaN.
fn combine(how: Reduction, x: &str, y: &str) -> String {
    match how {
        Reduction::Sum => format!("{x} + {y}"),
        Reduction::Max => format!("max_nan({x}, {y})"),
        Reduction::Min => format!("min_nan({x}, {y})"),
    }
}

/// NaN-propagating maximum and minimum, tested on the bits (see
/// `Builder::is_nan`), for reductions.
const NAN_HELPERS: &str = "fn is_nan(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }
fn max_nan(x: f32, y: f32) -> f32 { return select(select(max(x, y), y, is_nan(y)), x, is_nan(x)); }
fn min_nan(x: f32, y: f32) -> f32 { return select(select(min(x, y), y, is_nan(y)), x, is_nan(x)); }
";

fn uses_nan_reduction(body: &[S]) -> bool {
    body.iter().any(|s| match s {
        S::Reduce { how, .. } => *how != Reduction::Sum,
        S::For { body, .. } => uses_nan_reduction(body),
        S::If(_, a, b) => uses_nan_reduction(a) || uses_nan_reduction(b),
        _ => false,
    })
}

fn axis(a: u8) -> char {
    ['x', 'y', 'z'][a as usize]
}

/// An f32 constant: decimal where WGSL has a literal for it, its bits
/// otherwise (infinities, NaN, subnormals).
fn f32_literal(v: f32) -> String {
    if v == 0.0 && v.is_sign_positive() {
        "0.0f".into()
    } else if v.is_normal() {
        let s = format!("{v:?}");
        if s.contains(['.', 'e']) {
            format!("{s}f")
        } else {
            format!("{s}.0f")
        }
    } else {
        format!("bitcast<f32>({:#010x}u)", v.to_bits())
    }
}

/// Parses and validates a shader with naga; the message names the
/// problem as naga reports it. A build without the `naga` feature (one
/// without the GPU backends) checks nothing.
#[cfg(not(feature = "naga"))]
pub fn validate(_source: &str) -> Result<(), String> {
    Ok(())
}

/// Parses and validates a shader with naga; the message names the
/// problem as naga reports it.
#[cfg(feature = "naga")]
pub fn validate(source: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;
    Ok(())
}
