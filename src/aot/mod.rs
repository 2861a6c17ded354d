//! Ahead-of-time compilation: `egret compile MODEL -o DIR`.
//!
//! The backend writes the plan as an object file whose driver launches
//! every kernel on caller buffers through the kernel library's scheduler
//! (see `backends::cpu::object`): the same kernels, choices and packed
//! weights as the JIT. This module adds the C API around it — a header
//! documenting the model's inputs and outputs, and a small generated C shim
//! with models, per-thread contexts (a scratch arena and a thread pool
//! each), positional and named runs, metadata queries, status messages and
//! a CPU check — and links the object, the shim and the kernel archive
//! (`libegret_kernels_archive.a`, built by `build.rs` and carried inside
//! `egret`) into `libNAME.so`. A caller needs libc, libm and pthreads,
//! nothing from Rust, and no file of Egret's beside the library.
//!
//! The weights, packed for the GEMM at compile time, are read-only data in
//! the library itself rather than a file beside it: one file to deploy,
//! mapped lazily by the loader and shared through the page cache by every
//! process that loads it, with no load step that could fail.

mod sizes;
mod weights;

use crate::{canonical, CompileOptions, Error};
use egret_backends::cpu::TargetCpu;
use egret_ir::Type;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The kernel library every shared library links (see `build.rs`), in a
/// build with the `aot` feature.
#[cfg(feature = "aot")]
fn kernel_archive() -> Result<&'static [u8], Error> {
    Ok(include_bytes!(concat!(env!("OUT_DIR"), "/libegret_kernels_archive.a")))
}

#[cfg(not(feature = "aot"))]
fn kernel_archive() -> Result<&'static [u8], Error> {
    Err(Error::Usage(
        "this build of Egret cannot write libraries or objects (it has no kernel archive to link): build it \
         with `--features aot` (`cargo build --release --features aot`, or `--all-features`)"
            .into(),
    ))
}

/// The C API's version, `NAME_ABI_VERSION` and `NAME_abi_version()`: raised
/// whenever a signature or a struct a caller sees changes. 1 was the
/// one-object API alone; 2 adds contexts; 3 symbolic dims (a context's
/// sizes are set from its inputs' dims).
pub const ABI_VERSION: u32 = 3;

/// What `egret compile` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    /// `libNAME.so` and `NAME.h`.
    SharedLibrary,
    /// `NAME.o`, `NAME_api.c`, `NAME.h` and `libegret_kernels_archive.a`,
    /// to link yourself (see `link_command`).
    Object,
    /// `NAME.clif`: the Cranelift IR of every function.
    Clif,
}

/// A C identifier from a model's file name.
pub fn c_name(stem: &str) -> String {
    let mut s: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert_str(0, "model_");
    }
    s
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|e| Error::Usage(format!("cannot write `{}`: {e}", path.display())))
}

/// What the C shim and header need to know about the compiled model.
struct Api<'a> {
    name: &'a str,
    inputs: Vec<(String, Type)>,
    outputs: Vec<(String, Type)>,
    arena: usize,
    /// `cpu::any_kernel_splits`: if none may, every context runs on one
    /// thread, as the JIT's executor does.
    any_split: bool,
    cpu: TargetCpu,
    /// Cranelift's names of the ISA extensions the generated code uses.
    features: Vec<String>,
    /// The model's symbolic dims that --dim gave values, with those values.
    symbols: Vec<(String, usize)>,
    /// The dims the library keeps symbolic, with their bounds.
    dims: Vec<sizes::DimInfo>,
    /// `sizes::Sizes::defines` and `source`: the C that solves and lays out sizes.
    size_defines: String,
    size_code: String,
    /// `weights::c_source`: the weights file's loader (a stub when the
    /// weights are in the object).
    weights_code: String,
    /// Whether the weights are in a file beside the library.
    weights_beside: bool,
}

/// Weights over this many bytes go in a file beside the library when
/// `CompileOptions::weights_file` is `Auto`: an object's data is addressed
/// within 2 GB, and linking a large one is slow.
pub const EMBED_WEIGHTS_UP_TO: u64 = 1 << 30;

