//! `clipa models`: the presets, their size and cost per sample.

use clipa_core::model::config::PRESETS;
use clipa_core::model::{ClipConfig, TokenizerConfig};

use crate::args::ModelsArgs;

/// Prints the preset table (or JSON).
pub fn run(args: &ModelsArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for name in PRESETS {
        let cfg = ClipConfig::preset(name)?;
        let image = args.image_size.unwrap_or(cfg.vision.image_size);
        if image == 0 || !image.is_multiple_of(cfg.vision.patch_size) {
            // Not every preset fits every size (patch 4, 14, 16, 32).
            eprintln!(
                "{name}: skipped, {image} px is not a multiple of its patch size {}",
                cfg.vision.patch_size
            );
            continue;
        }
        let text = args.text_len.unwrap_or(cfg.text.context_length);
        let patches = (image / cfg.vision.patch_size).pow(2);
        let f = cfg.flops(patches, text);
        rows.push(serde_json::json!({
            "name": name,
            "params_m": cfg.num_params() as f64 / 1e6,
            "image_size": image,
            "patch_size": cfg.vision.patch_size,
            "image_tokens": patches,
            "text_tokens": text,
            "image_gflops": f.image as f64 / 1e9,
            "text_gflops": f.text as f64 / 1e9,
            "total_gflops": f.forward() as f64 / 1e9,
            "train_gflops": f.train() as f64 / 1e9,
            "tokenizer": match cfg.text.tokenizer {
                TokenizerConfig::ClipBpe => "clip-bpe",
                TokenizerConfig::WordPiece { .. } => "wordpiece",
            },
        }));
    }
    anyhow::ensure!(
        !rows.is_empty(),
        "no preset fits --image-size {:?}",
        args.image_size
    );
    if args.json {
        outln!("{}", serde_json::json!({ "models": rows }));
        return Ok(());
    }
    outln!(
        "{:<13} {:>9} {:>6} {:>7} {:>5} {:>9} {:>8} {:>9} {:>10}  tokenizer",
        "model",
        "params(M)",
        "image",
        "patches",
        "text",
        "img GFLOP",
        "txt GFLOP",
        "fwd GFLOP",
        "train GFLOP",
    );
    for r in rows {
        outln!(
            "{:<13} {:>9.2} {:>6} {:>7} {:>5} {:>9.2} {:>8.2} {:>9.2} {:>10.2}  {}",
            r["name"].as_str().unwrap_or_default(),
            r["params_m"].as_f64().unwrap_or_default(),
            r["image_size"],
            r["image_tokens"],
            r["text_tokens"],
            r["image_gflops"].as_f64().unwrap_or_default(),
            r["text_gflops"].as_f64().unwrap_or_default(),
            r["total_gflops"].as_f64().unwrap_or_default(),
            r["train_gflops"].as_f64().unwrap_or_default(),
            r["tokenizer"].as_str().unwrap_or_default(),
        );
    }
    outln!(
        "GFLOPs per image–text pair, forward (2 × multiply-adds of matrix products); training ≈ 3× forward."
    );
    outln!(
        "wordpiece models (CLIPA-v2) read BERT uncased WordPiece: training from scratch needs --vocab FILE."
    );
    Ok(())
}
