//! Evaluators as data (big_vision style): each entry of a run config's
//! `[[evaluators]]` names a dataset and a kind, and returns named metrics.
//! The trainer runs them every `eval_every` steps and at the end of each
//! stage; `clipa eval` builds the same values from its flags.
//!
//! ```toml
//! [[evaluators]]
//! kind = "zeroshot"
//! name = "imagenet"
//! data = "/data/imagenet/val"     # root/<class>/*.JPEG
//! templates = "openai"            # photo | simple | openai | FILE
//!
//! [[evaluators]]
//! kind = "zeroshot"
//! name = "cifar10"
//! data = "/data/wds_vtab-cifar10"  # clip_benchmark layout: test/*.tar
//!
//! [[evaluators]]
//! kind = "retrieval"
//! name = "coco"
//! data = "/data/coco/test-{0..4}.tar"   # or captions.csv
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::retrieval::{DEFAULT_CHUNK, RetrievalResult, retrieval};
use super::zeroshot::{Accuracy, TemplateSet, ZeroShotResult};
use super::zeroshot_data::ZeroShotData;
use crate::data::augment::{Augmenter, ImageTransform};
use crate::data::benchmark::BenchmarkSplit;
use crate::data::shards::SampleTarget;
use crate::data::tokenizer::Tokenizer;
use crate::data::{DataStats, ShardSource, open_caption_source};
use crate::model::{ClipModel, EvalResize, l2_normalize};
use crate::preprocess::u8_batch_to_tensor;
use crate::rng::Rng;
use crate::{Error, Result};

/// Images (and captions) per forward pass during evaluation.
pub const EVAL_BATCH: usize = 256;

/// Zero-shot classification over an image folder (`root/<class>/*`) or a
/// dataset in clip_benchmark's WebDataset layout ([`ZeroShotData`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroShotEval {
    /// Metric prefix in logs (`imagenet` → `imagenet/top1`).
    pub name: String,
    /// The image folder, or a clip_benchmark dataset root (its `test`
    /// split), split folder or shard pattern.
    pub data: PathBuf,
    /// Class names, one per line in label order. Default: a clip_benchmark
    /// root's `classnames.txt`; for a folder, the bundled ImageNet names
    /// for 1,000 classes, else the folder names.
    #[serde(default)]
    pub classnames: Option<PathBuf>,
    /// Prompt templates. Default: a clip_benchmark dataset's own, `openai`
    /// for an ImageNet folder, else `photo`.
    #[serde(default)]
    pub templates: Option<TemplateSet>,
    /// Preprocessing; default: the model's own (`ClipConfig::eval_resize`).
    #[serde(default)]
    pub resize: Option<EvalResize>,
}

/// Image–text retrieval over a caption set: WebDataset shards (each `txt`
/// line is one caption; also a clip_benchmark dataset root or split folder)
/// or a CSV/TSV (rows naming the same image in a row are one image with
/// several captions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalEval {
    /// Metric prefix in logs (`coco` → `coco/i2t_r1`).
    pub name: String,
    /// Shard spec (`/data/{0..4}.tar`), a clip_benchmark dataset folder, or
    /// a `.csv`/`.tsv` file.
    pub data: String,
    /// CSV column with image paths.
    #[serde(default = "default_img_key")]
    pub csv_img_key: String,
    /// CSV column with captions.
    #[serde(default = "default_caption_key")]
    pub csv_caption_key: String,
    /// Preprocessing; default: the model's own (`ClipConfig::eval_resize`).
    #[serde(default)]
    pub resize: Option<EvalResize>,
}

fn default_img_key() -> String {
    "filepath".into()
}

fn default_caption_key() -> String {
    "title".into()
}

/// One evaluation: a kind with its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EvaluatorConfig {
    /// Zero-shot classification.
    Zeroshot(ZeroShotEval),
    /// Image–text retrieval.
    Retrieval(RetrievalEval),
}

/// What an evaluator found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalResult {
    /// Zero-shot accuracy.
    Zeroshot(ZeroShotResult),
    /// Retrieval recalls.
    Retrieval(RetrievalResult),
}

impl EvalResult {
    /// Flat named metrics, as logged: `top1`, `top5`, `per_class_recall`,
    /// or `i2t_r1` … `t2i_median_rank`.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        match self {
            Self::Zeroshot(z) => vec![
                ("top1", z.top1),
                ("top5", z.top5),
                ("per_class_recall", z.per_class_recall),
            ],
            Self::Retrieval(r) => {
                let (a, b) = (&r.image_to_text, &r.text_to_image);
                vec![
                    ("i2t_r1", a.r1),
                    ("i2t_r5", a.r5),
                    ("i2t_r10", a.r10),
                    ("i2t_mean_rank", a.mean_rank),
                    ("i2t_median_rank", a.median_rank),
                    ("t2i_r1", b.r1),
                    ("t2i_r5", b.r5),
                    ("t2i_r10", b.r10),
                    ("t2i_mean_rank", b.mean_rank),
                    ("t2i_median_rank", b.median_rank),
                ]
            }
        }
    }
}

