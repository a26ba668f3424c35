//! Training: the CLIPA two-stage recipe as a list of stages, the contrastive
//! step, checkpoints that never lose work, and the metrics a user watches.
//!
//! The loop reads top to bottom (burn `custom-training-loop`, nanoGPT
//! `train.py`): for each stage, resize the model to the stage's image size
//! and text length, restart the optimiser and schedule (as CLIPA's
//! fine-tuning does), then step: lr → batch → reduce → forward → loss →
//! finite check → backward → optimiser → stats.

pub mod batch;
pub mod config;
pub mod data;
pub mod grads;
pub mod lit;
pub mod lock;
pub mod memory;
pub mod optim;
pub mod overrides;
pub mod presets;
mod run;
pub mod runstate;
pub mod schedule;
pub mod step;
pub mod tensorboard;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::tensor::backend::AutodiffBackend;

use serde::{Deserialize, Serialize};

pub use config::{DataConfig, LossKind, Precision, ReportTo, StageConfig, TrainConfig};

use self::data::{PartOf, StageData};
use self::run::train_replica;
use crate::data::DataStatsSnapshot;
use crate::data::loader::LoaderState;
use crate::dist::{Crew, Layout, Replica};
use crate::eval::ZeroShotResult;
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
    /// Start from the weights of this clipa checkpoint folder or OpenCLIP
    /// hub folder instead of a random init (fine-tuning a pre-trained or
    /// released model), with its tokenizer and preprocessing; the
    /// optimiser and schedule start fresh.
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

impl std::str::FromStr for Resume {
    type Err = Error;

    /// `latest`, or a checkpoint folder.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "latest" => Ok(Self::Latest),
            "" => Err(Error::Config(
                "--resume needs `latest` or a checkpoint folder".into(),
            )),
            dir => Ok(Self::Dir(dir.into())),
        }
    }
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
    preflight(&cfg, opts)?;
    let parts = cfg.data.parts.max(1);
    locked_run(opts, observer, |observer| {
        train_replica(
            cfg,
            opts,
            device,
            &Replica::<B>::single(),
            &Feed::new(0..parts, parts),
            observer,
        )
    })
}

/// Checks what a run will need before its folder is made or a step is
/// taken: the config, every evaluator's data (the zero-shot folder and its
/// class names and templates, `[[evaluators]]` sets) and `--init-from`'s
/// model against the config's. Found at the end of a stage, a wrong path
/// threw the stage's training away.
fn preflight(cfg: &TrainConfig, opts: &RunOptions) -> Result<()> {
    cfg.validate()?;
    if let Some(root) = &cfg.data.zeroshot_data {
        crate::eval::EvaluatorConfig::Zeroshot(crate::eval::ZeroShotEval {
            name: "zeroshot".into(),
            data: root.clone(),
            classnames: cfg.data.classnames.clone(),
            templates: cfg.data.templates.clone(),
            resize: None,
        })
        .check()?;
    }
    for eval in &cfg.evaluators {
        eval.check()
            .map_err(|e| Error::Config(format!("evaluator '{}': {e}", eval.name())))?;
    }
    if let (Some(dir), None) = (&opts.init_from, &opts.resume) {
        let have = crate::checkpoint::load_config_or_hub(dir)?;
        let want = cfg.model_config()?;
        if architecture(&have) != architecture(&want) {
            return Err(Error::Config(format!(
                "--init-from {} holds a {} model, but the run's model '{}' is a {}: choose the matching --model",
                dir.display(),
                architecture(&have),
                cfg.model,
                architecture(&want)
            )));
        }
    }
    Ok(())
}

/// What weights must agree on to be loaded into a model: the towers'
/// shapes (not the image size or context length, which stages change).
fn architecture(c: &crate::model::ClipConfig) -> String {
    let (v, t) = (&c.vision, &c.text);
    format!(
        "embed {} / vision patch {} width {} × {} layers ({} heads, MLP {}) / text width {} × {} layers ({} heads, MLP {}, vocabulary {})",
        c.embed_dim,
        v.patch_size,
        v.width,
        v.layers,
        v.heads,
        v.mlp_width,
        t.width,
        t.layers,
        t.heads,
        t.mlp_width,
        t.vocab_size
    )
}

