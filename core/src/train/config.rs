//! The training configuration: a run is a list of stages (CLIPA's
//! pre-train at few tokens, then a short fine-tune at full length), each
//! with its own image size and reduction, text length and reduction, batch,
//! learning rate and length. Presets carry the budget in their name, as
//! CLIPA's `configs/model_h/84_8_pre_training.py` does.
//!
//! Config flows one way: preset or `--config run.toml` → CLI overrides →
//! [`TrainConfig::validate`]. Unknown keys are errors.

use std::path::PathBuf;

use burn::tensor::backend::{Backend, DTypeUsage};
use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

use super::optim::AdamWConfig;
use crate::eval::{EvaluatorConfig, TemplateSet};
pub use crate::loss::LossKind;
use crate::model::ClipConfig;
use crate::reduce::{ImageReduction, TextReduction};
use crate::{Error, Result};

/// Numeric precision of the transformer blocks in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 where the device multiplies bf16 on matrix units (CUDA tensor
    /// cores), float32 elsewhere (the CPU, WGPU).
    #[default]
    Auto,
    /// float32 throughout.
    F32,
    /// bf16 block compute over float32 master weights, residual stream,
    /// LayerNorms, loss and optimiser; an error on a device without bf16.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::Config(format!(
                "precision {other:?}: expected auto, f32 or bf16"
            ))),
        }
    }
}

impl Precision {
    /// The blocks' compute dtype on `device` (`None`: float32).
    pub fn compute_dtype<B: Backend>(self, device: &B::Device) -> Result<Option<FloatDType>> {
        let usage = B::dtype_usage(device, DType::BF16);
        let general = B::supports_dtype(device, DType::BF16);
        match self {
            Self::F32 => Ok(None),
            Self::Auto if general && usage.contains(DTypeUsage::Accelerated) => {
                Ok(Some(FloatDType::BF16))
            }
            Self::Auto => Ok(None),
            Self::Bf16 if general => Ok(Some(FloatDType::BF16)),
            Self::Bf16 => Err(Error::Config(
                "precision bf16: this backend/device has no bf16 arithmetic (use f32 or auto)"
                    .into(),
            )),
        }
    }
}

/// One training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// A short name for logs ("pretrain-i112-t16", "unmask-tune-224").
    pub name: String,
    /// The model's image side for this stage, before any `resize:` reduction.
    pub image_size: u32,
    /// How image tokens are reduced.
    pub image_reduction: ImageReduction,
    /// Text context length (tokens, specials included).
    pub text_length: usize,
    /// How captions are cut to `text_length`.
    pub text_reduction: TextReduction,
    /// Optimiser steps in this stage.
    pub steps: u64,
    /// Global batch size (samples per optimiser step).
    pub batch_size: usize,
    /// Micro-batches per step (cached-feature gradient accumulation).
    #[serde(default = "one")]
    pub accum_steps: usize,
    /// Learning rate per 256 samples; the peak is `base_lr × batch / 256`.
    pub base_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Learning rate at the end of the cosine, per 256 samples.
    #[serde(default)]
    pub end_base_lr: f64,
}

fn one() -> usize {
    1
}

impl StageConfig {
    /// Patch tokens per image after this stage's reduction (CLS not
    /// counted), for a model with `patch`-pixel patches.
    pub fn image_tokens(&self, patch: usize) -> usize {
        let g = self.image_reduction.image_size(self.image_size) as usize / patch;
        self.image_reduction
            .mask()
            .map_or(g * g, |m| m.kept((g, g)))
    }

    /// Samples this stage trains on.
    pub fn samples(&self) -> u64 {
        self.steps * self.batch_size as u64
    }

    /// Training FLOPs of the whole stage for `model` (clipa's counter:
    /// matrix products, 3 × forward).
    pub fn train_flops(&self, model: &ClipConfig) -> f64 {
        let per_pair = model
            .flops(self.image_tokens(model.vision.patch_size), self.text_length)
            .train();
        per_pair as f64 * self.samples() as f64
    }
}

