//! The run settings a user overrides on top of a preset or a config file:
//! one typed struct, applied by [`TrainConfig::apply`]. With the `cli`
//! feature it is also `clipa train`'s flag group (`#[command(flatten)]`),
//! so each flag and its help are written once, here.

use std::path::PathBuf;

use super::config::{Precision, TrainConfig};
use crate::eval::ZeroShotFlags;
use crate::loss::LossKind;
use crate::reduce::{ImageReduction, TextReduction};
use crate::{Error, Result};

/// Overrides of a [`TrainConfig`]. `None` (or `false`) keeps the config's
/// value. On a multi-stage run the image and text settings apply to the
/// first stage, the batch settings to every stage.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TrainOverrides {
    /// Model preset, overriding the training preset's (see `clipa models`),
    /// or an OpenCLIP model-config JSON file (`*.json`; a clipa_torch
    /// config's `text_mask` becomes every stage's text reduction).
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: Option<String>,
    /// Vocabulary of a WordPiece model: a `vocab.txt` or `tokenizer.json`
    /// (the bert-base-uncased tokenizer files, or any CLIPA hub folder's).
    /// The CLIPA-v2 recipes need it; checkpoints keep a copy.
    #[cfg_attr(feature = "cli", arg(long))]
    pub vocab: Option<PathBuf>,
    /// Training data: WebDataset shards (`/data/{00000..00099}.tar`, sources
    /// joined by `::`) or a CSV/TSV file. Default: built-in synthetic data.
    #[cfg_attr(feature = "cli", arg(long))]
    pub train_data: Option<String>,
    /// Weights of `::`-joined sources (`1::0.5`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub train_data_upsampling_factors: Option<String>,
    /// Draw shards with replacement.
    #[cfg_attr(feature = "cli", arg(long))]
    pub dataset_resampled: bool,
    /// Samples in one epoch of --train-data (a WebDataset's size is not
    /// known up front); the log then counts epochs.
    #[cfg_attr(feature = "cli", arg(long))]
    pub train_num_samples: Option<u64>,
    /// Train this many epochs of --train-num-samples samples, split across
    /// stages in the preset's proportions (instead of --steps).
    #[cfg_attr(feature = "cli", arg(long, conflicts_with = "steps"))]
    pub epochs: Option<f64>,
    /// CSV column with image paths.
    #[cfg_attr(feature = "cli", arg(long))]
    pub csv_img_key: Option<String>,
    /// CSV column with captions.
    #[cfg_attr(feature = "cli", arg(long))]
    pub csv_caption_key: Option<String>,
    /// The zero-shot evaluation set.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub zeroshot: ZeroShotFlags,
    /// Total optimiser steps, split across stages in the preset's proportions.
    #[cfg_attr(feature = "cli", arg(long))]
    pub steps: Option<u64>,
    /// Global batch size (every stage).
    #[cfg_attr(feature = "cli", arg(long))]
    pub batch_size: Option<usize>,
    /// Micro-batches per step (cached-feature accumulation; every stage).
    #[cfg_attr(feature = "cli", arg(long))]
    pub accum_steps: Option<usize>,
    /// Image size in pixels (first stage).
    #[cfg_attr(feature = "cli", arg(long))]
    pub image_size: Option<u32>,
    /// Image token reduction (first stage): none | resize:PX | random:RATIO |
    /// grid:K[:KEPT] | block:RATIO.
    #[cfg_attr(feature = "cli", arg(long))]
    pub image_reduction: Option<ImageReduction>,
    /// Text length in tokens (first stage).
    #[cfg_attr(feature = "cli", arg(long))]
    pub text_length: Option<usize>,
    /// Text token reduction (first stage): truncate | random | block | syntax.
    #[cfg_attr(feature = "cli", arg(long))]
    pub text_reduction: Option<TextReduction>,
    /// Loss: softmax (CLIP) or sigmoid (SigLIP).
    #[cfg_attr(feature = "cli", arg(long))]
    pub loss: Option<LossKind>,
    /// Master seed.
    #[cfg_attr(feature = "cli", arg(long))]
    pub seed: Option<u64>,
    /// Log every N steps.
    #[cfg_attr(feature = "cli", arg(long))]
    pub log_every: Option<u64>,
    /// Checkpoint every N steps.
    #[cfg_attr(feature = "cli", arg(long))]
    pub checkpoint_every: Option<u64>,
    /// Zero-shot evaluation every N steps (always at the end of a stage).
    #[cfg_attr(feature = "cli", arg(long))]
    pub eval_every: Option<u64>,
    /// Clip the gradient norm.
    #[cfg_attr(feature = "cli", arg(long))]
    pub grad_clip: Option<f64>,
    /// Skip up to N non-finite steps instead of stopping.
    #[cfg_attr(feature = "cli", arg(long))]
    pub skip_nonfinite: Option<u32>,
    /// Block compute precision: auto (bf16 on CUDA tensor cores, else f32),
    /// f32, or bf16 (float32 master weights, LayerNorms and loss).
    #[cfg_attr(feature = "cli", arg(long))]
    pub precision: Option<Precision>,
    /// Per-block activation checkpointing: recompute each transformer block
    /// in the backward pass instead of keeping its activations (for large
    /// models on one GPU; about a third more compute).
    #[cfg_attr(feature = "cli", arg(long))]
    pub grad_checkpointing: bool,
    /// Data-loading threads (default: all cores).
    #[cfg_attr(feature = "cli", arg(long))]
    pub workers: Option<usize>,
}

