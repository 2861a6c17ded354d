//! A PTX interpreter: the test oracle for Egret's PTX printer on machines
//! without an NVIDIA GPU (CI). It runs the subset of PTX the printer emits,
//! a kernel over its whole grid on the CPU, and checks every address
//! against the buffer, workgroup array or per-thread array it belongs to.
//!
//! - Parsing decodes every instruction once; an instruction, type or
//!   directive outside the subset is a parse error naming it, so the
//!   printer cannot drift past the interpreter unnoticed.
//! - The threads of a block run one after another up to each `bar.sync`,
//!   then on together; a block whose threads do not all reach the same
//!   barrier is an error. A warp's lanes meet at each shuffle
//!   (`shfl.sync.bfly`) and exchange their values together; a shuffle that
//!   only some lanes of a warp reach is an error.
//! - Global addresses name their buffer in the high bits (`global_address`),
//!   workgroup and per-thread arrays their space: an access outside the
//!   thing it points into is an error, never a read of other memory.

use std::collections::HashMap;

/// Global buffer `b` starts at this address.
pub fn global_address(buffer: usize) -> u64 {
    (buffer as u64 + 1) << 40
}

const OFFSET_MASK: u64 = (1 << 40) - 1;
const SHARED_TAG: u64 = 1 << 62;
const LOCAL_TAG: u64 = 1 << 61;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    F32,
    S32,
    U32,
    B32,
    Pred,
    S64,
    U64,
    B64,
}

#[derive(Clone, Copy, Debug)]
enum Special {
    Tid,
    Ctaid(u8),
    Nctaid(u8),
}

