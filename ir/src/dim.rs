//! Dimensions that may be symbolic.
//!
//! A model exported with `dim_param`s (`batch`, `sequence`, `past_sequence +
//! sequence`) has sizes that are only known when it runs. A `Dim` is either a
//! known integer or a polynomial with integer coefficients over named
//! symbols, which is what exporters' shape arithmetic produces: products for
//! flattened axes (`batch*sequence`), sums for concatenations
//! (`past_sequence + sequence`), differences for slices (`sequence - 1`).
//!
//! `Dim` is `Copy`, so shapes stay plain vectors: a polynomial is interned
//! once per process and a `Dim` is a tagged index into that table, or the
//! integer itself. Two `Dim`s are equal exactly when their canonical
//! polynomials are, which is the equality shape inference needs (`batch`
//! matches `batch`, `2*sequence` matches `sequence + sequence`); anything
//! the algebra cannot decide (is `batch` equal to `sequence`?) is not
//! assumed, and the op that needed it says so.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

/// A dimension or other size: a known integer or a polynomial over symbols.
/// Deliberately not ordered: whether `batch < sequence` depends on values
/// only a run has.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dim(u64);

/// Set on an interned polynomial's index; clear on a known value.
const SYMBOLIC: u64 = 1 << 63;
/// Known values are stored in 63 bits, so they range over ±2^62.
const KNOWN_LIMIT: i64 = 1 << 62;

/// One term: a coefficient times a product of symbols (sorted; a symbol
/// raised to a power appears that many times). The constant term has none.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Term {
    syms: Vec<Arc<str>>,
    coeff: i64,
}

/// The most terms a product of dims may have before normalising (see
/// `checked_mul`).
const MAX_TERMS: usize = 64;

/// A canonical polynomial: terms ordered by `term_order`, no zero
/// coefficients, no two terms with the same symbols.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Poly(Vec<Term>);

fn term_order(a: &Term, b: &Term) -> std::cmp::Ordering {
    // Higher degree first, then by symbol names: `batch*sequence + sequence + 1`.
    b.syms.len().cmp(&a.syms.len()).then_with(|| a.syms.cmp(&b.syms))
}

impl Poly {
    fn constant(c: i64) -> Poly {
        Poly(if c == 0 { vec![] } else { vec![Term { syms: vec![], coeff: c }] })
    }

    /// Sorts and merges terms; `None` if a coefficient overflows.
    fn normalise(mut terms: Vec<Term>) -> Option<Poly> {
        terms.sort_by(term_order);
        let mut out: Vec<Term> = Vec::with_capacity(terms.len());
        for t in terms {
            match out.last_mut() {
                Some(last) if last.syms == t.syms => last.coeff = last.coeff.checked_add(t.coeff)?,
                _ => out.push(t),
            }
        }
        out.retain(|t| t.coeff != 0);
        Some(Poly(out))
    }

    fn as_constant(&self) -> Option<i64> {
        match self.0.as_slice() {
            [] => Some(0),
            [t] if t.syms.is_empty() => Some(t.coeff),
            _ => None,
        }
    }
}

/// The interned polynomials, in shards by hash: a process that makes
/// millions of them (a fuzzer, a long-lived server importing many models)
/// grows 64 small tables rather than one whose rehash stalls every thread
/// for over a second. A handle is `local index * SHARDS + shard`.
struct Shard {
    polys: Vec<Arc<Poly>>,
    index: HashMap<Arc<Poly>, u64>,
}

const SHARDS: usize = 64;

fn shards() -> &'static [RwLock<Shard>; SHARDS] {
    static TABLE: OnceLock<[RwLock<Shard>; SHARDS]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|_| RwLock::new(Shard { polys: vec![], index: HashMap::new() })))
}

fn shard_of(p: &Poly) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault};
    (BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(p) % SHARDS as u64) as usize
}

/// An arithmetic result that leaves the range a `Dim` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimOverflow;

impl fmt::Display for DimOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size overflows")
    }
}

impl Dim {
    /// The known size `v`.
    pub const fn new(v: usize) -> Dim {
        assert!(v < KNOWN_LIMIT as usize, "a known Dim holds values below 2^62");
        Dim(v as u64)
    }