/// Compiles `model` ahead of time into `out_dir`; returns the files written.
pub fn compile_library(
    model: &Path,
    out_dir: &Path,
    name: &str,
    emit: Emit,
    opts: &CompileOptions,
) -> Result<Vec<PathBuf>, Error> {
    if c_name(name) != name {
        return Err(Error::Usage(format!("`{name}` is not a valid C identifier; try `{}`", c_name(name))));
    }
    // Before any work: a build without the archive cannot link.
    if emit != Emit::Clif {
        kernel_archive()?;
    }
    let mut c = canonical(model, opts)?;
    if let Some((input, _)) = c.specialized.first() {
        return Err(Error::Usage(format!(
            "input `{input}` sets a shape, so the model was specialised on its value; ahead-of-time libraries need every shape given by the model's dims or by --dim"
        )));
    }
    let symbols = c.graph.symbols();
    crate::check_bounds(opts, &symbols)?;
    if !symbols.is_empty() {
        let need = egret_backends::symbols_to_bind(&c.graph, crate::lower_options(opts));
        if !need.is_empty() {
            let need: Vec<String> = need.into_iter().collect();
            let flags: Vec<String> = need.iter().map(|s| format!("--dim {s}=N")).collect();
            return Err(Error::Usage(format!(
                "the model's dims {} reach kernels that are only compiled for known sizes, so a library cannot keep them symbolic: give them values ({})",
                need.join(", "),
                flags.join(" ")
            )));
        }
    }
    // Lowered exactly as the JIT lowers it, so the artifact runs the same kernels.
    let mut plan = egret_backends::lower(&c.graph, crate::lower_options(opts))?;
    crate::lay_out_for_bounds(&mut plan, &opts.dim_bounds);
    let inputs: Vec<(String, Type)> =
        c.graph.inputs().iter().map(|&v| (c.graph.input_name(v).to_string(), c.graph.ty(v).clone())).collect();
    let outputs: Vec<(String, Type)> =
        c.graph.outputs().iter().map(|(n, v)| (n.clone(), c.graph.ty(*v).clone())).collect();
    // The plan holds the only reference to each weight now, so packing
    // frees each as it goes (`cpu::choose`).
    c.graph = egret_ir::Graph::new();
    // Ops the JIT runs per call on the reference evaluator at symbolic
    // sizes (a mask's `GatherND` or `GatherElements`) have no native code yet.
    let mut per_call: Vec<String> = vec![];
    let mut need = std::collections::BTreeSet::new();
    for k in &plan.kernels {
        let egret_backends::plan::KernelKind::Reference { op, inputs, outputs } = &k.kind else { continue };
        let symbols: Vec<String> =
            inputs.iter().chain(outputs).flat_map(|(_, t)| t.shape.iter().flat_map(|d| d.symbols())).collect();
        if !symbols.is_empty() && !egret_backends::cpu::choose::has_loop_nest(k) {
            per_call.push(format!("`{}` at {}", op.name(), k.label));
            need.extend(symbols);
        }
    }
    if !need.is_empty() {
        let need: Vec<String> = need.into_iter().collect();
        let flags: Vec<String> = need.iter().map(|s| format!("--dim {s}=N")).collect();
        let shown = per_call.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        return Err(Error::Usage(format!(
            "the model's dims {} reach ops that run on the reference evaluator at symbolic sizes ({shown}{}), \
             which a library cannot hold: give them values ({})",
            need.join(", "),
            if per_call.len() > 3 { ", ..." } else { "" },
            flags.join(" ")
        )));
    }
    // Each symbol's value comes from a caller's input dims.
    let solvable: Vec<String> = inputs.iter().flat_map(|(_, t)| t.shape.iter().filter_map(|d| d.as_symbol())).collect();
    if let Some(s) = plan.symbols.iter().find(|s| !solvable.contains(s)) {
        return Err(Error::Usage(format!(
            "the dim `{s}` is not the size of any input's dim, so a library cannot tell it from the inputs it is given: give it a value (--dim {s}=N)"
        )));
    }
    let cpu = opts.target_cpu;
    let codegen = |e: egret_backends::cpu::CodegenError| Error::Codegen(e.to_string());
    let weights_at = weights_placement(&plan, opts.weights_file);
    let object = egret_backends::cpu::object::compile_object(plan, name, cpu, weights_at).map_err(codegen)?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::Usage(format!("cannot create `{}`: {e}", out_dir.display())))?;
    let mut written = Vec::new();
    // Written first: the object's constants are dropped before linking.
    let checksum = match (&object.weights, emit) {
        (Some(layout), Emit::SharedLibrary | Emit::Object) => {
            let path = out_dir.join(format!("{name}.weights"));
            let sum = weights::write(&path, &object.plan, layout)?;
            written.push(path);
            sum
        }
        _ => 0,
    };
    let weights_code = weights::c_source(name, object.weights.as_ref().map(|l| (l, checksum)));
    let dims: Vec<sizes::DimInfo> = object
        .plan
        .symbols
        .iter()
        .map(|s| {
            let bounds = opts.dim_bounds.get(s);
            sizes::DimInfo { name: s.clone(), lo: bounds.map_or(0, |b| b.0 as i64), hi: bounds.map(|b| b.1 as i64) }
        })
        .collect();
    let size_c =
        sizes::Sizes { plan: &object.plan, words: &object.words, dims: &dims, inputs: &inputs, outputs: &outputs };
    let (size_defines, size_code) = (size_c.defines(), size_c.source(name));
    let api = Api {
        name,
        inputs,
        outputs,
        // Planned for the bounds when every symbol has them; otherwise
        // laid out at the first sizes a context is given.
        arena: if dims.iter().all(|d| d.hi.is_some()) { object.plan.arena_bytes } else { 0 },
        any_split: egret_backends::cpu::any_kernel_splits(&object.plan),
        cpu,
        features: egret_backends::cpu::required_features(cpu).map_err(codegen)?,
        symbols: c.symbols.clone(),
        dims,
        size_defines,
        size_code,
        weights_code,
        weights_beside: object.weights.is_some(),
    };
    // A flag this table lacks is one Cranelift added after it was written:
    // a library that cannot check for it could fault where it loads.
    if let Some(f) = api.features.iter().find(|f| cpuid_bit(f).is_none()) {
        return Err(Error::Codegen(format!(
            "the generated code uses the ISA extension `{f}`, which egret cannot check for at load time; pass a --target-cpu level"
        )));
    }
    let header = header(&api, model);
    let shim = api_source(&api);
    // The compiled plan (its packed weights) is not needed to link.
    let egret_backends::cpu::object::ObjectCode { bytes: object_bytes, clif, .. } = object;
    match emit {
        Emit::Clif => {
            let p = out_dir.join(format!("{name}.clif"));
            write(&p, &clif)?;
            written.push(p);
        }
        Emit::Object => {
            for (file, bytes) in [
                (format!("{name}.o"), object_bytes),
                (format!("{name}_api.c"), shim.into_bytes()),
                (format!("{name}.h"), header.into_bytes()),
                ("libegret_kernels_archive.a".to_string(), kernel_archive()?.to_vec()),
                (format!("{name}.map"), version_script(name).into_bytes()),
            ] {
                let p = out_dir.join(file);
                write(&p, bytes)?;
                written.push(p);
            }
        }
        Emit::SharedLibrary => {
            // The object, the C shim and the archive are intermediate: build in a scratch folder.
            let scratch = out_dir.join(format!(".{name}.build"));
            std::fs::create_dir_all(&scratch)
                .map_err(|e| Error::Usage(format!("cannot create `{}`: {e}", scratch.display())))?;
            let h = out_dir.join(format!("{name}.h"));
            write(&h, &header)?;
            write(&scratch.join(format!("{name}.h")), &header)?;
            write(&scratch.join(format!("{name}.o")), &object_bytes)?;
            write(&scratch.join(format!("{name}_api.c")), &shim)?;
            write(&scratch.join("libegret_kernels_archive.a"), kernel_archive()?)?;
            write(&scratch.join(format!("{name}.map")), version_script(name))?;
            let so = out_dir.join(format!("lib{name}.so"));
            link(&so, &scratch, name)?;
            let _ = std::fs::remove_dir_all(&scratch);
            written.extend([so, h]);
        }
    }
    Ok(written)
}

/// Where the weights of `plan` go: `Auto` puts them beside the library
/// past `EMBED_WEIGHTS_UP_TO` bytes (as the plan holds them before packing,
/// about what the packed copies take).
fn weights_placement(
    plan: &egret_backends::Plan,
    choice: crate::WeightsFile,
) -> egret_backends::cpu::object::WeightsAt {
    use egret_backends::cpu::object::WeightsAt;
    match choice {
        crate::WeightsFile::Embedded => WeightsAt::Embedded,
        crate::WeightsFile::Beside => WeightsAt::Beside,
        crate::WeightsFile::Auto => {
            let used = plan.used_buffers();
            let bytes: u64 = plan
                .buffers
                .iter()
                .zip(used)
                .filter_map(|(b, used)| match (&b.storage, used) {
                    (egret_backends::plan::Storage::Constant(t), true) => {
                        Some((t.numel() * t.dtype().size_bytes()) as u64)
                    }
                    _ => None,
                })
                .sum();
            if bytes > EMBED_WEIGHTS_UP_TO {
                WeightsAt::Beside
            } else {
                WeightsAt::Embedded
            }
        }
    }
}

/// The C API's functions, `NAME_` + each: what the library exports.
const API: [&str; 39] = [
    "abi_version",
    "missing_cpu_feature",
    "status_message",
    "create",
    "destroy",
    "run",
    "run_named",
    "context_create",
    "context_destroy",
    "context_threads",
    "context_run",
    "context_run_named",
    "num_inputs",
    "input_name",
    "input_index",
    "input_dtype",
    "input_rank",
    "input_dims",
    "input_bytes",
    "num_outputs",
    "output_name",
    "output_index",
    "output_dtype",
    "output_rank",
    "output_dims",
    "output_bytes",
    "input_dim_param",
    "output_dim_param",
    "num_dims",
    "dim_name",
    "dim_min",
    "dim_max",
    "model_context",
    "context_set_input_dims",
    "context_input_dims",
    "context_input_bytes",
    "context_output_dims",
    "context_output_bytes",
    "context_error",
];

/// The linker version script: the library exports its C API and nothing
/// else — not the kernel library's symbols, nor Rust's. The functions are
/// listed one by one rather than as `NAME_*`, which for a model named
/// `egret` would export the kernels too.
fn version_script(name: &str) -> String {
    let globals: String = API.iter().map(|f| format!("    {name}_{f};\n")).collect();
    format!("{{\n  global:\n{globals}  local: *;\n}};\n")
}

