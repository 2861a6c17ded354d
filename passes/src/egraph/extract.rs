//! DAG-aware extraction and rebuilding a graph from it.
//!
//! Tree-cost extraction pays for a shared sub-expression once per user,
//! which would make a fused kernel that recomputes a shared value look as
//! cheap as reusing it. Here a class's cost is the sum of the node costs of
//! the distinct classes its choice depends on (a greedy fixpoint, in the
//! style of extraction-gym's "faster greedy DAG"), so sharing is paid once.
//! The classes a choice depends on are a bit set, merged a word at a time.

use super::rules::tiling::{balanced, ATTENTION_BLOCKS, ATTENTION_KEY_BLOCKS};
use super::{op_of, TGraph, TNode};
use egg::Id;
use egret_ir::op::MatMulTiling;
use egret_ir::{Graph, IrError, Op, ValueId};
use std::collections::HashMap;

/// Multiply-adds per unit of cost (a unit is about one pass of one element)
/// for each way to compute a product, and what each call costs besides.
/// Calibrated by `cargo bench --bench matmul` on an AVX-512 host (see
/// BENCHMARKS.md): the packed tile runs at about 200 GFLOP/s, the library
/// at about 170, the generated f32x4 tile at about 38; the library packs
/// both operands on every call and costs a few microseconds to set up.
const PACKED_MACS_PER_UNIT: f64 = 19.0;
const LIBRARY_MACS_PER_UNIT: f64 = 16.0;
const GENERATED_MACS_PER_UNIT: f64 = 3.6;
const LIBRARY_CALL_UNITS: f64 = 6000.0;

/// What one tile of the attention kernel costs besides its arithmetic: two
/// GEMM calls' setup, and packing the tile's operands (the K and V blocks,
/// the queries and the probabilities), per element. Calibrated on
/// deit_tiny's attention (`egret bench --profile`, one thread, 36 heads of
/// 197 x 197 x 64): 16-row tiles cost 3.9 ms, 64-row 3.0 ms, whole-head
/// 2.6 ms, about 3 us per extra tile, nearly all of it repacking the
/// 197-key K and V blocks.
const ATTENTION_TILE_UNITS: f64 = 500.0;
const PACK_UNITS_PER_ELEMENT: f64 = 0.4;

/// The cost of an attention computed in `block x key_block` tiles: its two
/// products at the library's rate over the scores the kernel computes (with
/// a constant mask, only each query block's live keys) and one pass over
/// the output (no pass over the scores: the unfused chain writes them three
/// times), plus what these tiles' setup and packing cost beyond the least
/// of the candidates' (`rules::tiling`): the overhead ranks the tilings
/// against each other without making a small attention look dearer than
/// the chain it fuses.
fn attention_cost(
    egraph: &TGraph,
    n: &TNode,
    first: usize,
    data: &super::Info,
    block: usize,
    key_block: usize,
    mask_spans: &MaskSpans,
) -> Option<f64> {
    let dims = |i: usize| n.children.get(first + i).and_then(|&c| egraph[c].data.ty()).map(|t| t.estimated_shape());
    let (q, kt) = (dims(0)?, dims(1)?);
    let (sq, d, sk) = (q[q.len() - 2], q[q.len() - 1] as f64, kt[kt.len() - 1]);
    let numel = data.ty()?.estimated_numel() as f64;
    let dv = data.ty()?.shape.last().map_or(1, |d| d.estimate()) as f64;
    let batch = numel / (sq as f64 * dv).max(1.0);
    let spans = n.children.get(first + 3).and_then(|&m| mask_spans.get(&egraph.find(m))).filter(|s| s.len() == sq);
    // Per query block: its rows and the keys it visits.
    let blocks = |block: usize| -> Vec<(f64, f64)> {
        (0..sq)
            .step_by(block.max(1))
            .map(|row0| {
                let end = sq.min(row0 + block);
                let keys = spans.map_or(sk, |s| {
                    let (lo, hi) = egret_ir::ops::linalg::block_key_span(&s[row0..end]);
                    hi - lo
                });
                ((end - row0) as f64, keys as f64)
            })
            .collect()
    };
    let scores = |block: usize| blocks(block).iter().map(|(rows, keys)| rows * keys).sum::<f64>();
    // Every tile's setup and packing, and the online softmax rescaling the
    // output rows once per key block after the first.
    let overhead = |block: usize, key_block: usize| {
        let key_block = key_block.max(1) as f64;
        blocks(block)
            .iter()
            .map(|&(rows, keys)| {
                let key_blocks = (keys / key_block).ceil().max(1.0);
                let tile_keys = key_block.min(keys);
                let per_tile =
                    ATTENTION_TILE_UNITS + PACK_UNITS_PER_ELEMENT * ((d + dv) * tile_keys + rows * (d + tile_keys));
                batch * (key_blocks * per_tile + (key_blocks - 1.0) * rows * dv)
            })
            .sum::<f64>()
    };
    let least_overhead = ATTENTION_BLOCKS
        .iter()
        .flat_map(|&b| ATTENTION_KEY_BLOCKS.iter().map(move |&k| (b, k)))
        .map(|(b, k)| overhead(balanced(sq, b), balanced(sk, k)))
        .fold(f64::INFINITY, f64::min);
    let (block, key_block) = (block.clamp(1, sq.max(1)), key_block.clamp(1, sk.max(1)));
    let arithmetic = batch * scores(block) * (d + dv) / LIBRARY_MACS_PER_UNIT;
    Some(arithmetic + numel + (overhead(block, key_block) - least_overhead).max(0.0))
}

