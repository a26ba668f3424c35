//! Zero-shot classification (CLIP §3.1.4; OpenCLIP
//! `zero_shot_classifier.py`, `zero_shot_metadata.py`).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::tokenizer::Tokenizer;
use crate::io::{read_safetensors, write_safetensors};
use crate::model::{ClipModel, l2_normalize};
use crate::preprocess::u8_batch_to_tensor;
use crate::state::StateDict;
use crate::{Error, Result};

/// OpenAI's cleaned ImageNet class names, in label order (OpenCLIP
/// `IMAGENET_CLASSNAMES`; see `core/data/zeroshot/SOURCE.md`).
pub fn imagenet_classnames() -> Vec<String> {
    include_str!("../../data/zeroshot/imagenet_classnames.txt")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Prompt templates for zero-shot classification; `{}` is the class name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TemplateSet {
    /// [`PHOTO_TEMPLATES`]: six generic photo prompts (the default for
    /// folders other than ImageNet).
    #[default]
    Photo,
    /// OpenCLIP's 7 `SIMPLE_IMAGENET_TEMPLATES`.
    Simple,
    /// OpenAI's 80 ImageNet templates (the default for ImageNet folders).
    Openai,
    /// One template per line of a file (`{}` or `{c}` for the class).
    File(PathBuf),
}

impl TemplateSet {
    /// The templates. Errs on an unreadable file, or a template without `{}`.
    pub fn load(&self) -> Result<Vec<String>> {
        let lines = |text: &str| -> Vec<String> {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        };
        let templates = match self {
            Self::Photo => PHOTO_TEMPLATES.iter().map(|s| s.to_string()).collect(),
            Self::Simple => lines(include_str!("../../data/zeroshot/simple_templates.txt")),
            Self::Openai => lines(include_str!("../../data/zeroshot/openai_templates.txt")),
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                templates_from_lines(&lines(&text)).map_err(|reason| Error::Format {
                    path: path.clone(),
                    reason,
                })?
            }
        };
        Ok(templates)
    }
}

/// Prompt templates from `lines`, with `{}` or clip_benchmark's `{c}`
/// (`template.format(c=name)`) for the class name; `{c}` is read as `{}`.
/// Errs with the reason on a template without either, or on no templates.
pub fn templates_from_lines<S: AsRef<str>>(
    lines: &[S],
) -> std::result::Result<Vec<String>, String> {
    let templates: Vec<String> = lines
        .iter()
        .map(|l| l.as_ref().replace("{c}", "{}"))
        .collect();
    if let Some(bad) = templates.iter().find(|t| !t.contains("{}")) {
        return Err(format!(
            "template {bad:?} has no {{}} or {{c}} for the class name"
        ));
    }
    if templates.is_empty() {
        return Err("no templates".into());
    }
    Ok(templates)
}

impl FromStr for TemplateSet {
    type Err = Error;

    /// `photo`, `simple`, `openai`, or a file path.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "photo" => Self::Photo,
            "simple" => Self::Simple,
            "openai" => Self::Openai,
            "" => return Err(Error::Config("empty template set".into())),
            path => Self::File(path.into()),
        })
    }
}

impl fmt::Display for TemplateSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Photo => f.write_str("photo"),
            Self::Simple => f.write_str("simple"),
            Self::Openai => f.write_str("openai"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl TryFrom<String> for TemplateSet {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<TemplateSet> for String {
    fn from(t: TemplateSet) -> Self {
        t.to_string()
    }
}

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
    /// Mean over classes (with at least one image) of the share of that
    /// class's images classified right: balanced accuracy.
    #[serde(default)]
    pub per_class_recall: f64,
    /// Images evaluated.
    pub samples: usize,
    /// Classes the images were scored against.
    #[serde(default)]
    pub classes: usize,
    /// Accuracy of guessing: `1 / classes`.
    pub chance: f64,
    /// Samples skipped, not in `samples`: images that could not be decoded,
    /// and labelled shards' samples whose `cls` is missing, not a number or
    /// not a class.
    #[serde(default)]
    pub skipped: usize,
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

    /// [`ZeroShotTask::classifier`], cached in `dir` under a name keyed by
    /// the class names, the templates and `context`: a checkpoint's
    /// classifier is computed once, then read back. A missing or unusable
    /// cache file is recomputed (and a failed write is only a lost cache).
    pub fn classifier_cached<B: Backend>(
        &self,
        model: &ClipModel<B>,
        tokenizer: &Tokenizer,
        context: usize,
        device: &B::Device,
        dir: &Path,
    ) -> Tensor<B, 2> {
        let path = dir.join(format!(
            "zeroshot-classifier-{:016x}.safetensors",
            self.cache_key(context)
        ));
        let dim = model.config.embed_dim;
        if let Ok(file) = read_safetensors(&path)
            && let Some(data) = file.tensors.get("classifier")
            && data.shape.as_slice() == [self.classnames.len(), dim]
        {
            return Tensor::from_data(data.clone(), device);
        }
        let c = self.classifier(model, tokenizer, context, device);
        let mut tensors = StateDict::new();
        tensors.insert("classifier".to_string(), c.to_data());
        let meta = HashMap::from([("classes".to_string(), self.classnames.len().to_string())]);
        write_safetensors(&path, &tensors, meta).ok();
        c
    }

    /// FNV-1a over the class names, templates and context length.
    fn cache_key(&self, context: usize) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3); // field separator
        };
        for name in &self.classnames {
            eat(name.as_bytes());
        }
        eat(b"|templates|");
        for t in &self.templates {
            eat(t.as_bytes());
        }
        eat(&(context as u64).to_le_bytes());
        h
    }
}

