//! The text format: round trips, and errors (never panics) on bad text.

use egret_ir::text::{parse, print, print_with, Constants};

const SAMPLE: &str = "\
v0: f32[1,4,8] = input{name=\"x\"}
v1: f32[8] = const [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
v2: f32[8] = const [0.0, -0.0, inf, -inf, 1e-7, 3.4028235e38, 0.5, -2.25]
v3: f32[1,4,8], v4: f32[1,4,1], v5: f32[1,4,1] = layer_norm{axis=2, epsilon=1e-5} v0, v1, v2  # encoder/ln
v6: f32[1,8,4] = transpose{perm=[0, 2, 1]} v3
v7: f32[1,4,4] = matmul v3, v6
v8: f32[1,4,4] = softmax{axis=2} v7
v9: f32[1,2,4] = slice{starts=[0, 3, 0], ends=[1, -1, 4], steps=[1, -2, 1]} v8
v10: i64[2] = const [2, 4]
v11: bool[1,2,4] = less v9, v9
v12: f32[1,2,4] = where v11, v9, v9
v13: f32[1,2,4] = cast{to=f32} v12
output \"y\" = v13
output \"stats\" = v4
";

#[test]
fn a_graph_with_attributes_round_trips() {
    let g = parse(SAMPLE).unwrap();
    let printed = print(&g);
    assert_eq!(print(&parse(&printed).unwrap()), printed);
    assert!(printed.contains("layer_norm{axis=2, epsilon=1e-5}"), "{printed}");
    assert!(printed.contains("# encoder/ln"), "{printed}");
}

#[test]
fn elided_constants_print_but_do_not_parse() {
    let g = parse(SAMPLE).unwrap();
    let elided = print_with(&g, Constants::ElideOver(4));
    assert!(elided.contains("const <8 values>"), "{elided}");
    assert!(parse(&elided).unwrap_err().contains("elided"));
}

#[test]
fn type_mismatches_are_caught_by_the_verifier() {
    let bad = SAMPLE.replace("v7: f32[1,4,4] = matmul", "v7: f32[1,4,5] = matmul");
    let err = parse(&bad).unwrap_err();
    assert!(err.contains("matmul") && err.contains("inference gives"), "{err}");
}

#[test]
fn malformed_text_is_an_error_not_a_panic() {
    let cases = [
        "v0: f32[2 = input{name=\"x\"}",
        "v0: f99[2] = input{name=\"x\"}",
        "v0: f32[2] = frobnicate v9",
        "v0: f32[2] = input{name=\"x}",
        "v0: f32[2] = input{name=\"\\u{zz}\"}",
        "v0: f32[2] = input{name=\"\\u}\"}",
        "v0: f32[2] = const [1.0]",
        "v0: f32[2] = const [1.0, abc]",
        "v0: f32[2] = input{name=\"x\", extra=3}",
        "v0: f32[2] = reduce{kind=average, axes=[0], keepdims=true} v0",
        "output \"y\" = v5",
        "v0: f32[2] = input{name=\"x\"}\nv0: f32[2] = neg v0",
        "= = =",
        "v0: f32[2] = input{name=\"x\"}\nv1: f32[2] = add v0",
    ];
    for c in cases {
        assert!(parse(c).is_err(), "should not parse: {c}");
    }
    // Every prefix of a valid graph either parses or errors.
    for i in 0..SAMPLE.len() {
        if SAMPLE.is_char_boundary(i) {
            let _ = parse(&SAMPLE[..i]);
        }
    }
}
