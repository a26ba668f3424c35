//! One replica's run, top to bottom, as nanoGPT's `train.py` reads: start
//! (resume a checkpoint, start from given weights, or initialise), then
//! each stage's steps (learning rate → batch → [`train_step`]) with the
//! cadence of logging, evaluation and checkpoints ([`every`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;

use super::batch::DeviceBatch;
use super::config::{LossKind, TrainConfig};
use super::data::{StageData, zeroshot_eval};
use super::optim::AdamW;
use super::runstate::{self, Manifest};
use super::step::{StepConfig, StepStats, train_step};
use super::{Feed, Observer, Resume, RunOptions, StageReport, StepMetrics, TrainSummary, every};
use crate::data::DataStatsSnapshot;
use crate::data::tokenizer::Tokenizer;
use crate::dist::Replica;
use crate::model::ClipModel;
use crate::state::{StateDict, load_state_dict, state_dict};
use crate::{Error, Result};

/// One replica's training loop ([`super::train`] with one replica).
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
    let compute = cfg.precision.compute_dtype::<B>(device)?;
    model.set_compute_dtype(compute);
    observer.message(match compute {
        Some(_) => "precision: bf16 blocks, float32 master weights, LayerNorms and loss",
        None => "precision: float32",
    });
    let world = replica.world();
    if world > 1 {
        observer.message(&format!(
            "data parallel: {world} replicas, each on 1/{world} of every batch"
        ));
    }
    let mut out = Outputs {
        metrics: match replica.is_leader() {
            true => {
                crate::io::write_atomic(&run.join("run.toml"), cfg.to_toml().as_bytes())?;
                Some(open_metrics(run, manifest.step)?)
            }
            false => None,
        },
        reports: Vec::new(),
        last_checkpoint: from,
    };
    let lexicon = match &opts.lexicon {
        Some(p) => Some(Arc::new(crate::reduce::syntax::Lexicon::from_file(p)?)),
        None => None,
    };
    let mut interrupted = false;

    for (si, stage) in cfg.stages.iter().enumerate().skip(manifest.stage) {
        let px = stage.image_reduction.image_size(stage.image_size) as usize;
        model = model.resize(px, stage.text_length);
        // A stage resumed mid-way keeps its optimiser; a new one restarts it.
        let mut opt = match optim_state.take() {
            Some(state) if manifest.stage_step > 0 => {
                AdamW::load_state_dict(cfg.optimizer, &state, device)?
            }
            _ => AdamW::new(cfg.optimizer),
        };
        let mut resume_loader = manifest.loader.take();
        observer.stage_start(si, stage, manifest.stage_step);
        let started = Instant::now();
        let mut window = Window::new();
        let g = px / model.config.vision.patch_size;
        let peak = super::schedule::scaled_lr(stage.base_lr, stage.batch_size);
        let end = super::schedule::scaled_lr(stage.end_base_lr, stage.batch_size);
        let step_cfg = StepConfig {
            loss: cfg.loss,
            accum_steps: stage.accum_steps,
            grad_checkpointing: cfg.grad_checkpointing,
            grad_clip: cfg.grad_clip,
            timed: false,
        };

        while manifest.stage_step < stage.steps {
            // lr → batch → reduce → step
            let lr = super::schedule::lr_at(
                manifest.stage_step,
                stage.steps,
                stage.warmup_steps,
                peak,
                end,
            );
            let t0 = Instant::now();
            let batch = feed.batch(si, manifest.step, || {
                StageData::start(
                    &cfg,
                    stage,
                    resume_loader.take(),
                    &tokenizer,
                    lexicon.clone(),
                )
            })?;
            window.wait += t0.elapsed().as_secs_f64();
            // Masks are drawn for the global batch (keyed by global sample
            // index), then this replica takes its rows `rank·n..`.
            let first = manifest.step * stage.batch_size as u64;
            let keep = stage.image_reduction.keep_indices(
                (g, g),
                stage.batch_size,
                cfg.seed,
                manifest.step,
                first,
            );
            let (n, rank) = (stage.batch_size / world, replica.rank());
            let device_batch = DeviceBatch::<B>::from_host(
                &batch.images,
                &batch.ids,
                keep.as_ref(),
                rank * n..(rank + 1) * n,
                px,
                &model.config.normalization,
                device,
            );
            let stats;
            (model, stats) = train_step(model, &mut opt, &device_batch, lr, &step_cfg, replica)?;
            if stats.applied {
                window.add_loss(stats.loss);
            } else {
                skip_nonfinite(&cfg, &mut manifest, &stats, observer)?;
            }
            manifest.step += 1;
            manifest.stage_step += 1;
            manifest.loader = Some(batch.state.clone());
            window.images += stage.batch_size;

            // log → evaluate → checkpoint
            let stage_done = manifest.stage_step == stage.steps;
            let eval_now = cfg.eval_every > 0 && every(manifest.step, cfg.eval_every);
            if every(manifest.step, cfg.log_every) || stage_done || eval_now {
                let mut m = window.metrics(&cfg, &manifest, si, lr, &stats, &model);
                // One inference copy of the model serves every evaluation,
                // on replica 0 (the others wait for it at the next step).
                if replica.is_leader() && (eval_now || stage_done) {
                    let eval = Evaluation::<B> {
                        cfg: &cfg,
                        tokenizer: &tokenizer,
                        device,
                    };
                    let zeroshot = eval.run(&model.valid(), &mut m, observer)?;
                    if let (true, Some(r)) = (stage_done, zeroshot) {
                        out.reports.push(StageReport {
                            name: stage.name.clone(),
                            seconds: 0.0,
                            zeroshot: Some(r),
                        });
                    }
                }
                out.log(&m, run)?;
                observer.log(&m, manifest.stage_step);
                window = Window::new();
            }
            // Every replica stops at the same step, whichever saw the signal.
            interrupted = replica.any(opts.interrupt.load(Ordering::SeqCst), device)?;
            if every(manifest.step, cfg.checkpoint_every) || stage_done || interrupted {
                if stage_done {
                    // The next stage starts fresh: new loader, new optimiser.
                    manifest.stage = si + 1;
                    manifest.stage_step = 0;
                    manifest.loader = None;
                }
                manifest.data = feed.stats();
                if replica.is_leader() {
                    out.last_checkpoint = Some(runstate::save(
                        run,
                        &manifest,
                        &model.config,
                        &state_dict(&model),
                        &tokenizer,
                        &opt.state_dict(),
                        cfg.keep_checkpoints,
                    )?);
                }
            }
            if interrupted {
                observer.message(&format!(
                    "interrupted: checkpoint written at step {}",
                    manifest.step
                ));
            }
            if interrupted || stage_done {
                // `stage_step` was reset for the checkpoint: leave by hand.
                break;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        manifest.train_seconds += secs;
        match out.reports.last_mut() {
            Some(r) if r.name == stage.name => r.seconds = secs,
            _ => out.reports.push(StageReport {
                name: stage.name.clone(),
                seconds: secs,
                zeroshot: None,
            }),
        }
        manifest.data = feed.stats();
        if interrupted {
            break;
        }
        if manifest.stage == si {
            // Resumed exactly at a stage end that was already checkpointed.
            manifest.stage = si + 1;
            manifest.stage_step = 0;
        }
    }
    let summary = TrainSummary {
        run_dir: run.to_path_buf(),
        steps: manifest.step,
        interrupted,
        stages: out.reports,
        data: manifest.data,
        nonfinite_skipped: manifest.nonfinite_skipped,
        checkpoint: out.last_checkpoint,
    };
    if replica.is_leader() {
        let json = serde_json::to_string_pretty(&summary).expect("summaries serialise");
        crate::io::write_atomic(&run.join("summary.json"), json.as_bytes())?;
    }
    Ok(summary)
}

/// What a run starts from.
struct Start<B: AutodiffBackend> {
    model: ClipModel<B>,
    /// The model's tokenizer: from the checkpoint a run resumes or starts
    /// from, else from the model config and `vocab`.
    tokenizer: Tokenizer,
    manifest: Manifest,
    /// The optimiser state of a resumed stage.
    optim_state: Option<StateDict>,
    /// The checkpoint resumed from.
    from: Option<PathBuf>,
}

/// Resumes the checkpoint `opts` names, or loads `--init-from` weights, or
/// initialises the config's model from the seed.
fn start<B: AutodiffBackend>(
    cfg: &TrainConfig,
    opts: &RunOptions,
    device: &B::Device,
    feed: &Feed,
    observer: &mut dyn Observer,
) -> Result<Start<B>> {
    let run = opts.output.as_path();
    let from = match &opts.resume {
        None => None,
        Some(Resume::Latest) => runstate::latest(run)?,
        Some(Resume::Dir(d)) => Some(d.clone()),
    };
    if let Some(dir) = &from {
        let (manifest, saved, optim) = runstate::load(dir)?;
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
            from,
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
            let loaded = crate::checkpoint::load_model::<B>(dir, device)?;
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
            (model_cfg.init(device), tokenizer)
        }
    };
    let manifest = Manifest {
        version: runstate::MANIFEST_VERSION,
        step: 0,
        stage: 0,
        stage_step: 0,
        loader: None,
        data: DataStatsSnapshot::default(),
        nonfinite_skipped: 0,
        train_seconds: 0.0,
        config: cfg.clone(),
    };
    Ok(Start {
        model,
        tokenizer,
        manifest,
        optim_state: None,
        from: None,
    })
}

