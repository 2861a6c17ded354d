//! The CPU backend's own choices for a plan from lowering: which matmul
//! implementation runs each product, and the layout of constant weights
//! for it (panels packed at compile time). `cpu::compile` runs this step
//! first; lowering makes none of these choices, so the same plan serves the
//! GPU backends.

use crate::plan::{Buffer, KernelKind, MatMulImpl, MatMulKernel, Plan, Storage};
use egret_ir::{BlockCodes, DType, Data, Tensor};
use std::sync::Arc;

use egret_kernels::gemm::{
    pack_code_panels, pack_half_panels, pack_int8_panels, pack_panels, Coding, HEADER_WORDS, MAGIC,
};

/// The packed weight for a product whose `b` is the constant `t`, read as
/// `[k, n]` from `offset` with `strides`, in the narrowest coding that
/// holds its values exactly: the integer codes the importer said it came
/// from (checked here: `BlockCodes::matches`), or halves where every value
/// is one, else f32. A decode step's product is bound by reading its
/// weight, so a narrower coding is a faster product.
pub fn pack_weight(t: &Tensor, offset: usize, strides: [usize; 2], k: usize, n: usize) -> Vec<u32> {
    let whole = offset == 0 && t.shape() == [k, n];
    // A weight computed from its codes or its half-precision elements
    // (`Tensor::is_derived`) is packed from them without reading its f32
    // elements, which are then never computed.
    let trusted = |c: &BlockCodes| t.is_derived() || t.as_f32().is_some_and(|w| c.matches(w));
    if let Some(codes) = t.codes().filter(|c| whole && strides == [n, 1] && trusted(c)) {
        // Whole numbers of a signed byte (an integer product's weight, its
        // zero point taken off): int8 panels, which VNNI or AVX2 multiplies
        // as integers when the activations are whole numbers too (`int8`).
        let unscaled = codes.scales.iter().all(|&s| s == 1.0);
        let bytes = if codes.bits == 8 && unscaled { signed_bytes(codes) } else { None };
        if let Some(bytes) = bytes {
            return pack_int8_panels(|p, j| bytes[p * n + j], k, n);
        }
        if codes.codes_fit() {
            return pack_code_panels(
                &codes.codes,
                codes.offset,
                &codes.scales,
                &codes.zeros,
                k,
                n,
                codes.block,
                codes.bits,
            );
        }
    }
    let index = |p: usize, j: usize| offset + p * strides[0] + j * strides[1];
    match t.half() {
        Some(Data::F16(h)) => return pack_half_panels(|p, j| h[index(p, j)].to_bits(), k, n, false),
        Some(Data::BF16(h)) => return pack_half_panels(|p, j| h[index(p, j)].to_bits(), k, n, true),
        _ => {}
    }
    let w = t.as_f32().expect("packed weights are f32");
    let at = |p: usize, j: usize| w[index(p, j)];
    let every = |f: &dyn Fn(f32) -> bool| (0..k).all(|p| (0..n).all(|j| f(at(p, j))));
    if every(&|x| egret_ir::half::f16::from_f32(x).to_f32().to_bits() == x.to_bits()) {
        return pack_half_panels(|p, j| egret_ir::half::f16::from_f32(at(p, j)).to_bits(), k, n, false);
    }
    if every(&|x| x.to_bits() & 0xffff == 0) {
        return pack_half_panels(|p, j| (at(p, j).to_bits() >> 16) as u16, k, n, true);
    }
    pack_panels(w, offset, strides, k, n)
}