/// Per mask e-class: the live key span of each query row, for the constant
/// masks whose masked-out keys the kernel can skip (`live_key_spans`, the
/// hull over the mask's batch slices).
type MaskSpans = HashMap<Id, Vec<(usize, usize)>>;

/// The spans of every constant mask some attention reads.
fn mask_spans(egraph: &TGraph) -> MaskSpans {
    let mut out = MaskSpans::new();
    for class in egraph.classes() {
        for n in &class.nodes {
            let Some((Op::Attention { .. } | Op::AttentionTiled { .. }, first)) = op_of(egraph, n) else { continue };
            let (Some(&q), Some(&kt), Some(&m)) =
                (n.children.get(first), n.children.get(first + 1), n.children.get(first + 3))
            else {
                continue;
            };
            let m = egraph.find(m);
            if out.contains_key(&m) {
                continue;
            }
            let (Some(qt), Some(ktt)) = (egraph[q].data.ty(), egraph[kt].data.ty()) else { continue };
            let (Some(sq), Some(sk)) = (qt.shape[qt.shape.len() - 2].size(), ktt.shape[ktt.shape.len() - 1].size())
            else {
                continue;
            };
            if let Some(spans) = egraph[m].data.value.as_deref().and_then(|t| constant_mask_spans(t, sq, sk)) {
                out.insert(m, spans);
            }
        }
    }
    out
}

/// Row spans of a constant f32 mask broadcast to `[.., sq, sk]`: the hull,
/// row by row, over its leading (batch) slices.
fn constant_mask_spans(t: &egret_ir::Tensor, sq: usize, sk: usize) -> Option<Vec<(usize, usize)>> {
    let values = t.as_f32()?;
    let shape = t.shape();
    let rank = shape.len();
    let dim = |back: usize| if rank >= back { shape[rank - back] } else { 1 };
    let (rows, cols) = (dim(2), dim(1));
    if (rows != 1 && rows != sq) || (cols != 1 && cols != sk) {
        return None;
    }
    let slice = rows * cols;
    let mut hull: Option<Vec<(usize, usize)>> = None;
    for at in (0..values.len()).step_by(slice.max(1)) {
        let read = |r: usize, k: usize| values[at + (r % rows) * cols + k % cols];
        let spans = egret_ir::ops::linalg::live_key_spans(read, sq, sk)?;
        hull = Some(match hull {
            None => spans,
            Some(h) => h.iter().zip(&spans).map(|(&(a, b), &(c, d))| (a.min(c), b.max(d))).collect(),
        });
    }
    hull
}

