//! `clipa import-openclip` and `clipa export-openclip`. Both are pure
//! host-side data movement: no backend is needed.

use std::collections::HashMap;

use clipa_core::{checkpoint, io, openclip};

use crate::args::{ExportArgs, ImportArgs};

/// An OpenCLIP hub folder, or weights + config JSON → clipa checkpoint
/// folder. Nothing is written unless every piece was read and fits.
pub fn import(args: &ImportArgs) -> anyhow::Result<()> {
    let imported = match (&args.dir, &args.weights, &args.config) {
        (Some(dir), _, _) => openclip::import_dir(dir, args.vocab.as_deref())?,
        (None, Some(weights), Some(config)) => {
            openclip::import_files(weights, config, args.vocab.as_deref())?
        }
        _ => anyhow::bail!("give --dir FOLDER, or --weights FILE with --config FILE"),
    };
    checkpoint::save(
        &args.out,
        &imported.config,
        &imported.state,
        &imported.tokenizer,
    )?;
    outln!(
        "imported {} tensors from {} ({:.2} M parameters; {}, context {}) into {}",
        imported.source_tensors,
        imported.weights.display(),
        imported.config.num_params() as f64 / 1e6,
        imported.tokenizer.describe(),
        imported.config.text.context_length,
        args.out.display()
    );
    Ok(())
}

/// clipa checkpoint folder → OpenCLIP safetensors (+ config JSON).
pub fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let ckpt = checkpoint::load(&args.checkpoint)?;
    let (cfg, state) = (ckpt.config, ckpt.state);
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
    outln!("exported {} tensors to {}", out.len(), args.out.display());
    Ok(())
}
