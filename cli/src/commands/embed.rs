//! `clipa embed`: L2-normalised image and text features from a checkpoint,
//! batched on any backend, and `clipa tokenize`: the ids its tokenizer
//! gives captions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use clipa_backends::{BackendJob, BackendKind, Devices};
use clipa_core::model::l2_normalize;
use clipa_core::state::StateDict;
use clipa_core::{checkpoint, io, preprocess};

use crate::args::{EmbedArgs, TokenizeArgs};

/// Expands folders (recursively) into their JPEG, PNG and WebP files.
pub(crate) fn collect_images(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    Ok(clipa_core::data::folder::image_files(inputs)?)
}

/// The captions of a text file, one a line (a trailing newline adds none).
fn read_captions(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read captions from {}", path.display()))?;
    let captions: Vec<String> = text.lines().map(str::to_string).collect();
    ensure!(!captions.is_empty(), "{} has no captions", path.display());
    Ok(captions)
}

/// The embedding job on a backend; `clipa search` runs it for its query.
pub(crate) struct Embed<'a> {
    /// clipa checkpoint folder.
    pub(crate) checkpoint: &'a Path,
    /// Image files, in order.
    pub(crate) images: &'a [PathBuf],
    /// Captions, in order.
    pub(crate) captions: &'a [String],
    /// Images or captions per forward pass.
    pub(crate) batch_size: usize,
}

/// Row-major features and their width.
pub(crate) type Features = (Vec<f32>, usize);

impl BackendJob for Embed<'_> {
    /// Image features, then text features.
    type Output = (Features, Features);

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<Self::Output> {
        let (device, info) = on.one();
        // Inference runs on the inner (non-autodiff) backend.
        let (model, tokenizer) =
            checkpoint::load_model::<B::InnerBackend>(self.checkpoint, &device)?;
        let dim = model.config.embed_dim;
        let to_vec = |f: Tensor<B::InnerBackend, 2>| {
            f.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 features")
        };
        tracing::info!(
            "embedding {} images at {} px and {} captions on {info}",
            self.images.len(),
            model.config.vision.image_size,
            self.captions.len()
        );
        let mut images = Vec::with_capacity(self.images.len() * dim);
        for chunk in self.images.chunks(self.batch_size) {
            let batch = preprocess::eval_images::<B::InnerBackend>(chunk, &model.config, &device)?;
            images.extend(to_vec(l2_normalize(model.encode_image(batch, None)))); // [batch, dim]
        }
        let context = model.config.text.context_length;
        let mut texts = Vec::with_capacity(self.captions.len() * dim);
        for chunk in self.captions.chunks(self.batch_size) {
            let ids: Vec<i64> = chunk
                .iter()
                .flat_map(|c| tokenizer.tokenize(c, context))
                .map(i64::from)
                .collect();
            let ids = Tensor::<B::InnerBackend, 2, Int>::from_data(
                TensorData::new(ids, [chunk.len(), context]),
                &device,
            ); // [batch, context]
            texts.extend(to_vec(l2_normalize(model.encode_text(ids)))); // [batch, dim]
        }
        Ok(((images, dim), (texts, dim)))
    }
}

/// Embeds the images and captions and writes the safetensors file.
pub fn run(kind: BackendKind, device: Option<usize>, args: &EmbedArgs) -> anyhow::Result<()> {
    ensure!(args.batch_size > 0, "--batch-size must be positive");
    let images = if args.images.is_empty() {
        Vec::new()
    } else {
        collect_images(&args.images)?
    };
    let captions = match &args.texts {
        Some(path) => read_captions(path)?,
        None => Vec::new(),
    };
    let ((image_features, dim), (text_features, _)) = clipa_backends::run(
        kind,
        device,
        Embed {
            checkpoint: &args.checkpoint,
            images: &images,
            captions: &captions,
            batch_size: args.batch_size,
        },
    )?;
    let mut out = StateDict::new();
    let mut meta = HashMap::new();
    if !images.is_empty() {
        let names: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
        out.insert(
            "image_features".into(),
            TensorData::new(image_features, [images.len(), dim]),
        );
        meta.insert(
            "image_names".to_string(),
            serde_json::to_string(&names).expect("strings serialise"),
        );
    }
    if !captions.is_empty() {
        out.insert(
            "text_features".into(),
            TensorData::new(text_features, [captions.len(), dim]),
        );
        meta.insert(
            "texts".to_string(),
            serde_json::to_string(&captions).expect("strings serialise"),
        );
    }
    io::write_safetensors(&args.out, &out, meta)?;
    outln!(
        "wrote {} image and {} text embeddings of size {dim} to {}",
        images.len(),
        captions.len(),
        args.out.display()
    );
    Ok(())
}

/// `clipa tokenize`: no backend, no weights; the checkpoint's config and
/// tokenizer only.
pub fn tokenize(args: &TokenizeArgs) -> anyhow::Result<()> {
    let config = checkpoint::load_config(&args.checkpoint)?;
    let tokenizer = checkpoint::load_tokenizer(&args.checkpoint, &config)?;
    let context = args.context_length.unwrap_or(config.text.context_length);
    ensure!(context > 0, "--context-length must be positive");
    let captions = match &args.texts {
        Some(path) => read_captions(path)?,
        None => args.text.clone(),
    };
    let ids: Vec<Vec<u32>> = captions
        .iter()
        .map(|c| tokenizer.tokenize(c, context))
        .collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        let report = serde_json::json!({
            "tokenizer": config.text.tokenizer,
            "context_length": context,
            "ids": ids,
        });
        return crate::commands::write_line(&mut out, &report.to_string());
    }
    for row in &ids {
        let line: Vec<String> = row.iter().map(u32::to_string).collect();
        crate::commands::write_line(&mut out, &line.join(" "))?;
    }
    Ok(())
}