impl EvaluatorConfig {
    /// The metric prefix.
    pub fn name(&self) -> &str {
        match self {
            Self::Zeroshot(z) => &z.name,
            Self::Retrieval(r) => &r.name,
        }
    }

    /// Checks, without a model, what [`Self::run`] will read: the zero-shot
    /// folder with its class names and templates, or the retrieval set.
    /// A training run calls it before its first step, so that a wrong path
    /// fails at once rather than at the end of a stage.
    pub fn check(&self) -> Result<()> {
        match self {
            Self::Zeroshot(z) => {
                ZeroShotData::open(&z.data, z.classnames.as_deref())?
                    .task(z.classnames.is_some(), z.templates.as_ref())?;
                Ok(())
            }
            Self::Retrieval(r) => {
                r.source()?;
                Ok(())
            }
        }
    }

    /// Runs the evaluation. `cache_dir` keeps zero-shot classifiers (a
    /// checkpoint folder); `progress` hears the images scored so far.
    pub fn run<B: Backend>(
        &self,
        model: &ClipModel<B>,
        tokenizer: &Tokenizer,
        device: &B::Device,
        cache_dir: Option<&Path>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<EvalResult> {
        match self {
            Self::Zeroshot(z) => {
                let data = ZeroShotData::open(&z.data, z.classnames.as_deref())?;
                let task = data.task(z.classnames.is_some(), z.templates.as_ref())?;
                let context = model.config.text.context_length;
                let classifier = match cache_dir {
                    Some(dir) => task.classifier_cached(model, tokenizer, context, device, dir),
                    None => task.classifier(model, tokenizer, context, device),
                };
                score_labelled(
                    model,
                    &classifier,
                    data.source(),
                    z.resize.unwrap_or(model.config.eval_resize).transform(),
                    progress,
                )
                .map(EvalResult::Zeroshot)
            }
            Self::Retrieval(r) => {
                let source = r.source()?;
                retrieve(
                    model,
                    source.as_ref(),
                    r.resize.unwrap_or(model.config.eval_resize).transform(),
                    tokenizer,
                    device,
                    progress,
                )
                .map(EvalResult::Retrieval)
            }
        }
    }
}

impl RetrievalEval {
    /// The caption set: a clip_benchmark dataset's split (`txt` lines are
    /// captions), else shards or a CSV as [`open_caption_source`] reads them.
    fn source(&self) -> Result<Arc<dyn ShardSource>> {
        match BenchmarkSplit::locate(Path::new(&self.data))? {
            Some(split) => Ok(Arc::new(split.webdataset(SampleTarget::Caption)?)),
            None => open_caption_source(&self.data, None, &self.csv_img_key, &self.csv_caption_key),
        }
    }
}

/// Decodes and transforms every sample of `source`, calling `batch` with
/// each full (and the last partial) batch of u8 images and their samples'
/// keys, labels and captions. Bad images are counted and skipped.
fn for_each_batch(
    source: &dyn ShardSource,
    transform: ImageTransform,
    size: usize,
    mut batch: impl FnMut(&[u8], &[(String, Option<usize>, String)]) -> Result<()>,
) -> Result<DataStats> {
    let stats = DataStats::default();
    let mut aug = Augmenter::new(transform, size as u32);
    let mut images = Vec::with_capacity(EVAL_BATCH * aug.output_len());
    let mut meta = Vec::with_capacity(EVAL_BATCH);
    let mut rng = Rng::new(0); // eval transforms draw nothing
    for shard in 0..source.num_shards() {
        let Ok(samples) = source.open(shard, &stats) else {
            DataStats::bump(&stats.bad_shards);
            continue;
        };
        for sample in samples {
            let start = images.len();
            images.resize(start + aug.output_len(), 0);
            if aug
                .apply_payload(sample.image, &sample.key, &mut rng, &mut images[start..])
                .is_err()
            {
                images.truncate(start);
                DataStats::bump(&stats.bad_images);
                continue;
            }
            meta.push((sample.key, sample.label, sample.caption));
            if meta.len() == EVAL_BATCH {
                batch(&images, &meta)?;
                images.clear();
                meta.clear();
            }
        }
    }
    if !meta.is_empty() {
        batch(&images, &meta)?;
    }
    Ok(stats)
}

/// Zero-shot accuracy of every labelled sample of `source` against
/// `classifier` `[classes, dim]`. Samples whose label is not a class, like
/// unreadable images and labelled shards' samples without a usable `cls`,
/// are skipped and counted in [`ZeroShotResult::skipped`].
pub fn score_labelled<B: Backend>(
    model: &ClipModel<B>,
    classifier: &Tensor<B, 2>,
    source: &dyn ShardSource,
    transform: ImageTransform,
    progress: &mut dyn FnMut(usize),
) -> Result<ZeroShotResult> {
    let px = model.config.vision.image_size;
    let classes = classifier.dims()[0];
    let mut acc = Accuracy::default();
    let (mut done, mut not_a_class) = (0, 0);
    let stats = for_each_batch(source, transform, px, |images, meta| {
        let labels = meta
            .iter()
            .map(|(key, label, _)| {
                label.ok_or_else(|| {
                    Error::Config(format!("{key}: zero-shot data needs class labels"))
                })
            })
            .collect::<Result<Vec<usize>>>()?;
        if labels.iter().all(|&l| l < classes) {
            acc.add_batch(model, classifier, images, &labels, px);
        } else {
            let len = images.len() / labels.len();
            let keep: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] < classes).collect();
            not_a_class += labels.len() - keep.len();
            let kept: Vec<u8> = keep
                .iter()
                .flat_map(|&i| images[i * len..(i + 1) * len].iter().copied())
                .collect();
            let labels: Vec<usize> = keep.iter().map(|&i| labels[i]).collect();
            if !labels.is_empty() {
                acc.add_batch(model, classifier, &kept, &labels, px);
            }
        }
        done += labels.len();
        progress(done);
        Ok(())
    })?;
    let mut result = acc.result(classes);
    let read = stats.snapshot();
    result.skipped = (read.bad_images + read.bad_captions) as usize + not_a_class;
    if result.samples == 0 {
        return Err(Error::Config(
            "the evaluation set yielded no readable image".into(),
        ));
    }
    Ok(result)
}

