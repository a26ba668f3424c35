//! The data side of a training stage: which source (built-in synthetic set,
//! WebDataset shards or CSV), the loader at the stage's image size, text
//! reduction of each batch, and the zero-shot evaluation set.

use std::sync::Arc;

use burn::tensor::backend::Backend;

use super::config::{StageConfig, TrainConfig};
use crate::Result;
use crate::data::augment::{ImageTransform, TrainAugment};
use crate::data::loader::{Loader, LoaderConfig, LoaderState};
use crate::data::part::{Part, part_seed};
use crate::data::synthetic::{self, Split, SyntheticCaptions};
use crate::data::tokenizer::Tokenizer;
use crate::data::{DataStatsSnapshot, ShardSource, open_caption_source};
use crate::eval::evaluator::{EvalResult, EvaluatorConfig, ZeroShotEval, score_labelled};
use crate::eval::{ZeroShotResult, ZeroShotTask};
use crate::model::ClipModel;
use crate::reduce::TextReducer;
use crate::reduce::syntax::Lexicon;

/// Samples in one pass of the built-in synthetic training set.
pub const SYNTHETIC_TRAIN_LEN: usize = 1 << 20;
/// Held-out images the synthetic zero-shot evaluation scores.
pub const SYNTHETIC_EVAL_LEN: usize = 480;

/// A batch ready for the device.
pub struct StageBatch {
    /// `[batch, px, px, 3]` u8.
    pub images: Vec<u8>,
    /// `[batch, context]` token ids.
    pub ids: Vec<i64>,
    /// The loader position after this batch.
    pub state: LoaderState,
}

/// The loader and text reducer of one stage: of its whole batch, or of
/// one part of it ([`crate::data::part`]).
pub struct StageData {
    loader: Loader,
    reducer: TextReducer,
    tokenizer: Tokenizer,
    seed: u64,
    /// The stage's global batch.
    batch_size: usize,
    /// Global row of this loader's first row in every batch.
    first_row: usize,
}

/// Which part of the data a loader reads: part `part` of `parts`, with
/// `loaders` loaders in this process (they share its cores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartOf {
    /// This loader's part, `0..parts`.
    pub part: usize,
    /// Parts the data is read in.
    pub parts: usize,
    /// Loaders this process runs.
    pub loaders: usize,
}

impl PartOf {
    /// The whole data, one loader.
    pub const WHOLE: Self = Self {
        part: 0,
        parts: 1,
        loaders: 1,
    };
}

/// The training source a config names.
pub fn train_source(cfg: &TrainConfig, px: u32) -> Result<Arc<dyn ShardSource>> {
    let d = &cfg.data;
    match &d.train_data {
        None => Ok(Arc::new(SyntheticCaptions::new(
            Split::Train,
            SYNTHETIC_TRAIN_LEN,
            px,
            cfg.seed,
        ))),
        Some(spec) => open_caption_source(
            spec,
            d.train_data_weights.as_deref(),
            &d.csv_img_key,
            &d.csv_caption_key,
        ),
    }
}

impl StageData {
    /// Starts the stage's loader, at `resume` when continuing mid-stage.
    pub fn start(
        cfg: &TrainConfig,
        stage: &StageConfig,
        of: PartOf,
        resume: Option<LoaderState>,
        tokenizer: &Tokenizer,
        lexicon: Option<Arc<Lexicon>>,
    ) -> Result<Self> {
        let px = stage.image_reduction.image_size(stage.image_size);
        let mut source = train_source(cfg, px)?;
        if of.parts > 1 {
            source = Arc::new(Part::new(
                source,
                of.part,
                of.parts,
                cfg.data.dataset_resampled,
            )?);
        }
        // The synthetic set is rendered at the stage's size and its captions
        // name positions, so it is only resized (a random crop would move the
        // shape away from the place its caption names).
        let transform = if cfg.data.train_data.is_none() {
            ImageTransform::EvalSquash
        } else if cfg.data.color_jitter {
            ImageTransform::Train(TrainAugment::clipa_strong())
        } else {
            ImageTransform::Train(TrainAugment::default())
        };
        // Threads per loader: all cores shared by this process's loaders.
        let workers = match cfg.data.workers {
            0 => (std::thread::available_parallelism().map_or(1, |n| n.get()) / of.loaders).max(1),
            n => n,
        };
        let rows = stage.batch_size / of.parts;
        let loader = Loader::start(
            source,
            LoaderConfig {
                batch_size: rows,
                image_size: px,
                workers,
                prefetch: 4,
                shuffle_buffer: if cfg.data.train_data.is_none() {
                    1
                } else {
                    2048
                },
                seed: part_seed(cfg.seed, of.part),
                resampled: cfg.data.dataset_resampled,
                transform,
                max_bad_fraction: cfg.data.max_bad_fraction,
            },
            resume,
        )?;
        let mut reducer = TextReducer::new(stage.text_reduction, stage.text_length);
        if let Some(lex) = lexicon {
            reducer = reducer.with_lexicon(lex);
        }
        Ok(Self {
            loader,
            reducer,
            tokenizer: tokenizer.clone(),
            seed: cfg.seed,
            batch_size: stage.batch_size,
            first_row: of.part * rows,
        })
    }

    /// This loader's rows of global step `step`'s batch, their captions
    /// reduced to the stage's text length with masks keyed by
    /// `(seed, step, global sample)`.
    pub fn next(&mut self, step: u64) -> Result<StageBatch> {
        let batch = self.loader.next_batch()?;
        let first = step * self.batch_size as u64 + self.first_row as u64;
        let ids = self
            .reducer
            .apply_batch(&self.tokenizer, &batch.captions, self.seed, step, first)
            .into_iter()
            .map(i64::from)
            .collect();
        Ok(StageBatch {
            images: batch.images,
            ids,
            state: batch.state,
        })
    }

    /// Good and bad data so far.
    pub fn stats(&self) -> DataStatsSnapshot {
        self.loader.stats()
    }
}

/// Zero-shot evaluation of `model` at its current image size and context:
/// the held-out pairs of the synthetic set when training on it, or the
/// `zeroshot_data` image folder. `None` when there is nothing to evaluate.
pub fn zeroshot_eval<B: Backend>(
    cfg: &TrainConfig,
    model: &ClipModel<B>,
    tokenizer: &Tokenizer,
    device: &B::Device,
) -> Result<Option<ZeroShotResult>> {
    let px = model.config.vision.image_size as u32;
    match (&cfg.data.zeroshot_data, &cfg.data.train_data) {
        (Some(root), _) => {
            let eval = EvaluatorConfig::Zeroshot(ZeroShotEval {
                name: "zeroshot".into(),
                data: root.clone(),
                classnames: cfg.data.classnames.clone(),
                templates: cfg.data.templates.clone(),
                resize: None,
            });
            match eval.run(model, tokenizer, device, None, &mut |_| {})? {
                EvalResult::Zeroshot(r) => Ok(Some(r)),
                EvalResult::Retrieval(_) => unreachable!("a zero-shot evaluator"),
            }
        }
        (None, None) => {
            let held =
                SyntheticCaptions::new(Split::HeldOut, SYNTHETIC_EVAL_LEN, px, cfg.seed ^ 0xE7A1);
            let task = ZeroShotTask {
                classnames: synthetic::class_names(),
                templates: synthetic::templates(),
            };
            let classifier =
                task.classifier(model, tokenizer, model.config.text.context_length, device);
            score_labelled(
                model,
                &classifier,
                &held,
                ImageTransform::EvalSquash,
                &mut |_| {},
            )
            .map(Some)
        }
        (None, Some(_)) => Ok(None),
    }
}
