use std::fmt;

/// An error about one node of the graph: which node, which op, and what is wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct IrError {
    pub node: String,
    pub op: String,
    pub message: String,
}

impl IrError {
    pub fn new(node: &str, op: &str, message: impl Into<String>) -> IrError {
        IrError { node: node.to_string(), op: op.to_string(), message: message.into() }
    }
}

impl fmt::Display for IrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node `{}` ({}): {}", self.node, self.op, self.message)
    }
}

impl std::error::Error for IrError {}
