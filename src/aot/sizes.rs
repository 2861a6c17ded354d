//! The C that gives an artifact compiled with symbolic dims its sizes.
//!
//! One library runs every value of the model's symbolic dims. For each set
//! of input dims a caller gives (`NAME_context_set_input_dims`), the
//! generated function `set_sizes` below:
//! - solves the symbols from the inputs' dims, and refuses dims that
//!   contradict the model (a fixed dim given another size, two inputs that
//!   disagree on `sequence`) or a value outside its declared bounds;
//! - evaluates every size the plan keeps symbolic, with overflow checks,
//!   and refuses values that make one of the graph's sizes negative
//!   (`Plan::sizes`);
//! - checks the strided walks a call must check (`Plan::walks_to_check`:
//!   every symbolic kernel's, and a known kernel's over a symbolic value)
//!   against the buffers they touch at those sizes, as the JIT's runtime
//!   does, so that a value the model cannot serve (a position table too
//!   short for the sequence, an axis shorter than a known slice of it) is
//!   an error, never a read outside a buffer;
//! - lays the arena out by `memory::layout_rule` and grows it if needed;
//! - fills the driver's words (`object::DriverWord`): arena offsets, each
//!   symbolic kernel's sizes, extents and blocks (`cpu::call`), the bytes
//!   of copied outputs.
//!
//! The expressions come from the same descriptions the JIT evaluates, so
//! the artifact and the JIT cannot disagree on a layout.

use egret_backends::cpu::call::{Block, Word};
use egret_backends::cpu::object::DriverWord;
use egret_backends::plan::{Plan, Storage};
use egret_ir::{Dim, Type};
use std::collections::HashMap;
use std::fmt::Write as _;

/// A symbolic dim with its bounds (`hi`: `None` for no upper bound).
pub(super) struct DimInfo {
    pub name: String,
    pub lo: i64,
    pub hi: Option<i64>,
}

/// What the size code is generated from.
pub(super) struct Sizes<'a> {
    pub plan: &'a Plan,
    pub words: &'a [DriverWord],
    /// In `plan.symbols` order: `s[i]` in the C.
    pub dims: &'a [DimInfo],
    pub inputs: &'a [(String, Type)],
    pub outputs: &'a [(String, Type)],
}

/// The distinct sizes the code evaluates, as `d[i]`, in first-use order.
#[derive(Default)]
struct Values {
    order: Vec<Dim>,
    index: HashMap<Dim, usize>,
}

impl Values {
    fn of(&mut self, d: Dim) -> String {
        if let Some(v) = d.known() {
            return literal(v);
        }
        let n = self.order.len();
        let i = *self.index.entry(d).or_insert(n);
        if i == n {
            self.order.push(d);
        }
        format!("d[{i}]")
    }
}

fn literal(v: i64) -> String {
    match v {
        // C has no literal for it: `-9223372036854775808` negates a number
        // no signed type holds (a float's sign bit alone, -0.0, is one).
        i64::MIN => "(-INT64_C(9223372036854775807) - 1)".to_string(),
        v if i32::try_from(v).is_ok() => v.to_string(),
        v => format!("INT64_C({v})"),
    }
}

/// `d` as checked C arithmetic over `s[]`.
fn c_poly(d: Dim, symbols: &[String]) -> String {
    let mut sum: Option<String> = None;
    for (coeff, syms) in d.terms() {
        let mut term: Option<String> = (coeff != 1 || syms.is_empty()).then(|| literal(coeff));
        for sym in syms {
            let i = symbols.iter().position(|s| *s == sym).expect("a plan's dims use its symbols");
            term = Some(match term {
                None => format!("s[{i}]"),
                Some(t) => format!("mul({t}, s[{i}], &ok)"),
            });
        }
        let term = term.unwrap_or_else(|| "1".into());
        sum = Some(match sum {
            None => term,
            Some(acc) => format!("add({acc}, {term}, &ok)"),
        });
    }
    sum.unwrap_or_else(|| "0".into())
}

/// C text for a comment: no `*/` can end it early.
fn comment(text: &str) -> String {
    text.replace("*/", "* /")
}

fn word(w: &Word, v: &mut Values) -> String {
    match *w {
        Word::Const(c) => literal(c),
        Word::Dim(d) => v.of(d),
        Word::Clamp { n, cap } => format!("clamp_tile({}, {})", v.of(n), literal(cap as i64)),
        Word::Blocks { count, n, block } => {
            format!("mul(nonneg({}), ceil_div({}, {}), &ok)", v.of(count), v.of(n), literal(block as i64))
        }
    }
}

