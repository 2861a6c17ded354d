//! The bodies of Egret's fuzz targets, in one plain Rust file.
//!
//! `fuzz/fuzz_targets/*.rs` hand libFuzzer's inputs to these functions
//! (`cargo fuzz run TARGET`, see `tools/fuzz.sh`), and `tests/fuzz_corpus.rs`
//! in the main crate includes this file (`#[path]`) and replays every file of
//! the committed corpora (`fuzz/corpus/TARGET/`) through them under plain
//! `cargo test`: no libFuzzer, no nightly. It may therefore use only crates
//! the main crate's tests have: `egret`, `onnx_protobuf`, `protobuf` and
//! `arbitrary`.
//!
//! - `import_bytes`: any bytes as an ONNX model, through the importer
//!   (`egret::frontend::import_bytes`, what a model held in memory goes
//!   through) and IR verification, and as a file through `import_file`
//!   (which walks the wire format itself), which must agree. Errors are
//!   fine; a panic is a finding.
//! - `ir_text`: any bytes as UTF-8, through the IR text parser; a graph that
//!   parses must verify and print to text that parses back, and that text,
//!   once printed from a parse (value ids renumbered), prints back to itself.
//! - `compile_run`: the bytes drive a generator (`arbitrary::Unstructured`)
//!   of small ONNX models that are mostly well formed, in the families
//!   Egret compiles, with hostile sizes, attributes, indices, initializer
//!   lengths and external-data entries mixed in. A model that imports is
//!   compiled and run on the reference evaluator and the CPU backend with
//!   random inputs of its declared shapes, and where both run, their
//!   outputs must agree within a loose tolerance wherever both are finite.
//!   Sizes are bounded (at most 4,096 elements a tensor and 8 nodes, unless
//!   a size is deliberately absurd), so one input runs in well under a second.

#![allow(dead_code)]

use arbitrary::Unstructured;
use egret::frontend::{import_bytes, ImportOptions};
use egret::ir::{DType, Data, Tensor};
use egret::{Backend, CompileOptions};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use protobuf::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------
// The scratch folder: the "model's folder" external data resolves in.

/// Floats in `data.bin`, the external-data file every model may point at.
const DATA_FLOATS: usize = 4096;

/// A folder per process holding `data.bin` (4,096 small f32 values),
/// `sub/data.bin` (the same), and links that lead out of it (`escape` to
/// `/etc`, `zero` to `/dev/zero`), which external data must not follow.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("egret-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(dir.join("sub"));
        let bytes: Vec<u8> =
            (0..DATA_FLOATS).flat_map(|i| ((((i * 37) % 101) as f32 - 50.0) / 50.0).to_le_bytes()).collect();
        let _ = std::fs::write(dir.join("data.bin"), &bytes);
        let _ = std::fs::write(dir.join("sub").join("data.bin"), &bytes);
        #[cfg(unix)]
        {
            let _ = std::os::unix::fs::symlink("/etc", dir.join("escape"));
            let _ = std::os::unix::fs::symlink("/dev/zero", dir.join("zero"));
        }
        dir
    })
}

/// Removes this process's scratch folder (the corpus test calls it at the end).
pub fn remove_scratch_dir() {
    let _ = std::fs::remove_dir_all(scratch_dir());
}

// ---------------------------------------------------------------------------
// import_bytes

pub fn import_bytes_target(data: &[u8]) {
    let dir = scratch_dir();
    let path = dir.join(format!("fuzz-{:?}.onnx", std::thread::current().id()).replace(['(', ')'], ""));
    let from_bytes = import_bytes(data, Some(dir), &path, &ImportOptions::default());
    if let Ok(imported) = &from_bytes {
        if let Err(e) = egret::ir::verify(&imported.graph) {
            panic!("the importer returned a graph that fails verification: {e}");
        }
    }
    // The same bytes as a file: `import_file` walks the wire format itself
    // and reads `raw_data` from the file, so it must import what the bytes
    // do, to the same graph (printed with large constants elided).
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let from_file = egret::frontend::import_file(&path, &ImportOptions::default());
    let _ = std::fs::remove_file(&path);
    match (&from_bytes, &from_file) {
        (Ok(a), Ok(b)) => {
            let text = |g| egret::ir::text::print_with(g, egret::ir::text::Constants::ElideOver(64));
            assert_eq!(text(&a.graph), text(&b.graph), "a model imports differently from bytes and from a file");
        }
        (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) => panic!("a model imports from bytes but not from a file: {e}"),
        (Err(e), Ok(_)) => panic!("a model imports from a file but not from bytes: {e}"),
    }
}

// ---------------------------------------------------------------------------
// ir_text

pub fn ir_text_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(g) = egret::ir::text::parse(text) else { return };
    if let Err(e) = egret::ir::verify(&g) {
        panic!("a parsed graph fails verification: {e}\n--- text ---\n{text}");
    }
    // Value ids are renumbered in the order lines come (inputs print first),
    // so the text of a graph printed from a parse is a fixed point: it
    // parses, and prints back to itself.
    let printed = egret::ir::text::print(&g);
    let reparse = |text: &str| match egret::ir::text::parse(text) {
        Ok(g) => egret::ir::text::print(&g),
        Err(e) => panic!("printed text does not parse back: {e}\n--- input ---\n{text}\n--- printed ---\n{printed}"),
    };
    let once = reparse(&printed);
    let twice = reparse(&once);
    assert_eq!(once, twice, "printing a re-parsed graph changed its text\n--- input ---\n{text}");
}

// ---------------------------------------------------------------------------
// compile_run: counters

/// How far `compile_run` inputs went (since the process started).
pub struct Counters {
    pub inputs: AtomicU64,
    /// The generated model imported.
    pub imported: AtomicU64,
    /// Compiled and run on both backends (each may have refused).
    pub reached_compile_run: AtomicU64,
    /// Both backends compiled and ran it.
    pub both_ran: AtomicU64,
    /// ... and outputs were compared value by value.
    pub compared: AtomicU64,
    /// One backend ran it and the other refused (printed, not asserted).
    pub one_sided: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    inputs: AtomicU64::new(0),
    imported: AtomicU64::new(0),
    reached_compile_run: AtomicU64::new(0),
    both_ran: AtomicU64::new(0),
    compared: AtomicU64::new(0),
    one_sided: AtomicU64::new(0),
};

impl Counters {
    pub fn summary(&self) -> String {
        let n = self.inputs.load(Ordering::Relaxed);
        let pct = |x: &AtomicU64| {
            let x = x.load(Ordering::Relaxed);
            format!("{x} ({:.1}%)", 100.0 * x as f64 / n.max(1) as f64)
        };
        format!(
            "compile_run: {n} inputs; imported {}; reached compile-and-run {}; both backends ran {}; compared {}; one backend only {}",
            pct(&self.imported),
            pct(&self.reached_compile_run),
            pct(&self.both_ran),
            pct(&self.compared),
            pct(&self.one_sided),
        )
    }
}

