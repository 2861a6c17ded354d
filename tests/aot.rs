//! Ahead-of-time compilation end to end: `egret compile` each zoo model to a
//! shared library, link a C program against it with `cc`, run it on the
//! stored inputs, and compare its outputs with onnxruntime's.

mod common;

use egret::check::{compare, Tolerance};
use egret::ir::Tensor;
use std::path::Path;
use std::process::Command;

fn have_cc() -> bool {
    Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into()
}

fn check_model(case: &Path, work: &Path) {
    let name = egret::aot::c_name(case.file_name().unwrap().to_str().unwrap());
    let dir = work.join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new(env!("CARGO_BIN_EXE_egret")).args([
        "compile",
        case.join("model.onnx").to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--name",
        &name,
    ]));
    assert!(dir.join(format!("lib{name}.so")).is_file() && dir.join(format!("{name}.h")).is_file());

    // Inputs in the library's positional order (the graph's), as raw bytes.
    let set = case.join("test_data_set_0");
    let model = egret::compile(&case.join("model.onnx"), &Default::default()).unwrap();
    let mut stored = Vec::new();
    for k in 0.. {
        let p = set.join(format!("input_{k}.pb"));
        if !p.exists() {
            break;
        }
        stored.push(egret::io::read_pb(&p).unwrap());
    }
    let mut files = Vec::new();
    for (i, (input, _)) in model.program.signature.inputs.iter().enumerate() {
        let (_, t) = stored.iter().find(|(n, _)| n == input).unwrap_or_else(|| panic!("no stored value for `{input}`"));
        let p = dir.join(format!("in_{i}.bin"));
        std::fs::write(&p, t.to_bytes()).unwrap();
        files.push(p);
    }

    let driver = dir.join("driver");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    run(Command::new(cc)
        .arg("-O1")
        .arg(format!("-DMODEL={name}"))
        .arg(format!("-DMODEL_HEADER=\"{name}.h\""))
        .arg("-I")
        .arg(&dir)
        .arg(common::repo_root().join("tests/aot/driver.c"))
        .arg("-L")
        .arg(&dir)
        .arg(format!("-l{name}"))
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-o")
        .arg(&driver));
    run(Command::new(&driver).args(&files).arg(&dir));

    for (j, (out_name, ty)) in model.program.signature.outputs.iter().enumerate() {
        let got = Tensor::from_bytes(ty, &std::fs::read(dir.join(format!("output_{j}.bin"))).unwrap()).unwrap();
        let (_, want) = egret::io::read_pb(&set.join(format!("output_{j}.pb"))).unwrap();
        let r = compare(out_name, &got, &want, Tolerance::default());
        assert!(r.failure.is_none(), "{}: {out_name}: {:?}", case.display(), r.failure);
    }
}

#[test]
fn zoo_and_synthetic_models_compiled_ahead_of_time_match_onnxruntime_from_c() {
    if !have_cc() {
        eprintln!("skipping: no C compiler (`cc`, or set CC) to link the test program");
        return;
    }
    let work = std::env::temp_dir().join(format!("egret-aot-{}", std::process::id()));
    let mut cases = egret::check::discover(&common::zoo_dir()).unwrap();
    cases.extend(egret::check::discover(&common::synthetic_dir()).unwrap());
    for case in cases {
        check_model(&case, &work);
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn perf_models_compiled_ahead_of_time_match_onnxruntime_from_c() {
    let Some(perf) = common::shared_dir("perf", Some("EGRET_PERF_MODELS")) else { return };
    if !have_cc() {
        eprintln!("skipping: no C compiler (`cc`, or set CC) to link the test program");
        return;
    }
    let work = std::env::temp_dir().join(format!("egret-aot-perf-{}", std::process::id()));
    for case in egret::check::discover(&perf).unwrap() {
        check_model(&case, &work);
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn emit_obj_and_clif() {
    let dir = std::env::temp_dir().join(format!("egret-aot-emit-{}", std::process::id()));
    let model = common::zoo_dir().join("vit_tiny/model.onnx");
    let out = run(Command::new(env!("CARGO_BIN_EXE_egret")).args([
        "compile",
        model.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--emit",
        "obj",
    ]));
    assert!(out.contains("vit_tiny.o") && out.contains("vit_tiny_api.c") && out.contains("vit_tiny.h"), "{out}");
    let obj = std::fs::read(dir.join("vit_tiny.o")).unwrap();
    assert_eq!(&obj[..4], b"\x7fELF", "an ELF object");
    // What `--emit obj` writes links with the command it prints.
    if have_cc() {
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        run(Command::new(cc).current_dir(&dir).args(egret::aot::link_command("vit_tiny", "libvit_tiny.so")));
        assert!(dir.join("libvit_tiny.so").is_file());
    }
    run(Command::new(env!("CARGO_BIN_EXE_egret")).args([
        "compile",
        model.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--emit",
        "clif",
    ]));
    let clif = std::fs::read_to_string(dir.join("vit_tiny.clif")).unwrap();
    // Kernels, then the driver launching each through the scheduler.
    assert!(clif.matches("\nfunction").count() >= 2 && clif.contains("func_addr"), "CLIF text of kernels and driver");
    let _ = std::fs::remove_dir_all(&dir);
}
