//! Ahead-of-time compilation: `egret compile MODEL -o DIR`.
//!
//! The backend writes the plan as an object file whose driver runs every
//! kernel on caller buffers (see `backends::cpu::object`). This module adds
//! the C API around it: a header documenting the model's inputs and outputs,
//! and a small generated C file with create/destroy (which own the working
//! memory), positional and named runs, metadata queries and status
//! messages. `cc` links the two into `libNAME.so` with the weights embedded,
//! so a caller needs a C compiler and nothing from Rust.

use crate::{canonical, CompileOptions, Error};
use egret_backends::plan::MatMulImpl;
use egret_ir::Type;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What `egret compile` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    /// `libNAME.so` and `NAME.h`.
    SharedLibrary,
    /// `NAME.o`, `NAME_api.c` and `NAME.h`, to link yourself.
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
    let c = canonical(model, opts)?;
    if let Some((input, _)) = c.specialized.first() {
        return Err(Error::Usage(format!(
            "input `{input}` sets a shape, so the model was specialised on its value; ahead-of-time libraries need every shape fixed by the model or by --dim"
        )));
    }
    // Everything in the object must be generated code: no library GEMM.
    let lower = egret_backends::LowerOptions { matmul: Some(MatMulImpl::Generated), ..crate::lower_options(opts) };
    let plan = egret_backends::lower(&c.graph, lower)?;
    let object = egret_backends::cpu::object::compile_object(&plan, name).map_err(|e| Error::Codegen(e.to_string()))?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::Usage(format!("cannot create `{}`: {e}", out_dir.display())))?;
    let inputs: Vec<(String, Type)> =
        c.graph.inputs().iter().map(|&v| (c.graph.input_name(v).to_string(), c.graph.ty(v).clone())).collect();
    let outputs: Vec<(String, Type)> =
        c.graph.outputs().iter().map(|(n, v)| (n.clone(), c.graph.ty(*v).clone())).collect();
    let header = header(name, model, &inputs, &outputs, plan.arena_bytes);
    let api = api_source(name, &inputs, &outputs, plan.arena_bytes);
    let mut written = Vec::new();
    match emit {
        Emit::Clif => {
            let p = out_dir.join(format!("{name}.clif"));
            write(&p, &object.clif)?;
            written.push(p);
        }
        Emit::Object => {
            for (file, bytes) in [
                (format!("{name}.o"), object.bytes.clone()),
                (format!("{name}_api.c"), api.into_bytes()),
                (format!("{name}.h"), header.into_bytes()),
            ] {
                let p = out_dir.join(file);
                write(&p, bytes)?;
                written.push(p);
            }
        }
        Emit::SharedLibrary => {
            // The object and the C shim are intermediate: build in a scratch folder.
            let scratch = out_dir.join(format!(".{name}.build"));
            std::fs::create_dir_all(&scratch)
                .map_err(|e| Error::Usage(format!("cannot create `{}`: {e}", scratch.display())))?;
            let h = out_dir.join(format!("{name}.h"));
            write(&h, &header)?;
            write(&scratch.join(format!("{name}.h")), &header)?;
            let o = scratch.join(format!("{name}.o"));
            write(&o, &object.bytes)?;
            let api_c = scratch.join(format!("{name}_api.c"));
            write(&api_c, &api)?;
            let so = out_dir.join(format!("lib{name}.so"));
            link(&so, &api_c, &o)?;
            let _ = std::fs::remove_dir_all(&scratch);
            written.extend([so, h]);
        }
    }
    Ok(written)
}

/// `cc -shared` the object and the C shim into a shared library.
fn link(so: &Path, api_c: &Path, object: &Path) -> Result<(), Error> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(so)
        .arg(api_c)
        .arg(object)
        .arg("-lm")
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

fn header(name: &str, model: &Path, inputs: &[(String, Type)], outputs: &[(String, Type)], arena: usize) -> String {
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
 * Usage: create an instance, run it on buffers, destroy it. Buffers are
 * dense row-major arrays of the listed element types and shapes. An
 * instance owns its working memory, so it can run on one thread at a time;
 * make one instance per thread to run in parallel. Every function that can
 * fail returns a status: 0 on success, otherwise one of the codes below
 * (NAME_status_message turns it into text).
 *
 * Inputs:\n",
    );
    for (i, (n, t)) in inputs.iter().enumerate() {
        let _ = writeln!(s, " *   {i}: \"{n}\" {}", shape_text(t));
    }
    s.push_str(" * Outputs:\n");
    for (i, (n, t)) in outputs.iter().enumerate() {
        let _ = writeln!(s, " *   {i}: \"{n}\" {}", shape_text(t));
    }
    let _ = writeln!(s, " * Working memory per instance: {arena} bytes.\n */");
    let _ = write!(
        s,
        "#ifndef {up}_H
#define {up}_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern \"C\" {{
#endif

#define {up}_OK 0
/* A gather read an index outside its axis. */
#define {up}_ERROR_INDEX_OUT_OF_RANGE 1
/* A null pointer, an unknown or missing name, or a count that does not match. */
#define {up}_ERROR_INVALID_ARGUMENT 2
#define {up}_ERROR_OUT_OF_MEMORY 3

typedef struct {name}_model {name}_model;

/* Allocates an instance in *model. */
int {name}_create({name}_model **model);
/* Frees an instance (a null pointer is ignored). */
void {name}_destroy({name}_model *model);

/* Runs on positional buffers: inputs[i] and outputs[j] in the order above. */
int {name}_run({name}_model *model, const void *const *inputs, void *const *outputs);
/* Runs on named buffers: every input and output must be named exactly once. */
int {name}_run_named({name}_model *model, size_t n_inputs, const char *const *input_names, const void *const *inputs,
                     size_t n_outputs, const char *const *output_names, void *const *outputs);

/* A description of a status code. */
const char *{name}_status_message(int status);

/* Metadata. Indexes run from 0; *_index returns -1 for an unknown name.
 * dtype is one of f32 f64 i8 i16 i32 i64 u8 u16 u32 u64 bool. */
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

#ifdef __cplusplus
}}
#endif