/// One-sided outcomes printed so far (the first few, for a person to read).
static ONE_SIDED_PRINTED: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------
// compile_run: the model generator

const F32: i32 = 1;
const U8: i32 = 2;
const I8: i32 = 3;
const I32: i32 = 6;
const I64: i32 = 7;
const BOOL: i32 = 9;
const F16: i32 = 10;
const F64: i32 = 11;

/// Sizes a well-formed dim takes.
const DIMS: &[usize] = &[1, 2, 3, 4, 5, 7, 8, 16, 17, 32, 64];
/// The most elements a well-formed tensor has.
const MAX_NUMEL: usize = 4096;
/// The most nodes a model has (besides `Constant`s and `Shape`s it needs).
const MAX_NODES: usize = 8;
/// Integers that a hostile size, axis, index or bound takes: none of them is
/// a tensor that fits in memory and also passes `ir::MAX_ELEMENTS`.
const HOSTILE_INTS: &[i64] = &[0, -1, -2, -7, 1 << 40, i64::MAX, i64::MIN, i64::MIN + 1, 3 << 60, 1 << 62];

#[derive(Clone, Debug)]
struct Val {
    name: String,
    elem: i32,
    /// The shape a well-formed model gives it (hostile choices upstream may
    /// make the importer disagree, which is fine).
    shape: Vec<usize>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A graph input as generated: its value-info dims and the shape to run with.
#[derive(Clone, Debug)]
struct InputSpec {
    name: String,
    elem: i32,
    shape: Vec<usize>,
    /// Declared with a hostile dim: nothing can be run with it.
    hostile: bool,
    /// For an integer input read as indices: the values a well-formed run
    /// uses are below this.
    index_bound: Option<usize>,
}

struct Gen<'a, 'b> {
    u: &'b mut Unstructured<'a>,
    /// 0: no hostile choices; up to 8: about `level * 1.6%` of choices hostile.
    level: u8,
    g: GraphProto,
    vals: Vec<Val>,
    inputs: Vec<InputSpec>,
    opset: i64,
    counter: usize,
    /// Symbolic dims declared, and whether compile binds them (`--dim`).
    symbols: Vec<(String, usize, bool)>,
    /// A float went through a comparison or a cast to an integer: values
    /// that depend on float rounding at a threshold may legitimately
    /// differ between backends, so values are not compared.
    fragile: bool,
    /// Some initializer reads the scratch folder's `data.bin`.
    external: bool,
}

type R<T> = arbitrary::Result<T>;

impl<'a, 'b> Gen<'a, 'b> {
    fn byte(&mut self) -> u8 {
        self.u.arbitrary::<u8>().unwrap_or(0)
    }

    /// A number in `0..n` (0 once the input runs out).
    fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let x: u32 = self.u.arbitrary().unwrap_or(0);
        x as usize % n
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// True for a hostile choice (never once the input runs out).
    fn hostile(&mut self) -> bool {
        self.level > 0 && self.byte() >= 255 - 4 * self.level
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    fn hostile_int(&mut self) -> i64 {
        if self.flag() {
            self.pick(HOSTILE_INTS)
        } else {
            self.u.arbitrary::<i64>().unwrap_or(-1)
        }
    }

    fn fresh(&mut self, stem: &str) -> String {
        self.counter += 1;
        format!("{stem}{}", self.counter)
    }

    fn seed(&mut self) -> u64 {
        self.u.arbitrary::<u64>().unwrap_or(0)
    }

    /// A well-formed shape of rank 1 to 4 within `MAX_NUMEL`.
    fn shape(&mut self) -> Vec<usize> {
        let rank = 1 + self.below(4);
        let mut s = Vec::with_capacity(rank);
        for _ in 0..rank {
            let d = self.pick(DIMS);
            s.push(if numel(&s) * d > MAX_NUMEL { 1 } else { d });
        }
        s
    }

    /// An axis of a rank-`rank` tensor, sometimes negative, sometimes hostile.
    fn axis(&mut self, rank: usize) -> i64 {
        if self.hostile() {
            return match self.below(3) {
                0 => rank as i64,
                1 => -(rank as i64) - 1,
                _ => self.hostile_int(),
            };
        }
        let a = self.below(rank.max(1)) as i64;
        if self.flag() {
            a - rank as i64
        } else {
            a
        }
    }

    // ----- protobuf pieces

    fn node(&mut self, op: &str, inputs: Vec<String>, outputs: Vec<String>, attrs: Vec<AttributeProto>) {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = format!("{op}_{}", self.g.node.len());
        n.input = inputs;
        n.output = outputs;
        n.attribute = attrs;
        self.g.node.push(n);
    }

    /// A node with one output, tracked as a value.
    fn emit(&mut self, op: &str, inputs: Vec<String>, attrs: Vec<AttributeProto>, elem: i32, shape: Vec<usize>) -> Val {
        let name = self.fresh("t");
        self.node(op, inputs, vec![name.clone()], attrs);
        let v = Val { name, elem, shape };
        self.vals.push(v.clone());
        v
    }

    /// An initializer of `elem` and `shape` with `values` (as f64), stored
    /// in one of ONNX's ways; hostile choices break its length, dims, type
    /// or external-data entry.
    fn initializer(&mut self, elem: i32, shape: &[usize], values: &[f64]) -> String {
        let name = self.fresh("w");
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = elem;
        t.dims = shape.iter().map(|&d| d as i64).collect();
        let mut values = values.to_vec();
        if self.hostile() {
            match self.below(4) {
                0 => {
                    values.pop();
                }
                1 => values.push(1.0),
                2 => {
                    let i = self.below(t.dims.len().max(1));
                    if let Some(d) = t.dims.get_mut(i) {
                        *d = self.pick(HOSTILE_INTS);
                    } else {
                        t.dims.push(self.pick(HOSTILE_INTS));
                    }
                }
                _ => t.data_type = self.pick(&[0, 8, 13, 16, 17, 22, 99, -1]),
            }
        }
        let raw = self.flag();
        match elem {
            F32 if self.external_choice() => {
                self.external = true;
                self.make_external(&mut t, values.len() * 4);
                return self.push_init(t);
            }
            F32 if raw => t.raw_data = values.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            F32 => t.float_data = values.iter().map(|&x| x as f32).collect(),
            I64 if raw => t.raw_data = values.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
            I64 => t.int64_data = values.iter().map(|&x| x as i64).collect(),
            BOOL if raw => t.raw_data = values.iter().map(|&x| (x != 0.0) as u8).collect(),
            BOOL => t.int32_data = values.iter().map(|&x| (x != 0.0) as i32).collect(),
            _ => t.raw_data = values.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        }
        if self.hostile() && !t.raw_data.is_empty() {
            // An odd byte count.
            t.raw_data.pop();
        }
        self.push_init(t)
    }

    fn push_init(&mut self, t: TensorProto) -> String {
        let name = t.name.clone();
        self.g.initializer.push(t);
        name
    }

    fn external_choice(&mut self) -> bool {
        self.byte() >= 224
    }

    /// Points `t` at the scratch folder's `data.bin` (`bytes` of it), or, as a
    /// hostile choice, somewhere it must not read.
    fn make_external(&mut self, t: &mut TensorProto, bytes: usize) {
        t.data_location = DataLocation::EXTERNAL.into();
        let mut location = if self.flag() { "data.bin" } else { "sub/data.bin" }.to_string();
        let max_offset = (DATA_FLOATS * 4).saturating_sub(bytes) / 4;
        let mut offset = (4 * self.below(max_offset + 1)).to_string();
        let mut length = Some(bytes.to_string());
        if self.hostile() {
            match self.below(4) {
                0 => {
                    location = self
                        .pick(&[
                            "../x",
                            "../../../../etc/passwd",
                            "/etc/passwd",
                            "/dev/zero",
                            "sub/../../x",
                            "",
                            "nonexistent.bin",
                            "escape/passwd",
                            "zero",
                            "sub",
                            ".",
                            "data.bin\0x",
                            "./data.bin",
                            "sub/./../data.bin",
                            "//etc/passwd",
                            "C:\\data.bin",
                        ])
                        .to_string()
                }
                1 => {
                    offset = self
                        .pick(&["18446744073709551615", "-1", "abc", "9223372036854775807", "16384", "16383", ""])
                        .to_string()
                }
                2 => {
                    length =
                        Some(self.pick(&["18446744073709551615", "0", "-4", "99999999999", "16388", "x"]).to_string())
                }
                _ => length = None,
            }
        }
        let mut entry = |k: &str, v: &str| {
            let mut e = StringStringEntryProto::new();
            e.key = k.into();
            e.value = v.into();
            t.external_data.push(e);
        };
        entry("location", &location);
        entry("offset", &offset);
        if let Some(l) = length {
            entry("length", &l);
        }
    }

    /// Floats in [-1, 1), a few of them non-finite or large under hostility.
    fn floats(&mut self, n: usize) -> Vec<f64> {
        let mut rng = egret::io::SplitMix::new(self.seed());
        let mut v: Vec<f64> = (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        if n > 0 && self.hostile() {
            let i = self.below(n);
            v[i] = self.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e30, -1e30, 0.0]);
            // Sums over 1e30 differ with their order by more than the
            // values that come out of them.
            self.fragile = true;
        }
        v
    }