/// Retrieval over every sample of a caption source.
fn retrieve<B: Backend>(
    model: &ClipModel<B>,
    source: &dyn ShardSource,
    transform: ImageTransform,
    tokenizer: &Tokenizer,
    device: &B::Device,
    progress: &mut dyn FnMut(usize),
) -> Result<RetrievalResult> {
    let px = model.config.vision.image_size;
    let context = model.config.text.context_length;
    let mut image_feats: Vec<Tensor<B, 2>> = Vec::new();
    let mut captions: Vec<String> = Vec::new();
    let mut text_image: Vec<usize> = Vec::new();
    let (mut images, mut last_key) = (0usize, None::<String>);
    for_each_batch(source, transform, px, |pixels, meta| {
        // Consecutive rows naming the same image (a CSV with one row per
        // caption) are one image: keep its first rendering only.
        let mut keep = Vec::with_capacity(meta.len());
        for (i, (key, _, caption)) in meta.iter().enumerate() {
            if last_key.as_deref() != Some(key.as_str()) {
                keep.push(i);
                images += 1;
                last_key = Some(key.clone());
            }
            for line in caption.lines().map(str::trim).filter(|l| !l.is_empty()) {
                captions.push(line.to_string());
                text_image.push(images - 1);
            }
        }
        let len = pixels.len() / meta.len();
        let kept: Vec<u8> = keep
            .iter()
            .flat_map(|&i| pixels[i * len..(i + 1) * len].iter().copied())
            .collect();
        if !keep.is_empty() {
            let x =
                u8_batch_to_tensor::<B>(&kept, keep.len(), px, &model.config.normalization, device);
            image_feats.push(l2_normalize(model.encode_image(x, None))); // [kept, dim]
        }
        progress(images);
        Ok(())
    })?;
    if images == 0 || captions.is_empty() {
        return Err(Error::Config(
            "the retrieval set yielded no readable image with a caption".into(),
        ));
    }
    let mut text_feats = Vec::new();
    for chunk in captions.chunks(EVAL_BATCH) {
        let ids: Vec<i64> = chunk
            .iter()
            .flat_map(|c| tokenizer.tokenize(c, context))
            .map(i64::from)
            .collect();
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [chunk.len(), context]), device);
        text_feats.push(l2_normalize(model.encode_text(ids))); // [chunk, dim]
    }
    Ok(retrieval(
        Tensor::cat(image_feats, 0),
        Tensor::cat(text_feats, 0),
        &text_image,
        DEFAULT_CHUNK,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluators_read_from_toml_with_defaults() {
        #[derive(Deserialize)]
        struct Doc {
            evaluators: Vec<EvaluatorConfig>,
        }
        let doc: Doc = toml::from_str(
            r#"
            [[evaluators]]
            kind = "zeroshot"
            name = "in1k"
            data = "/data/val"
            templates = "openai"

            [[evaluators]]
            kind = "retrieval"
            name = "coco"
            data = "/data/coco-{0..4}.tar"
            resize = "squash"
            "#,
        )
        .expect("parses");
        match &doc.evaluators[0] {
            EvaluatorConfig::Zeroshot(z) => {
                assert_eq!(z.templates, Some(TemplateSet::Openai));
                assert_eq!(z.resize, None, "the model's own");
                assert_eq!(z.classnames, None);
            }
            other => panic!("{other:?}"),
        }
        match &doc.evaluators[1] {
            EvaluatorConfig::Retrieval(r) => {
                assert_eq!(
                    (r.name.as_str(), r.resize),
                    ("coco", Some(EvalResize::Squash))
                );
                assert_eq!(r.csv_caption_key, "title");
            }
            other => panic!("{other:?}"),
        }
        let bad = toml::from_str::<Doc>(
            "[[evaluators]]\nkind = \"linear-probe\"\nname = \"x\"\ndata = \"y\"\n",
        );
        assert!(bad.is_err());
    }
}