/// Where the training data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// WebDataset shards (`/data/{00000..00099}.tar`, sources joined by
    /// `::`) or a `.csv`/`.tsv` file; `None` uses the built-in synthetic set.
    pub train_data: Option<String>,
    /// Per-source weights for `::`-joined sources (`1::0.5`).
    pub train_data_weights: Option<String>,
    /// Draw shards with replacement (restarts cleanly).
    pub dataset_resampled: bool,
    /// Samples in one epoch (OpenCLIP `--train-num-samples`): a
    /// WebDataset's size is not known up front. The log counts epochs in
    /// it, and `clipa train --epochs E` trains `E` of them.
    pub train_num_samples: Option<u64>,
    /// CSV column holding image paths.
    pub csv_img_key: String,
    /// CSV column holding captions.
    pub csv_caption_key: String,
    /// Image folder for zero-shot evaluation (`root/<class>/*.png`).
    pub zeroshot_data: Option<PathBuf>,
    /// Class-names file for `zeroshot_data`.
    pub classnames: Option<PathBuf>,
    /// Prompt templates for `zeroshot_data` (default: `photo`, or
    /// `openai` for a 1,000-class ImageNet folder).
    pub templates: Option<TemplateSet>,
    /// Loader threads (0 = all cores).
    pub workers: usize,
    /// Share of bad samples tolerated before the run stops.
    pub max_bad_fraction: f64,
    /// CLIPA's strong augmentation (colour jitter 0.4, grayscale 0.2).
    pub color_jitter: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train_data: None,
            train_data_weights: None,
            dataset_resampled: false,
            train_num_samples: None,
            csv_img_key: "filepath".into(),
            csv_caption_key: "title".into(),
            zeroshot_data: None,
            classnames: None,
            templates: None,
            workers: 0,
            max_bad_fraction: 0.1,
            color_jitter: false,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model preset name (`clipa-b16`, `tiny`, …; see `clipa models`).
    pub model: String,
    /// Master seed: weights, data order, augmentation and masks.
    pub seed: u64,
    /// The loss.
    pub loss: LossKind,
    /// Optimiser hyper-parameters.
    pub optimizer: AdamWConfig,
    /// Clip the global gradient norm to this value.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Non-finite steps skipped before the run stops (0: stop at the first).
    #[serde(default)]
    pub skip_nonfinite: u32,
    /// Block compute precision.
    #[serde(default)]
    pub precision: Precision,
    /// Per-block activation checkpointing: keep only each transformer
    /// block's input and recompute the block in the backward pass (one more
    /// forward of compute, one block's activations of memory).
    #[serde(default)]
    pub grad_checkpointing: bool,
    /// Log every N steps.
    pub log_every: u64,
    /// Checkpoint every N steps (and at the end of every stage).
    pub checkpoint_every: u64,
    /// Checkpoints kept (oldest deleted first).
    pub keep_checkpoints: usize,
    /// Zero-shot evaluation every N steps (0: only at the end of a stage).
    #[serde(default)]
    pub eval_every: u64,
    /// The vocabulary (`vocab.txt` or `tokenizer.json`) of a model whose
    /// tokenizer needs one: the CLIPA-v2 presets read BERT uncased
    /// WordPiece. Every checkpoint keeps a copy, so a resumed run reads its
    /// own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<PathBuf>,
    /// Data.
    #[serde(default)]
    pub data: DataConfig,
    /// The stages, run in order.
    pub stages: Vec<StageConfig>,
    /// Extra evaluations (zero-shot folders, retrieval sets), run with the
    /// `zeroshot_data` one every `eval_every` steps and at each stage end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluators: Vec<EvaluatorConfig>,
}

/// Names accepted by [`TrainConfig::preset`].
pub const PRESETS: [&str; 13] = [
    "demo",
    "tiny",
    "fmnist",
    "clipa-b16-i112-t16",
    "clipa-l16-i64-t16",
    "clipa-l16-i96-t8",
    "clipa-h14-i84-t8",
    "clipa-v2-l14-84-224",
    "clipa-v2-h14-70-224",
    "clipa-v2-h14-84-224",
    "clipa-v2-h14-84-224-336",
    "clipa-v2-g14-84-224",
    "clipa-v2-g14-84-224-336",
];

