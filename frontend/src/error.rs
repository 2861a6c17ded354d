use std::path::PathBuf;

/// Why a model could not be imported. Every variant names what is wrong: the
/// file, the node, the op, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    // The I/O error is part of the message, not a `source`: callers print
    // error chains, which would repeat it.
    #[error("cannot read `{path}`: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("`{path}` is not a valid ONNX model: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("the model has no graph")]
    NoGraph,
    #[error("unsupported op `{op}` (domain `{domain}`, opset {opset}) at node `{node}`")]
    UnsupportedOp { op: String, domain: String, opset: i64, node: String },
    #[error("node `{node}` ({op}, opset {opset}): {message}")]
    Node { node: String, op: String, opset: i64, message: String },
    #[error("tensor `{tensor}`: {message}")]
    Tensor { tensor: String, message: String },
    #[error("input `{input}`: {message}")]
    Input { input: String, message: String },
    #[error("node `{node}` reads `{name}`, which no node, initializer or graph input defines")]
    Undefined { node: String, name: String },
    #[error("the graph has a cycle through node `{node}`")]
    Cycle { node: String },
    #[error("graph output `{name}` is not produced by any node, initializer or input")]
    UndefinedOutput { name: String },
    #[error("the model imports opset {version} of the default domain; Egret supports opsets {min} to {max}")]
    Opset { version: i64, min: i64, max: i64 },
    /// An op needs the value of these graph inputs at compile time (a shape,
    /// axes, ...). Callers that know the values can specialise on them.
    #[error("node `{node}` ({op}) needs the value of graph input(s) {} at compile time", inputs.join(", "))]
    NeedsInputValue { node: String, op: String, inputs: Vec<String> },
}

impl ImportError {
    pub(crate) fn tensor(tensor: &str, message: impl Into<String>) -> ImportError {
        ImportError::Tensor { tensor: tensor.to_string(), message: message.into() }
    }
}
