//! `clipa sweep` and `clipa plan` through the binary: a tiny sweep that
//! stops, resumes and draws its figures; the planner's answers for the
//! paper's own budgets; one-line errors for bad input.

use std::path::Path;

use crate::common::{clipa, fashion_mnist_installed, s, scratch, text};

/// Width and height of a PNG, checking that it is not one flat colour.
fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    let first = *img.get_pixel(0, 0);
    assert!(
        img.pixels().any(|p| *p != first),
        "{} is blank",
        path.display()
    );
    img.dimensions()
}

#[test]
fn tiny_sweep_writes_csv_and_figures_and_skips_done_points() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let out = dir.join("sweep");
    let run = clipa(&["sweep", "--preset", "tiny", "--output", s(&out)]);
    let (stdout, stderr) = text(&run);
    assert!(run.status.success(), "{stderr}");
    assert!(stdout.contains("sweep: 2 of 2 points done"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[1].starts_with("scale-w32_i64-full_t16-full,scale-w32,"));
    assert!(rows[2].starts_with("scale-w32_i16-resize_t16-full,scale-w32,"));
    // total_gflop (column 12): the 16-token pre-train makes it cheaper.
    let gflop = |row: &str| row.split(',').nth(11).unwrap().parse::<f64>().unwrap();
    assert!(gflop(rows[2]) < gflop(rows[1]), "{csv}");
    for name in ["image_tokens.png", "compute.png"] {
        assert_eq!(png_size(&out.join("figures").join(name)), (960, 540));
    }
    // A second run finds both points done and trains nothing.
    let again = clipa(&["sweep", "--preset", "tiny", "--output", s(&out)]);
    let (stdout, stderr) = text(&again);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(stderr.matches("(done)").count(), 2, "{stderr}");
    assert!(!stderr.contains("precision:"), "trained again:\n{stderr}");
    assert!(stdout.contains("sweep: 2 of 2 points done"), "{stdout}");
}

#[test]
fn sweep_mistakes_are_one_line_errors() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let file = dir.join("sweep.toml");
    let dry = clipa(&["sweep", "--preset", "tiny", "--dry-run"]);
    assert!(dry.status.success());
    let toml = String::from_utf8(dry.stdout).unwrap();
    for (bad, want) in [
        (
            toml.replace("image_tokens = [", "image_tokens = [12, "),
            "12 image tokens by resize",
        ),
        (toml.replace("seed = 0", "seed = 0\nsede = 1"), "sede"),
        (
            toml.replace("text_tokens = [16]", "text_tokens = [2]"),
            "text tokens 2",
        ),
    ] {
        std::fs::write(&file, bad).unwrap();
        let out = clipa(&["sweep", "--config", s(&file), "--output", s(&dir.join("o"))]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
    let out = clipa(&["sweep", "--preset", "huge"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("presets: cpu, tiny"), "{stderr}");
}

#[test]
fn fashion_mnist_sweep_compares_strategies_at_equal_tokens() {
    if !fashion_mnist_installed("fashion_mnist_sweep_compares_strategies_at_equal_tokens") {
        return;
    }
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        r#"name = "fm"
seed = 1
image_size = 32
text_length = 16

[data]
kind = "fashion-mnist"
eval_images = 200

[pretrain]
steps = 3
batch_size = 16
base_lr = 0.001
warmup_steps = 1

[finetune]
steps = 2
batch_size = 16
base_lr = 0.0005
warmup_steps = 1

[[grid]]
models = ["scale-w32"]
image = ["random", "grid", "block"]
image_tokens = [16]
text_tokens = [16]

[[grid]]
models = ["scale-w32"]
image_tokens = [64]
text = ["truncate", "syntax"]
text_tokens = [4]
"#,
    )
    .unwrap();
    let out = dir.join("out");
    // An extra evaluator on the folder the sweep converts before its first
    // point: its metrics become CSV columns.
    let mut toml = std::fs::read_to_string(&file).unwrap();
    toml.push_str(&format!(
        "\n[[evaluators]]\nkind = \"zeroshot\"\nname = \"fm\"\ndata = \"{}\"\n",
        s(&out.join("data/fashion-mnist/test"))
    ));
    std::fs::write(&file, toml).unwrap();
    let run = clipa(&["sweep", "--config", s(&file), "--output", s(&out)]);
    let (stdout, stderr) = text(&run);
    assert!(run.status.success(), "{stderr}");
    assert!(stdout.contains("sweep: 5 of 5 points done"), "{stdout}");
    assert!(stderr.contains("converting Fashion-MNIST"), "{stderr}");
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    for id in [
        "scale-w32_i16-random_t16-full",
        "scale-w32_i16-grid_t16-full",
        "scale-w32_i16-block_t16-full",
        "scale-w32_i64-full_t4-truncate",
        "scale-w32_i64-full_t4-syntax",
    ] {
        assert!(csv.contains(id), "{id} missing:\n{csv}");
    }
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",pretrain_fm/top5,finetune_fm/top5"),
        "{csv}"
    );
    // Masking to 16 tokens costs the same FLOPs whichever strategy.
    let gflop: Vec<&str> = csv
        .lines()
        .skip(1)
        .take(3)
        .map(|r| r.split(',').nth(9).unwrap())
        .collect();
    assert!(gflop.iter().all(|g| *g == gflop[0]), "{csv}");
    assert_eq!(png_size(&out.join("figures/strategies.png")), (960, 540));
}

#[test]
fn plan_gives_the_papers_choices_for_the_papers_budgets() {
    for (hours, preset, acc) in [
        ("48", "clipa-b16-i112-t16", "63.2 %"),
        ("72", "clipa-l16-i64-t16", "67.8 %"),
        ("96", "clipa-l16-i96-t8", "69.3 %"),
    ] {
        let out = clipa(&["plan", "--gpus", "8", "--gpu", "a100", "--hours", hours]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains(&format!("recommendation: {preset} (CLIPA-v1 ")),
            "{stdout}"
        );
        assert!(stdout.contains(&format!("zero-shot: {acc}")), "{stdout}");
        assert!(
            stdout.contains(&format!(
                "run it: clipa --backend cuda train --preset {preset} --devices all\n"
            )),
            "{stdout}"
        );
        assert!(
            stdout.contains("throughput:") && stdout.contains("bf16 peak"),
            "{stdout}"
        );
    }
    // --samples and --write: the written run trains with those samples.
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let file = dir.join("plan.toml");
    let out = clipa(&[
        "plan",
        "--gpus",
        "8",
        "--hours",
        "96",
        "--samples",
        "5e8",
        "--write",
        s(&file),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("extrapolated"), "{stdout}");
    // A CLIPA-v2 recipe: the run line asks for the WordPiece vocabulary.
    assert!(
        stdout.contains("--devices all --vocab vocab.txt"),
        "{stdout}"
    );
    let vocab = crate::common::hub_fixture().join("vocab.txt");
    let dry = clipa(&[
        "train",
        "--config",
        s(&file),
        "--vocab",
        s(&vocab),
        "--dry-run",
    ]);
    let (toml, stderr) = text(&dry);
    assert!(dry.status.success(), "{stderr}");
    // 5e8 samples at batch 65,536 (H/14's recipe) is 7,630 steps.
    assert!(toml.contains("steps = 7630"), "{toml}");
    for args in [
        vec!["plan", "--gpus", "8", "--gpu", "tpu", "--hours", "96"],
        vec!["plan", "--gpus", "8", "--hours", "96", "--data", "imagenet"],
        vec!["plan", "--gpus", "1", "--hours", "1"],
    ] {
        let out = clipa(&args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}
