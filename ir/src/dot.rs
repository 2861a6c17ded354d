//! Graphviz output: one box per op, values as edges labelled with types.

use crate::graph::Graph;
use crate::op::Op;
use std::fmt::Write as _;

/// The graph in Graphviz's dot language. Fused ops are filled, constants
/// and inputs are drawn as small ellipses.
pub fn to_dot(g: &Graph, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "digraph egret {{\n  label={title:?};\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];"
    );
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(e) => return format!("// cannot draw: {e}\n"),
    };
    for n in &order {
        let node = g.node(*n);
        let (label, style) = match &node.op {
            Op::Input { name } => (format!("input {name}"), "shape=ellipse"),
            Op::Const(t) => (format!("const {}", t.ty()), "shape=ellipse, fontsize=8, color=gray"),
            op => {
                let mut attrs = String::new();
                op.write_attrs(&mut attrs);
                let fused = matches!(
                    op,
                    Op::Attention { .. }
                        | Op::AttentionTiled { .. }
                        | Op::LayerNorm { .. }
                        | Op::RmsNorm { .. }
                        | Op::ResidualNorm { .. }
                        | Op::Gelu { .. }
                        | Op::Silu
                        | Op::Softmax { .. }
                );
                (format!("{}{attrs}", op.name()), if fused { "style=filled, fillcolor=lightblue" } else { "" })
            }
        };
        let _ = writeln!(s, "  {n} [label={label:?}, {style}];");
    }
    for n in &order {
        for v in &g.node(*n).inputs {
            let _ = writeln!(s, "  {} -> {n} [label={:?}, fontsize=8];", g.producer(*v), g.ty(*v).to_string());
        }
    }
    for (name, v) in g.outputs() {
        let _ = writeln!(s, "  {name:?} [shape=doubleoctagon];\n  {} -> {name:?};", g.producer(*v));
    }
    s.push_str("}\n");
    s
}
