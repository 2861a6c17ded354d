//! A GEMM over a weight matrix packed at compile time: `c = a @ b` where
//! `b` is a constant that lowering laid out as panels of `NR` columns
//! (`pack_panels`), so no run ever repacks it (the GEMM library repacks its
//! operands on every call).
//!
//! The micro-kernel keeps an `MR x cols` tile of `c` in registers: with
//! AVX-512 two neighbouring panels wide (24 of the 32 vector registers),
//! with AVX2 half a panel (12 of 16), else one panel. Per step of `k` it
//! loads a row of the tile's columns of `b`, then broadcasts `MR` elements
//! of `a` and issues a fused multiply-add per accumulator. The AVX-512
//! tile loads each element of `a` once per 64 columns rather than per 32;
//! AVX2's half-panel tile ran 1.7x faster than a whole panel, whose 24
//! accumulators spilled. The kernel prefetches the next panels, a share
//! per row tile, and the rows of `c` the next tile stores: without that,
//! the first tile over each panel of a weight too big for the cache
//! (gpt2_small4's 8192-wide output projection) waited on memory.
//!
//! Panels are split across threads for big products; a fused epilogue runs
//! on the thread that computed its columns, a group of panels at a time.
//!
//! A packed weight starts with a header (`HEADER_WORDS` words) saying how
//! its panels store their values (`Coding`): as f32, or narrower — halves,
//! or the integer codes of a quantized weight with their scales and zero
//! points per block of rows. Narrow panels are decoded to f32 into the
//! thread's scratch a panel or two at a time, just before the tiles read
//! them, so a product reads 2-8x fewer bytes of weight from memory (what a
//! decode step's matrix-vector products are bound by) and the tiles stay
//! the f32 ones.

use super::{madd, multiversion};

/// Rows of `c` per micro-tile.
pub const MR: usize = 6;

/// Runs `$body` with `$r` bound to each row index below `$R` (at most
/// `MR`), unrolled by the macro rather than left to LLVM: the accumulators
/// stay in registers only if every index into them is a constant, and
/// whether LLVM unrolls a loop over the rows depends on its inlining
/// budget. With fat LTO it did not, kept the AVX-512 accumulators on the
/// stack, and the products ran 3x slower.
macro_rules! for_each_row {
    ($R:ident, $r:ident, $body:block) => {
        for_each_row!(@ $R, $r, $body, 0 1 2 3 4 5)
    };
    (@ $R:ident, $r:ident, $body:block, $($i:literal)*) => {
        $(
            if $i < $R {
                let $r: usize = $i;
                $body
            }
        )*
    };
}
const _: () = assert!(MR == 6, "for_each_row! unrolls MR rows");
/// Columns per panel: two AVX-512 vectors.
pub const NR: usize = 32;

/// Panels per group: after each group the epilogue runs over its columns,
/// so it reads a product the same thread has just written (one
/// interpreted block of columns per group).
const GROUP: usize = super::epilogue::BLOCK / NR;

/// `c[m, n] = a[m, k] @ b` with `b` packed by `pack_panels`; `a` strided, `c`
/// row-major. A non-null `a_rows` gives each row of `a` as an element
/// offset from `a` instead (`a_rs` is then unused): the rows of a layout an
/// exporter permuted (a Swin window partition) are gathered here, once per
/// call, rather than copied by kernels of their own. A non-null `c_rows`
/// likewise gives where each row of the product goes in `c` (a window
/// reverse and roll back); every row of `c` must receive one. A non-null
/// `epilogue` (a program in the `epilogue` layout, with the kernel's
/// operand addresses `args`) is applied to `c` in place, after the rows
/// are placed.
///
/// # Safety
/// The buffers hold the matrices the arguments describe.
#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub unsafe extern "C" fn egret_sgemm_packed(
    m: i64,
    k: i64,
    n: i64,
    a: *const f32,
    a_rs: i64,
    a_cs: i64,
    b: *const u32,
    c: *mut f32,
    a_rows: *const i64,
    c_rows: *const i64,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let tile = TileShape::host();
    let b = unsafe { Weight::read(b) };
    unsafe { sgemm_packed(m, k, n, a, a_rs, a_cs, a_rows, b, c, c_rows, tile, epilogue, args) }
}

/// Words before a packed weight's panels: `MAGIC`, the `Coding`, `k`, `n`,
/// the block of rows per scale (codes only), then zeros.
pub const HEADER_WORDS: usize = 16;

/// The first word of every packed weight.
pub const MAGIC: u32 = u32::from_le_bytes(*b"EgPW");

/// How a packed weight's panels hold its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Coding {
    /// `k` rows of `NR` f32 per panel.
    F32 = 1,
    /// `k` rows of `NR` IEEE halves per panel.
    F16 = 2,
    /// `k` rows of `NR` bfloat16 per panel.
    Bf16 = 3,
    /// Per block of `block` rows: `NR` f32 scales, `NR` f32 zero points,
    /// then the block's rows of `NR` one-byte codes (the last block padded
    /// with zero codes). Element `(p, l)` is `(code - zero) * scale`.
    Codes8 = 4,
    /// As `Codes8` with two codes per byte: byte `l` of a row holds column
    /// `l` in its low four bits and column `l + NR / 2` in its high four.
    Codes4 = 5,
    /// Signed bytes (whole-number weights in -128..=127, scale 1): `NR`
    /// i32 column sums, then per group of four rows, for each of the `NR`
    /// columns its four rows' bytes (the last group padded with zeros), the
    /// layout `vpdpbusd` multiplies (`int8`).
    Int8 = 6,
}

impl Coding {
    pub fn from_word(w: u32) -> Option<Coding> {
        Some(match w {
            1 => Coding::F32,
            2 => Coding::F16,
            3 => Coding::Bf16,
            4 => Coding::Codes8,
            5 => Coding::Codes4,
            6 => Coding::Int8,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Coding::F32 => "f32",
            Coding::F16 => "f16",
            Coding::Bf16 => "bf16",
            Coding::Codes8 => "8-bit codes",
            Coding::Codes4 => "4-bit codes",
            Coding::Int8 => "int8",
        }
    }
}

/// A packed weight as the kernel reads it: its coding, the rows per block
/// of scales (codes only) and where its panels start.
#[derive(Clone, Copy)]
struct Weight {
    coding: Coding,
    block: usize,
    panels: *const u32,
    /// An int8 weight's remainder (`pack_int8_panels`).
    remainder: Remainder,
    /// Whether no pair of an int8 weight's panels can saturate AVX2's
    /// `vpmaddubsw` (`pack_int8_panels`).
    pairs_safe: bool,
}

impl Weight {
    /// Reads the header `pack_*` wrote.
    ///
    /// # Safety
    /// `b` is a packed weight.
    unsafe fn read(b: *const u32) -> Weight {
        let word = |i: usize| unsafe { *b.add(i) };
        assert_eq!(word(0), MAGIC, "a packed GEMM weight without its header");
        let coding = Coding::from_word(word(1)).expect("a packed GEMM weight of an unknown coding");
        let panels = unsafe { b.add(HEADER_WORDS) };
        let (remainder, pairs_safe) = (Remainder::NONE, word(SAFE_WORD) == 1);
        let mut weight = Weight { coding, block: word(4) as usize, panels, remainder, pairs_safe };
        if coding == Coding::Int8 && word(REMAINDER_WORD) > 0 {
            let (k, n) = (word(2) as usize, word(3) as usize);
            let count = n.div_ceil(NR);
            let table = unsafe { panels.add(count * weight.panel_words(k)) };
            weight.remainder = Remainder { table, panels: count };
        }
        weight
    }

    /// Words per panel of `k` rows.
    fn panel_words(self, k: usize) -> usize {
        match self.coding {
            Coding::F32 => k * NR,
            Coding::F16 | Coding::Bf16 => k * NR / 2,
            Coding::Codes8 | Coding::Codes4 => k.div_ceil(self.block) * self.block_words(),
            Coding::Int8 => NR + k.div_ceil(4) * NR,
        }
    }