#[allow(clippy::too_many_arguments)]
fn stage(
    name: &str,
    image_size: u32,
    image_reduction: &str,
    text_length: usize,
    text_reduction: &str,
    steps: u64,
    batch_size: usize,
    base_lr: f64,
    warmup_steps: u64,
) -> StageConfig {
    StageConfig {
        name: name.into(),
        image_size,
        image_reduction: image_reduction
            .parse()
            .expect("preset reductions are valid"),
        text_length,
        text_reduction: text_reduction.parse().expect("preset reductions are valid"),
        steps,
        batch_size,
        accum_steps: 1,
        base_lr,
        warmup_steps,
        end_base_lr: 0.0,
    }
}

/// Steps needed to see `samples` samples at `batch` per step.
fn steps_for(samples: u64, batch: usize) -> u64 {
    samples.div_ceil(batch as u64)
}

/// CLIPA-v2 pre-training length: 1,281,167 × 10,000 samples (12.8B).
const V2_SAMPLES: u64 = 12_811_670_000;

/// CLIPA-v1 unmasked fine-tune: 131M samples at 224 px, at the recipe's
/// text length, batch and warmup (`clipa_torch/scripts/exp/gpu`: B/16
/// `ViT-B-16-CL16`, 16 tokens, 8192, 3072; L/16 `ViT-L-16-CL32-GAP`, 32
/// tokens, 7168, 3571).
fn v1_unmask_tune(text_length: usize, batch: usize, warmup: u64) -> StageConfig {
    stage(
        "unmask-tune-224",
        224,
        "none",
        text_length,
        "truncate",
        steps_for(131_072_000, batch),
        batch,
        8e-7,
        warmup,
    )
}

/// CLIPA-v2 pre-training (`model_h/84_8_pre_training.py`): `px` pixels,
/// 8 syntax-masked tokens, batch 65,536, warmup 3,200.
fn v2_pretrain(px: u32, samples: u64, base_lr: f64) -> StageConfig {
    stage(
        &format!("i{px}-t8"),
        224,
        &format!("resize:{px}"),
        8,
        "syntax",
        steps_for(samples, 65_536),
        65_536,
        base_lr,
        3200,
    )
}

/// CLIPA-v2 fine-tune at 224 px (`unmask_tuning_224_scheduleX4.py`): 512M
/// samples, batch 32,768.
fn v2_tune_224(mask: &str) -> StageConfig {
    stage(
        "unmask-tune-224",
        224,
        mask,
        32,
        "truncate",
        steps_for(524_288_000, 32_768),
        32_768,
        4e-7,
        800,
    )
}

/// bigG's fine-tune at 224 px (t5x `…224_scheduleX4`): 40 % masked, batch
/// 16,384, no warmup.
fn g14_tune_224() -> StageConfig {
    stage(
        "unmask-tune-224",
        224,
        "random:0.4",
        32,
        "truncate",
        steps_for(524_288_000, 16_384),
        16_384,
        4e-7,
        0,
    )
}

/// CLIPA-v2 fine-tune at 336 px (`unmask_tuning_336_scheduleX1.py`): 128M
/// samples, 40 % masked, batch 16,384.
fn v2_tune_336() -> StageConfig {
    stage(
        "unmask-tune-336",
        336,
        "random:0.4",
        32,
        "truncate",
        steps_for(131_072_000, 16_384),
        16_384,
        1e-7,
        1600,
    )
}

impl TrainConfig {
    /// A run of `model` through `stages` with the default settings.
    pub(crate) fn base(model: &str, stages: Vec<StageConfig>) -> Self {
        Self {
            vocab: None,
            model: model.into(),
            seed: 0,
            loss: LossKind::Softmax,
            optimizer: AdamWConfig::default(),
            grad_clip: None,
            skip_nonfinite: 0,
            precision: Precision::Auto,
            grad_checkpointing: false,
            log_every: 10,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            eval_every: 0,
            data: DataConfig::default(),
            evaluators: Vec::new(),
            stages,
        }
    }

