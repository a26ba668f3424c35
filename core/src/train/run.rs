//! One replica's run, top to bottom, as nanoGPT's `train.py` reads: start
//! (resume a checkpoint, start from given weights, or initialise), then
//! each stage's steps (learning rate → batch → [`train_step`]) with the
//! cadence of logging, evaluation and checkpoints ([`every`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use super::batch::DeviceBatch;
use super::config::{StageConfig, TrainConfig};
use super::data::StageData;
use super::optim::AdamW;
use super::runstate::{self, Manifest};
use super::schedule::{StageSchedule, scaled_lr};
use super::step::{StepConfig, StepValues, train_step};
use super::{Feed, Observer, RunOptions, StageReport, TrainSummary, every};
use crate::data::loader::LoaderState;
use crate::data::tokenizer::Tokenizer;
use crate::dist::Replica;
use crate::model::ClipModel;
use crate::reduce::syntax::Lexicon;
use crate::state::{StateDict, state_dict};
use crate::{Error, Result};

mod record;
mod start;

use record::{Evaluation, Outputs, Window};
use start::{Start, start};

/// One replica's training loop ([`super::train`] with one replica): start,
/// then each stage in turn, then the summary.
pub(super) fn train_replica<B: AutodiffBackend>(
    cfg: TrainConfig,
    opts: &RunOptions,
    device: &B::Device,
    replica: &Replica<B>,
    feed: &Feed,
    observer: &mut dyn Observer,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let run = opts.output.as_path();
    std::fs::create_dir_all(run).map_err(|e| Error::io(run, e))?;
    let Start {
        model,
        tokenizer,
        mut manifest,
        mut optim_state,
        from,
    } = start::<B>(&cfg, opts, device, feed, observer)?;
    // Replicas start from replica 0's weights (equal already, unless a
    // backend's initialisation is not reproducible across devices).
    let mut model = replica.share_weights(model)?;
    // The settings that may change on resume come from the new config.
    manifest.config = cfg.clone();
    set_precision(&mut model, &cfg, device, replica.world(), observer)?;
    let out = Outputs::open(run, &cfg, replica.is_leader(), manifest.step, from)?;
    let lexicon = match &opts.lexicon {
        Some(p) => Some(Arc::new(Lexicon::from_file(p)?)),
        None => None,
    };
    let mut runner = Runner {
        cfg: &cfg,
        opts,
        device,
        replica,
        feed,
        tokenizer,
        lexicon,
        manifest,
        out,
    };
    let mut interrupted = false;
    for (si, stage) in cfg.stages.iter().enumerate().skip(runner.manifest.stage) {
        (model, interrupted) = runner.stage(si, stage, model, optim_state.take(), observer)?;
        if interrupted {
            break;
        }
    }
    runner.finish(interrupted)
}

/// Sets the blocks' compute dtype from the config's precision and says
/// what the run computes in, and on how many replicas.
fn set_precision<B: AutodiffBackend>(
    model: &mut ClipModel<B>,
    cfg: &TrainConfig,
    device: &B::Device,
    world: usize,
    observer: &mut dyn Observer,
) -> Result<()> {
    let compute = cfg.precision.compute_dtype::<B>(device)?;
    model.set_compute_dtype(compute);
    observer.message(match compute {
        Some(_) => "precision: bf16 blocks, float32 master weights, LayerNorms and loss",
        None => "precision: float32",
    });
    if world > 1 {
        observer.message(&format!(
            "data parallel: {world} replicas, each on 1/{world} of every batch"
        ));
    }
    Ok(())
}

/// A replica's run as it goes: what every step reads, the resumable
/// position (the manifest) and the outputs.
struct Runner<'a, B: AutodiffBackend> {
    cfg: &'a TrainConfig,
    opts: &'a RunOptions,
    device: &'a B::Device,
    replica: &'a Replica<B>,
    feed: &'a Feed,
    tokenizer: Tokenizer,
    lexicon: Option<Arc<Lexicon>>,
    manifest: Manifest,
    out: Outputs,
}