    /// Words per block of a coded panel: scales, zero points and codes.
    fn block_words(self) -> usize {
        2 * NR + self.block * self.row_bytes() / 4
    }

    fn row_bytes(self) -> usize {
        if self.coding == Coding::Codes4 {
            NR / 2
        } else {
            NR
        }
    }
}

fn header(coding: Coding, k: usize, n: usize, block: usize) -> Vec<u32> {
    let mut words = vec![0u32; HEADER_WORDS];
    words[..5].copy_from_slice(&[MAGIC, coding as u32, k as u32, n as u32, block as u32]);
    words
}

/// A `[k, n]` matrix of whole numbers in -128..=127 (`value(p, j)`)
/// packed as `Coding::Int8` panels, and its remainder.
///
/// AVX2's `vpmaddubsw` adds each two neighbouring products of bytes into
/// 16 bits, saturating: 255 * (w0 + w1) overflows where two weights of one
/// sign sum past 128 in magnitude. The panels hold the weight with every
/// such pair moved toward zero until it cannot (`pair_safe`), and a
/// remainder after them holds what was taken off, a few entries (a BERT-
/// base's 72 weights: 16,935 of 42 million pairs, at most 905 in one): the
/// products add it back exactly (`Remainder`). The column sums are the
/// whole weight's.
pub fn pack_int8_panels(value: impl Fn(usize, usize) -> i8, k: usize, n: usize) -> Vec<u32> {
    // Column sums and the pairs `vpmaddubsw` could saturate, in one pass in
    // row order (a copy of the values column by column first, or reading
    // them down the columns, cost more than the packing: `value` is read
    // twice per element, so pass a cheap one).
    let mut sums = vec![0i32; n];
    let mut unsafe_pairs = 0;
    for p in (0..k).step_by(2) {
        for (j, sum) in sums.iter_mut().enumerate() {
            let (w0, w1) = (value(p, j), if p + 1 < k { value(p + 1, j) } else { 0 });
            *sum += w0 as i32 + w1 as i32;
            unsafe_pairs += (pair_safe(w0, w1) != (w0, w1)) as usize;
        }
    }
    // A weight of many such pairs (uniformly random bytes: half of them)
    // would spend longer on its remainder than on its panels: it keeps its
    // values, and AVX2 decodes it for the f32 tiles (`pairs_safe`).
    let safe = unsafe_pairs <= k * n / MAX_REMAINDER_SHARE;
    let mut out = header(Coding::Int8, k, n, 0);
    out[SAFE_WORD] = safe as u32;
    let panels = n.div_ceil(NR);
    // Sized once, as every packer here: growing by doubling would copy the
    // panels and hold up to twice them at once.
    out.reserve_exact(panels * (NR + k.div_ceil(4) * NR) + panels + 1);
    // Per panel, its remainder's entries: (row, column in the panel, value).
    let mut remainder: Vec<Vec<(usize, usize, i32)>> = vec![Vec::new(); panels];
    for (panel, taken) in remainder.iter_mut().enumerate() {
        let col = |l: usize| panel * NR + l;
        out.extend((0..NR).map(|l| sums.get(col(l)).map_or(0, |&s| s as u32)));
        for g in 0..k.div_ceil(4) {
            for l in 0..NR {
                let w = |p: usize| if p < k && col(l) < n { value(p, col(l)) } else { 0 };
                let mut bytes = [0u8; 4];
                for pair in 0..2 {
                    let p = 4 * g + 2 * pair;
                    let (w0, w1) = (w(p), w(p + 1));
                    let (s0, s1) = if safe { pair_safe(w0, w1) } else { (w0, w1) };
                    for (r, (w, s)) in [(w0, s0), (w1, s1)].into_iter().enumerate() {
                        bytes[2 * pair + r] = s as u8;
                        if w != s {
                            taken.push((p + r, l, w as i32 - s as i32));
                        }
                    }
                }
                out.push(u32::from_le_bytes(bytes));
            }
        }
    }
    // The remainder: where each panel's entries start (and the last ends),
    // then the entries, two words each (row times NR plus column; value).
    let entries: usize = remainder.iter().map(Vec::len).sum();
    out[REMAINDER_WORD] = entries as u32;
    out.reserve_exact(2 * entries);
    let mut start = 0;
    for taken in &remainder {
        out.push(start as u32);
        start += taken.len();
    }
    out.push(start as u32);
    for &(p, l, v) in remainder.iter().flatten() {
        out.extend([(p * NR + l) as u32, v as u32]);
    }
    out
}

/// An int8 weight's pairs are made safe (`pack_int8_panels`) where at most
/// one in this many of its values would go to the remainder: each entry
/// costs a scalar multiply-add per row, about as much as 30 values in the
/// tiles, so the remainder then costs at most about 12% more.
const MAX_REMAINDER_SHARE: usize = 256;

/// The remainder of the int8 weight `b` packed by `pack_int8_panels`, and
/// whether its pairs were made safe for AVX2.
///
/// # Safety
/// `b` is such a weight.
#[cfg(test)]
pub(crate) unsafe fn layout_of(b: *const u32) -> (Remainder, bool) {
    let w = unsafe { Weight::read(b) };
    (w.remainder, w.pairs_safe)
}

/// The header word of an int8 weight that counts its remainder's entries.
const REMAINDER_WORD: usize = 5;

/// The header word of an int8 weight that says (1) that no pair of its
/// panels can saturate `vpmaddubsw`.
const SAFE_WORD: usize = 6;

/// `(w0, w1)` moved toward zero, the larger in magnitude giving way, until
/// no two bytes (0..=255) times them sum past 16 bits: two weights of one
/// sign at most 128 in magnitude together (255 * 128 = 32,640).
#[inline]
pub fn pair_safe(w0: i8, w1: i8) -> (i8, i8) {
    let (a, b) = (w0 as i32, w1 as i32);
    let (high, low) = (a.max(0) + b.max(0), a.min(0) + b.min(0));
    let (a, b) = if high > 128 {
        // Both positive: the larger becomes 128 - the other (at least 1).
        if a >= b {
            (128 - b, b)
        } else {
            (a, 128 - a)
        }
    } else if low < -128 {
        // Both negative: the larger in magnitude becomes -128 - the other.
        if a <= b {
            (-128 - b, b)
        } else {
            (a, -128 - a)
        }
    } else {
        (a, b)
    };
    (a as i8, b as i8)
}

/// What an int8 weight's panels leave out (`pack_int8_panels`): per panel,
/// entries of a row, a column in the panel and the value to add.
#[derive(Clone, Copy)]
pub struct Remainder {
    /// Where each panel's entries start, then the entries; null for none.
    table: *const u32,
    panels: usize,
}

impl Remainder {
    pub const NONE: Remainder = Remainder { table: std::ptr::null(), panels: 0 };

