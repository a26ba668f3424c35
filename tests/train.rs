//! `clipa train` / `clipa eval` through the binary: a tiny run writes its
//! run folder, a run killed with SIGKILL at a random step resumes to the
//! uninterrupted loss curve, user mistakes are one-line errors.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{clipa, curve, s, scratch, skip_or_fail, text};

/// A temporary folder whose `run` subfolder `clipa train` creates, deleted
/// when the returned guard drops.
fn run_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = scratch();
    let run = tmp.path().join("run");
    (tmp, run)
}

const TINY: [&str; 8] = [
    "train",
    "--preset",
    "tiny",
    "--log-every",
    "1",
    "--checkpoint-every",
    "2",
    "--workers=1",
];

#[test]
fn tiny_run_writes_config_metrics_checkpoints_and_evaluates() {
    let (_dir_tmp, dir) = run_dir();
    let out = clipa(
        &[
            &TINY[..],
            &["--output", dir.to_str().unwrap(), "--steps", "4"],
            &["--batch-size", "8", "--train-num-samples", "20"],
        ]
        .concat(),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("zero-shot top-1"), "{stdout}");
    assert!(dir.join("run.toml").is_file());
    assert_eq!(
        curve(&dir).iter().map(|c| c.0).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    // 4 steps of 8 samples, with 20 samples to an epoch.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("a line")).expect("JSON");
    assert_eq!(last["samples"], 32);
    assert_eq!(last["epoch"], 1.6);
    let out = clipa(&["eval", "--checkpoint", dir.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("chance 2.50%"), "{stdout}");
}

/// SIGKILL at a random moment (never a clean shutdown), then `--resume
/// latest`: the loss curve equals the uninterrupted one to 1e-6, with no
/// step repeated or skipped.
#[cfg(unix)]
#[test]
fn a_killed_run_resumes_to_the_same_loss_curve() {
    let (_full_tmp, full) = run_dir();
    let out = clipa(
        &[
            &TINY[..],
            &["--steps", "12", "--output", full.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", text(&out).1);
    let want = curve(&full);
    assert_eq!(want.len(), 12);

    let (_cut_tmp, cut) = run_dir();
    // A kill point drawn from the clock: after 3..=9 logged steps.
    let kill_after = 3
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 7) as usize;
    let mut child = Command::new(env!("CARGO_BIN_EXE_clipa"))
        .args(
            [
                &TINY[..],
                &["--steps", "12", "--output", cut.to_str().unwrap()],
            ]
            .concat(),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while curve(&cut).len() < kill_after && t0.elapsed() < Duration::from_secs(300) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    let out = clipa(
        &[
            &TINY[..],
            &[
                "--steps",
                "12",
                "--output",
                cut.to_str().unwrap(),
                "--resume",
                "latest",
            ],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", text(&out).1);
    let got = curve(&cut);
    assert_eq!(
        got.iter().map(|c| c.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>(),
        "killed after {kill_after}"
    );
    for ((s, a), (_, b)) in want.iter().zip(&got) {
        assert!(
            (a - b).abs() <= 1e-6,
            "step {s}: {a} vs {b} (killed after {kill_after})"
        );
    }

    // Resuming with another model is refused, naming the setting.
    let out = clipa(
        &[
            &TINY[..],
            &[
                "--steps",
                "12",
                "--output",
                cut.to_str().unwrap(),
                "--resume",
                "latest",
                "--model",
                "demo",
            ],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2));
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("cannot resume") && stderr.contains("model"),
        "{stderr}"
    );
}

#[test]
fn user_mistakes_are_one_line_errors() {
    let bf16_run_tmp = scratch();
    let bf16_run = bf16_run_tmp.path();
    let missing_run_tmp = scratch();
    let missing_run = missing_run_tmp.path();
    for (args, needle) in [
        (
            vec!["train", "--image-reduction", "random:1.5", "--dry-run"],
            "mask ratio",
        ),
        (
            vec!["train", "--text-reduction", "nouns", "--dry-run"],
            "truncate | random | block | syntax",
        ),
        (
            vec!["train", "--preset", "huge", "--dry-run"],
            "invalid value 'huge' for '--preset",
        ),
        (
            vec![
                "train",
                "--preset",
                "tiny",
                "--image-size",
                "30",
                "--dry-run",
            ],
            "multiple of the patch size",
        ),
        (
            vec![
                "train",
                "--train-data",
                "/nonexistent/{000..009}.tar",
                "--steps",
                "1",
                // Not the default runs/ folder, which is the working
                // directory's (cli/ under cargo test).
                "--output",
                s(missing_run),
            ],
            "/nonexistent/{000..009}.tar",
        ),
        (
            vec!["train", "--config", "/nonexistent/run.toml"],
            "/nonexistent/run.toml",
        ),
        (
            vec!["train", "--precision", "fp16", "--dry-run"],
            "expected auto, f32 or bf16",
        ),
        (
            // WGSL has no bf16: an explicit request is refused, never
            // run in float32 instead.
            vec![
                "--backend",
                "wgpu",
                "train",
                "--preset",
                "tiny",
                "--steps",
                "1",
                "--precision",
                "bf16",
                "--output",
                s(bf16_run),
            ],
            "no bf16 arithmetic",
        ),
    ] {
        let out = clipa(&args);
        let (_, stderr) = text(&out);
        if args[..2] == ["--backend", "wgpu"] && stderr.contains("backend 'wgpu'") {
            // No WGPU adapter here: the bf16 refusal cannot be reached.
            skip_or_fail("bf16 refused on wgpu", &stderr);
            continue;
        }
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr
                .trim()
                .lines()
                // Mesa's Vulkan loader prints its own "error: XDG_RUNTIME_DIR
                // is invalid" when opening a WGPU adapter; that one is not
                // clipa's.
                .filter(|l| l.starts_with("error") && !l.contains("XDG_RUNTIME_DIR"))
                .count(),
            1,
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn epochs_of_train_num_samples_set_the_steps() {
    let out = clipa(&[
        "train",
        "--preset",
        "demo",
        "--batch-size",
        "100",
        "--train-num-samples",
        "1000",
        "--epochs",
        "2.5",
        "--dry-run",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // demo splits its steps 4:1 at equal batches: 2500 samples → 20 + 5.
    let steps: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("steps = "))
        .collect();
    assert_eq!(steps, ["steps = 20", "steps = 5"], "{stdout}");
    assert!(stdout.contains("train_num_samples = 1000"), "{stdout}");
    let out = clipa(&["train", "--epochs", "2", "--dry-run"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--train-num-samples"), "{stderr}");
}

#[test]
fn every_reduction_is_reachable_from_the_flags() {
    for (img, txt) in [
        ("resize:16", "truncate"),
        ("random:0.75", "random"),
        ("grid:2", "block"),
        ("block:0.5", "syntax"),
    ] {
        let out = clipa(&[
            "train",
            "--preset",
            "tiny",
            "--image-reduction",
            img,
            "--text-reduction",
            txt,
            "--dry-run",
        ]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains(&format!("image_reduction = \"{img}\"")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("text_reduction = \"{txt}\"")),
            "{stdout}"
        );
    }
}

/// `[[evaluators]]` in a run config run at the end of the stage, and their
/// metrics reach `metrics.jsonl` as `name/metric`; an evaluator whose
/// data is missing is refused before the first step.
#[test]
fn config_evaluators_log_named_metrics() {
    let (_dir_tmp, dir) = run_dir();
    let folder = dir.join("zs");
    for (class, colour) in [("red", [220u8, 30, 30]), ("blue", [30, 30, 220])] {
        std::fs::create_dir_all(folder.join(class)).unwrap();
        for k in 0..3u8 {
            let img = image::RgbImage::from_fn(32, 32, |x, _| {
                image::Rgb([colour[0] ^ (x as u8 * k), colour[1], colour[2]])
            });
            img.save(folder.join(class).join(format!("{k}.png")))
                .unwrap();
        }
    }
    let out = clipa(&["train", "--preset", "tiny", "--steps", "2", "--dry-run"]);
    let (toml, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "{toml}\n[[evaluators]]\nkind = \"zeroshot\"\nname = \"colours\"\ndata = \"{}\"\n\n\
             [[evaluators]]\nkind = \"zeroshot\"\nname = \"missing\"\ndata = \"{}\"\n",
            folder.display(),
            dir.join("nowhere").display()
        ),
    )
    .unwrap();
    let run = dir.join("run");
    let train = |config: &std::path::Path| {
        clipa(&[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--output",
            run.to_str().unwrap(),
            "--workers=1",
        ])
    };
    // A missing evaluator set is a mistake found before the first step,
    // naming the evaluator and the path once.
    let out = train(&config);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("evaluator 'missing'") && stderr.matches("os error 2").count() == 1,
        "{stderr}"
    );
    std::fs::write(
        &config,
        format!(
            "{toml}\n[[evaluators]]\nkind = \"zeroshot\"\nname = \"colours\"\ndata = \"{}\"\n",
            folder.display(),
        ),
    )
    .unwrap();
    let out = train(&config);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("colours: top1"), "{stderr}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("a line")).expect("JSON");
    let top1 = last["evals"]["colours/top1"]
        .as_f64()
        .expect("colours/top1 logged");
    assert!((0.0..=1.0).contains(&top1), "{last}");
    assert!(
        last["evals"]["colours/per_class_recall"].is_number(),
        "{last}"
    );
}
