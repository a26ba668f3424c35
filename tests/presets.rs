//! Every training preset runs: each stage of each recipe takes a training
//! step on the CPU with its model and that model's own tokenizer (the
//! CLIPA-v1 recipes crashed on CLIP BPE ids past a 32,000-row table); the
//! presets too large for a CI machine are checked for tokenizer/vocabulary
//! agreement instead; a CLIPA-v2 recipe without `--vocab` is a one-line
//! error; and `clipa plan`'s printed command is one that starts.

use std::path::{Path, PathBuf};

use clipa_core::data::tokenizer::Tokenizer;
use clipa_core::model::TokenizerConfig;
use clipa_core::train::TrainConfig;
use clipa_core::train::presets::{self, PRESETS};

use crate::common::{clipa, hub_fixture, s, scratch, text};

/// Parameters above which a preset's step is not run here: weights,
/// gradients and AdamW's two moments take 16 bytes a parameter, and 500 M
/// of them (8 GB) leave room on a 24 GB CI machine for the other tests.
/// CLIPA's H/14 (1.0 B) and bigG/14 (2.5 B) are over it.
const MAX_PARAMS: u64 = 500_000_000;

/// The BERT-style vocabulary of the hub fixture, standing in for
/// bert-base-uncased's (which cannot be downloaded here).
fn vocab() -> PathBuf {
    hub_fixture().join("vocab.txt")
}

/// One training step (forward, loss, backward, AdamW) of every stage of
/// preset `name` at batch 2, through `clipa bench`: the preset's model, the
/// tokenizer its config names (WordPiece over `vocab`), and each stage's
/// image and text tokens and reductions. Returns the stages' reports.
fn step_every_stage(name: &str, vocab: &Path) -> Vec<serde_json::Value> {
    let cfg = TrainConfig::preset(name).unwrap();
    let wordpiece = cfg.model_config().unwrap().text.tokenizer != TokenizerConfig::ClipBpe;
    cfg.stages
        .iter()
        .map(|stage| {
            let (px, image, text_len, reduction) = (
                stage.image_size.to_string(),
                stage.image_reduction.to_string(),
                stage.text_length.to_string(),
                stage.text_reduction.to_string(),
            );
            let mut args = vec![
                "bench",
                "--model",
                &cfg.model,
                "--batch-size",
                "2",
                "--image-size",
                &px,
                "--image-reduction",
                &image,
                "--text-length",
                &text_len,
                "--text-reduction",
                &reduction,
                "--steps",
                "1",
                "--warmup",
                "0",
                "--json",
            ];
            if wordpiece {
                args.extend(["--vocab", s(vocab)]);
            }
            let out = clipa(&args);
            let (stdout, stderr) = text(&out);
            assert!(out.status.success(), "{name}/{}: {stderr}", stage.name);
            eprintln!("{name}/{}: one step", stage.name);
            let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            report["cases"][0].clone()
        })
        .collect()
}

#[test]
fn every_training_preset_runs_a_step_with_its_own_tokenizer() {
    let vocab = vocab();
    let (mut ran, mut checked) = (Vec::new(), Vec::new());
    for name in PRESETS.iter().map(|p| p.name) {
        let mut cfg = TrainConfig::preset(name).unwrap();
        let model = cfg.model_config().unwrap();
        let rows = model.text.vocab_size;
        match model.text.tokenizer {
            TokenizerConfig::ClipBpe => assert_eq!(rows, 49_408, "{name}"),
            TokenizerConfig::WordPiece { .. } => {
                assert_eq!(rows, 32_000, "{name}");
                cfg.vocab = Some(vocab.clone());
            }
        }
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        // Every id the tokenizer can emit has a row: the check the
        // crashing v1 recipes failed.
        let tokenizer = Tokenizer::for_text(&model.text, cfg.vocab.as_deref())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(tokenizer.vocab_size() <= rows, "{name}");
        if model.num_params() > MAX_PARAMS {
            checked.push(name);
            continue;
        }
        for case in step_every_stage(name, &vocab) {
            // bench errs on a non-finite loss; the step took time and FLOPs.
            assert!(case["median_ms"].as_f64().unwrap() > 0.0, "{case}");
            assert!(case["train_gflop"].as_f64().unwrap() > 0.0, "{case}");
        }
        ran.push(name);
    }
    eprintln!(
        "ran a step of every stage of {ran:?}; checked without a step (over {MAX_PARAMS} parameters): {checked:?}"
    );
    // The paper's v1 recipes, the ones that crashed, ran.
    for v1 in [
        "clipa-b16-i112-t16",
        "clipa-l16-i64-t16",
        "clipa-l16-i96-t8",
    ] {
        assert!(ran.contains(&v1), "{v1} ran a step");
    }
}

#[test]
fn a_v2_recipe_without_a_vocabulary_is_a_one_line_error() {
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
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
    assert!(presets::find(preset).is_some(), "{preset}");
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
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
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