    fn f32_init(&mut self, shape: &[usize]) -> Val {
        let values = self.floats(numel(shape));
        let name = self.initializer(F32, shape, &values);
        Val { name, elem: F32, shape: shape.to_vec() }
    }

    /// A 1-D int64 tensor holding `values`: an initializer or a `Constant`.
    fn i64s(&mut self, values: &[i64]) -> String {
        if self.below(4) == 0 {
            let mut t = TensorProto::new();
            t.data_type = I64;
            t.dims = vec![values.len() as i64];
            t.int64_data = values.to_vec();
            let mut a = AttributeProto::new();
            a.name = "value".into();
            a.type_ = AttributeType::TENSOR.into();
            a.t = Some(t).into();
            let name = self.fresh("c");
            self.node("Constant", vec![], vec![name.clone()], vec![a]);
            return name;
        }
        let v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
        let name = self.fresh("w");
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = I64;
        t.dims = vec![values.len() as i64];
        if self.flag() {
            t.raw_data = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        } else {
            t.int64_data = values.to_vec();
        }
        let _ = v;
        self.push_init(t)
    }

    /// Integers as a 1-D i64 list, each hostile now and then.
    fn maybe_hostile_list(&mut self, mut xs: Vec<i64>) -> Vec<i64> {
        if self.hostile() {
            match self.below(3) {
                0 if !xs.is_empty() => {
                    let i = self.below(xs.len());
                    xs[i] = self.hostile_int();
                }
                1 => xs.push(self.hostile_int()),
                _ => {
                    xs.pop();
                }
            }
        }
        xs
    }

    /// A value to read, of an element type `ok` accepts (recent ones more often).
    fn operand(&mut self, ok: impl Fn(&Val) -> bool) -> Option<Val> {
        let cands: Vec<usize> = (0..self.vals.len()).filter(|&i| ok(&self.vals[i])).collect();
        if cands.is_empty() {
            return None;
        }
        let n = cands.len();
        let i = if self.flag() { n - 1 } else { self.below(n) };
        Some(self.vals[cands[i]].clone())
    }

    fn float_operand(&mut self) -> Option<Val> {
        self.operand(|v| v.elem == F32)
    }

    /// A shape that broadcasts into `shape`: a suffix of it, some dims 1.
    fn broadcast_shape(&mut self, shape: &[usize]) -> Vec<usize> {
        let drop = self.below(shape.len() + 1);
        let mut s: Vec<usize> = shape[drop..].to_vec();
        for d in s.iter_mut() {
            if self.below(3) == 0 {
                *d = 1;
            }
        }
        if self.hostile() {
            if s.is_empty() {
                s.push(self.pick(&[0, 3, 9]));
            } else {
                let i = self.below(s.len());
                s[i] += self.pick(&[1, 2, 5]);
            }
        }
        s
    }

    /// A second operand for an elementwise op on `a`: an earlier value that
    /// broadcasts into it, or a new initializer that does.
    fn partner(&mut self, a: &Val, elem: i32) -> Val {
        if self.flag() {
            let shape = a.shape.clone();
            let fits = move |v: &Val| {
                v.elem == elem
                    && v.shape.len() <= shape.len()
                    && v.shape.iter().rev().zip(shape.iter().rev()).all(|(x, y)| x == y || *x == 1)
            };
            if let Some(v) = self.operand(fits) {
                return v;
            }
        }
        let shape = self.broadcast_shape(&a.shape);
        match elem {
            F32 => self.f32_init(&shape),
            BOOL => {
                let mut rng = egret::io::SplitMix::new(self.seed());
                let v: Vec<f64> = (0..numel(&shape)).map(|_| (rng.next_u64() & 1) as f64).collect();
                let name = self.initializer(BOOL, &shape, &v);
                Val { name, elem: BOOL, shape }
            }
            _ => {
                // Integers: small, nonzero unless hostile (an integer Div).
                let mut rng = egret::io::SplitMix::new(self.seed());
                let mut v: Vec<f64> = (0..numel(&shape)).map(|_| (1 + rng.next_u64() % 4) as f64).collect();
                if !v.is_empty() && self.hostile() {
                    let i = self.below(v.len());
                    v[i] = self.pick(&[0.0, -1.0, 1e18]);
                }
                let name = self.initializer(elem, &shape, &v);
                Val { name, elem, shape }
            }
        }
    }