    /// A known integer, negative ones included (shape arithmetic passes through
    /// `-1` and differences); `None` outside ±2^62.
    pub fn int(v: i64) -> Option<Dim> {
        (-KNOWN_LIMIT..KNOWN_LIMIT).contains(&v).then_some(Dim((v as u64) & !SYMBOLIC))
    }

    /// `v` clamped into the range a `Dim` holds: exporters write INT64_MAX
    /// for "to the end", which every consumer clamps anyway.
    pub fn saturating(v: i64) -> Dim {
        Dim(((v.clamp(-KNOWN_LIMIT, KNOWN_LIMIT - 1)) as u64) & !SYMBOLIC)
    }

    /// The symbol `name`.
    pub fn symbol(name: &str) -> Dim {
        Dim::intern(Poly(vec![Term { syms: vec![Arc::from(name)], coeff: 1 }]))
    }

    fn from_poly(p: Poly) -> Result<Dim, DimOverflow> {
        if let Some(c) = p.as_constant() {
            return Dim::int(c).ok_or(DimOverflow);
        }
        if p.0.iter().any(|t| !(-KNOWN_LIMIT..KNOWN_LIMIT).contains(&t.coeff)) {
            return Err(DimOverflow);
        }
        Ok(Dim::intern(p))
    }

    /// The handle of a polynomial that is not a constant.
    fn intern(p: Poly) -> Dim {
        let shard = shard_of(&p);
        let t = &shards()[shard];
        if let Some(&i) = t.read().unwrap_or_else(|e| e.into_inner()).index.get(&p) {
            return Dim(i | SYMBOLIC);
        }
        let mut w = t.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = w.index.get(&p) {
            return Dim(i | SYMBOLIC);
        }
        let i = (w.polys.len() * SHARDS + shard) as u64;
        let p = Arc::new(p);
        w.polys.push(p.clone());
        w.index.insert(p, i);
        Dim(i | SYMBOLIC)
    }

    fn poly(self) -> Arc<Poly> {
        match self.known() {
            Some(c) => Arc::new(Poly::constant(c)),
            None => {
                let i = (self.0 & !SYMBOLIC) as usize;
                shards()[i % SHARDS].read().unwrap_or_else(|e| e.into_inner()).polys[i / SHARDS].clone()
            }
        }
    }

    /// The value, if it does not depend on any symbol.
    pub fn known(self) -> Option<i64> {
        if self.0 & SYMBOLIC != 0 {
            return None;
        }
        // Sign-extend the 63-bit value.
        Some(((self.0 << 1) as i64) >> 1)
    }

    /// The value as a size: known and not negative.
    pub fn size(self) -> Option<usize> {
        self.known().and_then(|v| usize::try_from(v).ok())
    }

    pub fn is_known(self) -> bool {
        self.0 & SYMBOLIC == 0
    }

    /// The polynomial's terms, highest degree first: each coefficient with
    /// the symbols it multiplies (a symbol squared appears twice; the
    /// constant term has none). What a printer of the expression in another
    /// language (the C artifact's size code) walks.
    pub fn terms(self) -> Vec<(i64, Vec<String>)> {
        self.poly().0.iter().map(|t| (t.coeff, t.syms.iter().map(|s| s.to_string()).collect())).collect()
    }

    /// The symbol's name if this is a symbol alone (`batch`, not `batch + 1`):
    /// a dim a caller's shape gives the value of directly.
    pub fn as_symbol(self) -> Option<String> {
        match &self.poly().0[..] {
            [t] if t.coeff == 1 && t.syms.len() == 1 => Some(t.syms[0].to_string()),
            _ => None,
        }
    }