#endif
"
    );
    s
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
        let dims = if t.shape.is_empty() {
            "0".to_string()
        } else {
            t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(s, "static const int64_t {side}_dims_{i}[] = {{{dims}}};");
    }
    let _ = writeln!(s, "#define N_{} {n}", side.to_uppercase());
    let _ = writeln!(s, "static const char *const {side}_names[] = {{{}}};", list(&|(n, _)| c_string(n)));
    let _ = writeln!(s, "static const char *const {side}_dtypes[] = {{{}}};", list(&|(_, t)| c_string(t.dtype.name())));
    let _ = writeln!(s, "static const size_t {side}_ranks[] = {{{}}};", list(&|(_, t)| t.rank().to_string()));
    let _ = writeln!(
        s,
        "static const size_t {side}_bytes[] = {{{}}};",
        list(&|(_, t)| (t.numel() * t.dtype.size_bytes()).to_string())
    );
    let dims_ptrs = if items.is_empty() {
        "0".to_string()
    } else {
        (0..n).map(|i| format!("{side}_dims_{i}")).collect::<Vec<_>>().join(", ")
    };
    let _ = writeln!(s, "static const int64_t *const {side}_dims[] = {{{dims_ptrs}}};");
    s
}

fn api_source(name: &str, inputs: &[(String, Type)], outputs: &[(String, Type)], arena: usize) -> String {
    let up = name.to_uppercase();
    let mut s = format!(
        "/* Generated by egret: the C API around {name}_run_plan. */
#include \"{name}.h\"
#include <stdlib.h>
#include <string.h>

/* Runs every kernel on the caller's buffers; defined in the object file. */
extern int {name}_run_plan(const void *const *inputs, void *const *outputs, void *arena);

#define ARENA_BYTES ((size_t){arena})

struct {name}_model {{
    void *arena;
}};

"
    );
    s.push_str(&tables("input", inputs));
    s.push_str(&tables("output", outputs));
    let _ = write!(
        s,
        "
int {name}_create({name}_model **model) {{
    if (!model) return {up}_ERROR_INVALID_ARGUMENT;
    {name}_model *m = ({name}_model *)malloc(sizeof *m);
    if (!m) return {up}_ERROR_OUT_OF_MEMORY;
    /* 64-byte alignment matches the memory plan; aligned_alloc wants a multiple of it. */
    m->arena = aligned_alloc(64, ARENA_BYTES == 0 ? 64 : (ARENA_BYTES + 63) / 64 * 64);
    if (!m->arena) {{
        free(m);
        return {up}_ERROR_OUT_OF_MEMORY;
    }}
    *model = m;
    return {up}_OK;
}}

void {name}_destroy({name}_model *model) {{
    if (!model) return;
    free(model->arena);
    free(model);
}}

int {name}_run({name}_model *model, const void *const *inputs, void *const *outputs) {{
    size_t i;
    if (!model || (N_INPUT && !inputs) || !outputs) return {up}_ERROR_INVALID_ARGUMENT;
    for (i = 0; i < N_INPUT; i++)
        if (!inputs[i]) return {up}_ERROR_INVALID_ARGUMENT;
    for (i = 0; i < N_OUTPUT; i++)
        if (!outputs[i]) return {up}_ERROR_INVALID_ARGUMENT;
    return {name}_run_plan(inputs, outputs, model->arena);
}}

static int find(const char *const *names, size_t n, const char *name) {{
    size_t i;
    if (!name) return -1;
    for (i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0) return (int)i;
    return -1;
}}

int {name}_run_named({name}_model *model, size_t n_inputs, const char *const *in_names, const void *const *inputs,
                     size_t n_outputs, const char *const *out_names, void *const *outputs) {{
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
    return {name}_run(model, in, out);
}}

const char *{name}_status_message(int status) {{
    switch (status) {{
    case {up}_OK: return \"ok\";
    case {up}_ERROR_INDEX_OUT_OF_RANGE: return \"an index is out of range for the axis it reads\";
    case {up}_ERROR_INVALID_ARGUMENT: return \"invalid argument: a null pointer, an unknown or repeated name, or a wrong count\";
    case {up}_ERROR_OUT_OF_MEMORY: return \"out of memory\";
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
"
    );
    s
}

/// `egret compile --emit wgsl`: one `.wgsl` file per distinct kernel and a
/// `manifest.json` with the steps in order (kernel, dispatch size,
/// bindings, parameters), the buffer sizes and the host steps. Compiled for
/// the portable WebGPU limits, so it needs no device.
pub fn write_wgsl(model: &Path, out: &Path, opts: &CompileOptions) -> Result<Vec<PathBuf>, Error> {
    let c = canonical(model, opts)?;
    let (gpu, shaders) = crate::wgsl_program(&c.graph, opts, Default::default())?;
    write_kernels(out, &gpu, &shaders, "wgsl")
}

/// `egret compile --emit ptx`: one `.ptx` module per distinct kernel and
/// the same `manifest.json` as `write_wgsl` (grid, block, shared memory and
/// parameters per step). Needs no GPU or CUDA install.
pub fn write_ptx(model: &Path, out: &Path, opts: &CompileOptions) -> Result<Vec<PathBuf>, Error> {
    let c = canonical(model, opts)?;
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