/// The roofline-style cost of a product `[.., m, k] @ [.., k, n]` with
/// `numel` output elements computed by `tiling`: its multiply-adds at the
/// tiling's rate, one pass over the output, and for the library one call
/// per batch plus packing both operands each time.
fn matmul_cost(egraph: &TGraph, n: &TNode, first: usize, numel: f64, tiling: MatMulTiling) -> Option<f64> {
    let shape = |i: usize| n.children.get(first + i).and_then(|&c| egraph[c].data.ty()).map(|t| t.estimated_shape());
    let (a, b) = (shape(0)?, shape(1)?);
    let k = *a.last()? as f64;
    let n_cols = if b.len() >= 2 { b[b.len() - 1] as f64 } else { 1.0 };
    let m = if a.len() >= 2 { a[a.len() - 2] as f64 } else { 1.0 };
    let batches = (numel / (m * n_cols).max(1.0)).max(1.0);
    let macs = numel * k;
    Some(match tiling {
        MatMulTiling::Packed => numel + macs / PACKED_MACS_PER_UNIT,
        MatMulTiling::Generated4x8 => numel + macs / GENERATED_MACS_PER_UNIT,
        MatMulTiling::Library => {
            numel + macs / LIBRARY_MACS_PER_UNIT + batches * (LIBRARY_CALL_UNITS + k * (m + n_cols))
        }
    })
}

/// The cost of computing one e-node, in units of "one pass over its output";
/// `None` for nodes that are not values (ill-typed, attribute leaves).
fn node_cost(egraph: &TGraph, n: &TNode, data: &super::Info, mask_spans: &MaskSpans) -> Option<f64> {
    let name = n.op.as_str();
    if name.starts_with("input:") || name.starts_with("const:") || name == "out" {
        return Some(0.0);
    }
    if name.starts_with('{') {
        return None;
    }
    let (op, first) = op_of(egraph, n)?;
    // Every input must be a value: ill-typed nodes from rules are never chosen.
    if n.children[first..].iter().any(|&c| egraph[c].data.ty().is_none()) {
        return None;
    }
    let numel = data.ty()?.estimated_numel() as f64;
    let input_numel = |i: usize| {
        n.children.get(first + i).and_then(|&c| egraph[c].data.ty()).map_or(0.0, |t| t.estimated_numel() as f64)
    };
    Some(
        match op {
            Op::Reshape { .. } | Op::Identity => 0.0,
            // Views: free where the consumer takes strides, a copy otherwise.
            Op::Transpose { .. } | Op::Slice { .. } | Op::Expand { .. } | Op::Split { .. } => 0.1 * numel,
            // A plain product costs what the library would, plus one: where a
            // tiled alternative exists, it wins ties.
            Op::MatMul => matmul_cost(egraph, n, first, numel, MatMulTiling::Library)? + 1.0,
            Op::MatMulTiled { tiling } => matmul_cost(egraph, n, first, numel, tiling)?,
            // Attention as lowering tiles it by default, plus one: where tiled
            // alternatives exist, they win ties.
            Op::Attention { .. } => {
                let sk = n.children.get(first + 1).and_then(|&c| egraph[c].data.ty())?.shape.last()?.estimate();
                attention_cost(egraph, n, first, data, 64, balanced(sk, 512), mask_spans)? + 1.0
            }
            Op::AttentionTiled { block, key_block, .. } => {
                attention_cost(egraph, n, first, data, block, key_block, mask_spans)?
            }
            // Fused kernels: one pass over their output.
            Op::Gelu { .. } | Op::Silu | Op::Softmax { .. } | Op::LayerNorm { .. } | Op::RmsNorm { .. } => numel,
            // It replaces the residual add and the norm (two passes): priced
            // below the add alone, so the class of the sum picks its output 1
            // too and the sum is not computed twice.
            Op::ResidualNorm { .. } => 0.9 * numel,
            Op::Reduce { .. } => input_numel(0),
            _ => numel,
        } + 1.0,
    )
}

/// Above this many classes (the default `Limits::dag_classes`) the
/// reachable sets below would take too much memory (a bit per class per
/// class: 32 MiB here), and extraction falls back to tree costs. Only a
/// runaway saturation gets there: a 48-layer LLaMA export has about 4,000
/// classes.
pub const MAX_DAG_CLASSES: usize = 16_384;

struct Best {
    /// The classes the choice depends on, itself included: one bit per
    /// class, by dense index (empty for tree costs).
    reach: Vec<u64>,
    /// How many bits `reach` has set.
    size: usize,
    total: f64,
    node: TNode,
}