/// Counts a step whose loss or gradient norm was not finite (its update was
/// not applied); past `skip_nonfinite` of them the run stops.
fn skip_nonfinite(
    cfg: &TrainConfig,
    manifest: &mut Manifest,
    stats: &StepStats,
    observer: &mut dyn Observer,
) -> Result<()> {
    manifest.nonfinite_skipped += 1;
    let what = format!(
        "non-finite loss {} / gradient norm {} at step {}",
        stats.loss,
        stats.grad_norm,
        manifest.step + 1
    );
    if manifest.nonfinite_skipped > cfg.skip_nonfinite {
        return Err(Error::Training(format!(
            "{what}; stopping (the last good checkpoint is kept; --skip-nonfinite N skips such steps)"
        )));
    }
    observer.message(&format!("{what}: step skipped"));
    Ok(())
}

/// The steps since the last log line: their losses, images and data waits.
struct Window {
    loss_sum: f64,
    loss_n: u64,
    /// Seconds spent waiting for data.
    wait: f64,
    images: usize,
    since: Instant,
}

impl Window {
    fn new() -> Self {
        Self {
            loss_sum: 0.0,
            loss_n: 0,
            wait: 0.0,
            images: 0,
            since: Instant::now(),
        }
    }

    fn add_loss(&mut self, loss: f64) {
        self.loss_sum += loss;
        self.loss_n += 1;
    }

