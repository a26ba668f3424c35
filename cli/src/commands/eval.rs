//! `clipa eval`: zero-shot accuracy and image–text retrieval of a
//! checkpoint, batched on any backend, as a table or one JSON object that
//! is also a clip_benchmark result (`clipa_core::eval::benchmark`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, Devices};
use clipa_core::data::benchmark::{BenchmarkSplit, dataset_name};
use clipa_core::eval::benchmark::model_name;
use clipa_core::eval::{
    BenchmarkRecord, EvalResult, EvaluatorConfig, RetrievalEval, RetrievalResult, ZeroShotEval,
    ZeroShotResult,
};
use clipa_core::train::{self, TrainConfig, runstate};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::args::EvalArgs;

/// What `clipa eval --json` prints.
#[derive(Debug, Serialize)]
struct Report {
    zeroshot: Option<ZeroShotResult>,
    retrieval: Option<RetrievalResult>,
    /// Images scored over all evaluations.
    samples: usize,
    /// clip_benchmark's keys (`dataset`, `model`, `task`, `metrics`, …) of
    /// the first evaluation: the zero-shot one when both ran.
    #[serde(flatten)]
    benchmark: BenchmarkRecord,
    /// Every evaluation as a clip_benchmark result.
    results: Vec<BenchmarkRecord>,
}

/// A checkpoint folder, or the newest checkpoint of a run folder.
pub(crate) fn resolve_checkpoint(path: &Path) -> anyhow::Result<PathBuf> {
    if path.join("checkpoints").is_dir() {
        runstate::latest(path)?
            .with_context(|| format!("{} holds no checkpoint yet", path.display()))
    } else {
        Ok(path.to_path_buf())
    }
}

struct EvalJob {
    checkpoint: PathBuf,
    /// The checkpoint as given (clip_benchmark's `pretrained`).
    given: PathBuf,
    evaluators: Vec<EvaluatorConfig>,
    quiet: bool,
}

impl BackendJob for EvalJob {
    type Output = Report;

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<Report> {
        let (device, info) = on.one();
        let (model, tokenizer) =
            clipa_core::checkpoint::load_model::<B::InnerBackend>(&self.checkpoint, &device)?;
        eprintln!("evaluating {} on {info}", self.checkpoint.display());
        let model_name = model_name(&model.config, &self.given);
        let pretrained = self.given.display().to_string();
        let record = |dataset: &str, r: &EvalResult| {
            BenchmarkRecord::new(dataset, &model_name, &pretrained, r)
        };
        let (mut zeroshot, mut retrieval, mut samples) = (None, None, 0);
        let mut results = Vec::new();
        if self.evaluators.is_empty() {
            // The synthetic held-out colour–shape pairs.
            let cfg = TrainConfig::preset("tiny")?;
            let r = train::data::zeroshot_eval(&cfg, &model, &tokenizer, &device)?
                .ok_or_else(|| clipa_core::Error::Config("nothing to evaluate".into()))?;
            results.push(record("synthetic", &EvalResult::Zeroshot(r)));
            samples = r.samples;
            zeroshot = Some(r);
        }
        for e in &self.evaluators {
            let bar = if self.quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new_spinner()
            };
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {pos} images ({per_sec})")
                    .expect("a valid template"),
            );
            bar.set_message(e.name().to_string());
            let result = e.run(
                &model,
                &tokenizer,
                &device,
                Some(&self.checkpoint),
                &mut |n| bar.set_position(n as u64),
            );
            bar.finish_and_clear();
            let result = result?;
            results.push(record(e.name(), &result));
            match result {
                EvalResult::Zeroshot(r) => {
                    samples += r.samples;
                    zeroshot = Some(r);
                }
                EvalResult::Retrieval(r) => {
                    samples += r.images;
                    retrieval = Some(r);
                }
            }
        }
        Ok(Report {
            zeroshot,
            retrieval,
            samples,
            benchmark: results[0].clone(),
            results,
        })
    }
}

/// `clipa eval`.
pub fn run(kind: BackendKind, device: Option<usize>, args: &EvalArgs) -> anyhow::Result<()> {
    let checkpoint = resolve_checkpoint(&args.checkpoint)?;
    let resize = args.resize;
    let templates = args.zeroshot.templates.clone();
    if templates.is_some() && args.zeroshot.zeroshot_data.is_none() {
        bail!("--templates applies to --zeroshot-data, which is not given");
    }
    // `--split` picks a clip_benchmark root's split folder, which the
    // evaluators read like the root's default `test`.
    let split = |data: &Path| -> anyhow::Result<PathBuf> {
        Ok(match &args.split {
            Some(split) => {
                let found = BenchmarkSplit::open(data, split).context("--split")?;
                found.root.join(found.split)
            }
            None => data.to_path_buf(),
        })
    };
    if args.split.is_some()
        && args.zeroshot.zeroshot_data.is_none()
        && args.retrieval_data.is_none()
    {
        bail!("--split applies to --zeroshot-data or --retrieval-data, neither of which is given");
    }
    let mut evaluators = Vec::new();
    if let Some(data) = &args.zeroshot.zeroshot_data {
        let data = split(data)?;
        evaluators.push(EvaluatorConfig::Zeroshot(ZeroShotEval {
            name: dataset_name(&data.to_string_lossy()),
            data,
            classnames: args.zeroshot.classnames.clone(),
            templates,
            resize,
        }));
    }
    if let Some(data) = &args.retrieval_data {
        let data = match args.split {
            Some(_) => split(Path::new(data))?.to_string_lossy().into_owned(),
            None => data.clone(),
        };
        evaluators.push(EvaluatorConfig::Retrieval(RetrievalEval {
            name: dataset_name(&data),
            data,
            csv_img_key: args.csv_img_key.clone(),
            csv_caption_key: args.csv_caption_key.clone(),
            resize,
        }));
    }
    let report = clipa_backends::run(
        kind,
        device,
        EvalJob {
            checkpoint,
            given: args.checkpoint.clone(),
            evaluators,
            quiet: args.json,
        },
    )?;
    if args.json {
        outln!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    if let Some(r) = &report.zeroshot {
        outln!(
            "zero-shot top-1 {:.2}%  top-5 {:.2}%  per-class recall {:.2}%  ({} images, chance {:.2}%)",
            100.0 * r.top1,
            100.0 * r.top5,
            100.0 * r.per_class_recall,
            r.samples,
            100.0 * r.chance
        );
        if r.skipped > 0 {
            outln!(
                "  {} unreadable images skipped (or samples without a usable class label)",
                r.skipped
            );
        }
    }
    if let Some(r) = &report.retrieval {
        outln!(
            "retrieval ({} images, {} captions)   R@1     R@5     R@10    mean rank  median rank",
            r.images,
            r.texts
        );
        for (name, k) in [
            ("image → text", &r.image_to_text),
            ("text → image", &r.text_to_image),
        ] {
            outln!(
                "  {name:<14} {:>6.2}% {:>6.2}% {:>6.2}%  {:>9.2}  {:>11.1}",
                100.0 * k.r1,
                100.0 * k.r5,
                100.0 * k.r10,
                k.mean_rank,
                k.median_rank
            );
        }
    }
    Ok(())
}
