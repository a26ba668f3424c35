//! `clipa embed`: image features from a checkpoint, batched on any backend.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, DeviceInfo};
use clipa_core::model::l2_normalize;
use clipa_core::state::StateDict;
use clipa_core::{checkpoint, io, preprocess};

use crate::args::EmbedArgs;

/// Expands folders into their PNG/JPEG files (sorted), keeps files as given.
pub(crate) fn collect_images(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot read folder {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                    })
                })
                .collect();
            files.sort();
            out.extend(files);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            anyhow::bail!("{} is neither an image file nor a folder", input.display());
        }
    }
    ensure!(
        !out.is_empty(),
        "no PNG or JPEG images found in the given paths"
    );
    Ok(out)
}

struct Embed<'a> {
    checkpoint: &'a Path,
    images: &'a [PathBuf],
    batch_size: usize,
}

impl BackendJob for Embed<'_> {
    type Output = (Vec<f32>, usize);

    fn run<B: AutodiffBackend>(
        self,
        device: B::Device,
        info: &DeviceInfo,
    ) -> clipa_core::Result<Self::Output> {
        // Inference runs on the inner (non-autodiff) backend.
        let model = checkpoint::load_model::<B::InnerBackend>(self.checkpoint, &device)?;
        let size = model.config.vision.image_size;
        tracing::info!(
            "embedding {} images at {size} px on {info}",
            self.images.len()
        );
        let mut features = Vec::new();
        let mut dim = 0;
        for (i, chunk) in self.images.chunks(self.batch_size).enumerate() {
            let batch = preprocess::eval_images::<B::InnerBackend>(chunk, &model.config, &device)?;
            let f = l2_normalize(model.encode_image(batch, None)); // [batch, embed_dim]
            dim = f.dims()[1];
            features.extend(
                f.into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .expect("f32 features"),
            );
            tracing::debug!("batch {} done", i + 1);
        }
        Ok((features, dim))
    }
}

/// Embeds the images and writes the safetensors file.
pub fn run(kind: BackendKind, device: Option<usize>, args: &EmbedArgs) -> anyhow::Result<()> {
    ensure!(args.batch_size > 0, "--batch-size must be positive");
    let images = collect_images(&args.images)?;
    let (features, dim) = clipa_backends::run(
        kind,
        device,
        Embed {
            checkpoint: &args.checkpoint,
            images: &images,
            batch_size: args.batch_size,
        },
    )?;
    let names: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
    let mut out = StateDict::new();
    out.insert(
        "image_features".into(),
        TensorData::new(features, [images.len(), dim]),
    );
    let meta = HashMap::from([(
        "image_names".to_string(),
        serde_json::to_string(&names).expect("strings serialise"),
    )]);
    io::write_safetensors(&args.out, &out, meta)?;
    println!(
        "wrote {} image embeddings of size {dim} to {}",
        images.len(),
        args.out.display()
    );
    Ok(())
}
