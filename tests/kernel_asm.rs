//! The packed GEMM's tiles keep their accumulators in registers on both
//! kernel paths, whatever LLVM's inlining does: a row gather inside the
//! tile's function once made it store every accumulator to the stack after
//! each multiply-add (3x slower), and nothing but the speed showed it.
//!
//! Reads the compiled kernels (`objdump`) in the kernel archive that
//! `egret compile --emit obj` writes beside a library's object: the
//! kernels built in release, as every product runs them (the test binaries'
//! own copies carry debug assertions, whose checks change the code). In each
//! path's `panel_range`, f32 and integer (`int8`), the loop of the path's
//! full tile (six rows, or AVX2's integer tile's five, one broadcast of `a`
//! each, and as many multiplies as it has accumulators: AVX2's 10 or 12 of
//! its 16 registers, AVX-512's 24 of 32) must neither store nor load a
//! vector register on the stack. (Each
//! path's code also holds the other tile shapes, which it never runs.)

use std::process::Command;

mod common;

/// One instruction: its address and its text (`vfmadd231ps %ymm13,%ymm14,%ymm0`).
type Instruction = (u64, String);

/// The instructions of the function named `name` (demangled) in `asm`.
fn function(asm: &str, name: &str) -> Vec<Instruction> {
    let header = format!("<{name}>:");
    let Some(start) = asm.lines().position(|l| l.ends_with(&header)) else { return vec![] };
    asm.lines()
        .skip(start + 1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let (addr, text) = l.trim().split_once(':')?;
            Some((u64::from_str_radix(addr.trim(), 16).ok()?, text.trim().to_string()))
        })
        .collect()
}

/// The loops of `body`: from the target of each backward jump to the jump.
fn loops(body: &[Instruction]) -> Vec<&[Instruction]> {
    let mut out = Vec::new();
    for (i, (addr, text)) in body.iter().enumerate() {
        let mut parts = text.split_whitespace();
        let (Some(op), Some(target)) = (parts.next(), parts.next()) else { continue };
        let Ok(target) = u64::from_str_radix(target, 16) else { continue };
        if op.starts_with('j') && target <= *addr {
            if let Some(start) = body.iter().position(|(a, _)| *a == target) {
                out.push(&body[start..=i]);
            }
        }
    }
    out
}

#[test]
fn the_gemm_tiles_keep_their_accumulators_in_registers() {
    let dir = std::env::temp_dir().join(format!("egret-kernel-asm-{}", std::process::id()));
    let model = common::zoo_dir().join("bert_tiny").join("model.onnx");
    let compiled = Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["compile", model.to_str().unwrap(), "--emit", "obj", "-o", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
    let archive = dir.join("libegret_kernels_archive.a");
    let exe = archive.to_str().unwrap();
    let Ok(out) = Command::new("objdump").args(["-d", "-C", "--no-show-raw-insn", exe]).output() else {
        eprintln!("skipping: needs objdump (binutils)");
        return;
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "objdump failed: {}", String::from_utf8_lossy(&out.stderr));
    let asm = String::from_utf8_lossy(&out.stdout);
    // Each path's f32 tile (a fused multiply-add per accumulator) and
    // integer tile (AVX2's `vpmaddubsw`, whose pairs `vpmaddwd` then adds,
    // five rows; VNNI's `vpdpbusd`), with one broadcast of `a` per row.
    for (name, register, multiply, accumulators, broadcast, rows) in [
        ("egret_kernels::gemm::panel_range::avx2", "%ymm", "vfmadd231ps", 12, "vbroadcastss", 6),
        ("egret_kernels::gemm::panel_range::avx512", "%zmm", "vfmadd231ps", 24, "vbroadcastss", 6),
        ("egret_kernels::int8::avx2::panel_range", "%ymm", "vpmaddubsw", 10, "vpbroadcastd", 5),
        ("egret_kernels::int8::avx512::panel_range", "%zmm", "vpdpbusd", 24, "vpbroadcastd", 6),
    ] {
        let body = function(&asm, name);
        assert!(!body.is_empty(), "no `{name}` in {exe}");
        let count =
            |l: &[Instruction], op: &str| l.iter().filter(|(_, t)| t.starts_with(op) && t.contains(register)).count();
        let tiles: Vec<&[Instruction]> = loops(&body)
            .into_iter()
            .filter(|l| count(l, multiply) == accumulators && count(l, broadcast) == rows)
            .collect();
        assert!(
            !tiles.is_empty(),
            "`{name}` has no loop of {rows} broadcasts and {accumulators} {multiply} on {register} registers"
        );
        for tile in tiles {
            let on_stack: Vec<&String> = tile
                .iter()
                .map(|(_, t)| t)
                // (%rbp is a general register here: the kernels have no frame pointer.)
                .filter(|t| t.contains(register) && t.contains("(%rsp"))
                .collect();
            assert!(
                on_stack.is_empty(),
                "`{name}`: the tile loop at {:#x} moves vector registers through the stack:\n{}",
                tile[0].0,
                on_stack.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
            );
        }
    }
}