    /// The log line of the step just done.
    fn metrics<B: AutodiffBackend>(
        &self,
        cfg: &TrainConfig,
        manifest: &Manifest,
        stage: usize,
        lr: f64,
        stats: &StepStats,
        model: &ClipModel<B>,
    ) -> StepMetrics {
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        let samples = cfg.samples_before(stage, manifest.stage_step);
        StepMetrics {
            step: manifest.step,
            stage,
            loss: self.loss_sum / self.loss_n.max(1) as f64,
            lr,
            // A log step reads the temperature from the device.
            temperature: model.temperature().into_scalar().elem::<f64>(),
            grad_norm: stats.grad_norm,
            images_per_sec: self.images as f64 / secs,
            data_wait: self.wait / secs,
            samples,
            epoch: cfg
                .data
                .train_num_samples
                .map(|n| samples as f64 / n as f64),
            zeroshot_top1: None,
            evals: BTreeMap::new(),
        }
    }
}

/// The evaluations at a log step: zero-shot, then the `[[evaluators]]`.
struct Evaluation<'a, B: AutodiffBackend> {
    cfg: &'a TrainConfig,
    tokenizer: &'a Tokenizer,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Evaluation<'_, B> {
    /// Scores `model` into `m` and reports each result; returns the
    /// zero-shot result. A failing extra evaluator is reported, never
    /// fatal: the steps since the last checkpoint are not lost.
    fn run(
        &self,
        model: &ClipModel<B::InnerBackend>,
        m: &mut StepMetrics,
        observer: &mut dyn Observer,
    ) -> Result<Option<crate::eval::ZeroShotResult>> {
        let zeroshot = zeroshot_eval(self.cfg, model, self.tokenizer, self.device)?;
        if let Some(r) = &zeroshot {
            observer.message(&format!(
                "step {}: zero-shot top-1 {:.1}% (top-5 {:.1}%, chance {:.1}%, {} images)",
                m.step,
                100.0 * r.top1,
                100.0 * r.top5,
                100.0 * r.chance,
                r.samples
            ));
            m.zeroshot_top1 = Some(r.top1);
        }
        for e in &self.cfg.evaluators {
            match e.run(model, self.tokenizer, self.device, None, &mut |_| {}) {
                Ok(r) => {
                    let mut shown = Vec::new();
                    for (k, v) in r.metrics() {
                        m.evals.insert(format!("{}/{k}", e.name()), v);
                        shown.push(format!("{k} {v:.4}"));
                    }
                    observer.message(&format!(
                        "step {}: {}: {}",
                        m.step,
                        e.name(),
                        shown.join(", ")
                    ));
                }
                Err(err) => observer.message(&format!(
                    "step {}: evaluator {} failed: {err}",
                    m.step,
                    e.name()
                )),
            }
        }
        Ok(zeroshot)
    }
}

/// What the leader writes as the run goes: `metrics.jsonl`, the stage
/// reports, the newest checkpoint.
struct Outputs {
    metrics: Option<std::fs::File>,
    reports: Vec<StageReport>,
    last_checkpoint: Option<PathBuf>,
}

impl Outputs {
    /// Appends one line to `metrics.jsonl` (the leader's only).
    fn log(&mut self, m: &StepMetrics, run: &Path) -> Result<()> {
        let Some(file) = &mut self.metrics else {
            return Ok(());
        };
        writeln!(
            file,
            "{}",
            serde_json::to_string(m).expect("metrics serialise")
        )
        .and_then(|_| file.flush())
        .map_err(|e| Error::io(run.join("metrics.jsonl"), e))
    }
}

/// Opens `metrics.jsonl` for appending, first dropping lines past `step`
/// (written after the checkpoint a resumed run starts from), so every step
/// appears exactly once.
fn open_metrics(run: &Path, step: u64) -> Result<std::fs::File> {
    let path = run.join("metrics.jsonl");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::io::write_atomic(&path, kept.as_bytes())?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))
}