/// The arguments after `cc` that link `NAME_api.c`, `NAME.o` and the kernel
/// archive (in the current folder) into the shared library `library`;
/// `--emit obj` users run the same (`egret compile` prints it).
pub fn link_command(name: &str, library: &str) -> Vec<String> {
    [
        "-shared",
        "-fPIC",
        // The shim is API calls and size arithmetic, not kernels: a
        // symbolic decoder's size solver is one function of tens of
        // thousands of lines, which -O2 takes minutes over (a 1.1B LLaMA's:
        // 21 s at -O1, about 4 minutes at -O2).
        "-O1",
        "-o",
        library,
        &format!("{name}_api.c"),
        &format!("{name}.o"),
        "libegret_kernels_archive.a",
        &format!("-Wl,--version-script={name}.map"),
        // Drops the parts of the kernel library (and of Rust's standard
        // library in it) that nothing calls.
        "-Wl,--gc-sections",
        // The archive's unwinder comes from libgcc's static part, so the
        // library needs no libgcc_s; with --as-needed, no library is
        // recorded that nothing uses (glibc's libpthread and libdl are
        // empty stubs now).
        "-static-libgcc",
        "-Wl,--as-needed",
        "-lpthread",
        "-ldl",
        "-lm",
    ]
    .map(String::from)
    .to_vec()
}