    // ----- inputs

    fn graph_input(&mut self, elem: i32, shape: Vec<usize>, index_bound: Option<usize>) -> Val {
        let name = self.fresh("x");
        let mut dims: Vec<dimension::Value> = shape.iter().map(|&d| dimension::Value::DimValue(d as i64)).collect();
        let mut hostile = false;
        if !dims.is_empty() && self.below(6) == 0 {
            // A symbolic dim, bound at compile time or left to the run.
            let i = self.below(dims.len());
            let sym = format!("s{}", self.symbols.len());
            let bind = self.flag();
            self.symbols.push((sym.clone(), shape[i], bind));
            dims[i] = dimension::Value::DimParam(sym);
        }
        if self.hostile() {
            hostile = true;
            let i = self.below(dims.len().max(1));
            let bad = match self.below(3) {
                0 => dimension::Value::DimValue(self.pick(HOSTILE_INTS)),
                1 => dimension::Value::DimParam(self.pick(&["", "a + ", "-1", "x * x * x", "(", "1e99"]).into()),
                _ => dimension::Value::DimValue(-1),
            };
            if i < dims.len() {
                dims[i] = bad;
            } else {
                dims.push(bad);
            }
        }
        self.g.input.push(value_info_dims(&name, elem, Some(&dims)));
        self.inputs.push(InputSpec { name: name.clone(), elem, shape: shape.clone(), hostile, index_bound });
        let v = Val { name, elem, shape };
        self.vals.push(v.clone());
        v
    }

    // ----- ops

    fn unary(&mut self) -> Option<()> {
        let a = self.float_operand()?;
        let op =
            self.pick(&["Relu", "Neg", "Abs", "Tanh", "Sigmoid", "Exp", "Sqrt", "Erf", "Reciprocal", "Floor", "Log"]);
        if op == "Floor" || op == "Reciprocal" || op == "Log" {
            // A step: rounding on either side of an integer moves it by 1.
            // A pole: a value near zero (a layer norm's output) that two
            // summation orders round apart by 1e-7 comes out of 1/x
            // apart by percents. `log` is as steep there: a product of 64
            // terms that cancelled to 1e-8 came out of it -18.64 on the
            // CPU and -17.90 in the reference (compile_run run 11), both
            // within f32's rounding of the sum.
            self.fragile = true;
        }
        self.emit(op, vec![a.name], vec![], F32, a.shape);
        Some(())
    }

    fn binary(&mut self) -> Option<()> {
        let (a, ops): (Val, &[&str]) = if self.below(5) == 0 {
            (self.operand(|v| v.elem == I64)?, &["Add", "Sub", "Mul", "Div", "Max", "Min"])
        } else {
            (self.float_operand()?, &["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"])
        };
        let op = self.pick(ops);
        let b = self.partner(&a, a.elem);
        let (x, y) = if self.flag() { (a.name.clone(), b.name) } else { (b.name, a.name.clone()) };
        self.emit(op, vec![x, y], vec![], a.elem, a.shape);
        Some(())
    }

    fn compare(&mut self) -> Option<()> {
        let a = self.float_operand()?;
        let op = self.pick(&["Less", "Greater", "Equal", "LessOrEqual", "GreaterOrEqual"]);
        let b = self.partner(&a, F32);
        self.fragile = true;
        self.emit(op, vec![a.name, b.name], vec![], BOOL, a.shape);
        Some(())
    }

    fn matmul(&mut self) -> Option<()> {
        let a = self.float_operand()?;
        let k = *a.shape.last()?;
        let n = self.pick(DIMS);
        let mut out: Vec<usize> = a.shape[..a.shape.len() - 1].to_vec();
        out.push(n);
        if numel(&out) > MAX_NUMEL {
            return None;
        }
        let kb = if self.hostile() { k + 1 + self.below(3) } else { k };
        let b = if self.below(6) == 0 {
            // A vector: the product drops the last axis.
            out.pop();
            self.f32_init(&[kb])
        } else {
            self.f32_init(&[kb, n])
        };
        self.emit("MatMul", vec![a.name, b.name], vec![], F32, out);
        Some(())
    }

    fn gemm(&mut self) -> Option<()> {
        let a = self.operand(|v| v.elem == F32 && v.shape.len() == 2)?;
        let (trans_a, trans_b) = (self.flag(), self.flag());
        let (m, k) = if trans_a { (a.shape[1], a.shape[0]) } else { (a.shape[0], a.shape[1]) };
        let n = self.pick(DIMS);
        if m * n > MAX_NUMEL {
            return None;
        }
        let kb = if self.hostile() { k + 1 } else { k };
        let b = self.f32_init(&if trans_b { [n, kb] } else { [kb, n] });
        let mut inputs = vec![a.name, b.name];
        match self.below(4) {
            0 => {}
            1 => inputs.push(self.f32_init(&[n]).name),
            2 => inputs.push(self.f32_init(&[1, n]).name),
            _ => inputs.push(self.f32_init(&[m, n]).name),
        }
        let mut attrs = vec![];
        if trans_a {
            attrs.push(attr_int("transA", 1));
        }
        if trans_b {
            attrs.push(attr_int("transB", if self.hostile() { 2 } else { 1 }));
        }
        if self.flag() {
            let alpha = self.pick(&[0.5f32, 2.0, -1.0, 0.0]);
            attrs.push(attr_float("alpha", alpha));
        }
        if self.flag() {
            let beta = self.pick(&[0.5f32, 2.0, -1.0, 0.0]);
            attrs.push(attr_float("beta", beta));
        }
        self.emit("Gemm", inputs, attrs, F32, vec![m, n]);
        Some(())
    }

