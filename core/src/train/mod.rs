//! Training: the CLIPA two-stage recipe as a list of stages, the contrastive
//! step, checkpoints that never lose work, and the metrics a user watches.
//!
//! The loop reads top to bottom (burn `custom-training-loop`, nanoGPT
//! `train.py`): for each stage, resize the model to the stage's image size
//! and text length, restart the optimiser and schedule (as CLIPA's
//! fine-tuning does), then step: lr → batch → reduce → forward → loss →
//! finite check → backward → optimiser → stats.

pub mod config;
pub mod data;
pub mod optim;
pub mod runstate;
pub mod schedule;
pub mod step;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use config::{DataConfig, LossKind, Precision, StageConfig, TrainConfig};

use self::data::{StageBatch, StageData, zeroshot_eval};
use self::optim::{AdamW, clip_factor, grad_norm};
use self::runstate::Manifest;
use self::step::{DeviceBatch, loss_and_grads};
use crate::data::DataStatsSnapshot;
use crate::data::tokenizer::Tokenizer;
use crate::dist::Replica;
use crate::eval::ZeroShotResult;
use crate::model::ClipModel;
use crate::preprocess::u8_batch_to_tensor;
use crate::state::{load_state_dict, state_dict};
use crate::{Error, Result};

/// How a run is launched (what is not part of the resolved config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run folder: `run.toml`, `metrics.jsonl`, `checkpoints/`.
    pub output: PathBuf,
    /// Continue from a checkpoint.
    pub resume: Option<Resume>,
    /// Set by a SIGINT/SIGTERM handler: checkpoint and stop.
    pub interrupt: Arc<AtomicBool>,
    /// A user lexicon for syntax masking instead of the shipped one.
    pub lexicon: Option<PathBuf>,
    /// Start from the weights of this clipa checkpoint folder instead of a
    /// random init (fine-tuning a pre-trained or imported model).
    pub init_from: Option<PathBuf>,
}

/// Which checkpoint a run continues from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest checkpoint in the run folder.
    Latest,
    /// A given checkpoint folder.
    Dir(PathBuf),
}

/// One logged step, also one line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Steps completed in the run.
    pub step: u64,
    /// Stage index.
    pub stage: usize,
    /// Mean loss since the last log line.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// `exp(logit_scale)` after the last step.
    pub temperature: f64,
    /// Global gradient norm of the last step (before clipping).
    pub grad_norm: f64,
    /// Training images per second since the last log line.
    pub images_per_sec: f64,
    /// Share of wall time spent waiting for data since the last log line.
    pub data_wait: f64,
    /// Training samples seen so far in the run.
    #[serde(default)]
    pub samples: u64,
    /// `samples / train_num_samples`, when the config gives an epoch size.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub epoch: Option<f64>,
    /// Zero-shot top-1, on the lines where an evaluation ran.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub zeroshot_top1: Option<f64>,
    /// The `[[evaluators]]` metrics, as `name/metric`, on the lines where
    /// they ran.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub evals: BTreeMap<String, f64>,
}

/// What a user watches; the CLI draws a progress bar from it.
pub trait Observer {
    /// A stage begins (`first_step` is where it resumes).
    fn stage_start(&mut self, index: usize, stage: &StageConfig, first_step: u64);
    /// A log line.
    fn log(&mut self, metrics: &StepMetrics, stage_step: u64);
    /// A notable event (checkpoint written, evaluation result, skipped step).
    fn message(&mut self, text: &str);
}

/// Per-stage outcome for the final report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Training seconds in this session.
    pub seconds: f64,
    /// Zero-shot result at the end of the stage, if evaluated.
    pub zeroshot: Option<ZeroShotResult>,
}

/// The run summary (also written to `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Steps completed.
    pub steps: u64,
    /// Whether the run stopped early on a signal.
    pub interrupted: bool,
    /// Per stage.
    pub stages: Vec<StageReport>,
    /// Good and bad data.
    pub data: DataStatsSnapshot,
    /// Non-finite steps skipped.
    pub nonfinite_skipped: u32,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
}

