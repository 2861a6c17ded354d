//! The PTX printer: renders a kernel of the GPU form as one PTX module for
//! NVIDIA GPUs (`.version 7.8`, `.target sm_80`, which drivers also load on
//! sm_90). The same form the WGSL printer renders: no algorithm is written
//! twice.
//!
//! Each space is a kernel parameter holding a global address, in the
//! order of `Kernel::spaces` (the CUDA runtime passes them so; a span's
//! chunks lie back to back in one allocation, so it is addressed from its
//! first chunk). Variables are registers of their type; every expression
//! value gets a fresh virtual register, which ptxas allocates.
//!
//! Arithmetic is f32 with FMA. `exp` is `ex2.approx` after a range
//! reduction (the exponent split into an integer and a fraction with a
//! two-part log2(e)), `log` is `lg2.approx` times ln 2; erf, tanh and the
//! activations come from the form's own expansions over these.

use super::form::*;
use std::fmt::Write;

/// The PTX ISA version and target every module declares.
pub const VERSION: &str = "7.8";
pub const TARGET: &str = "sm_80";

/// A register operand and its type.
#[derive(Clone)]
struct Reg {
    name: String,
    ty: Ty,
}

struct Printer<'k> {
    k: &'k Kernel,
    body: String,
    /// Temporaries by register class: f32, b32, pred, b64.
    temps: [u32; 4],
    labels: u32,
    /// Each space's base address register.
    bases: Vec<(Space, String)>,
}

/// The parameter name of a space.
pub fn param_name(space: Space) -> String {
    match space {
        Space::Arena => "arena".into(),
        Space::Params => "params".into(),
        Space::Error => "err_word".into(),
        Space::Weights(c) => format!("weights{c}"),
        Space::WeightsSpan { first, .. } => format!("weights{first}"),
    }
}

pub fn print(k: &Kernel) -> String {
    let mut p = Printer { k, body: String::new(), temps: [0; 4], labels: 0, bases: vec![] };
    let spaces = k.spaces();
    for (i, &space) in spaces.iter().enumerate() {
        let reg = format!("%base{i}");
        p.line(&format!("ld.param.u64 {reg}, [{}];", param_name(space)));
        p.line(&format!("cvta.to.global.u64 {reg}, {reg};"));
        p.bases.push((space, reg));
    }
    p.block(&k.body);
    p.line("ret;");

    let mut out = String::new();
    let _ = writeln!(out, "// {}: {} threads per block", k.name, k.threads);
    let _ = writeln!(out, ".version {VERSION}\n.target {TARGET}\n.address_size 64\n");
    let params: Vec<String> = spaces.iter().map(|&s| format!("    .param .u64 {}", param_name(s))).collect();
    let _ = writeln!(out, ".visible .entry {}(\n{}\n)", entry_name(k), params.join(",\n"));
    let _ = writeln!(out, ".maxntid {}, 1, 1\n{{", k.threads);
    for (i, len) in k.shared.iter().enumerate() {
        // 16-byte aligned for `ld.shared.v4` and `st.shared.v4`.
        let _ = writeln!(out, "    .shared .align 16 .f32 wg{i}[{len}];");
    }
    for (i, len) in k.locals.iter().enumerate() {
        let _ = writeln!(out, "    .local .align 4 .f32 loc{i}[{len}];");
    }
    let _ = writeln!(out, "    .reg .pred %p<{}>;", k.vars.len().max(1));
    let _ = writeln!(out, "    .reg .f32 %f<{}>;", k.vars.len().max(1));
    let _ = writeln!(out, "    .reg .b32 %r<{}>;", k.vars.len().max(1));
    let [tf, tr, tp, td] = p.temps;
    // Temporaries are numbered from 1.
    let _ = writeln!(out, "    .reg .f32 %tf<{}>;", tf + 1);
    let _ = writeln!(out, "    .reg .b32 %tr<{}>;", tr + 1);
    let _ = writeln!(out, "    .reg .pred %tp<{}>;", tp + 1);
    let _ = writeln!(out, "    .reg .b64 %td<{}>;", td + 1);
    let _ = writeln!(out, "    .reg .b64 %base<{}>;", spaces.len().max(1));
    out.push_str(&p.body);
    out.push_str("}\n");
    out
}