/// The values of 8-bit codes with a scale of 1 (`code - zero`) as signed
/// bytes, row-major, or `None` where one is not a signed byte: a zero point
/// that is not a whole number, or a value past -128..=127. Read a row of
/// codes at a time: element by element (`BlockCodes::value`), this check
/// and the packing were most of an int8 BERT-base's compile (its lowering
/// took 1.3 s, now 0.4 s with `pack_int8_panels` reading in row order).
fn signed_bytes(codes: &BlockCodes) -> Option<Vec<i8>> {
    let (k, n) = (codes.k, codes.n);
    if !codes.is_well_formed() {
        return None;
    }
    // A zero point past 512 in magnitude leaves every value past a byte.
    let whole = |z: f32| (z.fract() == 0.0 && z.abs() <= 512.0).then_some(z as i32);
    let zeros: Vec<i32> = codes.zeros.iter().map(|&z| whole(z)).collect::<Option<_>>()?;
    let stored: &[u8] = &codes.codes;
    let mut out = Vec::with_capacity(k * n);
    for (p, row) in stored.chunks_exact(n.max(1)).take(k).enumerate() {
        let zeros = &zeros[(p / codes.block) * n..][..n];
        for (&b, &z) in row.iter().zip(zeros) {
            let v = b.wrapping_add(codes.offset) as i32 - z;
            if !(-128..=127).contains(&v) {
                return None;
            }
            out.push(v as i8);
        }
    }
    (out.len() == k * n).then_some(out)
}

/// How a packed weight (`pack_weight`) stores its values.
pub fn packed_coding(t: &Tensor) -> Option<Coding> {
    let Data::U32(words) = t.data() else { return None };
    (words.len() >= HEADER_WORDS && words[0] == MAGIC).then(|| Coding::from_word(words[1])).flatten()
}

/// Products smaller than this (multiply-adds per batch) run faster as
/// generated code than through the library, whose packing and dispatch
/// cost more than the arithmetic.
pub const GENERATED_MATMUL_MAX_WORK: usize = 32 * 32 * 32;

/// Picks the implementation of a matmul kernel.
pub fn choose_matmul(k: &MatMulKernel, forced: Option<MatMulImpl>) -> MatMulImpl {
    // The generated kernel tiles known rows; symbolic ones go to a library.
    let generate = k.can_generate() && k.m.is_known();
    match forced {
        Some(MatMulImpl::Generated) if generate => MatMulImpl::Generated,
        Some(_) => MatMulImpl::Library,
        None if generate && k.m.estimate() * k.n * k.k <= GENERATED_MATMUL_MAX_WORK => MatMulImpl::Generated,
        None => MatMulImpl::Library,
    }
}

/// Lays out a row-major `[k, n]` matrix as the generated matmul reads it:
/// for each group of 8 columns, its `k` rows of 8 values; then the last
/// `n % 8` columns, row-major.
pub fn pack_generated_panels(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let n8 = n / 8 * 8;
    let mut out = Vec::with_capacity(k * n);
    for j in (0..n8).step_by(8) {
        for p in 0..k {
            out.extend_from_slice(&w[p * n + j..p * n + j + 8]);
        }
    }
    for p in 0..k {
        out.extend_from_slice(&w[p * n + n8..(p + 1) * n]);
    }
    out
}

/// Whether a `Reference` kernel runs as a loop nest on the CPU. Loop nests
/// are generated for known sizes, except the shape ops and the elementwise
/// integer ops (`loop_nest::takes_symbolic_sizes`), which read theirs from
/// slots; any other symbolic op stays with the reference evaluator, which
/// the runtime gives the call's sizes (and an artifact cannot hold).
pub fn has_loop_nest(k: &crate::plan::Kernel) -> bool {
    let KernelKind::Reference { op, inputs, outputs } = &k.kind else { return false };
    let sized = super::loop_nest::takes_symbolic_sizes(op) || (k.is_known() && op.dims().iter().all(|d| d.is_known()));
    sized && super::loop_nest::supports(op, inputs, outputs)
}