/// `true` every `n` steps (big_vision `itstime`).
pub fn every(step: u64, n: u64) -> bool {
    n > 0 && step.is_multiple_of(n)
}

/// Runs (or resumes) a training run on `device`.
pub fn train<B: AutodiffBackend>(
    cfg: TrainConfig,
    opts: &RunOptions,
    device: &B::Device,
    observer: &mut dyn Observer,
) -> Result<TrainSummary> {
    train_replica(
        cfg,
        opts,
        device,
        &Replica::<B>::single(),
        &Feed::default(),
        observer,
    )
}

/// Runs (or resumes) a data-parallel training run: one replica per device
/// of `devices`, each a thread of this process. Each step's global batch
/// (`batch_size`) is split evenly over the replicas; the result equals one
/// device's training at the same global batch (see [`crate::dist`]).
/// Replica 0 writes the run folder and reports to `observer`.
pub fn train_parallel<B: AutodiffBackend>(
    cfg: TrainConfig,
    opts: &RunOptions,
    devices: &[B::Device],
    observer: &mut dyn Observer,
) -> Result<TrainSummary> {
    let world = devices.len();
    if world == 0 {
        return Err(Error::Config("no device to train on".into()));
    }
    if world == 1 {
        return train::<B>(cfg, opts, &devices[0], observer);
    }
    cfg.validate()?;
    for stage in &cfg.stages {
        if stage.batch_size % (world * stage.accum_steps) != 0 {
            return Err(Error::Config(format!(
                "stage '{}': batch_size {} must split evenly over {world} replicas × {} micro-batches",
                stage.name, stage.batch_size, stage.accum_steps
            )));
        }
    }
    let feed = Feed::default();
    let (cfg, feed) = (&cfg, &feed);
    let replica = |i: usize, obs: &mut dyn Observer| -> Result<TrainSummary> {
        let out = Replica::<B>::join(i, world, &devices[i]).and_then(|rep| {
            let summary = train_replica(cfg.clone(), opts, &devices[i], &rep, feed, obs)?;
            rep.leave()?;
            Ok(summary)
        });
        if out.is_err() {
            // The other replicas would wait for this one forever.
            Replica::<B>::abort_all();
        }
        out
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..world)
            .map(|i| s.spawn(move || replica(i, &mut Silent)))
            .collect();
        let first = replica(0, observer);
        let mut errors: Vec<Error> = others
            .into_iter()
            .filter_map(|h| h.join().expect("a replica thread panicked").err())
            .collect();
        match first {
            Ok(summary) if errors.is_empty() => Ok(summary),
            first => {
                errors.extend(first.err());
                // The replica that failed first says why; the others only
                // report that the collective was aborted under them.
                let cause = errors
                    .iter()
                    .position(|e| !matches!(e, Error::Collective(_)))
                    .unwrap_or(0);
                Err(errors.swap_remove(cause))
            }
        }
    })
}

/// An observer for replicas other than the first: replica 0 reports.
struct Silent;

impl Observer for Silent {
    fn stage_start(&mut self, _: usize, _: &StageConfig, _: u64) {}
    fn log(&mut self, _: &StepMetrics, _: u64) {}
    fn message(&mut self, _: &str) {}
}

/// The data of one process, shared by its replicas: one loader reads each
/// step's global batch once and every replica takes its rows of it, so the
/// replicas see disjoint samples and together exactly the batch one device
/// would. Replicas run in lock-step (each step's all-reduces wait for all),
/// so one cached batch suffices.
#[derive(Default)]
pub struct Feed {
    state: std::sync::Mutex<FeedState>,
    /// Held while a replica seeds the backend and initialises its model:
    /// the CPU backend's generator is one per process.
    init: std::sync::Mutex<()>,
}