    /// Panel `panel`'s entries: (row, column in the panel, value).
    pub fn of(self, panel: usize) -> impl Iterator<Item = (usize, usize, i32)> {
        let entries: &[u32] = if self.table.is_null() {
            &[]
        } else {
            // (Safety: `Weight::read` found the table after the panels.)
            let at = |i: usize| unsafe { *self.table.add(i) } as usize;
            let (start, end) = (at(panel), at(panel + 1));
            unsafe { std::slice::from_raw_parts(self.table.add(self.panels + 1 + 2 * start), 2 * (end - start)) }
        };
        entries.chunks_exact(2).map(|e| (e[0] as usize / NR, e[0] as usize % NR, e[1] as i32))
    }
}

/// `b` (`[k, n]`, element `(p, j)` at `offset + p * strides[0] + j *
/// strides[1]`) packed in f32: for each panel of `NR` columns its `k` rows
/// of `NR` values, the last panel padded with zeros.
pub fn pack_panels(b: &[f32], offset: usize, strides: [usize; 2], k: usize, n: usize) -> Vec<u32> {
    let panels = n.div_ceil(NR);
    let mut out = header(Coding::F32, k, n, 0);
    // Sized once: a base-size model packs gigabytes here.
    out.reserve_exact(panels * k * NR);
    for panel in 0..panels {
        let j0 = panel * NR;
        let width = NR.min(n - j0);
        for p in 0..k {
            let row = offset + p * strides[0] + j0 * strides[1];
            if strides[1] == 1 {
                out.extend(b[row..row + width].iter().map(|x| x.to_bits()));
            } else {
                out.extend((0..width).map(|l| b[row + l * strides[1]].to_bits()));
            }
            out.extend(std::iter::repeat_n(0, NR - width));
        }
    }
    out
}

/// A `[k, n]` matrix of halves (`bits[p * n + j]`, IEEE f16 or bfloat16)
/// packed as panels of halves.
pub fn pack_half_panels(bits: impl Fn(usize, usize) -> u16, k: usize, n: usize, bf16: bool) -> Vec<u32> {
    let mut out = header(if bf16 { Coding::Bf16 } else { Coding::F16 }, k, n, 0);
    out.reserve_exact(n.div_ceil(NR) * k * NR / 2);
    for panel in 0..n.div_ceil(NR) {
        for p in 0..k {
            for l in (0..NR).step_by(2) {
                let at = |l: usize| {
                    let j = panel * NR + l;
                    if j < n {
                        bits(p, j) as u32
                    } else {
                        0
                    }
                };
                out.push(at(l) | (at(l + 1) << 16));
            }
        }
    }
    out
}

/// A `[k, n]` matrix of unsigned codes below `1 << bits` (`bits` at most 8;
/// 4 or fewer are stored two to a byte), each `codes` byte plus `offset`
/// (wrapping: 128 reads signed bytes as codes), with scales and zero points per
/// block of `block` rows and column (`[k.div_ceil(block), n]`), packed as
/// `Coding::Codes4` or `Codes8` panels.
pub fn pack_code_panels(
    codes: &[u8],
    offset: u8,
    scales: &[f32],
    zeros: &[f32],
    k: usize,
    n: usize,
    block: usize,
    bits: u32,
) -> Vec<u32> {
    assert!(block > 0 && bits <= 8, "packed codes need blocks of rows and at most 8 bits");
    let coding = if bits <= 4 { Coding::Codes4 } else { Coding::Codes8 };
    let mut out = header(coding, k, n, block);
    let blocks = k.div_ceil(block);
    let row_bytes = if coding == Coding::Codes4 { NR / 2 } else { NR };
    out.reserve_exact(n.div_ceil(NR) * blocks * (2 * NR + (block * row_bytes).div_ceil(4)));
    for panel in 0..n.div_ceil(NR) {
        let col = |l: usize| panel * NR + l;
        for b in 0..blocks {
            for table in [scales, zeros] {
                out.extend((0..NR).map(|l| if col(l) < n { table[b * n + col(l)].to_bits() } else { 0 }));
            }
            let mut bytes = Vec::new();
            for p in b * block..(b + 1) * block {
                let code = |l: usize| if p < k && col(l) < n { codes[p * n + col(l)].wrapping_add(offset) } else { 0 };
                match coding {
                    Coding::Codes4 => bytes.extend((0..NR / 2).map(|l| code(l) | (code(l + NR / 2) << 4))),
                    _ => bytes.extend((0..NR).map(code)),
                }
            }
            out.extend(bytes.chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().expect("four bytes"))));
        }
    }
    out
}

/// Half a panel's columns: the width of AVX2's tile.
const HALF: usize = NR / 2;

/// Tiles of at most this many rows take a whole panel on AVX2 too.
const WHOLE_PANEL_ROWS: usize = 4;

/// How many columns a tile spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileShape {
    /// Two neighbouring panels: 24 AVX-512 accumulators.
    TwoPanels,
    /// One panel: 12 AVX-512 accumulators, or what a baseline build has.
    OnePanel,
    /// Half a panel at a time: 12 AVX2 accumulators (a whole panel's 24
    /// would not fit AVX2's sixteen registers).
    HalfPanel,
}

impl TileShape {
    fn host() -> TileShape {
        match super::Isa::host() {
            super::Isa::Avx512 => TileShape::TwoPanels,
            super::Isa::Avx2 => TileShape::HalfPanel,
            super::Isa::Baseline => TileShape::OnePanel,
        }
    }

    fn columns(self) -> usize {
        match self {
            TileShape::TwoPanels => 2 * NR,
            TileShape::OnePanel => NR,
            TileShape::HalfPanel => HALF,
        }
    }
}

/// The register tile the packed GEMM uses on this host: rows by columns.
pub fn register_tile() -> (usize, usize) {
    (MR, TileShape::host().columns())
}

/// `egret_sgemm_packed` with the tile shape chosen.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_packed(
    m: i64,
    k: i64,
    n: i64,
    a: *const f32,
    a_rs: i64,
    a_cs: i64,
    a_rows: *const i64,
    b: Weight,
    c: *mut f32,
    c_rows: *const i64,
    shape: TileShape,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let (m, k, n) = (m as usize, k as usize, n as usize);
    // An empty product writes nothing (the epilogue has no element to
    // visit): the few-rows path below would read and write `FUSED_ROWS`
    // rows of buffers that hold none.
    if m == 0 || n == 0 {
        return;
    }
    // Rows placed by a table are computed into this thread's scratch and
    // copied out after; the epilogue then runs on `c` as placed.
    let scattered = !c_rows.is_null();
    let mut product = if scattered { SCATTERED_C.take() } else { Vec::new() };
    let epilogue_after = if scattered { epilogue } else { std::ptr::null() };
    let (placed, c, epilogue) = if scattered {
        product.clear();
        product.resize(m * n, 0.0);
        (c, product.as_mut_ptr(), std::ptr::null())
    } else {
        (c, c, epilogue)
    };
    // Rows given by a table are gathered into this thread's scratch first,
    // once for all the threads, and read densely from there.
    let gathered = !a_rows.is_null();
    let mut scratch = if gathered { GATHERED_A.take() } else { Vec::new() };
    let (a, a_rs, a_cs) = if gathered {
        scratch.clear();
        scratch.reserve(m * k);
        for i in 0..m {
            let row = unsafe { a.offset(*a_rows.add(i) as isize) };
            scratch.extend((0..k).map(|p| unsafe { *row.offset(p as isize * a_cs as isize) }));
        }
        (scratch.as_ptr(), k as i64, 1)
    } else {
        (a, a_rs, a_cs)
    };
    let panels = n.div_ceil(NR);
    let threads = super::threads().min(panels);
    let (a_rs, a_cs) = (a_rs as isize, a_cs as isize);
    // Whole-number activations by an int8 weight: integer products (VNNI's
    // or AVX2's), where the host has them and the activations allow (`int8`).
    let mut quantized = Vec::new();
    // (AVX2's products need panels whose pairs cannot saturate.)
    let path = match super::int8::Path::host() {
        Some(super::int8::Path::Avx2) if !b.pairs_safe => None,
        path if b.coding == Coding::Int8 && m > FUSED_ROWS => path,
        _ => None,
    };
    let int8 = path.is_some();
    if int8 {
        quantized = QUANTIZED_A.take();
    }
    // The rows as whole numbers and their shift (`int8::quantize_rows`).
    let q = path.and_then(|path| {
        let lo = unsafe { super::int8::quantize_rows(m, k, a, a_rs, a_cs, &mut quantized) }?;
        Some(Quantized { path, at: quantized.as_ptr() as usize, lo })
    });
    // Rows a multiple of 4 KiB apart (K of 1024, 2048, 3072, 4096) fall on
    // one set of the first-level cache, six of its eight ways for one
    // tile's broadcasts. AVX2's tiles read each tile of rows twice per
    // panel (once per half), and there a copy of the rows packed tile by
    // tile (one stream) ran these products 5-20% faster; at other strides
    // the copy cost 2-10%, and AVX-512's tiles (one pass per two panels)
    // gained nothing (`cargo run --release -p egret-kernels --example
    // gemm_shapes`, BENCHMARKS.md).
    let pack = shape == TileShape::HalfPanel && m > WHOLE_PANEL_ROWS && !int8 && a_cs == 1 && a_rs % 1024 == 0;
    let mut packed = if pack { PACKED_A.take() } else { Vec::new() };
    let rows = if pack {
        unsafe { pack_rows(m, k, a, a_rs, a_cs, &mut packed) };
        Rows { at: packed.as_ptr(), rs: 1, cs: MR as isize, tile_rs: k as isize }
    } else {
        Rows { at: a, rs: a_rs, cs: a_cs, tile_rs: a_rs }
    };
    if threads > 1 && super::matmul_splits(m, k, n) {
        let (rows, b, c, epilogue, args) = (ReadOnly(rows), ReadOnly(b), c as usize, epilogue as usize, args as usize);
        rayon::scope(|s| {
            for t in 0..threads {
                s.spawn(move |_| unsafe {
                    let (p0, p1) = (panels * t / threads, panels * (t + 1) / threads);
                    let c = c as *mut f32;
                    let (epilogue, args) = (epilogue as *const i64, args as *const *mut u8);
                    panels_of(m, k, n, { rows }.0, q, { b }.0, c, p0, p1, shape, epilogue, args)
                });
            }
        });
    } else {
        unsafe { panels_of(m, k, n, rows, q, b, c, 0, panels, shape, epilogue, args) };
    }
    if pack {
        PACKED_A.set(packed);
    }
    if int8 {
        QUANTIZED_A.set(quantized);
    }
    if gathered {
        GATHERED_A.set(scratch);
    }
    if scattered {
        for (i, row) in product.chunks_exact(n.max(1)).enumerate().take(m) {
            let to = unsafe { placed.offset(*c_rows.add(i) as isize) };
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), to, n) };
        }
        SCATTERED_C.set(product);
        if !epilogue_after.is_null() {
            unsafe { super::epilogue::egret_epilogue(epilogue_after, args, placed) };
        }
    }
}