#[derive(Clone, Copy, Debug)]
enum Src {
    Reg(u32),
    Imm(u64),
    Special(Special),
    /// The address of a workgroup or per-thread array.
    Array(u32),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Space {
    Global,
    Shared,
    Local,
    Param,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op2 {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Max,
    Min,
    /// `max.NaN` and `min.NaN`: NaN if either operand is.
    MaxNan,
    MinNan,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op1 {
    Neg,
    Abs,
    Sqrt,
    Not,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Floor,
    Ceil,
    RoundEven,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Neu,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug)]
enum Ins {
    Mov {
        d: u32,
        s: Src,
    },
    /// `ld.param`: the i-th kernel parameter.
    LdParam {
        d: u32,
        param: usize,
    },
    Ld {
        space: Space,
        d: u32,
        addr: Src,
        offset: i64,
    },
    St {
        space: Space,
        addr: Src,
        offset: i64,
        s: Src,
    },
    Bin {
        op: Op2,
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
    },
    MulWide {
        signed: bool,
        d: u32,
        a: Src,
        b: Src,
    },
    Fma {
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    Un {
        op: Op1,
        ty: Ty,
        d: u32,
        a: Src,
    },
    /// Conversions between f32 and integers.
    Cvt {
        to: Ty,
        from: Ty,
        round_zero: bool,
        d: u32,
        a: Src,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
    },
    Selp {
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    Bra {
        target: usize,
    },
    Bar,
    /// `mma.sync.aligned.{m16n8k8,m16n8k16}.row.col.f32.{tf32,bf16}.*.f32 {d}, {a}, {b}, {c}`.
    Mma {
        kind: MmaKind,
        d: [u32; 4],
        a: Vec<Src>,
        b: Vec<Src>,
        c: [Src; 4],
    },
    /// `ld.global{.nc}.v4.u32 {d0, d1, d2, d3}, [addr]`: 16 aligned bytes.
    Ld4 {
        d: [u32; 4],
        addr: Src,
        offset: i64,
    },
    /// `ld.shared.v4.{f32,u32} {d0, d1, d2, d3}, [addr]`: 16 aligned bytes
    /// of a workgroup array.
    LdShared4 {
        d: [u32; 4],
        addr: Src,
        offset: i64,
    },
    /// `ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 {d0, d1, d2, d3},
    /// [addr]`: a warp's four 8 x 8 matrices of 16-bit values, lane `8i + j`
    /// giving the address of row `j` of matrix `i` (16 bytes).
    LdMatrix {
        d: [u32; 4],
        addr: Src,
        offset: i64,
        trans: bool,
    },
    /// `cp.async.cg.shared.global [dst], [src], 16, bytes`: the first
    /// `bytes` of 16 from global memory to a workgroup array, zeros after,
    /// landing at the next `cp.async.wait_group 0`.
    CpAsync {
        dst: Src,
        dst_offset: i64,
        src: Src,
        src_offset: i64,
        bytes: Src,
    },
    /// `cp.async.wait_group 0` (after `cp.async.commit_group`, a no-op here).
    CpAsyncWait,
    /// Nothing to do: `cp.async.commit_group`.
    Nop,
    /// `st.shared.v4.{f32,u32} [addr], {s0, s1, s2, s3}`.
    StShared4 {
        addr: Src,
        offset: i64,
        s: [Src; 4],
    },
    /// `cvt.rna.tf32.f32`: to 10 mantissa bits, ties away from zero.
    ToTf32 {
        d: u32,
        a: Src,
    },
    /// `cvt.rn.bf16x2.f32 d, hi, lo`: two bf16, ties to even.
    ToBf16x2 {
        d: u32,
        hi: Src,
        lo: Src,
    },
    /// `shfl.sync.bfly.b32 d, a, lanes, 31, -1`: `a` from lane `lane ^ lanes`.
    ShflBfly {
        d: u32,
        a: Src,
        lanes: u32,
    },
    Ret,
}

#[derive(Clone, Debug)]
struct Line {
    guard: Option<(u32, bool)>,
    ins: Ins,
}

/// One `.entry` of a module.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<String>,
    /// Bytes of each workgroup array, then of each per-thread array.
    shared: Vec<usize>,
    local: Vec<usize>,
    /// Which arrays are per-thread: array index -> (is local, index in its list).
    arrays: Vec<(bool, usize)>,
    /// Where each workgroup array starts in the shared window (its 32-bit
    /// address, what `mov.u32 %r, wg0` gives): 16 MiB apart, so that an
    /// access past an array's end is in no array (an error) and a word's
    /// bank is its index's.
    window: Vec<u64>,
    registers: usize,
    code: Vec<Line>,
    pub max_threads: u32,
}

fn err<T>(line: &str, what: &str) -> Result<T, String> {
    Err(format!("{what} in `{}`", line.trim()))
}

/// Parses the one entry of a module the printer wrote.
pub fn parse(text: &str) -> Result<Kernel, String> {
    let mut k = Kernel {
        name: String::new(),
        params: vec![],
        shared: vec![],
        local: vec![],
        arrays: vec![],
        window: vec![],
        registers: 0,
        code: vec![],
        max_threads: 1024,
    };
    let mut regs: HashMap<String, u32> = HashMap::new();
    let mut arrays: HashMap<String, u32> = HashMap::new();
    let mut labels: HashMap<String, usize> = HashMap::new();
    let mut pending: Vec<(usize, String)> = vec![];
    let mut in_params = false;
    for raw in text.lines() {
        let line = raw.split("//").next().unwrap().trim();
        if line.is_empty() || line == "{" || line == "}" {
            continue;
        }
        if in_params {
            if line.starts_with(')') {
                in_params = false;
                continue;
            }
            let name = line.trim_end_matches(',').split_whitespace().last().unwrap_or("");
            if !line.starts_with(".param .u64") {
                return err(line, "a parameter that is not .u64");
            }
            k.params.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix(".visible .entry ") {
            k.name = rest.trim_end_matches('(').to_string();
            in_params = true;
            continue;
        }
        if line.starts_with(".version") || line.starts_with(".target") || line.starts_with(".address_size") {
            continue;
        }
        if let Some(rest) = line.strip_prefix(".maxntid ") {
            k.max_threads = rest.split(',').next().unwrap().trim().parse().map_err(|_| format!("bad `{line}`"))?;
            continue;
        }
        if line.starts_with(".reg ") {
            // `.reg .f32 %tf<12>;`
            let decl = line.trim_end_matches(';').split_whitespace().last().unwrap();
            let (base, count) = decl.split_once('<').ok_or_else(|| format!("bad `{line}`"))?;
            let count: usize = count.trim_end_matches('>').parse().map_err(|_| format!("bad `{line}`"))?;
            for i in 0..count {
                let n = regs.len() as u32;
                regs.insert(format!("{base}{i}"), n);
            }
            continue;
        }
        if line.starts_with(".shared ") || line.starts_with(".local ") {
            // `.shared .align 4 .f32 wg0[1024];`
            let local = line.starts_with(".local");
            let decl = line.trim_end_matches(';').split_whitespace().last().unwrap();
            let (name, len) = decl.split_once('[').ok_or_else(|| format!("bad `{line}`"))?;
            let len: usize = len.trim_end_matches(']').parse().map_err(|_| format!("bad `{line}`"))?;
            if !line.contains(".f32") {
                return err(line, "an array that is not f32");
            }
            if !local {
                k.window.push((k.window.len() as u64 + 1) << 24);
            }
            let list = if local { &mut k.local } else { &mut k.shared };
            list.push(len * 4);
            k.arrays.push((local, list.len() - 1));
            arrays.insert(name.to_string(), k.arrays.len() as u32 - 1);
            continue;
        }
        if let Some(label) = line.strip_suffix(':') {
            labels.insert(label.to_string(), k.code.len());
            continue;
        }
        if line.starts_with('.') {
            return err(line, "an unknown directive");
        }
        let (guard, body) = match line.strip_prefix('@') {
            Some(rest) => {
                let (g, body) = rest.split_once(' ').ok_or_else(|| format!("bad `{line}`"))?;
                let (neg, g) = match g.strip_prefix('!') {
                    Some(g) => (true, g),
                    None => (false, g),
                };
                let r = *regs.get(g).ok_or_else(|| format!("unknown register `{g}` in `{line}`"))?;
                (Some((r, neg)), body.trim())
            }
            None => (None, line),
        };
        let body = body.trim_end_matches(';');
        let (opcode, operands) = body.split_once(' ').unwrap_or((body, ""));
        let ops: Vec<&str> = if operands.is_empty() { vec![] } else { operands.split(',').map(str::trim).collect() };
        let reg = |s: &str| regs.get(s).copied().ok_or_else(|| format!("unknown register `{s}` in `{line}`"));
        let src = |s: &str| -> Result<Src, String> {
            if let Some(r) = regs.get(s) {
                return Ok(Src::Reg(*r));
            }
            if let Some(a) = arrays.get(s) {
                return Ok(Src::Array(*a));
            }
            let special = match s {
                "%tid.x" => Some(Special::Tid),
                "%ctaid.x" => Some(Special::Ctaid(0)),
                "%ctaid.y" => Some(Special::Ctaid(1)),
                "%ctaid.z" => Some(Special::Ctaid(2)),
                "%nctaid.x" => Some(Special::Nctaid(0)),
                "%nctaid.y" => Some(Special::Nctaid(1)),
                "%nctaid.z" => Some(Special::Nctaid(2)),
                _ => None,
            };
            if let Some(sp) = special {
                return Ok(Src::Special(sp));
            }
            if let Some(hex) = s.strip_prefix("0f") {
                return u32::from_str_radix(hex, 16).map(|b| Src::Imm(b as u64)).map_err(|_| format!("bad `{s}`"));
            }
            s.parse::<i64>().map(|v| Src::Imm(v as u64)).map_err(|_| format!("unknown operand `{s}` in `{line}`"))
        };
        // `[%td3]`, `[%base1+8]`, `[arena]`
        let address = |s: &str| -> Result<(Src, i64), String> {
            let inner = s
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .ok_or_else(|| format!("bad address in `{line}`"))?;
            match inner.split_once('+') {
                Some((r, off)) => Ok((src(r)?, off.parse().map_err(|_| format!("bad offset in `{line}`"))?)),
                None => Ok((src(inner)?, 0)),
            }
        };
        let parts: Vec<&str> = opcode.split('.').collect();
        let ty_of = |t: &str| -> Result<Ty, String> {
            Ok(match t {
                "f32" => Ty::F32,
                "s32" => Ty::S32,
                "u32" => Ty::U32,
                "b32" => Ty::B32,
                "pred" => Ty::Pred,
                "s64" => Ty::S64,
                "u64" => Ty::U64,
                "b64" => Ty::B64,
                _ => return Err(format!("unknown type `.{t}` in `{line}`")),
            })
        };
        let last_ty = || ty_of(parts.last().unwrap());
        let want = |n: usize| if ops.len() == n { Ok(()) } else { err(line, "a wrong operand count") };
        let ins = match parts[0] {
            "mov" => {
                want(2)?;
                Ins::Mov { d: reg(ops[0])?, s: src(ops[1])? }
            }
            "cvta" => {
                // Global addresses are the buffers' own: nothing to convert.
                want(2)?;
                Ins::Mov { d: reg(ops[0])?, s: src(ops[1])? }
            }
            "ld" if opcode == "ld.global.v4.u32" || opcode == "ld.global.nc.v4.u32" => {
                let (regs, at) = operands.split_once("},").ok_or_else(|| format!("bad `{line}`"))?;
                let d: Vec<u32> =
                    regs.trim_start_matches('{').split(',').map(|r| reg(r.trim())).collect::<Result<_, _>>()?;
                let d: [u32; 4] =
                    d.try_into().map_err(|_| format!("a v4 load into other than four registers: `{line}`"))?;
                let (addr, offset) = address(at.trim())?;
                Ins::Ld4 { d, addr, offset }
            }
            "ldmatrix" => {
                let trans = match opcode {
                    "ldmatrix.sync.aligned.m8n8.x4.shared.b16" => false,
                    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" => true,
                    _ => return err(line, "an ldmatrix shape the interpreter does not know"),
                };
                let (list, at) = operands.split_once("},").ok_or_else(|| format!("bad `{line}`"))?;
                let d: Vec<u32> =
                    list.trim_start_matches('{').split(',').map(|r| reg(r.trim())).collect::<Result<_, _>>()?;
                let d: [u32; 4] =
                    d.try_into().map_err(|_| format!("an ldmatrix into other than four registers: `{line}`"))?;
                let (addr, offset) = address(at.trim())?;
                Ins::LdMatrix { d, addr, offset, trans }
            }
            "ld" | "st" if parts.get(1) == Some(&"shared") && parts.get(2) == Some(&"v4") => {
                if !matches!(last_ty()?, Ty::F32 | Ty::U32) {
                    return err(line, "a vector access of an unknown width");
                }
                let four = |list: &str| -> Result<[Src; 4], String> {
                    let list = list.trim().strip_prefix('{').and_then(|l| l.strip_suffix('}'));
                    let list = list.ok_or_else(|| format!("bad register list in `{line}`"))?;
                    let v: Vec<Src> = list.split(',').map(|r| src(r.trim())).collect::<Result<_, _>>()?;
                    v.try_into().map_err(|_| format!("a v4 access of other than four registers: `{line}`"))
                };
                if parts[0] == "ld" {
                    let (list, at) = operands.split_once("},").ok_or_else(|| format!("bad `{line}`"))?;
                    let d = four(&format!("{list}}}"))?.map(|s| match s {
                        Src::Reg(r) => Ok(r),
                        _ => Err(format!("a v4 load into other than registers: `{line}`")),
                    });
                    let [a, b, c, e] = d;
                    let (addr, offset) = address(at.trim())?;
                    Ins::LdShared4 { d: [a?, b?, c?, e?], addr, offset }
                } else {
                    let (at, list) = operands.split_once("],").ok_or_else(|| format!("bad `{line}`"))?;
                    let (addr, offset) = address(&format!("{at}]"))?;
                    Ins::StShared4 { addr, offset, s: four(list)? }
                }
            }
            "ld" | "st" => {
                let space = match parts.get(1) {
                    Some(&"global") => Space::Global,
                    Some(&"shared") => Space::Shared,
                    Some(&"local") => Space::Local,
                    Some(&"param") => Space::Param,
                    _ => return err(line, "an unknown state space"),
                };
                let t = last_ty()?;
                if !matches!(t, Ty::U32 | Ty::F32 | Ty::U64) {
                    return err(line, "an access of an unknown width");
                }
                want(2)?;
                if parts[0] == "ld" {
                    if space == Space::Param {
                        let name = ops[1].trim_start_matches('[').trim_end_matches(']');
                        let param = k
                            .params
                            .iter()
                            .position(|p| p == name)
                            .ok_or_else(|| format!("no parameter in `{line}`"))?;
                        Ins::LdParam { d: reg(ops[0])?, param }
                    } else {
                        let (addr, offset) = address(ops[1])?;
                        Ins::Ld { space, d: reg(ops[0])?, addr, offset }
                    }
                } else {
                    let (addr, offset) = address(ops[0])?;
                    Ins::St { space, addr, offset, s: src(ops[1])? }
                }
            }
            "add" | "sub" | "div" | "rem" | "max" | "min" | "and" | "or" | "xor" | "shl" | "shr" | "mul" => {
                want(3)?;
                if parts[0] == "mul" && parts.get(1) == Some(&"wide") {
                    let signed = parts[2] == "s32";
                    Ins::MulWide { signed, d: reg(ops[0])?, a: src(ops[1])?, b: src(ops[2])? }
                } else {
                    let op = match parts[0] {
                        "add" => Op2::Add,
                        "sub" => Op2::Sub,
                        "mul" => Op2::Mul,
                        "div" => Op2::Div,
                        "rem" => Op2::Rem,
                        "max" if parts.get(1) == Some(&"NaN") => Op2::MaxNan,
                        "min" if parts.get(1) == Some(&"NaN") => Op2::MinNan,
                        "max" => Op2::Max,
                        "min" => Op2::Min,
                        "and" => Op2::And,
                        "or" => Op2::Or,
                        "xor" => Op2::Xor,
                        "shl" => Op2::Shl,
                        _ => Op2::Shr,
                    };
                    Ins::Bin { op, ty: last_ty()?, d: reg(ops[0])?, a: src(ops[1])?, b: src(ops[2])? }
                }
            }
            "fma" => {
                want(4)?;
                if last_ty()? != Ty::F32 {
                    return err(line, "an fma that is not f32");
                }
                Ins::Fma { d: reg(ops[0])?, a: src(ops[1])?, b: src(ops[2])?, c: src(ops[3])? }
            }
            "neg" | "abs" | "sqrt" | "not" | "ex2" | "lg2" | "sin" | "cos" => {
                want(2)?;
                let op = match parts[0] {
                    "neg" => Op1::Neg,
                    "abs" => Op1::Abs,
                    "sqrt" => Op1::Sqrt,
                    "not" => Op1::Not,
                    "ex2" => Op1::Ex2,
                    "lg2" => Op1::Lg2,
                    "sin" => Op1::Sin,
                    _ => Op1::Cos,
                };
                Ins::Un { op, ty: last_ty()?, d: reg(ops[0])?, a: src(ops[1])? }
            }
            "cvt" if opcode == "cvt.rna.tf32.f32" => {
                want(2)?;
                Ins::ToTf32 { d: reg(ops[0])?, a: src(ops[1])? }
            }
            "cvt" if opcode == "cvt.rn.bf16x2.f32" => {
                want(3)?;
                Ins::ToBf16x2 { d: reg(ops[0])?, hi: src(ops[1])?, lo: src(ops[2])? }
            }
            "mma" => {
                let kind = match opcode {
                    "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" => MmaKind::Tf32,
                    "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32" => MmaKind::Bf16,
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" => MmaKind::Bf16K16,
                    _ => return err(line, "an mma shape or type the interpreter does not know"),
                };
                // Four brace groups: d, a, b, c.
                let groups: Vec<Vec<&str>> = operands
                    .split('}')
                    .map(|g| g.trim_start_matches([',', ' ']).trim_start_matches('{'))
                    .filter(|g| !g.trim().is_empty())
                    .map(|g| g.split(',').map(str::trim).collect())
                    .collect();
                let (na, nb) = if kind == MmaKind::Bf16 { (2, 1) } else { (4, 2) };
                let shapes = [4, na, nb, 4];
                if groups.len() != 4 || groups.iter().zip(shapes).any(|(g, n)| g.len() != n) {
                    return err(line, "mma operands of the wrong shape");
                }
                let four = |g: &Vec<&str>| -> Result<[Src; 4], String> {
                    Ok([src(g[0])?, src(g[1])?, src(g[2])?, src(g[3])?])
                };
                Ins::Mma {
                    kind,
                    d: [reg(groups[0][0])?, reg(groups[0][1])?, reg(groups[0][2])?, reg(groups[0][3])?],
                    a: groups[1].iter().map(|x| src(x)).collect::<Result<_, _>>()?,
                    b: groups[2].iter().map(|x| src(x)).collect::<Result<_, _>>()?,
                    c: four(&groups[3])?,
                }
            }
            "cvt" => {
                want(2)?;
                // cvt.rmi.f32.f32, cvt.rn.f32.s32, cvt.rzi.s32.f32
                let (to, from) = (ty_of(parts[parts.len() - 2])?, last_ty()?);
                let (d, a) = (reg(ops[0])?, src(ops[1])?);
                match (parts[1], to, from) {
                    ("rmi", Ty::F32, Ty::F32) => Ins::Un { op: Op1::Floor, ty: Ty::F32, d, a },
                    ("rpi", Ty::F32, Ty::F32) => Ins::Un { op: Op1::Ceil, ty: Ty::F32, d, a },
                    ("rni", Ty::F32, Ty::F32) => Ins::Un { op: Op1::RoundEven, ty: Ty::F32, d, a },
                    ("rn", Ty::F32, _) => Ins::Cvt { to, from, round_zero: false, d, a },
                    ("rzi", _, Ty::F32) => Ins::Cvt { to, from, round_zero: true, d, a },
                    _ => return err(line, "an unknown conversion"),
                }
            }
            "setp" => {
                want(3)?;
                let cmp = match parts[1] {
                    "eq" => Cmp::Eq,
                    "ne" => Cmp::Ne,
                    "neu" => Cmp::Neu,
                    "lt" => Cmp::Lt,
                    "le" => Cmp::Le,
                    "gt" => Cmp::Gt,
                    "ge" => Cmp::Ge,
                    _ => return err(line, "an unknown comparison"),
                };
                Ins::Setp { cmp, ty: last_ty()?, d: reg(ops[0])?, a: src(ops[1])?, b: src(ops[2])? }
            }
            "selp" => {
                want(4)?;
                Ins::Selp { d: reg(ops[0])?, a: src(ops[1])?, b: src(ops[2])?, c: src(ops[3])? }
            }
            "bra" => {
                want(1)?;
                pending.push((k.code.len(), ops[0].to_string()));
                Ins::Bra { target: usize::MAX }
            }
            "bar" if parts.get(1) == Some(&"sync") => Ins::Bar,
            "cp" if opcode == "cp.async.cg.shared.global" => {
                want(4)?;
                if ops[2] != "16" {
                    return err(line, "a cp.async of other than 16 bytes");
                }
                let ((dst, dst_offset), (from, src_offset)) = (address(ops[0])?, address(ops[1])?);
                Ins::CpAsync { dst, dst_offset, src: from, src_offset, bytes: src(ops[3])? }
            }
            "cp" if opcode == "cp.async.commit_group" => Ins::Nop,
            "cp" if opcode == "cp.async.wait_group" && ops == ["0"] => Ins::CpAsyncWait,
            "shfl" if opcode == "shfl.sync.bfly.b32" => {
                want(5)?;
                if ops[3] != "31" || ops[4] != "-1" {
                    return err(line, "a shuffle over part of a warp");
                }
                let lanes = ops[2].parse().map_err(|_| format!("bad lane mask in `{line}`"))?;
                if lanes >= 32 {
                    return err(line, "a lane mask past the warp");
                }
                Ins::ShflBfly { d: reg(ops[0])?, a: src(ops[1])?, lanes }
            }
            "ret" => Ins::Ret,
            _ => return err(line, "an instruction the interpreter does not know"),
        };
        k.code.push(Line { guard, ins });
    }
    for (at, label) in pending {
        let target = *labels.get(&label).ok_or_else(|| format!("no label `{label}`"))?;
        k.code[at].ins = Ins::Bra { target };
    }
    k.registers = regs.len();
    if k.name.is_empty() {
        return Err("no .entry".into());
    }
    Ok(k)
}

/// Global memory: buffers of bytes, addressed through `global_address`;
/// with `banks`, the shared-memory bank conflicts of the kernels launched
/// are counted there.
pub struct Memory {
    pub buffers: Vec<Vec<u8>>,
    pub banks: Option<BankStats>,
}

/// Shared-memory requests of whole warps and the wavefronts they take on
/// 32 banks of 4 bytes. A request of one word a lane takes as many
/// wavefronts as the largest number of distinct words its lanes touch in
/// one bank (lanes reading one word share it), one at best; a request of
/// four words a lane (`.v4`) is served a quarter warp at a time, each
/// quarter as many wavefronts as its largest such number, one a quarter at
/// best. `wavefronts - ideal` is the number of conflicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BankStats {
    pub requests: u64,
    pub wavefronts: u64,
    /// The wavefronts the requests would take without conflicts.
    pub ideal: u64,
}

impl BankStats {
    pub fn conflicts(&self) -> u64 {
        self.wavefronts - self.ideal
    }
}

struct Thread {
    pc: usize,
    regs: Vec<u64>,
    local: Vec<Vec<u8>>,
    /// Shared accesses since the last barrier, when banks are counted: the
    /// instruction, the array, the first word and how many words (1, or 4
    /// for a vector access).
    shared_log: Vec<(u32, u32, u32, u32)>,
    /// `cp.async` copies not yet waited for: array, byte offset, bytes.
    pending: Vec<(usize, usize, [u8; 16])>,
}

/// The lanes of each warp meet at the same shared access in the same order
/// (their `n`-th run of the instruction at `pc` is one request): each
/// request's wavefronts go to `stats`, and the logs are emptied.
fn count_banks(ts: &mut [Thread], stats: &mut BankStats) {
    use std::collections::{BTreeMap, HashMap, HashSet};
    // The wavefronts one group of lanes' words take.
    let wavefronts = |words: &mut dyn Iterator<Item = (u32, u32)>| -> u64 {
        let mut banks: HashMap<u32, HashSet<(u32, u32)>> = HashMap::new();
        for (arr, word) in words {
            banks.entry(word % 32).or_default().insert((arr, word));
        }
        banks.values().map(|w| w.len() as u64).max().unwrap_or(0)
    };
    for warp in ts.chunks_mut(32) {
        // (pc, run) -> each lane's (lane, array, first word, words)
        type Access = (u32, u32, u32, u32);
        let mut requests: BTreeMap<(u32, u32), Vec<Access>> = BTreeMap::new();
        for (lane, t) in warp.iter_mut().enumerate() {
            let mut runs: HashMap<u32, u32> = HashMap::new();
            for &(pc, arr, word, width) in &t.shared_log {
                let n = runs.entry(pc).or_default();
                requests.entry((pc, *n)).or_default().push((lane as u32, arr, word, width));
                *n += 1;
            }
            t.shared_log.clear();
        }
        for access in requests.values() {
            stats.requests += 1;
            if access.iter().all(|a| a.3 == 1) {
                stats.wavefronts += wavefronts(&mut access.iter().map(|&(_, arr, word, _)| (arr, word))).max(1);
                stats.ideal += 1;
                continue;
            }
            for quarter in 0..4 {
                let mut words = access
                    .iter()
                    .filter(|a| a.0 / 8 == quarter)
                    .flat_map(|&(_, arr, first, width)| (first..first + width).map(move |w| (arr, w)));
                let w = wavefronts(&mut words);
                if w > 0 {
                    stats.wavefronts += w;
                    stats.ideal += 1;
                }
            }
        }
    }
}

fn f(x: u64) -> f32 {
    f32::from_bits(x as u32)
}
fn fb(x: f32) -> u64 {
    x.to_bits() as u64
}

fn check(mem: &[u8], off: u64, what: &str) -> Result<usize, String> {
    let off = off as usize;
    if off % 4 != 0 || off + 4 > mem.len() {
        return Err(format!("{what}: access at byte {off} outside its {} bytes", mem.len()));
    }
    Ok(off)
}

/// Runs `k` over a grid of `grid` blocks of `threads` threads, with kernel
/// parameters `params` (global addresses). Returns how many instructions
/// ran.
pub fn launch(k: &Kernel, grid: [u32; 3], threads: u32, params: &[u64], mem: &mut Memory) -> Result<u64, String> {
    if params.len() != k.params.len() {
        return Err(format!("{}: {} parameters given, {} declared", k.name, params.len(), k.params.len()));
    }
    if threads > k.max_threads {
        return Err(format!("{}: {threads} threads, more than .maxntid {}", k.name, k.max_threads));
    }
    let mut executed = 0u64;
    for gz in 0..grid[2] {
        for gy in 0..grid[1] {
            for gx in 0..grid[0] {
                executed += run_block(k, grid, [gx, gy, gz], threads, params, mem)?;
            }
        }
    }
    Ok(executed)
}

fn run_block(
    k: &Kernel,
    grid: [u32; 3],
    block: [u32; 3],
    threads: u32,
    params: &[u64],
    mem: &mut Memory,
) -> Result<u64, String> {
    let mut shared: Vec<Vec<u8>> = k.shared.iter().map(|&b| vec![0; b]).collect();
    let mut ts: Vec<Thread> = (0..threads)
        .map(|_| Thread {
            pc: 0,
            regs: vec![0; k.registers],
            local: k.local.iter().map(|&b| vec![0; b]).collect(),
            shared_log: vec![],
            pending: vec![],
        })
        .collect();
    let mut executed = 0u64;
    // Where each thread stopped: None while it can run on.
    let mut stops: Vec<Option<Stop>> = vec![None; ts.len()];
    loop {
        for (tid, t) in ts.iter_mut().enumerate() {
            if stops[tid].is_none() {
                let stop = step_until_sync(k, t, tid as u32, grid, block, params, mem, &mut shared, &mut executed)?;
                stops[tid] = Some(stop);
            }
        }
        let mut progressed = false;
        // Warps whose lanes all wait at one mma multiply and run on.
        for warp in 0..ts.len().div_ceil(32) {
            let lanes = warp * 32..((warp + 1) * 32).min(ts.len());
            let Some(pc) = lanes.clone().find_map(|l| match stops[l] {
                Some(Stop::Mma { pc, .. }) => Some(pc),
                _ => None,
            }) else {
                continue;
            };
            let fragments: Vec<Fragments> = lanes
                .clone()
                .filter_map(|l| match stops[l] {
                    Some(Stop::Mma { pc: p, kind, a, b, c, .. }) if p == pc => Some((kind, a, b, c)),
                    _ => None,
                })
                .collect();
            if fragments.len() != 32 {
                return Err(format!("{}: block {block:?}: warp {warp} reaches an mma without all 32 lanes", k.name));
            }
            for (l, result) in lanes.clone().zip(mma_warp(&fragments)) {
                let Some(Stop::Mma { d, .. }) = stops[l] else { unreachable!("checked above") };
                for (r, v) in d.iter().zip(result) {
                    ts[l].regs[*r as usize] = fb(v);
                }
                stops[l] = None;
            }
            progressed = true;
        }
        // Warps whose lanes all wait at one ldmatrix load and run on.
        for warp in 0..ts.len().div_ceil(32) {
            let lanes = warp * 32..((warp + 1) * 32).min(ts.len());
            let Some(pc) = lanes.clone().find_map(|l| match stops[l] {
                Some(Stop::LdMatrix { pc, .. }) => Some(pc),
                _ => None,
            }) else {
                continue;
            };
            // Each lane's row: four words.
            let rows: Vec<[u32; 4]> = lanes
                .clone()
                .filter_map(|l| match stops[l] {
                    Some(Stop::LdMatrix { pc: p, arr, off, .. }) if p == pc => Some([0, 1, 2, 3].map(|w| {
                        let at = off + 4 * w;
                        u32::from_le_bytes(shared[arr][at..at + 4].try_into().unwrap())
                    })),
                    _ => None,
                })
                .collect();
            if rows.len() != 32 {
                return Err(format!(
                    "{}: block {block:?}: warp {warp} reaches an ldmatrix without all 32 lanes",
                    k.name
                ));
            }
            // The 16-bit value at column `c` of row `r` of matrix `m`.
            let half = |m: usize, r: usize, c: usize| (rows[8 * m + r][c / 2] >> (16 * (c % 2))) & 0xffff;
            for (i, l) in lanes.clone().enumerate() {
                let Some(Stop::LdMatrix { d, trans, .. }) = stops[l] else { unreachable!("checked above") };
                let (g, t) = (i / 4, i % 4);
                for (m, r) in d.iter().enumerate() {
                    // Row g, columns 2t and 2t + 1; transposed, rows 2t
                    // and 2t + 1 of column g. The first in the low half.
                    let (lo, hi) = if trans {
                        (half(m, 2 * t, g), half(m, 2 * t + 1, g))
                    } else {
                        (half(m, g, 2 * t), half(m, g, 2 * t + 1))
                    };
                    ts[l].regs[*r as usize] = (lo | hi << 16) as u64;
                }
                stops[l] = None;
            }
            progressed = true;
        }
        // Warps whose lanes all wait at one shuffle exchange and run on.
        for warp in 0..ts.len().div_ceil(32) {
            let lanes = warp * 32..((warp + 1) * 32).min(ts.len());
            let Some(pc) = lanes.clone().find_map(|l| match stops[l] {
                Some(Stop::Shuffle { pc, .. }) => Some(pc),
                _ => None,
            }) else {
                continue;
            };
            let together = lanes.clone().all(|l| matches!(stops[l], Some(Stop::Shuffle { pc: p, .. }) if p == pc));
            if !together {
                return Err(format!(
                    "{}: block {block:?}: warp {warp} reaches a shuffle with some of its lanes",
                    k.name
                ));
            }
            let values: Vec<u64> = lanes
                .clone()
                .map(|l| match stops[l] {
                    Some(Stop::Shuffle { value, .. }) => value,
                    _ => unreachable!("checked above"),
                })
                .collect();
            for l in lanes.clone() {
                let Some(Stop::Shuffle { d, lanes: x, .. }) = stops[l] else { unreachable!("checked above") };
                let from = (l - lanes.start) ^ x as usize;
                let value = values.get(from).ok_or_else(|| format!("{}: a shuffle past the warp", k.name))?;
                ts[l].regs[d as usize] = *value;
                stops[l] = None;
            }
            progressed = true;
        }
        if progressed {
            continue;
        }
        // Every thread is at a barrier or done: the requests since the last.
        if let Some(stats) = mem.banks.as_mut() {
            count_banks(&mut ts, stats);
        }
        let done = stops.iter().filter(|s| matches!(s, Some(Stop::Exit))).count();
        if done == ts.len() {
            return Ok(executed);
        }
        let waiting = stops.iter().filter(|s| matches!(s, Some(Stop::Barrier))).count();
        if waiting != ts.len() {
            return Err(format!(
                "{}: block {block:?}: {waiting} threads wait at a barrier that {done} exited threads never reach",
                k.name
            ));
        }
        stops.iter_mut().for_each(|s| *s = None);
    }
}

/// Why a thread stopped running on its own.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Barrier,
    /// At the shuffle at `pc`, offering `value`, wanting lane `lane ^ lanes`'s into `d`.
    Shuffle {
        pc: usize,
        value: u64,
        d: u32,
        lanes: u32,
    },
    /// At the `ldmatrix` at `pc`, giving the row at byte `off` of shared
    /// array `arr`.
    LdMatrix {
        pc: usize,
        d: [u32; 4],
        trans: bool,
        arr: usize,
        off: usize,
    },
    /// At the `mma` at `pc` with this lane's fragments.
    Mma {
        pc: usize,
        kind: MmaKind,
        d: [u32; 4],
        a: [u32; 4],
        b: [u32; 2],
        c: [f32; 4],
    },
    Exit,
}

/// The `mma` shapes and types the interpreter knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MmaKind {
    /// m16n8k8 on tf32: A four registers, B two, one value each.
    Tf32,
    /// m16n8k8 on bf16: A two registers, B one, two values each.
    Bf16,
    /// m16n8k16 on bf16: A four registers, B two, two values each.
    Bf16K16,
}

/// One lane's fragments at an `mma`: its kind, A, B and C.
type Fragments = (MmaKind, [u32; 4], [u32; 2], [f32; 4]);

/// A warp's m16n8k8 or m16n8k16 product from its lanes' fragments, laid
/// out as the PTX ISA documents them (groupID = lane / 4,
/// threadID_in_group = lane % 4): returns each lane's four results.
fn mma_warp(lanes: &[Fragments]) -> Vec<[f32; 4]> {
    let mut a = [[0f32; 16]; 16];
    let mut b = [[0f32; 8]; 16];
    let mut c = [[0f32; 8]; 16];
    let bf16 = |h: u32| f32::from_bits(h << 16);
    let tf32 = |w: u32| f32::from_bits(w & 0xffff_e000);
    for (lane, (kind, fa, fb, fc)) in lanes.iter().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        match kind {
            MmaKind::Bf16 | MmaKind::Bf16K16 => {
                // A: rows g and g + 8, columns 2t and 2t + 1 (and 8 more
                // for k16, in registers 2 and 3); B: rows 2t and 2t + 1
                // (and 8 more), column g. The lower element in the low half.
                let (na, nb) = if *kind == MmaKind::Bf16 { (2, 1) } else { (4, 2) };
                for (r, reg) in fa[..na].iter().enumerate() {
                    let (row, col) = (g + 8 * (r % 2), 2 * t + 8 * (r / 2));
                    a[row][col] = bf16(reg & 0xffff);
                    a[row][col + 1] = bf16(reg >> 16);
                }
                for (r, reg) in fb[..nb].iter().enumerate() {
                    b[2 * t + 8 * r][g] = bf16(reg & 0xffff);
                    b[2 * t + 8 * r + 1][g] = bf16(reg >> 16);
                }
            }
            MmaKind::Tf32 => {
                a[g][t] = tf32(fa[0]);
                a[g + 8][t] = tf32(fa[1]);
                a[g][t + 4] = tf32(fa[2]);
                a[g + 8][t + 4] = tf32(fa[3]);
                b[t][g] = tf32(fb[0]);
                b[t + 4][g] = tf32(fb[1]);
            }
        }
        c[g][2 * t] = fc[0];
        c[g][2 * t + 1] = fc[1];
        c[g + 8][2 * t] = fc[2];
        c[g + 8][2 * t + 1] = fc[3];
    }
    let depth = if lanes.first().is_some_and(|l| l.0 == MmaKind::Bf16K16) { 16 } else { 8 };
    let d = |r: usize, col: usize| (0..depth).fold(c[r][col], |acc, k| a[r][k].mul_add(b[k][col], acc));
    (0..lanes.len())
        .map(|lane| {
            let (g, t) = (lane / 4, lane % 4);
            [d(g, 2 * t), d(g, 2 * t + 1), d(g + 8, 2 * t), d(g + 8, 2 * t + 1)]
        })
        .collect()
}