    fn reshape(&mut self) -> Option<()> {
        let a = self.operand(|v| v.elem == F32 || v.elem == I64)?;
        let total = numel(&a.shape);
        // A factorisation of `total` into up to four dims.
        let mut left = total;
        let mut target: Vec<usize> = vec![];
        let rank = 1 + self.below(4);
        for _ in 0..rank - 1 {
            let divs: Vec<usize> =
                if left == 0 { vec![1, 2, 3] } else { (1..=left).filter(|d| left % d == 0).take(16).collect() };
            let d = self.pick(&divs);
            target.push(d);
            left /= d;
        }
        target.push(left);
        let mut spelled: Vec<i64> = target.iter().map(|&d| d as i64).collect();
        if self.flag() {
            let i = self.below(spelled.len());
            spelled[i] = -1;
        }
        if let Some(i) = (0..spelled.len()).find(|&i| a.shape.get(i) == Some(&target[i])) {
            if self.flag() && spelled[i] != -1 {
                spelled[i] = 0;
            }
        }
        let spelled = self.maybe_hostile_list(spelled);
        let shape = if spelled == a.shape.iter().map(|&d| d as i64).collect::<Vec<_>>() && self.flag() {
            // The target read from a `Shape`: a value known at import.
            let s = self.fresh("shape");
            self.node("Shape", vec![a.name.clone()], vec![s.clone()], vec![]);
            s
        } else {
            self.i64s(&spelled)
        };
        let mut attrs = vec![];
        if self.hostile() {
            attrs.push(attr_int("allowzero", self.pick(&[1, 2, -1])));
        }
        self.emit("Reshape", vec![a.name, shape], attrs, a.elem, target);
        Some(())
    }

    fn transpose(&mut self) -> Option<()> {
        let a = self.operand(|v| v.elem != BOOL)?;
        let r = a.shape.len();
        let mut perm: Vec<usize> = (0..r).collect();
        for i in (1..r).rev() {
            let j = self.below(i + 1);
            perm.swap(i, j);
        }
        let mut attrs = vec![];
        let out: Vec<usize>;
        if self.below(4) == 0 {
            out = a.shape.iter().rev().copied().collect();
        } else {
            out = perm.iter().map(|&p| a.shape[p]).collect();
            let spelled = self.maybe_hostile_list(perm.iter().map(|&p| p as i64).collect());
            attrs.push(attr_ints("perm", spelled));
        }
        self.emit("Transpose", vec![a.name], attrs, a.elem, out);
        Some(())
    }

    fn slice(&mut self) -> Option<()> {
        let a = self.operand(|v| v.elem != BOOL && !v.shape.is_empty())?;
        let r = a.shape.len();
        let naxes = 1 + self.below(r);
        let mut axes_all: Vec<usize> = (0..r).collect();
        for i in (1..r).rev() {
            let j = self.below(i + 1);
            axes_all.swap(i, j);
        }
        let mut out = a.shape.clone();
        let (mut starts, mut ends, mut axes, mut steps) = (vec![], vec![], vec![], vec![]);
        for &ax in &axes_all[..naxes] {
            let n = a.shape[ax] as i64;
            let step = self.pick(&[1i64, 1, 1, 2, 3, -1, -2]);
            let pick_bound = |g: &mut Self| -> i64 {
                match g.below(6) {
                    0 => i64::MAX,
                    1 => i64::MIN,
                    2 => -(g.below(n as usize + 2) as i64),
                    _ => g.below(n as usize + 2) as i64,
                }
            };
            let (s, e) = (pick_bound(self), pick_bound(self));
            // ONNX's clamping, to know the output's length.
            let clamp = |x: i64, lo: i64, hi: i64| x.max(lo).min(hi);
            let norm = |x: i64| if x < 0 { x.saturating_add(n) } else { x };
            let len = if step > 0 {
                let (s, e) = (clamp(norm(s), 0, n), clamp(norm(e), 0, n));
                if e > s {
                    (e - s + step - 1) / step
                } else {
                    0
                }
            } else {
                let (s, e) = (clamp(norm(s), 0, n - 1), clamp(norm(e), -1, n - 1));
                if s > e {
                    (s - e + (-step) - 1) / (-step)
                } else {
                    0
                }
            };
            out[ax] = len.max(0) as usize;
            starts.push(s);
            ends.push(e);
            axes.push(if self.flag() { ax as i64 - r as i64 } else { ax as i64 });
            steps.push(step);
        }
        let starts = self.maybe_hostile_list(starts);
        let ends = self.maybe_hostile_list(ends);
        let mut axes = self.maybe_hostile_list(axes);
        let mut steps = self.maybe_hostile_list(steps);
        if self.hostile() {
            if let Some(s) = steps.first_mut() {
                *s = 0;
            }
        }
        if self.hostile() && !axes.is_empty() {
            let a0 = axes[0];
            axes.push(a0);
            steps.push(1);
        }
        let mut inputs = vec![a.name.clone(), self.i64s(&starts), self.i64s(&ends)];
        let with_steps = steps.iter().any(|&s| s != 1) || self.flag();
        if with_steps || self.flag() {
            inputs.push(self.i64s(&axes));
        }
        if with_steps {
            inputs.push(self.i64s(&steps));
        }
        self.emit("Slice", inputs, vec![], a.elem, out);
        Some(())
    }

    fn concat(&mut self) -> Option<()> {
        let a = self.operand(|v| (v.elem == F32 || v.elem == I64) && !v.shape.is_empty())?;
        let r = a.shape.len();
        let ax = self.below(r);
        let mut other = a.shape.clone();
        other[ax] = self.pick(DIMS);
        let mut out = a.shape.clone();
        out[ax] += other[ax];
        if numel(&out) > MAX_NUMEL {
            return None;
        }
        let b = if a.elem == F32 {
            if self.hostile() {
                let i = self.below(r);
                other[i] += 1;
            }
            self.f32_init(&other).name
        } else {
            let vals: Vec<i64> = (0..numel(&other)).map(|i| i as i64 % 3 + 1).collect();
            let v: Vec<f64> = vals.iter().map(|&x| x as f64).collect();
            self.initializer(I64, &other, &v)
        };
        let spelled = if self.flag() { ax as i64 - r as i64 } else { ax as i64 };
        let spelled = if self.hostile() { self.hostile_int() } else { spelled };
        let axis = attr_int("axis", spelled);
        let inputs = if self.flag() { vec![a.name, b] } else { vec![b, a.name] };
        self.emit("Concat", inputs, vec![axis], a.elem, out);
        Some(())
    }

    fn gather(&mut self) -> Option<()> {
        let a = self.operand(|v| (v.elem == F32 || v.elem == I64) && !v.shape.is_empty())?;
        let r = a.shape.len();
        let ax = self.below(r);
        let n = a.shape[ax];
        let ind_shape: Vec<usize> = match self.below(4) {
            0 => vec![],
            1 | 2 => vec![self.pick(&[1, 2, 3, 5])],
            _ => vec![self.pick(&[1, 2]), self.pick(&[2, 3])],
        };
        let mut out: Vec<usize> = a.shape[..ax].to_vec();
        out.extend(&ind_shape);
        out.extend(&a.shape[ax + 1..]);
        if numel(&out) > MAX_NUMEL {
            return None;
        }
        let indices = if self.below(4) == 0 {
            // Indices a graph input carries: their values are the run's.
            self.graph_input(I64, ind_shape.clone(), Some(n)).name
        } else {
            let mut rng = egret::io::SplitMix::new(self.seed());
            let mut v: Vec<f64> =
                (0..numel(&ind_shape)).map(|_| (rng.next_u64() % (2 * n as u64).max(1)) as f64 - n as f64).collect();
            if !v.is_empty() && self.hostile() {
                let i = self.below(v.len());
                v[i] = self.pick(&[n as f64, -(n as f64) - 1.0, 1e18, -1e18]);
            }
            self.initializer(I64, &ind_shape, &v)
        };
        let spelled = if self.flag() { ax as i64 - r as i64 } else { ax as i64 };
        let spelled = if self.hostile() { self.hostile_int() } else { spelled };
        let axis = attr_int("axis", spelled);
        self.emit("Gather", vec![a.name, indices], vec![axis], a.elem, out);
        Some(())
    }

