//! The run settings a user overrides on top of a preset or a config file:
//! one typed struct, applied by [`TrainConfig::apply`]. With the `cli`
//! feature it is also `clipa train`'s flag group (`#[command(flatten)]`),
//! so each flag and its help are written once, here.

use std::path::PathBuf;

use super::config::{Precision, ReportTo, TrainConfig};
use super::lit::TowerLock;
use super::schedule::{LrScheduler, base_lr_for};
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
    /// Clip the global gradient norm to this value (OpenCLIP
    /// `--grad-clip-norm`).
    #[cfg_attr(feature = "cli", arg(long, visible_alias = "grad-clip-norm"))]
    pub grad_clip: Option<f64>,
    /// The optimiser and schedule flags OpenCLIP users know.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub optim: OptimOverrides,
    /// Locked towers (LiT), with OpenCLIP's flags.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub lock: LockOverrides,
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
    /// Data-loading threads per part of the data (default: all cores).
    #[cfg_attr(feature = "cli", arg(long))]
    pub workers: Option<usize>,
    /// Read the data in N parts, one loader each, part p taking every N-th
    /// shard (OpenCLIP's split by node). Default: one per machine. Set it
    /// to read a multi-machine run's batches on fewer machines.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub data_parts: Option<usize>,
    /// Where else the logged metrics go, besides metrics.jsonl
    /// (comma-separated; adds to the config's `report_to`).
    #[cfg_attr(feature = "cli", arg(long, value_enum, value_delimiter = ','))]
    pub report_to: Vec<ReportTo>,
}

/// OpenCLIP's optimiser and learning-rate flags. Each overrides every
/// stage; learning rates are the rates themselves (OpenCLIP's meaning),
/// stored per stage as its base rate per 256 samples at its batch.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct OptimOverrides {
    /// Peak learning rate of every stage (after warmup), whatever its batch.
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    pub lr: Option<f64>,
    /// AdamW's decoupled weight decay.
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    pub wd: Option<f64>,
    /// Linear warmup steps of every stage.
    #[cfg_attr(feature = "cli", arg(long))]
    pub warmup: Option<u64>,
    /// AdamW's β₁, in [0, 1).
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    pub beta1: Option<f64>,
    /// AdamW's β₂, in [0, 1).
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    pub beta2: Option<f64>,
    /// AdamW's ε.
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    pub eps: Option<f64>,
    /// The learning rate after warmup: cosine, const or const-cooldown.
    #[cfg_attr(feature = "cli", arg(long))]
    pub lr_scheduler: Option<LrScheduler>,
    /// Where the decay ends (const-cooldown's cooldown, or the cosine), a
    /// learning rate.
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    pub lr_cooldown_end: Option<f64>,
    /// Exponent of the cooldown's decay (1: linear).
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    pub lr_cooldown_power: Option<f64>,
    /// Cooldown length in epochs of --train-num-samples (in steps of the
    /// first stage's batch).
    #[cfg_attr(feature = "cli", arg(long, conflicts_with = "cooldown_steps"))]
    pub epochs_cooldown: Option<f64>,
    /// Cooldown length in steps, at the end of every stage.
    #[cfg_attr(feature = "cli", arg(long))]
    pub cooldown_steps: Option<u64>,
}