/// The chosen e-node of every class reachable from `roots`, and whether the
/// costs were DAG-aware (at most `dag_classes` classes).
pub fn extract(egraph: &TGraph, roots: &[Id], dag_classes: usize) -> (HashMap<Id, TNode>, bool) {
    let dag = egraph.number_of_classes() <= dag_classes;
    let index: HashMap<Id, usize> = egraph.classes().enumerate().map(|(i, c)| (c.id, i)).collect();
    let words = if dag { index.len().div_ceil(64) } else { 0 };
    // The node cost of each class's current choice, by dense index.
    let mut own = vec![0.0f64; index.len()];
    let mut best: HashMap<Id, Best> = HashMap::new();
    let mask_spans = mask_spans(egraph);
    // Attribute leaves are not values but every op needs them as they are.
    for class in egraph.classes() {
        if let Some(n) = class.nodes.iter().find(|n| n.op.as_str().starts_with('{')) {
            best.insert(class.id, Best { reach: vec![0; words], size: 0, total: 0.0, node: n.clone() });
        }
    }
    // A worklist over classes: when a class's best improves, its parents
    // are looked at again, so costs flow up however deep the graph is.
    let mut parents: HashMap<Id, Vec<Id>> = HashMap::new();
    for class in egraph.classes() {
        for n in &class.nodes {
            for c in &n.children {
                parents.entry(egraph.find(*c)).or_default().push(class.id);
            }
        }
    }
    let mut queue: std::collections::VecDeque<Id> = egraph.classes().map(|c| c.id).collect();
    let mut queued: std::collections::HashSet<Id> = queue.iter().copied().collect();
    while let Some(id) = queue.pop_front() {
        queued.remove(&id);
        let class = &egraph[id];
        let me = index[&id];
        let mut improved = false;
        for n in &class.nodes {
            let Some(cost) = node_cost(egraph, n, &class.data, &mask_spans) else { continue };
            let Some(kids) = n.children.iter().map(|c| best.get(&egraph.find(*c))).collect::<Option<Vec<&Best>>>()
            else {
                continue;
            };
            let candidate = if dag { dag_cost(&kids, &own, me, cost) } else { tree_cost(&kids, cost) };
            let Some((reach, size, total)) = candidate else { continue }; // a cycle back to this class
            if best.get(&id).is_none_or(|b| total < b.total - 1e-9) {
                best.insert(id, Best { reach, size, total, node: n.clone() });
                own[me] = cost;
                improved = true;
            }
        }
        if improved {
            for &p in parents.get(&id).map(|v| v.as_slice()).unwrap_or(&[]) {
                if queued.insert(p) {
                    queue.push_back(p);
                }
            }
        }
    }
    let mut out = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| egraph.find(*r)).collect();
    while let Some(c) = stack.pop() {
        if out.contains_key(&c) {
            continue;
        }
        if let Some(b) = best.get(&c) {
            stack.extend(b.node.children.iter().map(|x| egraph.find(*x)));
            out.insert(c, b.node.clone());
        }
    }
    (out, dag)
}

/// The classes a node with these children's choices depends on (with
/// class `me`, whose own cost is `cost`), their count and their summed
/// costs; `None` if a child depends on `me` (a cycle). Starts from the
/// child that reaches the most classes and adds the others' bits a word
/// at a time, so a long chain costs a pass over the bits per node rather
/// than one per class it reaches.
fn dag_cost(kids: &[&Best], own: &[f64], me: usize, cost: f64) -> Option<(Vec<u64>, usize, f64)> {
    let base = kids.iter().enumerate().max_by_key(|(i, b)| (b.size, std::cmp::Reverse(*i))).map(|(i, _)| i);
    let (mut reach, mut size, mut total) = match base {
        Some(i) => (kids[i].reach.clone(), kids[i].size, kids[i].total),
        None => (vec![0; own.len().div_ceil(64)], 0, 0.0),
    };
    for (i, kid) in kids.iter().enumerate() {
        if Some(i) == base {
            continue;
        }
        for (w, (r, &o)) in reach.iter_mut().zip(&kid.reach).enumerate() {
            let mut new = o & !*r;
            *r |= o;
            while new != 0 {
                size += 1;
                total += own[w * 64 + new.trailing_zeros() as usize];
                new &= new - 1;
            }
        }
    }
    let bit = 1u64 << (me % 64);
    if reach[me / 64] & bit != 0 {
        return None;
    }
    reach[me / 64] |= bit;
    Some((reach, size + 1, total + cost))
}