    fn softmax(&mut self) -> Option<()> {
        let a = self.float_operand()?;
        let op = self.pick(&["Softmax", "LogSoftmax"]);
        let mut attrs = vec![];
        if self.flag() {
            let ax = self.axis(a.shape.len());
            attrs.push(attr_int("axis", ax));
        }
        self.emit(op, vec![a.name], attrs, F32, a.shape);
        Some(())
    }

    fn layer_norm(&mut self) -> Option<()> {
        let a = self.operand(|v| v.elem == F32 && !v.shape.is_empty())?;
        let r = a.shape.len();
        let ax = self.below(r);
        let mut norm_shape = a.shape[ax..].to_vec();
        if self.hostile() {
            norm_shape[0] += 1;
        }
        let scale = self.f32_init(&norm_shape).name;
        let mut inputs = vec![a.name, scale];
        if self.flag() {
            inputs.push(self.f32_init(&norm_shape).name);
        }
        let mut attrs = vec![];
        if self.flag() || ax + 1 != r {
            let spelled = if self.flag() { ax as i64 - r as i64 } else { ax as i64 };
            let spelled = if self.hostile() { self.hostile_int() } else { spelled };
            attrs.push(attr_int("axis", spelled));
        }
        if self.flag() {
            let eps = if self.hostile() { self.pick(&[0.0f32, -1.0, f32::NAN, f32::INFINITY]) } else { 1e-5 };
            attrs.push(attr_float("epsilon", eps));
        }
        self.emit("LayerNormalization", inputs, attrs, F32, a.shape);
        Some(())
    }

    fn reduce(&mut self) -> Option<()> {
        let a = self.float_operand()?;
        if a.shape.is_empty() {
            return None;
        }
        let op = self.pick(&["ReduceMean", "ReduceSum", "ReduceMax"]);
        let r = a.shape.len();
        let mut axes: Vec<usize> = (0..r).filter(|_| self.flag()).collect();
        if axes.is_empty() {
            axes.push(self.below(r));
        }
        let keep = self.flag();
        let out: Vec<usize> = if keep {
            a.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect()
        } else {
            a.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
        };
        let spelled: Vec<i64> =
            axes.iter().map(|&x| if self.flag() { x as i64 - r as i64 } else { x as i64 }).collect();
        let spelled = self.maybe_hostile_list(spelled);
        let mut inputs = vec![a.name];
        let mut attrs = vec![];
        // ReduceSum takes its axes as an input from opset 13, the others from 18.
        let as_input = if op == "ReduceSum" { self.opset >= 13 } else { self.opset >= 18 };
        if as_input != self.hostile() {
            inputs.push(self.i64s(&spelled));
        } else {
            attrs.push(attr_ints("axes", spelled));
        }
        if !keep || self.flag() {
            attrs.push(attr_int("keepdims", keep as i64));
        }
        self.emit(op, inputs, attrs, F32, out);
        Some(())
    }

    fn cast(&mut self) -> Option<()> {
        let a = self.operand(|_| true)?;
        let to = if self.hostile() {
            self.pick(&[0, 8, 14, 99, -3])
        } else {
            self.pick(&[F32, I64, I32, BOOL, F16, F64, I8, U8])
        };
        if a.elem == F32 && to != F32 && to != F16 && to != F64 {
            self.fragile = true;
        }
        let attr = attr_int("to", to as i64);
        let v = self.emit("Cast", vec![a.name], vec![attr], to, a.shape.clone());
        // Most types only pass through: bring them back to f32 or i64.
        if ![F32, I64, BOOL].contains(&to) {
            let back = if to == I32 || to == I8 || to == U8 { I64 } else { F32 };
            let attr = attr_int("to", back as i64);
            self.emit("Cast", vec![v.name], vec![attr], back, a.shape);
        }
        Some(())
    }

    fn where_(&mut self) -> Option<()> {
        let x = self.float_operand()?;
        let cond = self.partner(&x, BOOL);
        let y = self.partner(&x, F32);
        self.emit("Where", vec![cond.name, x.name, y.name], vec![], F32, x.shape);
        Some(())
    }