/// `cc` the shim, the object and the kernel archive into a shared library.
fn link(so: &Path, scratch: &Path, name: &str) -> Result<(), Error> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    // The linker runs in the scratch folder; the library goes to its final place.
    let so = std::path::absolute(so).map_err(|e| Error::Usage(format!("bad output path `{}`: {e}", so.display())))?;
    let args = link_command(name, &so.display().to_string());
    let out = std::process::Command::new(&cc)
        .current_dir(scratch)
        .args(&args)
        .output()
        .map_err(|e| Error::Usage(format!("cannot run the C compiler `{cc}` ({e}); install one (for example `apt-get install gcc`) or set CC, or use --emit obj")))?;
    if !out.status.success() {
        return Err(Error::Usage(format!(
            "`{cc}` failed to link `{}`:\n{}",
            so.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn shape_text(t: &Type) -> String {
    format!("{}{:?}", t.dtype, t.shape)
}

fn header(api: &Api, model: &Path) -> String {
    let name = api.name;
    let up = name.to_uppercase();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "/* {name}.h: the C API of `{}`, compiled ahead of time by egret {}.",
        model.display(),
        env!("CARGO_PKG_VERSION")
    );
    s.push_str(
        " *
 * A model is the compiled network: its weights are read-only data inside
 * the library, shared by every model and context (and, through the page
 * cache, by every process that loads the library). A context is what one
 * run needs besides: a scratch arena and the threads the run uses. Make one
 * context per serving thread and run on it; runs on different contexts of
 * one model may happen at the same time.
 *
 * For a single thread, the one-object calls (NAME_create, NAME_run,
 * NAME_run_named, NAME_destroy) run on a context that the model makes for
 * itself, with one thread.
 *
 * Buffers are dense row-major arrays of the listed element types and
 * shapes, aligned at least to their element size (malloc's alignment is
 * enough), and no output may overlap another buffer. Every function that
 * can fail returns a status: 0 on success, otherwise one of the codes below
 * (NAME_status_message turns it into text).
 *
 * Thread safety: NAME_create, NAME_context_create, the metadata queries,
 * NAME_abi_version, NAME_status_message and NAME_missing_cpu_feature may
 * be called from any thread at any time. NAME_context_run and
 * NAME_context_run_named may run at the same time on different contexts
 * (of one model or of several), but not on the same context; the same holds
 * for NAME_context_set_input_dims, which no call on its context may overlap
 * (the context's dims, bytes and error queries included). NAME_run and
 * NAME_run_named use the model's own context: one thread at a time per
 * model. A destroy must not overlap any other call on what it destroys,
 * and a model must outlive its contexts.
 *
"
        .replace("NAME", name)
        .as_str(),
    );
    let _ = writeln!(
        s,
        " * Compiled for: {} ({}). Loading it on a CPU without these fails with\n * {up}_ERROR_UNSUPPORTED_CPU, not a crash. The kernel library picks its\n * AVX-512, AVX2 or baseline code when the library is loaded.\n *",
        api.cpu.name(),
        if api.features.is_empty() { "no extensions".to_string() } else { cpu_feature_list(&api.features) }
    );
    if api.weights_beside {
        let _ = writeln!(
            s,
            " * Weights: in {name}.weights, which must stay beside the library (or be
 * named by the environment variable {up}_WEIGHTS). The first create maps
 * it read-only and checks its size and checksum; a missing, short or
 * changed file fails with {up}_ERROR_WEIGHTS. Replacing or truncating it
 * while the library is loaded is not supported.
 *"
        );
    }
    s.push_str(" * Inputs:\n");
    for (i, (n, t)) in api.inputs.iter().enumerate() {
        let _ = writeln!(s, " *   {i}: \"{n}\" {}", shape_text(t));
    }
    s.push_str(" * Outputs:\n");
    for (i, (n, t)) in api.outputs.iter().enumerate() {
        let _ = writeln!(s, " *   {i}: \"{n}\" {}", shape_text(t));
    }
    if !api.symbols.is_empty() {
        let bound: Vec<String> = api.symbols.iter().map(|(n, v)| format!("{n} = {v}")).collect();
        let _ = writeln!(s, " * Dims of the model fixed for this library by --dim: {}.", bound.join(", "));
    }
    if api.dims.is_empty() {
        let _ = writeln!(s, " * Scratch memory per context: {} bytes.\n */", api.arena);
    } else {
        let listed: Vec<String> = api
            .dims
            .iter()
            .map(|d| match d.hi {
                Some(hi) => format!("{} ({}..{hi})", d.name, d.lo),
                None => format!("{} (any size)", d.name),
            })
            .collect();
        let _ = writeln!(
            s,
            " *\n * Symbolic dims: {}.\n * One library runs every value of them: give a context the inputs' dims\n * with {name}_context_set_input_dims before running on it, and size the\n * outputs by {name}_context_output_dims (the static {name}_input_dims and\n * {name}_output_dims say -1 where a dim is symbolic).\n * Scratch memory per context: {}.\n */",
            listed.join(", "),
            if api.arena > 0 {
                format!("{} bytes, planned for the bounds", api.arena)
            } else {
                "laid out for the first sizes a context is given,\n * and grown when later sizes need more".to_string()
            }
        );
    }
    let _ = write!(
        s,
        "#ifndef {up}_H
#define {up}_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern \"C\" {{
#endif

/* The version of this API. A caller built against this header can refuse a
 * library whose {name}_abi_version() differs. */
#define {up}_ABI_VERSION {ABI_VERSION}
int {name}_abi_version(void);

#define {up}_OK 0
/* A gather read an index outside its axis. */
#define {up}_ERROR_INDEX_OUT_OF_RANGE 1
/* A null pointer, an unknown or missing name, or a count that does not match. */
#define {up}_ERROR_INVALID_ARGUMENT 2
#define {up}_ERROR_OUT_OF_MEMORY 3
/* This CPU lacks an extension the code was compiled for ({name}_missing_cpu_feature names it). */
#define {up}_ERROR_UNSUPPORTED_CPU 4
/* Input dims that do not fit the model: a fixed dim given another size, two
 * inputs that disagree on a symbolic dim, a value outside a dim's bounds, or
 * sizes the model cannot serve (a table it indexes by a dim is too short);
 * or a run on a context whose sizes were never set. {name}_context_error
 * says which. */
#define {up}_ERROR_SHAPE 5
/* The weights file beside the library ({name}.weights, or where the
 * environment variable {up}_WEIGHTS points) is missing, of another size,
 * another model's, or changed since it was written
 * ({name}_status_message says which and where). */
#define {up}_ERROR_WEIGHTS 6

typedef struct {name}_model {name}_model;
typedef struct {name}_context {name}_context;

/* Makes a model in *model, with its own one-thread context for {name}_run. */
int {name}_create({name}_model **model);
/* Frees a model and its own context (a null pointer is ignored). Free its
 * other contexts first. */
void {name}_destroy({name}_model *model);

/* Makes a context for runs of model in *context. threads: how many threads
 * one run uses; 0 means one per core. 1 suits a server that runs one
 * instance per core. */
int {name}_context_create(const {name}_model *model, int threads, {name}_context **context);
/* Frees a context (a null pointer is ignored); its threads exit. */
void {name}_context_destroy({name}_context *context);
/* The threads a run on context uses. */
int {name}_context_threads(const {name}_context *context);

/* Runs on positional buffers: inputs[i] and outputs[j] in the order above. */
int {name}_context_run({name}_context *context, const void *const *inputs, void *const *outputs);
/* Runs on named buffers: every input and output must be named exactly once. */
int {name}_context_run_named({name}_context *context, size_t n_inputs, const char *const *input_names,
                             const void *const *inputs, size_t n_outputs, const char *const *output_names,
                             void *const *outputs);

/* Sets the sizes of the context's runs from its inputs' dims: input_dims[i]
 * points to input i's dims (as many as its rank). Solves the symbolic dims,
 * checks them, and lays the context's scratch memory out for them (growing
 * it if needed); later runs use these sizes until the next call. Needed
 * before the first run when the model has symbolic dims; for a model
 * without, it only checks the dims. On failure the context has no sizes
 * until a call succeeds. */
int {name}_context_set_input_dims({name}_context *context, const int64_t *const *input_dims);
/* The dims and bytes of input i and output j at the context's sizes (NULL
 * and 0 before any are set). */
const int64_t *{name}_context_input_dims(const {name}_context *context, size_t i);
size_t {name}_context_input_bytes(const {name}_context *context, size_t i);
const int64_t *{name}_context_output_dims(const {name}_context *context, size_t j);
size_t {name}_context_output_bytes(const {name}_context *context, size_t j);
/* Why the context's last call failed with {up}_ERROR_SHAPE (empty if none did). */
const char *{name}_context_error(const {name}_context *context);
/* The model's own context, the one {name}_run and {name}_run_named use. */
{name}_context *{name}_model_context({name}_model *model);

/* As the context calls, on the model's own context. */
int {name}_run({name}_model *model, const void *const *inputs, void *const *outputs);
int {name}_run_named({name}_model *model, size_t n_inputs, const char *const *input_names, const void *const *inputs,
                     size_t n_outputs, const char *const *output_names, void *const *outputs);

/* A description of a status code. */
const char *{name}_status_message(int status);
/* The first extension the code needs that this CPU lacks, or NULL if none. */
const char *{name}_missing_cpu_feature(void);

/* Metadata. Indexes run from 0; *_index returns -1 for an unknown name.
 * dtype is one of f32 f64 i8 i16 i32 i64 u8 u16 u32 u64 bool. A symbolic
 * dim is -1 in *_dims, and *_bytes is 0 for a tensor that has one; the
 * context's calls give them at its sizes. *_dim_param is dim k's expression
 * of the symbolic dims (\"sequence\", \"past_sequence + 1\"), NULL for a fixed
 * dim. */
size_t {name}_num_inputs(void);
const char *{name}_input_name(size_t i);
int {name}_input_index(const char *name);
const char *{name}_input_dtype(size_t i);
size_t {name}_input_rank(size_t i);
const int64_t *{name}_input_dims(size_t i);
size_t {name}_input_bytes(size_t i);
size_t {name}_num_outputs(void);
const char *{name}_output_name(size_t i);
int {name}_output_index(const char *name);
const char *{name}_output_dtype(size_t i);
size_t {name}_output_rank(size_t i);
const int64_t *{name}_output_dims(size_t i);
size_t {name}_output_bytes(size_t i);
const char *{name}_input_dim_param(size_t i, size_t k);
const char *{name}_output_dim_param(size_t i, size_t k);

/* The symbolic dims the library keeps, their names and bounds (max -1: none). */
size_t {name}_num_dims(void);
const char *{name}_dim_name(size_t i);
int64_t {name}_dim_min(size_t i);
int64_t {name}_dim_max(size_t i);

#ifdef __cplusplus
}}
#endif

#endif
"
    );
    s
}

/// Where CPUID reports a Cranelift ISA flag: leaf, subleaf, register
/// (0 eax .. 3 edx), bit, and the XCR0 state bits the OS must enable for
/// it (the AVX registers, the AVX-512 ones).
fn cpuid_bit(flag: &str) -> Option<(&'static str, u32, u32, u32, u32, u32)> {
    const AVX_STATE: u32 = 0x6;
    const AVX512_STATE: u32 = 0xe6;
    Some(match flag {
        "has_sse3" => ("sse3", 1, 0, 2, 0, 0),
        "has_ssse3" => ("ssse3", 1, 0, 2, 9, 0),
        "has_fma" => ("fma", 1, 0, 2, 12, AVX_STATE),
        "has_cmpxchg16b" => ("cmpxchg16b", 1, 0, 2, 13, 0),
        "has_sse41" => ("sse4.1", 1, 0, 2, 19, 0),
        "has_sse42" => ("sse4.2", 1, 0, 2, 20, 0),
        "has_popcnt" => ("popcnt", 1, 0, 2, 23, 0),
        "has_avx" => ("avx", 1, 0, 2, 28, AVX_STATE),
        "has_bmi1" => ("bmi1", 7, 0, 1, 3, 0),
        "has_avx2" => ("avx2", 7, 0, 1, 5, AVX_STATE),
        "has_bmi2" => ("bmi2", 7, 0, 1, 8, 0),
        "has_avx512f" => ("avx512f", 7, 0, 1, 16, AVX512_STATE),
        "has_avx512dq" => ("avx512dq", 7, 0, 1, 17, AVX512_STATE),
        "has_avx512vl" => ("avx512vl", 7, 0, 1, 31, AVX512_STATE),
        "has_avx512vbmi" => ("avx512vbmi", 7, 0, 2, 1, AVX512_STATE),
        "has_avx512vnni" => ("avx512vnni", 7, 0, 2, 11, AVX512_STATE),
        "has_avx512bitalg" => ("avx512bitalg", 7, 0, 2, 12, AVX512_STATE),
        "has_avx_vnni" => ("avxvnni", 7, 1, 0, 4, AVX_STATE),
        "has_lzcnt" => ("lzcnt", 0x8000_0001, 0, 2, 5, 0),
        _ => return None,
    })
}

fn cpu_feature_list(features: &[String]) -> String {
    features.iter().map(|f| cpuid_bit(f).map_or(f.as_str(), |b| b.0)).collect::<Vec<_>>().join(" ")
}

/// C for `missing_cpu_feature()`: the first required extension CPUID (and,
/// for the vector registers, XCR0) says this CPU lacks, or NULL.
fn cpu_check(features: &[String]) -> String {
    let mut rows = String::new();
    for f in features {
        // `compile_library` refused flags without an entry.
        let (name, leaf, sub, reg, bit, xcr0) = cpuid_bit(f).expect("checked by compile_library");
        let _ = writeln!(rows, "    {{\"{name}\", 0x{leaf:x}u, {sub}u, {reg}, {bit}, 0x{xcr0:x}u}},");
    }
    if features.is_empty() {
        return "static const char *missing_cpu_feature(void) { return 0; }\n".into();
    }
    format!(
        r#"#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

struct cpu_feature {{
    const char *name;
    unsigned leaf, subleaf;
    int reg, bit;
    unsigned xcr0;
}};

static const struct cpu_feature required[] = {{
{rows}}};

static unsigned xcr0(void) {{
    unsigned r[4] = {{0, 0, 0, 0}}, lo, hi;
    /* XGETBV is only there where the OS has turned on OSXSAVE. */
    if (!__get_cpuid(1, &r[0], &r[1], &r[2], &r[3]) || !(r[2] & (1u << 27))) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return lo;
}}

static const char *missing_cpu_feature(void) {{
    size_t i;
    unsigned state = xcr0();
    for (i = 0; i < sizeof required / sizeof required[0]; i++) {{
        unsigned r[4] = {{0, 0, 0, 0}};
        const struct cpu_feature *f = &required[i];
        if (!__get_cpuid_count(f->leaf, f->subleaf, &r[0], &r[1], &r[2], &r[3])) return f->name;
        if (!(r[f->reg] & (1u << f->bit)) || (state & f->xcr0) != f->xcr0) return f->name;
    }}
    return 0;
}}
#else
#error "this library's code is for x86-64"
#endif
"#
    )
}

fn c_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\{b:03o}");
            }
        }
    }
    out.push('"');
    out
}

