//! `clipa sweep`: the inverse scaling law (CLIPA §4, Figs. 3–5) on your own
//! machine. Every point of a [`SweepConfig`] grid is a pre-train at reduced
//! tokens and a short fine-tune at full length, each a normal training run
//! in its own folder; after each phase the sweep scores zero-shot accuracy
//! (and any extra evaluators) and counts the phase's training FLOPs.
//!
//! Nothing is lost on a restart: a finished phase is recorded in
//! `points/<id>/<phase>.json` and never rerun, an interrupted phase resumes
//! from its newest checkpoint, and `sweep.csv` is rewritten from the
//! records after every point.
//!
//! ```text
//! OUT/sweep.toml                      the resolved sweep
//! OUT/data/fashion-mnist/             converted on first use
//! OUT/points/<id>/{pretrain,finetune}/  training runs
//! OUT/points/<id>/{pretrain,finetune}.json, result.json
//! OUT/sweep.csv
//! ```

pub mod config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

pub use config::{Grid, ImageStrategy, Phase, SweepConfig, SweepData, SweepPoint};

use crate::data::fmnist::{self, FashionMnistOptions};
use crate::data::tokenizer::Tokenizer;
use crate::io::write_atomic;
use crate::model::ClipConfig;
use crate::reduce::{ImageReduction, TextReduction};
use crate::train::{self, Observer, Resume, RunOptions, StageConfig, TrainConfig, runstate};
use crate::{Error, Result};

/// The two phases of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    /// Reduced tokens, from a random init.
    Pretrain,
    /// Full tokens, from the pre-trained weights.
    Finetune,
}

impl PhaseKind {
    /// Folder and file name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pretrain => "pretrain",
            Self::Finetune => "finetune",
        }
    }
}

/// What one phase of one point produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseResult {
    /// Training samples.
    pub samples: u64,
    /// Training FLOPs (clipa's counter: matrix products, 3 × forward).
    pub flops: f64,
    /// Training wall seconds, summed over the sessions that ran it.
    pub seconds: f64,
    /// Zero-shot top-1 after the phase, at the phase's own image size.
    pub top1: f64,
    /// Zero-shot top-5.
    pub top5: f64,
    /// Extra evaluators' metrics, as `name/metric`.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// One finished point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    /// The point.
    pub point: SweepPoint,
    /// Model parameters.
    pub params: u64,
    /// Pre-training at reduced tokens.
    pub pretrain: PhaseResult,
    /// Fine-tuning at full tokens.
    pub finetune: PhaseResult,
}

impl PointResult {
    /// Training FLOPs of both phases.
    pub fn flops(&self) -> f64 {
        self.pretrain.flops + self.finetune.flops
    }
}

/// How a sweep is launched.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The sweep folder.
    pub output: PathBuf,
    /// Set on SIGINT/SIGTERM: the running phase checkpoints and the sweep stops.
    pub interrupt: Arc<AtomicBool>,
    /// A user lexicon for syntax masking.
    pub lexicon: Option<PathBuf>,
}

/// What a user watches: the trainer's events plus the sweep's own.
pub trait SweepObserver: Observer {
    /// Point `index` of `total` starts (or is found done).
    fn point_start(&mut self, index: usize, total: usize, point: &SweepPoint, done: bool);
    /// A point finished; `results` are all finished points so far.
    fn point_done(&mut self, results: &[PointResult]);
}

/// The outcome of [`run`].
#[derive(Debug, Clone)]
pub struct SweepSummary {
    /// Finished points, in grid order.
    pub results: Vec<PointResult>,
    /// Points in the grid.
    pub total: usize,
    /// `OUT/sweep.csv`.
    pub csv: PathBuf,
    /// Whether a signal stopped the sweep early.
    pub interrupted: bool,
}

/// The data every point trains and is scored on.
struct DataPaths {
    train_data: Option<String>,
    zeroshot_data: Option<PathBuf>,
    classnames: Option<PathBuf>,
}