#[derive(Default)]
struct FeedState {
    stage: Option<usize>,
    data: Option<StageData>,
    step: Option<u64>,
    batch: Option<Arc<StageBatch>>,
    failed: Option<String>,
}

impl Feed {
    /// Stage `stage`'s global batch of step `step`, starting the stage's
    /// loader with `start` on first use. A failure is returned to every
    /// replica that asks after it.
    fn batch(
        &self,
        stage: usize,
        step: u64,
        start: impl FnOnce() -> Result<StageData>,
    ) -> Result<Arc<StageBatch>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &st.failed {
            return Err(Error::Training(format!(
                "another replica's data failed: {e}"
            )));
        }
        let got: Result<Arc<StageBatch>> = (|| {
            if st.stage != Some(stage) {
                st.data = None;
                st.data = Some(start()?);
                st.stage = Some(stage);
                st.step = None;
            }
            if st.step != Some(step) {
                let data = st.data.as_mut().expect("started above");
                st.batch = Some(Arc::new(data.next(step)?));
                st.step = Some(step);
            }
            Ok(st.batch.clone().expect("read above"))
        })();
        if let Err(e) = &got {
            st.failed = Some(e.to_string());
        }
        got
    }

    /// Good and bad data of the current stage's loader.
    fn stats(&self) -> DataStatsSnapshot {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.data.as_ref().map(StageData::stats).unwrap_or_default()
    }
}