/// C tables describing one side (inputs or outputs) of the signature.
fn tables(side: &str, items: &[(String, Type)]) -> String {
    let mut s = String::new();
    let n = items.len();
    let list = |f: &dyn Fn(&(String, Type)) -> String| {
        if items.is_empty() {
            "0".to_string()
        } else {
            items.iter().map(f).collect::<Vec<_>>().join(", ")
        }
    };
    for (i, (_, t)) in items.iter().enumerate() {
        let (dims, params) = if t.shape.is_empty() {
            ("0".to_string(), "0".to_string())
        } else {
            let dims = t.shape.iter().map(|d| d.known().unwrap_or(-1).to_string()).collect::<Vec<_>>();
            let params = t.shape.iter().map(|d| if d.is_known() { "0".into() } else { c_string(&d.to_string()) });
            (dims.join(", "), params.collect::<Vec<_>>().join(", "))
        };
        let _ = writeln!(s, "static const int64_t {side}_dims_{i}[] = {{{dims}}};");
        let _ = writeln!(s, "static const char *const {side}_dim_params_{i}[] = {{{params}}};");
    }
    let _ = writeln!(s, "#define N_{} {n}", side.to_uppercase());
    let _ = writeln!(s, "static const char *const {side}_names[] = {{{}}};", list(&|(n, _)| c_string(n)));
    let _ = writeln!(s, "static const char *const {side}_dtypes[] = {{{}}};", list(&|(_, t)| c_string(t.dtype.name())));
    let _ = writeln!(s, "static const size_t {side}_ranks[] = {{{}}};", list(&|(_, t)| t.rank().to_string()));
    // 0 where a dim is symbolic: the context's call gives the bytes.
    let _ = writeln!(
        s,
        "static const size_t {side}_bytes[] = {{{}}};",
        list(&|(_, t)| if t.is_known() { (t.numel() * t.dtype.size_bytes()).to_string() } else { "0".into() })
    );
    let ptrs = |what: &str| {
        if items.is_empty() {
            "0".to_string()
        } else {
            (0..n).map(|i| format!("{side}_{what}_{i}")).collect::<Vec<_>>().join(", ")
        }
    };
    let _ = writeln!(s, "static const int64_t *const {side}_dims[] = {{{}}};", ptrs("dims"));
    let _ = writeln!(s, "static const char *const *const {side}_dim_params[] = {{{}}};", ptrs("dim_params"));
    // Where each one's dims start in the context's table of them.
    let mut at = 0;
    let starts: Vec<String> = items
        .iter()
        .map(|(_, t)| {
            at += t.rank();
            (at - t.rank()).to_string()
        })
        .collect();
    let _ = writeln!(
        s,
        "static const size_t {side}_dim_at[] = {{{}}};",
        if starts.is_empty() { "0".into() } else { starts.join(", ") }
    );
    let _ = writeln!(s, "#define {}_RANKS {at}", side.to_uppercase());
    s
}

fn api_source(api: &Api) -> String {
    let name = api.name;
    let up = name.to_uppercase();
    let mut s = format!(
        "/* Generated by egret: the C API around {name}_run_plan. */
#define _GNU_SOURCE /* dladdr */
#include \"{name}.h\"
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Runs every kernel on the caller's buffers; defined (hidden) in the object
 * file. words: the sizes, offsets and tables of a plan with symbolic dims,
 * filled by set_sizes below (unused by a plan without). */
extern int {name}_run_plan(const void *const *inputs, void *const *outputs, void *arena, const int64_t *words);

/* The kernel library's scheduler (libegret_kernels_archive.a). */
typedef struct egret_rt_pool egret_rt_pool;
extern egret_rt_pool *egret_rt_pool_new(int64_t threads);
extern int64_t egret_rt_pool_threads(const egret_rt_pool *pool);
extern void egret_rt_pool_free(egret_rt_pool *pool);
extern int egret_rt_pool_run(const egret_rt_pool *pool, int (*f)(void *), void *data);

/* The arena a context starts with (0: laid out at its first sizes). */
#define ARENA_BYTES ((size_t){arena})
/* Whether any kernel is big enough to split across threads: if none is, a
 * run on a pool would cost more than it saves, and contexts use one. */
#define ANY_SPLIT {any_split}

struct {name}_model {{
    {name}_context *own;
}};

",
        arena = api.arena,
        any_split = api.any_split as u8,
    );
    s.push_str(&tables("input", &api.inputs));
    s.push_str(&tables("output", &api.outputs));
    s.push_str(&api.size_defines);
    let _ = write!(
        s,
        "
struct {name}_context {{
    void *arena;
    size_t arena_bytes;
    egret_rt_pool *pool;
    /* Whether the sizes below are set (always, for a model without symbolic dims). */
    int have_sizes;
    int64_t dims[N_DIMS + 1];
    int64_t words[N_WORDS + 1];
    /* The kernels' parameter blocks and tables at these sizes. */
    int64_t *blocks;
    size_t block_words;
    int64_t input_dims[INPUT_RANKS + 1];
    size_t input_bytes[N_INPUT + 1];
    int64_t output_dims[OUTPUT_RANKS + 1];
    size_t output_bytes[N_OUTPUT + 1];
    char error[512];
}};

/* Records why a call failed; returns {up}_ERROR_SHAPE. */
static int refuse({name}_context *c, const char *format, ...) {{
    va_list args;
    va_start(args, format);
    vsnprintf(c->error, sizeof c->error, format, args);
    va_end(args);
    return {up}_ERROR_SHAPE;
}}

/* Size arithmetic that notes overflow in *ok instead of wrapping. */
static int64_t add(int64_t a, int64_t b, int *ok) {{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r)) *ok = 0;
    return r;
}}
static int64_t mul(int64_t a, int64_t b, int *ok) {{
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r)) *ok = 0;
    return r;
}}
static int64_t max64(int64_t a, int64_t b) {{ return a > b ? a : b; }}
static int64_t nonneg(int64_t a) {{ return a > 0 ? a : 0; }}
static int64_t round_up(int64_t a, int64_t to, int *ok) {{ return mul((add(a, to - 1, ok)) / to, to, ok); }}
static int64_t ceil_div(int64_t a, int64_t b) {{ return a <= 0 ? 0 : (a - 1) / b + 1; }}
/* A tile chosen for nominal sizes, at most what a call has (and at least 1). */
static int64_t clamp_tile(int64_t n, int64_t cap) {{ return n < 1 ? 1 : (n < cap ? n : cap); }}