/// Tree cost: the node's own plus its children's, shared or not.
fn tree_cost(kids: &[&Best], cost: f64) -> Option<(Vec<u64>, usize, f64)> {
    Some((Vec::new(), 0, cost + kids.iter().map(|k| k.total).sum::<f64>()))
}

/// Builds the graph the choices describe. Inputs keep the original order.
pub fn rebuild(
    egraph: &TGraph,
    choice: &HashMap<Id, TNode>,
    original: &Graph,
    roots: &[(String, Id)],
) -> Result<Graph, IrError> {
    let mut g = Graph::new();
    let mut inputs: HashMap<String, ValueId> = HashMap::new();
    for &v in original.inputs() {
        let name = original.input_name(v).to_string();
        inputs.insert(name.clone(), g.add_input(&name, original.ty(v).clone()));
    }
    let mut memo: HashMap<Id, Vec<ValueId>> = HashMap::new();
    for (name, root) in roots {
        let v = build(egraph, choice, &mut g, &inputs, &mut memo, egraph.find(*root))?;
        g.set_output(name, v[0]);
    }
    egret_ir::verify(&g)?;
    Ok(g)
}

fn build(
    egraph: &TGraph,
    choice: &HashMap<Id, TNode>,
    g: &mut Graph,
    inputs: &HashMap<String, ValueId>,
    memo: &mut HashMap<Id, Vec<ValueId>>,
    class: Id,
) -> Result<Vec<ValueId>, IrError> {
    if let Some(v) = memo.get(&class) {
        return Ok(v.clone());
    }
    let err = |m: String| IrError::new("e-graph", "extract", m);
    let n = choice
        .get(&class)
        .ok_or_else(|| {
            let show = |c: Id| -> String {
                let d = &egraph[c].data;
                let ns: Vec<String> = egraph[c].nodes.iter().map(|n| n.op.to_string()).collect();
                format!("[{c} ty={:?} nodes={}]", d.ty().map(|t| t.to_string()), ns.join("|"))
            };
            let nodes: Vec<String> = egraph[class]
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "{}({})",
                        n.op,
                        n.children.iter().map(|&c| show(egraph.find(c))).collect::<Vec<_>>().join(", ")
                    )
                })
                .collect();
            err(format!("no choice for e-class {class}: {}", nodes.join(" ")))
        })?
        .clone();
    let name = n.op.as_str();
    let values = if let Some(input) = name.strip_prefix("input:") {
        vec![*inputs.get(input).ok_or_else(|| err(format!("unknown input `{input}`")))?]
    } else if let Some(k) = name.strip_prefix("const:") {
        let t = k
            .parse::<usize>()
            .ok()
            .and_then(|k| egraph.analysis.constants.get(k))
            .ok_or_else(|| err(format!("bad constant `{name}`")))?;
        vec![g.add_const_shared(t.clone(), egraph[class].data.label.as_deref().unwrap_or(""))]
    } else if name == "out" {
        let index: usize = egraph[n.children[0]]
            .data
            .attrs
            .as_deref()
            .and_then(|a| a.trim_start_matches("{index=").trim_end_matches('}').parse().ok())
            .ok_or_else(|| err("bad output index".into()))?;
        let all = build(egraph, choice, g, inputs, memo, egraph.find(n.children[1]))?;
        let value = *all.get(index).ok_or_else(|| err(format!("output {index} does not exist")))?;
        // A node of several outputs that a rule made (a residual sum and
        // its norm) has no label of its own: it takes the first of its
        // outputs' that has one, so a kernel's errors and profile name it.
        let node = g.producer(value);
        if g.node(node).label.is_empty() {
            if let Some(label) = egraph[class].data.label.as_deref() {
                g.node_mut(node).label = label.to_string();
            }
        }
        vec![value]
    } else {
        let (op, first) = op_of(egraph, &n).ok_or_else(|| err(format!("`{name}` is not an op")))?;
        let mut args = Vec::new();
        for &c in &n.children[first..] {
            args.push(build(egraph, choice, g, inputs, memo, egraph.find(c))?[0]);
        }
        let label = egraph[class].data.label.clone().unwrap_or_default();
        g.add_node(op, &args, &label)?
    };
    memo.insert(class, values.clone());
    Ok(values)
}
