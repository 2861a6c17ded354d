//! Snapshots of the optimised IR (`--opt 2`) of every zoo and synthetic model, in
//! `tests/snapshots/`: a change in what fuses shows up in review. Large
//! constants are elided. Re-bless with `INSTA_UPDATE=always` and read the diff.

mod common;

fn optimized(model: &str) -> String {
    let mut path = common::zoo_dir().join(model).join("model.onnx");
    if !path.exists() {
        path = common::synthetic_dir().join(model).join("model.onnx");
    }
    // A model with symbolic dims, at its first data set's sizes.
    let opts = common::options_for(path.parent().unwrap(), Default::default());
    let c = egret::canonical(&path, &opts).unwrap();
    let mut text = egret::ir::text::print_with(&c.graph, egret::ir::text::Constants::ElideOver(8));
    let fused: Vec<String> =
        egret::passes::egraph::count_fused(&c.graph).iter().map(|(k, n)| format!("{n} x {k}")).collect();
    text.insert_str(0, &format!("# fused: {}\n", fused.join(", ")));
    text
}

macro_rules! snapshot {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            insta::assert_snapshot!(optimized(stringify!($name)));
        }
    )*};
}

snapshot!(
    bert_tiny,
    deit_tiny_distilled,
    gpt2_tiny,
    perceiver,
    swin_micro,
    transformer_encdec,
    vit_tiny,
    llama_tiny,
    t5_tiny,
    bert_dynamic,
    gpt2_kv
);