/* Whether a strided walk of `rank` dims (n[k] steps of step[k] elements
 * from element `at`, `elem` bytes each) stays inside `bytes` bytes. */
static int inside(int64_t elem, int64_t at, int rank, const int64_t *n, const int64_t *step, int64_t bytes) {{
    __int128 lo = at, hi = at;
    int k;
    for (k = 0; k < rank; k++) {{
        __int128 reach;
        if (n[k] <= 0) return 1;
        reach = (__int128)(n[k] - 1) * step[k];
        if (reach < 0) lo += reach;
        else hi += reach;
    }}
    return lo >= 0 && (hi + 1) * elem <= bytes;
}}
"
    );
    s.push_str(&api.size_code);
    s.push('\n');
    s.push_str(&cpu_check(&api.features));
    s.push_str(&api.weights_code);
    let _ = write!(
        s,
        "
int {name}_abi_version(void) {{ return {up}_ABI_VERSION; }}

const char *{name}_missing_cpu_feature(void) {{ return missing_cpu_feature(); }}

int {name}_context_create(const {name}_model *model, int threads, {name}_context **context) {{
    {name}_context *c;
    if (!model || !context || threads < 0) return {up}_ERROR_INVALID_ARGUMENT;
    if (missing_cpu_feature()) return {up}_ERROR_UNSUPPORTED_CPU;
    if (weights_ready() != {up}_OK) return {up}_ERROR_WEIGHTS;
    c = ({name}_context *)calloc(1, sizeof *c);
    if (!c) return {up}_ERROR_OUT_OF_MEMORY;
    c->pool = egret_rt_pool_new(ANY_SPLIT ? threads : 1);
    if (ARENA_BYTES > 0) {{
        /* 64-byte alignment matches the memory plan; aligned_alloc wants a multiple of it. */
        c->arena_bytes = (ARENA_BYTES + 63) / 64 * 64;
        c->arena = aligned_alloc(64, c->arena_bytes);
    }}
    if ((ARENA_BYTES > 0 && !c->arena) || !c->pool) {{
        {name}_context_destroy(c);
        return {up}_ERROR_OUT_OF_MEMORY;
    }}
    if (N_DIMS == 0) {{
        int64_t none[1] = {{0}};
        int status = set_sizes(c, none);
        if (status != {up}_OK) {{
            {name}_context_destroy(c);
            return status;
        }}
        c->have_sizes = 1;
    }}
    *context = c;
    return {up}_OK;
}}

void {name}_context_destroy({name}_context *context) {{
    if (!context) return;
    egret_rt_pool_free(context->pool);
    free(context->arena);
    free(context->blocks);
    free(context);
}}

int {name}_context_threads(const {name}_context *context) {{
    return context ? (int)egret_rt_pool_threads(context->pool) : 0;
}}

int {name}_context_set_input_dims({name}_context *context, const int64_t *const *input_dims) {{
    int64_t s[N_DIMS + 1] = {{0}};
    int status;
    size_t i;
    if (!context || (N_INPUT && !input_dims)) return {up}_ERROR_INVALID_ARGUMENT;
    for (i = 0; i < N_INPUT; i++)
        if (!input_dims[i] && input_ranks[i] > 0) return {up}_ERROR_INVALID_ARGUMENT;
    context->error[0] = 0;
    if (N_DIMS == 0) return solve(context, input_dims, s);
    context->have_sizes = 0;
    status = solve(context, input_dims, s);
    if (status == {up}_OK) status = set_sizes(context, s);
    if (status != {up}_OK) return status;
    memcpy(context->dims, s, sizeof s);
    context->have_sizes = 1;
    return {up}_OK;
}}

const int64_t *{name}_context_input_dims(const {name}_context *context, size_t i) {{
    return context && context->have_sizes && i < N_INPUT ? context->input_dims + input_dim_at[i] : 0;
}}
size_t {name}_context_input_bytes(const {name}_context *context, size_t i) {{
    return context && context->have_sizes && i < N_INPUT ? context->input_bytes[i] : 0;
}}
const int64_t *{name}_context_output_dims(const {name}_context *context, size_t j) {{
    return context && context->have_sizes && j < N_OUTPUT ? context->output_dims + output_dim_at[j] : 0;
}}
size_t {name}_context_output_bytes(const {name}_context *context, size_t j) {{
    return context && context->have_sizes && j < N_OUTPUT ? context->output_bytes[j] : 0;
}}
const char *{name}_context_error(const {name}_context *context) {{ return context ? context->error : \"\"; }}

{name}_context *{name}_model_context({name}_model *model) {{ return model ? model->own : 0; }}

size_t {name}_num_dims(void) {{ return N_DIMS; }}
const char *{name}_dim_name(size_t i) {{ return i < N_DIMS ? dim_names[i] : 0; }}
int64_t {name}_dim_min(size_t i) {{ return i < N_DIMS ? dim_lo[i] : -1; }}
int64_t {name}_dim_max(size_t i) {{ return i < N_DIMS ? dim_hi[i] : -1; }}

"
    );
    let _ = write!(
        s,
        "int {name}_create({name}_model **model) {{
    {name}_model *m;
    int status;
    if (!model) return {up}_ERROR_INVALID_ARGUMENT;
    if (missing_cpu_feature()) return {up}_ERROR_UNSUPPORTED_CPU;
    if (weights_ready() != {up}_OK) return {up}_ERROR_WEIGHTS;
    m = ({name}_model *)calloc(1, sizeof *m);
    if (!m) return {up}_ERROR_OUT_OF_MEMORY;
    status = {name}_context_create(m, 1, &m->own);
    if (status != {up}_OK) {{
        free(m);
        return status;
    }}
    *model = m;
    return {up}_OK;
}}

void {name}_destroy({name}_model *model) {{
    if (!model) return;
    {name}_context_destroy(model->own);
    free(model);
}}

struct run {{
    const void *const *inputs;
    void *const *outputs;
    void *arena;
    const int64_t *words;
}};

static int run_plan(void *data) {{
    struct run *r = (struct run *)data;
    return {name}_run_plan(r->inputs, r->outputs, r->arena, r->words);
}}

int {name}_context_run({name}_context *context, const void *const *inputs, void *const *outputs) {{
    struct run r;
    size_t i;
    if (!context || (N_INPUT && !inputs) || (N_OUTPUT && !outputs)) return {up}_ERROR_INVALID_ARGUMENT;
    for (i = 0; i < N_INPUT; i++)
        if (!inputs[i]) return {up}_ERROR_INVALID_ARGUMENT;
    for (i = 0; i < N_OUTPUT; i++)
        if (!outputs[i]) return {up}_ERROR_INVALID_ARGUMENT;
    if (!context->have_sizes)
        return refuse(context, \"the context has no sizes: give it the inputs' dims first ({name}_context_set_input_dims)\");
    r.inputs = inputs;
    r.outputs = outputs;
    r.arena = context->arena;
    r.words = context->words;
    /* The pool runs the plan on one of its threads, where the kernels split. */
    return egret_rt_pool_run(context->pool, run_plan, &r);
}}

static int find(const char *const *names, size_t n, const char *name) {{
    size_t i;
    if (!name) return -1;
    for (i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0) return (int)i;
    return -1;
}}

int {name}_context_run_named({name}_context *context, size_t n_inputs, const char *const *in_names,
                             const void *const *inputs, size_t n_outputs, const char *const *out_names,
                             void *const *outputs) {{
    const void *in[N_INPUT + 1];
    void *out[N_OUTPUT + 1];
    size_t i;
    if (n_inputs != N_INPUT || n_outputs != N_OUTPUT) return {up}_ERROR_INVALID_ARGUMENT;
    if ((n_inputs && (!in_names || !inputs)) || (n_outputs && (!out_names || !outputs))) return {up}_ERROR_INVALID_ARGUMENT;
    memset((void *)in, 0, sizeof in);
    memset((void *)out, 0, sizeof out);
    for (i = 0; i < n_inputs; i++) {{
        int at = find(input_names, N_INPUT, in_names[i]);
        if (at < 0 || in[at]) return {up}_ERROR_INVALID_ARGUMENT;
        in[at] = inputs[i];
    }}
    for (i = 0; i < n_outputs; i++) {{
        int at = find(output_names, N_OUTPUT, out_names[i]);
        if (at < 0 || out[at]) return {up}_ERROR_INVALID_ARGUMENT;
        out[at] = outputs[i];
    }}
    return {name}_context_run(context, in, out);
}}

int {name}_run({name}_model *model, const void *const *inputs, void *const *outputs) {{
    if (!model) return {up}_ERROR_INVALID_ARGUMENT;
    return {name}_context_run(model->own, inputs, outputs);
}}

int {name}_run_named({name}_model *model, size_t n_inputs, const char *const *in_names, const void *const *inputs,
                     size_t n_outputs, const char *const *out_names, void *const *outputs) {{
    if (!model) return {up}_ERROR_INVALID_ARGUMENT;
    return {name}_context_run_named(model->own, n_inputs, in_names, inputs, n_outputs, out_names, outputs);
}}

const char *{name}_status_message(int status) {{
    switch (status) {{
    case {up}_OK: return \"ok\";
    case {up}_ERROR_INDEX_OUT_OF_RANGE: return \"an index is out of range for the axis it reads\";
    case {up}_ERROR_INVALID_ARGUMENT: return \"invalid argument: a null pointer, an unknown or repeated name, or a wrong count\";
    case {up}_ERROR_OUT_OF_MEMORY: return \"out of memory\";
    case {up}_ERROR_UNSUPPORTED_CPU: return \"this CPU lacks an instruction set extension the library was compiled for (see {name}_missing_cpu_feature; recompile with a lower --target-cpu)\";
    case {up}_ERROR_SHAPE: return \"the input dims do not fit the model, or the context has no sizes ({name}_context_error says which)\";
    case {up}_ERROR_WEIGHTS: return *weights_error() ? weights_error() : \"the weights file is missing or damaged\";
    default: return \"unknown status\";
    }}
}}

size_t {name}_num_inputs(void) {{ return N_INPUT; }}
const char *{name}_input_name(size_t i) {{ return i < N_INPUT ? input_names[i] : 0; }}
int {name}_input_index(const char *name) {{ return find(input_names, N_INPUT, name); }}
const char *{name}_input_dtype(size_t i) {{ return i < N_INPUT ? input_dtypes[i] : 0; }}
size_t {name}_input_rank(size_t i) {{ return i < N_INPUT ? input_ranks[i] : 0; }}
const int64_t *{name}_input_dims(size_t i) {{ return i < N_INPUT ? input_dims[i] : 0; }}
size_t {name}_input_bytes(size_t i) {{ return i < N_INPUT ? input_bytes[i] : 0; }}
size_t {name}_num_outputs(void) {{ return N_OUTPUT; }}
const char *{name}_output_name(size_t i) {{ return i < N_OUTPUT ? output_names[i] : 0; }}
int {name}_output_index(const char *name) {{ return find(output_names, N_OUTPUT, name); }}
const char *{name}_output_dtype(size_t i) {{ return i < N_OUTPUT ? output_dtypes[i] : 0; }}
size_t {name}_output_rank(size_t i) {{ return i < N_OUTPUT ? output_ranks[i] : 0; }}
const int64_t *{name}_output_dims(size_t i) {{ return i < N_OUTPUT ? output_dims[i] : 0; }}
size_t {name}_output_bytes(size_t i) {{ return i < N_OUTPUT ? output_bytes[i] : 0; }}
const char *{name}_input_dim_param(size_t i, size_t k) {{
    return i < N_INPUT && k < input_ranks[i] ? input_dim_params[i][k] : 0;
}}
const char *{name}_output_dim_param(size_t i, size_t k) {{
    return i < N_OUTPUT && k < output_ranks[i] ? output_dim_params[i][k] : 0;
}}
"
    );
    s
}