/// Chooses every product's implementation (`MatMulImpl::Unchosen` ones)
/// and packs the constant weights the chosen kernels read; reference ops
/// with a loop nest here (`loop_nest::supports`) become `Loop` kernels.
pub fn choose(mut plan: Plan) -> Plan {
    for k in &mut plan.kernels {
        if let (true, KernelKind::Reference { op, inputs, outputs }) = (has_loop_nest(k), &k.kind) {
            k.kind = KernelKind::Loop { op: op.clone(), inputs: inputs.clone(), outputs: outputs.clone() };
        }
    }
    // Kernels that read each buffer, so that a weight nothing else reads is
    // freed as soon as its packed copy replaces it: packing a model's
    // weights then holds one of them twice at a time, not all of them.
    let mut readers = vec![0usize; plan.buffers.len()];
    for k in &plan.kernels {
        for b in k.buffers().0 {
            readers[b] += 1;
        }
    }
    for (b, _) in plan.outputs.iter().chain(&plan.inputs) {
        readers[*b] += 1;
    }
    for i in 0..plan.kernels.len() {
        let KernelKind::MatMul(mm) = &plan.kernels[i].kind else { continue };
        if mm.b_packed || (mm.implementation != MatMulImpl::Unchosen && mm.a_rows.is_none() && mm.c_rows.is_none()) {
            continue;
        }
        let mut mm = mm.clone();
        let row_tables = mm.a_rows.is_some() || mm.c_rows.is_some();
        mm.implementation = if row_tables { MatMulImpl::Packed } else { choose_matmul(&mm, mm.hint) };
        // A constant weight matrix is laid out once, here, for the kernel
        // that reads it, instead of being repacked (the GEMM library) or
        // walked row by row (generated code) on every run. The weight may
        // be a view (a transpose, as Gemm's transB gives) of a constant's
        // storage: it is read through the view's strides.
        let weight = match &plan.buffers[mm.b].storage {
            Storage::Constant(t) if t.dtype() == DType::F32 => Some(t.clone()),
            _ => None,
        };
        // A product over an empty batch has no weight offset to pack from.
        let offset = mm.batches.first().map_or(-1, |o| o[1]);
        let one_weight = mm.batches.iter().all(|o| o[1] == offset);
        let packable = one_weight && offset >= 0 && mm.b_strides.iter().all(|&s| s >= 0);
        let mut packed = None;
        if let Some(w) = weight.as_ref().filter(|_| packable) {
            // Chosen whenever nothing else is forced or preferred: without
            // per-call packing it beats the generated kernel even on small products.
            if row_tables || matches!(mm.hint, None | Some(MatMulImpl::Packed)) {
                let strides = [mm.b_strides[0] as usize, mm.b_strides[1] as usize];
                let words = pack_weight(w, offset as usize, strides, mm.k, mm.n);
                packed = Some(Tensor::from_vec(vec![words.len()], words));
                mm.implementation = MatMulImpl::Packed;
            }
        }
        // The pass that chose the gathered or placed rows checked the weight packs.
        assert!(packed.is_some() || !row_tables, "row tables need the packed GEMM");
        if packed.is_none() && mm.implementation == MatMulImpl::Generated {
            if let Some(w) = &weight {
                let dense = mm.b_strides == [mm.n as isize, 1] && w.numel() == mm.k * mm.n;
                if dense && mm.batches.iter().all(|o| o[1] == 0) {
                    let words = pack_generated_panels(w.as_f32().expect("checked f32"), mm.k, mm.n);
                    packed = Some(Tensor::from_vec(vec![words.len()], words));
                }
            }
        }
        if let Some(t) = packed {
            let unpacked = mm.b;
            plan.buffers.push(Buffer {
                bytes: egret_ir::Dim::new(t.numel() * t.dtype().size_bytes()),
                dtype: t.dtype(),
                storage: Storage::Constant(Arc::new(t)),
            });
            mm.b = plan.buffers.len() - 1;
            mm.b_packed = true;
            // The view's offset is in the packed layout already; every
            // batch reads the one packed weight from its start.
            for batch in &mut mm.batches {
                batch[1] = 0;
            }
            readers[unpacked] -= 1;
            if readers[unpacked] == 0 {
                release(&mut plan.buffers[unpacked]);
            }
        }
        plan.kernels[i].kind = KernelKind::MatMul(mm);
    }
    release_unread_constants(&mut plan);
    plan
}

