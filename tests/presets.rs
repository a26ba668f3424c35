//! Every training preset runs: each stage of each recipe takes a training
//! step on the CPU with its model and that model's own tokenizer (the
//! CLIPA-v1 recipes crashed on CLIP BPE ids past a 32,000-row table); the
//! presets too large for a CI machine are checked for tokenizer/vocabulary
//! agreement instead; a CLIPA-v2 recipe without `--vocab` is a one-line
//! error; and `clipa plan`'s printed command is one that starts.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, DeviceInfo};
use clipa_core::bench::{self, BenchCase, BenchHooks, BenchResult, BenchSteps};
use clipa_core::data::tokenizer::Tokenizer;
use clipa_core::model::TokenizerConfig;
use clipa_core::train::config::PRESETS;
use clipa_core::train::{Precision, TrainConfig};

use crate::common::{clipa, hub_fixture, s, scratch, text};

/// Parameters above which a preset's step is not run here: weights,
/// gradients and AdamW's two moments take 16 bytes a parameter, and 500 M
/// of them (8 GB) leave room on a 24 GB CI machine for the other tests.
/// CLIPA's H/14 (1.0 B) and bigG/14 (2.5 B) are over it.
const MAX_PARAMS: u64 = 500_000_000;

struct NoHooks;

impl BenchHooks for NoHooks {
    fn reset_peak_memory(&mut self) {}
    fn peak_memory(&mut self) -> Option<u64> {
        None
    }
}

/// One training step per case, on the backend `clipa` runs.
struct Steps(Vec<BenchCase>);

impl BackendJob for Steps {
    type Output = Vec<BenchResult>;

    fn run<B: AutodiffBackend>(
        self,
        device: B::Device,
        _: &DeviceInfo,
    ) -> clipa_core::Result<Self::Output> {
        let steps = BenchSteps {
            warmup: 0,
            steps: 1,
        };
        self.0
            .iter()
            .map(|case| {
                eprintln!("{}: one step", case.name);
                bench::run_case::<B>(case, steps, &device, &mut NoHooks)
            })
            .collect()
    }
}

/// The training step of every stage of preset `name` at batch 2, as
/// `clipa train --preset NAME --batch-size 2` runs it: the preset's model,
/// its tokenizer (WordPiece over `vocab`), each stage's image and text
/// tokens and reductions.
fn stage_cases(name: &str, vocab: &Path) -> (TrainConfig, Vec<BenchCase>) {
    let mut cfg = TrainConfig::preset(name).unwrap();
    let model = cfg.model_config().unwrap();
    if model.text.tokenizer != TokenizerConfig::ClipBpe {
        cfg.vocab = Some(vocab.to_path_buf());
    }
    cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    let tokenizer = Tokenizer::for_text(&model.text, cfg.vocab.as_deref())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let cases = cfg
        .stages
        .iter()
        .map(|stage| BenchCase {
            name: format!("{name}/{}", stage.name),
            model: model.clone(),
            tokenizer: tokenizer.clone(),
            batch: 2,
            image_size: stage.image_size,
            image_reduction: stage.image_reduction,
            text_length: stage.text_length,
            text_reduction: stage.text_reduction,
            accum_steps: 1,
            precision: Precision::F32,
            grad_checkpointing: false,
        })
        .collect();
    (cfg, cases)
}

/// The BERT-style vocabulary of the hub fixture, standing in for
/// bert-base-uncased's (which cannot be downloaded here).
fn vocab() -> PathBuf {
    hub_fixture().join("vocab.txt")
}

#[test]
fn every_training_preset_runs_a_step_with_its_own_tokenizer() {
    let vocab = vocab();
    let mut run = Vec::new();
    let mut checked = Vec::new();
    for name in PRESETS {
        let (cfg, cases) = stage_cases(name, &vocab);
        let model = cfg.model_config().unwrap();
        // Every id the tokenizer can emit has a row: the check the
        // crashing v1 recipes failed.
        let rows = model.text.vocab_size;
        let tokenizer = &cases[0].tokenizer;
        assert!(tokenizer.vocab_size() <= rows, "{name}");
        match model.text.tokenizer {
            TokenizerConfig::ClipBpe => assert_eq!(rows, 49_408, "{name}"),
            TokenizerConfig::WordPiece { .. } => assert_eq!(rows, 32_000, "{name}"),
        }
        if model.num_params() <= MAX_PARAMS {
            run.extend(cases);
        } else {
            checked.push(name);
        }
    }
    let n = run.len();
    let results = clipa_backends::run(BackendKind::Cpu, None, Steps(run)).unwrap();
    assert_eq!(results.len(), n);
    for r in &results {
        // run_case errs on a non-finite loss; a step took time.
        assert!(r.median_ms > 0.0 && r.train_gflop > 0.0, "{r:?}");
    }
    eprintln!(
        "{n} stage steps ran; checked without a step (over {MAX_PARAMS} parameters): {checked:?}"
    );
    // The paper's v1 recipes, the ones that crashed, ran.
    for v1 in [
        "clipa-b16-i112-t16",
        "clipa-l16-i64-t16",
        "clipa-l16-i96-t8",
    ] {
        assert!(
            results.iter().any(|r| r.name.starts_with(v1)),
            "{v1} ran a step"
        );
    }
}

