//! `clipa train --report-to tensorboard`: the event files are read back by
//! the `tensorboard` Python package's own reader (`EventAccumulator`), and
//! every scalar equals `metrics.jsonl`'s value at the same step, also after
//! a resume that logs some steps a second time.
//!
//! The interpreter is `CLIPA_TEST_PYTHON` (CI's venv, `ci/run.sh`) or
//! `python3`. Without the package the test fails under CI and is skipped
//! elsewhere.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::common::{clipa, in_ci, s, scratch, text};

/// Reads every scalar of the event files under a folder: prints
/// `{tag: [[step, value], ...]}`; exits 3 when the package is missing.
const READ_SCALARS: &str = r#"
import json, sys
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError as e:
    print(f"cannot import tensorboard: {e}", file=sys.stderr)
    sys.exit(3)
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

/// Scalars by tag: `(step, value)` in the order TensorBoard keeps them.
type Scalars = BTreeMap<String, Vec<(u64, f64)>>;

/// The scalars TensorBoard reads from `dir`, or `None` (after printing
/// why) when the `tensorboard` package is not installed outside CI.
fn read_scalars(dir: &Path) -> Option<Scalars> {
    let python = std::env::var("CLIPA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let missing = |why: String| {
        assert!(
            !in_ci(),
            "CI must install the tensorboard package (ci/run.sh): {why}"
        );
        eprintln!("SKIPPED tensorboard: {why} (pip install tensorboard)");
        None
    };
    let out = match Command::new(&python)
        .args(["-c", READ_SCALARS, s(dir)])
        .output()
    {
        Ok(out) => out,
        Err(e) => return missing(format!("{python} does not run: {e}")),
    };
    let (stdout, stderr) = text(&out);
    if out.status.code() == Some(3) {
        return missing(stderr.trim().to_string());
    }
    assert!(out.status.success(), "the reader failed: {stderr}");
    let json = stdout.lines().last().expect("the reader prints JSON");
    Some(serde_json::from_str(json).expect("the reader's JSON"))
}

/// Two zero-shot classes of three flat-coloured images each.
fn colour_folder(dir: &Path) {
    for (class, colour) in [("red", [220u8, 30, 30]), ("blue", [30, 30, 220])] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for k in 0..3u8 {
            let img = image::RgbImage::from_fn(32, 32, |x, _| {
                image::Rgb([colour[0] ^ (x as u8 * k), colour[1], colour[2]])
            });
            img.save(dir.join(class).join(format!("{k}.png"))).unwrap();
        }
    }
}

#[test]
fn tensorboard_reads_every_logged_metric_by_step() {
    let tmp = scratch();
    let (run, zs, config) = (
        tmp.path().join("run"),
        tmp.path().join("zs"),
        tmp.path().join("run.toml"),
    );
    colour_folder(&zs);
    // 4 steps, each logged; zero-shot and the `colours` evaluator at
    // steps 2 and 4; checkpoints at 2 and 4.
    let out = clipa(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--dry-run",
    ]);
    let (toml, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    std::fs::write(
        &config,
        format!(
            "{toml}\n[[evaluators]]\nkind = \"zeroshot\"\nname = \"colours\"\ndata = \"{}\"\n",
            zs.display()
        ),
    )
    .unwrap();
    let train = |extra: &[&str]| {
        let base = [
            "train",
            "--config",
            s(&config),
            "--output",
            s(&run),
            "--workers=1",
            "--report-to",
            "tensorboard",
        ];
        let out = clipa(&[&base[..], extra].concat());
        assert!(out.status.success(), "{}", text(&out).1);
    };
    train(&[]);
    // Steps 3 and 4 again from the step-2 checkpoint, as after a kill:
    // `metrics.jsonl` keeps the second session's lines, and so must
    // TensorBoard (the new file's session start drops the first ones).
    let step2 = run.join("checkpoints").join("step-00000002");
    train(&["--resume", s(&step2)]);

    let files = std::fs::read_dir(run.join("tensorboard"))
        .expect("RUN/tensorboard")
        .count();
    assert_eq!(files, 2, "one event file per session");
    let Some(tb) = read_scalars(&run.join("tensorboard")) else {
        return;
    };
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    // (step, value) of a metrics.jsonl field on the lines that have it.
    let jsonl = |field: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<(u64, f64)> {
        lines
            .iter()
            .filter_map(|l| Some((l["step"].as_u64()?, field(l)?)))
            .collect()
    };
    let mut want: Vec<(String, Vec<(u64, f64)>)> = [
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("train/logit_scale", "temperature"),
        ("train/samples_per_second", "images_per_sec"),
        ("eval/zeroshot_top1", "zeroshot_top1"),
    ]
    .into_iter()
    .map(|(tag, key)| (tag.to_string(), jsonl(&|l| l[key].as_f64())))
    .collect();
    let evals = lines.last().unwrap()["evals"]
        .as_object()
        .expect("the last line has the evaluators' metrics")
        .clone();
    assert!(evals.contains_key("colours/top1"), "{evals:?}");
    for key in evals.keys() {
        want.push((
            format!("eval/{key}"),
            jsonl(&|l| l["evals"][key.as_str()].as_f64()),
        ));
    }
    for (tag, want) in want {
        let got = tb
            .get(&tag)
            .unwrap_or_else(|| panic!("no {tag} in {:?}", tb.keys()));
        let steps = |v: &[(u64, f64)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(steps(got), steps(&want), "{tag}: steps");
        if tag.starts_with("train/") {
            assert_eq!(steps(got), [1, 2, 3, 4], "{tag}");
        } else {
            assert_eq!(steps(got), [2, 4], "{tag}");
        }
        for ((step, g), (_, w)) in got.iter().zip(&want) {
            // Event files hold float32.
            assert_eq!(*g as f32, *w as f32, "{tag} at step {step}");
        }
    }
}