/// `egret compile --emit wgsl`: one `.wgsl` file per distinct kernel and a
/// `manifest.json` with the steps in order (kernel, dispatch size,
/// bindings, parameters), the buffer sizes and the host steps. Compiled for
/// the portable WebGPU limits, so it needs no device.
pub fn write_wgsl(model: &Path, out: &Path, opts: &CompileOptions) -> Result<Vec<PathBuf>, Error> {
    let c = bound_canonical(model, opts)?;
    let (gpu, shaders) = crate::wgsl_program(&c.graph, opts, Default::default())?;
    write_kernels(out, &gpu, &shaders, "wgsl")
}

/// `egret compile --emit ptx`: one `.ptx` module per distinct kernel and
/// the same `manifest.json` as `write_wgsl` (grid, block, shared memory and
/// parameters per step). Needs no GPU or CUDA install.
pub fn write_ptx(model: &Path, out: &Path, opts: &CompileOptions) -> Result<Vec<PathBuf>, Error> {
    let c = bound_canonical(model, opts)?;
    let gpu = crate::gpu_plan(&c.graph, opts, crate::PTX_LIMITS)?;
    let modules: Vec<String> = gpu.kernels.iter().map(egret_backends::gpu::ptx::print).collect();
    write_kernels(out, &gpu, &modules, "ptx")
}

fn write_kernels(
    out: &Path,
    gpu: &egret_backends::gpu::GpuPlan,
    shaders: &[String],
    extension: &str,
) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(out).map_err(|e| Error::Usage(format!("cannot create `{}`: {e}", out.display())))?;
    let mut written = Vec::new();
    let write = |path: PathBuf, text: &[u8], written: &mut Vec<PathBuf>| {
        std::fs::write(&path, text).map_err(|e| Error::Usage(format!("cannot write `{}`: {e}", path.display())))?;
        written.push(path);
        Ok::<(), Error>(())
    };
    for (i, (k, text)) in gpu.kernels.iter().zip(shaders).enumerate() {
        write(out.join(format!("k{i:03}_{}.{extension}", k.name)), text.as_bytes(), &mut written)?;
    }
    let manifest = serde_json::to_string_pretty(&gpu_manifest(gpu)).expect("JSON values print");
    write(out.join("manifest.json"), manifest.as_bytes(), &mut written)?;
    Ok(written)
}