/// Runs one thread until `bar.sync`, a shuffle or `ret`.
#[allow(clippy::too_many_arguments)]
fn step_until_sync(
    k: &Kernel,
    t: &mut Thread,
    tid: u32,
    grid: [u32; 3],
    block: [u32; 3],
    params: &[u64],
    mem: &mut Memory,
    shared: &mut [Vec<u8>],
    executed: &mut u64,
) -> Result<Stop, String> {
    loop {
        let Some(line) = k.code.get(t.pc) else { return Err(format!("{}: ran off the end", k.name)) };
        t.pc += 1;
        *executed += 1;
        if let Some((p, neg)) = line.guard {
            if (t.regs[p as usize] != 0) == neg {
                continue;
            }
        }
        let v = |t: &Thread, s: Src| -> u64 {
            match s {
                Src::Reg(r) => t.regs[r as usize],
                Src::Imm(i) => i,
                Src::Special(Special::Tid) => tid as u64,
                Src::Special(Special::Ctaid(a)) => block[a as usize] as u64,
                Src::Special(Special::Nctaid(a)) => grid[a as usize] as u64,
                Src::Array(a) => {
                    let (local, _) = k.arrays[a as usize];
                    if local {
                        LOCAL_TAG | ((a as u64) << 32)
                    } else {
                        k.window[k.arrays[a as usize].1]
                    }
                }
            }
        };
        match line.ins {
            Ins::Mov { d, s } => t.regs[d as usize] = v(t, s),
            Ins::LdParam { d, param } => t.regs[d as usize] = params[param],
            Ins::Ld { space, d, addr, offset } => {
                let a = v(t, addr).wrapping_add(offset as u64);
                let word = match space {
                    Space::Global => {
                        let b = (a >> 40) as usize;
                        let buf = b
                            .checked_sub(1)
                            .and_then(|b| mem.buffers.get(b))
                            .ok_or_else(|| format!("{}: load from {a:#x}, which is in no buffer", k.name))?;
                        let off = check(buf, a & OFFSET_MASK, &format!("{}: global buffer {}", k.name, b - 1))?;
                        u32::from_le_bytes(buf[off..off + 4].try_into().unwrap())
                    }
                    Space::Shared | Space::Local => {
                        let (arr, off) = array_of(k, a, space)?;
                        let bytes = if space == Space::Shared { &shared[arr] } else { &t.local[arr] };
                        let off = check(bytes, off, &format!("{}: {space:?} array {arr}", k.name))?;
                        if space == Space::Shared && mem.banks.is_some() {
                            t.shared_log.push(((t.pc - 1) as u32, arr as u32, (off / 4) as u32, 1));
                        }
                        u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
                    }
                    Space::Param => unreachable!("parsed as LdParam"),
                };
                t.regs[d as usize] = word as u64;
            }
            Ins::St { space, addr, offset, s } => {
                let a = v(t, addr).wrapping_add(offset as u64);
                let word = (v(t, s) as u32).to_le_bytes();
                match space {
                    Space::Global => {
                        let b = (a >> 40) as usize;
                        let name = k.name.clone();
                        let buf = b
                            .checked_sub(1)
                            .and_then(|b| mem.buffers.get_mut(b))
                            .ok_or_else(|| format!("{name}: store to {a:#x}, which is in no buffer"))?;
                        let off = check(buf, a & OFFSET_MASK, &format!("{name}: global buffer {}", b - 1))?;
                        buf[off..off + 4].copy_from_slice(&word);
                    }
                    Space::Shared | Space::Local => {
                        let (arr, off) = array_of(k, a, space)?;
                        let bytes = if space == Space::Shared { &mut shared[arr] } else { &mut t.local[arr] };
                        let off = check(bytes, off, &format!("{}: {space:?} array {arr}", k.name))?;
                        bytes[off..off + 4].copy_from_slice(&word);
                        if space == Space::Shared && mem.banks.is_some() {
                            t.shared_log.push(((t.pc - 1) as u32, arr as u32, (off / 4) as u32, 1));
                        }
                    }
                    Space::Param => return Err(format!("{}: a store to a parameter", k.name)),
                }
            }
            Ins::Bin { op, ty, d, a, b } => {
                let (x, y) = (v(t, a), v(t, b));
                t.regs[d as usize] = binary(op, ty, x, y).map_err(|e| format!("{}: {e}", k.name))?;
            }
            Ins::MulWide { signed, d, a, b } => {
                let (x, y) = (v(t, a), v(t, b));
                t.regs[d as usize] = if signed {
                    ((x as u32 as i32 as i64) * (y as u32 as i32 as i64)) as u64
                } else {
                    (x as u32 as u64) * (y as u32 as u64)
                };
            }
            Ins::Fma { d, a, b, c } => t.regs[d as usize] = fb(f(v(t, a)).mul_add(f(v(t, b)), f(v(t, c)))),
            Ins::Un { op, ty, d, a } => {
                let x = v(t, a);
                t.regs[d as usize] = match (op, ty) {
                    (Op1::Not, _) => (x == 0) as u64,
                    (Op1::Neg, Ty::F32) => fb(-f(x)),
                    (Op1::Neg, _) => (x as u32 as i32).wrapping_neg() as u32 as u64,
                    (Op1::Abs, Ty::F32) => fb(f(x).abs()),
                    (Op1::Abs, _) => (x as u32 as i32).wrapping_abs() as u32 as u64,
                    (Op1::Sqrt, _) => fb(f(x).sqrt()),
                    // The approximate units, no better than the hardware
                    // documents them (ex2 within 2 ulp, lg2 and sin/cos
                    // within about 2^-22 and 2^-21 absolute): the exact
                    // result with its low mantissa bits cut off, so tests
                    // of the printer's range reductions see that error.
                    (Op1::Ex2, _) => fb(approx(ftz(ftz(f(x)).exp2()), 2)),
                    (Op1::Lg2, _) => fb(approx(f(x).log2(), 2)),
                    (Op1::Sin, _) => fb(approx(f(x).sin(), 3)),
                    (Op1::Cos, _) => fb(approx(f(x).cos(), 3)),
                    (Op1::Floor, _) => fb(f(x).floor()),
                    (Op1::Ceil, _) => fb(f(x).ceil()),
                    (Op1::RoundEven, _) => fb(f(x).round_ties_even()),
                };
            }
            Ins::Cvt { to, from, round_zero, d, a } => {
                let x = v(t, a);
                t.regs[d as usize] = match (to, from) {
                    (Ty::F32, Ty::S32) => fb(x as u32 as i32 as f32),
                    (Ty::F32, Ty::U32) => fb(x as u32 as f32),
                    (Ty::S32, Ty::F32) if round_zero => (f(x) as i32) as u32 as u64,
                    (Ty::U32, Ty::F32) if round_zero => (f(x) as u32) as u64,
                    _ => return Err(format!("{}: unknown conversion {to:?} <- {from:?}", k.name)),
                };
            }
            Ins::Setp { cmp, ty, d, a, b } => {
                let (x, y) = (v(t, a), v(t, b));
                let r = match ty {
                    Ty::F32 => {
                        let (x, y) = (f(x), f(y));
                        match cmp {
                            Cmp::Eq => x == y,
                            Cmp::Ne => x < y || x > y,
                            Cmp::Neu => x != y,
                            Cmp::Lt => x < y,
                            Cmp::Le => x <= y,
                            Cmp::Gt => x > y,
                            Cmp::Ge => x >= y,
                        }
                    }
                    Ty::S32 => {
                        let (x, y) = (x as u32 as i32, y as u32 as i32);
                        compare(cmp, x, y)
                    }
                    _ => compare(cmp, x as u32, y as u32),
                };
                t.regs[d as usize] = r as u64;
            }
            Ins::Selp { d, a, b, c } => t.regs[d as usize] = if v(t, c) != 0 { v(t, a) } else { v(t, b) },
            Ins::Bra { target } => t.pc = target,
            Ins::Bar => return Ok(Stop::Barrier),
            Ins::Nop => {}
            Ins::CpAsync { dst, dst_offset, src, src_offset, bytes } => {
                let (arr, off) = shared4(k, v(t, dst).wrapping_add(dst_offset as u64), shared)?;
                let n = v(t, bytes) as usize;
                if n > 16 || n % 4 != 0 {
                    return Err(format!("{}: a cp.async of {n} bytes", k.name));
                }
                let mut data = [0u8; 16];
                if n > 0 {
                    let a = v(t, src).wrapping_add(src_offset as u64);
                    if a % 16 != 0 {
                        return Err(format!("{}: a cp.async from {a:#x}, which is not 16-byte aligned", k.name));
                    }
                    let b = (a >> 40) as usize;
                    let buf = b
                        .checked_sub(1)
                        .and_then(|b| mem.buffers.get(b))
                        .ok_or_else(|| format!("{}: cp.async from {a:#x}, which is in no buffer", k.name))?;
                    let from = (a & OFFSET_MASK) as usize;
                    if from + n > buf.len() {
                        return Err(format!(
                            "{}: global buffer {}: a cp.async of {n} bytes at byte {from} outside its {} bytes",
                            k.name,
                            b - 1,
                            buf.len()
                        ));
                    }
                    data[..n].copy_from_slice(&buf[from..from + n]);
                }
                t.pending.push((arr, off, data));
            }
            Ins::CpAsyncWait => {
                for (arr, off, data) in t.pending.drain(..) {
                    shared[arr][off..off + 16].copy_from_slice(&data);
                }
            }
            Ins::ShflBfly { d, a, lanes } => return Ok(Stop::Shuffle { pc: t.pc - 1, value: v(t, a), d, lanes }),
            Ins::Mma { kind, d, ref a, ref b, c } => {
                let mut fa = [0u32; 4];
                for (x, s) in fa.iter_mut().zip(a) {
                    *x = v(t, *s) as u32;
                }
                let mut fbr = [0u32; 2];
                for (x, s) in fbr.iter_mut().zip(b) {
                    *x = v(t, *s) as u32;
                }
                let fc = c.map(|s| f(v(t, s)));
                return Ok(Stop::Mma { pc: t.pc - 1, kind, d, a: fa, b: fbr, c: fc });
            }
            Ins::LdMatrix { d, addr, offset, trans } => {
                let (arr, off) = shared4(k, v(t, addr).wrapping_add(offset as u64), shared)?;
                if mem.banks.is_some() {
                    t.shared_log.push(((t.pc - 1) as u32, arr as u32, (off / 4) as u32, 4));
                }
                return Ok(Stop::LdMatrix { pc: t.pc - 1, d, trans, arr, off });
            }
            Ins::LdShared4 { d, addr, offset } => {
                let (arr, off) = shared4(k, v(t, addr).wrapping_add(offset as u64), shared)?;
                for (j, r) in d.iter().enumerate() {
                    let at = off + 4 * j;
                    t.regs[*r as usize] = u32::from_le_bytes(shared[arr][at..at + 4].try_into().unwrap()) as u64;
                }
                if mem.banks.is_some() {
                    t.shared_log.push(((t.pc - 1) as u32, arr as u32, (off / 4) as u32, 4));
                }
            }
            Ins::StShared4 { addr, offset, s } => {
                let (arr, off) = shared4(k, v(t, addr).wrapping_add(offset as u64), shared)?;
                for (j, x) in s.iter().enumerate() {
                    let at = off + 4 * j;
                    shared[arr][at..at + 4].copy_from_slice(&(v(t, *x) as u32).to_le_bytes());
                }
                if mem.banks.is_some() {
                    t.shared_log.push(((t.pc - 1) as u32, arr as u32, (off / 4) as u32, 4));
                }
            }
            Ins::Ld4 { d, addr, offset } => {
                let a = v(t, addr).wrapping_add(offset as u64);
                if a % 16 != 0 {
                    return Err(format!("{}: a vector load at {a:#x}, which is not 16-byte aligned", k.name));
                }
                let b = (a >> 40) as usize;
                let buf = b
                    .checked_sub(1)
                    .and_then(|b| mem.buffers.get(b))
                    .ok_or_else(|| format!("{}: vector load from {a:#x}, which is in no buffer", k.name))?;
                let off = a & OFFSET_MASK;
                if off as usize + 16 > buf.len() {
                    return Err(format!(
                        "{}: global buffer {}: a vector load at byte {off} outside its {} bytes",
                        k.name,
                        b - 1,
                        buf.len()
                    ));
                }
                for (j, r) in d.iter().enumerate() {
                    let at = off as usize + 4 * j;
                    t.regs[*r as usize] = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as u64;
                }
            }
            Ins::ToTf32 { d, a } => {
                let x = v(t, a) as u32;
                let finite = f32::from_bits(x).is_finite();
                t.regs[d as usize] = if finite { (x.wrapping_add(0x1000) & 0xffff_e000) as u64 } else { x as u64 };
            }
            Ins::ToBf16x2 { d, hi, lo } => {
                let half = |x: u32| -> u32 {
                    if f32::from_bits(x).is_nan() {
                        0x7fc0
                    } else {
                        (x.wrapping_add(0x7fff + ((x >> 16) & 1))) >> 16
                    }
                };
                t.regs[d as usize] = ((half(v(t, hi) as u32) << 16) | half(v(t, lo) as u32)) as u64;
            }
            Ins::Ret => return Ok(Stop::Exit),
        }
    }
}

