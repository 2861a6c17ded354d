//! What a CPU kernel is handed at run time beyond its operands, as
//! expressions of the plan's symbols: the blocks a kernel with symbolic
//! sizes reads (an attention kernel's parameters and batch table, a
//! symbolic product's epilogue program) and the extent of the dim the
//! scheduler splits. Written once and used twice: the JIT's runtime
//! evaluates them for each new set of values (`Block::bytes_at`,
//! `Word::at`), and the C artifact prints them as the C that fills its
//! driver's words (`src/aot/sizes.rs`), so the two cannot disagree on a
//! layout.

use super::library;
use crate::plan::{AttentionKernel, Kernel, KernelKind};
use egret_ir::{Dim, DimValues};
use egret_kernels::attention::AttentionParams;

/// One run-time integer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Word {
    /// A word that does not depend on the symbols (an opcode, a float's bits).
    Const(i64),
    /// A size, offset or stride.
    Dim(Dim),
    /// `min(cap, max(n, 1))`: a tile chosen for nominal sizes, clamped to
    /// what a call has (an attention kernel's query block).
    Clamp { n: Dim, cap: usize },
    /// `count * ceil(n / block)`: an attention kernel's tasks, query blocks
    /// of every batch.
    Blocks { count: Dim, n: Dim, block: usize },
}

impl Word {
    pub fn at(&self, values: &DimValues) -> Result<i64, String> {
        Ok(match *self {
            Word::Const(c) => c,
            Word::Dim(d) => values.get(d)?,
            Word::Clamp { n, cap } => (cap as i64).min(values.get(n)?.max(1)),
            Word::Blocks { count, n, block } => {
                let (n, block) = (values.get(n)?.max(0) as u64, block.max(1) as u64);
                values.get(count)?.max(0).saturating_mul(n.div_ceil(block) as i64)
            }
        })
    }
}

/// A block of words a kernel reads through an argument slot.
#[derive(Clone, Debug, PartialEq)]
pub enum Block {
    Words(Vec<Word>),
    /// An attention kernel's table: for each entry of its outer batch axis
    /// (`count` of them, or one), the five offsets of every listed batch
    /// plus `strides` times the entry; then `tail`, its key spans.
    Batches {
        count: Dim,
        entries: Vec<[Dim; 5]>,
        strides: [Dim; 5],
        tail: Vec<i64>,
    },
}

impl Block {
    pub fn words_at(&self, values: &DimValues) -> Result<Vec<i64>, String> {
        match self {
            Block::Words(w) => w.iter().map(|w| w.at(values)).collect(),
            Block::Batches { count, entries, strides, tail } => {
                let count = values.get(*count)?.max(0);
                let strides: Vec<i64> = strides.iter().map(|&s| values.get(s)).collect::<Result<_, _>>()?;
                let entries: Vec<i64> = entries.iter().flatten().map(|&d| values.get(d)).collect::<Result<_, _>>()?;
                let mut out = Vec::with_capacity(count as usize * entries.len() + tail.len());
                for e in 0..count {
                    for entry in entries.chunks(5) {
                        out.extend(entry.iter().zip(&strides).map(|(&o, &s)| o + s * e));
                    }
                }
                out.extend(tail);
                Ok(out)
            }
        }
    }

    pub fn bytes_at(&self, values: &DimValues) -> Result<Vec<u8>, String> {
        Ok(self.words_at(values)?.iter().flat_map(|w| w.to_le_bytes()).collect())
    }
}

/// The blocks a kernel with symbolic sizes reads through argument slots
/// after its operands' addresses and its `runtime_dims`' values. Empty for
/// known kernels, whose blocks are data in their code.
pub fn blocks(kernel: &Kernel) -> Vec<Block> {
    match &kernel.kind {
        KernelKind::Attention(a) if !a.is_known() => vec![attention_params(a), attention_table(a)],
        KernelKind::MatMul(mm) if !mm.m.is_known() => match &mm.epilogue {
            Some(e) => {
                // The program for 0 rows, with the rows (its first word) symbolic.
                let mut words: Vec<Word> = library::encode_epilogue(e, 0, mm.n, 2 + e.inputs.len(), 2)
                    .chunks(8)
                    .map(|w| Word::Const(i64::from_le_bytes(w.try_into().expect("eight-byte words"))))
                    .collect();
                words[0] = Word::Dim(mm.m);
                vec![Block::Words(words)]
            }
            None => vec![],
        },
        _ => vec![],
    }
}

/// The extent of the dim the scheduler splits a kernel along (see
/// `cpu::parallel_extent`).
pub fn extent(kind: &KernelKind) -> Word {
    match kind {
        KernelKind::Map(m) => Word::Dim(m.shape.first().copied().unwrap_or(Dim::new(1))),
        KernelKind::Rows(r) => Word::Dim(r.rows),
        KernelKind::MatMul(mm) => Word::Dim(Dim::new(mm.batches.len())),
        KernelKind::Gather(k) => Word::Dim(k.outer),
        KernelKind::Attention(a) => Word::Blocks { count: batch_count(a), n: a.sq, block: a.block },
        KernelKind::Reference { .. } | KernelKind::Loop { .. } => Word::Dim(Dim::new(1)),
    }
}

/// Every batch the kernel runs: the listed ones times its outer axis.
fn batch_count(a: &AttentionKernel) -> Dim {
    Dim::new(a.batches.len()) * a.outer.map_or(Dim::new(1), |o| o.count)
}

/// The parameter block of `library::attention_params`, with the sizes as
/// expressions (the kernel `AttentionKernel::at` a call's values has).
fn attention_params(a: &AttentionKernel) -> Block {
    let dim = |d: Dim| Word::Dim(d);
    let pair = |p: [Dim; 2]| p.map(dim);
    let flag = |b: bool| Word::Const(b as i64);
    let params = AttentionParams::<Word> {
        sq: dim(a.sq),
        sk: dim(a.sk),
        d: Word::Const(a.d as i64),
        dv: Word::Const(a.dv as i64),
        block: Word::Clamp { n: a.sq, cap: a.block },
        key_block: Word::Const(a.key_block as i64),
        has_mask: flag(a.mask.is_some()),
        nan_to_zero: flag(a.nan_to_zero),
        out_rs: dim(a.out_row_stride),
        batches: dim(batch_count(a)),
        has_spans: flag(a.key_spans.is_some()),
        q_strides: pair(a.q_strides),
        kt_strides: pair(a.kt_strides),
        v_strides: pair(a.v_strides),
        mask_strides: pair(a.mask_strides),
        scale: a.scale as f64,
        softcap: a.softcap.unwrap_or(0.0) as f64,
    };
    Block::Words(params.words(|f| Word::Const(f.to_bits() as i64)).to_vec())
}

/// The table of `library::attention_table`, its outer axis listed out.
fn attention_table(a: &AttentionKernel) -> Block {
    let (count, strides) = match &a.outer {
        Some(o) => (o.count, o.strides),
        None => (Dim::new(1), [Dim::new(0); 5]),
    };
    let tail = a.key_spans.iter().flatten().flatten().map(|&x| x as i64).collect();
    Block::Batches { count, entries: a.batches.clone(), strides, tail }
}
