//! Where a run starts: a resumed checkpoint, given weights, or a fresh
//! initialisation from the seed.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;

use super::super::config::{LossKind, TrainConfig};
use super::super::runstate::{self, Manifest};
use super::super::{Feed, Observer, Resume, RunOptions};
use crate::checkpoint::Checkpoint;
use crate::data::DataStatsSnapshot;
use crate::data::tokenizer::Tokenizer;
use crate::model::ClipModel;
use crate::state::{StateDict, load_state_dict};
use crate::{Error, Result};

/// What a run starts from.
pub(super) struct Start<B: AutodiffBackend> {
    pub(super) model: ClipModel<B>,
    /// The model's tokenizer: from the checkpoint a run resumes or starts
    /// from, else from the model config and `vocab`.
    pub(super) tokenizer: Tokenizer,
    pub(super) manifest: Manifest,
    /// The optimiser state of a resumed stage.
    pub(super) optim_state: Option<StateDict>,
    /// The checkpoint resumed from.
    pub(super) from: Option<PathBuf>,
}

/// Resumes the checkpoint `opts` names, or loads `--init-from` weights, or
/// initialises the config's model from the seed.
///
/// A little over one screen: the three ways a run starts, in order of
/// precedence, each with the checks that keep it from losing work.
pub(super) fn start<B: AutodiffBackend>(
    cfg: &TrainConfig,
    opts: &RunOptions,
    device: &B::Device,
    feed: &Feed,
    observer: &mut dyn Observer,
) -> Result<Start<B>> {
    let run = opts.output.as_path();
    let loaded = match &opts.resume {
        None => None,
        Some(Resume::Latest) => newest_intact(run, observer)?,
        // A checkpoint the user named is used as it is or not at all.
        Some(Resume::Dir(d)) => Some((d.clone(), runstate::load(d)?)),
    };
    if let Some((dir, (manifest, saved, optim))) = loaded {
        runstate::check_resumable(&manifest.config, cfg)?;
        let model = load_state_dict(saved.config.init(device), &saved.state)?;
        observer.message(&format!(
            "resuming from {} (step {})",
            dir.display(),
            manifest.step
        ));
        return Ok(Start {
            model,
            tokenizer: saved.tokenizer,
            manifest,
            optim_state: Some(optim),
            from: Some(dir),
        });
    }
    if opts.resume.is_some() {
        observer.message("no checkpoint in the run folder yet: starting fresh");
    }
    if !runstate::list(run)?.is_empty() {
        return Err(Error::Config(format!(
            "{} already holds checkpoints: pass --resume latest to continue it, or choose another --output",
            run.display()
        )));
    }
    let (model, tokenizer) = match &opts.init_from {
        Some(dir) => {
            if let Some(vocab) = &cfg.vocab {
                return Err(Error::Config(format!(
                    "a vocabulary ({}) and --init-from {}: the checkpoint carries its own tokenizer",
                    vocab.display(),
                    dir.display()
                )));
            }
            let loaded = crate::checkpoint::load_model_or_hub::<B>(dir, device)?;
            observer.message(&format!("initialised from {}", dir.display()));
            loaded
        }
        None => {
            let mut model_cfg = cfg.model_config()?;
            if cfg.loss == LossKind::Sigmoid {
                // SigLIP init: t' = ln 10, b = −10.
                model_cfg.init_logit_scale = 10f64.ln();
                model_cfg.init_logit_bias = Some(-10.0);
            }
            let tokenizer = Tokenizer::for_text(&model_cfg.text, cfg.vocab.as_deref())?;
            let _turn = feed.init.lock().unwrap_or_else(|e| e.into_inner());
            B::seed(device, cfg.seed);
            let model = model_cfg.init(device);
            // Burn initialises a parameter when it is first read: draw
            // every one now, in module order, while this replica holds the
            // seeded generator. Read later, the replicas' draws interleave
            // (the CPU backend's generator is one per process) and the
            // weights depend on thread timing.
            model.visit(&mut Materialize);
            (model, tokenizer)
        }
    };
    let manifest = Manifest {
        version: runstate::MANIFEST_VERSION,
        step: 0,
        stage: 0,
        stage_step: 0,
        loader: Vec::new(),
        data: DataStatsSnapshot::default(),
        nonfinite_skipped: 0,
        train_seconds: 0.0,
        config: cfg.clone(),
        files: Default::default(),
    };
    Ok(Start {
        model,
        tokenizer,
        manifest,
        optim_state: None,
        from: None,
    })
}

/// A checkpoint folder and what it holds ([`runstate::load`]).
type Loaded = (PathBuf, (Manifest, Checkpoint, StateDict));

/// The newest checkpoint of `run` that loads with every file matching its
/// digest. Each newer one that does not is named, with why, and moved
/// aside to `checkpoints/damaged-step-…` (kept for a look, never listed or
/// removed again). `None` where the run has no checkpoint; an error where
/// it has some and none is intact.
fn newest_intact(run: &Path, observer: &mut dyn Observer) -> Result<Option<Loaded>> {
    let all = runstate::list(run)?;
    for (_, dir) in all.iter().rev() {
        let err = match runstate::load(dir) {
            Ok(loaded) => return Ok(Some((dir.clone(), loaded))),
            Err(err) => err,
        };
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("step");
        let aside = dir.with_file_name(format!("damaged-{name}"));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(dir, &aside).map_err(|e| Error::io(dir, e))?;
        observer.message(&format!(
            "checkpoint {} is unusable ({err}); moved aside to {}, resuming from the one before it",
            dir.display(),
            aside.display()
        ));
    }
    match all.is_empty() {
        true => Ok(None),
        false => Err(Error::Format {
            path: runstate::checkpoints_dir(run),
            reason: format!("none of its {} checkpoints is intact", all.len()),
        }),
    }
}

/// Reads every parameter once, which initialises a lazy one.
struct Materialize;

impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(
        &mut self,
        param: &burn::module::Param<burn::tensor::Tensor<B, D>>,
    ) {
        let _ = param.val();
    }
}