/// One replica's training loop ([`train`] with one replica).
fn train_replica<B: AutodiffBackend>(
    cfg: TrainConfig,
    opts: &RunOptions,
    device: &B::Device,
    replica: &Replica<B>,
    feed: &Feed,
    observer: &mut dyn Observer,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let leader = replica.is_leader();
    let (rank, world) = (replica.rank(), replica.world());
    let run = opts.output.as_path();
    std::fs::create_dir_all(run).map_err(|e| Error::io(run, e))?;
    let resume_from = match &opts.resume {
        None => None,
        Some(Resume::Latest) => runstate::latest(run)?,
        Some(Resume::Dir(d)) => Some(d.clone()),
    };
    // The tokenizer comes with the weights: from the checkpoint a run
    // resumes or starts from, else from the model preset and `vocab`.
    let (model, tokenizer, mut manifest, mut optim_state) = match &resume_from {
        Some(dir) => {
            let (manifest, saved, optim) = runstate::load(dir)?;
            runstate::check_resumable(&manifest.config, &cfg)?;
            let model: ClipModel<B> = saved.config.init(device);
            let model = load_state_dict(model, &saved.state)?;
            observer.message(&format!(
                "resuming from {} (step {})",
                dir.display(),
                manifest.step
            ));
            (model, saved.tokenizer, manifest, Some(optim))
        }
        None => {
            if opts.resume.is_some() {
                observer.message("no checkpoint in the run folder yet: starting fresh");
            }
            if !runstate::list(run)?.is_empty() {
                return Err(Error::Config(format!(
                    "{} already holds checkpoints: pass --resume latest to continue it, or choose another --output",
                    run.display()
                )));
            }
            let mut model_cfg = cfg.model_config()?;
            if cfg.loss == LossKind::Sigmoid {
                // SigLIP init: t' = ln 10, b = −10.
                model_cfg.init_logit_scale = 10f64.ln();
                model_cfg.init_logit_bias = Some(-10.0);
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
            (model, tokenizer, manifest, None)
        }
    };
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
    if world > 1 {
        observer.message(&format!(
            "data parallel: {world} replicas, each on 1/{world} of every batch"
        ));
    }
    let mut metrics = if leader {
        crate::io::write_atomic(&run.join("run.toml"), cfg.to_toml().as_bytes())?;
        Some(open_metrics(run, manifest.step)?)
    } else {
        None
    };
    let lexicon = match &opts.lexicon {
        Some(p) => Some(Arc::new(crate::reduce::syntax::Lexicon::from_file(p)?)),
        None => None,
    };
    let mut reports = Vec::new();
    let mut last_checkpoint = resume_from.clone();
    let mut interrupted = false;

    for (si, stage) in cfg.stages.iter().enumerate().skip(manifest.stage) {
        let px = stage.image_reduction.image_size(stage.image_size) as usize;
        model = model.resize(px, stage.text_length);
        let mut opt = match optim_state.take() {
            Some(state) if manifest.stage_step > 0 => {
                AdamW::load_state_dict(cfg.optimizer, &state, device)?
            }
            _ => AdamW::new(cfg.optimizer),
        };
        let mut resume_loader = manifest.loader.take();
        observer.stage_start(si, stage, manifest.stage_step);
        let started = Instant::now();
        let (mut loss_sum, mut loss_n, mut wait, mut window, mut images) =
            (0.0, 0u64, 0.0, Instant::now(), 0usize);
        let grid = (
            px / model.config.vision.patch_size,
            px / model.config.vision.patch_size,
        );
        let peak = schedule::scaled_lr(stage.base_lr, stage.batch_size);
        let end = schedule::scaled_lr(stage.end_base_lr, stage.batch_size);

        while manifest.stage_step < stage.steps {
            // lr → batch → reduce
            let lr = schedule::lr_at(
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
            wait += t0.elapsed().as_secs_f64();
            let first = manifest.step * stage.batch_size as u64;
            // Masks are drawn for the global batch (keyed by global sample
            // index), then this replica takes its rows `rank·n..`.
            let keep = stage.image_reduction.keep_indices(
                grid,
                stage.batch_size,
                cfg.seed,
                manifest.step,
                first,
            );
            let n = stage.batch_size / world;
            let pixels = px * px * 3;
            let device_batch = DeviceBatch::<B> {
                images: u8_batch_to_tensor(
                    &batch.images[rank * n * pixels..(rank + 1) * n * pixels],
                    n,
                    px,
                    &model.config.normalization,
                    device,
                ),
                keep: keep.map(|(kept, idx)| {
                    Tensor::<B, 2, Int>::from_data(
                        TensorData::new(
                            idx[rank * n * kept..(rank + 1) * n * kept].to_vec(),
                            [n, kept],
                        ),
                        device,
                    )
                }),
                ids: Tensor::<B, 2, Int>::from_data(
                    TensorData::new(
                        batch.ids[rank * n * stage.text_length..(rank + 1) * n * stage.text_length]
                            .to_vec(),
                        [n, stage.text_length],
                    ),
                    device,
                ),
            };
            // forward → loss → backward
            let (loss, grads) = loss_and_grads(
                &model,
                &device_batch,
                cfg.loss,
                stage.accum_steps,
                cfg.grad_checkpointing,
                replica,
            )?;
            // The same on every replica: the gradients were summed.
            let norm = grad_norm(&model, &grads);
            // finite check → optimiser
            if !loss.is_finite() || !norm.is_finite() {
                manifest.nonfinite_skipped += 1;
                let what = format!(
                    "non-finite loss {loss} / gradient norm {norm} at step {}",
                    manifest.step + 1
                );
                if manifest.nonfinite_skipped > cfg.skip_nonfinite {
                    return Err(Error::Training(format!(
                        "{what}; stopping (the last good checkpoint is kept; --skip-nonfinite N skips such steps)"
                    )));
                }
                observer.message(&format!("{what}: step skipped"));
            } else {
                model = opt.step(lr, model, grads, clip_factor(norm, cfg.grad_clip));
                model = clamp_logit_scale(model);
                loss_sum += loss;
                loss_n += 1;
            }
            manifest.step += 1;
            manifest.stage_step += 1;
            manifest.loader = Some(batch.state.clone());
            images += stage.batch_size;
            // stats
            let stage_done = manifest.stage_step == stage.steps;
            let eval_now = cfg.eval_every > 0 && every(manifest.step, cfg.eval_every);
            if every(manifest.step, cfg.log_every) || stage_done || eval_now {
                let secs = window.elapsed().as_secs_f64().max(1e-9);
                let samples = cfg.samples_before(si, manifest.stage_step);
                let mut m = StepMetrics {
                    step: manifest.step,
                    stage: si,
                    loss: loss_sum / loss_n.max(1) as f64,
                    lr,
                    temperature: model.temperature().into_scalar().elem::<f64>(),
                    grad_norm: norm,
                    images_per_sec: images as f64 / secs,
                    data_wait: wait / secs,
                    samples,
                    epoch: cfg
                        .data
                        .train_num_samples
                        .map(|n| samples as f64 / n as f64),
                    zeroshot_top1: None,
                    evals: BTreeMap::new(),
                };
                // One inference copy of the model serves every evaluation,
                // on replica 0 (the others wait for it at the next step).
                let eval_model = (leader && (eval_now || stage_done)).then(|| model.valid());
                if let Some(eval_model) = &eval_model
                    && let Some(r) = zeroshot_eval(&cfg, eval_model, &tokenizer, device)?
                {
                    observer.message(&format!(
                        "step {}: zero-shot top-1 {:.1}% (top-5 {:.1}%, chance {:.1}%, {} images)",
                        manifest.step,
                        100.0 * r.top1,
                        100.0 * r.top5,
                        100.0 * r.chance,
                        r.samples
                    ));
                    m.zeroshot_top1 = Some(r.top1);
                    if stage_done {
                        reports.push(StageReport {
                            name: stage.name.clone(),
                            seconds: 0.0,
                            zeroshot: Some(r),
                        });
                    }
                }
                if let Some(eval_model) = &eval_model {
                    // A failing extra evaluator is reported, never fatal:
                    // the steps since the last checkpoint are not lost.
                    for e in &cfg.evaluators {
                        match e.run(eval_model, &tokenizer, device, None, &mut |_| {}) {
                            Ok(r) => {
                                let mut shown = Vec::new();
                                for (k, v) in r.metrics() {
                                    m.evals.insert(format!("{}/{k}", e.name()), v);
                                    shown.push(format!("{k} {v:.4}"));
                                }
                                observer.message(&format!(
                                    "step {}: {}: {}",
                                    manifest.step,
                                    e.name(),
                                    shown.join(", ")
                                ));
                            }
                            Err(err) => observer.message(&format!(
                                "step {}: evaluator {} failed: {err}",
                                manifest.step,
                                e.name()
                            )),
                        }
                    }
                }
                if let Some(metrics) = &mut metrics {
                    writeln!(
                        metrics,
                        "{}",
                        serde_json::to_string(&m).expect("metrics serialise")
                    )
                    .and_then(|_| metrics.flush())
                    .map_err(|e| Error::io(run.join("metrics.jsonl"), e))?;
                }
                observer.log(&m, manifest.stage_step);
                (loss_sum, loss_n, wait, images, window) = (0.0, 0, 0.0, 0, Instant::now());
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
                if leader {
                    let dir = runstate::save(
                        run,
                        &manifest,
                        &model.config,
                        &state_dict(&model),
                        &tokenizer,
                        &opt.state_dict(),
                        cfg.keep_checkpoints,
                    )?;
                    last_checkpoint = Some(dir);
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
        match reports.last_mut() {
            Some(r) if r.name == stage.name => r.seconds = secs,
            _ => reports.push(StageReport {
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
        stages: reports,
        data: manifest.data,
        nonfinite_skipped: manifest.nonfinite_skipped,
        checkpoint: last_checkpoint,
    };
    if leader {
        let json = serde_json::to_string_pretty(&summary).expect("summaries serialise");
        crate::io::write_atomic(&run.join("summary.json"), json.as_bytes())?;
    }
    Ok(summary)
}

/// Keeps the temperature at most 100 (OpenCLIP clamps `logit_scale` to
/// `[0, ln 100]` after every step).
fn clamp_logit_scale<B: AutodiffBackend>(mut model: ClipModel<B>) -> ClipModel<B> {
    model.logit_scale = model
        .logit_scale
        .map(|t| Tensor::from_inner(t.inner().clamp(0.0, 100f32.ln())).require_grad());
    model
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

use burn::tensor::ElementConversion;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;
    use crate::reduce::{ImageReduction, TextReduction};
    use crate::scratch::Scratch;

    struct Stopper {
        at: Option<u64>,
        flag: Arc<AtomicBool>,
        stages: Vec<usize>,
    }

    impl Observer for Stopper {
        fn stage_start(&mut self, index: usize, _stage: &StageConfig, _first: u64) {
            self.stages.push(index);
        }
        fn log(&mut self, m: &StepMetrics, _stage_step: u64) {
            if Some(m.step) == self.at {
                self.flag.store(true, Ordering::SeqCst);
            }
        }
        fn message(&mut self, _text: &str) {}
    }

    fn two_stage() -> TrainConfig {
        let mut cfg = TrainConfig::preset("tiny").unwrap();
        let first = StageConfig {
            name: "pre".into(),
            image_reduction: ImageReduction::Resize { size: 16 },
            text_length: 8,
            text_reduction: TextReduction::Syntax,
            steps: 3,
            batch_size: 8,
            ..cfg.stages[0].clone()
        };
        let second = StageConfig {
            name: "tune".into(),
            image_reduction: "random:0.5".parse().unwrap(),
            text_length: 16,
            steps: 3,
            batch_size: 8,
            ..cfg.stages[0].clone()
        };
        cfg.stages = vec![first, second];
        cfg.checkpoint_every = 2;
        cfg.keep_checkpoints = 10;
        cfg.data.workers = 2;
        cfg
    }

    /// A run folder path with nothing there yet (training creates it),
    /// deleted when the returned guard drops.
    fn run_dir(name: &str) -> Scratch {
        Scratch::absent(&format!("train-{name}"))
    }

    fn losses(dir: &Path) -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let m: StepMetrics = serde_json::from_str(l).unwrap();
                (m.step, m.loss)
            })
            .collect()
    }

    /// Data parallelism changes nothing but the speed: 2 and 4 replicas at
    /// the global batch of one device take the same steps, with both token
    /// reductions (16 px with syntax-masked text, then half the patches
    /// masked) and with gradient accumulation (2 micro-batches per replica
    /// in the second stage). Were two replicas ever given the same sample,
    /// the global batch would differ and so would the weights.
    #[test]
    fn replicas_train_exactly_like_one_device_at_the_global_batch() {
        let _turn = crate::dist::tests::exclusive();
        let device: burn::tensor::Device<TestBackend> = Default::default();
        let mut cfg = two_stage();
        cfg.stages[1].accum_steps = 2;
        cfg.log_every = 1;
        let init = run_dir("dp-init");
        let mut model_cfg = cfg.model_config().unwrap();
        model_cfg.text.context_length = 16;
        crate::checkpoint::save_model(
            &init,
            &model_cfg.init::<TestBackend>(&device),
            &Tokenizer::clip(),
        )
        .unwrap();
        let run = |world: usize| {
            // Dropped when this closure returns: a run folder with its
            // checkpoints is large (155 MB for 4 replicas), and only the
            // losses and weights read here are compared afterwards.
            let output = run_dir(&format!("dp-{world}"));
            let opts = RunOptions {
                output: output.to_path_buf(),
                resume: None,
                interrupt: Arc::new(AtomicBool::new(false)),
                lexicon: None,
                init_from: Some(init.to_path_buf()),
            };
            let mut obs = Stopper {
                at: None,
                flag: opts.interrupt.clone(),
                stages: vec![],
            };
            let devices = vec![device; world];
            let s = train_parallel::<TestBackend>(cfg.clone(), &opts, &devices, &mut obs).unwrap();
            assert_eq!(s.steps, 6);
            let (_, saved, _) = runstate::load(s.checkpoint.as_ref().unwrap()).unwrap();
            (losses(&opts.output), saved.state)
        };
        let (want_losses, want) = run(1);
        for world in [2, 4] {
            let (got_losses, got) = run(world);
            assert_eq!(got_losses.len(), 6);
            // The losses within 2e-4 relative and the matrices (below)
            // within 1e-4: flex's reductions sum in an order that depends
            // on work stealing, and six AdamW steps, whose normalised
            // update gives a float-noise gradient a full step, carry that
            // noise into the weights. Measured misses of the earlier 1e-5
            // bounds: step losses 1.5e-5, 5e-5 (2 replicas, in CI) and
            // 9.8e-5 apart; conv1 2.6e-5.
            for ((step, a), (_, b)) in want_losses.iter().zip(&got_losses) {
                assert!(
                    (a - b).abs() <= 2e-4 * a.abs().max(1.0),
                    "{world} replicas, step {step}: loss {b} vs {a}"
                );
            }
            // Relative L2 error per tensor (single elements whose gradient
            // is float noise get AdamW's full normalised step either way).
            // The attention key biases are left out: their gradient is zero
            // in exact arithmetic (softmax ignores a shift shared by all
            // keys), so AdamW's normalised step moves them by float noise
            // alone, differently for any other summation order (micro-batches
            // on one device too); the function they compute is unchanged.
            //
            // Vectors (LayerNorm gains and shifts, biases) get 5e-3: with a
            // few dozen elements, one element whose gradient is near float
            // noise, and whose normalised step therefore flips, is a large
            // share of the tensor's norm. flex's rayon reductions sum in an
            // order that depends on work stealing, so this noise differs
            // from run to run: a LayerNorm shift differed by 1.1e-4 and
            // 4.3e-4 in two runs on a busy machine and by under 1e-4 on an
            // idle one, while every matrix stayed under 1e-6. A wrong
            // gradient share moves every element, far past either bound.
            assert_eq!(want.len(), got.len());
            for (name, w) in want.iter().filter(|(n, _)| !n.ends_with("attn.key.bias")) {
                let err = crate::numeric::relative_error(&got[name], w);
                let tol = if w.shape.len() == 1 { 5e-3 } else { 1e-4 };
                if err > tol / 10.0 {
                    eprintln!("{world} replicas: {name} relative error {err:.2e}");
                }
                assert!(err < tol, "{world} replicas: {name} differs by {err}");
            }
        }
        // A batch that does not split evenly is refused before any work.
        let output = run_dir("dp-3");
        let opts = RunOptions {
            output: output.to_path_buf(),
            resume: None,
            interrupt: Arc::new(AtomicBool::new(false)),
            lexicon: None,
            init_from: Some(init.to_path_buf()),
        };
        let err = train_parallel::<TestBackend>(cfg, &opts, &[device; 3], &mut Silent).unwrap_err();
        assert!(
            err.to_string().contains("split evenly over 3 replicas"),
            "{err}"
        );
    }

    /// Two stages on the synthetic set (16 px with 8 syntax-masked tokens,
    /// then 32 px with half the patches and 16 tokens): the stage switch
    /// resizes the position tables, and a run interrupted at step 4 and
    /// resumed reproduces the uninterrupted loss curve exactly.
    #[test]
    fn stages_resize_and_an_interrupted_run_resumes_exactly() {
        let device = Default::default();
        let cfg = two_stage();
        // Both runs start from the same weights, whatever else draws from
        // the backend's global RNG while tests run in parallel.
        let init = run_dir("init");
        let mut model_cfg = cfg.model_config().unwrap();
        model_cfg.text.context_length = 16;
        crate::checkpoint::save_model(
            &init,
            &model_cfg.init::<TestBackend>(&device),
            &Tokenizer::clip(),
        )
        .unwrap();
        let opts = |output: &Path, resume| RunOptions {
            output: output.to_path_buf(),
            resume,
            interrupt: Arc::new(AtomicBool::new(false)),
            lexicon: None,
            init_from: Some(init.to_path_buf()),
        };
        let full_dir = run_dir("full");
        let full = opts(&full_dir, None);
        let mut obs = Stopper {
            at: None,
            flag: full.interrupt.clone(),
            stages: vec![],
        };
        let summary = train::<TestBackend>(cfg.clone(), &full, &device, &mut obs).unwrap();
        assert_eq!(summary.steps, 6);
        assert_eq!(obs.stages, [0, 1]);
        let (_, saved, _) = runstate::load(summary.checkpoint.as_ref().unwrap()).unwrap();
        let (last_cfg, weights) = (saved.config, saved.state);
        assert_eq!(
            (last_cfg.vision.image_size, last_cfg.text.context_length),
            (32, 16)
        );
        assert_eq!(
            weights["visual.positional_embedding"].shape.to_vec(),
            [1 + 64, 64]
        );
        assert_eq!(
            weights["text.positional_embedding"].shape.to_vec(),
            [16, 64]
        );

        let cut_dir = run_dir("cut");
        let cut = opts(&cut_dir, None);
        let mut obs = Stopper {
            at: Some(4),
            flag: cut.interrupt.clone(),
            stages: vec![],
        };
        let partial = train::<TestBackend>(cfg.clone(), &cut, &device, &mut obs).unwrap();
        assert!(partial.interrupted);
        assert_eq!(partial.steps, 4);
        let resumed = RunOptions {
            resume: Some(Resume::Latest),
            interrupt: Arc::new(AtomicBool::new(false)),
            ..cut
        };
        let mut obs = Stopper {
            at: None,
            flag: resumed.interrupt.clone(),
            stages: vec![],
        };
        let done = train::<TestBackend>(cfg.clone(), &resumed, &device, &mut obs).unwrap();
        assert_eq!(done.steps, 6);
        assert_eq!(obs.stages, [1], "resumes inside the second stage");
        let (a, b) = (losses(&full.output), losses(&resumed.output));
        assert_eq!(
            a.iter().map(|x| x.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(
            b.iter().map(|x| x.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6],
            "no step repeated or lost"
        );
        for ((s, x), (_, y)) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6, "step {s}: {x} vs {y}");
        }

        // A different config is refused, naming the setting.
        let mut other = cfg.clone();
        other.stages[1].batch_size = 4;
        let err = train::<TestBackend>(
            other,
            &RunOptions {
                resume: Some(Resume::Latest),
                ..resumed.clone()
            },
            &device,
            &mut obs,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("stages[1].batch_size"), "{err}");
    }

    #[test]
    fn a_non_finite_loss_stops_the_run_and_names_the_step() {
        let device = Default::default();
        let mut cfg = TrainConfig::preset("tiny").unwrap();
        cfg.stages[0].steps = 4;
        cfg.stages[0].batch_size = 4;
        cfg.stages[0].warmup_steps = 0;
        cfg.stages[0].base_lr = 1e35; // the first update overflows the weights
        cfg.data.workers = 1;
        let nan_dir = run_dir("nan");
        let opts = RunOptions {
            output: nan_dir.to_path_buf(),
            resume: None,
            interrupt: Arc::new(AtomicBool::new(false)),
            lexicon: None,
            init_from: None,
        };
        let mut obs = Stopper {
            at: None,
            flag: opts.interrupt.clone(),
            stages: vec![],
        };
        let err = train::<TestBackend>(cfg.clone(), &opts, &device, &mut obs)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("non-finite") && err.contains("at step 2"),
            "{err}"
        );
        // With --skip-nonfinite the run goes on and counts the skipped steps.
        cfg.skip_nonfinite = 10;
        let skip_dir = run_dir("nan-skip");
        let opts = RunOptions {
            output: skip_dir.to_path_buf(),
            ..opts
        };
        let s = train::<TestBackend>(cfg, &opts, &device, &mut obs).unwrap();
        assert_eq!(s.nonfinite_skipped, 3);
    }
}