/// `x` with its `bits` lowest mantissa bits cleared (finite values only).
fn approx(x: f32, bits: u32) -> f32 {
    if x.is_finite() {
        f32::from_bits(x.to_bits() & !((1u32 << bits) - 1))
    } else {
        x
    }
}

fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

fn compare<T: PartialOrd>(cmp: Cmp, x: T, y: T) -> bool {
    match cmp {
        Cmp::Eq => x == y,
        Cmp::Ne | Cmp::Neu => x != y,
        Cmp::Lt => x < y,
        Cmp::Le => x <= y,
        Cmp::Gt => x > y,
        Cmp::Ge => x >= y,
    }
}

/// The array and byte offset a tagged workgroup or per-thread address
/// points at.
/// The workgroup array and byte offset of a 16-byte access at `a`:
/// aligned (arrays start 16-byte aligned) and inside the array.
fn shared4(k: &Kernel, a: u64, shared: &[Vec<u8>]) -> Result<(usize, usize), String> {
    let (arr, off) = array_of(k, a, Space::Shared)?;
    if off % 16 != 0 {
        return Err(format!("{}: a vector access at byte {off} of shared array {arr}, not 16-byte aligned", k.name));
    }
    let off = check(&shared[arr], off, &format!("{}: Shared array {arr}", k.name))?;
    check(&shared[arr], off as u64 + 12, &format!("{}: Shared array {arr}", k.name))?;
    Ok((arr, off))
}