    fn expand(&mut self) -> Option<()> {
        let a = self.operand(|v| v.elem == F32 || v.elem == I64)?;
        let mut target: Vec<usize> = a.shape.iter().map(|&d| if d == 1 { self.pick(DIMS) } else { d }).collect();
        for _ in 0..self.below(2) {
            target.insert(0, self.pick(&[1, 2, 3]));
        }
        if numel(&target) > MAX_NUMEL {
            return None;
        }
        // ONNX lets the target keep 1 where the input has a size.
        let spelled: Vec<i64> = target
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let j = i + a.shape.len();
                if j >= target.len() && a.shape[j - target.len()] == d && self.below(3) == 0 {
                    1
                } else {
                    d as i64
                }
            })
            .collect();
        let spelled = self.maybe_hostile_list(spelled);
        let shape = self.i64s(&spelled);
        self.emit("Expand", vec![a.name, shape], vec![], a.elem, target);
        Some(())
    }

    fn unsqueeze(&mut self) -> Option<()> {
        let a = self.operand(|_| true)?;
        if self.flag() {
            let ones: Vec<usize> = (0..a.shape.len()).filter(|&i| a.shape[i] == 1).collect();
            if !ones.is_empty() && a.shape.len() > 1 {
                let ax = ones[self.below(ones.len())];
                let mut out = a.shape.clone();
                out.remove(ax);
                let r = a.shape.len() as i64;
                let spelled = if self.flag() { ax as i64 - r } else { ax as i64 };
                let spelled = self.maybe_hostile_list(vec![spelled]);
                let axes = self.i64s(&spelled);
                self.emit("Squeeze", vec![a.name, axes], vec![], a.elem, out);
                return Some(());
            }
        }
        if a.shape.len() >= 4 {
            return None;
        }
        let ax = self.below(a.shape.len() + 1);
        let mut out = a.shape.clone();
        out.insert(ax, 1);
        let r = out.len() as i64;
        let spelled = if self.flag() { ax as i64 - r } else { ax as i64 };
        let spelled = self.maybe_hostile_list(vec![spelled]);
        let axes = self.i64s(&spelled);
        self.emit("Unsqueeze", vec![a.name, axes], vec![], a.elem, out);
        Some(())
    }

    fn shape_op(&mut self) -> Option<()> {
        let a = self.operand(|_| true)?;
        let r = a.shape.len();
        let v = self.emit("Shape", vec![a.name], vec![], I64, vec![r]);
        if self.flag() {
            // A dim of it, as exporters read one: Gather(Shape(x), k).
            let k = self.below(r) as i64;
            let idx = self.i64s(&[k]);
            self.emit("Gather", vec![v.name, idx], vec![attr_int("axis", 0)], I64, vec![1]);
        }
        Some(())
    }

    fn step(&mut self) -> bool {
        let which = self.below(17);
        let done = match which {
            0 | 1 => self.unary(),
            2 | 3 => self.binary(),
            4 => self.matmul(),
            5 => self.gemm(),
            6 => self.reshape(),
            7 => self.transpose(),
            8 => self.slice(),
            9 => self.concat(),
            10 => self.gather(),
            11 => self.softmax(),
            12 => self.layer_norm(),
            13 => self.reduce(),
            14 => self.cast(),
            15 => self.where_(),
            _ => match self.below(4) {
                0 => self.expand(),
                1 => self.unsqueeze(),
                2 => self.shape_op(),
                _ => self.compare(),
            },
        };
        done.is_some()
    }

    /// Graph-level damage: an undefined input, an unknown attribute, a node
    /// defining a value twice, a cycle.
    fn damage(&mut self) {
        if self.g.node.is_empty() || !self.hostile() {
            return;
        }
        let i = self.below(self.g.node.len());
        match self.below(6) {
            0 => {
                if let Some(x) = self.g.node[i].input.first_mut() {
                    *x = "undefined".into();
                }
            }
            1 => {
                let a = attr_int("no_such_attribute", 1);
                self.g.node[i].attribute.push(a);
            }
            2 => {
                let n = self.g.node[i].clone();
                self.g.node.push(n);
            }
            3 => {
                let out = self.g.node[i].output[0].clone();
                if let Some(x) = self.g.node[i].input.first_mut() {
                    *x = out;
                }
            }
            4 => self.g.node[i].input.push(String::new()),
            _ => self.g.node[i].domain = self.pick(&["com.microsoft", "ai.onnx.ml", "x"]).into(),
        }
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = i;
    a
}

fn attr_ints(name: &str, ints: Vec<i64>) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = ints;
    a
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = f;
    a
}

fn value_info_dims(name: &str, elem: i32, dims: Option<&[dimension::Value]>) -> ValueInfoProto {
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = elem;
    if let Some(dims) = dims {
        let mut shape = TensorShapeProto::new();
        for d in dims {
            let mut dim = Dimension::new();
            dim.value = Some(d.clone());
            shape.dim.push(dim);
        }
        tt.shape = Some(shape).into();
    }
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(tt));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(ty).into();
    v
}

/// A generated model with what it takes to run it.
pub struct Generated {
    pub model: ModelProto,
    inputs: Vec<InputSpec>,
    /// Symbols compile binds (`--dim`).
    dims: HashMap<String, usize>,
    opt_level: u8,
    fragile: bool,
    /// Per input, a seed for its random values, and index values given by
    /// the fuzzer.
    seed: u64,
    index_bytes: Vec<u8>,
}

/// Builds a model from the fuzzer's bytes.
pub fn generate(data: &[u8]) -> R<Generated> {
    let mut u = Unstructured::new(data);
    let level = u.arbitrary::<u8>()? % 9;
    let opt_level = u.arbitrary::<u8>()? % 3;
    let mut gen = Gen {
        u: &mut u,
        level,
        g: GraphProto::new(),
        vals: vec![],
        inputs: vec![],
        opset: 17,
        counter: 0,
        symbols: vec![],
        fragile: false,
        external: false,
    };
    gen.opset = if gen.hostile() { gen.pick(&[0, 1, 6, 29, -1, i64::MAX]) } else { gen.pick(&[13, 17, 18, 21]) };
    gen.g.name = "fuzz".into();
    let ninputs = 1 + gen.below(2);
    for _ in 0..ninputs {
        let s = gen.shape();
        gen.graph_input(F32, s, None);
    }
    let nodes = 1 + gen.below(MAX_NODES);
    let mut tries = 0;
    let mut made = 0;
    while made < nodes && tries < 4 * MAX_NODES {
        tries += 1;
        if gen.step() {
            made += 1;
        }
    }
    // Outputs: the last value, and now and then an earlier one.
    let last = gen.vals.last().cloned().expect("there is an input");
    let mut outs = vec![last];
    if gen.below(4) == 0 && gen.vals.len() > 1 {
        let i = gen.below(gen.vals.len() - 1);
        let v = gen.vals[i].clone();
        if v.name != outs[0].name {
            outs.push(v);
        }
    }
    for v in outs {
        let dims: Vec<dimension::Value> = v.shape.iter().map(|&d| dimension::Value::DimValue(d as i64)).collect();
        let declare_shape = gen.below(3) == 0 && !gen.hostile();
        let elem = if gen.hostile() { gen.pick(&[0, BOOL, F16, 99]) } else { v.elem };
        gen.g.output.push(value_info_dims(&v.name, elem, declare_shape.then_some(&dims[..])));
    }
    gen.damage();
    let mut model = ModelProto::new();
    model.ir_version = if gen.hostile() { gen.pick(&[0, 1, 100, -1]) } else { 8 };
    let mut opset = OperatorSetIdProto::new();
    opset.version = gen.opset;
    model.opset_import.push(opset);
    model.producer_name = "egret-fuzz".into();
    let dims = gen.symbols.iter().filter(|s| s.2).map(|s| (s.0.clone(), s.1)).collect();
    let (inputs, fragile) = (gen.inputs.clone(), gen.fragile);
    model.graph = Some(std::mem::take(&mut gen.g)).into();
    let seed = gen.seed();
    let index_bytes: Vec<u8> = (0..64).map(|_| gen.byte()).collect();
    Ok(Generated { model, inputs, dims, opt_level, fragile, seed, index_bytes })
}

