//! clip_benchmark's result layout (LAION-AI/CLIP_benchmark `cli.py`, the
//! `dump` it writes per model, dataset and task), so that `clipa eval
//! --json` output sits beside its result files:
//!
//! ```json
//! {"dataset": "wds_vtab-cifar10", "model": "vit-b16", "pretrained": "runs/b16",
//!  "task": "zeroshot_classification",
//!  "metrics": {"acc1": 0.91, "acc5": 0.99, "mean_per_class_recall": 0.91},
//!  "language": "en"}
//! ```
//!
//! `acc5` is `null` (clip_benchmark: NaN) under five classes. Retrieval
//! metrics are `image_retrieval_recall@k` (text → image) and
//! `text_retrieval_recall@k` (image → any of its captions) for k = 1, 5,
//! 10, as `zeroshot_retrieval.py` computes them with `--recall_k 1 5 10`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::evaluator::EvalResult;
use crate::model::ClipConfig;
use crate::model::config::PRESETS;

/// clip_benchmark's task names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchmarkTask {
    /// Zero-shot classification.
    ZeroshotClassification,
    /// Zero-shot image–text retrieval.
    ZeroshotRetrieval,
}

/// One result, as clip_benchmark writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchmarkRecord {
    /// The dataset's name (its folder's).
    pub dataset: String,
    /// The model's name: its preset, else the checkpoint folder's name.
    pub model: String,
    /// The checkpoint, as given.
    pub pretrained: String,
    /// What was measured.
    pub task: BenchmarkTask,
    /// clip_benchmark's metrics by name; `null` where it writes NaN.
    pub metrics: BTreeMap<String, Option<f64>>,
    /// The prompts' language: clipa's bundled prompts are English.
    pub language: String,
}

impl BenchmarkRecord {
    /// The record of `result` on `dataset` by `model` from `pretrained`.
    pub fn new(dataset: &str, model: &str, pretrained: &str, result: &EvalResult) -> Self {
        let (task, metrics): (BenchmarkTask, Vec<(String, Option<f64>)>) = match result {
            EvalResult::Zeroshot(z) => (
                BenchmarkTask::ZeroshotClassification,
                vec![
                    ("acc1".into(), Some(z.top1)),
                    // clip_benchmark asks for top-5 only with five classes.
                    ("acc5".into(), (z.classes >= 5).then_some(z.top5)),
                    ("mean_per_class_recall".into(), Some(z.per_class_recall)),
                ],
            ),
            EvalResult::Retrieval(r) => {
                let (i2t, t2i) = (&r.image_to_text, &r.text_to_image);
                let mut m = Vec::new();
                for (k, image, text) in [
                    (1, t2i.r1, i2t.r1),
                    (5, t2i.r5, i2t.r5),
                    (10, t2i.r10, i2t.r10),
                ] {
                    m.push((format!("image_retrieval_recall@{k}"), Some(image)));
                    m.push((format!("text_retrieval_recall@{k}"), Some(text)));
                }
                (BenchmarkTask::ZeroshotRetrieval, m)
            }
        };
        Self {
            dataset: dataset.to_string(),
            model: model.to_string(),
            pretrained: pretrained.to_string(),
            task,
            metrics: metrics.into_iter().collect(),
            language: "en".into(),
        }
    }
}