    /// The named preset.
    ///
    /// - `demo` (default of `clipa train`): the `demo` model on the built-in
    ///   synthetic set, pre-trained at 16 px (16 patches) with 8 syntax-masked
    ///   text tokens, then fine-tuned at 32 px and 16 tokens.
    /// - `tiny`: one short stage of the `tiny` model, for tests.
    /// - `fmnist`: two stages for Fashion-MNIST shards at 28 px (patch 4):
    ///   random 50 % masking, then unmasked.
    /// - The paper's recipes (CLIPA-FACTS §1.6), names carrying the budget
    ///   (`clipa plan` picks among them):
    ///   - CLIPA-v1 on LAION-400M, 6 epochs then 131M samples at 224 px:
    ///     `clipa-b16-i112-t16`, `clipa-l16-i64-t16`, `clipa-l16-i96-t8`;
    ///   - the v2 report's Table 1 scaling run `clipa-h14-i84-t8` (2.56B
    ///     samples at 84 px, then 128M unmasked at 224 px);
    ///
    ///     these four train the PyTorch `clipa-v1-*` models (CLIP BPE);
    ///   - CLIPA-v2, on the JAX models (`clipa-*`, BERT WordPiece: they need
    ///     `vocab`), 12.8B samples at 70 or 84 px and 8 syntax tokens, then
    ///     512M at 224 px with 30 % (bigG: 40 %) of the patches masked, and
    ///     optionally 128M at 336 px with 40 % masked:
    ///     `clipa-v2-l14-84-224`, `clipa-v2-h14-70-224`, `clipa-v2-h14-84-224`,
    ///     `clipa-v2-h14-84-224-336`, `clipa-v2-g14-84-224`,
    ///     `clipa-v2-g14-84-224-336`. Only the H/14 and bigG configs are
    ///     public; L/14 uses H/14's schedule, and bigG at 336 px H/14's.
    pub fn preset(name: &str) -> Result<Self> {
        const LAION400M_6EP: u64 = 6 * 400_000_000;
        Ok(match name {
            "demo" => Self {
                log_every: 20,
                checkpoint_every: 500,
                ..Self::base(
                    "demo",
                    vec![
                        stage(
                            "pretrain-i16-t8",
                            32,
                            "resize:16",
                            8,
                            "syntax",
                            1000,
                            128,
                            1e-3,
                            100,
                        ),
                        stage(
                            "finetune-i32-t16",
                            32,
                            "none",
                            16,
                            "truncate",
                            250,
                            128,
                            3e-4,
                            25,
                        ),
                    ],
                )
            },
            "tiny" => Self {
                log_every: 1,
                ..Self::base(
                    "tiny",
                    vec![stage("tiny", 32, "none", 16, "truncate", 20, 16, 1e-3, 2)],
                )
            },
            "fmnist" => Self::base(
                "demo",
                vec![
                    // 16 text tokens in both stages: the converter's
                    // templates put the class word last, past token 8, so
                    // truncating to 8 deleted the label from most captions.
                    stage(
                        "pretrain-i28-random50-t16",
                        28,
                        "random:0.5",
                        16,
                        "truncate",
                        2500,
                        128,
                        1e-3,
                        167,
                    ),
                    stage(
                        "finetune-i28-t16",
                        28,
                        "none",
                        16,
                        "truncate",
                        500,
                        128,
                        3e-4,
                        50,
                    ),
                ],
            ),
            "clipa-b16-i112-t16" => Self::base(
                "clipa-v1-b16",
                vec![
                    stage(
                        "i112-t16",
                        224,
                        "resize:112",
                        16,
                        "truncate",
                        steps_for(LAION400M_6EP, 65_536),
                        65_536,
                        8e-6,
                        782,
                    ),
                    v1_unmask_tune(16, 8192, 3072),
                ],
            ),
            "clipa-l16-i96-t8" => Self::base(
                "clipa-v1-l16",
                vec![
                    stage(
                        "i96-t8",
                        224,
                        "resize:96",
                        8,
                        "syntax",
                        steps_for(LAION400M_6EP, 32_768),
                        32_768,
                        8e-6,
                        1563,
                    ),
                    v1_unmask_tune(32, 7168, 3571),
                ],
            ),
            "clipa-v2-h14-84-224-336" => Self::base(
                "clipa-h14",
                vec![
                    v2_pretrain(84, V2_SAMPLES, 8e-6),
                    v2_tune_224("random:0.3"),
                    v2_tune_336(),
                ],
            ),
            "clipa-l16-i64-t16" => Self::base(
                "clipa-v1-l16",
                vec![
                    stage(
                        "i64-t16",
                        224,
                        "resize:64",
                        16,
                        "syntax",
                        steps_for(LAION400M_6EP, 32_768),
                        32_768,
                        8e-6,
                        1563,
                    ),
                    v1_unmask_tune(32, 7168, 3571),
                ],
            ),
            "clipa-h14-i84-t8" => Self::base(
                "clipa-v1-h14",
                vec![
                    v2_pretrain(84, 2_560_000_000, 8e-6),
                    stage(
                        "unmask-tune-224",
                        224,
                        "none",
                        32,
                        "truncate",
                        steps_for(131_072_000, 32_768),
                        32_768,
                        4e-7,
                        800,
                    ),
                ],
            ),
            "clipa-v2-l14-84-224" => Self::base(
                "clipa-l14",
                vec![v2_pretrain(84, V2_SAMPLES, 8e-6), v2_tune_224("random:0.3")],
            ),
            "clipa-v2-h14-70-224" => Self::base(
                "clipa-h14",
                vec![v2_pretrain(70, V2_SAMPLES, 8e-6), v2_tune_224("random:0.3")],
            ),
            "clipa-v2-h14-84-224" => Self::base(
                "clipa-h14",
                vec![v2_pretrain(84, V2_SAMPLES, 8e-6), v2_tune_224("random:0.3")],
            ),
            "clipa-v2-g14-84-224" => Self::base(
                "clipa-g14",
                vec![v2_pretrain(84, V2_SAMPLES, 4e-6), g14_tune_224()],
            ),
            "clipa-v2-g14-84-224-336" => Self::base(
                "clipa-g14",
                vec![
                    v2_pretrain(84, V2_SAMPLES, 4e-6),
                    g14_tune_224(),
                    v2_tune_336(),
                ],
            ),
            other => {
                return Err(Error::Config(format!(
                    "unknown training preset '{other}'; presets: {}",
                    PRESETS.join(", ")
                )));
            }
        })
    }