/// Where the rows of `a` are: element `(i, p)` of a tile of rows from row
/// `i0` (a multiple of `MR`) at `at + i0 * tile_rs + (i - i0) * rs + p *
/// cs`. Rows as given have `tile_rs == rs`; rows packed by `pack_rows`
/// are `MR` to a tile, tile by tile.
#[derive(Clone, Copy)]
struct Rows {
    at: *const f32,
    rs: isize,
    cs: isize,
    tile_rs: isize,
}

/// `m` rows of `a` packed for the tiles: tile `t`'s `k` columns of `MR`
/// values each (rows past `m` zero), `MR * k` elements a tile.
unsafe fn pack_rows(m: usize, k: usize, a: *const f32, a_rs: isize, a_cs: isize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(m.div_ceil(MR) * MR * k, 0.0);
    for i in 0..m {
        let (row, tile) = (unsafe { a.offset(i as isize * a_rs) }, &mut out[(i / MR) * MR * k..]);
        for p in 0..k {
            tile[p * MR + i % MR] = unsafe { *row.offset(p as isize * a_cs) };
        }
    }
}

/// Rows of `a` or a packed weight handed to the threads of one product.
#[derive(Clone, Copy)]
struct ReadOnly<T>(T);
// Both are read-only while the product runs.
unsafe impl<T> Send for ReadOnly<T> {}
unsafe impl<T> Sync for ReadOnly<T> {}

/// `a`'s rows as whole numbers for an int8 weight's integer products
/// (`int8::quantize_rows`): the path that reads them, their address and
/// their shift.
#[derive(Clone, Copy)]
struct Quantized {
    path: super::int8::Path,
    at: usize,
    lo: i32,
}

/// Panels `p0..p1` of the product and the epilogue over their columns,
/// whatever the weight's coding; `quantized`, when given, holds `a`'s rows
/// for an int8 weight's integer products (`int8`).
#[allow(clippy::too_many_arguments)]
unsafe fn panels_of(
    m: usize,
    k: usize,
    n: usize,
    a: Rows,
    quantized: Option<Quantized>,
    b: Weight,
    c: *mut f32,
    p0: usize,
    p1: usize,
    shape: TileShape,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    if let Some(Quantized { path, at, lo }) = quantized {
        let (a_q, words, rest) = (at as *const u8, b.panel_words(k), b.remainder);
        return unsafe {
            super::int8::panel_range(path, m, k, n, a_q, lo, b.panels, words, rest, c, p0, p1, GROUP, epilogue, args)
        };
    }
    if b.coding == Coding::F32 {
        let panels = b.panels as *const f32;
        return unsafe {
            panel_range(m, k, n, n, a.at, a.rs, a.cs, a.tile_rs, panels, c, p0, p1, shape, epilogue, args)
        };
    }
    // Narrow panels. A few rows: each panel row decoded into registers and
    // multiplied at once (`fused_panel`). More: decoded into f32 a panel or
    // two at a time (as many as the tile spans), then multiplied as f32
    // panels are. Either way the epilogue runs after each group of panels,
    // as `panel_range` runs it.
    if m <= FUSED_ROWS {
        debug_assert!(a.tile_rs == a.rs, "a few rows are never packed");
        let Rows { at: a, rs: a_rs, cs: a_cs, .. } = a;
        let mut g0 = p0;
        while g0 < p1 {
            let g1 = p1.min(g0 + GROUP);
            for panel in g0..g1 {
                let (c_at, cols) = (unsafe { c.add(panel * NR) }, (n - panel * NR).min(NR));
                unsafe { fused_panel(m, k, a, a_rs, a_cs, b, panel, c_at, n, cols) };
            }
            if !epilogue.is_null() {
                unsafe { super::epilogue::rows(epilogue, args, c, 0, m, g0 * NR, n.min(g1 * NR)) };
            }
            g0 = g1;
        }
        return;
    }
    let width = if shape == TileShape::TwoPanels { 2 } else { 1 };
    let mut decoded = DECODED.take();
    decoded.clear();
    decoded.resize(width * k * NR, 0.0);
    let mut g0 = p0;
    while g0 < p1 {
        let g1 = p1.min(g0 + GROUP);
        let mut panel = g0;
        while panel < g1 {
            let count = width.min(g1 - panel);
            for i in 0..count {
                unsafe { decode_panel(b, k, panel + i, decoded.as_mut_ptr().add(i * k * NR)) };
            }
            // `c` from this panel's first column: `n` columns on from there
            // are this call's, rows `n` apart.
            let (c_at, cols) = (unsafe { c.add(panel * NR) }, n - panel * NR);
            let none = std::ptr::null();
            let decoded = decoded.as_ptr();
            unsafe {
                panel_range(m, k, cols, n, a.at, a.rs, a.cs, a.tile_rs, decoded, c_at, 0, count, shape, none, args)
            };
            panel += count;
        }
        if !epilogue.is_null() {
            unsafe { super::epilogue::rows(epilogue, args, c, 0, m, g0 * NR, n.min(g1 * NR)) };
        }
        g0 = g1;
    }
    DECODED.set(decoded);
}

/// Products of at most this many rows (a decode step's) decode each row of
/// a narrow panel into registers and multiply it at once, rather than
/// through the scratch: with so few rows the scratch's stores and loads
/// cost more than the arithmetic.
const FUSED_ROWS: usize = 3;

