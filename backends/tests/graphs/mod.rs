//! The small graphs whose generated code is snapshotted, one per kernel
//! kind, shared by the CLIF and WGSL snapshot tests.
#![allow(dead_code)]

pub const MATMUL: &str = "v0: f32[2,8,16] = input{name=\"a\"}
v1: f32[16,16] = input{name=\"b\"}
v2: f32[2,8,16] = matmul v0, v1
output \"c\" = v2
";

pub const LAYER_NORM: &str = "v0: f32[4,6] = input{name=\"x\"}
v1: f32[6] = input{name=\"g\"}
v2: f32[6] = input{name=\"b\"}
v3: f32[4,6], v4: f32[4,1], v5: f32[4,1] = layer_norm{axis=1, epsilon=1e-5} v0, v1, v2
output \"y\" = v3
";

pub const SOFTMAX: &str = "v0: f32[3,10] = input{name=\"x\"}
v1: f32[3,10] = softmax{axis=1} v0
output \"y\" = v1
";

pub const GATHER: &str = "v0: f32[10,8] = input{name=\"table\"}
v1: i64[5] = input{name=\"ids\"}
v2: f32[5,8] = gather{axis=0} v0, v1
output \"y\" = v2
";

/// A bias add (read twice, so written once), then GELU in its erf form and
/// a residual add, fused into one map kernel with immediate constants.
pub const ELEMENTWISE_CHAIN: &str = "v0: f32[4,16] = input{name=\"x\"}
v1: f32[16] = input{name=\"bias\"}
v2: f32[4,16] = input{name=\"residual\"}
v3: f32[4,16] = add v0, v1
v4: f32[] = const [1.4142135]
v5: f32[4,16] = div v3, v4
v6: f32[4,16] = erf v5
v7: f32[] = const [1.0]
v8: f32[4,16] = add v6, v7
v9: f32[4,16] = mul v3, v8
v10: f32[] = const [0.5]
v11: f32[4,16] = mul v9, v10
v12: f32[4,16] = add v11, v2
output \"y\" = v12
";

/// A linear layer with bias, GELU and a residual: one matmul whose
/// epilogue runs the elementwise tail.
pub const MATMUL_EPILOGUE: &str = "v0: f32[8,16] = input{name=\"x\"}
v1: f32[16,16] = input{name=\"w\"}
v2: f32[16] = input{name=\"bias\"}
v3: f32[8,16] = matmul v0, v1
v4: f32[8,16] = add v3, v2
v5: f32[8,16] = gelu{approximate_tanh=false} v4
v6: f32[8,16] = add v5, v0
output \"y\" = v6
";

pub const ATTENTION: &str = "v0: f32[2,10,8] = input{name=\"q\"}
v1: f32[2,8,12] = input{name=\"kt\"}
v2: f32[2,12,8] = input{name=\"v\"}
v3: f32[2,10,8] = attention{scale=0.35355338, nan_to_zero=false} v0, v1, v2
output \"y\" = v3
";

/// A head wider than one invocation's registers (65 + 64 columns): two
/// lanes a query row, each holding every other column (the key rows padded
/// to 66), their partial scores added in workgroup memory.
pub const WIDE_ATTENTION: &str = "v0: f32[1,5,65] = input{name=\"q\"}
v1: f32[1,65,9] = input{name=\"kt\"}
v2: f32[1,9,64] = input{name=\"v\"}
v3: f32[1,5,64] = attention{scale=0.125, nan_to_zero=false} v0, v1, v2
output \"y\" = v3
";

/// Sizes read at run time: a linear layer over a symbolic number of
/// tokens (the product's rows and its bias epilogue's), and a cache grown
/// by one position along a symbolic axis (maps with symbolic extents,
/// strides and offsets).
pub const SYMBOLIC: &str = "v0: f32[tokens,16] = input{name=\"x\"}
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

/// Rows of a symbolic length: a softmax over `keys` and a mean over it
/// (the generated kernel reads the length from its size slot).
pub const SYMBOLIC_ROWS: &str = "v0: f32[2,keys] = input{name=\"x\"}
v1: f32[2,keys] = softmax{axis=1} v0
v2: f32[2] = reduce{kind=mean, axes=[1], keepdims=false} v0
output \"p\" = v1
output \"m\" = v2
";
