//! The IR's text format: one line per node, round-tripped by `print` and `parse`.
//!
//! ```text
//! v0: f32[1,4] = input{name="x"}
//! v1: f32[4] = const [1.0, 2.0, 3.0, 4.0]
//! v2: f32[1,4] = add v0, v1  # onnx_node_name
//! output "y" = v2
//! ```
//!
//! A printed graph parses back to the same graph, so passes and backends can
//! be tested text in, text out. Large constants can be elided for reading
//! (`const <4096 values>`); an elided graph does not parse.

use crate::dim::Dim;
use crate::dtype::{DType, Type};
use crate::graph::{Graph, ValueId};
use crate::op::{AttrMap, AttrTok, Op};
use crate::tensor::{Data, Tensor};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

/// How to print constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Constants {
    /// Every value, so the text parses back exactly.
    Full,
    /// Constants with more than this many elements print as `<N values>`.
    ElideOver(usize),
}

pub fn print(g: &Graph) -> String {
    print_with(g, Constants::Full)
}

pub fn print_with(g: &Graph, consts: Constants) -> String {
    let mut out = String::new();
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(e) => return format!("# cannot print: {e}\n"),
    };
    let mut nodes: Vec<_> = g.inputs().iter().map(|&v| g.producer(v)).collect();
    nodes.extend(order.into_iter().filter(|n| !matches!(g.node(*n).op, Op::Input { .. })));
    for n in nodes {
        let node = g.node(n);
        for (i, v) in node.outputs.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{v}: {}", g.ty(*v));
        }
        out.push_str(" = ");
        out.push_str(node.op.name());
        match &node.op {
            Op::Const(t) => {
                out.push(' ');
                write_const(&mut out, t, consts);
            }
            op => op.write_attrs(&mut out),
        }
        for (i, v) in node.inputs.iter().enumerate() {
            out.push_str(if i == 0 { " " } else { ", " });
            let _ = write!(out, "{v}");
        }
        if !node.label.is_empty() && !matches!(node.op, Op::Input { .. }) {
            let _ = write!(out, "  # {}", node.label.replace('\n', " "));
        }
        out.push('\n');
    }
    for (name, v) in g.outputs() {
        let _ = writeln!(out, "output {name:?} = {v}");
    }
    out
}

fn write_const(out: &mut String, t: &Tensor, consts: Constants) {
    if let Constants::ElideOver(limit) = consts {
        if t.numel() > limit {
            let _ = write!(out, "<{} values>", t.numel());
            return;
        }
    }
    out.push('[');
    macro_rules! list {
        ($v:expr) => {
            for (i, x) in $v.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{x:?}");
            }
        };
    }
    crate::dispatch!(t.data(), v: _T => list!(v));
    out.push(']');
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Num(String),
    Str(String),
    Punct(char),
}

fn lex(line: &str) -> Result<Vec<Tok>, String> {
    let cs: Vec<char> = line.chars().collect();
    let mut i = 0;
    let mut toks = Vec::new();
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            break;
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match cs.get(i) {
                    None => return Err("unterminated string".into()),
                    Some('"') => break,
                    Some('\\') => {
                        i += 1;
                        match cs.get(i) {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some('r') => s.push('\r'),
                            Some('0') => s.push('\0'),
                            Some('u') => {
                                // `\u{hex}` as Rust's Debug writes it.
                                let close = cs[i..].iter().position(|&c| c == '}').ok_or("bad \\u escape")? + i;
                                if close < i + 2 {
                                    return Err("bad \\u escape".into());
                                }
                                let hex: String = cs[i + 2..close].iter().collect();
                                let code = u32::from_str_radix(&hex, 16).map_err(|_| "bad \\u escape")?;
                                s.push(char::from_u32(code).ok_or("bad \\u escape")?);
                                i = close;
                            }
                            Some(&o) => s.push(o),
                            None => return Err("unterminated string".into()),
                        }
                    }
                    Some(&o) => s.push(o),
                }
                i += 1;
            }
            i += 1;
            toks.push(Tok::Str(s));
        } else if c.is_ascii_digit() || (c == '-' && cs.get(i + 1).is_some_and(|d| d.is_ascii_digit() || *d == 'i')) {
            let start = i;
            i += 1;
            while i < cs.len() && (cs[i].is_ascii_alphanumeric() || matches!(cs[i], '.' | '+' | '-' | '_')) {
                // A sign inside a number only follows an exponent marker.
                if matches!(cs[i], '+' | '-') && !matches!(cs[i - 1], 'e' | 'E') {
                    break;
                }
                i += 1;
            }
            toks.push(Tok::Num(cs[start..i].iter().collect()));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                i += 1;
            }
            toks.push(Tok::Ident(cs[start..i].iter().collect()));
        } else if ":,={}[]<>+*()".contains(c) || c == '-' {
            // `+ * ( ) -` appear in symbolic dims: `f32[batch, past + sequence - 1]`.
            toks.push(Tok::Punct(c));
            i += 1;
        } else {
            return Err(format!("unexpected character `{c}`"));
        }
    }
    Ok(toks)
}