/// The entry point's name: the kernel's, which names what it does.
pub fn entry_name(k: &Kernel) -> String {
    k.name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_")
}

fn reg_class(t: Ty) -> usize {
    match t {
        Ty::F32 => 0,
        Ty::I32 | Ty::U32 => 1,
        Ty::Bool => 2,
    }
}

/// An f32 immediate, as PTX writes them: its bits.
fn f32_imm(v: f32) -> String {
    format!("0f{:08X}", v.to_bits())
}

impl Printer<'_> {
    fn line(&mut self, s: &str) {
        self.body.push_str("    ");
        self.body.push_str(s);
        self.body.push('\n');
    }

    fn label(&mut self) -> String {
        self.labels += 1;
        format!("L{}", self.labels)
    }

    fn temp(&mut self, ty: Ty) -> Reg {
        let class = reg_class(ty);
        self.temps[class] += 1;
        let n = self.temps[class];
        let name = match class {
            0 => format!("%tf{n}"),
            1 => format!("%tr{n}"),
            _ => format!("%tp{n}"),
        };
        Reg { name, ty }
    }

    fn temp64(&mut self) -> String {
        self.temps[3] += 1;
        format!("%td{}", self.temps[3])
    }

    fn var(&self, v: Var) -> Reg {
        let ty = self.k.vars[v.0 as usize];
        let name = match reg_class(ty) {
            0 => format!("%f{}", v.0),
            1 => format!("%r{}", v.0),
            _ => format!("%p{}", v.0),
        };
        Reg { name, ty }
    }

    fn base(&self, space: Space) -> String {
        let key = match space {
            Space::WeightsSpan { first, .. } => Space::Weights(first),
            s => s,
        };
        self.bases.iter().find(|(s, _)| *s == key).map(|(_, r)| r.clone()).expect("every space has a base")
    }

    fn block(&mut self, body: &[S]) {
        for s in body {
            self.stmt(s);
        }
    }

    /// `base + 4 * index` as a 64-bit address.
    fn address(&mut self, base: &str, index: &E) -> String {
        let i = self.e(index);
        let wide = self.temp64();
        let op = if i.ty == Ty::U32 { "mul.wide.u32" } else { "mul.wide.s32" };
        self.line(&format!("{op} {wide}, {}, 4;", i.name));
        let at = self.temp64();
        self.line(&format!("add.s64 {at}, {base}, {wide};"));
        at
    }

    /// The 32-bit shared-window address of element `index` of a workgroup
    /// array. In 32 bits, unlike a generic address widened from a signed
    /// index, `ptxas` may fold an index's constant part into the access's
    /// immediate offset (`[R+0x210]`): the unrolled loops read at constant
    /// offsets from one register.
    fn shared_address(&mut self, a: Shared, index: &E) -> String {
        let i = self.e(index);
        let (base, offset, at) = (self.temp(Ty::U32).name, self.temp(Ty::U32).name, self.temp(Ty::U32).name);
        self.line(&format!("mov.u32 {base}, wg{};", a.0));
        self.line(&format!("shl.b32 {offset}, {}, 2;", i.name));
        self.line(&format!("add.u32 {at}, {base}, {offset};"));
        at
    }

    fn array_base(&mut self, name: &str) -> String {
        let r = self.temp64();
        self.line(&format!("mov.u64 {r}, {name};"));
        r
    }

    fn stmt(&mut self, s: &S) {
        match s {
            S::Let(v, e) | S::Set(v, e) => {
                let x = self.e(e);
                let d = self.var(*v);
                self.mov(&d, &x);
            }
            S::Store(space, i, v) => {
                let base = self.base(*space);
                let at = self.address(&base, i);
                let x = self.e(v);
                self.line(&format!("st.global.u32 [{at}], {};", x.name));
            }
            S::StoreShared(a, i, v) => {
                let at = self.shared_address(*a, i);
                let x = self.e(v);
                self.line(&format!("st.shared.f32 [{at}], {};", x.name));
            }
            S::StoreLocal(a, i, v) => {
                let base = self.array_base(&format!("loc{}", a.0));
                let at = self.address(&base, i);
                let x = self.e(v);
                self.line(&format!("st.local.f32 [{at}], {};", x.name));
            }
            S::For { var, from, to, step, body } => {
                let v = self.var(*var);
                let x = self.e(from);
                self.mov(&v, &x);
                let (top, end) = (self.label(), self.label());
                self.body.push_str(&format!("{top}:\n"));
                let limit = self.e(to);
                let p = self.temp(Ty::Bool);
                let t = if v.ty == Ty::U32 { "u32" } else { "s32" };
                self.line(&format!("setp.lt.{t} {}, {}, {};", p.name, v.name, limit.name));
                self.line(&format!("@!{} bra {end};", p.name));
                self.block(body);
                let st = self.e(step);
                self.line(&format!("add.s32 {}, {}, {};", v.name, v.name, st.name));
                self.line(&format!("bra.uni {top};"));
                self.body.push_str(&format!("{end}:\n"));
            }
            S::If(c, a, b) => {
                let p = self.e(c);
                let (otherwise, end) = (self.label(), self.label());
                self.line(&format!("@!{} bra {otherwise};", p.name));
                self.block(a);
                self.line(&format!("bra.uni {end};"));
                self.body.push_str(&format!("{otherwise}:\n"));
                self.block(b);
                self.body.push_str(&format!("{end}:\n"));
            }
            S::Barrier => self.line("bar.sync 0;"),
            S::Reduce { how, value, into, scratch } => self.reduce(*how, value, *into, *scratch),
            S::Mma { precision, a, b, acc } => self.mma(*precision, a, b, acc),
            S::CopyAsync { shared, index, space, src, words } => {
                let at = self.shared_address(*shared, index);
                let base = self.base(*space);
                let from = self.address(&base, src);
                let w = self.e(words).name;
                let bytes = self.temp(Ty::U32).name;
                self.line(&format!("shl.b32 {bytes}, {w}, 2;"));
                self.line(&format!("cp.async.cg.shared.global [{at}], [{from}], 16, {bytes};"));
            }
            S::CopyWait => {
                self.line("cp.async.commit_group;");
                self.line("cp.async.wait_group 0;");
            }
            S::PackBf16 { lo, hi, into } => {
                let (lo, hi) = (self.e(lo).name, self.e(hi).name);
                let d = self.var(*into).name;
                self.line(&format!("cvt.rn.bf16x2.f32 {d}, {hi}, {lo};"));
            }
            S::LoadMatrix { shared, index, trans, into } => {
                let at = self.shared_address(*shared, index);
                let regs: Vec<String> = into.iter().map(|v| self.var(*v).name).collect();
                let t = if *trans { ".trans" } else { "" };
                self.line(&format!("ldmatrix.sync.aligned.m8n8.x4{t}.shared.b16 {{{}}}, [{at}];", regs.join(", ")));
            }
            S::MmaBf16 { a, b, acc } => {
                let a: Vec<String> = a.iter().map(|x| self.e(x).name).collect();
                let b: Vec<String> = b.iter().map(|x| self.e(x).name).collect();
                let c: Vec<String> = acc.iter().map(|v| self.var(*v).name).collect();
                self.line(&format!(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{}}}, {{{}}}, {{{}}}, {{{}}};",
                    c.join(", "),
                    a.join(", "),
                    b.join(", "),
                    c.join(", ")
                ));
            }
            S::LoadShared4 { shared, index, into } => {
                let at = self.shared_address(*shared, index);
                let regs: Vec<String> = into.iter().map(|v| self.var(*v).name).collect();
                self.line(&format!("ld.shared.v4.f32 {{{}}}, [{at}];", regs.join(", ")));
            }
            S::StoreShared4 { shared, index, values } => {
                let at = self.shared_address(*shared, index);
                let regs: Vec<String> = values.iter().map(|v| self.e(v).name).collect();
                self.line(&format!("st.shared.v4.f32 [{at}], {{{}}};", regs.join(", ")));
            }
            S::Load4 { space, index, into } => {
                let base = self.base(*space);
                let at = self.address(&base, index);
                let cache = if matches!(space, Space::Weights(_) | Space::WeightsSpan { .. }) { ".nc" } else { "" };
                let regs: Vec<String> = into.iter().map(|v| self.var(*v).name).collect();
                self.line(&format!("ld.global{cache}.v4.u32 {{{}}}, [{at}];", regs.join(", ")));
            }
        }
    }

    /// `mma.sync` m16n8k8 with f32 accumulators: the fragments rounded to
    /// tf32 (one value a register) or packed two bf16 a register (the lower
    /// element in the low half).
    fn mma(&mut self, precision: Precision, a: &[E; 4], b: &[E; 2], acc: &[Var; 4]) {
        let a: Vec<String> = a.iter().map(|x| self.e(x).name).collect();
        let b: Vec<String> = b.iter().map(|x| self.e(x).name).collect();
        let pack = |p: &mut Self, values: &[String]| -> Vec<String> {
            match precision {
                Precision::Tf32 => values
                    .iter()
                    .map(|v| {
                        let r = p.temp(Ty::U32).name;
                        p.line(&format!("cvt.rna.tf32.f32 {r}, {v};"));
                        r
                    })
                    .collect(),
                _ => values
                    .chunks(2)
                    .map(|pair| {
                        let r = p.temp(Ty::U32).name;
                        p.line(&format!("cvt.rn.bf16x2.f32 {r}, {}, {};", pair[1], pair[0]));
                        r
                    })
                    .collect(),
            }
        };
        let (fa, fb) = (pack(self, &a), pack(self, &b));
        let c: Vec<String> = acc.iter().map(|v| self.var(*v).name).collect();
        let t = precision.name();
        self.line(&format!(
            "mma.sync.aligned.m16n8k8.row.col.f32.{t}.{t}.f32 {{{}}}, {{{}}}, {{{}}}, {{{}}};",
            c.join(", "),
            fa.join(", "),
            fb.join(", "),
            c.join(", ")
        ));
    }

    /// A workgroup reduction: butterfly shuffles combine each warp's 32
    /// values (every lane ends with the warp's result), lane 0 of each
    /// warp leaves it in `scratch`, and after a barrier every thread
    /// combines the warps' partials in order.
    fn reduce(&mut self, how: Reduction, value: &E, into: Var, scratch: Shared) {
        assert!(self.k.threads % 32 == 0, "reductions run over whole warps");
        let op = match how {
            Reduction::Sum => "add.f32",
            Reduction::Max => "max.NaN.f32",
            Reduction::Min => "min.NaN.f32",
        };
        let v = self.e(value);
        let acc = self.temp(Ty::F32).name;
        self.line(&format!("mov.f32 {acc}, {};", v.name));
        for lanes in [16, 8, 4, 2, 1] {
            let (bits, other, theirs) = (self.temp(Ty::U32).name, self.temp(Ty::U32).name, self.temp(Ty::F32).name);
            self.line(&format!("mov.b32 {bits}, {acc};"));
            self.line(&format!("shfl.sync.bfly.b32 {other}, {bits}, {lanes}, 31, -1;"));
            self.line(&format!("mov.b32 {theirs}, {other};"));
            self.line(&format!("{op} {acc}, {acc}, {theirs};"));
        }
        let (tid, lane, warp) = (self.temp(Ty::U32).name, self.temp(Ty::U32).name, self.temp(Ty::U32).name);
        self.line(&format!("mov.u32 {tid}, %tid.x;"));
        self.line(&format!("and.b32 {lane}, {tid}, 31;"));
        self.line(&format!("shr.u32 {warp}, {tid}, 5;"));
        let base = self.temp(Ty::U32).name;
        self.line(&format!("mov.u32 {base}, wg{};", scratch.0));
        let (first, skip) = (self.temp(Ty::Bool).name, self.label());
        self.line(&format!("setp.ne.u32 {first}, {lane}, 0;"));
        self.line(&format!("@{first} bra {skip};"));
        let (offset, at) = (self.temp(Ty::U32).name, self.temp(Ty::U32).name);
        self.line(&format!("shl.b32 {offset}, {warp}, 2;"));
        self.line(&format!("add.u32 {at}, {base}, {offset};"));
        self.line(&format!("st.shared.f32 [{at}], {acc};"));
        self.body.push_str(&format!("{skip}:\n"));
        self.line("bar.sync 0;");
        let d = self.var(into);
        self.line(&format!("ld.shared.f32 {}, [{base}];", d.name));
        for w in 1..self.k.threads / 32 {
            let part = self.temp(Ty::F32).name;
            self.line(&format!("ld.shared.f32 {part}, [{base}+{}];", w * 4));
            self.line(&format!("{op} {}, {}, {part};", d.name, d.name));
        }
        // Nobody overwrites a partial before everyone has read them.
        self.line("bar.sync 0;");
    }

    fn mov(&mut self, d: &Reg, x: &Reg) {
        let t = match d.ty {
            Ty::F32 => "f32",
            Ty::I32 | Ty::U32 => "b32",
            Ty::Bool => "pred",
        };
        self.line(&format!("mov.{t} {}, {};", d.name, x.name));
    }

    /// Emits `e`, returning the register holding its value.
    fn e(&mut self, x: &E) -> Reg {
        let ty = self.k.ty_of(x);
        match x {
            E::F32(v) => {
                let r = self.temp(Ty::F32);
                self.line(&format!("mov.f32 {}, {};", r.name, f32_imm(*v)));
                r
            }
            E::I32(v) => {
                let r = self.temp(Ty::I32);
                self.line(&format!("mov.b32 {}, {};", r.name, v));
                r
            }
            E::U32(v) => {
                let r = self.temp(Ty::U32);
                self.line(&format!("mov.b32 {}, {};", r.name, v));
                r
            }
            E::Bool(b) => {
                let one = self.temp(Ty::U32);
                self.line(&format!("mov.b32 {}, {};", one.name, *b as u32));
                let r = self.temp(Ty::Bool);
                self.line(&format!("setp.ne.u32 {}, {}, 0;", r.name, one.name));
                r
            }
            E::Var(v) => self.var(*v),
            E::Builtin(b) => {
                let r = self.temp(Ty::U32);
                let src = match b {
                    Builtin::Thread => "%tid.x".to_string(),
                    Builtin::Group(a) => format!("%ctaid.{}", axis(*a)),
                    Builtin::Groups(a) => format!("%nctaid.{}", axis(*a)),
                };
                self.line(&format!("mov.u32 {}, {src};", r.name));
                r
            }
            E::Param(i) => {
                let base = self.base(Space::Params);
                let r = self.temp(Ty::U32);
                self.line(&format!("ld.global.nc.u32 {}, [{base}+{}];", r.name, i * 4));
                r
            }
            E::Load(space, i) => {
                let base = self.base(*space);
                let at = self.address(&base, i);
                let r = self.temp(Ty::U32);
                let cache = if matches!(space, Space::Weights(_) | Space::WeightsSpan { .. } | Space::Params) {
                    ".nc"
                } else {
                    ""
                };
                self.line(&format!("ld.global{cache}.u32 {}, [{at}];", r.name));
                r
            }
            E::LoadShared(a, i) => {
                let at = self.shared_address(*a, i);
                let r = self.temp(Ty::F32);
                self.line(&format!("ld.shared.f32 {}, [{at}];", r.name));
                r
            }
            E::LoadLocal(a, i) => {
                let base = self.array_base(&format!("loc{}", a.0));
                let at = self.address(&base, i);
                let r = self.temp(Ty::F32);
                self.line(&format!("ld.local.f32 {}, [{at}];", r.name));
                r
            }
            E::Un(op, a) => {
                let a = self.e(a);
                let r = self.temp(ty);
                let (d, s) = (r.name.clone(), a.name.clone());
                match (op, ty) {
                    (UnOp::Not, _) => self.line(&format!("not.pred {d}, {s};")),
                    (UnOp::Neg, Ty::F32) => self.line(&format!("neg.f32 {d}, {s};")),
                    (UnOp::Neg, _) => self.line(&format!("neg.s32 {d}, {s};")),
                    (UnOp::Abs, Ty::F32) => self.line(&format!("abs.f32 {d}, {s};")),
                    (UnOp::Abs, _) => self.line(&format!("abs.s32 {d}, {s};")),
                    (UnOp::Sqrt, _) => self.line(&format!("sqrt.rn.f32 {d}, {s};")),
                    (UnOp::Floor, _) => self.line(&format!("cvt.rmi.f32.f32 {d}, {s};")),
                    (UnOp::Ceil, _) => self.line(&format!("cvt.rpi.f32.f32 {d}, {s};")),
                    (UnOp::Round, _) => self.line(&format!("cvt.rni.f32.f32 {d}, {s};")),
                    (UnOp::Exp, _) => self.exp(&d, &s),
                    (UnOp::Log, _) => {
                        self.line(&format!("lg2.approx.f32 {d}, {s};"));
                        self.line(&format!("mul.f32 {d}, {d}, {};", f32_imm(std::f32::consts::LN_2)));
                    }
                    (UnOp::Sin, _) => self.line(&format!("sin.approx.f32 {d}, {s};")),
                    (UnOp::Cos, _) => self.line(&format!("cos.approx.f32 {d}, {s};")),
                }
                r
            }
            E::Bin(op, a, b) => {
                // An integer constant on the right is an immediate, which
                // `ptxas` strength-reduces (a division by 2 is a shift; by a
                // register holding 2 it is the general division).
                let immediate = match **b {
                    E::I32(c) if ty == Ty::I32 => Some(c.to_string()),
                    E::U32(c) if ty == Ty::U32 => Some(c.to_string()),
                    _ => None,
                };
                let a = self.e(a);
                let y = match immediate {
                    Some(c) => c,
                    None => self.e(b).name,
                };
                let r = self.temp(ty);
                let (d, x) = (r.name.clone(), a.name.clone());
                let t = match ty {
                    Ty::F32 => "f32",
                    Ty::I32 => "s32",
                    Ty::U32 => "u32",
                    Ty::Bool => "pred",
                };
                let bits = if ty == Ty::Bool { "pred" } else { "b32" };
                let ins = match op {
                    BinOp::Add => format!("add.{t}"),
                    BinOp::Sub => format!("sub.{t}"),
                    BinOp::Mul if ty == Ty::F32 => "mul.f32".into(),
                    BinOp::Mul => format!("mul.lo.{t}"),
                    BinOp::Div if ty == Ty::F32 => "div.rn.f32".into(),
                    BinOp::Div => format!("div.{t}"),
                    BinOp::Rem => format!("rem.{t}"),
                    BinOp::Max => format!("max.{t}"),
                    BinOp::Min => format!("min.{t}"),
                    BinOp::And => format!("and.{bits}"),
                    BinOp::Or => format!("or.{bits}"),
                    BinOp::Xor => format!("xor.{bits}"),
                    BinOp::Shl => "shl.b32".into(),
                    BinOp::Shr => format!("shr.{t}"),
                };
                self.line(&format!("{ins} {d}, {x}, {y};"));
                r
            }
            E::Fma(a, b, c) => {
                let (a, b, c) = (self.e(a), self.e(b), self.e(c));
                let r = self.temp(Ty::F32);
                self.line(&format!("fma.rn.f32 {}, {}, {}, {};", r.name, a.name, b.name, c.name));
                r
            }
            E::Cmp(op, a, b) => {
                let (a, b) = (self.e(a), self.e(b));
                let r = self.temp(Ty::Bool);
                if a.ty == Ty::Bool {
                    // Booleans compare by xor.
                    self.line(&format!("xor.pred {}, {}, {};", r.name, a.name, b.name));
                    if *op == CmpOp::Eq {
                        self.line(&format!("not.pred {}, {};", r.name, r.name));
                    }
                    return r;
                }
                let t = match a.ty {
                    Ty::F32 => "f32",
                    Ty::I32 => "s32",
                    _ => "u32",
                };
                // Floats: ordered comparisons, but `!=` is true for NaN.
                let c = match (op, a.ty) {
                    (CmpOp::Eq, _) => "eq",
                    (CmpOp::Ne, Ty::F32) => "neu",
                    (CmpOp::Ne, _) => "ne",
                    (CmpOp::Lt, _) => "lt",
                    (CmpOp::Le, _) => "le",
                    (CmpOp::Gt, _) => "gt",
                    (CmpOp::Ge, _) => "ge",
                };
                self.line(&format!("setp.{c}.{t} {}, {}, {};", r.name, a.name, b.name));
                r
            }
            E::Select(c, a, b) => {
                let (c, a, b) = (self.e(c), self.e(a), self.e(b));
                let r = self.temp(ty);
                match ty {
                    Ty::Bool => {
                        let (x, y) = (self.temp(Ty::Bool), self.temp(Ty::Bool));
                        self.line(&format!("and.pred {}, {}, {};", x.name, c.name, a.name));
                        self.line(&format!("not.pred {}, {};", y.name, c.name));
                        self.line(&format!("and.pred {}, {}, {};", y.name, y.name, b.name));
                        self.line(&format!("or.pred {}, {}, {};", r.name, x.name, y.name));
                    }
                    Ty::F32 => self.line(&format!("selp.f32 {}, {}, {}, {};", r.name, a.name, b.name, c.name)),
                    _ => self.line(&format!("selp.b32 {}, {}, {}, {};", r.name, a.name, b.name, c.name)),
                }
                r
            }
            E::Cast(t, a) => {
                let from = self.k.ty_of(a);
                let a = self.e(a);
                if from == *t {
                    return a;
                }
                let r = self.temp(*t);
                let (d, s) = (r.name.clone(), a.name.clone());
                match (from, *t) {
                    (Ty::Bool, Ty::F32) => {
                        self.line(&format!("selp.f32 {d}, {}, {}, {s};", f32_imm(1.0), f32_imm(0.0)))
                    }
                    (Ty::Bool, _) => self.line(&format!("selp.b32 {d}, 1, 0, {s};")),
                    (Ty::I32, Ty::F32) => self.line(&format!("cvt.rn.f32.s32 {d}, {s};")),
                    (Ty::U32, Ty::F32) => self.line(&format!("cvt.rn.f32.u32 {d}, {s};")),
                    (Ty::F32, Ty::I32) => self.line(&format!("cvt.rzi.s32.f32 {d}, {s};")),
                    (Ty::F32, Ty::U32) => self.line(&format!("cvt.rzi.u32.f32 {d}, {s};")),
                    (_, Ty::Bool) => self.line(&format!("setp.ne.b32 {d}, {s}, 0;")),
                    _ => self.line(&format!("mov.b32 {d}, {s};")),
                }
                r
            }
            E::Bits(t, a) => {
                let a = self.e(a);
                if reg_class(a.ty) == reg_class(*t) {
                    return Reg { name: a.name, ty: *t };
                }
                let r = self.temp(*t);
                self.line(&format!("mov.b32 {}, {};", r.name, a.name));
                r
            }
        }
    }

    /// `d = exp(s)`: `2^(s log2 e)` with the product split into an integer
    /// `n` and a fraction `f` in [-0.5, 0.5] (log2 e in two parts, so `f`
    /// keeps its precision for large |s|), `ex2.approx` of each.
    fn exp(&mut self, d: &str, s: &str) {
        let (c, t, n, f, pn) =
            (self.temp(Ty::F32), self.temp(Ty::F32), self.temp(Ty::F32), self.temp(Ty::F32), self.temp(Ty::F32));
        let (c, t, n, f, pn) = (c.name, t.name, n.name, f.name, pn.name);
        // Clamped to [-105, 89], NaN kept: past them e^s is 0 or infinite
        // in f32 all the same, and a larger |s| leaves the fraction below
        // meaningless (e^1e10 was NaN, and tanh, erf and sigmoid of large
        // inputs with it).
        self.line(&format!("max.NaN.f32 {c}, {s}, {};", f32_imm(-105.0)));
        self.line(&format!("min.NaN.f32 {c}, {c}, {};", f32_imm(89.0)));
        let hi = f32_imm(std::f32::consts::LOG2_E);
        let lo = f32_imm(1.925_963e-8);
        self.line(&format!("mul.f32 {t}, {c}, {hi};"));
        self.line(&format!("cvt.rni.f32.f32 {n}, {t};"));
        self.line(&format!("neg.f32 {pn}, {n};"));
        self.line(&format!("fma.rn.f32 {f}, {c}, {hi}, {pn};"));
        self.line(&format!("fma.rn.f32 {f}, {c}, {lo}, {f};"));
        // 2^n as 2^min(n, 127) times 2^(n - that): n reaches 128 below
        // the overflow (e^88.4 is finite, 2^128 is not).
        let top = self.temp(Ty::F32).name;
        self.line(&format!("min.f32 {top}, {n}, {};", f32_imm(127.0)));
        self.line(&format!("sub.f32 {n}, {n}, {top};"));
        self.line(&format!("ex2.approx.ftz.f32 {f}, {f};"));
        self.line(&format!("ex2.approx.ftz.f32 {top}, {top};"));
        self.line(&format!("ex2.approx.ftz.f32 {n}, {n};"));
        self.line(&format!("mul.f32 {f}, {f}, {top};"));
        self.line(&format!("mul.f32 {d}, {f}, {n};"));
    }
}

fn axis(a: u8) -> char {
    ['x', 'y', 'z'][a as usize]
}
