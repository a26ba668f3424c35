//! `clipa import-openclip` and `clipa export-openclip`. Both are pure
//! host-side data movement: no backend is needed.

use std::collections::HashMap;

use anyhow::Context;
use clipa_core::{checkpoint, io, openclip};

use crate::args::{ExportArgs, ImportArgs};

/// OpenCLIP safetensors + config JSON → clipa checkpoint folder.
pub fn import(args: &ImportArgs) -> anyhow::Result<()> {
    let json = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    let cfg =
        openclip::parse_config(&json).with_context(|| format!("{}", args.config.display()))?;
    let file = io::read_safetensors(&args.weights)?;
    let state = openclip::import_state(&file.tensors, &cfg.clip, cfg.custom_text)
        .with_context(|| format!("{}", args.weights.display()))?;
    checkpoint::save(&args.out, &cfg.clip, &state)?;
    println!(
        "imported {} tensors ({:.2} M parameters) into {}",
        file.tensors.len(),
        cfg.clip.num_params() as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}

/// clipa checkpoint folder → OpenCLIP safetensors (+ config JSON).
pub fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let (cfg, state) = checkpoint::load(&args.checkpoint)?;
    let config = openclip::config_json(&cfg, args.custom_text)?;
    let out = openclip::export_state(&state, &cfg, args.custom_text);
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("config".to_string(), config.to_string()),
    ]);
    io::write_safetensors(&args.out, &out, meta)?;
    if let Some(path) = &args.config_out {
        let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
        io::write_atomic(path, text.as_bytes())?;
    }
    println!("exported {} tensors to {}", out.len(), args.out.display());
    Ok(())
}