    /// The symbols this depends on, sorted, each once.
    pub fn symbols(self) -> Vec<String> {
        let mut out: Vec<String> = self.poly().0.iter().flat_map(|t| t.syms.iter().map(|s| s.to_string())).collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn checked_add(self, other: Dim) -> Result<Dim, DimOverflow> {
        if let (Some(a), Some(b)) = (self.known(), other.known()) {
            return a.checked_add(b).and_then(Dim::int).ok_or(DimOverflow);
        }
        let mut terms = self.poly().0.clone();
        terms.extend(other.poly().0.iter().cloned());
        Poly::normalise(terms).ok_or(DimOverflow).and_then(Dim::from_poly)
    }

    pub fn checked_neg(self) -> Result<Dim, DimOverflow> {
        self.checked_mul(Dim(((-1i64) as u64) & !SYMBOLIC))
    }

    pub fn checked_sub(self, other: Dim) -> Result<Dim, DimOverflow> {
        self.checked_add(other.checked_neg()?)
    }

    pub fn checked_mul(self, other: Dim) -> Result<Dim, DimOverflow> {
        if let (Some(a), Some(b)) = (self.known(), other.known()) {
            return a.checked_mul(b).and_then(Dim::int).ok_or(DimOverflow);
        }
        let (a, b) = (self.poly(), other.poly());
        // A product of sums multiplies their terms: `(a0 - b0) * ... *
        // (a13 - b13)`, a `dim_param` or a type in IR text, has 2^14 terms and
        // took minutes to expand (found by the ir_text fuzz target). No
        // shape has use for more than a few; past `MAX_TERMS` it is refused.
        if a.0.len().saturating_mul(b.0.len()) > MAX_TERMS {
            return Err(DimOverflow);
        }
        let mut terms = Vec::with_capacity(a.0.len() * b.0.len());
        for x in &a.0 {
            for y in &b.0 {
                let mut syms = x.syms.clone();
                syms.extend(y.syms.iter().cloned());
                syms.sort();
                terms.push(Term { syms, coeff: x.coeff.checked_mul(y.coeff).ok_or(DimOverflow)? });
            }
        }
        Poly::normalise(terms).ok_or(DimOverflow).and_then(Dim::from_poly)
    }

    /// `self / d` when it divides exactly for every value of the symbols:
    /// by a known integer that divides every coefficient, by a single term
    /// (`batch*sequence*64 / 64`, `/ sequence`, `/ 2*batch`) that divides every
    /// term, by itself, or by a sum that long division leaves no remainder
    /// of (`(64*batch*past + 64*batch*sequence) / (16*past + 16*sequence)`).
    /// `None` otherwise, including division by zero.
    pub fn div_exact(self, d: Dim) -> Option<Dim> {
        if let (Some(a), Some(b)) = (self.known(), d.known()) {
            return (b != 0 && a % b == 0).then(|| Dim::int(a / b)).flatten();
        }
        if self == d {
            return Some(Dim::new(1));
        }
        let dp = d.poly();
        let Some(lead) = dp.0.first() else { return None };
        // `t / lead` as a term, when `lead` divides it.
        let divide = |t: &Term| -> Option<Term> {
            if t.coeff % lead.coeff != 0 {
                return None;
            }
            let mut syms = t.syms.clone();
            for s in &lead.syms {
                let at = syms.iter().position(|x| x == s)?;
                syms.remove(at);
            }
            Some(Term { syms, coeff: t.coeff / lead.coeff })
        };
        if dp.0.len() == 1 {
            let terms = self.poly().0.iter().map(divide).collect::<Option<Vec<_>>>()?;
            return Poly::normalise(terms).and_then(|p| Dim::from_poly(p).ok());
        }
        // By a sum (`[batch, 4, past + sequence, 16]` to `[-1, past +
        // sequence, 16]`): long division by the leading terms; exact when
        // nothing remains, and the quotient then times `d` is `self`.
        let mut rest = self.poly().0.clone();
        let mut quotient = Vec::new();
        for _ in 0..64 {
            let Some(first) = rest.first() else {
                return Poly::normalise(quotient).and_then(|p| Dim::from_poly(p).ok());
            };
            let q = divide(first)?;
            for t in &dp.0 {
                let mut syms = q.syms.clone();
                syms.extend(t.syms.iter().cloned());
                syms.sort();
                rest.push(Term { syms, coeff: q.coeff.checked_mul(t.coeff)?.checked_neg()? });
            }
            quotient.push(q);
            rest = Poly::normalise(rest)?.0;
        }
        None
    }

    /// Whether `self >= 0` for every value of the symbols (they are never
    /// negative): `Some(true)` when every coefficient is non-negative,
    /// `Some(false)` for a known negative value, `None` when it depends.
    pub fn is_nonneg(self) -> Option<bool> {
        if let Some(v) = self.known() {
            return Some(v >= 0);
        }
        self.poly().0.iter().all(|t| t.coeff >= 0).then_some(true)
    }

    /// The value with every symbol given by `value`.
    pub fn eval(self, value: &dyn Fn(&str) -> Option<i64>) -> Result<i64, String> {
        if let Some(v) = self.known() {
            return Ok(v);
        }
        let mut sum = 0i64;
        for t in &self.poly().0 {
            let mut x = t.coeff;
            for s in &t.syms {
                let v = value(s).ok_or_else(|| format!("dim `{s}` has no value"))?;
                x = x.checked_mul(v).ok_or_else(|| format!("{self} overflows"))?;
            }
            sum = sum.checked_add(x).ok_or_else(|| format!("{self} overflows"))?;
        }
        Ok(sum)
    }

    /// Replaces the symbols `value` gives; the others stay.
    pub fn substitute(self, value: &dyn Fn(&str) -> Option<i64>) -> Result<Dim, DimOverflow> {
        if self.is_known() {
            return Ok(self);
        }
        let mut sum = Dim::new(0);
        for t in &self.poly().0 {
            let mut x = Dim::int(t.coeff).ok_or(DimOverflow)?;
            for s in &t.syms {
                let f = match value(s) {
                    Some(v) => Dim::int(v).ok_or(DimOverflow)?,
                    None => Dim::symbol(s),
                };
                x = x.checked_mul(f)?;
            }
            sum = sum.checked_add(x)?;
        }
        Ok(sum)
    }

    /// A typical value, for cost models that must rank choices before the
    /// symbols have values: every symbol counted as `NOMINAL_SYMBOL_VALUE`
    /// (clamped at 0 below, saturating above).
    pub fn estimate(self) -> usize {
        let v = self.eval(&|_| Some(NOMINAL_SYMBOL_VALUE as i64)).unwrap_or(i64::MAX);
        usize::try_from(v.max(0)).unwrap_or(usize::MAX)
    }

    /// Parses what `Display` writes and what exporters put in a `dim_param`:
    /// integers and identifiers combined with `+`, `-`, `*` and parentheses.
    /// `None` if the text is not such an expression (then it names one opaque
    /// symbol, as ONNX allows any string).
    pub fn parse(text: &str) -> Option<Dim> {
        let toks = lex_expr(text)?;
        let mut p = ExprParser { toks: &toks, at: 0 };
        let d = p.sum()?;
        (p.at == toks.len()).then_some(d)
    }

    /// A `dim_param`'s meaning: the expression it spells, or an opaque symbol.
    pub fn from_dim_param(text: &str) -> Dim {
        Dim::parse(text).filter(|d| !d.is_known()).unwrap_or_else(|| Dim::symbol(text))
    }
}

#[derive(Clone, Debug, PartialEq)]
enum ExprTok {
    Int(i64),
    Name(String),
    Op(char),
}

fn lex_expr(text: &str) -> Option<Vec<ExprTok>> {
    let cs: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < cs.len() && cs[i].is_ascii_digit() {
                i += 1;
            }
            out.push(ExprTok::Int(cs[start..i].iter().collect::<String>().parse().ok()?));
        } else if is_name_start(c) {
            let start = i;
            while i < cs.len() && is_name_char(cs[i]) {
                i += 1;
            }
            out.push(ExprTok::Name(cs[start..i].iter().collect()));
        } else if c == '"' {
            // An opaque symbol, as `Display` quotes one.
            let close = cs[i + 1..].iter().position(|&c| c == '"')? + i + 1;
            out.push(ExprTok::Name(cs[i + 1..close].iter().collect()));
            i = close + 1;
        } else if "+-*()".contains(c) {
            out.push(ExprTok::Op(c));
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `name` prints bare inside an expression.
fn is_plain_name(name: &str) -> bool {
    let mut cs = name.chars();
    cs.next().is_some_and(is_name_start) && cs.all(is_name_char)
}

struct ExprParser<'a> {
    toks: &'a [ExprTok],
    at: usize,
}

impl ExprParser<'_> {
    fn eat(&mut self, op: char) -> bool {
        if self.toks.get(self.at) == Some(&ExprTok::Op(op)) {
            self.at += 1;
            true
        } else {
            false
        }
    }
    fn sum(&mut self) -> Option<Dim> {
        let mut d = self.product()?;
        loop {
            if self.eat('+') {
                d = d.checked_add(self.product()?).ok()?;
            } else if self.eat('-') {
                d = d.checked_sub(self.product()?).ok()?;
            } else {
                return Some(d);
            }
        }
    }
    fn product(&mut self) -> Option<Dim> {
        let mut d = self.atom()?;
        while self.eat('*') {
            d = d.checked_mul(self.atom()?).ok()?;
        }
        Some(d)
    }
    fn atom(&mut self) -> Option<Dim> {
        if self.eat('(') {
            let d = self.sum()?;
            return self.eat(')').then_some(d);
        }
        if self.eat('-') {
            return self.atom()?.checked_neg().ok();
        }
        let tok = self.toks.get(self.at)?.clone();
        self.at += 1;
        match tok {
            ExprTok::Int(v) => Dim::int(v),
            ExprTok::Name(s) => Some(Dim::symbol(&s)),
            ExprTok::Op(_) => None,
        }
    }
}