fn array_of(k: &Kernel, a: u64, space: Space) -> Result<(usize, u64), String> {
    if space == Space::Shared {
        // A shared-window address, 32 bits (or the same widened).
        let i = k.window.iter().rposition(|&start| start <= a).filter(|&i| a - k.window[i] < k.shared[i] as u64);
        let i = i.ok_or_else(|| format!("{}: a shared access at {a:#x}, which is in no workgroup array", k.name))?;
        return Ok((i, a - k.window[i]));
    }
    if a & (SHARED_TAG | LOCAL_TAG) != LOCAL_TAG {
        return Err(format!("{}: a {space:?} access at {a:#x}, which is not a {space:?} address", k.name));
    }
    let index = ((a & !(SHARED_TAG | LOCAL_TAG)) >> 32) as usize;
    // Array ids are assigned in declaration order across both kinds.
    let (is_local, i) = *k.arrays.get(index).ok_or_else(|| format!("{}: no array {index}", k.name))?;
    if !is_local {
        return Err(format!("{}: a {space:?} access into the wrong kind of array", k.name));
    }
    Ok((i, a & 0xffff_ffff))
}

fn binary(op: Op2, ty: Ty, x: u64, y: u64) -> Result<u64, String> {
    Ok(match ty {
        Ty::F32 => {
            let (a, b) = (f(x), f(y));
            fb(match op {
                Op2::Add => a + b,
                Op2::Sub => a - b,
                Op2::Mul => a * b,
                Op2::Div => a / b,
                // PTX max/min return the other operand for one NaN.
                Op2::Max => a.max(b),
                Op2::Min => a.min(b),
                Op2::MaxNan | Op2::MinNan if a.is_nan() || b.is_nan() => f32::NAN,
                Op2::MaxNan => a.max(b),
                Op2::MinNan => a.min(b),
                _ => return Err(format!("{op:?} on f32")),
            })
        }
        Ty::Pred => match op {
            Op2::And => x & y,
            Op2::Or => x | y,
            Op2::Xor => x ^ y,
            _ => return Err(format!("{op:?} on pred")),
        },
        Ty::S64 | Ty::U64 | Ty::B64 => match op {
            Op2::Add => x.wrapping_add(y),
            Op2::Sub => x.wrapping_sub(y),
            _ => return Err(format!("{op:?} on 64 bits")),
        },
        Ty::S32 | Ty::U32 | Ty::B32 => {
            let (a, b) = (x as u32, y as u32);
            let (sa, sb) = (a as i32, b as i32);
            let signed = ty == Ty::S32;
            (match op {
                Op2::Add => a.wrapping_add(b),
                Op2::Sub => a.wrapping_sub(b),
                Op2::Mul => a.wrapping_mul(b),
                Op2::Div if b == 0 => u32::MAX,
                Op2::Rem if b == 0 => a,
                Op2::Div if signed => sa.wrapping_div(sb) as u32,
                Op2::Div => a / b,
                Op2::Rem if signed => sa.wrapping_rem(sb) as u32,
                Op2::Rem => a % b,
                Op2::Max if signed => sa.max(sb) as u32,
                Op2::Max => a.max(b),
                Op2::Min if signed => sa.min(sb) as u32,
                Op2::Min => a.min(b),
                Op2::MaxNan | Op2::MinNan => return Err(format!("{op:?} on integers")),
                Op2::And => a & b,
                Op2::Or => a | b,
                Op2::Xor => a ^ b,
                Op2::Shl => a.checked_shl(b).unwrap_or(0),
                Op2::Shr if signed => sa.checked_shr(b).unwrap_or(if sa < 0 { -1 } else { 0 }) as u32,
                Op2::Shr => a.checked_shr(b).unwrap_or(0),
            }) as u64
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD_ONE: &str = ".version 7.8
.target sm_80
.address_size 64
.visible .entry add_one(
    .param .u64 buf
)
.maxntid 32, 1, 1
{
    .reg .b32 %r<4>;
    .reg .pred %p<2>;
    .reg .b64 %d<4>;
    .reg .f32 %f<3>;
    ld.param.u64 %d0, [buf];
    cvta.to.global.u64 %d0, %d0;
    mov.u32 %r0, %tid.x;
    setp.lt.s32 %p0, %r0, 5;
    @!%p0 bra L1;
    mul.wide.s32 %d1, %r0, 4;
    add.s64 %d2, %d0, %d1;
    ld.global.u32 %r1, [%d2];
    mov.b32 %f0, %r1;
    add.f32 %f1, %f0, 0f3F800000;
    st.global.u32 [%d2], %f1;
L1:
    ret;
}
";

    #[test]
    fn runs_a_kernel_and_checks_its_bounds() {
        let k = parse(ADD_ONE).unwrap();
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut mem = Memory { buffers: vec![data], banks: None };
        launch(&k, [1, 1, 1], 32, &[global_address(0)], &mut mem).unwrap();
        let got: Vec<f32> = mem.buffers[0].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, [2.0, 3.0, 4.0, 5.0, 6.0]);
        // A buffer one element short: the fifth thread's access is caught.
        let mut short = Memory { buffers: vec![vec![0; 16]], banks: None };
        let e = launch(&k, [1, 1, 1], 32, &[global_address(0)], &mut short).unwrap_err();
        assert!(e.contains("outside its 16 bytes"), "{e}");
    }

    #[test]
    fn unknown_instructions_are_refused() {
        let text = ADD_ONE.replace("add.f32 %f1, %f0, 0f3F800000;", "vote.sync.any.pred %p1, %p0, -1;");
        let e = parse(&text).unwrap_err();
        assert!(e.contains("does not know") && e.contains("vote.sync"), "{e}");
    }

    /// Each lane adds its warp's values with butterfly shuffles.
    const WARP_SUM: &str = ".version 7.8
.target sm_80
.address_size 64
.visible .entry warp_sum(
    .param .u64 buf
)
.maxntid 64, 1, 1
{
    .reg .b32 %r<6>;
    .reg .b64 %d<4>;
    .reg .pred %p<2>;
    ld.param.u64 %d0, [buf];
    mov.u32 %r0, %tid.x;
    mul.wide.u32 %d1, %r0, 4;
    add.s64 %d2, %d0, %d1;
    ld.global.u32 %r1, [%d2];
    shfl.sync.bfly.b32 %r2, %r1, 16, 31, -1;
    add.s32 %r1, %r1, %r2;
    shfl.sync.bfly.b32 %r2, %r1, 8, 31, -1;
    add.s32 %r1, %r1, %r2;
    shfl.sync.bfly.b32 %r2, %r1, 4, 31, -1;
    add.s32 %r1, %r1, %r2;
    shfl.sync.bfly.b32 %r2, %r1, 2, 31, -1;
    add.s32 %r1, %r1, %r2;
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
    add.s32 %r1, %r1, %r2;
    st.global.u32 [%d2], %r1;
    ret;
}
";

    #[test]
    fn shuffles_run_a_warps_lanes_together() {
        let k = parse(WARP_SUM).unwrap();
        let data: Vec<u8> = (0..64u32).flat_map(|x| x.to_le_bytes()).collect();
        let mut mem = Memory { buffers: vec![data], banks: None };
        launch(&k, [1, 1, 1], 64, &[global_address(0)], &mut mem).unwrap();
        let got: Vec<u32> = mem.buffers[0].chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        // Lanes 0..32 hold 0 + ... + 31, lanes 32..64 hold 32 + ... + 63.
        assert!(got[..32].iter().all(|&v| v == 496) && got[32..].iter().all(|&v| v == 1520), "{got:?}");
        // Half a warp skipping the shuffles is caught.
        let text = WARP_SUM.replace(
            "    ld.global.u32 %r1, [%d2];\n",
            "    ld.global.u32 %r1, [%d2];\n    setp.lt.u32 %p0, %r0, 16;\n    @%p0 bra L9;\n",
        );
        let text = text.replace("    st.global.u32", "L9:\n    st.global.u32");
        let k = parse(&text).unwrap();
        let e = launch(&k, [1, 1, 1], 64, &[global_address(0)], &mut mem).unwrap_err();
        assert!(e.contains("shuffle with some of its lanes"), "{e}");
    }

    #[test]
    fn divergent_barriers_are_errors() {
        let text = ADD_ONE.replace("L1:\n", "    bar.sync 0;\nL1:\n");
        let k = parse(&text).unwrap();
        let mut mem = Memory { buffers: vec![vec![0; 20]], banks: None };
        let e = launch(&k, [1, 1, 1], 32, &[global_address(0)], &mut mem).unwrap_err();
        assert!(e.contains("barrier"), "{e}");
    }
}

#[cfg(test)]
mod bank_tests {
    use super::*;

    /// Four shared requests per warp: a word per lane (one wavefront),
    /// every second word (two lanes a bank: two), every 32nd word (all 32
    /// lanes in one bank: 32) and one word for every lane (a broadcast: one).
    const BANKS: &str = ".version 7.8
.target sm_80
.address_size 64
.visible .entry banks(
    .param .u64 buf
)
.maxntid 64, 1, 1
{
    .reg .b32 %r<4>;
    .reg .b64 %d<4>;
    .shared .align 4 .f32 wg0[2048];
    mov.u64 %d0, wg0;
    mov.u32 %r0, %tid.x;
    and.b32 %r0, %r0, 31;
    mul.wide.u32 %d1, %r0, 4;
    add.s64 %d2, %d0, %d1;
    st.shared.u32 [%d2], %r0;
    mul.wide.u32 %d1, %r0, 8;
    add.s64 %d2, %d0, %d1;
    st.shared.u32 [%d2], %r0;
    bar.sync 0;
    mul.wide.u32 %d1, %r0, 128;
    add.s64 %d2, %d0, %d1;
    ld.shared.u32 %r1, [%d2];
    ld.shared.u32 %r2, [%d0];
    ret;
}
";

    #[test]
    fn bank_conflicts_are_counted_per_warp_request() {
        let k = parse(BANKS).unwrap();
        let mut mem = Memory { buffers: vec![vec![0; 4]], banks: Some(BankStats::default()) };
        launch(&k, [1, 1, 1], 64, &[global_address(0)], &mut mem).unwrap();
        let stats = mem.banks.unwrap();
        // Two warps, four requests each: 1 + 2 + 32 + 1 wavefronts a warp.
        assert_eq!(stats, BankStats { requests: 8, wavefronts: 2 * 36, ideal: 8 });
        assert_eq!(stats.conflicts(), 2 * 32);
    }
}
