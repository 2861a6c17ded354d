//! Ahead-of-time compilation end to end: `egret compile` each zoo model to a
//! shared library, link a C program against it with `cc`, run it on the
//! stored inputs, and compare its outputs with onnxruntime's.

mod common;

use egret::check::{compare, Tolerance};
use egret::ir::Tensor;
use std::path::{Path, PathBuf};
use std::process::Command;

fn have_cc() -> bool {
    Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether a test must skip for want of a C compiler (it says so).
fn no_cc() -> bool {
    let missing = !have_cc();
    if missing {
        eprintln!("skipping: no C compiler (`cc`, or set CC) to link the test program");
    }
    missing
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

/// A library `egret compile` made, with its stored inputs as raw files.
struct Artifact {
    name: String,
    dir: PathBuf,
    /// `in_i.bin`, in the library's positional order (the graph's).
    inputs: Vec<PathBuf>,
    model: egret::Model,
}

fn compile_artifact(case: &Path, work: &Path, extra: &[&str]) -> Artifact {
    let name = egret::aot::c_name(case.file_name().unwrap().to_str().unwrap());
    let dir = work.join(format!("{name}{}", extra.join("")));
    let _ = std::fs::remove_dir_all(&dir);
    // A model with symbolic dims is compiled for its first data set's sizes.
    let dims: Vec<String> =
        common::data_set_dims(case, 0).iter().flat_map(|(n, v)| ["--dim".to_string(), format!("{n}={v}")]).collect();
    run(Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["compile", case.join("model.onnx").to_str().unwrap(), "-o", dir.to_str().unwrap(), "--name", &name])
        .args(&dims)
        .args(extra));
    assert!(dir.join(format!("lib{name}.so")).is_file() && dir.join(format!("{name}.h")).is_file());

    let set = case.join("test_data_set_0");
    let model = egret::compile(&case.join("model.onnx"), &common::options_for(case, Default::default())).unwrap();
    let mut stored = Vec::new();
    for k in 0.. {
        let p = set.join(format!("input_{k}.pb"));
        if !p.exists() {
            break;
        }
        stored.push(egret::io::read_pb(&p).unwrap());
    }
    let mut inputs = Vec::new();
    for (i, (input, _)) in model.program.signature.inputs.iter().enumerate() {
        let (_, t) = stored.iter().find(|(n, _)| n == input).unwrap_or_else(|| panic!("no stored value for `{input}`"));
        let p = dir.join(format!("in_{i}.bin"));
        std::fs::write(&p, t.to_bytes()).unwrap();
        inputs.push(p);
    }
    Artifact { name, dir, inputs, model }
}

/// Builds the C program `source` (in tests/aot) against the artifact.
fn link_program(a: &Artifact, source: &str, extra: &[&str]) -> PathBuf {
    let exe = a.dir.join(source.trim_end_matches(".c"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    run(Command::new(cc)
        .arg("-O1")
        .arg(format!("-DMODEL={}", a.name))
        .arg(format!("-DMODEL_UP={}", a.name.to_uppercase()))
        .arg(format!("-DMODEL_HEADER=\"{}.h\"", a.name))
        .arg("-I")
        .arg(&a.dir)
        .arg(common::repo_root().join("tests/aot").join(source))
        .arg("-L")
        .arg(&a.dir)
        .arg(format!("-l{}", a.name))
        .arg(format!("-Wl,-rpath,{}", a.dir.display()))
        .args(extra)
        .arg("-o")
        .arg(&exe));
    exe
}

/// `program` run through `wrapper` (valgrind), if one is given.
fn wrapped(program: &Path, wrapper: &[&str]) -> Command {
    match wrapper.split_first() {
        Some((w, rest)) => {
            let mut c = Command::new(w);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Runs tests/aot/driver.c on the artifact (through `wrapper`, if given)
/// and compares what it wrote with onnxruntime's stored outputs.
fn run_driver(case: &Path, a: &Artifact, wrapper: &[&str]) {
    let driver = link_program(a, "driver.c", &[]);
    run(wrapped(&driver, wrapper).args(&a.inputs).arg(&a.dir));
    let set = case.join("test_data_set_0");
    for (j, (out_name, ty)) in a.model.program.signature.outputs.iter().enumerate() {
        let got = Tensor::from_bytes(ty, &std::fs::read(a.dir.join(format!("output_{j}.bin"))).unwrap()).unwrap();
        let (_, want) = egret::io::read_pb(&set.join(format!("output_{j}.pb"))).unwrap();
        let r = compare(out_name, &got, &want, Tolerance::default());
        assert!(r.failure.is_none(), "{}: {out_name}: {:?}", case.display(), r.failure);
    }
}

fn check_model(case: &Path, work: &Path) {
    let a = compile_artifact(case, work, &[]);
    run_driver(case, &a, &[]);
}

fn work_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("egret-aot-{what}-{}", std::process::id()))
}

#[test]
fn zoo_synthetic_and_export_models_compiled_ahead_of_time_match_onnxruntime_from_c() {
    if no_cc() {
        return;
    }
    let work = work_dir("zoo");
    let mut cases = egret::check::discover(&common::zoo_dir()).unwrap();
    cases.extend(egret::check::discover(&common::synthetic_dir()).unwrap());
    cases.extend(egret::check::discover(&common::repo_root().join("tests/data/exports")).unwrap());
    for case in cases {
        check_model(&case, &work);
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// `case` compiled into one library that keeps its symbolic dims (`extra`:
/// more `egret compile` flags, bounds among them), with every data set's
/// inputs as raw files and `sets.txt` listing them for tests/aot/shaped.c.
fn compile_symbolic(case: &Path, work: &Path, extra: &[&str]) -> Artifact {
    let name = egret::aot::c_name(case.file_name().unwrap().to_str().unwrap());
    let dir = work.join(format!("{name}{}", extra.join("").replace(['.', '='], "_")));
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["compile", case.join("model.onnx").to_str().unwrap(), "-o", dir.to_str().unwrap(), "--name", &name])
        .args(extra));
    let model = egret::compile(&case.join("model.onnx"), &Default::default()).unwrap();
    let mut sets = String::new();
    let mut inputs = Vec::new();
    for set in 0.. {
        let folder = case.join(format!("test_data_set_{set}"));
        if !folder.is_dir() {
            break;
        }
        let stored = egret::check::numbered(&folder, "input").unwrap();
        sets.push_str("set\n");
        for (i, (input, _)) in model.program.signature.inputs.iter().enumerate() {
            let (_, t) = stored.iter().find(|(n, _)| n == input).unwrap_or_else(|| panic!("no stored `{input}`"));
            let p = dir.join(format!("set_{set}_in_{i}.bin"));
            std::fs::write(&p, t.to_bytes()).unwrap();
            let dims: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
            sets.push_str(&format!("{} {} {}\n", p.display(), t.shape().len(), dims.join(" ")));
            inputs.push(p);
        }
    }
    std::fs::write(dir.join("sets.txt"), sets).unwrap();
    Artifact { name, dir, inputs, model }
}

/// Runs tests/aot/shaped.c on every data set the artifact lists, compares
/// each output it wrote with onnxruntime's, and returns the sets the
/// library refused, with its messages.
fn run_shaped(case: &Path, a: &Artifact) -> Vec<(usize, String)> {
    run_shaped_with(case, a, &[])
}

/// `run_shaped` through `wrapper` (valgrind), if given.
fn run_shaped_with(case: &Path, a: &Artifact, wrapper: &[&str]) -> Vec<(usize, String)> {
    let stored = |set: usize, j: usize| {
        let (name, _) = &a.model.program.signature.outputs[j];
        let (_, t) = egret::io::read_pb(&case.join(format!("test_data_set_{set}/output_{j}.pb"))).unwrap();
        (name.clone(), t)
    };
    run_shaped_against(a, wrapper, &format!("{}", case.display()), &stored).0
}

/// Runs tests/aot/shaped.c on the sets the artifact lists and compares each
/// output it wrote, dims and values, with `want(set, output)`'s (name,
/// tensor). Returns the sets the library refused, with its messages, and
/// how many outputs were compared.
fn run_shaped_against(
    a: &Artifact,
    wrapper: &[&str],
    what: &str,
    want: &dyn Fn(usize, usize) -> (String, Tensor),
) -> (Vec<(usize, String)>, usize) {
    let program = link_program(a, "shaped.c", &[]);
    let out = run(wrapped(&program, wrapper).arg(a.dir.join("sets.txt")).arg(&a.dir));
    let (mut refused, mut checked) = (Vec::new(), 0);
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let set: usize = words[1].parse().unwrap();
        if words[2] == "refused:" {
            refused.push((set, words[3..].join(" ")));
            continue;
        }
        assert_eq!(words[2], "output", "{line}");
        let j: usize = words[3].parse().unwrap();
        let dims: Vec<usize> = words[4..].iter().map(|d| d.parse().unwrap()).collect();
        let (name, w) = want(set, j);
        assert_eq!(w.shape(), &dims[..], "{what} set {set}: {name}");
        let ty = egret::ir::Type::new(w.dtype(), dims);
        let bytes = std::fs::read(a.dir.join(format!("set_{set}_output_{j}.bin"))).unwrap();
        let got = Tensor::from_bytes(&ty, &bytes).unwrap();
        let r = compare(&name, &got, &w, Tolerance::default());
        assert!(r.failure.is_none(), "{what} set {set}: {name}: {:?}", r.failure);
        checked += 1;
    }
    (refused, checked)
}

/// One library per model with symbolic dims serves every data set's
/// shapes (BERT's batch and sequence; GPT-2's past length 0, then 5 with
/// one new token), matching onnxruntime from C.
#[test]
fn one_library_keeps_the_symbolic_dims_and_serves_every_shape() {
    if no_cc() {
        return;
    }
    let work = work_dir("symbolic");
    for model in ["bert_dynamic", "gpt2_kv"] {
        let case = common::synthetic_dir().join(model);
        let a = compile_symbolic(&case, &work, &[]);
        let header = std::fs::read_to_string(a.dir.join(format!("{}.h", a.name))).unwrap();
        assert!(header.contains("Symbolic dims: batch (any size)"), "{header}");
        if model == "gpt2_kv" {
            // A past longer than the model's 128 positions: its position
            // table is too short, and the library must say so before it
            // reads any input (so these files need not exist).
            let mut sets = std::fs::read_to_string(a.dir.join("sets.txt")).unwrap();
            sets.push_str("set\nnone 2 1 1\nnone 2 1 201\n");
            sets.push_str(&"none 4 1 2 200 16\n".repeat(4));
            std::fs::write(a.dir.join("sets.txt"), sets).unwrap();
        }
        let refused = run_shaped(&case, &a);
        match model {
            "gpt2_kv" => {
                assert_eq!(refused.len(), 1, "{refused:?}");
                let (set, message) = &refused[0];
                assert_eq!(*set, 2);
                assert!(message.contains("would reach outside a constant at these sizes"), "{message}");
            }
            _ => assert!(refused.is_empty(), "{model}: {refused:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Bounds declared at compile time are in the header, plan the arena, and
/// refuse a value past them with a message naming the dim.
#[test]
fn a_library_refuses_dims_outside_its_bounds() {
    if no_cc() {
        return;
    }
    let work = work_dir("bounds");
    let case = common::synthetic_dir().join("gpt2_kv");
    let a = compile_symbolic(&case, &work, &["--dim", "past_sequence=0..4", "--dim", "batch=1..2"]);
    let header = std::fs::read_to_string(a.dir.join(format!("{}.h", a.name))).unwrap();
    assert!(header.contains("batch (1..2), past_sequence (0..4), sequence (any size)"), "{header}");
    // Set 0 has no past; set 1 a past of 5.
    let refused = run_shaped(&case, &a);
    assert_eq!(refused.len(), 1, "{refused:?}");
    let (set, message) = &refused[0];
    assert_eq!(*set, 1);
    assert!(message.contains("`past_sequence` = 5 is outside the bounds") && message.contains("0..4"), "{message}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn perf_models_compiled_ahead_of_time_match_onnxruntime_from_c() {
    let Some(perf) = common::shared_dir("perf", Some("EGRET_PERF_MODELS")) else { return };
    if no_cc() {
        return;
    }
    let work = work_dir("perf");
    for case in egret::check::discover(&perf).unwrap() {
        check_model(&case, &work);
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn emit_obj_and_clif() {
    let dir = work_dir("emit");
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

#[test]
fn four_threads_with_a_context_each_match_the_single_threaded_results() {
    if no_cc() {
        return;
    }
    let work = work_dir("concurrent");
    // A text model (integer inputs) and an image model (a float input).
    for model in ["bert_tiny", "vit_tiny"] {
        let case = common::zoo_dir().join(model);
        let a = compile_artifact(&case, &work, &[]);
        let exe = link_program(&a, "concurrent.c", &["-lpthread"]);
        let out = run(Command::new(&exe).args(&a.inputs));
        assert!(out.contains("every result equal"), "{model}: {out}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn an_artifact_for_x86_64_v2_runs_and_matches() {
    if !have_cc() || !cfg!(target_arch = "x86_64") {
        eprintln!("skipping: needs an x86-64 host with a C compiler");
        return;
    }
    let work = work_dir("v2");
    for model in ["deit_tiny_distilled", "gpt2_tiny"] {
        let case = common::zoo_dir().join(model);
        let a = compile_artifact(&case, &work, &["--target-cpu", "x86-64-v2"]);
        let header = std::fs::read_to_string(a.dir.join(format!("{}.h", a.name))).unwrap();
        assert!(header.contains("Compiled for: x86-64-v2 (") && !header.contains("avx"), "{header}");
        run_driver(&case, &a, &[]);
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// An artifact for x86-64-v4 runs where the host has AVX-512, and where it
/// has not, refuses with ERROR_UNSUPPORTED_CPU rather than faulting.
#[test]
fn an_artifact_for_a_cpu_level_the_host_lacks_is_refused_with_a_status() {
    #[cfg(target_arch = "x86_64")]
    {
        if no_cc() {
            return;
        }
        let host_v4 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        let work = work_dir("v4");
        let case = common::zoo_dir().join("bert_tiny");
        let a = compile_artifact(&case, &work, &["--target-cpu", "x86-64-v4"]);
        let driver = link_program(&a, "driver.c", &[]);
        let out = Command::new(&driver).args(&a.inputs).arg(&a.dir).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if host_v4 {
            assert!(out.status.success(), "{stderr}");
        } else {
            assert!(!out.status.success() && stderr.contains("lacks an instruction set extension"), "{stderr}");
        }
        let _ = std::fs::remove_dir_all(&work);
    }
}

/// Weights in a file beside the library (`--weights beside`, what models
/// over 1 GiB get): the same answers; a file that is missing, cut short,
/// changed or another model's is refused at create with a status naming
/// it, never read past its end.
#[test]
fn weights_beside_the_library_run_and_a_damaged_file_is_refused() {
    if no_cc() {
        return;
    }
    let work = work_dir("beside");
    let case = common::zoo_dir().join("bert_tiny");
    let a = compile_artifact(&case, &work, &["--weights", "beside"]);
    let weights = a.dir.join(format!("{}.weights", a.name));
    let size = std::fs::metadata(&weights).unwrap().len();
    let header = std::fs::read_to_string(a.dir.join(format!("{}.h", a.name))).unwrap();
    assert!(size > 64 && header.contains(&format!("Weights: in {}.weights", a.name)), "{header}");
    run_driver(&case, &a, &[]);
    let driver = a.dir.join("driver");
    let refused = |expect: &str, env: Option<&Path>| {
        let mut cmd = Command::new(&driver);
        cmd.args(&a.inputs).arg(&a.dir);
        if let Some(p) = env {
            cmd.env(format!("{}_WEIGHTS", a.name.to_uppercase()), p);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("create: the weights file") && stderr.contains(expect),
            "{stderr}"
        );
    };
    let good = std::fs::read(&weights).unwrap();
    // Cut short.
    std::fs::write(&weights, &good[..good.len() - 64]).unwrap();
    refused(&format!("has {} bytes; this library's weights are {size}", size - 64), None);
    // One bit changed.
    let mut changed = good.clone();
    let middle = changed.len() / 2;
    changed[middle] ^= 4;
    std::fs::write(&weights, &changed).unwrap();
    refused("has changed since it was written", None);
    // Missing; then given elsewhere through the environment.
    let elsewhere = work.join("moved.weights");
    std::fs::write(&elsewhere, &good).unwrap();
    std::fs::remove_file(&weights).unwrap();
    refused("No such file", None);
    run(Command::new(&driver)
        .args(&a.inputs)
        .arg(&a.dir)
        .env(format!("{}_WEIGHTS", a.name.to_uppercase()), &elsewhere));
    // Another model's file of the same size.
    let mut other = good.clone();
    other[24] ^= 1;
    std::fs::write(&elsewhere, &other).unwrap();
    refused("is not the weights this library was compiled with", Some(&elsewhere));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn an_artifact_exports_only_its_api_and_needs_only_libc_and_libm() {
    if !have_cc() || Command::new("nm").arg("--version").output().is_err() {
        eprintln!("skipping: needs a C compiler and binutils (nm, readelf)");
        return;
    }
    let work = work_dir("symbols");
    let a = compile_artifact(&common::zoo_dir().join("gpt2_tiny"), &work, &[]);
    let so = a.dir.join(format!("lib{}.so", a.name));
    let symbols = run(Command::new("nm").args(["-D", "--defined-only", "--format=posix"]).arg(&so));
    let names: Vec<&str> = symbols.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.contains(&"gpt2_tiny_context_run") && names.contains(&"gpt2_tiny_abi_version"), "{symbols}");
    let foreign: Vec<&&str> = names.iter().filter(|n| !n.starts_with("gpt2_tiny_")).collect();
    assert!(foreign.is_empty(), "symbols besides the API are exported: {foreign:?}");
    assert!(!names.contains(&"gpt2_tiny_run_plan"), "the driver is internal");
    let dynamic = run(Command::new("readelf").arg("-d").arg(&so));
    for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        assert!(
            ["libc.so", "libm.so", "ld-linux", "libpthread.so", "libdl.so"].iter().any(|ok| line.contains(ok)),
            "the artifact needs more than libc, libm and pthreads: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Valgrind (memcheck) runs the C driver on one small model clean. Built
/// for x86-64-v3: valgrind 3.19 decodes no AVX-512, and under it the
/// kernel library's CPU detection picks the AVX2 kernels.
#[test]
fn valgrind_runs_the_c_driver_clean() {
    let have_valgrind = Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_cc() || !have_valgrind {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI installs valgrind (.ci/run)");
        eprintln!("skipping: needs a C compiler and valgrind");
        return;
    }
    let work = work_dir("valgrind");
    let case = common::zoo_dir().join("bert_tiny");
    let a = compile_artifact(&case, &work, &["--target-cpu", "x86-64-v3"]);
    let valgrind = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite", "-q"];
    run_driver(&case, &a, &valgrind);
    // A library with symbolic dims, over two shapes: the arena laid out at
    // the first and grown for the second, the size code's tables with them.
    let case = common::synthetic_dir().join("gpt2_kv");
    let a = compile_symbolic(&case, &work, &["--target-cpu", "x86-64-v3"]);
    assert!(run_shaped_with(&case, &a, &valgrind).is_empty());
    let _ = std::fs::remove_dir_all(&work);
}

/// On an emulated CPU without AVX (qemu's Nehalem): an artifact built for
/// x86-64-v3 refuses to make a model, naming what is missing, and one built
/// for x86-64-v2 runs and matches (its kernel library on the baseline code).
#[test]
fn on_a_cpu_without_avx_a_v3_artifact_is_refused_and_a_v2_artifact_runs() {
    let have_qemu = Command::new("qemu-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_cc() || !have_qemu || !cfg!(target_arch = "x86_64") {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI installs qemu-user (.ci/run)");
        eprintln!("skipping: needs an x86-64 host with a C compiler and qemu-user (qemu-x86_64)");
        return;
    }
    let work = work_dir("qemu");
    let case = common::zoo_dir().join("bert_tiny");
    let nehalem = ["qemu-x86_64", "-cpu", "Nehalem"];
    let v3 = compile_artifact(&case, &work, &["--target-cpu", "x86-64-v3"]);
    let driver = link_program(&v3, "driver.c", &[]);
    let out = Command::new(nehalem[0]).args(&nehalem[1..]).arg(&driver).args(&v3.inputs).arg(&v3.dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("create: this CPU lacks an instruction set extension"),
        "{stderr}"
    );
    let v2 = compile_artifact(&case, &work, &["--target-cpu", "x86-64-v2"]);
    run_driver(&case, &v2, &nehalem);
    let _ = std::fs::remove_dir_all(&work);
}

/// A library of a model whose op runs per call on the reference evaluator
/// at symbolic sizes (a cumulative sum over a symbolic axis) is refused
/// naming the op, its node and the `--dim`s to give.
#[test]
fn a_library_refuses_per_call_ops_naming_them_and_the_dims() {
    use common::onnx::{model, node, value_info_dims};
    use onnx_protobuf::tensor_shape_proto::dimension::Value::DimParam;
    use onnx_protobuf::{GraphProto, TensorProto};
    use protobuf::Message;
    let mut g = GraphProto::new();
    g.input.push(value_info_dims("x", 7, &[DimParam("n".into())]));
    g.output.push(value_info_dims("y", 7, &[DimParam("n".into())]));
    let mut axis = TensorProto::new();
    axis.name = "axis".into();
    axis.data_type = 7;
    axis.int64_data = vec![0];
    g.initializer.push(axis);
    g.node.push(node("CumSum", &["x", "axis"], &["y"]));
    let work = work_dir("per-call");
    std::fs::create_dir_all(&work).unwrap();
    let path = work.join("model.onnx");
    std::fs::write(&path, model(g).write_to_bytes().unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["compile", path.to_str().unwrap(), "-o", work.join("lib").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`cumsum` at CumSum_0") && err.contains("--dim n=N"), "{err}");
    let _ = std::fs::remove_dir_all(&work);
}

/// A fuzzing regression model (`fuzz/regressions/NAME.onnx`) compiled as a
/// library with symbolic dims, run on `inputs` (matched against the JIT)
/// and on one more set of dims, `dims` (a line per input, `none RANK
/// DIMS...`), which it must refuse: the library's message for it.
fn refusal(work: &str, name: &str, inputs: &[(&str, Tensor)], dims: &str) -> String {
    let work = work_dir(work);
    // (Not straight under `work`: the library goes to `work/<name>`.)
    let case = work.join("models").join("case");
    std::fs::create_dir_all(case.join("test_data_set_0")).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/regressions/{name}.onnx"));
    std::fs::copy(&model, case.join("model.onnx")).unwrap();
    for (i, (name, t)) in inputs.iter().enumerate() {
        egret::io::write_pb(&case.join(format!("test_data_set_0/input_{i}.pb")), name, t).unwrap();
    }
    let jit = egret::compile(&case.join("model.onnx"), &Default::default()).unwrap();
    let want = jit.run(inputs.iter().map(|(n, t)| (n.to_string(), t.clone())).collect()).unwrap();
    let a = compile_symbolic(&case, &work, &[]);
    let mut sets = std::fs::read_to_string(a.dir.join("sets.txt")).unwrap();
    sets.push_str(&format!("set\n{dims}"));
    std::fs::write(a.dir.join("sets.txt"), sets).unwrap();
    let (refused, checked) = run_shaped_against(&a, &[], name, &|_, j| want[j].clone());
    assert_eq!(checked, want.len());
    assert_eq!(refused.len(), 1, "{refused:?}");
    let (set, message) = refused.into_iter().next().unwrap();
    assert_eq!(set, 1);
    let _ = std::fs::remove_dir_all(&work);
    message
}

/// A library refuses values that make one of the model's sizes negative,
/// naming the node, as the JIT does (`Plan::sizes`): a slice from
/// `s0 - 3` to 0 is typed `-s0 + 3` long, which ONNX clamps at 0 for s0
/// past 3 (a fuzzing finding); at s0 = 3 it runs and matches the JIT.
#[test]
fn a_library_refuses_a_size_negative_at_these_dims() {
    if no_cc() {
        return;
    }
    let inputs = [
        ("x1", Tensor::from_vec(vec![3, 7], (0..21).map(|i| i as f32 - 4.5).collect::<Vec<f32>>())),
        ("x3", Tensor::from_vec(vec![], vec![1i64])),
    ];
    let message =
        refusal("negative-size", "symbolic_slice_length_negative_at_run_time", &inputs, "none 2 4 7\nnone 0\n");
    assert!(message.contains("Slice_4") && message.contains("-s0 + 3") && message.contains("negative"), "{message}");
}

/// A library refuses dims at which a kernel of known sizes would read
/// past a value of symbolic size, naming the kernel, as the JIT does
/// (`Plan::walks_to_check`): a slice `0..2` of `x1: f32[s0]` is two
/// elements only for s0 of 2 or more (a fuzzing finding, where the JIT read
/// past the input at s0 = 1); at s0 = 2 it runs and matches the JIT.
#[test]
fn a_library_refuses_a_known_slice_past_a_shorter_axis() {
    if no_cc() {
        return;
    }
    let inputs =
        [("x1", Tensor::from_vec(vec![2], vec![1.5f32, 2.5])), ("x2", Tensor::from_vec(vec![1], vec![0.5f32]))];
    let message = refusal("short-axis", "slice_past_a_symbolic_axis", &inputs, "none 1 1\nnone 1 1\n");
    assert!(message.contains("outside input 0"), "{message}");
}

/// A library with symbolic dims against the JIT on random inputs of many
/// shapes, the edges among them (one token, an empty past, a batch of
/// three, the longest past the positions allow): the same answers.
#[test]
fn a_symbolic_library_agrees_with_the_jit_over_many_shapes() {
    if no_cc() {
        return;
    }
    let work = work_dir("shapes");
    for (model, shapes) in [
        ("bert_dynamic", vec![(1, 1, 0), (3, 5, 0), (2, 33, 0), (1, 64, 0)]),
        ("gpt2_kv", vec![(1, 1, 0), (3, 2, 7), (2, 17, 30), (1, 1, 127), (2, 5, 0)]),
    ] {
        let case = common::synthetic_dir().join(model);
        let mut a = compile_symbolic(&case, &work, &[]);
        let jit = egret::compile(&case, &egret::CompileOptions { threads: Some(1), ..Default::default() }).unwrap();
        let mut sets = String::new();
        let mut want = Vec::new();
        for (set, &(batch, tokens, past)) in shapes.iter().enumerate() {
            sets.push_str("set\n");
            let mut feeds = Vec::new();
            for (i, (name, _)) in a.model.program.signature.inputs.iter().enumerate() {
                let (shape, t): (Vec<usize>, Tensor) = match name.as_str() {
                    "input_ids" | "token_type_ids" => {
                        let shape = vec![batch, tokens];
                        let ids = (0..batch * tokens).map(|j| ((j * 37 + set * 11) % 90) as i64).collect::<Vec<_>>();
                        (shape.clone(), Tensor::from_vec(shape, ids))
                    }
                    "attention_mask" => {
                        let shape = vec![batch, past + tokens];
                        (shape.clone(), Tensor::from_vec(shape, vec![1i64; batch * (past + tokens)]))
                    }
                    _ => {
                        let shape = vec![batch, 2, past, 16];
                        let n = batch * 2 * past * 16;
                        let v = (0..n).map(|j| ((j * 7919 + set) % 1000) as f32 / 500.0 - 1.0).collect::<Vec<_>>();
                        (shape.clone(), Tensor::from_vec(shape, v))
                    }
                };
                let p = a.dir.join(format!("set_{set}_in_{i}.bin"));
                std::fs::write(&p, t.to_bytes()).unwrap();
                let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
                sets.push_str(&format!("{} {} {}\n", p.display(), shape.len(), dims.join(" ")));
                feeds.push((name.clone(), t));
            }
            want.push(jit.run(feeds).unwrap());
        }
        std::fs::write(a.dir.join("sets.txt"), sets).unwrap();
        a.inputs.clear();
        let jit_output = |set: usize, j: usize| want[set][j].clone();
        let (refused, checked) = run_shaped_against(&a, &[], model, &jit_output);
        assert!(refused.is_empty(), "{model}: {refused:?}");
        assert_eq!(checked, shapes.len() * a.model.program.signature.outputs.len(), "{model}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// An ONNX model of reductions and a softmax over a symbolic length, as
/// exporters write mean pooling and unfused attention: `x: [batch,
/// sequence, 8]` summed over the sequence, its transpose's softmax over the
/// sequence, and its maximum over both.
fn symbolic_rows_model(dir: &Path) {
    use common::onnx::{model, node, value_info_dims};
    use onnx_protobuf::attribute_proto::AttributeType;
    use onnx_protobuf::tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    use onnx_protobuf::{AttributeProto, GraphProto, TensorProto};
    use protobuf::Message;
    let ints = |name: &str, v: &[i64]| {
        let mut a = AttributeProto::new();
        a.name = name.into();
        a.type_ = AttributeType::INTS.into();
        a.ints = v.to_vec();
        a
    };
    let int = |name: &str, v: i64| {
        let mut a = AttributeProto::new();
        a.name = name.into();
        a.type_ = AttributeType::INT.into();
        a.i = v;
        a
    };
    let (b, s) = (|| DimParam("batch".into()), || DimParam("sequence".into()));
    let mut g = GraphProto::new();
    g.input.push(value_info_dims("x", 1, &[b(), s(), DimValue(8)]));
    g.output.push(value_info_dims("sum", 1, &[b(), DimValue(8)]));
    g.output.push(value_info_dims("softmax", 1, &[b(), DimValue(8), s()]));
    g.output.push(value_info_dims("max", 1, &[b()]));
    let mut axes = TensorProto::new();
    axes.name = "axes".into();
    axes.data_type = 7;
    axes.dims = vec![1];
    axes.int64_data = vec![1];
    g.initializer.push(axes);
    let mut sum = node("ReduceSum", &["x", "axes"], &["sum"]);
    sum.attribute.push(int("keepdims", 0));
    let mut t = node("Transpose", &["x"], &["t"]);
    t.attribute.push(ints("perm", &[0, 2, 1]));
    let softmax = node("Softmax", &["t"], &["softmax"]);
    let mut max = node("ReduceMax", &["x"], &["max"]);
    max.attribute.push(ints("axes", &[1, 2]));
    max.attribute.push(int("keepdims", 0));
    g.node.extend([sum, t, softmax, max]);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.onnx"), model(g).write_to_bytes().unwrap()).unwrap();
}

/// Row kernels whose length is symbolic (a sum over the sequence, a
/// softmax over it): one JIT program and one library serve every shape,
/// and agree with the reference evaluator.
#[test]
fn reductions_and_softmax_over_a_symbolic_length_keep_it_symbolic() {
    let work = work_dir("symbolic-rows");
    let case = work.join("model").join("symbolic_rows");
    symbolic_rows_model(&case);
    let opts = egret::CompileOptions { threads: Some(1), ..Default::default() };
    let jit = egret::compile(&case, &opts).unwrap();
    let reference =
        egret::compile(&case, &egret::CompileOptions { backend: egret::Backend::Reference, ..opts.clone() }).unwrap();
    let shapes = [(1usize, 1usize), (2, 7), (3, 13), (1, 64), (2, 33)];
    let inputs: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(set, &(b, s))| {
            let v = (0..b * s * 8).map(|j| ((j * 7919 + set * 31) % 1000) as f32 / 250.0 - 2.0).collect::<Vec<_>>();
            Tensor::from_vec(vec![b, s, 8], v)
        })
        .collect();
    let mut want = Vec::new();
    for x in &inputs {
        let got = jit.run(vec![("x".into(), x.clone())]).unwrap();
        let expected = reference.run(vec![("x".into(), x.clone())]).unwrap();
        for ((name, g), (_, e)) in got.iter().zip(&expected) {
            let r = compare(name, g, e, Tolerance::default());
            assert!(r.failure.is_none(), "{name} at {:?}: {:?}", x.shape(), r.failure);
        }
        want.push(got);
    }
    assert_eq!(jit.program.executable.specializations(), None, "one program for every shape");
    if no_cc() {
        return;
    }
    let mut a = compile_symbolic(&case, &work, &[]);
    let mut sets = String::new();
    for (set, x) in inputs.iter().enumerate() {
        let p = a.dir.join(format!("set_{set}_in_0.bin"));
        std::fs::write(&p, x.to_bytes()).unwrap();
        let dims: Vec<String> = x.shape().iter().map(|d| d.to_string()).collect();
        sets.push_str(&format!("set\n{} 3 {}\n", p.display(), dims.join(" ")));
    }
    std::fs::write(a.dir.join("sets.txt"), sets).unwrap();
    a.inputs.clear();
    let jit_output = |set: usize, j: usize| want[set][j].clone();
    let (refused, checked) = run_shaped_against(&a, &[], "symbolic_rows", &jit_output);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(checked, shapes.len() * 3);
    let _ = std::fs::remove_dir_all(&work);
}

/// Every real export with symbolic dims (`tests/data/dynamic_exports`) as
/// one library, serving every data set's shapes and matching onnxruntime
/// from C: ViT's patch embedding as rows of one product; GPT-2's, LLaMA's
/// and BERT's masks (integer arithmetic, comparisons, gathers at computed
/// indices) as loop nests and gather kernels reading their sizes; BERT's
/// mean pooling as row kernels of symbolic length; T5's relative position
/// buckets (integer `Min`, `Abs`, `Neg`, `Where`, casts around a `log`) as
/// loop nests.
#[test]
fn symbolic_exports_are_one_library_each() {
    if no_cc() {
        return;
    }
    let work = work_dir("symbolic-exports");
    let dir = common::repo_root().join("tests/data/dynamic_exports");
    let cases = egret::check::discover(&dir).unwrap();
    assert_eq!(cases.len(), 9);
    for case in cases {
        let model = case.file_name().unwrap().to_string_lossy().to_string();
        let a = compile_symbolic(&case, &work, &[]);
        let header = std::fs::read_to_string(a.dir.join(format!("{}.h", a.name))).unwrap();
        assert!(header.contains("Symbolic dims: batch (any size)"), "{model}: {header}");
        let refused = run_shaped(&case, &a);
        assert!(refused.is_empty(), "{model}: {refused:?}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// The quantized, 4-bit, half-precision-edged and onnxruntime-fused models
/// (`tests/data/formats`) are one C library each too: the 8-bit and half
/// casts are loop nests reading their sizes, the rest f32 kernels.
#[test]
fn format_models_are_one_library_each() {
    if no_cc() {
        return;
    }
    let work = work_dir("formats");
    let dir = common::repo_root().join("tests/data/formats");
    for model in [
        "bert_dynamic_int8",
        "bert_dynamic_uint8_per_channel",
        "llama_int4_gather",
        "llama_O2_int4_asym",
        "vit_bf16_weights",
        "bert_O2",
        "ops/group_query_attention_rotary",
        "ops/cast_float16",
        "ops/quantize_linear_int8",
    ] {
        let case = dir.join(model);
        let a = compile_symbolic(&case, &work, &[]);
        let refused = run_shaped(&case, &a);
        assert!(refused.is_empty(), "{model}: {refused:?}");
    }
    let _ = std::fs::remove_dir_all(&work);
}