/// `value` into `slot` where given.
fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
    if let Some(v) = value {
        *slot = v.clone();
    }
}

impl TrainConfig {
    /// Applies `o` and validates the result: model first (a clipa_torch
    /// config's `text_mask` becomes every stage's text reduction), then
    /// data, the run length (`steps` or `epochs`), every stage's batch,
    /// the first stage's image and text, and the run's cadence and numerics.
    pub fn apply(&mut self, o: &TrainOverrides) -> Result<()> {
        if let Some(m) = &o.model {
            self.model = m.clone();
            if let Some(mask) = self.model_text_mask()? {
                for s in &mut self.stages {
                    s.text_reduction = mask;
                }
            }
        }
        if o.vocab.is_some() {
            self.vocab = o.vocab.clone();
        }
        self.apply_data(o)?;
        if let Some(n) = o.steps {
            if n == 0 {
                return Err(Error::Config(
                    "--steps 0: a run needs at least one step".into(),
                ));
            }
            self.set_total_steps(n);
        }
        for s in &mut self.stages {
            set(&mut s.batch_size, &o.batch_size);
            set(&mut s.accum_steps, &o.accum_steps);
        }
        if let Some(e) = o.epochs {
            let Some(per_epoch) = self.data.train_num_samples else {
                return Err(Error::Config(
                    "--epochs needs --train-num-samples (or data.train_num_samples in the config)"
                        .into(),
                ));
            };
            if !(e.is_finite() && e > 0.0) {
                return Err(Error::Config(format!("--epochs {e} must be positive")));
            }
            self.set_total_samples((e * per_epoch as f64).round() as u64);
        }
        let first = &mut self.stages[0];
        set(&mut first.image_size, &o.image_size);
        set(&mut first.image_reduction, &o.image_reduction);
        set(&mut first.text_length, &o.text_length);
        set(&mut first.text_reduction, &o.text_reduction);
        set(&mut self.seed, &o.seed);
        set(&mut self.loss, &o.loss);
        set(&mut self.log_every, &o.log_every);
        set(&mut self.checkpoint_every, &o.checkpoint_every);
        set(&mut self.eval_every, &o.eval_every);
        if o.grad_clip.is_some() {
            self.grad_clip = o.grad_clip;
        }
        set(&mut self.skip_nonfinite, &o.skip_nonfinite);
        set(&mut self.precision, &o.precision);
        self.grad_checkpointing |= o.grad_checkpointing;
        self.validate()
    }

    /// The data settings of `o`.
    fn apply_data(&mut self, o: &TrainOverrides) -> Result<()> {
        let d = &mut self.data;
        if o.train_data.is_some() {
            d.train_data = o.train_data.clone();
        }
        if o.train_data_upsampling_factors.is_some() {
            d.train_data_weights = o.train_data_upsampling_factors.clone();
        }
        d.dataset_resampled |= o.dataset_resampled;
        set(&mut d.csv_img_key, &o.csv_img_key);
        set(&mut d.csv_caption_key, &o.csv_caption_key);
        let z = &o.zeroshot;
        if z.templates.is_some() {
            d.templates = z.templates.clone();
        }
        if z.zeroshot_data.is_some() {
            d.zeroshot_data = z.zeroshot_data.clone();
        }
        if z.classnames.is_some() {
            d.classnames = z.classnames.clone();
        }
        set(&mut d.workers, &o.workers);
        if let Some(n) = o.train_num_samples {
            if n == 0 {
                return Err(Error::Config("--train-num-samples must be positive".into()));
            }
            d.train_num_samples = Some(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overrides land where they say: data on the run, batch on every
    /// stage, image and text on the first; unset ones keep the preset's.
    #[test]
    fn overrides_land_on_their_stage_and_keep_the_rest() {
        let mut cfg = TrainConfig::preset("demo").unwrap();
        let before = cfg.clone();
        cfg.apply(&TrainOverrides {
            batch_size: Some(8),
            image_reduction: Some("random:0.5".parse().unwrap()),
            text_length: Some(12),
            loss: Some(LossKind::Sigmoid),
            steps: Some(10),
            zeroshot: ZeroShotFlags {
                zeroshot_data: Some("zs".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert!(cfg.stages.iter().all(|s| s.batch_size == 8));
        assert_eq!(cfg.stages[0].image_reduction, "random:0.5".parse().unwrap());
        assert_eq!(
            cfg.stages[1].image_reduction,
            before.stages[1].image_reduction
        );
        assert_eq!(
            (cfg.stages[0].text_length, cfg.stages[1].text_length),
            (12, 16)
        );
        assert_eq!(cfg.total_steps(), 10);
        assert_eq!(cfg.loss, LossKind::Sigmoid);
        assert_eq!(cfg.data.zeroshot_data, Some("zs".into()));
        assert_eq!((cfg.seed, cfg.precision), (before.seed, before.precision));
        let mut cfg = before.clone();
        cfg.apply(&TrainOverrides::default()).unwrap();
        assert_eq!(cfg, before, "no overrides, no change");
    }

    /// `epochs` needs an epoch size, and a bad override is refused by the
    /// validation that follows.
    #[test]
    fn bad_overrides_are_config_errors() {
        let mut cfg = TrainConfig::preset("tiny").unwrap();
        let epochs = TrainOverrides {
            epochs: Some(2.0),
            ..Default::default()
        };
        assert!(matches!(cfg.apply(&epochs), Err(Error::Config(_))));
        let zero = TrainOverrides {
            batch_size: Some(0),
            ..Default::default()
        };
        assert!(cfg.apply(&zero).is_err());
    }
}