impl Sizes<'_> {
    fn symbols(&self) -> Vec<String> {
        self.dims.iter().map(|d| d.name.clone()).collect()
    }

    /// The counts and dim tables the context's struct and `set_sizes` use,
    /// for the top of the shim.
    pub fn defines(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "#define N_DIMS {}", self.dims.len());
        let _ = writeln!(s, "#define N_WORDS {}", self.words.len());
        let list = |items: Vec<String>| if items.is_empty() { "0".to_string() } else { items.join(", ") };
        let _ = writeln!(
            s,
            "static const char *const dim_names[] = {{{}}};",
            list(self.dims.iter().map(|d| super::c_string(&d.name)).collect())
        );
        let _ = writeln!(
            s,
            "static const int64_t dim_lo[] = {{{}}};",
            list(self.dims.iter().map(|d| literal(d.lo)).collect())
        );
        let _ = writeln!(
            s,
            "/* -1: no upper bound. */\nstatic const int64_t dim_hi[] = {{{}}};",
            list(self.dims.iter().map(|d| literal(d.hi.unwrap_or(-1))).collect())
        );
        s
    }

    /// The C: constants, tables and `solve`/`set_sizes`, for the shim of
    /// the library `name`.
    pub fn source(&self, name: &str) -> String {
        let up = &name.to_uppercase();
        let mut v = Values::default();
        let mut body = String::new();
        let symbols = self.symbols();
        let plan = self.plan;

        // Every input and output dim, for the context's queries.
        let side = |items: &[(String, Type)], name: &str, v: &mut Values, body: &mut String| {
            let mut at = 0;
            for (i, (_, t)) in items.iter().enumerate() {
                for (k, &d) in t.shape.iter().enumerate() {
                    let _ = writeln!(body, "    c->{name}_dims[{}] = {};", at + k, v.of(d));
                }
                let bytes = t.shape.iter().copied().product::<Dim>() * Dim::new(t.dtype.size_bytes());
                let bytes = match bytes.known() {
                    Some(b) => literal(b),
                    None => format!("(size_t)nonneg({})", v.of(bytes)),
                };
                let _ = writeln!(body, "    c->{name}_bytes[{i}] = {bytes};");
                at += t.rank();
            }
        };
        side(self.inputs, "input", &mut v, &mut body);
        side(self.outputs, "output", &mut v, &mut body);

        // No compound size negative (`Plan::sizes`: a slice's `-s0 + 3`
        // once ONNX would have clamped it), as the JIT's runtime checks.
        let mut checks = String::new();
        for (d, label) in &plan.sizes {
            let _ = writeln!(
                checks,
                "    if ({} < 0)\n        return refuse(c, \"node `%s`: a size of its output, %s, is negative at these dims: the model's shapes do not hold for them\", {}, {});",
                v.of(*d),
                super::c_string(label),
                super::c_string(&d.to_string()),
            );
        }

        // The walks a call checks (every symbolic kernel's, and a known
        // kernel's over symbolic buffers), inside their buffers.
        for (i, k) in plan.kernels.iter().enumerate() {
            for w in plan.walks_to_check(k) {
                // (C has no empty initialiser: a rank-0 walk lists a 0 it never reads.)
                let n: Vec<String> =
                    w.dims.iter().map(|&(n, _)| v.of(n)).chain(w.dims.is_empty().then(|| "0".into())).collect();
                let st: Vec<String> =
                    w.dims.iter().map(|&(_, st)| v.of(st)).chain(w.dims.is_empty().then(|| "0".into())).collect();
                let what = match &plan.buffers[w.buffer].storage {
                    Storage::Input(j) => format!("input {j}"),
                    Storage::Constant(_) => "a constant".to_string(),
                    Storage::Arena { .. } => "an intermediate".to_string(),
                };
                let _ = writeln!(
                    checks,
                    "    {{\n        const int64_t n[] = {{{}}}, step[] = {{{}}};\n        if (!inside({}, {}, {}, n, step, {}))\n            return refuse(c, \"kernel {i} (node `%s`) would reach outside {what} at these sizes: the model does not allow them\", {});\n    }}",
                    n.join(", "),
                    st.join(", "),
                    w.elem,
                    v.of(w.at),
                    w.dims.len(),
                    v.of(plan.buffers[w.buffer].bytes),
                    super::c_string(&k.label),
                );
            }
        }

        // The arena, laid out by the rule for these sizes.
        // (A bound plan's driver has its offsets built in.)
        let rule = if plan.is_bound() { vec![] } else { egret_backends::memory::layout_rule(plan) };
        let slot: HashMap<usize, usize> = rule.iter().enumerate().map(|(i, (b, _))| (*b, i)).collect();
        let mut layout = String::new();
        let align = egret_backends::memory::ARENA_ALIGN;
        for (i, (b, below)) in rule.iter().enumerate() {
            let bytes = v.of(plan.buffers[*b].bytes);
            let _ =
                writeln!(layout, "    size[{i}] = round_up(nonneg({bytes}) > 0 ? nonneg({bytes}) : 1, {align}, &ok);");
            let _ = writeln!(layout, "    off[{i}] = 0;");
            for a in below {
                let a = slot[a];
                let _ = writeln!(layout, "    off[{i}] = max64(off[{i}], add(off[{a}], size[{a}], &ok));");
            }
            let _ = writeln!(layout, "    top = max64(top, add(off[{i}], size[{i}], &ok));");
        }

        // The blocks, one after another in the context's block memory.
        let blocks: Vec<((usize, usize), Block)> = self
            .words
            .iter()
            .filter_map(|w| match w {
                DriverWord::Block { kernel, block } => Some((*kernel, *block)),
                _ => None,
            })
            .map(|(k, j)| ((k, j), egret_backends::cpu::call::blocks(&plan.kernels[k]).swap_remove(j)))
            .collect();
        let mut block_len = String::new();
        let mut block_fill = String::new();
        let mut block_slot = HashMap::new();
        for (n, ((k, j), block)) in blocks.iter().enumerate() {
            block_slot.insert((*k, *j), n);
            let _ = writeln!(block_len, "    block_at[{n}] = total;");
            match block {
                Block::Words(words) => {
                    let _ = writeln!(block_len, "    total = add(total, {}, &ok);", words.len());
                    let _ = writeln!(block_fill, "    w = c->blocks + block_at[{n}]; /* kernel {k}, block {j} */");
                    for (x, wd) in words.iter().enumerate() {
                        let _ = writeln!(block_fill, "    w[{x}] = {};", word(wd, &mut v));
                    }
                }
                Block::Batches { count, entries, strides, tail } => {
                    let count = v.of(*count);
                    let per = 5 * entries.len();
                    let _ = writeln!(
                        block_len,
                        "    total = add(total, add(mul(nonneg({count}), {per}, &ok), {}, &ok), &ok);",
                        tail.len()
                    );
                    let strides: Vec<String> = strides.iter().map(|&s| v.of(s)).collect();
                    let _ = writeln!(
                        block_fill,
                        "    w = c->blocks + block_at[{n}]; /* kernel {k}, block {j}: its batches' offsets */"
                    );
                    let _ = writeln!(block_fill, "    for (e = 0; e < {count}; e++, w += {per}) {{");
                    for (x, entry) in entries.iter().enumerate() {
                        for (y, &o) in entry.iter().enumerate() {
                            let _ = writeln!(
                                block_fill,
                                "        w[{}] = add({}, mul({}, e, &ok), &ok);",
                                5 * x + y,
                                v.of(o),
                                strides[y]
                            );
                        }
                    }
                    let _ = writeln!(block_fill, "    }}");
                    for (x, &t) in tail.iter().enumerate() {
                        let _ = writeln!(block_fill, "    w[{x}] = {};", literal(t));
                    }
                }
            }
        }

        // The driver's words.
        let mut fill = String::new();
        for (i, w) in self.words.iter().enumerate() {
            let text = match w {
                DriverWord::Offset(b) => format!("off[{}]; /* buffer {b} */", slot[b]),
                DriverWord::Value(wd) => format!("{};", word(wd, &mut v)),
                DriverWord::Block { kernel, block } => {
                    format!("(int64_t)(intptr_t)(c->blocks + block_at[{}]);", block_slot[&(*kernel, *block)])
                }
            };
            let _ = writeln!(fill, "    c->words[{i}] = {text}");
        }

        let mut values = String::new();
        for (i, &d) in v.order.iter().enumerate() {
            let _ = writeln!(values, "    d[{i}] = {}; /* {} */", c_poly(d, &symbols), comment(&d.to_string()));
        }

        let mut s = String::new();
        s.push_str(&self.solve(name));
        let _ = write!(
            s,
            "
#define N_VALUES {n_values}
#define N_ARENA_BUFFERS {n_arena}
#define N_BLOCKS {n_blocks}

/* Every size at the symbols' values s[]: the context's dims and bytes,
 * the kernels' checks, the arena's layout, the blocks and the words. */
static int set_sizes({name}_context *c, const int64_t *s) {{
    int ok = 1;
    int64_t d[N_VALUES + 1], size[N_ARENA_BUFFERS + 1], off[N_ARENA_BUFFERS + 1], top = 0, total = 0, e = 0;
    size_t block_at[N_BLOCKS + 1];
    int64_t *w = 0;
    (void)s; (void)e; (void)w; (void)size; (void)off; (void)block_at;
{values}    if (!ok) return refuse(c, \"the sizes overflow 64 bits at these dims\");
{body}{checks}{layout}    if (!ok) return refuse(c, \"the arena overflows 64 bits at these dims\");
    if ((uint64_t)top > c->arena_bytes) {{
        void *grown = aligned_alloc(64, (size_t)top);
        if (!grown) return {up}_ERROR_OUT_OF_MEMORY;
        free(c->arena);
        c->arena = grown;
        c->arena_bytes = (size_t)top;
    }}
{block_len}    if (!ok) return refuse(c, \"the kernels' tables overflow 64 bits at these dims\");
    if ((uint64_t)total > c->block_words) {{
        int64_t *grown = (int64_t *)malloc(((size_t)total + 1) * sizeof *grown);
        if (!grown) return {up}_ERROR_OUT_OF_MEMORY;
        free(c->blocks);
        c->blocks = grown;
        c->block_words = (size_t)total;
    }}
{block_fill}{fill}    if (!ok) return refuse(c, \"the sizes overflow 64 bits at these dims\");
    return {up}_OK;
}}
",
            n_values = v.order.len(),
            n_arena = rule.len(),
            n_blocks = blocks.len(),
        );
        s
    }

    /// `solve`: the symbols' values from the inputs' dims.
    fn solve(&self, name: &str) -> String {
        let up = name.to_uppercase();
        let symbols = self.symbols();
        let mut plain = String::new();
        let mut fixed = String::new();
        let mut derived = String::new();
        for (i, (name, t)) in self.inputs.iter().enumerate() {
            let input = super::c_string(name);
            for (k, &d) in t.shape.iter().enumerate() {
                let at = format!("in[{i}][{k}]");
                if let Some(v) = d.known() {
                    let _ = writeln!(
                        fixed,
                        "    if ({at} != {}) return refuse(c, \"input %d (%s) has %lld at dim {k}; the model's is {v}\", {i}, {input}, (long long){at});",
                        literal(v)
                    );
                } else if let Some(sym) = d.as_symbol() {
                    let j = symbols.iter().position(|s| *s == sym).expect("the inputs' symbols are the plan's");
                    let _ = writeln!(
                        plain,
                        "    if (!bind(c, s, set, {j}, {at}, {i}, {input}, {k})) return {up}_ERROR_SHAPE;"
                    );
                } else {
                    let _ = writeln!(
                        derived,
                        "    if ({at} != {}) return refuse(c, \"input %d (%s) has %lld at dim {k}, not {}\", {i}, {input}, (long long){at});",
                        c_poly(d, &symbols),
                        comment(&d.to_string()).replace('"', "\\\"")
                    );
                }
            }
        }
        format!(
            "
/* Gives symbol j the value v from input i's dim k, if it agrees with
 * what an earlier input gave. */
static int bind({name}_context *c, int64_t *s, int *set, int j, int64_t v, int i, const char *input, int k) {{
    if (v < 0) {{
        refuse(c, \"input %d (%s) has the negative size %lld at dim %d\", i, input, (long long)v, k);
        return 0;
    }}
    if (set[j] && s[j] != v) {{
        refuse(c, \"input %d (%s) gives `%s` = %lld at dim %d, but an earlier input gave %lld\", i, input, dim_names[j],
               (long long)v, k, (long long)s[j]);
        return 0;
    }}
    s[j] = v;
    set[j] = 1;
    return 1;
}}

/* The symbols' values s[] from the inputs' dims in[i][k]. */
static int solve({name}_context *c, const int64_t *const *in, int64_t *s) {{
    int set[N_DIMS + 1] = {{0}}, ok = 1, j;
    (void)ok;
{plain}    for (j = 0; j < N_DIMS; j++) {{
        if (s[j] < dim_lo[j] || (dim_hi[j] >= 0 && s[j] > dim_hi[j]))
            return refuse(c, \"`%s` = %lld is outside the bounds the library was compiled for (%lld..%lld)\",
                          dim_names[j], (long long)s[j], (long long)dim_lo[j], (long long)dim_hi[j]);
    }}
{fixed}{derived}    if (!ok) return refuse(c, \"the input dims overflow 64 bits\");
    return {up}_OK;
}}
"
        )
    }
}
