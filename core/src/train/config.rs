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

use super::lit::LockConfig;
use super::optim::AdamWConfig;
use super::schedule::{LrScheduler, ScheduleConfig, scaled_lr};
use crate::eval::{EvaluatorConfig, TemplateSet};
pub use crate::loss::LossKind;
use crate::model::ClipConfig;
use crate::reduce::{ImageReduction, TextReduction};
use crate::{Error, Result};

/// The largest global batch a stage takes (2^20 samples: past the largest
/// published CLIP batches, 160k, with room; a typo's 10^11 is refused).
pub const MAX_BATCH: usize = 1 << 20;
/// The longest text a stage takes, in tokens (CLIP's is 77; long-caption
/// models use a few hundred).
pub const MAX_TEXT_LENGTH: usize = 1024;
/// The largest image side a stage takes, in pixels.
pub const MAX_IMAGE_SIZE: usize = 4096;
/// The most data-loading threads (each holds a decode buffer and a stack).
pub const MAX_WORKERS: usize = 1024;

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

/// Where a run reports its logged metrics besides `metrics.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// TensorBoard event files in `RUN/tensorboard/` (`tensorboard --logdir
    /// RUN/tensorboard`).
    Tensorboard,
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

fn is_zero(n: &usize) -> bool {
    *n == 0
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
    /// Loader threads per part of the data (0 = all cores, shared by the
    /// process's parts).
    pub workers: usize,
    /// Parts the data is read in, one loader each ([`crate::data::part`]:
    /// part `p` reads every `parts`-th shard and supplies its slice of each
    /// batch). 0 = one per machine, stored in the run's config once a run
    /// spans machines, so that its resume reads the same parts anywhere.
    /// Set it to read a multi-machine run's batches on one.
    #[serde(skip_serializing_if = "is_zero")]
    pub parts: usize,
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
            parts: 0,
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
    /// The learning rate's shape after warmup (every stage).
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Locked (frozen) parts of the towers (LiT): they get no gradient and
    /// no optimiser state.
    #[serde(default, skip_serializing_if = "LockConfig::is_none")]
    pub lock: LockConfig,
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
    /// Where the run also reports its logged metrics besides
    /// `metrics.jsonl` (`--report-to tensorboard`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report_to: Vec<ReportTo>,
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

impl TrainConfig {
    /// A run of `model` through `stages` with the default settings.
    pub(crate) fn base(model: &str, stages: Vec<StageConfig>) -> Self {
        Self {
            vocab: None,
            report_to: Vec::new(),
            model: model.into(),
            seed: 0,
            loss: LossKind::Softmax,
            optimizer: AdamWConfig::default(),
            schedule: ScheduleConfig::default(),
            lock: LockConfig::default(),
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

    /// The named preset ([`super::presets::PRESETS`]: name, constructor
    /// and one-line description of each).
    pub fn preset(name: &str) -> Result<Self> {
        match super::presets::find(name) {
            Some(preset) => Ok((preset.build)()),
            None => Err(Error::Config(format!(
                "unknown training preset '{name}'; presets: {}",
                super::presets::PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
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

    /// What the optimiser will do, a line for AdamW and the clipping, one
    /// per stage for its learning rates after the batch scaling, and one
    /// for the lock (`clipa train --dry-run` prints them above the TOML).
    pub fn describe_optimizer(&self) -> Vec<String> {
        let o = &self.optimizer;
        let clip = self
            .grad_clip
            .map_or("none".to_string(), |c| format!("norm {c}"));
        let mut lines = vec![format!(
            "AdamW beta1 {} beta2 {} eps {:e} weight decay {}; gradient clip {clip}",
            o.beta1, o.beta2, o.eps, o.weight_decay
        )];
        let sched = &self.schedule;
        for s in &self.stages {
            let (peak, end) = (
                scaled_lr(s.base_lr, s.batch_size),
                scaled_lr(s.end_base_lr, s.batch_size),
            );
            let shape = match sched.scheduler {
                LrScheduler::Cosine => format!("cosine to {end:.4e}"),
                LrScheduler::Const => "constant".to_string(),
                LrScheduler::ConstCooldown => format!(
                    "constant, then a cooldown of {} steps (power {}) to {end:.4e}",
                    sched
                        .cooldown_steps
                        .min(s.steps - s.warmup_steps.min(s.steps)),
                    sched.cooldown_power
                ),
            };
            lines.push(format!(
                "stage '{}': {} steps at batch {}, lr {peak:.4e} (base_lr {:e} per 256 samples), warmup {} steps, then {shape}",
                s.name, s.steps, s.batch_size, s.base_lr, s.warmup_steps
            ));
        }
        lines.push(format!("locked: {}", self.lock));
        lines
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
            if self.data.parts > 1 && !s.batch_size.is_multiple_of(self.data.parts) {
                return bad(format!(
                    "{tag}: batch_size {} is not divisible by data.parts {}",
                    s.batch_size, self.data.parts
                ));
            }
            if s.text_length < 3 {
                return bad(format!("{tag}: text_length must be at least 3"));
            }
            for (key, v) in [("base_lr", s.base_lr), ("end_base_lr", s.end_base_lr)] {
                if !(v.is_finite() && v >= 0.0) {
                    return bad(format!(
                        "{tag}: {key} = {v} must be finite and not negative"
                    ));
                }
            }
            for (key, v, range) in [
                ("batch_size", s.batch_size, MAX_BATCH),
                ("text_length", s.text_length, MAX_TEXT_LENGTH),
                ("image_size", s.image_size as usize, MAX_IMAGE_SIZE),
            ] {
                if v > range {
                    return bad(format!(
                        "{tag}: {key} = {v} is out of range (at most {range})"
                    ));
                }
            }
        }
        self.lock.validate(&model)?;
        if self.data.workers > MAX_WORKERS {
            return bad(format!(
                "data.workers = {} is out of range (0 for all cores, at most {MAX_WORKERS})",
                self.data.workers
            ));
        }
        self.validate_numerics()
    }

    /// The optimiser's and the clipping's values: each finite, and in its
    /// range (the error names the key).
    fn validate_numerics(&self) -> Result<()> {
        let o = &self.optimizer;
        let checks = [
            (
                "optimizer.beta1",
                o.beta1,
                (0.0..1.0).contains(&o.beta1),
                "in [0, 1)",
            ),
            (
                "optimizer.beta2",
                o.beta2,
                (0.0..1.0).contains(&o.beta2),
                "in [0, 1)",
            ),
            (
                "optimizer.eps",
                o.eps,
                o.eps.is_finite() && o.eps > 0.0,
                "finite and positive",
            ),
            (
                "optimizer.weight_decay",
                o.weight_decay,
                o.weight_decay.is_finite() && o.weight_decay >= 0.0,
                "finite and not negative",
            ),
        ];
        for (key, value, ok, range) in checks {
            if !ok {
                return Err(Error::Config(format!("{key} = {value} must be {range}")));
            }
        }
        let s = &self.schedule;
        if !(s.cooldown_power.is_finite() && s.cooldown_power > 0.0) {
            return Err(Error::Config(format!(
                "schedule.cooldown_power = {} must be finite and positive",
                s.cooldown_power
            )));
        }
        if s.scheduler == LrScheduler::ConstCooldown && s.cooldown_steps == 0 {
            return Err(Error::Config(
                "the const-cooldown schedule needs a cooldown: --cooldown-steps N or --epochs-cooldown E (schedule.cooldown_steps)".into(),
            ));
        }
        match self.grad_clip {
            Some(c) if !(c.is_finite() && c > 0.0) => Err(Error::Config(format!(
                "grad_clip = {c} must be finite and positive (leave it out for no clipping)"
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_validates_and_round_trips_through_toml() {
        for name in super::super::presets::PRESETS.iter().map(|p| p.name) {
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