/// Drops the constants no kernel reads any more (weights whose packed
/// copies replaced them), so a compiled plan does not keep a quantized
/// model's weights in f32 besides its packed codes: each becomes an empty
/// buffer that nothing addresses.
fn release_unread_constants(plan: &mut Plan) {
    let used = plan.used_buffers();
    for (buffer, used) in plan.buffers.iter_mut().zip(used) {
        if !used {
            release(buffer);
        }
    }
}

/// Empties a constant buffer that no kernel reads (its tensor is freed
/// here unless something outside the plan still holds it).
fn release(buffer: &mut Buffer) {
    if let Storage::Constant(t) = &buffer.storage {
        buffer.storage = Storage::Constant(Arc::new(Tensor::zeros(t.dtype(), [0])));
        buffer.bytes = egret_ir::Dim::new(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egret_ir::BlockCodes;

    fn coding(t: &Tensor, offset: usize, strides: [usize; 2], k: usize, n: usize) -> Coding {
        let words = pack_weight(t, offset, strides, k, n);
        packed_coding(&Tensor::from_vec(vec![words.len()], words)).unwrap()
    }

    #[test]
    fn weights_pack_in_the_narrowest_coding_that_holds_them() {
        let (k, n) = (8, 3);
        let claim = |scale: f32| BlockCodes {
            bits: 4,
            block: 4,
            k,
            n,
            codes: (0..k * n).map(|i| (i % 16) as u8).collect(),
            offset: 0,
            scales: vec![scale; 2 * n],
            zeros: vec![8.0; 2 * n],
        };
        let values: Vec<f32> = (0..k * n).map(|i| claim(0.1).value(i / n, i % n)).collect();
        let coded = Tensor::from_vec(vec![k, n], values.clone()).with_codes(claim(0.1));
        assert_eq!(coding(&coded, 0, [n, 1], k, n), Coding::Codes4);
        // Read through a transposed view, or claimed wrongly: not as codes.
        let square = Tensor::from_vec(vec![k, n], values.clone()).with_codes(claim(0.1));
        assert_eq!(coding(&square, 0, [1, n], n, k), Coding::F32);
        let wrong = Tensor::from_vec(vec![k, n], values.clone()).with_codes(claim(0.2));
        assert_eq!(coding(&wrong, 0, [n, 1], k, n), Coding::F32);
        // Halves where every value is one; f16 before bf16.
        let halves: Vec<f32> = (0..k * n).map(|i| i as f32 * 0.25 - 2.0).collect();
        assert_eq!(coding(&Tensor::from_vec(vec![k, n], halves), 0, [n, 1], k, n), Coding::F16);
        // Past f16's range, with bf16's 8 bits of mantissa.
        let bf16: Vec<f32> =
            (0..k * n).map(|i| f32::from_bits((1e10 * (i + 1) as f32).to_bits() & 0xffff_0000)).collect();
        assert_eq!(coding(&Tensor::from_vec(vec![k, n], bf16), 0, [n, 1], k, n), Coding::Bf16);
    }

    #[test]
    fn only_codes_whose_values_are_signed_bytes_pack_as_int8() {
        // Every code 0..=255 (7 is coprime to 256), scale 1: the values are
        // `code - zero`, signed bytes for a zero point of 128 alone.
        let (k, n) = (40, 24);
        let claim = |zero: f32| BlockCodes {
            bits: 8,
            block: 16,
            k,
            n,
            codes: (0..k * n).map(|i| ((i * 7 + 3) % 256) as u8).collect(),
            offset: 0,
            scales: vec![1.0; 3 * n],
            zeros: vec![zero; 3 * n],
        };
        for (zero, want) in
            [(128.0, Coding::Int8), (127.0, Coding::Codes8), (128.5, Coding::Codes8), (1e9, Coding::Codes8)]
        {
            let t = Tensor::from_codes(claim(zero)).unwrap();
            assert_eq!(coding(&t, 0, [n, 1], k, n), want, "zero {zero}");
            if want == Coding::Int8 {
                let by_element = pack_int8_panels(|p, j| claim(zero).value(p, j) as i8, k, n);
                assert_eq!(pack_weight(&t, 0, [n, 1], k, n), by_element, "the panels of the values read one by one");
            }
        }
    }

    /// Whether a tensor's f32 elements were ever computed.
    fn computed(t: &Tensor) -> bool {
        matches!(t.data(), Data::F32(b) if b.is_computed())
    }

    #[test]
    fn weights_made_from_codes_or_halves_pack_from_them_as_their_values_would() {
        let (k, n) = (40, 24);
        let claim = |bits: u32, scale: f32| BlockCodes {
            bits,
            block: 16,
            k,
            n,
            codes: (0..k * n).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect(),
            offset: 0,
            // Scale 1: an integer product's weight, signed bytes shifted up.
            scales: (0..3 * n).map(|i| if scale == 1.0 { 1.0 } else { scale * (1.0 + i as f32 / 8.0) }).collect(),
            zeros: (0..3 * n).map(|i| if scale == 1.0 { 128.0 } else { (i % 5) as f32 }).collect(),
        };
        for (bits, scale, want) in [(4, 0.1, Coding::Codes4), (8, 0.05, Coding::Codes8), (8, 1.0, Coding::Int8)] {
            let derived = Tensor::from_codes(claim(bits, scale)).unwrap();
            let values: Vec<f32> = (0..k * n).map(|i| claim(bits, scale).value(i / n, i % n)).collect();
            let eager = Tensor::from_vec(vec![k, n], values).with_codes(claim(bits, scale));
            let words = pack_weight(&derived, 0, [n, 1], k, n);
            assert!(!computed(&derived), "{bits} bits: packed from the codes alone");
            assert_eq!(words, pack_weight(&eager, 0, [n, 1], k, n), "{bits} bits: the same panels");
            assert_eq!(packed_coding(&Tensor::from_vec(vec![words.len()], words)), Some(want));
            // Its values, when something does read them, are the codes'.
            assert_eq!(derived, eager);
            // The same codes stored as signed bytes (each 128 below its
            // code) and read with an offset: the same panels.
            let signed: Vec<i8> = (0..k * n).map(|i| (claim(bits, scale).code(i) as i16 - 128) as i8).collect();
            let codes = egret_ir::Buf::from(signed).reinterpret::<u8>().unwrap();
            let shifted = Tensor::from_codes(BlockCodes { codes, offset: 128, ..claim(bits, scale) }).unwrap();
            assert_eq!(
                pack_weight(&shifted, 0, [n, 1], k, n),
                pack_weight(&eager, 0, [n, 1], k, n),
                "{bits} bits, offset"
            );
        }
        // Halves, whole or through a transposed view of a slice.
        let f16: Vec<egret_ir::half::f16> =
            (0..k * n).map(|i| egret_ir::half::f16::from_f32(i as f32 * 0.37 - 50.0)).collect();
        let bf16: Vec<egret_ir::half::bf16> =
            (0..k * n).map(|i| egret_ir::half::bf16::from_f32(i as f32 * 1e7 - 3e9)).collect();
        for (half, want) in
            [(Tensor::from_vec(vec![k, n], f16), Coding::F16), (Tensor::from_vec(vec![k, n], bf16), Coding::Bf16)]
        {
            let derived = Tensor::widened(half.clone());
            let eager = half.cast(DType::F32);
            for (offset, strides, kk, nn) in [(0, [n, 1], k, n), (n + 2, [1, n], 20, 30)] {
                let words = pack_weight(&derived, offset, strides, kk, nn);
                assert!(!computed(&derived), "{want:?}: packed from the halves alone");
                assert_eq!(words, pack_weight(&eager, offset, strides, kk, nn), "{want:?} at {offset}, {strides:?}");
                assert_eq!(packed_coding(&Tensor::from_vec(vec![words.len()], words)), Some(want));
            }
            assert_eq!(derived, eager);
        }
    }
}