struct Cursor {
    toks: Vec<Tok>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Result<Tok, String> {
        let t = self.toks.get(self.pos).cloned().ok_or("unexpected end of line")?;
        self.pos += 1;
        Ok(t)
    }
    fn punct(&mut self, c: char) -> Result<(), String> {
        match self.next()? {
            Tok::Punct(p) if p == c => Ok(()),
            other => Err(format!("expected `{c}`, found {other:?}")),
        }
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        match self.next()? {
            Tok::Ident(s) => Ok(s),
            other => Err(format!("expected a name, found {other:?}")),
        }
    }
    fn usize(&mut self) -> Result<usize, String> {
        match self.next()? {
            Tok::Num(s) => s.parse().map_err(|_| format!("`{s}` is not a dimension")),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
    /// A dim of a type: a number, or the tokens of a symbolic expression up
    /// to the next `,` or `]`.
    fn dim(&mut self) -> Result<Dim, String> {
        if let Some(Tok::Num(_)) = self.peek() {
            if matches!(self.toks.get(self.pos + 1), Some(Tok::Punct(',' | ']'))) {
                let v = self.usize()?;
                // A known dim holds values below 2^62 (`Dim::new` asserts it).
                return i64::try_from(v).ok().and_then(Dim::int).ok_or_else(|| format!("dim {v} is too large"));
            }
        }
        let mut text = String::new();
        let mut depth = 0;
        loop {
            match self.peek() {
                Some(Tok::Punct(',' | ']')) if depth == 0 => break,
                None => return Err("unterminated shape".into()),
                _ => {}
            }
            match self.next()? {
                Tok::Ident(s) | Tok::Num(s) => text.push_str(&s),
                Tok::Str(s) => text.push_str(&format!("{s:?}")),
                Tok::Punct(c) => {
                    depth += (c == '(') as i32 - (c == ')') as i32;
                    text.push(c);
                }
            }
            text.push(' ');
        }
        let d = Dim::parse(&text).ok_or_else(|| format!("`{}` is not a dimension", text.trim()))?;
        // `1 - 2` is an expression the algebra reads, but no size.
        match d.known() {
            Some(n) if n < 0 => Err(format!("`{}` is a negative dimension", text.trim())),
            _ => Ok(d),
        }
    }
    fn ty(&mut self) -> Result<Type, String> {
        let dtype: DType = self.ident()?.parse()?;
        self.punct('[')?;
        let mut shape = Vec::new();
        if !self.eat(']') {
            loop {
                shape.push(self.dim()?);
                if self.eat(']') {
                    break;
                }
                self.punct(',')?;
            }
        }
        Ok(Type::new(dtype, shape))
    }
    fn attr_tok(&mut self) -> Result<AttrTok, String> {
        match self.next()? {
            Tok::Num(s) => Ok(AttrTok::Num(s)),
            Tok::Ident(s) => Ok(AttrTok::Ident(s)),
            Tok::Str(s) => Ok(AttrTok::Str(s)),
            Tok::Punct('[') => {
                let mut xs = Vec::new();
                if !self.eat(']') {
                    loop {
                        xs.push(self.attr_tok()?);
                        if self.eat(']') {
                            break;
                        }
                        self.punct(',')?;
                    }
                }
                Ok(AttrTok::List(xs))
            }
            other => Err(format!("expected an attribute value, found {other:?}")),
        }
    }
}

/// Parses the text format. Errors name the line.
pub fn parse(text: &str) -> Result<Graph, String> {
    let mut g = Graph::new();
    let mut names: HashMap<String, ValueId> = HashMap::new();
    for (lineno, line) in text.lines().enumerate() {
        let label = line.split_once("  # ").map(|(_, l)| l.trim().to_string()).unwrap_or_default();
        parse_line(&mut g, &mut names, line, label).map_err(|e| format!("line {}: {e}", lineno + 1))?;
    }
    crate::verify::verify(&g).map_err(|e| e.to_string())?;
    Ok(g)
}

fn parse_line(g: &mut Graph, names: &mut HashMap<String, ValueId>, line: &str, label: String) -> Result<(), String> {
    let toks = lex(line)?;
    if toks.is_empty() {
        return Ok(());
    }
    let mut c = Cursor { toks, pos: 0 };
    let lookup = |names: &HashMap<String, ValueId>, n: &str| {
        names.get(n).copied().ok_or_else(|| format!("`{n}` is not defined"))
    };
    if c.peek() == Some(&Tok::Ident("output".into())) {
        c.next()?;
        let Tok::Str(name) = c.next()? else {
            return Err("expected the output's name as a string".into());
        };
        c.punct('=')?;
        let v = c.ident()?;
        g.set_output(&name, lookup(names, &v)?);
        return Ok(());
    }
    let mut defs = Vec::new();
    loop {
        let name = c.ident()?;
        c.punct(':')?;
        defs.push((name, c.ty()?));
        if c.eat('=') {
            break;
        }
        c.punct(',')?;
    }
    let opname = c.ident()?;
    let op = if opname == "const" {
        let ty = &defs.first().ok_or("const defines no value")?.1;
        if c.eat('<') {
            return Err("an elided constant cannot be parsed; print with Constants::Full".into());
        }
        let AttrTok::List(items) = c.attr_tok()? else {
            return Err("expected the constant's values".into());
        };
        Op::Const(Arc::new(const_from_tokens(ty, &items)?))
    } else {
        let mut attrs = Vec::new();
        if c.eat('{') && !c.eat('}') {
            loop {
                let k = c.ident()?;
                c.punct('=')?;
                attrs.push((k, c.attr_tok()?));
                if c.eat('}') {
                    break;
                }
                c.punct(',')?;
            }
        }
        Op::from_text(&opname, AttrMap(attrs))?
    };
    let mut inputs = Vec::new();
    while c.peek().is_some() {
        let n = c.ident()?;
        inputs.push(lookup(names, &n)?);
        if c.peek().is_some() {
            c.punct(',')?;
        }
    }
    let types: Vec<Type> = defs.iter().map(|(_, t)| t.clone()).collect();
    let outs = g.insert_typed(op, inputs, types, label);
    for ((name, _), v) in defs.into_iter().zip(outs) {
        if names.insert(name.clone(), v).is_some() {
            return Err(format!("`{name}` is defined twice"));
        }
    }
    Ok(())
}

fn const_from_tokens(ty: &Type, items: &[AttrTok]) -> Result<Tensor, String> {
    let n = ty.checked_numel().ok_or_else(|| format!("a constant of type {ty} needs a known, bounded shape"))?;
    if items.len() != n {
        return Err(format!("constant of type {ty} needs {n} values, found {}", items.len()));
    }
    let words: Vec<String> = items
        .iter()
        .map(|t| match t {
            AttrTok::Num(s) | AttrTok::Ident(s) => Ok(s.clone()),
            other => Err(format!("bad constant value {other:?}")),
        })
        .collect::<Result<_, String>>()?;
    macro_rules! parse_all {
        ($T:ty, $V:ident) => {
            Data::$V(
                words
                    .iter()
                    .map(|w| w.parse::<$T>().map_err(|_| format!("`{w}` is not a {}", stringify!($T))))
                    .collect::<Result<_, _>>()?,
            )
        };
    }
    let data = match ty.dtype {
        DType::F32 => parse_all!(f32, F32),
        DType::F64 => parse_all!(f64, F64),
        DType::F16 => parse_all!(half::f16, F16),
        DType::BF16 => parse_all!(half::bf16, BF16),
        DType::I8 => parse_all!(i8, I8),
        DType::I16 => parse_all!(i16, I16),
        DType::I32 => parse_all!(i32, I32),
        DType::I64 => parse_all!(i64, I64),
        DType::U8 => parse_all!(u8, U8),
        DType::U16 => parse_all!(u16, U16),
        DType::U32 => parse_all!(u32, U32),
        DType::U64 => parse_all!(u64, U64),
        DType::Bool => parse_all!(bool, Bool),
    };
    Tensor::try_new(ty.known_shape().ok_or("a constant's shape must be known")?, data)
}

/// An op's attributes as compact text (`{axis=2,epsilon=1e-5}`, or empty
/// for an op without attributes): a single token, for e-graph leaves.
pub fn attrs_text(op: &Op) -> String {
    let mut s = String::new();
    op.write_attrs(&mut s);
    s.replace(", ", ",")
}

/// The op `name` with attributes in the form `attrs_text` writes. `const`
/// and `input` ops carry data, not attributes, and are not built here.
pub fn op_from_parts(name: &str, attrs: &str) -> Result<Op, String> {
    let mut c = Cursor { toks: lex(attrs)?, pos: 0 };
    let mut list = Vec::new();
    if c.eat('{') && !c.eat('}') {
        loop {
            let k = c.ident()?;
            c.punct('=')?;
            list.push((k, c.attr_tok()?));
            if c.eat('}') {
                break;
            }
            c.punct(',')?;
        }
    }
    if c.peek().is_some() {
        return Err(format!("trailing text after the attributes of `{name}`"));
    }
    Op::from_text(name, AttrMap(list))
}