multiversion! {
    /// `m` (at most `FUSED_ROWS`) rows of the product with narrow panel
    /// `panel`: `cols` columns of `c` from `c`, rows `ldc` apart.
    unsafe fn fused_panel(
        m: usize,
        k: usize,
        a: *const f32,
        a_rs: isize,
        a_cs: isize,
        b: Weight,
        panel: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) = fused_panel_impl;
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn fused_panel_impl<const FMA: bool>(
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: Weight,
    panel: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    unsafe {
        match m {
            0 => {}
            1 => fused_rows::<1, FMA>(k, a, a_rs, a_cs, b, panel, c, ldc, cols),
            2 => fused_rows::<2, FMA>(k, a, a_rs, a_cs, b, panel, c, ldc, cols),
            _ => fused_rows::<3, FMA>(k, a, a_rs, a_cs, b, panel, c, ldc, cols),
        }
    }
}

/// `fused_panel` for `R` rows: the accumulators (`R` rows of `NR`) stay in
/// registers while each of the panel's rows is decoded and multiplied.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn fused_rows<const R: usize, const FMA: bool>(
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: Weight,
    panel: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    let at = unsafe { b.panels.add(panel * b.panel_words(k)) };
    let mut acc = [[0f32; NR]; R];
    // A function, not a closure: a closure is not compiled for the
    // caller's target features, so LLVM called it per row.
    #[inline(always)]
    fn step<const R: usize, const FMA: bool>(
        acc: &mut [[f32; NR]; R],
        a: *const f32,
        at: isize,
        a_rs: isize,
        w: &[f32; NR],
    ) {
        for_each_row!(R, r, {
            let x = unsafe { *a.offset(r as isize * a_rs + at) };
            for l in 0..NR {
                acc[r][l] = madd::<FMA>(x, w[l], acc[r][l]);
            }
        });
    }
    match b.coding {
        Coding::F32 => unreachable!("f32 panels are read in place"),
        Coding::F16 | Coding::Bf16 => {
            let bf16 = b.coding == Coding::Bf16;
            for p in 0..k {
                let halves = unsafe { &*((at as *const u16).add(p * NR) as *const [u16; NR]) };
                step::<R, FMA>(&mut acc, a, p as isize * a_cs, a_rs, &decode_halves::<FMA>(halves, bf16));
            }
        }
        // One row (a decode step): the zero point and scale fold out of
        // the block's sum (`folded_codes`).
        Coding::Codes8 | Coding::Codes4 if R == 1 => acc[0] = unsafe { folded_codes::<FMA>(k, a, a_cs, b, at) },
        // One loop per coding, each row decoded into a fresh value: with
        // one array filled by either decoder, LLVM kept it on the stack and
        // reloaded it in pieces.
        Coding::Codes8 | Coding::Codes4 => {
            let words = b.block_words();
            let four = b.coding == Coding::Codes4;
            for blk in 0..k.div_ceil(b.block) {
                let (scales, zeros, codes) = unsafe { code_block(at, words, blk) };
                let rows = b.block.min(k - blk * b.block);
                let at_row = |p: usize| (blk * b.block + p) as isize * a_cs;
                if four {
                    for p in 0..rows {
                        let bytes = unsafe { &*(codes.add(p * NR / 2) as *const [u8; NR / 2]) };
                        step::<R, FMA>(&mut acc, a, at_row(p), a_rs, &decode_nibbles(bytes, zeros, scales));
                    }
                } else {
                    for p in 0..rows {
                        let bytes = unsafe { &*(codes.add(p * NR) as *const [u8; NR]) };
                        step::<R, FMA>(&mut acc, a, at_row(p), a_rs, &decode_bytes(bytes, zeros, scales));
                    }
                }
            }
        }
        Coding::Int8 => {
            let mut remainder = b.remainder.of(panel).peekable();
            for g in 0..k.div_ceil(4) {
                let rows = unsafe { decode_int8_group(at, g, &mut remainder) };
                for (r, row) in rows.iter().enumerate().take(k - 4 * g) {
                    step::<R, FMA>(&mut acc, a, (4 * g + r) as isize * a_cs, a_rs, row);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (l, &v) in row[..cols].iter().enumerate() {
            unsafe { *c.add(r * ldc + l) = v };
        }
    }
}

/// One row of `a` by a panel of codes (at `at`), folding each block's zero
/// point and scale out of its sum: `s * (sum a c - z * sum a)`, so a code
/// costs a conversion and a multiply-add rather than a conversion, a
/// subtraction, a multiply and a multiply-add (a decode step is these
/// products). Rows of several do `(c - z) * s` per code, as the wider
/// paths do: the two orders round differently, by parts in 2^24 of the
/// block's sums.
#[inline(always)]
unsafe fn folded_codes<const FMA: bool>(k: usize, a: *const f32, a_cs: isize, b: Weight, at: *const u32) -> [f32; NR] {
    let words = b.block_words();
    let four = b.coding == Coding::Codes4;
    let mut acc = [0f32; NR];
    for blk in 0..k.div_ceil(b.block) {
        let (scales, zeros, codes) = unsafe { code_block(at, words, blk) };
        let rows = b.block.min(k - blk * b.block);
        let (mut part, mut sum) = ([0f32; NR], 0f32);
        for p in 0..rows {
            let x = unsafe { *a.offset((blk * b.block + p) as isize * a_cs) };
            sum += x;
            let w = if four {
                code_nibbles(unsafe { &*(codes.add(p * NR / 2) as *const [u8; NR / 2]) })
            } else {
                code_bytes(unsafe { &*(codes.add(p * NR) as *const [u8; NR]) })
            };
            for l in 0..NR {
                part[l] = madd::<FMA>(x, w[l], part[l]);
            }
        }
        for l in 0..NR {
            acc[l] = madd::<FMA>(scales[l], part[l] - zeros[l] * sum, acc[l]);
        }
    }
    acc
}

/// Block `blk` of a panel of codes at `at` (`words` a block): its scales and
/// zero points per column, and its codes.
#[inline(always)]
unsafe fn code_block<'a>(at: *const u32, words: usize, blk: usize) -> (&'a [f32; NR], &'a [f32; NR], *const u8) {
    let block = unsafe { at.add(blk * words) };
    unsafe { (&*(block as *const [f32; NR]), &*(block.add(NR) as *const [f32; NR]), block.add(2 * NR) as *const u8) }
}

/// A row of 4-bit codes as their whole numbers.
#[inline(always)]
fn code_nibbles(bytes: &[u8; NR / 2]) -> [f32; NR] {
    let mut row = [0f32; NR];
    for l in 0..NR / 2 {
        row[l] = (bytes[l] & 15) as i32 as f32;
        row[l + NR / 2] = (bytes[l] >> 4) as i32 as f32;
    }
    row
}

/// A row of 8-bit codes as their whole numbers.
#[inline(always)]
fn code_bytes(bytes: &[u8; NR]) -> [f32; NR] {
    let mut row = [0f32; NR];
    for l in 0..NR / 2 {
        row[l] = bytes[l] as i32 as f32;
        row[l + NR / 2] = bytes[l + NR / 2] as i32 as f32;
    }
    row
}

/// Group `g` (four rows) of the int8 panel at `at` (`Coding::Int8`) as
/// values, with the remainder's entries in it added back (`remainder`: the
/// panel's entries, in order of group, from this group's first).
///
/// # Safety
/// `at` is an int8 panel of more than `4 * g` rows.
#[inline(always)]
unsafe fn decode_int8_group(
    at: *const u32,
    g: usize,
    remainder: &mut std::iter::Peekable<impl Iterator<Item = (usize, usize, i32)>>,
) -> [[f32; NR]; 4] {
    let bytes = unsafe { &*(at.add(NR + g * NR) as *const [u8; 4 * NR]) };
    let mut rows = [[0f32; NR]; 4];
    for l in 0..NR {
        for (r, row) in rows.iter_mut().enumerate() {
            row[l] = bytes[4 * l + r] as i8 as f32;
        }
    }
    while let Some((p, l, v)) = remainder.next_if(|&(p, _, _)| p / 4 == g) {
        rows[p % 4][l] += v as f32;
    }
    rows
}

/// A row of halves (IEEE or bfloat16) as values. On the AVX2 and AVX-512
/// paths (`FMA`), IEEE halves convert with F16C's `vcvtph2ps`, eight at
/// once, where the portable conversion took seven operations a vector.
#[inline(always)]
fn decode_halves<const FMA: bool>(halves: &[u16; NR], bf16: bool) -> [f32; NR] {
    #[cfg(target_arch = "x86_64")]
    if FMA && !bf16 {
        // The multiversioned paths that pass `FMA` enable F16C (`Isa::host`
        // checks it).
        return unsafe { halves_f16c(halves) };
    }
    let mut row = [0f32; NR];
    for l in 0..NR {
        row[l] = if bf16 { f32::from_bits((halves[l] as u32) << 16) } else { f16_to_f32(halves[l]) };
    }
    row
}

multiversion! {
    /// Panel `panel` of the narrow weight `b` (`k` rows) as f32 into `out`
    /// (`k * NR` floats).
    unsafe fn decode_panel(b: Weight, k: usize, panel: usize, out: *mut f32) = decode_panel_impl;
}

#[inline(always)]
unsafe fn decode_panel_impl<const FMA: bool>(b: Weight, k: usize, panel: usize, out: *mut f32) {
    let at = unsafe { b.panels.add(panel * b.panel_words(k)) };
    let out = unsafe { std::slice::from_raw_parts_mut(out, k * NR) };
    match b.coding {
        Coding::F32 => unreachable!("f32 panels are read in place"),
        Coding::F16 | Coding::Bf16 => {
            let bf16 = b.coding == Coding::Bf16;
            for p in 0..k {
                let halves = unsafe { &*((at as *const u16).add(p * NR) as *const [u16; NR]) };
                let row = unsafe { &mut *(out.as_mut_ptr().add(p * NR) as *mut [f32; NR]) };
                *row = decode_halves::<FMA>(halves, bf16);
            }
        }
        Coding::Codes8 | Coding::Codes4 => {
            let words = b.block_words();
            let blocks = k.div_ceil(b.block);
            for blk in 0..blocks {
                let (scales, zeros, codes) = unsafe { code_block(at, words, blk) };
                for p in 0..b.block.min(k - blk * b.block) {
                    let row = unsafe { &mut *(out.as_mut_ptr().add((blk * b.block + p) * NR) as *mut [f32; NR]) };
                    *row = if b.coding == Coding::Codes4 {
                        decode_nibbles(unsafe { &*(codes.add(p * NR / 2) as *const [u8; NR / 2]) }, zeros, scales)
                    } else {
                        decode_bytes(unsafe { &*(codes.add(p * NR) as *const [u8; NR]) }, zeros, scales)
                    };
                }
            }
        }
        Coding::Int8 => {
            let mut remainder = b.remainder.of(panel).peekable();
            for g in 0..k.div_ceil(4) {
                let rows = unsafe { decode_int8_group(at, g, &mut remainder) };
                for (r, row) in rows.iter().enumerate().take(k - 4 * g) {
                    out[(4 * g + r) * NR..(4 * g + r + 1) * NR].copy_from_slice(row);
                }
            }
        }
    }
}

/// A row of 4-bit codes (column `l` low, `l + NR / 2` high) as values.
#[inline(always)]
fn decode_nibbles(bytes: &[u8; NR / 2], zeros: &[f32; NR], scales: &[f32; NR]) -> [f32; NR] {
    let mut row = [0f32; NR];
    for l in 0..NR / 2 {
        let (lo, hi) = ((bytes[l] & 15) as i32, (bytes[l] >> 4) as i32);
        row[l] = (lo as f32 - zeros[l]) * scales[l];
        row[l + NR / 2] = (hi as f32 - zeros[l + NR / 2]) * scales[l + NR / 2];
    }
    row
}

/// A row of 8-bit codes as values.
#[inline(always)]
fn decode_bytes(bytes: &[u8; NR], zeros: &[f32; NR], scales: &[f32; NR]) -> [f32; NR] {
    let mut row = [0f32; NR];
    // In two halves, as `decode_nibbles` does: written as one loop of 32,
    // LLVM converted the bytes one at a time.
    for l in 0..NR / 2 {
        let (lo, hi) = (bytes[l] as i32, bytes[l + NR / 2] as i32);
        row[l] = (lo as f32 - zeros[l]) * scales[l];
        row[l + NR / 2] = (hi as f32 - zeros[l + NR / 2]) * scales[l + NR / 2];
    }
    row
}

/// A row of IEEE halves as values, with F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn halves_f16c(halves: &[u16; NR]) -> [f32; NR] {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let mut row = [0f32; NR];
    for i in 0..NR / 8 {
        unsafe {
            let h = _mm_loadu_si128(halves.as_ptr().add(8 * i) as *const __m128i);
            _mm256_storeu_ps(row.as_mut_ptr().add(8 * i), _mm256_cvtph_ps(h));
        }
    }
    row
}

/// An IEEE half's value, without branches (so the decode loop vectorises):
/// its exponent and mantissa moved to a float's places and scaled by
/// `2^112`, which also makes subnormals right; infinities and NaNs get the
/// float's all-ones exponent.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let magnitude = h & 0x7fff;
    let scaled = f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000);
    let bits = if magnitude >= 0x7c00 { (magnitude << 13) | 0x7f80_0000 } else { scaled.to_bits() };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