/// One stage's settings, fixed for its steps.
struct Stage<'s> {
    index: usize,
    config: &'s StageConfig,
    /// Image side the tower sees (after a resize reduction).
    px: usize,
    /// The learning rate, step by step.
    schedule: StageSchedule,
    step: StepConfig,
}

impl<B: AutodiffBackend> Runner<'_, B> {
    /// Stage `si`'s remaining steps; returns the model and whether the run
    /// was interrupted.
    fn stage(
        &mut self,
        si: usize,
        config: &StageConfig,
        model: ClipModel<B>,
        optim_state: Option<StateDict>,
        observer: &mut dyn Observer,
    ) -> Result<(ClipModel<B>, bool)> {
        let px = config.image_reduction.image_size(config.image_size) as usize;
        // The lock is laid again on every stage: a resize rebuilds the
        // position tables.
        let (mut model, frozen) = self.cfg.lock.apply(model.resize(px, config.text_length));
        if frozen > 0 && si == self.manifest.stage {
            observer.message(&format!(
                "locked: {} ({:.1} M parameters frozen, no gradient or optimiser state)",
                self.cfg.lock,
                frozen as f64 / 1e6
            ));
        }
        // A stage resumed mid-way keeps its optimiser; a new one restarts it.
        let mut opt = match optim_state {
            Some(state) if self.manifest.stage_step > 0 => {
                AdamW::load_state_dict(self.cfg.optimizer, &state, self.device)?
            }
            _ => AdamW::new(self.cfg.optimizer),
        };
        let stage = Stage {
            index: si,
            config,
            px,
            schedule: StageSchedule {
                config: self.cfg.schedule,
                total: config.steps,
                warmup: config.warmup_steps,
                peak: scaled_lr(config.base_lr, config.batch_size),
                end: scaled_lr(config.end_base_lr, config.batch_size),
            },
            step: StepConfig {
                loss: self.cfg.loss,
                accum_steps: config.accum_steps,
                grad_checkpointing: self.cfg.grad_checkpointing,
                grad_clip: self.cfg.grad_clip,
                frozen: self.cfg.lock.frozen(),
                timed: false,
            },
        };
        let resume_loader = std::mem::take(&mut self.manifest.loader);
        observer.stage_start(si, config, self.manifest.stage_step);
        let started = Instant::now();
        let mut window = Window::new();
        let mut interrupted = false;
        while self.manifest.stage_step < config.steps {
            let lr;
            (model, lr) = self.step(&stage, model, &mut opt, &resume_loader, &mut window)?;
            let stage_done = self.manifest.stage_step == config.steps;
            self.log_and_evaluate(&stage, &model, lr, &mut window, observer)?;
            // Every replica stops at the same step, whichever saw the signal.
            let signal = self.opts.interrupt.load(Ordering::SeqCst);
            interrupted = self.replica.any(signal, self.device)?;
            if self.checkpoint_due(stage_done, interrupted) {
                // The manifest counts the skipped steps up to this one.
                self.settle(&mut window, observer)?;
                self.checkpoint(si, stage_done, &model, &opt)?;
            }
            if interrupted {
                observer.message(&format!(
                    "interrupted: checkpoint written at step {}",
                    self.manifest.step
                ));
            }
            if interrupted || stage_done {
                // `stage_step` was reset for the checkpoint: leave by hand.
                break;
            }
        }
        self.stage_end(si, config, started.elapsed().as_secs_f64());
        Ok((model, interrupted))
    }

    /// One step: learning rate → batch → reduce → [`train_step`].
    fn step(
        &mut self,
        stage: &Stage<'_>,
        model: ClipModel<B>,
        opt: &mut AdamW<B::InnerBackend>,
        resume_loader: &[LoaderState],
        window: &mut Window<B::InnerBackend>,
    ) -> Result<(ClipModel<B>, f64)> {
        let (cfg, config, m) = (self.cfg, stage.config, &self.manifest);
        let lr = stage.schedule.lr(m.stage_step);
        let t0 = Instant::now();
        let batch = self.feed.batch(stage.index, m.step, |of| {
            let resume = match resume_loader.len() {
                0 => None,
                n if n == of.parts => Some(resume_loader[of.part].clone()),
                n => {
                    return Err(Error::Config(format!(
                        "the checkpoint holds {n} loader positions, but the data is read in {} parts",
                        of.parts
                    )));
                }
            };
            StageData::start(
                cfg,
                config,
                of,
                resume,
                &self.tokenizer,
                self.lexicon.clone(),
            )
        })?;
        window.wait += t0.elapsed().as_secs_f64();
        // Masks are drawn for the global batch (keyed by global sample
        // index). This process holds the rows of its parts of the data,
        // global rows `first_row..`, and this replica takes its `n` of them
        // (global rows `rank·n..`).
        let g = stage.px / model.config.vision.patch_size;
        let first = m.step * config.batch_size as u64;
        let keep =
            config
                .image_reduction
                .keep_indices((g, g), config.batch_size, cfg.seed, m.step, first);
        let (n, rank) = (
            config.batch_size / self.replica.world(),
            self.replica.rank(),
        );
        let local = rank - self.replica.local_first();
        let device_batch = DeviceBatch::<B>::from_host(
            &batch.images,
            &batch.ids,
            keep.as_ref()
                .map(|(kept, idx)| (*kept, &idx[rank * n * kept..(rank + 1) * n * kept])),
            local * n..(local + 1) * n,
            stage.px,
            &model.config.normalization,
            self.device,
        );
        let (model, stats) = train_step(model, opt, &device_batch, lr, &stage.step, self.replica)?;
        self.manifest.step += 1;
        window.add(self.manifest.step, stats);
        self.manifest.stage_step += 1;
        self.manifest.loader = batch.states.clone();
        window.images += config.batch_size;
        Ok((model, lr))
    }

    /// Logs the steps since the last log line where one is due (every
    /// `log_every` steps, at an evaluation, at the stage end), evaluating
    /// first where an evaluation is due.
    fn log_and_evaluate(
        &mut self,
        stage: &Stage<'_>,
        model: &ClipModel<B>,
        lr: f64,
        window: &mut Window<B::InnerBackend>,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let (cfg, step) = (self.cfg, self.manifest.step);
        let stage_done = self.manifest.stage_step == stage.config.steps;
        let eval_now = cfg.eval_every > 0 && every(step, cfg.eval_every);
        if !(every(step, cfg.log_every) || stage_done || eval_now) {
            return Ok(());
        }
        self.settle(window, observer)?;
        let mut m = window.metrics(cfg, &self.manifest, stage.index, lr, model);
        // One inference copy of the model serves every evaluation, on
        // replica 0 (the others wait for it at the next step).
        if self.replica.is_leader() && (eval_now || stage_done) {
            let eval = Evaluation::<B> {
                cfg,
                tokenizer: &self.tokenizer,
                device: self.device,
            };
            let zeroshot = eval.run(&model.valid(), &mut m, observer)?;
            if let (true, Some(r)) = (stage_done, zeroshot) {
                self.out.reports.push(StageReport {
                    name: stage.config.name.clone(),
                    seconds: 0.0,
                    zeroshot: Some(r),
                });
            }
        }
        self.out.log(&m, &self.opts.output)?;
        observer.log(&m, self.manifest.stage_step);
        *window = Window::new();
        Ok(())
    }

    /// Whether a checkpoint is due: every `checkpoint_every` steps, at the
    /// stage end and when interrupted.
    fn checkpoint_due(&self, stage_done: bool, interrupted: bool) -> bool {
        every(self.manifest.step, self.cfg.checkpoint_every) || stage_done || interrupted
    }

    /// Writes a checkpoint (replica 0).
    fn checkpoint(
        &mut self,
        si: usize,
        stage_done: bool,
        model: &ClipModel<B>,
        opt: &AdamW<B::InnerBackend>,
    ) -> Result<()> {
        if stage_done {
            // The next stage starts fresh: new loaders, new optimiser.
            let m = &mut self.manifest;
            m.stage = si + 1;
            m.stage_step = 0;
            m.loader.clear();
        } else if self.replica.nodes() > 1 {
            // Every machine's loaders, in part order, for the checkpoint
            // (replica 0 writes it; each machine's first replica speaks).
            self.manifest.loader = self.gather_positions()?;
        }
        let m = &mut self.manifest;
        m.data = self.feed.stats();
        if self.replica.is_leader() {
            self.out.last_checkpoint = Some(runstate::save(
                &self.opts.output,
                m,
                &model.config,
                &state_dict(model),
                &self.tokenizer,
                &opt.state_dict(),
                self.cfg.keep_checkpoints,
            )?);
        }
        Ok(())
    }

    /// Every machine's loader positions, in part order (machines hold
    /// consecutive parts): an all-gather of each machine's, as JSON.
    fn gather_positions(&self) -> Result<Vec<LoaderState>> {
        let mine = match self.replica.is_local_leader() {
            true => serde_json::to_vec(&self.manifest.loader).expect("positions serialise"),
            false => Vec::new(),
        };
        let mut all = Vec::new();
        for bytes in self.replica.gather_bytes(&mine, self.device)? {
            if bytes.is_empty() {
                continue;
            }
            let part: Vec<LoaderState> = serde_json::from_slice(&bytes).map_err(|e| {
                Error::Collective(format!("a machine sent unreadable loader positions: {e}"))
            })?;
            all.extend(part);
        }
        Ok(all)
    }

    /// Reads the window's pending step stats (one host read) and counts
    /// the steps that were not applied.
    fn settle(
        &mut self,
        window: &mut Window<B::InnerBackend>,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        for (step, values) in window.settle() {
            skip_nonfinite(self.cfg, &mut self.manifest, step, &values, observer)?;
        }
        Ok(())
    }

    /// Books a finished (or interrupted) stage's time and report.
    fn stage_end(&mut self, si: usize, config: &StageConfig, secs: f64) {
        let m = &mut self.manifest;
        m.train_seconds += secs;
        match self.out.reports.last_mut() {
            Some(r) if r.name == config.name => r.seconds = secs,
            _ => self.out.reports.push(StageReport {
                name: config.name.clone(),
                seconds: secs,
                zeroshot: None,
            }),
        }
        m.data = self.feed.stats();
        if m.stage == si && m.stage_step >= config.steps {
            // Resumed exactly at a stage end that was already checkpointed.
            m.stage = si + 1;
            m.stage_step = 0;
        }
    }

    /// The run's summary, written to `summary.json` by replica 0.
    fn finish(self, interrupted: bool) -> Result<TrainSummary> {
        let summary = TrainSummary {
            run_dir: self.opts.output.clone(),
            steps: self.manifest.step,
            interrupted,
            stages: self.out.reports,
            data: self.manifest.data,
            nonfinite_skipped: self.manifest.nonfinite_skipped,
            checkpoint: self.out.last_checkpoint,
        };
        if self.replica.is_leader() {
            let json = serde_json::to_string_pretty(&summary).expect("summaries serialise");
            crate::io::write_atomic(&self.opts.output.join("summary.json"), json.as_bytes())?;
        }
        Ok(summary)
    }
}

/// Counts step `step`, whose loss or gradient norm was not finite (the
/// device did not apply its update); past `skip_nonfinite` of them the run
/// stops. Found when the window is read (a log or checkpoint step), not at
/// the step itself: the weights were left as they were either way.
fn skip_nonfinite(
    cfg: &TrainConfig,
    manifest: &mut Manifest,
    step: u64,
    values: &StepValues,
    observer: &mut dyn Observer,
) -> Result<()> {
    manifest.nonfinite_skipped += 1;
    let what = format!(
        "non-finite loss {} / gradient norm {} at step {step}",
        values.loss, values.grad_norm
    );
    if manifest.nonfinite_skipped > cfg.skip_nonfinite {
        return Err(Error::Training(format!(
            "{what}; stopping (the last good checkpoint is kept; --skip-nonfinite N skips such steps)"
        )));
    }
    observer.message(&format!("{what}: step skipped"));
    Ok(())
}
