//! Zero-shot classification (CLIP §3.1.4; OpenCLIP
//! `zero_shot_classifier.py`, `zero_shot_metadata.py`).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::tokenizer::Tokenizer;
use crate::model::{ClipModel, l2_normalize};
use crate::preprocess::u8_batch_to_tensor;

/// Class names and prompt templates (`{}` is replaced by the class name).
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroShotTask {
    /// One human-readable name per class, in label order.
    pub classnames: Vec<String>,
    /// Prompt templates such as `a photo of a {}.`.
    pub templates: Vec<String>,
}

/// The generic templates used for image folders without their own: a short
/// subset of OpenCLIP's ImageNet ensemble (`OPENAI_IMAGENET_TEMPLATES`).
pub const PHOTO_TEMPLATES: [&str; 6] = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a bad photo of the {}.",
    "a good photo of a {}.",
];

/// Top-1 and top-5 accuracy over `samples` images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ZeroShotResult {
    /// Share of images whose top class is right.
    pub top1: f64,
    /// Share of images whose right class is among the top five.
    pub top5: f64,
    /// Images evaluated.
    pub samples: usize,
    /// Accuracy of guessing: `1 / classes`.
    pub chance: f64,
}

impl ZeroShotTask {
    /// The classifier `[classes, embed_dim]`: per class, the normalised mean
    /// of its normalised prompt embeddings, at `context` tokens (no
    /// reduction).
    pub fn classifier<B: Backend>(
        &self,
        model: &ClipModel<B>,
        tokenizer: &Tokenizer,
        context: usize,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let t = self.templates.len();
        let rows: Vec<Tensor<B, 2>> = self
            .classnames
            .iter()
            .map(|name| {
                let ids: Vec<i64> = self
                    .templates
                    .iter()
                    .flat_map(|tpl| tokenizer.tokenize(&tpl.replace("{}", name), context))
                    .map(i64::from)
                    .collect();
                let ids =
                    Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [t, context]), device);
                let emb = l2_normalize(model.encode_text(ids)); // [templates, dim]
                l2_normalize(emb.mean_dim(0)) // [1, dim]
            })
            .collect();
        Tensor::cat(rows, 0) // [classes, dim]
    }
}

/// Running top-1/top-5 counts over batches.
#[derive(Debug, Default, Clone)]
pub struct Accuracy {
    hits1: usize,
    hits5: usize,
    seen: usize,
}

impl Accuracy {
    /// Scores one batch of u8 HWC images of side `size` with labels.
    pub fn add_batch<B: Backend>(
        &mut self,
        model: &ClipModel<B>,
        classifier: &Tensor<B, 2>,
        images: &[u8],
        labels: &[usize],
        size: usize,
    ) {
        let device = classifier.device();
        let x = u8_batch_to_tensor::<B>(
            images,
            labels.len(),
            size,
            &model.config.normalization,
            &device,
        );
        let feats = l2_normalize(model.encode_image(x, None)); // [batch, dim]
        let scores = feats.matmul(classifier.clone().transpose()); // [batch, classes]
        let classes = classifier.dims()[0];
        let k = classes.min(5);
        let top = scores.argsort_descending(1).narrow(1, 0, k); // [batch, k]
        let top: Vec<i64> = top
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("int indices");
        for (row, &label) in top.chunks(k).zip(labels) {
            self.seen += 1;
            self.hits1 += (row[0] as usize == label) as usize;
            self.hits5 += row.iter().any(|&c| c as usize == label) as usize;
        }
    }

    /// The result for `classes` classes.
    pub fn result(&self, classes: usize) -> ZeroShotResult {
        let n = self.seen.max(1) as f64;
        ZeroShotResult {
            top1: self.hits1 as f64 / n,
            top5: self.hits5 as f64 / n,
            samples: self.seen,
            chance: 1.0 / classes.max(1) as f64,
        }
    }
}
