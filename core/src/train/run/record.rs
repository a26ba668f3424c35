//! What a run records as it goes: the log window, the evaluations at a log
//! step, `metrics.jsonl` (and TensorBoard's event file where the config
//! asks), the stage reports and the newest checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::ElementConversion;
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::super::config::{ReportTo, TrainConfig};
use super::super::data::zeroshot_eval;
use super::super::runstate::Manifest;
use super::super::step::{StepStats, StepValues, read_all};
use super::super::tensorboard::{self, EventWriter};
use super::super::{Observer, StageReport, StepMetrics};
use crate::data::tokenizer::Tokenizer;
use crate::model::ClipModel;
use crate::{Error, Result};

/// The steps since the last log line: their losses, images and data waits.
/// The steps' loss, gradient norm and finite check stay on the device
/// until [`Window::settle`] reads them all at once (a log or checkpoint
/// step), so that no step waits for the device.
pub(super) struct Window<B: Backend> {
    /// Steps done but not yet read: (global step number, its stats).
    pending: Vec<(u64, StepStats<B>)>,
    pub(super) loss_sum: f64,
    pub(super) loss_n: u64,
    /// The last settled step's gradient norm.
    grad_norm: f64,
    /// Seconds spent waiting for data.
    pub(super) wait: f64,
    pub(super) images: usize,
    pub(super) since: Instant,
}

impl<B: Backend> Window<B> {
    pub(super) fn new() -> Self {
        Self {
            pending: Vec::new(),
            loss_sum: 0.0,
            loss_n: 0,
            grad_norm: f64::NAN,
            wait: 0.0,
            images: 0,
            since: Instant::now(),
        }
    }

    /// Books step `step`'s stats, still on the device.
    pub(super) fn add(&mut self, step: u64, stats: StepStats<B>) {
        self.pending.push((step, stats));
    }

    /// Reads the pending steps' stats in one host read, adds the applied
    /// steps' losses, and returns the steps that were not applied.
    pub(super) fn settle(&mut self) -> Vec<(u64, StepValues)> {
        let values = read_all(self.pending.iter().map(|(_, s)| s));
        let mut skipped = Vec::new();
        for ((step, _), values) in self.pending.drain(..).zip(values) {
            match values.applied {
                true => {
                    self.loss_sum += values.loss;
                    self.loss_n += 1;
                }
                false => skipped.push((step, values)),
            }
            self.grad_norm = values.grad_norm;
        }
        skipped
    }

    /// The log line of the step just done (after [`Window::settle`]).
    pub(super) fn metrics<AB: AutodiffBackend>(
        &self,
        cfg: &TrainConfig,
        manifest: &Manifest,
        stage: usize,
        lr: f64,
        model: &ClipModel<AB>,
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
            grad_norm: self.grad_norm,
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
pub(super) struct Evaluation<'a, B: AutodiffBackend> {
    pub(super) cfg: &'a TrainConfig,
    pub(super) tokenizer: &'a Tokenizer,
    pub(super) device: &'a B::Device,
}

impl<B: AutodiffBackend> Evaluation<'_, B> {
    /// Scores `model` into `m` and reports each result; returns the
    /// zero-shot result. A failing extra evaluator is reported, never
    /// fatal: the steps since the last checkpoint are not lost.
    pub(super) fn run(
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

/// What the leader writes as the run goes: `metrics.jsonl`, the
/// TensorBoard event file, the stage reports, the newest checkpoint.
pub(super) struct Outputs {
    pub(super) metrics: Option<std::fs::File>,
    /// `--report-to tensorboard`: a new event file each session.
    tensorboard: Option<EventWriter>,
    pub(super) reports: Vec<StageReport>,
    pub(super) last_checkpoint: Option<PathBuf>,
}

impl Outputs {
    /// Writes `run.toml` and opens `metrics.jsonl` and, where the config
    /// reports to TensorBoard, a new event file (replica 0; the others
    /// write nothing).
    pub(super) fn open(
        run: &Path,
        cfg: &TrainConfig,
        leader: bool,
        step: u64,
        from: Option<PathBuf>,
    ) -> Result<Self> {
        let metrics = match leader {
            true => {
                crate::io::write_atomic(&run.join("run.toml"), cfg.to_toml().as_bytes())?;
                Some(open_metrics(run, step)?)
            }
            false => None,
        };
        let tensorboard = match leader && cfg.report_to.contains(&ReportTo::Tensorboard) {
            // The session's first logged step is `step + 1`: TensorBoard
            // drops what a killed session logged from there on.
            true => Some(EventWriter::create(
                &run.join(tensorboard::FOLDER),
                step + 1,
            )?),
            false => None,
        };
        Ok(Self {
            metrics,
            tensorboard,
            reports: Vec::new(),
            last_checkpoint: from,
        })
    }

    /// Appends one line to `metrics.jsonl` and the step's scalars to the
    /// event file (the leader's only).
    pub(super) fn log(&mut self, m: &StepMetrics, run: &Path) -> Result<()> {
        if let Some(file) = &mut self.metrics {
            writeln!(
                file,
                "{}",
                serde_json::to_string(m).expect("metrics serialise")
            )
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(run.join("metrics.jsonl"), e))?;
        }
        if let Some(events) = &mut self.tensorboard {
            events.scalars(m.step, &tensorboard::step_scalars(m))?;
        }
        Ok(())
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