/// Arithmetic on the sizes of a graph that was checked: lowering computes
/// strides, offsets and byte counts of types whose element counts are at
/// most `MAX_ELEMENTS` at every value (and whose polynomials' coefficients
/// are that small), so an overflow here is a pipeline bug, not bad input.
macro_rules! size_arithmetic {
    ($trait:ident, $method:ident, $checked:ident) => {
        impl std::ops::$trait for Dim {
            type Output = Dim;
            fn $method(self, other: Dim) -> Dim {
                self.$checked(other).unwrap_or_else(|_| panic!("size arithmetic {self} and {other} overflows"))
            }
        }
        impl std::ops::$trait<isize> for Dim {
            type Output = Dim;
            fn $method(self, other: isize) -> Dim {
                std::ops::$trait::$method(self, Dim::from(other))
            }
        }
    };
}
size_arithmetic!(Add, add, checked_add);
size_arithmetic!(Sub, sub, checked_sub);
size_arithmetic!(Mul, mul, checked_mul);

impl std::ops::AddAssign for Dim {
    fn add_assign(&mut self, other: Dim) {
        *self = *self + other;
    }
}

impl std::ops::Neg for Dim {
    type Output = Dim;
    fn neg(self) -> Dim {
        self.checked_neg().unwrap_or_else(|_| panic!("size arithmetic -({self}) overflows"))
    }
}