/// What a runner needs besides the shaders, as JSON: see `write_wgsl`.
pub fn gpu_manifest(g: &egret_backends::gpu::GpuPlan) -> serde_json::Value {
    use egret_backends::gpu::{form::Space, wgsl::binding, Place, Step};
    let place = |p: &Place, t: &Type| {
        let space = match p.space {
            Space::Arena => "arena".to_string(),
            Space::Weights(c) => format!("weights{c}"),
            Space::WeightsSpan { first, chunks, .. } => format!("weights{first}..{}", first + chunks),
            Space::Params => "params".into(),
            Space::Error => "error".into(),
        };
        serde_json::json!({"space": space, "word": p.word, "type": t.to_string()})
    };
    let steps: Vec<serde_json::Value> = g
        .steps
        .iter()
        .map(|s| match s {
            Step::Dispatch { kernel, params, grid, label, kind, .. } => {
                let k = &g.kernels[*kernel];
                let bindings: Vec<u32> = k.spaces().into_iter().map(binding).collect();
                let shared_bytes: u32 = k.shared.iter().sum::<u32>() * 4;
                serde_json::json!({"dispatch": format!("k{kernel:03}_{}", k.name), "kernel": k.name, "kind": kind, "label": label,
                    "workgroups": grid, "threads": k.threads, "shared_bytes": shared_bytes, "bindings": bindings,
                    "params": params})
            }
            Step::Host { op, inputs, outputs, label } => serde_json::json!({
                "host": op.name(), "label": label,
                "inputs": inputs.iter().map(|(p, t)| place(p, t)).collect::<Vec<_>>(),
                "outputs": outputs.iter().map(|(p, t)| place(p, t)).collect::<Vec<_>>(),
            }),
        })
        .collect();
    serde_json::json!({
        "word_bytes": 4,
        // WGSL binding numbers; PTX takes the same spaces as .u64 kernel
        // parameters, in binding order.
        "bindings": {"arena": 0, "params": 1, "error": 2, "weights": "3 + chunk"},
        "arena_words": g.arena_words,
        "weight_chunk_words": g.weights.iter().map(|c| c.len()).collect::<Vec<_>>(),
        "inputs": g.inputs.iter().map(|(p, t)| place(p, t)).collect::<Vec<_>>(),
        "outputs": g.outputs.iter().map(|(p, t)| place(p, t)).collect::<Vec<_>>(),
        "steps": steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every extension Cranelift may enable has a CPUID entry, so that each
    /// `--target-cpu` (this host's too) can be checked at load time.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_target_cpus_features_have_a_cpuid_entry() {
        for name in TargetCpu::NAMES {
            let features = egret_backends::cpu::required_features(TargetCpu::parse(name).unwrap()).unwrap();
            for f in &features {
                assert!(cpuid_bit(f).is_some(), "{name}: no CPUID entry for `{f}`");
            }
        }
        let v3 = egret_backends::cpu::required_features(TargetCpu::X86_64V3).unwrap();
        assert!(v3.contains(&"has_avx2".to_string()) && v3.contains(&"has_avx".to_string()), "{v3:?}");
    }

    /// The generated code of a library with symbolic dims, reviewed like
    /// code: the C that solves and lays out the sizes (`sizes.rs`) and the
    /// driver that reads them (the object's last function).
    #[test]
    fn symbolic_size_code() {
        let text = "v0: f32[tokens,16] = input{name=\"x\"}
v1: f32[16,16] = input{name=\"w\"}
v2: f32[16] = input{name=\"bias\"}
v3: f32[tokens,16] = matmul v0, v1
v4: f32[tokens,16] = add v3, v2
v5: f32[2,past,4] = input{name=\"cache\"}
v6: f32[2,1,4] = input{name=\"new\"}
v7: f32[2,past + 1,4] = concat{axis=1} v5, v6
output \"y\" = v4
output \"present\" = v7
";
        let g = egret_ir::text::parse(text).unwrap();
        let plan = egret_backends::lower(&g, crate::lower_options(&CompileOptions::default())).unwrap();
        let object = egret_backends::cpu::object::compile_object(
            plan,
            "m",
            TargetCpu::X86_64V3,
            egret_backends::cpu::object::WeightsAt::Embedded,
        )
        .unwrap();
        let dims: Vec<sizes::DimInfo> =
            object.plan.symbols.iter().map(|s| sizes::DimInfo { name: s.clone(), lo: 0, hi: None }).collect();
        let io = |vs: Vec<(String, Type)>| vs;
        let inputs = io(g.inputs().iter().map(|&v| (g.input_name(v).to_string(), g.ty(v).clone())).collect());
        let outputs = io(g.outputs().iter().map(|(n, v)| (n.clone(), g.ty(*v).clone())).collect());
        let code =
            sizes::Sizes { plan: &object.plan, words: &object.words, dims: &dims, inputs: &inputs, outputs: &outputs };
        let driver = &object.clif[object.clif.rfind("\nfunction").unwrap() + 1..];
        insta::assert_snapshot!(format!("{}{}\n{driver}", code.defines(), code.source("m")));
    }

    /// The functions the header declares are the ones the version script
    /// exports: one added to the header and not to `API` would be hidden.
    #[test]
    fn the_exported_functions_are_the_headers() {
        let api = Api {
            name: "m",
            inputs: vec![],
            outputs: vec![],
            arena: 0,
            any_split: false,
            cpu: TargetCpu::Native,
            features: vec![],
            symbols: vec![],
            dims: vec![sizes::DimInfo { name: "batch".into(), lo: 1, hi: None }],
            size_defines: String::new(),
            size_code: String::new(),
            weights_code: String::new(),
            weights_beside: true,
        };
        let header = header(&api, Path::new("m.onnx"));
        let mut declared: Vec<String> = header
            .lines()
            .filter(|l| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*"))
            .flat_map(|l| {
                // Each identifier followed by `(`: a function declared.
                let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
                let mut called = Vec::new();
                let mut rest = l;
                while let Some(start) = rest.find(ident) {
                    let tail = &rest[start..];
                    let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
                    if tail[end..].starts_with('(') {
                        called.extend(tail[..end].strip_prefix("m_").map(String::from));
                    }
                    rest = &tail[end..];
                }
                called
            })
            .collect();
        declared.sort();
        declared.dedup();
        let mut exported: Vec<String> = API.iter().map(|f| f.to_string()).collect();
        exported.sort();
        assert_eq!(declared, exported);
        let script = version_script("m");
        assert!(script.contains("    m_context_run;\n") && script.contains("local: *;"), "{script}");
    }
}

/// The model imported and optimised with every dim known: the manifest of
/// written GPU kernels holds each step's parameter words and grid.
fn bound_canonical(model: &Path, opts: &CompileOptions) -> Result<crate::Canonical, Error> {
    let c = canonical(model, opts)?;
    let free = c.graph.symbols();
    if !free.is_empty() {
        let flags: Vec<String> = free.iter().map(|s| format!("--dim {s}=N")).collect();
        return Err(Error::Usage(format!(
            "the model's dims {} are symbolic, and the GPU kernels and manifest `--emit wgsl` and `--emit ptx` write are for known sizes: give them values ({})",
            free.join(", "),
            flags.join(" ")
        )));
    }
    Ok(c)
}