/// Runs `run` holding the run folder's lock ([`lock::RunLock`]), after
/// removing what killed saves left behind. Where `run` fails before
/// logging a step into a folder this call made, the folder is removed
/// again (still under the lock), so a mistake leaves nothing behind; a
/// folder that holds a logged step or a checkpoint is kept.
fn locked_run<T>(
    opts: &RunOptions,
    observer: &mut dyn Observer,
    run: impl FnOnce(&mut dyn Observer) -> Result<T>,
) -> Result<T> {
    let dir = &opts.output;
    let fresh = !dir.exists();
    let lock = lock::RunLock::acquire(dir)?;
    runstate::remove_stale_temps(dir, observer)?;
    let out = run(observer);
    if out.is_err() && fresh {
        let logged = std::fs::metadata(dir.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
        let saved = runstate::list(dir).is_ok_and(|l| !l.is_empty());
        if !logged && !saved {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    drop(lock);
    out
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
    train_distributed(
        cfg,
        opts,
        devices,
        Layout::<B>::local(devices.len()),
        observer,
    )
}

/// [`train_parallel`] as one machine of several (`layout.node`): this
/// process's replicas run on `devices` and read this machine's parts of
/// the data (`data.parts`, one per machine unless set; see
/// [`crate::data::part`]). Machine 0 holds the run folder's lock and
/// writes it, which every machine must see (a shared file system, as for
/// OpenCLIP's `--resume`): the others read their checkpoint from it.
pub fn train_distributed<B: AutodiffBackend>(
    mut cfg: TrainConfig,
    opts: &RunOptions,
    devices: &[B::Device],
    layout: Layout<B>,
    observer: &mut dyn Observer,
) -> Result<TrainSummary> {
    let local = devices.len();
    if local == 0 {
        return Err(Error::Config("no device to train on".into()));
    }
    assert_eq!(local, layout.local_count, "one replica per device");
    let (nodes, world) = (layout.num_nodes(), layout.world());
    if nodes > 1 && cfg.data.parts == 0 {
        // Stored in the run's config, so that a resume reads as many parts
        // whatever machines it runs on.
        cfg.data.parts = nodes;
    }
    let parts = cfg.data.parts.max(1);
    if !parts.is_multiple_of(nodes) {
        return Err(Error::Config(format!(
            "the data is read in {parts} parts (data.parts), which do not split evenly over {nodes} machines"
        )));
    }
    for stage in &cfg.stages {
        let need = (world * stage.accum_steps).max(parts);
        if !stage.batch_size.is_multiple_of(world * stage.accum_steps)
            || !stage.batch_size.is_multiple_of(parts)
        {
            return Err(Error::Config(format!(
                "stage '{}': batch_size {} must split evenly over {world} replicas × {} micro-batches \
                 and {parts} data parts (a multiple of {need})",
                stage.name, stage.batch_size, stage.accum_steps
            )));
        }
    }
    if world == 1 {
        return train::<B>(cfg, opts, &devices[0], observer);
    }
    preflight(&cfg, opts)?;
    let node = layout.node_rank();
    let per_node = parts / nodes;
    let feed = Feed::new(node * per_node..(node + 1) * per_node, parts);
    if let Some(n) = &layout.node {
        crate::dist::check_data_port(n)?;
    }
    let crew = Crew::new(local);
    let run = |observer: &mut dyn Observer| {
        let (cfg, feed, layout, crew) = (&cfg, &feed, &layout, &crew);
        let replica = |i: usize, obs: &mut dyn Observer| -> Result<TrainSummary> {
            let out = Replica::<B>::join_layout(layout, i, &devices[i]).and_then(|rep| {
                let summary = train_replica(cfg.clone(), opts, &devices[i], &rep, feed, obs)?;
                rep.leave()?;
                Ok(summary)
            });
            // A failed replica frees the others, which would wait for it.
            crew.end::<B>(out.is_err());
            out
        };
        std::thread::scope(|s| {
            let others: Vec<_> = (1..local)
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
    };
    if node == 0 {
        locked_run(opts, observer, run)
    } else {
        run(observer)
    }
}

/// An observer for replicas other than the first: replica 0 reports.
struct Silent;

impl Observer for Silent {
    fn stage_start(&mut self, _: usize, _: &StageConfig, _: u64) {}
    fn log(&mut self, _: &StepMetrics, _: u64) {}
    fn message(&mut self, _: &str) {}
}

/// The data of one process, shared by its replicas: one loader per part
/// of the data this process reads ([`crate::data::part`]; one part, the
/// whole batch, unless the run spans machines or sets `--data-parts`)
/// reads its rows of each step's batch once, and every replica takes its
/// rows of them, so the replicas see disjoint samples and together exactly
/// the process's rows. Replicas run in lock-step (each step's all-reduces
/// wait for all), so one cached batch suffices.
pub struct Feed {
    state: std::sync::Mutex<FeedState>,
    /// Held while a replica seeds the backend and initialises its model:
    /// the CPU backend's generator is one per process.
    init: std::sync::Mutex<()>,
    /// The parts this process reads, of `total`.
    parts: std::ops::Range<usize>,
    total: usize,
}

#[derive(Default)]
struct FeedState {
    stage: Option<usize>,
    data: Vec<StageData>,
    step: Option<u64>,
    batch: Option<Arc<NodeBatch>>,
    failed: Option<String>,
}

/// This process's rows of one step's batch (its parts', one after the
/// other).
pub struct NodeBatch {
    /// `[rows, px, px, 3]` u8.
    pub images: Vec<u8>,
    /// `[rows, context]` token ids.
    pub ids: Vec<i64>,
    /// Each of this process's loaders' position after the batch, in part
    /// order.
    pub states: Vec<LoaderState>,
}

impl Feed {
    /// A feed of parts `parts` of the `total` the data is read in.
    pub fn new(parts: std::ops::Range<usize>, total: usize) -> Self {
        assert!(parts.start < parts.end && parts.end <= total);
        Self {
            state: Default::default(),
            init: Default::default(),
            parts,
            total,
        }
    }

    /// This process's rows of stage `stage`'s batch at step `step`,
    /// starting each of its loaders with `start` on first use. A failure is
    /// returned to every replica that asks after it.
    fn batch(
        &self,
        stage: usize,
        step: u64,
        mut start: impl FnMut(PartOf) -> Result<StageData>,
    ) -> Result<Arc<NodeBatch>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &st.failed {
            return Err(Error::Training(format!(
                "another replica's data failed: {e}"
            )));
        }
        let got: Result<Arc<NodeBatch>> = (|| {
            if st.stage != Some(stage) {
                st.data.clear();
                let loaders = self.parts.len();
                for part in self.parts.clone() {
                    let of = PartOf {
                        part,
                        parts: self.total,
                        loaders,
                    };
                    st.data.push(start(of)?);
                }
                st.stage = Some(stage);
                st.step = None;
            }
            if st.step != Some(step) {
                let mut batch = NodeBatch {
                    images: Vec::new(),
                    ids: Vec::new(),
                    states: Vec::with_capacity(st.data.len()),
                };
                for data in &mut st.data {
                    let part = data.next(step)?;
                    batch.images.extend_from_slice(&part.images);
                    batch.ids.extend_from_slice(&part.ids);
                    batch.states.push(part.state);
                }
                st.batch = Some(Arc::new(batch));
                st.step = Some(step);
            }
            Ok(st.batch.clone().expect("read above"))
        })();
        if let Err(e) = &got {
            st.failed = Some(e.to_string());
        }
        got
    }

    /// Good and bad data of the current stage's loaders.
    fn stats(&self) -> DataStatsSnapshot {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum = DataStatsSnapshot::default();
        for data in &st.data {
            sum += data.stats();
        }
        sum
    }
}

#[cfg(test)]
mod tests;