multiversion! {
    /// Panels `p0..p1` of the product in tiles of `shape`, and the
    /// epilogue over their columns: `n` columns of `c`, rows `ldc` apart.
    unsafe fn panel_range(
        m: usize,
        k: usize,
        n: usize,
        ldc: usize,
        a: *const f32,
        a_rs: isize,
        a_cs: isize,
        a_tile_rs: isize,
        b: *const f32,
        c: *mut f32,
        p0: usize,
        p1: usize,
        shape: TileShape,
        epilogue: *const i64,
        args: *const *mut u8,
    ) = panel_range_impl;
}

// Keep this body lean: with a row gather (and its scratch `Vec`) inside
// it, LLVM stored the tile's accumulators to the stack after every
// multiply-add, and the products ran 3x slower. `sgemm_packed` gathers.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn panel_range_impl<const FMA: bool>(
    m: usize,
    k: usize,
    n: usize,
    ldc: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    a_tile_rs: isize,
    b: *const f32,
    c: *mut f32,
    p0: usize,
    p1: usize,
    shape: TileShape,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let mut g0 = p0;
    while g0 < p1 {
        let g1 = p1.min(g0 + GROUP);
        let mut panel = g0;
        while panel < g1 {
            let width = if shape == TileShape::TwoPanels && panel + 1 < g1 { 2 } else { 1 };
            let cols = (width * NR).min(n - panel * NR);
            let bp = unsafe { b.add(panel * k * NR) };
            // The panels the next tiles read, fetched a share per row tile.
            let next = panel + width;
            let next_len = if next < p1 { (p1 - next).min(width) * k * NR } else { 0 };
            let next_bp = unsafe { b.add(next * k * NR) };
            let row_tiles = m.div_ceil(MR);
            let mut i = 0;
            while i < m {
                let t = i / MR;
                prefetch(
                    unsafe { next_bp.add(next_len * t / row_tiles) },
                    next_len * (t + 1) / row_tiles - next_len * t / row_tiles,
                );
                let (ai, ci) = unsafe { (a.offset(i as isize * a_tile_rs), c.add(i * ldc + panel * NR)) };
                let rows = MR.min(m - i);
                // The rows of `c` the next tile stores: a store that misses
                // the cache stalls the tile after it.
                if i + rows < m {
                    for r in i + rows..m.min(i + rows + MR) {
                        prefetch(unsafe { c.add(r * ldc + panel * NR) }, cols);
                    }
                }
                let tile = Tile { k, a: ai, a_rs, a_cs, b: bp, c: ci, ldc, cols };
                unsafe {
                    match (shape, width) {
                        (TileShape::TwoPanels, 2) => tile.rows::<2, NR, FMA>(rows),
                        // A few rows (a decode step's): the whole panel in
                        // one pass, two accumulators a row (eight for four
                        // rows, the panel's row in two more registers).
                        // Half a panel at a time would stream the weight
                        // twice, its second pass from the cache, each
                        // multiply-add waiting on the one before: 25-30%
                        // slower on a matrix-vector product bound by memory.
                        (TileShape::HalfPanel, _) if rows <= WHOLE_PANEL_ROWS => tile.rows::<1, NR, FMA>(rows),
                        (TileShape::HalfPanel, _) => {
                            tile.rows::<1, HALF, FMA>(rows);
                            if cols > HALF {
                                let rest = Tile { b: bp.add(HALF), c: ci.add(HALF), cols: cols - HALF, ..tile };
                                rest.rows::<1, HALF, FMA>(rows);
                            }
                        }
                        _ => tile.rows::<1, NR, FMA>(rows),
                    }
                }
                i += rows;
            }
            panel += width;
        }
        if !epilogue.is_null() {
            unsafe { super::epilogue::rows(epilogue, args, c, 0, m, g0 * NR, n.min(g1 * NR)) };
        }
        g0 = g1;
    }
}

