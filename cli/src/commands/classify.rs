//! `clipa classify`: each image's most likely labels, from labels given as
//! text, with the checkpoint's own temperature (CLIP's zero-shot use).

use std::path::PathBuf;

use anyhow::{Context, ensure};
use burn::tensor::ElementConversion;
use burn::tensor::activation::softmax;
use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, Devices};
use clipa_core::eval::ZeroShotTask;
use clipa_core::model::l2_normalize;
use clipa_core::{checkpoint, preprocess};

use super::embed::collect_images;
use super::eval::resolve_checkpoint;
use crate::args::ClassifyArgs;

/// Images per forward pass.
const BATCH: usize = 64;

struct Classify {
    checkpoint: PathBuf,
    task: ZeroShotTask,
    images: Vec<PathBuf>,
}

impl BackendJob for Classify {
    /// Per image, the probability of each label.
    type Output = Vec<Vec<f32>>;

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<Self::Output> {
        let (device, info) = on.one();
        let (model, tokenizer) =
            checkpoint::load_model::<B::InnerBackend>(&self.checkpoint, &device)?;
        tracing::info!("classifying {} images on {info}", self.images.len());
        let classifier = self.task.classifier_cached(
            &model,
            &tokenizer,
            model.config.text.context_length,
            &device,
            &self.checkpoint,
        ); // [labels, dim]
        // exp(logit_scale): 100 for OpenAI's and OpenCLIP's models.
        let scale = model.temperature().into_scalar().elem::<f32>();
        let mut probs = Vec::with_capacity(self.images.len());
        for chunk in self.images.chunks(BATCH) {
            let x = preprocess::eval_images::<B::InnerBackend>(chunk, &model.config, &device)?;
            let f = l2_normalize(model.encode_image(x, None)); // [batch, dim]
            let p = softmax(f.matmul(classifier.clone().transpose()) * scale, 1); // [batch, labels]
            let p: Vec<f32> = p.into_data().convert::<f32>().to_vec().expect("f32");
            probs.extend(p.chunks(self.task.classnames.len()).map(<[f32]>::to_vec));
        }
        Ok(probs)
    }
}

/// `clipa classify`.
pub fn run(kind: BackendKind, device: Option<usize>, args: &ClassifyArgs) -> anyhow::Result<()> {
    let labels: Vec<String> = args
        .labels
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    ensure!(
        labels.len() >= 2,
        "--labels needs at least two comma-separated labels"
    );
    ensure!(args.top > 0, "--top must be positive");
    let templates = args.templates.load().context("cannot load --templates")?;
    let images = collect_images(&args.images)?;
    let checkpoint = resolve_checkpoint(&args.checkpoint)?;
    let probs = clipa_backends::run(
        kind,
        device,
        Classify {
            checkpoint,
            task: ZeroShotTask {
                classnames: labels.clone(),
                templates,
            },
            images: images.clone(),
        },
    )?;
    for (path, p) in images.iter().zip(&probs) {
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let shown: Vec<String> = order
            .iter()
            .take(args.top)
            .map(|&i| format!("{} {:.1}%", labels[i], 100.0 * p[i]))
            .collect();
        outln!("{}: {}", path.display(), shown.join(", "));
    }
    Ok(())
}