/// Running top-1/top-5 counts over batches, also per class.
#[derive(Debug, Default, Clone)]
pub struct Accuracy {
    hits1: usize,
    hits5: usize,
    seen: usize,
    /// Per label: (images, top-1 hits).
    per_class: Vec<(usize, usize)>,
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
        let scores: Vec<f32> = scores
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 scores");
        self.add_scores(&scores, classes, labels);
    }

    /// Scores `[batch, classes]` (row-major) of images with `labels`.
    /// Ranks follow the scores; scores within the retrieval
    /// [`TIE_TOLERANCE`](super::retrieval::TIE_TOLERANCE) are ties, broken
    /// towards the lower class index, so that backends agree.
    pub fn add_scores(&mut self, scores: &[f32], classes: usize, labels: &[usize]) {
        if self.per_class.len() < classes {
            self.per_class.resize(classes, (0, 0));
        }
        for (row, &label) in scores.chunks(classes).zip(labels) {
            // Classes scoring above the label's score, or tied with it at a
            // lower index: the label's 0-based rank.
            let (s, eps) = (row[label], super::retrieval::TIE_TOLERANCE);
            let rank = row
                .iter()
                .enumerate()
                .filter(|&(c, &v)| v > s + eps || (v >= s - eps && c < label))
                .count();
            self.seen += 1;
            self.hits1 += usize::from(rank == 0);
            self.hits5 += usize::from(rank < 5);
            let cls = &mut self.per_class[label];
            cls.0 += 1;
            cls.1 += usize::from(rank == 0);
        }
    }

    /// The result for `classes` classes.
    pub fn result(&self, classes: usize) -> ZeroShotResult {
        let n = self.seen.max(1) as f64;
        let present: Vec<f64> = self
            .per_class
            .iter()
            .filter(|c| c.0 > 0)
            .map(|&(seen, hit)| hit as f64 / seen as f64)
            .collect();
        ZeroShotResult {
            top1: self.hits1 as f64 / n,
            top5: self.hits5 as f64 / n,
            per_class_recall: present.iter().sum::<f64>() / present.len().max(1) as f64,
            samples: self.seen,
            classes,
            chance: 1.0 / classes.max(1) as f64,
            skipped: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_top5_and_per_class_recall_by_hand() {
        // 6 classes, 4 images. Scores per row; labels 0, 0, 1, 5.
        let scores = [
            // label 0 ranks first: top-1 and top-5 hit
            0.9, 0.1, 0.2, 0.3, 0.4, 0.5, //
            // label 0 ranks sixth: a miss for both
            0.0, 0.1, 0.2, 0.3, 0.4, 0.5, //
            // label 1 ranks third: top-5 only
            0.9, 0.5, 0.8, 0.1, 0.1, 0.1, //
            // label 5 ties class 2 at the top; the lower index wins: rank 2
            0.1, 0.1, 0.7, 0.1, 0.1, 0.7,
        ];
        let mut acc = Accuracy::default();
        acc.add_scores(&scores[..12], 6, &[0, 0]);
        acc.add_scores(&scores[12..], 6, &[1, 5]);
        let r = acc.result(6);
        assert_eq!(r.samples, 4);
        assert_eq!(r.top1, 0.25);
        assert_eq!(r.top5, 0.75);
        // Classes 0 (1 of 2), 1 (0 of 1), 5 (0 of 1); classes without
        // images do not count.
        assert!((r.per_class_recall - 0.5 / 3.0).abs() < 1e-12, "{r:?}");
        assert!((r.chance - 1.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn bundled_template_sets_and_names() {
        assert_eq!(TemplateSet::Openai.load().unwrap().len(), 80);
        assert_eq!(TemplateSet::Simple.load().unwrap().len(), 7);
        assert_eq!(
            TemplateSet::Photo.load().unwrap().len(),
            PHOTO_TEMPLATES.len()
        );
        for set in [TemplateSet::Openai, TemplateSet::Simple] {
            assert!(
                set.load()
                    .unwrap()
                    .iter()
                    .all(|t| t.matches("{}").count() == 1)
            );
        }
        let names = imagenet_classnames();
        assert_eq!(names.len(), 1000);
        assert_eq!(
            (names[0].as_str(), names[999].as_str()),
            ("tench", "toilet paper")
        );
        for s in ["photo", "simple", "openai", "/tmp/my templates.txt"] {
            assert_eq!(s.parse::<TemplateSet>().unwrap().to_string(), s);
        }
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path();
        let path = dir.join("t.txt");
        std::fs::write(&path, "a photo of {}.\nno placeholder\n").unwrap();
        let err = TemplateSet::File(path.clone())
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("no placeholder"), "{err}");
        // clip_benchmark's `{c}` reads as `{}`.
        std::fs::write(&path, "a photo of a {c}.\n\nthe {}\n").unwrap();
        assert_eq!(
            TemplateSet::File(path).load().unwrap(),
            ["a photo of a {}.", "the {}"]
        );
    }
}