thread_local! {
    /// Rows of `a` gathered through a row table (`egret_sgemm_packed`).
    static GATHERED_A: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Rows of `a` packed for AVX2's tiles (`pack_rows`).
    static PACKED_A: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Rows of `a` as unsigned bytes for the int8 products (`int8`).
    static QUANTIZED_A: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Narrow panels decoded to f32 (`panels_of`).
    static DECODED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The product of a call whose rows a table places (`egret_sgemm_packed`).
    static SCATTERED_C: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Asks for `len` floats from `at` to be brought into the cache.
#[inline(always)]
fn prefetch(at: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 16;
        let mut off = 0;
        while off < len {
            // A prefetch never faults; every range asked for lies inside `b` or `c` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off) as *const i8) };
            off += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, len);
}

/// One tile of `c`: rows of `a` from `a` (strided), panels of `b` from `b`
/// (each `k * NR` elements), `cols` columns of `c` stored from `c`.
#[derive(Clone, Copy)]
struct Tile {
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
}

impl Tile {
    /// The tile for `rows` (at most `MR`) rows.
    #[inline(always)]
    unsafe fn rows<const W: usize, const C: usize, const FMA: bool>(&self, rows: usize) {
        unsafe {
            match rows {
                6 => self.run::<6, W, C, FMA>(),
                5 => self.run::<5, W, C, FMA>(),
                4 => self.run::<4, W, C, FMA>(),
                3 => self.run::<3, W, C, FMA>(),
                2 => self.run::<2, W, C, FMA>(),
                _ => self.run::<1, W, C, FMA>(),
            }
        }
    }

    /// The `R x W*C` product, kept in registers until it is stored: `C`
    /// columns of each of `W` panels (`C` is `NR`, or half of it for a
    /// register file too small for a whole panel's row).
    #[inline(always)]
    unsafe fn run<const R: usize, const W: usize, const C: usize, const FMA: bool>(&self) {
        let mut acc = [[[0f32; C]; W]; R];
        // One pointer per row of `a`, each stepped on its own. From one
        // pointer (`a + r * a_rs`) LLVM chained R + 1 dependent adds
        // through every step of `k`, which on AVX2 took longer than the
        // step's 12 multiply-adds; now only the row pointers' common step
        // carries from one iteration to the next.
        let mut a_at = [self.a; R];
        for (r, at) in a_at.iter_mut().enumerate() {
            *at = unsafe { self.a.offset(r as isize * self.a_rs) };
        }
        let mut b_at = self.b;
        let panel_len = self.k * NR;
        for _ in 0..self.k {
            let mut row = [[0f32; C]; W];
            for (w, row_w) in row.iter_mut().enumerate() {
                *row_w = unsafe { *(b_at.add(w * panel_len) as *const [f32; C]) };
            }
            for_each_row!(R, r, {
                let x = unsafe { *a_at[r] };
                a_at[r] = unsafe { a_at[r].offset(self.a_cs) };
                for (acc_rw, row_w) in acc[r].iter_mut().zip(&row) {
                    for l in 0..C {
                        acc_rw[l] = madd::<FMA>(x, row_w[l], acc_rw[l]);
                    }
                }
            });
            b_at = unsafe { b_at.add(NR) };
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (w, acc_rw) in acc_r.iter().enumerate() {
                let dst = unsafe { self.c.add(r * self.ldc + w * NR) };
                let cols = self.cols.saturating_sub(w * NR).min(C);
                if cols == C {
                    unsafe { *(dst as *mut [f32; C]) = *acc_rw };
                } else {
                    for (l, &v) in acc_rw[..cols].iter().enumerate() {
                        unsafe { *dst.add(l) = v };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(b: &[f32], offset: usize, strides: [usize; 2], k: usize, n: usize) -> Vec<u32> {
        pack_panels(b, offset, strides, k, n)
    }

    /// `c = a @ b` through the packed GEMM with every tile shape, against a
    /// product in f64 of `b`'s values (`value(p, j)`).
    fn check_product(label: &str, m: usize, k: usize, n: usize, packed: &[u32], value: impl Fn(usize, usize) -> f32) {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.25).collect();
        check_product_with(label, m, k, n, &a, packed, value)
    }

    fn check_product_with(
        label: &str,
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        packed: &[u32],
        value: impl Fn(usize, usize) -> f32,
    ) {
        for shape in [TileShape::TwoPanels, TileShape::OnePanel, TileShape::HalfPanel] {
            let mut c = vec![f32::NAN; m * n + 64];
            let none = std::ptr::null();
            unsafe {
                let b = Weight::read(packed.as_ptr());
                let (m, k, n) = (m as i64, k as i64, n as i64);
                sgemm_packed(m, k, n, a.as_ptr(), k, 1, none, b, c.as_mut_ptr(), none, shape, none, std::ptr::null())
            };
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| a[i * k + p] as f64 * value(p, j) as f64).sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{label} {shape:?} {m}x{k}x{n} at ({i}, {j}): {got} against {want}"
                    );
                }
            }
            assert!(c[m * n..].iter().all(|v| v.is_nan()), "{label} {shape:?} stored past the end of c");
        }
    }

    #[test]
    fn every_tile_shape_sums_in_the_same_order() {
        // Each element's sum runs over `k` in order whatever the tile, so
        // every shape gives the same bits: row counts that end in every
        // tile height (AVX2 takes a whole panel for up to four rows).
        // A depth of 1024 puts the rows 4 KiB apart, which AVX2's tiles
        // read from a packed copy (`pack_rows`).
        for m in [11, 10, 4, 3, 1] {
            every_tile_shape_sums_in_the_same_order_at(m, 700);
        }
        for m in [13, 6, 5] {
            every_tile_shape_sums_in_the_same_order_at(m, 1024);
        }
    }

    #[test]
    fn rows_4_kib_apart_multiply_from_their_packed_copy() {
        for m in [13, 6, 5] {
            let k = 1024;
            let b: Vec<f32> = (0..k * 45).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.29).collect();
            check_product("rows 4 KiB apart", m, k, 45, &pack(&b, 0, [45, 1], k, 45), |p, j| b[p * 45 + j]);
        }
    }

    fn every_tile_shape_sums_in_the_same_order_at(m: usize, k: usize) {
        let n = 70;
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.37).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.29).collect();
        let packed = pack(&b, 0, [n, 1], k, n);
        let product = |shape: TileShape| {
            let mut c = vec![0f32; m * n];
            let none = std::ptr::null();
            unsafe {
                let w = Weight::read(packed.as_ptr());
                let (m, k, n) = (m as i64, k as i64, n as i64);
                sgemm_packed(m, k, n, a.as_ptr(), k, 1, none, w, c.as_mut_ptr(), none, shape, none, std::ptr::null())
            };
            c.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        let one = product(TileShape::OnePanel);
        assert_eq!(product(TileShape::HalfPanel), one, "{m} rows");
        assert_eq!(product(TileShape::TwoPanels), one, "{m} rows");
    }

    #[test]
    fn narrow_panels_decode_to_their_values() {
        // Whole and partial panels and blocks; a code's every value, at 2,
        // 4 and 8 bits, with zero points and scales per block and column.
        for (m, k, n, block) in
            [(1usize, 32usize, 32usize, 32usize), (3, 40, 33, 16), (7, 64, 70, 32), (13, 100, 96, 64), (1, 8, 5, 4)]
        {
            for bits in [2u32, 4, 8] {
                let codes: Vec<u8> = (0..k * n).map(|i| ((i * 37 + i / 7) % (1 << bits)) as u8).collect();
                let blocks = k.div_ceil(block);
                let scales: Vec<f32> = (0..blocks * n).map(|i| 0.01 + (i % 13) as f32 * 0.003).collect();
                let zeros: Vec<f32> = (0..blocks * n).map(|i| (i % (1 << bits)) as f32).collect();
                let packed = pack_code_panels(&codes, 0, &scales, &zeros, k, n, block, bits);
                let value = |p: usize, j: usize| {
                    let b = (p / block) * n + j;
                    (codes[p * n + j] as f32 - zeros[b]) * scales[b]
                };
                check_product(&format!("{bits}-bit codes, blocks of {block}"), m, k, n, &packed, value);
            }
            // Halves: normal, subnormal, zero of both signs, the largest.
            let specials = [0x0000u16, 0x8000, 0x0001, 0x03ff, 0x0400, 0x3c00, 0xbc00, 0x7bff, 0xfbff, 0x3555];
            let half = |p: usize, j: usize| specials[(p * 3 + j * 5) % specials.len()];
            let f16 = pack_half_panels(half, k, n, false);
            check_product("f16", m, k, n, &f16, |p, j| f16_to_f32(half(p, j)));
            let bf16 = |p: usize, j: usize| (((p * 31 + j * 17) % 200) as u16).wrapping_add(0x3f00);
            let packed = pack_half_panels(bf16, k, n, true);
            check_product("bf16", m, k, n, &packed, |p, j| f32::from_bits((bf16(p, j) as u32) << 16));
        }
    }

    #[test]
    fn empty_products_store_nothing() {
        // No rows (a slice that came out empty; found by the compile_run
        // fuzz target: the few-rows path read and wrote three rows of
        // buffers holding none), no columns, and no depth (all zeros).
        for (m, k, n) in [(0usize, 8usize, 5usize), (0, 3, 16), (0, 40, 70), (2, 8, 0), (2, 0, 16), (1, 0, 3)] {
            let f32s: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5).collect();
            check_product("f32", m, k, n, &pack(&f32s, 0, [n, 1], k, n), |p, j| f32s[p * n + j]);
            let half = |p: usize, j: usize| (0x3c00 + p * 3 + j) as u16;
            let packed = pack_half_panels(half, k, n, false);
            check_product("f16", m, k, n, &packed, |p, j| f16_to_f32(half(p, j)));
            let w = |p: usize, j: usize| ((p * 31 + j * 17) % 256) as i32 as u8 as i8;
            check_product("int8", m, k, n, &pack_int8_panels(w, k, n), |p, j| w(p, j) as f32);
        }
    }

    #[test]
    fn int8_weights_multiply_whole_and_fractional_activations() {
        // Whole-number activations spanning 256 values (the integer products
        // where the host has them), spanning more, and fractional ones (both
        // decoded to f32); row counts on both sides of the fused rows.
        for (m, k, n) in [(1usize, 4usize, 1usize), (2, 7, 33), (4, 64, 70), (7, 130, 96), (13, 33, 64), (20, 768, 40)]
        {
            let w = |p: usize, j: usize| ((p * 31 + j * 17 + p / 3) % 256) as i32 as u8 as i8;
            let packed = pack_int8_panels(w, k, n);
            let value = |p: usize, j: usize| w(p, j) as f32;
            for (what, a) in [
                ("whole, 0..=255", (0..m * k).map(|i| ((i * 37 + i / 5) % 256) as f32).collect::<Vec<f32>>()),
                ("whole, -128..=127", (0..m * k).map(|i| ((i * 37) % 256) as f32 - 128.0).collect()),
                ("whole, -255..=0", (0..m * k).map(|i| -(((i * 13) % 256) as f32)).collect()),
                ("whole, 0..=300", (0..m * k).map(|i| ((i * 37) % 301) as f32).collect()),
                ("fractional", (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.25).collect()),
            ] {
                check_product_with(&format!("int8 by {what}"), m, k, n, &a, &packed, value);
            }
        }
    }

    #[test]
    fn every_pair_of_int8_weights_is_made_safe_for_vpmaddubsw() {
        // Every pair: what the panels keep never saturates 16 bits by any
        // two bytes, each weight moves toward zero (never past it), and a
        // pair that is safe already is kept as it is.
        for w0 in -128..=127i32 {
            for w1 in -128..=127i32 {
                let (s0, s1) = pair_safe(w0 as i8, w1 as i8);
                let (s0, s1) = (s0 as i32, s1 as i32);
                let bound = |a: i32, b: i32| {
                    let (high, low) = (255 * (a.max(0) + b.max(0)), 255 * (a.min(0) + b.min(0)));
                    high <= i16::MAX as i32 && low >= i16::MIN as i32
                };
                assert!(bound(s0, s1), "({w0}, {w1}) -> ({s0}, {s1}) can saturate");
                if bound(w0, w1) {
                    assert_eq!((s0, s1), (w0, w1));
                }
                for (w, s) in [(w0, s0), (w1, s1)] {
                    assert!(s * w >= 0 && s.abs() <= w.abs(), "({w0}, {w1}) -> ({s0}, {s1})");
                }
            }
        }
    }

    #[test]
    fn halves_decode_exactly() {
        // Every half against the widening the standard library's f64 path
        // gives: sign, exponent and mantissa rebuilt by hand.
        for h in 0..=u16::MAX {
            let (sign, exp, man) = ((h >> 15) as i32, ((h >> 10) & 31) as i32, (h & 1023) as f64);
            let want = match exp {
                0 => man * 2f64.powi(-24),
                31 if man == 0.0 => f64::INFINITY,
                31 => f64::NAN,
                e => (1.0 + man / 1024.0) * 2f64.powi(e - 15),
            } * if sign == 1 { -1.0 } else { 1.0 };
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), (want as f32).to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn packed_products_match_a_naive_product() {
        // One, two and three panels, whole and partial, and row counts past
        // a whole tile.
        for (m, k, n) in
            [(1, 1, 1), (7, 5, 33), (13, 64, 70), (6, 3, 32), (9, 17, 96), (20, 8, 64), (7, 600, 40), (3, 512, 33)]
        {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.25).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.5).collect();
            // b read transposed from storage [n, k], as Gemm with transB does.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            // `a` again with its rows stored in reverse, read through a row table.
            let reversed: Vec<f32> = (0..m).rev().flat_map(|i| a[i * k..(i + 1) * k].to_vec()).collect();
            let table: Vec<i64> = (0..m).map(|i| ((m - 1 - i) * k) as i64).collect();
            for ((packed, layout), shape, gathered, placed) in
                [(pack(&b, 0, [n, 1], k, n), "row-major"), (pack(&bt, 0, [1, k], k, n), "transposed")]
                    .into_iter()
                    .flat_map(|p| {
                        [TileShape::TwoPanels, TileShape::OnePanel, TileShape::HalfPanel].map(|s| (p.clone(), s))
                    })
                    .flat_map(|(p, s)| [(p.clone(), s, false), (p, s, true)])
                    .flat_map(|(p, s, g)| [(p.clone(), s, g, false), (p, s, g, true)])
            {
                let label = format!("{layout}, {shape:?}, rows of a gathered: {gathered}, of c placed: {placed}");
                // With `placed`, row `i` of the product goes to row `m - 1 - i`.
                let c_table: Vec<i64> = (0..m).map(|i| ((m - 1 - i) * n) as i64).collect();
                let c_rows = if placed { c_table.as_ptr() } else { std::ptr::null() };
                let (a_base, a_rows) =
                    if gathered { (reversed.as_ptr(), table.as_ptr()) } else { (a.as_ptr(), std::ptr::null()) };
                // Guard elements after `c` catch a tile that stores past a
                // partial panel's columns.
                const GUARD: usize = 64;
                let mut c = vec![f32::NAN; m * n + GUARD];
                unsafe {
                    sgemm_packed(
                        m as i64,
                        k as i64,
                        n as i64,
                        a_base,
                        k as i64,
                        1,
                        a_rows,
                        Weight::read(packed.as_ptr()),
                        c.as_mut_ptr(),
                        c_rows,
                        shape,
                        std::ptr::null(),
                        std::ptr::null(),
                    )
                };
                for i in 0..m {
                    let at = if placed { m - 1 - i } else { i };
                    for j in 0..n {
                        let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                        assert!(
                            (c[at * n + j] - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{label} {m}x{k}x{n} at ({i}, {j})"
                        );
                    }
                }
                assert!(c[m * n..].iter().all(|v| v.is_nan()), "{label} {m}x{k}x{n} stored past the end of c");
            }
        }
    }
}