    /// Reads a TOML run file (unknown keys are errors).
    pub fn from_toml(text: &str, path: &std::path::Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        })
    }

    /// The config as TOML, as written to the run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a TrainConfig always serialises")
    }

    /// The model architecture at stage 0's sizes: a preset, or an OpenCLIP
    /// model-config JSON file when `model` ends in `.json`.
    pub fn model_config(&self) -> Result<ClipConfig> {
        Ok(self.model_source()?.0)
    }

    /// The text reduction a clipa_torch model config names (`"text_mask":
    /// "syntax"` in `ViT-L-16-CL8-Syntax-GAP.json`): the CLI makes it every
    /// stage's, as clipa_torch tokenizes that model's captions with it.
    pub fn model_text_mask(&self) -> Result<Option<TextReduction>> {
        Ok(self.model_source()?.1)
    }

    fn model_source(&self) -> Result<(ClipConfig, Option<TextReduction>)> {
        if !self.model.ends_with(".json") {
            return Ok((ClipConfig::preset(&self.model)?, None));
        }
        let path = std::path::Path::new(&self.model);
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let parsed = crate::openclip::parse_config(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok((parsed.clip, parsed.text_mask))
    }

    /// Total steps over all stages.
    pub fn total_steps(&self) -> u64 {
        self.stages.iter().map(|s| s.steps).sum()
    }

    /// Training samples over all stages: `Σ steps × batch`.
    pub fn total_samples(&self) -> u64 {
        self.stages
            .iter()
            .map(|s| s.steps * s.batch_size as u64)
            .sum()
    }

    /// Samples trained before step `stage_step` of stage `stage`.
    pub fn samples_before(&self, stage: usize, stage_step: u64) -> u64 {
        let done: u64 = self.stages[..stage]
            .iter()
            .map(|s| s.steps * s.batch_size as u64)
            .sum();
        done + stage_step * self.stages[stage].batch_size as u64
    }

    /// Sets the training length to about `total` samples, split across
    /// stages in the preset's proportions of samples; each stage's steps
    /// are its share over its batch size, rounded, at least one.
    pub fn set_total_samples(&mut self, total: u64) {
        let old = self.total_samples().max(1) as f64;
        for s in &mut self.stages {
            let batch = s.batch_size.max(1) as f64;
            let share = s.steps as f64 * batch / old;
            let n = ((share * total as f64 / batch).round() as u64).max(1);
            s.warmup_steps =
                ((s.warmup_steps as f64 * n as f64 / s.steps.max(1) as f64).round() as u64).min(n);
            s.steps = n;
        }
    }

    /// Sets the total number of steps, split across stages in the preset's
    /// proportions (each stage gets at least one step; warmups shrink with
    /// their stage).
    pub fn set_total_steps(&mut self, total: u64) {
        let old = self.total_steps().max(1) as f64;
        let n = self.stages.len() as u64;
        let mut left = total.max(n);
        for (i, s) in self.stages.iter_mut().enumerate() {
            let share = if i as u64 == n - 1 {
                left
            } else {
                ((s.steps as f64 / old * total as f64).round() as u64)
                    .clamp(1, left - (n - 1 - i as u64))
            };
            s.warmup_steps =
                ((s.warmup_steps as f64 * share as f64 / s.steps.max(1) as f64).round() as u64)
                    .min(share);
            s.steps = share;
            left -= share;
        }
    }

    /// Checks every value; call after overrides.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let model = self.model_config()?;
        if self.stages.is_empty() {
            return bad("a run needs at least one stage".into());
        }
        if self.log_every == 0 || self.checkpoint_every == 0 || self.keep_checkpoints == 0 {
            return bad("log_every, checkpoint_every and keep_checkpoints must be positive".into());
        }
        for s in &self.stages {
            s.image_reduction.validate()?;
            let px = s.image_reduction.image_size(s.image_size) as usize;
            let patch = model.vision.patch_size;
            let tag = format!("stage '{}'", s.name);
            if px == 0 || !px.is_multiple_of(patch) {
                return bad(format!(
                    "{tag}: image size {px} is not a multiple of the patch size {patch}"
                ));
            }
            if s.steps == 0 || s.batch_size == 0 || s.accum_steps == 0 {
                return bad(format!(
                    "{tag}: steps, batch_size and accum_steps must be positive"
                ));
            }
            if s.batch_size % s.accum_steps != 0 {
                return bad(format!(
                    "{tag}: batch_size {} is not divisible by accum_steps {}",
                    s.batch_size, s.accum_steps
                ));
            }
            if s.text_length < 3 {
                return bad(format!("{tag}: text_length must be at least 3"));
            }
            if s.base_lr.is_nan()
                || s.base_lr <= 0.0
                || s.end_base_lr.is_nan()
                || s.end_base_lr < 0.0
            {
                return bad(format!(
                    "{tag}: base_lr must be positive and end_base_lr not negative"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_validates_and_round_trips_through_toml() {
        for name in PRESETS {
            let cfg = TrainConfig::preset(name).unwrap();
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            let back = TrainConfig::from_toml(&cfg.to_toml(), "x.toml".as_ref()).unwrap();
            assert_eq!(back, cfg, "{name}");
        }
        assert!(TrainConfig::preset("nope").is_err());
    }

    #[test]
    fn paper_presets_carry_the_paper_numbers() {
        let b = TrainConfig::preset("clipa-b16-i112-t16").unwrap();
        assert_eq!(
            b.stages[0].image_reduction,
            ImageReduction::Resize { size: 112 }
        );
        assert_eq!(b.stages[0].steps, 36_622); // 2.4B samples / 65 536
        assert!(
            (super::super::schedule::scaled_lr(b.stages[0].base_lr, 65_536) - 2.048e-3).abs()
                < 1e-12
        );
        let h = TrainConfig::preset("clipa-v2-h14-84-224-336").unwrap();
        assert_eq!(h.stages.len(), 3);
        assert_eq!(h.stages[1].image_reduction.to_string(), "random:0.3");
        assert_eq!(h.stages[0].text_reduction, TextReduction::Syntax);
    }

    #[test]
    fn precision_resolves_per_device() {
        // flex computes bf16 but has no bf16 matrix units: auto is float32,
        // an explicit bf16 is honoured. (The refusal where a device has no
        // bf16 at all, WGSL's case, is tests/train.rs's.)
        type B = crate::numeric::TestBackend;
        let device = Default::default();
        assert_eq!(Precision::Auto.compute_dtype::<B>(&device).unwrap(), None);
        assert_eq!(Precision::F32.compute_dtype::<B>(&device).unwrap(), None);
        assert_eq!(
            Precision::Bf16.compute_dtype::<B>(&device).unwrap(),
            Some(FloatDType::BF16)
        );
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert!("fp16".parse::<Precision>().is_err());
        // Configs written before the field existed read as auto.
        let mut cfg = TrainConfig::preset("tiny").unwrap();
        cfg.precision = Precision::F32;
        let toml = cfg.to_toml().replace("precision = \"f32\"\n", "");
        assert!(!toml.contains("precision"));
        assert_eq!(
            TrainConfig::from_toml(&toml, std::path::Path::new("run.toml"))
                .unwrap()
                .precision,
            Precision::Auto
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let mut text = TrainConfig::preset("tiny").unwrap().to_toml();
        text = text.replace("seed = 0", "seed = 0\nsede = 1");
        let err = TrainConfig::from_toml(&text, "run.toml".as_ref())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sede"), "{err}");
    }

    #[test]
    fn total_steps_split_in_proportion() {
        let mut cfg = TrainConfig::preset("demo").unwrap();
        cfg.set_total_steps(125);
        assert_eq!(cfg.total_steps(), 125);
        assert_eq!(cfg.stages[0].steps, 100);
        assert_eq!(cfg.stages[1].steps, 25);
        assert_eq!(cfg.stages[0].warmup_steps, 10);
        cfg.set_total_steps(1);
        assert_eq!(
            cfg.stages.iter().map(|s| s.steps).collect::<Vec<_>>(),
            [1, 1]
        );
    }

    #[test]
    fn total_samples_split_by_samples_with_unequal_batches() {
        let mut cfg = TrainConfig::preset("demo").unwrap();
        cfg.stages[0].batch_size = 100;
        cfg.stages[0].steps = 30; // 3000 samples
        cfg.stages[1].batch_size = 50;
        cfg.stages[1].steps = 20; // 1000 samples
        assert_eq!(cfg.total_samples(), 4000);
        assert_eq!(cfg.samples_before(1, 3), 3150);
        cfg.set_total_samples(8000); // two epochs of 4000
        assert_eq!(
            cfg.stages.iter().map(|s| s.steps).collect::<Vec<_>>(),
            [60, 40]
        );
        assert_eq!(cfg.total_samples(), 8000);
        cfg.set_total_samples(10);
        assert_eq!(
            cfg.stages.iter().map(|s| s.steps).collect::<Vec<_>>(),
            [1, 1]
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let mut cfg = TrainConfig::preset("tiny").unwrap();
        cfg.stages[0].image_size = 30;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("multiple of the patch size 4"), "{err}");
    }
}