/// A model's name for reports: the `model` of the training run's
/// `run.toml` when `checkpoint` is a run folder or one of its checkpoints;
/// else the preset with its architecture (image size, context length,
/// initial temperature, normalisation and evaluation resize may differ:
/// training and import change them), the one sharing most of those where
/// several do (`demo` and `tiny` share towers); else the name of the
/// `checkpoint` folder.
pub fn model_name(config: &ClipConfig, checkpoint: &Path) -> String {
    if let Some(name) = run_model(checkpoint) {
        return name;
    }
    let mut best: Option<(usize, &str)> = None;
    for name in PRESETS {
        let Ok(mut p) = ClipConfig::preset(name) else {
            continue;
        };
        let shared = [
            p.vision.image_size == config.vision.image_size,
            p.text.context_length == config.text.context_length,
            p.normalization == config.normalization,
            p.eval_resize == config.eval_resize,
        ]
        .into_iter()
        .filter(|&same| same)
        .count();
        p.vision.image_size = config.vision.image_size;
        p.text.context_length = config.text.context_length;
        p.init_logit_scale = config.init_logit_scale;
        p.init_logit_bias = config.init_logit_bias;
        p.normalization = config.normalization;
        p.eval_resize = config.eval_resize;
        if &p == config && best.is_none_or(|(most, _)| shared > most) {
            best = Some((shared, name));
        }
    }
    match best {
        Some((_, name)) => name.to_string(),
        None => checkpoint
            .canonicalize()
            .unwrap_or_else(|_| checkpoint.to_path_buf())
            .file_name()
            .map_or_else(
                || checkpoint.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
    }
}

/// The `model` key of the `run.toml` of run folder `path`, or of the run
/// that holds checkpoint `path` (`RUN/checkpoints/step-N`).
fn run_model(path: &Path) -> Option<String> {
    let beside = path.join("run.toml");
    let above = path
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"))
        .and_then(Path::parent)
        .map(|run| run.join("run.toml"));
    let file = [Some(beside), above]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())?;
    let table: toml::Table = std::fs::read_to_string(file).ok()?.parse().ok()?;
    Some(table.get("model")?.as_str()?.to_string()).filter(|m| !m.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{RecallAtK, RetrievalResult, ZeroShotResult};

    fn zeroshot(classes: usize) -> EvalResult {
        EvalResult::Zeroshot(ZeroShotResult {
            top1: 0.5,
            top5: 0.75,
            per_class_recall: 0.4,
            samples: 8,
            classes,
            chance: 1.0 / classes as f64,
            skipped: 0,
        })
    }

    #[test]
    fn zeroshot_record_has_clip_benchmark_keys() {
        let r = BenchmarkRecord::new("wds_fmnist", "tiny", "runs/a", &zeroshot(10));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "dataset": "wds_fmnist", "model": "tiny", "pretrained": "runs/a",
                "task": "zeroshot_classification",
                "metrics": {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.4},
                "language": "en",
            })
        );
        // Under five classes clip_benchmark leaves top-5 out (NaN).
        let few = BenchmarkRecord::new("d", "m", "p", &zeroshot(3));
        assert_eq!(few.metrics["acc5"], None);
        assert_eq!(
            serde_json::to_value(&few).unwrap()["metrics"]["acc5"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn retrieval_record_maps_directions() {
        let at = |r1, r5, r10| RecallAtK {
            r1,
            r5,
            r10,
            mean_rank: 2.0,
            median_rank: 1.0,
        };
        let r = EvalResult::Retrieval(RetrievalResult {
            image_to_text: at(0.1, 0.2, 0.3),
            text_to_image: at(0.4, 0.5, 0.6),
            images: 4,
            texts: 8,
        });
        let rec = BenchmarkRecord::new("coco", "m", "p", &r);
        assert_eq!(rec.task, BenchmarkTask::ZeroshotRetrieval);
        assert_eq!(rec.metrics["image_retrieval_recall@5"], Some(0.5));
        assert_eq!(rec.metrics["text_retrieval_recall@10"], Some(0.3));
        assert_eq!(rec.metrics.len(), 6);
    }

    #[test]
    fn model_names_follow_presets_else_the_folder() {
        for name in ["tiny", "demo"] {
            let cfg = ClipConfig::preset(name).unwrap();
            assert_eq!(model_name(&cfg, Path::new("/runs/x")), name);
        }
        // `tiny` trained at 28 px: `demo` has its towers too, but not its
        // context length or normalisation.
        let mut cfg = ClipConfig::preset("tiny").unwrap();
        cfg.vision.image_size = 28;
        assert_eq!(model_name(&cfg, Path::new("/runs/x")), "tiny");
        cfg.vision.layers += 1;
        assert_eq!(model_name(&cfg, Path::new("/runs/my-run")), "my-run");
        // A run folder, or a checkpoint inside one, names its preset.
        let d_tmp = tempfile::tempdir().unwrap();
        let run = d_tmp.path().join("run");
        let step = run.join("checkpoints/step-00000010");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(run.join("run.toml"), "model = \"tiny\"\nseed = 0\n").unwrap();
        let demo = ClipConfig::preset("demo").unwrap();
        assert_eq!(model_name(&demo, &run), "tiny");
        assert_eq!(model_name(&demo, &step), "tiny");
    }
}