impl std::iter::Sum for Dim {
    fn sum<I: Iterator<Item = Dim>>(iter: I) -> Dim {
        iter.fold(Dim::new(0), |a, b| a + b)
    }
}

impl std::iter::Product for Dim {
    fn product<I: Iterator<Item = Dim>>(iter: I) -> Dim {
        iter.fold(Dim::new(1), |a, b| a * b)
    }
}

impl From<isize> for Dim {
    fn from(v: isize) -> Dim {
        Dim::saturating(v as i64)
    }
}

impl Dim {
    /// The value at `values` (every symbol in it must have one).
    pub fn at(self, values: &Bindings) -> Result<i64, String> {
        self.eval(&|s| values.get(s).and_then(|&v| i64::try_from(v).ok()))
    }
}

/// One call's values of the symbols, each dim evaluated at most once: the
/// runtime reads the same few sizes many times per call (a kernel's
/// extents, the spans it reaches, its parameter block), and evaluating a
/// polynomial looks it up in the process's table and its symbols by name.
pub struct DimValues<'a> {
    values: &'a Bindings,
    /// The dims evaluated so far: a call has a few dozen distinct ones.
    memo: std::cell::RefCell<Vec<(Dim, i64)>>,
}

impl<'a> DimValues<'a> {
    pub fn new(values: &'a Bindings) -> DimValues<'a> {
        DimValues { values, memo: Default::default() }
    }

    /// The symbols' values.
    pub fn bindings(&self) -> &Bindings {
        self.values
    }

    /// `d`'s value.
    pub fn get(&self, d: Dim) -> Result<i64, String> {
        if let Some(v) = d.known() {
            return Ok(v);
        }
        if let Some(&(_, v)) = self.memo.borrow().iter().find(|(x, _)| *x == d) {
            return Ok(v);
        }
        let v = d.at(self.values)?;
        self.memo.borrow_mut().push((d, v));
        Ok(v)
    }

    /// `d`'s value as a size (0 if it is negative or has no value: callers
    /// check a call's sizes before they use them).
    pub fn size(&self, d: Dim) -> usize {
        self.get(d).ok().and_then(|v| usize::try_from(v).ok()).unwrap_or(0)
    }
}

impl From<usize> for Dim {
    fn from(v: usize) -> Dim {
        Dim::new(v)
    }
}

impl From<&usize> for Dim {
    fn from(v: &usize) -> Dim {
        Dim::new(*v)
    }
}

impl From<&Dim> for Dim {
    fn from(d: &Dim) -> Dim {
        *d
    }
}

impl PartialEq<usize> for Dim {
    fn eq(&self, other: &usize) -> bool {
        self.size() == Some(*other)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(v) = self.known() {
            return write!(f, "{v}");
        }
        let p = self.poly();
        for (i, t) in p.0.iter().enumerate() {
            let mut coeff = t.coeff;
            if i > 0 {
                f.write_str(if coeff < 0 { " - " } else { " + " })?;
                coeff = coeff.abs();
            } else if coeff == -1 && !t.syms.is_empty() {
                f.write_str("-")?;
                coeff = 1;
            }
            let mut first = true;
            if coeff != 1 || t.syms.is_empty() {
                write!(f, "{coeff}")?;
                first = false;
            }
            for s in &t.syms {
                if !first {
                    f.write_str("*")?;
                }
                first = false;
                if is_plain_name(s) {
                    f.write_str(s)?;
                } else {
                    write!(f, "{:?}", &**s)?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The value cost models give a symbol (`Dim::estimate`): a sequence of 128
/// tokens is what the benchmarks measure, and a batch that large ranks the
/// same kernels first.
pub const NOMINAL_SYMBOL_VALUE: usize = 128;

/// Known sizes as dims (an attribute built from a known shape).
pub fn dims_of(sizes: &[usize]) -> Vec<Dim> {
    sizes.iter().map(|&d| Dim::new(d)).collect()
}

/// Known integers as dims (slice bounds), `None` past ±2^62.
pub fn dims_of_ints(ints: &[i64]) -> Option<Vec<Dim>> {
    ints.iter().map(|&v| Dim::int(v)).collect()
}

/// Shapes written for people: `[batch, sequence*64]`.
pub fn shape_text(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// The known sizes of a shape, or `None` if any dim is symbolic.
pub fn known_shape(shape: &[Dim]) -> Option<Vec<usize>> {
    shape.iter().map(|d| d.size()).collect()
}

/// The product of a shape's dims.
pub fn product(shape: &[Dim]) -> Result<Dim, DimOverflow> {
    shape.iter().try_fold(Dim::new(1), |acc, &d| acc.checked_mul(d))
}

/// The sizes of an attribute in a bound graph (`Type::sizes` explains
/// why a symbolic dim there is a pipeline bug).
pub fn bound_sizes(dims: &[Dim]) -> Vec<usize> {
    known_shape(dims).unwrap_or_else(|| panic!("{} is symbolic where a bound graph was expected", shape_text(dims)))
}

/// The integers of an attribute in a bound graph (slice bounds).
pub fn bound_ints(dims: &[Dim]) -> Vec<i64> {
    dims.iter()
        .map(|d| d.known().unwrap_or_else(|| panic!("{d} is symbolic where a bound graph was expected")))
        .collect()
}

/// The phrase every error that comes from a dim being symbolic (rather
/// than from the model) ends with: callers that can give the dims values
/// and try again (`needs_bound_dims`) look for it.
pub const BIND_DIMS_HINT: &str = "(give the dims values with --dim)";

/// Whether an error message says a symbolic dim is what stopped the work.
pub fn needs_bound_dims(message: &str) -> bool {
    message.contains(BIND_DIMS_HINT)
}

/// Values of symbols, by name.
pub type Bindings = std::collections::BTreeMap<String, usize>;

/// Works out the symbols' values from the shapes of a call's inputs:
/// `(input name, declared dims, given shape)` each. A dim that is one symbol
/// gives its value; one that is an expression (`past_sequence + sequence`)
/// is checked against the others, or gives the one symbol in it not yet
/// known when the expression is affine in it. Errors name the input, the
/// axis and what disagrees.
pub fn solve_bindings(inputs: &[(&str, &[Dim], &[usize])]) -> Result<Bindings, String> {
    let mut values = Bindings::new();
    for (name, declared, given) in inputs {
        if declared.len() != given.len() {
            return Err(format!(
                "input `{name}` has rank {} but the model declares {}",
                given.len(),
                shape_text(declared)
            ));
        }
    }
    let value_of = |values: &Bindings, s: &str| values.get(s).map(|&v| v as i64);
    loop {
        let mut progress = false;
        for (name, declared, given) in inputs {
            for (axis, (&d, &g)) in declared.iter().zip(given.iter()).enumerate() {
                let unknown: Vec<String> = d.symbols().into_iter().filter(|s| !values.contains_key(s)).collect();
                match unknown.as_slice() {
                    [] => {
                        let v = d.eval(&|s| value_of(&values, s))?;
                        if v != g as i64 {
                            let at =
                                if d.is_known() { String::new() } else { format!(" ({d} = {v} from the other dims)") };
                            return Err(format!(
                                "input `{name}` has {g} at axis {axis} but the model declares {}{at}",
                                shape_text(declared)
                            ));
                        }
                    }
                    [s] => {
                        // f(x) = a x + b along the unknown symbol, if affine.
                        let at = |x: i64| d.eval(&|t| if t == s { Some(x) } else { value_of(&values, t) });
                        let (f0, f1, f2) = (at(0)?, at(1)?, at(2)?);
                        let a = f1 - f0;
                        if a != 0 && f2 - f1 == a && (g as i64 - f0) % a == 0 && (g as i64 - f0) / a >= 0 {
                            values.insert(s.clone(), ((g as i64 - f0) / a) as usize);
                            progress = true;
                        }
                    }
                    _ => {}
                }
            }
        }
        if !progress {
            break;
        }
    }
    for (name, declared, _) in inputs {
        for (axis, d) in declared.iter().enumerate() {
            if let Some(s) = d.symbols().into_iter().find(|s| !values.contains_key(s)) {
                return Err(format!(
                    "input `{name}`: the size of `{s}` (in {d}, axis {axis}) cannot be worked out from the inputs' shapes"
                ));
            }
        }
    }
    Ok(values)
}

/// Every symbol a shape depends on, sorted, each once.
pub fn shape_symbols(shape: &[Dim]) -> Vec<String> {
    let mut out: Vec<String> = shape.iter().flat_map(|d| d.symbols()).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dim {
        Dim::parse(s).unwrap()
    }

    #[test]
    fn canonical_forms_compare_equal() {
        assert_eq!(d("sequence + sequence"), d("2*sequence"));
        assert_eq!(d("batch*sequence*64"), d("64*sequence*batch"));
        assert_eq!(d("(past + sequence) - past"), d("sequence"));
        assert_eq!(d("sequence - sequence"), Dim::new(0));
        assert_ne!(d("batch"), d("sequence"));
        assert_eq!(d("3*4"), Dim::new(12));
        assert!(d("batch").known().is_none());
    }

    #[test]
    fn prints_and_parses_back() {
        for s in
            ["batch", "batch*sequence*64", "past_sequence + sequence", "sequence - 1", "-sequence + 3", "2*a*a + b"]
        {
            let x = d(s);
            assert_eq!(d(&x.to_string()), x, "{s} printed as {x}");
        }
        assert_eq!(d("past_sequence + sequence").to_string(), "past_sequence + sequence");
        assert_eq!(d("sequence*batch*64").to_string(), "64*batch*sequence");
        let opaque = Dim::from_dim_param("batch size");
        assert_eq!(opaque.to_string(), "\"batch size\"");
        assert_eq!(Dim::from_dim_param("unk__3"), Dim::symbol("unk__3"));
    }

    #[test]
    fn exact_division() {
        assert_eq!(d("batch*sequence*64").div_exact(Dim::new(64)), Some(d("batch*sequence")));
        assert_eq!(d("batch*sequence*64").div_exact(d("sequence")), Some(d("64*batch")));
        assert_eq!(d("2*batch + 4").div_exact(Dim::new(2)), Some(d("batch + 2")));
        assert_eq!(d("batch + 1").div_exact(Dim::new(2)), None);
        assert_eq!(d("batch + sequence").div_exact(d("batch + sequence")), Some(Dim::new(1)));
        assert_eq!(d("batch*sequence").div_exact(d("past")), None);
        assert_eq!(Dim::new(12).div_exact(Dim::new(0)), None);
        // By a sum: a head merge over `past + sequence` keys, and inexact ones.
        let keys = d("16*past + 16*sequence");
        assert_eq!(d("64*batch*past + 64*batch*sequence").div_exact(keys), Some(d("4*batch")));
        assert_eq!(
            d("past*past + 2*past*sequence + sequence*sequence").div_exact(d("past + sequence")),
            Some(d("past + sequence"))
        );
        assert_eq!(d("batch*past + batch*sequence + 1").div_exact(d("past + sequence")), None);
        assert_eq!(d("batch*past + sequence").div_exact(d("past + sequence")), None);
        assert_eq!(d("past + sequence").div_exact(d("2*past + 2*sequence")), None);
    }

    #[test]
    fn evaluates_and_substitutes() {
        let x = d("batch*sequence*64 + past - 1");
        let env = |s: &str| match s {
            "batch" => Some(2),
            "sequence" => Some(7),
            "past" => Some(0),
            _ => None,
        };
        assert_eq!(x.eval(&env), Ok(2 * 7 * 64 - 1));
        assert!(x.eval(&|_| None).unwrap_err().contains("has no value"));
        let partial = x.substitute(&|s| (s == "batch").then_some(2)).unwrap();
        assert_eq!(partial, d("128*sequence + past - 1"));
        assert_eq!(x.symbols(), vec!["batch", "past", "sequence"]);
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let big = Dim::new(1 << 40);
        assert_eq!(big.checked_mul(big), Err(DimOverflow));
        assert_eq!(
            d("batch").checked_mul(Dim::new(1 << 40)).and_then(|x| x.checked_mul(Dim::new(1 << 40))),
            Err(DimOverflow)
        );
        assert_eq!(Dim::int(-5).unwrap().known(), Some(-5));
        assert_eq!(Dim::int(-5).unwrap().size(), None);
    }

    #[test]
    fn sign_is_proved_only_when_it_holds_everywhere() {
        assert_eq!(d("batch*sequence + 1").is_nonneg(), Some(true));
        assert_eq!(d("sequence - 1").is_nonneg(), None);
        assert_eq!(Dim::int(-1).unwrap().is_nonneg(), Some(false));
    }

    #[test]
    fn bindings_come_from_the_inputs_shapes() {
        let ids = [d("batch"), d("sequence")];
        let mask = [d("batch"), d("past_sequence + sequence")];
        let past = [d("batch"), Dim::new(2), d("past_sequence"), Dim::new(16)];
        // The mask's compound dim gives past_sequence once sequence is known.
        let b = solve_bindings(&[("input_ids", &ids, &[2, 1]), ("attention_mask", &mask, &[2, 8])]).unwrap();
        assert_eq!(b.get("past_sequence"), Some(&7));
        assert_eq!(b.get("sequence"), Some(&1));
        let e = solve_bindings(&[
            ("input_ids", &ids, &[2, 1]),
            ("attention_mask", &mask, &[2, 8]),
            ("past", &past, &[2, 2, 6, 16]),
        ])
        .unwrap_err();
        assert!(e.contains("input `past` has 6 at axis 2") || e.contains("input `attention_mask` has 8"), "{e}");
        let e = solve_bindings(&[("input_ids", &ids, &[2, 1, 1])]).unwrap_err();
        assert!(e.contains("rank 3"), "{e}");
        let e = solve_bindings(&[("x", &[Dim::new(4)], &[5])]).unwrap_err();
        assert!(e.contains("has 5 at axis 0"), "{e}");
        let e = solve_bindings(&[("x", &[d("a*b")], &[6])]).unwrap_err();
        assert!(e.contains("cannot be worked out"), "{e}");
    }
}