/// Runs (or continues) the sweep in `opts.output`.
pub fn run<B: AutodiffBackend>(
    cfg: &SweepConfig,
    opts: &SweepOptions,
    device: &B::Device,
    observer: &mut dyn SweepObserver,
) -> Result<SweepSummary> {
    cfg.validate()?;
    let out = opts.output.as_path();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    check_same_sweep(cfg, &out.join("sweep.toml"))?;
    write_atomic(&out.join("sweep.toml"), cfg.to_toml().as_bytes())?;
    let data = prepare_data(cfg, out, observer)?;
    let points = cfg.points()?;
    let csv = out.join("sweep.csv");
    let mut results = Vec::new();
    let mut interrupted = false;
    for (i, point) in points.iter().enumerate() {
        let dir = out.join("points").join(point.id());
        let record = dir.join("result.json");
        if record.is_file() {
            observer.point_start(i, points.len(), point, true);
            results.push(read_json::<PointResult>(&record)?);
            continue;
        }
        observer.point_start(i, points.len(), point, false);
        let model = ClipConfig::preset(&point.model)?;
        let mut phases = Vec::with_capacity(2);
        for kind in [PhaseKind::Pretrain, PhaseKind::Finetune] {
            match run_phase::<B>(cfg, point, kind, &data, &dir, opts, device, observer)? {
                Some(r) => phases.push(r),
                None => {
                    interrupted = true;
                    break;
                }
            }
        }
        if interrupted {
            break;
        }
        let finetune = phases.pop().expect("two phases ran");
        let pretrain = phases.pop().expect("two phases ran");
        let result = PointResult {
            point: point.clone(),
            params: model.num_params(),
            pretrain,
            finetune,
        };
        write_atomic(&record, to_json(&result).as_bytes())?;
        // The fine-tuned weights stay for `clipa eval`; the pre-training
        // run and the optimiser moments are only needed to resume.
        tidy(&dir)?;
        results.push(result);
        write_atomic(&csv, to_csv(&results).as_bytes())?;
        observer.point_done(&results);
        if opts.interrupt.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
    }
    write_atomic(&csv, to_csv(&results).as_bytes())?;
    Ok(SweepSummary {
        results,
        total: points.len(),
        csv,
        interrupted,
    })
}

/// A restart must be the same sweep: the same data, phases and seed, so
/// that finished points stay comparable. The grid may grow.
fn check_same_sweep(cfg: &SweepConfig, path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let old = SweepConfig::from_toml(&text, path)?;
    let mut differ = Vec::new();
    if old.seed != cfg.seed {
        differ.push("seed");
    }
    if old.image_size != cfg.image_size || old.text_length != cfg.text_length {
        differ.push("image_size/text_length");
    }
    if old.data != cfg.data {
        differ.push("data");
    }
    if old.pretrain != cfg.pretrain || old.finetune != cfg.finetune {
        differ.push("pretrain/finetune");
    }
    if old.evaluators != cfg.evaluators {
        differ.push("evaluators");
    }
    if differ.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{} holds a sweep with a different {}: its finished points would not compare; choose another --output",
            path.parent().unwrap_or(path).display(),
            differ.join(", ")
        )))
    }
}

/// Converts Fashion-MNIST into the sweep folder on first use.
fn prepare_data(cfg: &SweepConfig, out: &Path, observer: &mut dyn Observer) -> Result<DataPaths> {
    Ok(match &cfg.data {
        SweepData::Synthetic => DataPaths {
            train_data: None,
            zeroshot_data: None,
            classnames: None,
        },
        SweepData::Files {
            train_data,
            zeroshot_data,
            classnames,
        } => DataPaths {
            train_data: Some(train_data.clone()),
            zeroshot_data: Some(zeroshot_data.clone()),
            classnames: classnames.clone(),
        },
        SweepData::FashionMnist {
            idx_dir,
            eval_images,
        } => {
            let root = out.join("data").join("fashion-mnist");
            let done = root.join("converted.json");
            let opts = FashionMnistOptions {
                input: idx_dir.clone().unwrap_or_else(|| fmnist::DEBIAN_DIR.into()),
                out: root.clone(),
                limit_test: *eval_images,
                ..FashionMnistOptions::default()
            };
            if !done.is_file() && !opts.input.is_dir() {
                return Err(Error::Config(format!(
                    "Fashion-MNIST's IDX files are not in {}: install them with `apt-get install dataset-fashion-mnist` (Debian), or set data.idx_dir",
                    opts.input.display()
                )));
            }
            let pattern = if done.is_file() {
                read_json::<String>(&done)?
            } else {
                observer.message(&format!(
                    "converting Fashion-MNIST from {} into {}",
                    opts.input.display(),
                    root.display()
                ));
                let s = fmnist::convert(&opts)?;
                write_atomic(&done, to_json(&s.train_pattern).as_bytes())?;
                s.train_pattern
            };
            let test = root.join("test");
            DataPaths {
                train_data: Some(pattern),
                classnames: Some(test.join("classnames.txt")),
                zeroshot_data: Some(test),
            }
        }
    })
}