/// Inputs of the generated model's declared shapes: floats in [-1, 1),
/// indices mostly in range (the fuzzer's bytes pick them, some outside).
fn run_inputs(gen: &Generated) -> Option<Vec<(String, Tensor)>> {
    let mut rng = egret::io::SplitMix::new(gen.seed);
    let mut bytes = gen.index_bytes.iter().copied().cycle();
    let mut out = vec![];
    for i in &gen.inputs {
        if i.hostile {
            return None;
        }
        let n = numel(&i.shape);
        let t = match i.elem {
            F32 => Tensor::from_vec(i.shape.clone(), (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect()),
            _ => {
                let bound = i.index_bound.unwrap_or(1).max(1) as i64;
                let vals: Vec<i64> = (0..n)
                    .map(|_| {
                        let b = bytes.next().unwrap_or(0);
                        match b {
                            250 => bound,
                            251 => -bound - 1,
                            252 => i64::MAX,
                            253 => i64::MIN,
                            _ => (b as i64 % (2 * bound)) - bound,
                        }
                    })
                    .collect();
                Tensor::new(i.shape.clone(), Data::from_i64s(DType::I64, &vals))
            }
        };
        out.push((i.name.clone(), t));
    }
    Some(out)
}

/// The model's outputs on one backend, or why it refused.
fn compile_and_run(
    path: &Path,
    backend: Backend,
    gen: &Generated,
    inputs: &[(String, Tensor)],
) -> Result<Vec<(String, Tensor)>, String> {
    let opts = CompileOptions {
        backend,
        dims: gen.dims.clone(),
        threads: Some(1),
        opt_level: gen.opt_level,
        ..Default::default()
    };
    let model = egret::compile(path, &opts).map_err(|e| format!("compile: {e}"))?;
    model.run(inputs.to_vec()).map_err(|e| format!("run: {e}"))
}

/// Whether two outputs agree: same shape and type; where both are finite,
/// floats within a loose tolerance and other types exactly.
fn agree(got: &Tensor, want: &Tensor, values: bool) -> Result<(), String> {
    if got.shape() != want.shape() || got.dtype() != want.dtype() {
        return Err(format!("cpu gives {} but the reference {}", got.ty(), want.ty()));
    }
    if !values {
        return Ok(());
    }
    let float = want.dtype().is_float();
    for (i, (a, b)) in got.to_f64_vec().into_iter().zip(want.to_f64_vec()).enumerate() {
        if !a.is_finite() || !b.is_finite() {
            continue;
        }
        let ok = if float { (a - b).abs() <= 1e-3 + 1e-2 * a.abs().max(b.abs()) } else { a == b };
        if !ok {
            return Err(format!("element {i}: cpu {a}, reference {b}"));
        }
    }
    Ok(())
}

/// A model file (a crash `compile_run` found, kept as ONNX so that it does
/// not depend on the generator) through the same checks: import, then
/// compile and run on the reference and CPU backends at every `--opt`
/// with random inputs (where the model's inputs allow them), comparing
/// where both run. Errors are fine; a panic or a disagreement is not.
pub fn compile_run_model(bytes: &[u8]) {
    let dir = scratch_dir();
    let path = dir.join(format!("regression-{:?}.onnx", std::thread::current().id()).replace(['(', ')'], ""));
    let Ok(imported) = import_bytes(bytes, Some(dir), &path, &ImportOptions::default()) else { return };
    let Ok(inputs) = egret::io::random_inputs(&imported.graph, 1) else { return };
    std::fs::write(&path, bytes).expect("the scratch folder takes a model");
    for opt_level in 0..=2 {
        let run = |backend| -> Result<Vec<(String, Tensor)>, String> {
            let opts = CompileOptions { backend, threads: Some(1), opt_level, ..Default::default() };
            let model = egret::compile(&path, &opts).map_err(|e| e.to_string())?;
            model.run(inputs.clone()).map_err(|e| e.to_string())
        };
        if let (Ok(want), Ok(got)) = (run(Backend::Reference), run(Backend::Cpu)) {
            for ((name, w), (_, g)) in want.iter().zip(&got) {
                if let Err(e) = agree(g, w, true) {
                    panic!("cpu and reference disagree on output `{name}` at --opt {opt_level}: {e}");
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// `EGRET_FUZZ_VERBOSE=1`: say where each input stopped.
fn verbose() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("EGRET_FUZZ_VERBOSE").is_some())
}

pub fn compile_run_target(data: &[u8]) {
    let n = COUNTERS.inputs.fetch_add(1, Ordering::Relaxed) + 1;
    if n % 10_000 == 0 {
        eprintln!("{}", COUNTERS.summary());
    }
    let Ok(gen) = generate(data) else { return };
    let bytes = match gen.model.write_to_bytes() {
        Ok(b) => b,
        Err(_) => return,
    };
    if let Some(dump) = std::env::var_os("EGRET_FUZZ_DUMP") {
        // The generated model, to look at or run with `egret` (its external
        // data needs the scratch folder's `data.bin` beside it).
        let _ = std::fs::write(dump, &bytes);
    }
    let dir = scratch_dir();
    let path = dir.join("model.onnx");
    let imported = match import_bytes(&bytes, Some(dir), &path, &ImportOptions::default()) {
        Ok(imported) => imported,
        Err(e) => {
            if verbose() {
                eprintln!("compile_run: import: {e}");
            }
            return;
        }
    };
    if let Err(e) = egret::ir::verify(&imported.graph) {
        panic!("the importer returned a graph that fails verification: {e}");
    }
    COUNTERS.imported.fetch_add(1, Ordering::Relaxed);
    let Some(inputs) = run_inputs(&gen) else { return };
    if std::fs::write(&path, &bytes).is_err() {
        return;
    }
    COUNTERS.reached_compile_run.fetch_add(1, Ordering::Relaxed);
    let reference = compile_and_run(&path, Backend::Reference, &gen, &inputs);
    let cpu = compile_and_run(&path, Backend::Cpu, &gen, &inputs);
    match (&reference, &cpu) {
        (Ok(want), Ok(got)) => {
            COUNTERS.both_ran.fetch_add(1, Ordering::Relaxed);
            assert_eq!(want.len(), got.len(), "the backends give different numbers of outputs");
            for ((name, w), (gname, g)) in want.iter().zip(got) {
                assert_eq!(name, gname, "the backends name outputs differently");
                if let Err(e) = agree(g, w, !gen.fragile) {
                    let text = egret::ir::text::print(&imported.graph);
                    panic!(
                        "cpu and reference disagree on output `{name}` at --opt {}: {e}\n--- imported graph ---\n{text}",
                        gen.opt_level
                    );
                }
            }
            if !gen.fragile {
                COUNTERS.compared.fetch_add(1, Ordering::Relaxed);
            }
        }
        (Err(a), Err(b)) => {
            if verbose() {
                eprintln!("compile_run: both failed: reference: {a}; cpu: {b}");
            }
        }
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
            COUNTERS.one_sided.fetch_add(1, Ordering::Relaxed);
            if ONE_SIDED_PRINTED.fetch_add(1, Ordering::Relaxed) < 20 || verbose() {
                let side = if reference.is_ok() { "cpu" } else { "reference" };
                eprintln!("compile_run: only the {side} backend failed: {e}");
            }
        }
    }
}