#[test]
fn a_v2_recipe_without_a_vocabulary_is_a_one_line_error() {
    let tmp = scratch("v2-no-vocab");
    let run = tmp.join("run");
    let out = clipa(&[
        "train",
        "--preset",
        "clipa-v2-h14-84-224",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--output",
        s(&run),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--vocab FILE") && stderr.contains("bert-base-uncased"),
        "{stderr}"
    );
    assert!(!run.exists(), "nothing trained, no run folder");
    // A vocabulary for a CLIP BPE model is a mistake too.
    let vocab = vocab();
    let out = clipa(&[
        "train",
        "--preset",
        "tiny",
        "--vocab",
        s(&vocab),
        "--output",
        s(&run),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("built-in CLIP BPE"), "{stderr}");
}

#[test]
fn plans_run_command_starts_the_recommended_preset_on_every_gpu() {
    let out = clipa(&["plan", "--gpus", "8", "--gpu", "a100", "--hours", "96"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains("not built"), "{stdout}");
    let line = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("run it: "))
        .unwrap_or_else(|| panic!("no run line: {stdout}"));
    assert_eq!(
        line,
        "clipa --backend cuda train --preset clipa-l16-i96-t8 --devices all"
    );
    // The very command resolves (a dry run needs no GPU)...
    let mut args: Vec<&str> = line.split_whitespace().skip(1).collect();
    args.push("--dry-run");
    let dry = clipa(&args);
    let (toml, stderr) = text(&dry);
    assert!(dry.status.success(), "{stderr}");
    assert!(toml.contains("model = \"clipa-v1-l16\""), "{toml}");
    // ...and its preset is one that takes a training step on the CPU in
    // `every_training_preset_runs_a_step_with_its_own_tokenizer`.
    let preset = args[args.iter().position(|a| *a == "--preset").unwrap() + 1];
    assert!(PRESETS.contains(&preset), "{preset}");
    let model = TrainConfig::preset(preset).unwrap().model_config().unwrap();
    assert!(
        model.num_params() <= MAX_PARAMS,
        "{preset} runs its step there"
    );
    // Past one machine the plan says multi-machine training is not there.
    let out = clipa(&["plan", "--gpus", "64", "--gpu", "a100", "--hours", "96"]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("training across machines is not available yet"),
        "{stdout}"
    );
}

/// A clipa_torch model config (`ViT-L-16-CL8-Syntax-GAP.json`, here at a
/// tiny width) trains as clipa_torch trains it: its `text_mask` becomes
/// every stage's text reduction, and `--text-reduction` still overrides.
#[test]
fn a_clipa_torch_config_trains_with_its_text_mask() {
    let tmp = scratch("torch-config");
    let model = tmp.join("ViT-tiny-CL8-Syntax-GAP.json");
    std::fs::write(
        &model,
        r#"{"embed_dim": 64,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                           "patch_size": 4, "global_average_pool": true},
            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 2, "text_mask": "syntax"}}"#,
    )
    .unwrap();
    let run = tmp.join("run");
    let out = clipa(&[
        "train",
        "--preset",
        "tiny",
        "--model",
        s(&model),
        "--steps",
        "3",
        "--output",
        s(&run),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let toml = std::fs::read_to_string(run.join("run.toml")).unwrap();
    assert!(toml.contains("text_reduction = \"syntax\""), "{toml}");
    assert_eq!(crate::common::curve(&run).len(), 3, "three logged steps");
    let dry = clipa(&[
        "train",
        "--preset",
        "tiny",
        "--model",
        s(&model),
        "--text-reduction",
        "block",
        "--dry-run",
    ]);
    let (toml, stderr) = text(&dry);
    assert!(dry.status.success(), "{stderr}");
    assert!(toml.contains("text_reduction = \"block\""), "{toml}");
}