/// The training run of one phase of one point.
fn phase_config(
    cfg: &SweepConfig,
    point: &SweepPoint,
    kind: PhaseKind,
    data: &DataPaths,
) -> Result<TrainConfig> {
    let model = ClipConfig::preset(&point.model)?;
    let patch = model.vision.patch_size;
    let grid = cfg.image_size as usize / patch;
    let (image_reduction, text_length, text_reduction, p) = match kind {
        PhaseKind::Pretrain => (
            match point.image {
                Some(s) => s.reduction(point.image_tokens, grid, patch)?,
                None => ImageReduction::None,
            },
            point.text_tokens,
            point.text.unwrap_or_default(),
            cfg.pretrain,
        ),
        PhaseKind::Finetune => (
            ImageReduction::None,
            cfg.text_length,
            TextReduction::Truncate,
            cfg.finetune,
        ),
    };
    let stage = StageConfig {
        name: kind.as_str().into(),
        image_size: cfg.image_size,
        image_reduction,
        text_length,
        text_reduction,
        steps: p.steps,
        batch_size: p.batch_size,
        accum_steps: 1,
        base_lr: p.base_lr,
        warmup_steps: p.warmup_steps.min(p.steps),
        end_base_lr: 0.0,
    };
    let mut run = TrainConfig::base(&point.model, vec![stage]);
    run.seed = cfg.seed;
    run.log_every = 10;
    run.checkpoint_every = 100;
    run.keep_checkpoints = 1;
    // The sweep scores each phase itself (below), once; the trainer would
    // score the same folder again at the stage end.
    run.data.train_data = data.train_data.clone();
    // A fine-tune starts from its pre-training checkpoint, tokenizer and all.
    if kind == PhaseKind::Pretrain {
        run.vocab = cfg.vocab.clone();
    }
    run.validate()?;
    Ok(run)
}

/// Runs one phase (or picks up its record); `None` when interrupted.
#[allow(clippy::too_many_arguments)]
fn run_phase<B: AutodiffBackend>(
    cfg: &SweepConfig,
    point: &SweepPoint,
    kind: PhaseKind,
    data: &DataPaths,
    dir: &Path,
    opts: &SweepOptions,
    device: &B::Device,
    observer: &mut dyn SweepObserver,
) -> Result<Option<PhaseResult>> {
    let record = dir.join(format!("{}.json", kind.as_str()));
    if record.is_file() {
        return read_json(&record).map(Some);
    }
    let run_cfg = phase_config(cfg, point, kind, data)?;
    let run_dir = dir.join(kind.as_str());
    let init_from = match kind {
        PhaseKind::Pretrain => None,
        PhaseKind::Finetune => Some(
            runstate::latest(&dir.join(PhaseKind::Pretrain.as_str()))?.ok_or_else(|| {
                Error::Training(format!(
                    "{}: the pre-training checkpoint is missing",
                    dir.display()
                ))
            })?,
        ),
    };
    let resume = runstate::latest(&run_dir)?.map(|_| Resume::Latest);
    let run_opts = RunOptions {
        output: run_dir.clone(),
        init_from: if resume.is_some() { None } else { init_from },
        resume,
        interrupt: opts.interrupt.clone(),
        lexicon: opts.lexicon.clone(),
    };
    let summary = train::train::<B>(run_cfg.clone(), &run_opts, device, observer)?;
    // Wall time over sessions: an interrupted phase adds its part here.
    let seconds_file = run_dir.join("sweep-seconds.json");
    let before: f64 = read_json(&seconds_file).unwrap_or(0.0);
    let seconds = before + summary.stages.iter().map(|s| s.seconds).sum::<f64>();
    write_atomic(&seconds_file, to_json(&seconds).as_bytes())?;
    if summary.interrupted {
        return Ok(None);
    }
    let checkpoint = runstate::latest(&run_dir)?.ok_or_else(|| {
        Error::Training(format!(
            "{}: no checkpoint after training",
            run_dir.display()
        ))
    })?;
    let (model, tokenizer) =
        crate::checkpoint::load_model::<B::InnerBackend>(&checkpoint, &device.clone())?;
    let (top1, top5, metrics) = evaluate(&run_cfg, data, cfg, &model, &tokenizer, device)?;
    let stage = &run_cfg.stages[0];
    let flops = stage.train_flops(&ClipConfig::preset(&point.model)?);
    let result = PhaseResult {
        samples: stage.samples(),
        flops,
        seconds,
        top1,
        top5,
        metrics,
    };
    observer.message(&format!(
        "{} {}: zero-shot top-1 {:.1}% (top-5 {:.1}%), {:.0} s",
        point.id(),
        kind.as_str(),
        100.0 * top1,
        100.0 * top5,
        seconds
    ));
    write_atomic(&record, to_json(&result).as_bytes())?;
    Ok(Some(result))
}