/// OpenCLIP's tower-locking flags (LiT).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct LockOverrides {
    /// Lock the image tower (no gradient, no optimiser state); a tower
    /// locked whole runs without autodiff.
    #[cfg_attr(feature = "cli", arg(long))]
    pub lock_image: bool,
    /// Leave the top N layer groups of the locked image tower trainable
    /// (the projection, then the last block with the final LayerNorm, …).
    #[cfg_attr(feature = "cli", arg(long, requires = "lock_image"))]
    pub lock_image_unlocked_groups: Option<usize>,
    /// Lock the text tower.
    #[cfg_attr(feature = "cli", arg(long))]
    pub lock_text: bool,
    /// Leave the top N layer groups of the locked text tower trainable.
    #[cfg_attr(feature = "cli", arg(long, requires = "lock_text"))]
    pub lock_text_unlocked_layers: Option<usize>,
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
        self.apply_optim(&o.optim)?;
        self.apply_lock(&o.lock);
        set(&mut self.skip_nonfinite, &o.skip_nonfinite);
        set(&mut self.precision, &o.precision);
        self.grad_checkpointing |= o.grad_checkpointing;
        for r in &o.report_to {
            if !self.report_to.contains(r) {
                self.report_to.push(*r);
            }
        }
        self.validate()
    }

    /// OpenCLIP's optimiser flags, after the batch is known. A rate that
    /// is not finite or is negative is refused here, naming the flag; the
    /// others are checked by [`TrainConfig::validate`], naming the key.
    fn apply_optim(&mut self, o: &OptimOverrides) -> Result<()> {
        for (flag, v) in [
            ("--lr", o.lr),
            ("--lr-cooldown-end", o.lr_cooldown_end),
            ("--wd", o.wd),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(Error::Config(format!(
                    "{flag} {v} must be finite and not negative"
                )));
            }
        }
        for s in &mut self.stages {
            if let Some(lr) = o.lr {
                s.base_lr = base_lr_for(lr, s.batch_size);
            }
            if let Some(end) = o.lr_cooldown_end {
                s.end_base_lr = base_lr_for(end, s.batch_size);
            }
            set(&mut s.warmup_steps, &o.warmup);
        }
        let opt = &mut self.optimizer;
        set(&mut opt.weight_decay, &o.wd);
        set(&mut opt.beta1, &o.beta1);
        set(&mut opt.beta2, &o.beta2);
        set(&mut opt.eps, &o.eps);
        let sched = &mut self.schedule;
        set(&mut sched.scheduler, &o.lr_scheduler);
        set(&mut sched.cooldown_power, &o.lr_cooldown_power);
        set(&mut sched.cooldown_steps, &o.cooldown_steps);
        if let Some(e) = o.epochs_cooldown {
            let Some(per_epoch) = self.data.train_num_samples else {
                return Err(Error::Config(
                    "--epochs-cooldown needs --train-num-samples (or use --cooldown-steps)".into(),
                ));
            };
            if !(e.is_finite() && e > 0.0) {
                return Err(Error::Config(format!(
                    "--epochs-cooldown {e} must be positive"
                )));
            }
            let batch = self.stages[0].batch_size as f64;
            sched.cooldown_steps = (e * per_epoch as f64 / batch).round().max(1.0) as u64;
        }
        Ok(())
    }

    /// The locking flags: a flag locks its tower, its count sets the
    /// unlocked groups (0 where not given).
    fn apply_lock(&mut self, o: &LockOverrides) {
        let tower = |on: bool, unlocked: Option<usize>| {
            on.then(|| TowerLock {
                unlocked_groups: unlocked.unwrap_or(0),
            })
        };
        if o.lock_image {
            self.lock.image = tower(true, o.lock_image_unlocked_groups);
        }
        if o.lock_text {
            self.lock.text = tower(true, o.lock_text_unlocked_layers);
        }
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
        if let Some(n) = o.data_parts {
            if n == 0 {
                return Err(Error::Config("--data-parts must be positive".into()));
            }
            d.parts = n;
        }
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

    /// OpenCLIP's optimiser flags land on every stage, with `--lr` and
    /// `--lr-cooldown-end` turned into per-256 rates at each stage's batch;
    /// the lock flags lock their tower with the given unlocked groups.
    #[test]
    fn optimiser_and_lock_flags_land_on_every_stage() {
        let mut cfg = TrainConfig::preset("demo").unwrap();
        cfg.stages[1].batch_size = 32; // unequal batches
        cfg.apply(&TrainOverrides {
            optim: OptimOverrides {
                lr: Some(2e-3),
                wd: Some(0.0),
                warmup: Some(3),
                beta2: Some(0.999),
                lr_scheduler: Some(LrScheduler::ConstCooldown),
                cooldown_steps: Some(4),
                lr_cooldown_end: Some(1e-4),
                ..Default::default()
            },
            lock: LockOverrides {
                lock_text: true,
                lock_text_unlocked_layers: Some(2),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        for s in &cfg.stages {
            let scale = s.batch_size as f64 / 256.0;
            assert!((s.base_lr * scale - 2e-3).abs() < 1e-15, "{}", s.name);
            assert!((s.end_base_lr * scale - 1e-4).abs() < 1e-15, "{}", s.name);
            assert_eq!(s.warmup_steps, 3);
        }
        assert_eq!(
            (cfg.optimizer.weight_decay, cfg.optimizer.beta2),
            (0.0, 0.999)
        );
        assert_eq!(cfg.optimizer.beta1, 0.9, "an unset flag keeps the config's");
        assert_eq!(cfg.schedule.scheduler, LrScheduler::ConstCooldown);
        assert_eq!(cfg.schedule.cooldown_steps, 4);
        assert_eq!(cfg.lock.image, None);
        assert_eq!(cfg.lock.text, Some(TowerLock { unlocked_groups: 2 }));
        // --epochs-cooldown counts epochs of --train-num-samples.
        let mut cfg = TrainConfig::preset("tiny").unwrap();
        let per_epoch = TrainOverrides {
            train_num_samples: Some(1600),
            batch_size: Some(16),
            optim: OptimOverrides {
                lr_scheduler: Some(LrScheduler::ConstCooldown),
                epochs_cooldown: Some(0.5),
                ..Default::default()
            },
            ..Default::default()
        };
        cfg.apply(&per_epoch).unwrap();
        assert_eq!(cfg.schedule.cooldown_steps, 50);
        let negative = TrainOverrides {
            optim: OptimOverrides {
                lr: Some(-1.0),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = cfg.apply(&negative).unwrap_err().to_string();
        assert!(err.contains("--lr -1 must be finite"), "{err}");
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
