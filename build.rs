//! Builds the kernel library as a static archive (`kernels/archive`) for
//! `egret compile` to link into every shared library it writes, so an
//! artifact runs the JIT's kernels and needs nothing of Rust's at the
//! caller's side. The archive is carried inside the `egret` binary
//! (`include_bytes!` in `src/aot.rs`).
//!
//! It is always an optimised build, whatever profile builds `egret`: the
//! kernels are the artifact's hot loops. It uses the release profile's
//! code generation settings, the ones the JIT's kernels are built with (so
//! an artifact and `egret bench` time the same machine code), and only
//! adds `panic = "abort"` (a panic must not unwind into C). The linker's
//! `--gc-sections` drops what the kernels do not use.
//!
//! Only a build with the `aot` feature builds it: the CPU path alone does
//! not wait for it.
//!
//! It builds with a nested cargo in a target folder of its own (beside the
//! outer one, so every profile of `egret` shares one archive), locked to
//! the workspace's lock file, and offline first: the outer build has
//! usually fetched every crate it needs already.

use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHIVE: &str = "libegret_kernels_archive.a";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for path in ["kernels/src", "kernels/Cargo.toml", "kernels/archive", "Cargo.lock", "build.rs"] {
        println!("cargo:rerun-if-changed={}", manifest.join(path).display());
    }
    // Only builds that make libraries (the `aot` feature) need the archive.
    if std::env::var_os("CARGO_FEATURE_AOT").is_none() {
        return;
    }
    let target_dir = archive_target_dir(&out);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&manifest)
        .args(["build", "--release", "--offline", "--locked", "-p", "egret-kernels-archive", "--target-dir"])
        .arg(&target_dir)
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false");
    // The outer build's flags are for the compiler, not for the archive: a
    // `-C target-cpu=native` there would make artifacts that fault on older
    // CPUs. The archive is built for the baseline ISA and dispatches at
    // load time (`egret_kernels::Isa`).
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS",
        "CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS",
        "CARGO_PROFILE_RELEASE_LTO",
        "CARGO_PROFILE_RELEASE_CODEGEN_UNITS",
        "CARGO_PROFILE_RELEASE_OPT_LEVEL",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let mut status = cmd.status().unwrap_or_else(|e| panic!("cannot run cargo to build the kernel archive: {e}"));
    if !status.success() {
        // A build with a lock file of its own (the Python package's) may
        // not have fetched the crates the workspace's lock file names.
        println!("cargo:warning=building the kernel archive offline failed; retrying with the network");
        let args: Vec<_> = cmd.get_args().filter(|a| *a != "--offline").map(|a| a.to_os_string()).collect();
        let mut online = Command::new(cmd.get_program());
        online.current_dir(&manifest).args(args);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => online.env(k, v),
                None => online.env_remove(k),
            };
        }
        status = online.status().unwrap_or_else(|e| panic!("cannot run cargo to build the kernel archive: {e}"));
    }
    assert!(status.success(), "building the kernel archive (`cargo build --release -p egret-kernels-archive`) failed");
    let built = target_dir.join("release").join(ARCHIVE);
    std::fs::copy(&built, out.join(ARCHIVE))
        .unwrap_or_else(|e| panic!("cannot copy the kernel archive `{}`: {e}", built.display()));
}

/// `TARGET/egret-kernels-archive` beside the outer build's profile folders
/// (`OUT_DIR` is `TARGET/[TRIPLE/]PROFILE/build/egret-HASH/out`), or a
/// folder inside `OUT_DIR` where that layout is not recognised.
fn archive_target_dir(out: &Path) -> PathBuf {
    let build = out.ancestors().nth(2);
    match (build.and_then(|b| b.file_name()), out.ancestors().nth(4)) {
        (Some(name), Some(target)) if name == "build" => target.join("egret-kernels-archive"),
        _ => out.join("egret-kernels-archive"),
    }
}