/// Zero-shot top-1/top-5 and the extra evaluators' metrics of `model`.
fn evaluate<B: burn::tensor::backend::Backend>(
    run_cfg: &TrainConfig,
    data: &DataPaths,
    cfg: &SweepConfig,
    model: &crate::model::ClipModel<B>,
    tokenizer: &Tokenizer,
    device: &B::Device,
) -> Result<(f64, f64, BTreeMap<String, f64>)> {
    let mut eval_cfg = run_cfg.clone();
    eval_cfg.data.zeroshot_data = data.zeroshot_data.clone();
    eval_cfg.data.classnames = data.classnames.clone();
    let z = train::data::zeroshot_eval(&eval_cfg, model, tokenizer, device)?
        .ok_or_else(|| Error::Config("the sweep's data has no zero-shot set".into()))?;
    let mut metrics = BTreeMap::new();
    for e in &cfg.evaluators {
        for (k, v) in e
            .run(model, tokenizer, device, None, &mut |_| {})?
            .metrics()
        {
            metrics.insert(format!("{}/{k}", e.name()), v);
        }
    }
    Ok((z.top1, z.top5, metrics))
}

/// Deletes what only a resume needs: the pre-training run's checkpoints
/// and the fine-tune's optimiser moments (about 2/3 of a checkpoint).
fn tidy(dir: &Path) -> Result<()> {
    let pre = runstate::checkpoints_dir(&dir.join(PhaseKind::Pretrain.as_str()));
    if pre.is_dir() {
        std::fs::remove_dir_all(&pre).map_err(|e| Error::io(&pre, e))?;
    }
    for (_, ckpt) in runstate::list(&dir.join(PhaseKind::Finetune.as_str()))? {
        let f = ckpt.join(runstate::OPTIMIZER_FILE);
        if f.is_file() {
            std::fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
        }
    }
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("sweep records are plain data")
}

/// `sweep.csv`: one row per finished point; extra evaluator metrics as
/// `pretrain_<name/metric>` and `finetune_<name/metric>` columns.
pub fn to_csv(results: &[PointResult]) -> String {
    let mut extra: Vec<&String> = results
        .iter()
        .flat_map(|r| r.pretrain.metrics.keys().chain(r.finetune.metrics.keys()))
        .collect();
    extra.sort();
    extra.dedup();
    let mut out = String::from(
        "point,model,params,image_strategy,image_tokens,text_strategy,text_tokens,\
         pretrain_samples,finetune_samples,pretrain_gflop,finetune_gflop,total_gflop,\
         pretrain_seconds,finetune_seconds,pretrain_top1,pretrain_top5,finetune_top1,finetune_top5",
    );
    for k in &extra {
        out.push_str(&format!(",pretrain_{k},finetune_{k}"));
    }
    out.push('\n');
    for r in results {
        let p = &r.point;
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.4},{:.4},{:.4},{:.4}",
            p.id(),
            p.model,
            r.params,
            p.image.map_or("none", ImageStrategy::as_str),
            p.image_tokens,
            p.text.map_or("none", TextReduction::as_str),
            p.text_tokens,
            r.pretrain.samples,
            r.finetune.samples,
            r.pretrain.flops / 1e9,
            r.finetune.flops / 1e9,
            r.flops() / 1e9,
            r.pretrain.seconds,
            r.finetune.seconds,
            r.pretrain.top1,
            r.pretrain.top5,
            r.finetune.top1,
            r.finetune.top5,
        ));
        for k in &extra {
            let cell =
                |m: &BTreeMap<String, f64>| m.get(*k).map_or(String::new(), |v| format!("{v:.4}"));
            out.push_str(&format!(
                ",{},{}",
                cell(&r.pretrain.metrics),
                cell(&r.finetune.metrics)
            ));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
