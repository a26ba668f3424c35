//! Never losing a run to a mistake, through the binary: the run folder's
//! lock, damaged checkpoints on resume, stale partial checkpoints, values
//! out of range, and a closed or full standard output.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{assert_one_line_error, clipa, curve, s, scratch, text};

/// The tiny preset on one worker, logging and checkpointing every step.
const TINY: [&str; 8] = [
    "train",
    "--preset",
    "tiny",
    "--log-every",
    "1",
    "--checkpoint-every",
    "1",
    "--workers=1",
];

/// Sizes far past any real run, a zero step count and out-of-range clips
/// are one-line errors naming the value's range, in `train` and `bench`,
/// where they were allocation failures (exit 134) or silently taken.
#[test]
fn out_of_range_flags_are_one_line_errors() {
    let dry = |flag: &'static str, v: &'static str| {
        vec!["train", "--preset", "tiny", flag, v, "--dry-run"]
    };
    for (args, needle) in [
        (
            dry("--batch-size", "99999999999"),
            "batch_size = 99999999999",
        ),
        (dry("--image-size", "100000"), "at most 4096"),
        (dry("--text-length", "100000000"), "at most 1024"),
        (dry("--workers", "100000"), "data.workers = 100000"),
        (dry("--steps", "0"), "at least one step"),
        (dry("--grad-clip", "0"), "grad_clip = 0"),
        (
            vec!["train", "--preset", "tiny", "--grad-clip=-1", "--dry-run"],
            "grad_clip = -1",
        ),
        (dry("--grad-clip", "NaN"), "grad_clip = NaN"),
        (
            vec!["bench", "--batch-size", "99999999999", "--steps", "1"],
            "--batch-size 99999999999 is out of range",
        ),
        (
            vec!["bench", "--image-size", "100000", "--steps", "1"],
            "--image-size 100000 is out of range",
        ),
    ] {
        assert_one_line_error(&args, needle);
    }
    // In range, but past what the machine has: refused before the run
    // folder is made, with the estimate and what to lower, where it grew
    // to 22 GB until the kernel killed it.
    let tmp = scratch();
    let run = tmp.path().join("run");
    let big = [
        "train",
        "--preset",
        "tiny",
        "--batch-size",
        "1000000",
        "--steps",
        "1",
        "--output",
    ];
    assert_one_line_error(&[&big[..], &[s(&run)]].concat(), "needs at least");
    assert!(!run.exists(), "no run folder is left behind");
}

/// A config file's optimiser and learning-rate values out of range are
/// refused before anything runs, naming the key, where `beta1 = 1.5`
/// trained and an infinite learning rate failed only at step 2.
#[test]
fn bad_optimiser_values_are_refused_naming_the_key() {
    let tmp = scratch();
    let base = clipa(&["train", "--preset", "tiny", "--dry-run"]);
    assert!(base.status.success(), "{}", text(&base).1);
    let toml = String::from_utf8(base.stdout).expect("utf-8 config");
    for (key, bad, needle) in [
        ("beta1", "1.5", "optimizer.beta1 = 1.5 must be in [0, 1)"),
        ("beta2", "-0.1", "optimizer.beta2"),
        ("eps", "nan", "optimizer.eps = NaN"),
        ("weight_decay", "inf", "optimizer.weight_decay = inf"),
        ("base_lr", "inf", "base_lr = inf"),
    ] {
        // Every line setting `key` gets the bad value.
        let edited: String = toml
            .lines()
            .map(|l| match l.split_once(" = ") {
                Some((k, _)) if k.trim() == key => format!("{k} = {bad}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        assert_ne!(edited, format!("{toml}\n"), "{key} is in the config");
        let path = tmp.path().join(format!("{key}.toml"));
        std::fs::write(&path, edited).expect("write config");
        assert_one_line_error(&["train", "--config", s(&path), "--dry-run"], needle);
    }
}

/// A second run into a live run's folder, or a resume of it, is refused
/// naming the holder's pid; the first run goes on to finish. (400 steps:
/// 40 of the tiny preset take under a second, which a loaded machine's
/// second process could miss.) (A lock left
/// by a killed run does not block: `a_killed_run_resumes_to_the_same_loss_curve`
/// resumes after SIGKILL, the lock file still there.)
#[cfg(unix)]
#[test]
fn a_live_run_folder_is_locked() {
    let tmp = scratch();
    let run = tmp.path().join("run");
    let args = |extra: &[&'static str]| {
        let base = [
            "train",
            "--preset",
            "tiny",
            "--log-every",
            "1",
            "--workers=1",
        ];
        let run: Vec<String> = ["--steps", "400", "--output", s(&run)]
            .map(String::from)
            .into();
        let mut all: Vec<String> = base.iter().map(|a| a.to_string()).collect();
        all.extend(run);
        all.extend(extra.iter().map(|a| a.to_string()));
        all
    };
    let mut first = Command::new(env!("CARGO_BIN_EXE_clipa"))
        .args(args(&[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the clipa binary runs");
    let t0 = Instant::now();
    while curve(&run).is_empty() && t0.elapsed() < Duration::from_secs(120) {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let holder = format!("in use by another clipa run (pid {})", first.id());
    for extra in [&[][..], &["--resume", "latest"][..]] {
        let all = args(extra);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        assert_one_line_error(&all, &holder);
    }
    let status = first.wait().expect("the first run ends");
    assert!(status.success(), "the first run was disturbed: {status}");
    assert_eq!(curve(&run).len(), 400, "every step of the first run logged");
}

/// Overwrites 4 KB in the middle of `file` with 0xFF.
fn damage(file: &Path) {
    let mut bytes = std::fs::read(file).expect("read checkpoint file");
    let at = bytes.len() / 2;
    let end = (at + 4096).min(bytes.len());
    bytes[at..end].fill(0xFF);
    std::fs::write(file, bytes).expect("write checkpoint file");
}

/// `--resume latest` with the newest checkpoint's weights damaged names
/// it, moves it aside and resumes from the one before (which trains to the
/// end); stale partial checkpoint folders are removed and reported; a
/// damaged checkpoint named with `--resume DIR` is an error.
#[test]
fn a_damaged_checkpoint_is_found_and_passed_over() {
    let tmp = scratch();
    let run = tmp.path().join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        [&TINY[..], &["--steps", "4", "--output", s(&run)], extra]
            .concat()
            .into_iter()
            .map(String::from)
            .collect()
    };
    let run_with = |extra: &[&str]| {
        let all = args(extra);
        clipa(&all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run_with(&[]);
    assert!(out.status.success(), "{}", text(&out).1);
    let ckpts = run.join("checkpoints");
    let newest = ckpts.join("step-00000004");
    damage(&newest.join("model.safetensors"));
    // What a save killed mid-way leaves.
    let stale = ckpts.join(".tmp-step-00000005-99999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 1 << 20]).unwrap();

    let out = run_with(&["--resume", "latest"]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("step-00000004 is unusable")
            && stderr.contains("model.safetensors: damaged"),
        "{stderr}"
    );
    assert!(
        stderr.contains("resuming from") && stderr.contains("step-00000003"),
        "{stderr}"
    );
    assert!(
        stderr.contains("removed 1 partial checkpoint folder"),
        "{stderr}"
    );
    assert!(!stale.exists(), "the stale folder is gone");
    let aside = ckpts.join("damaged-step-00000004");
    assert!(aside.is_dir(), "the damaged checkpoint is kept aside");
    // Step 4 trained again from step 3, and saved intact.
    assert!(newest.join("manifest.json").is_file());

    let named = args(&["--resume", s(&aside)]);
    assert_one_line_error(
        &named.iter().map(String::as_str).collect::<Vec<_>>(),
        "model.safetensors: damaged",
    );
}

/// A closed pipe ends a command quietly with success (`clipa models | head
/// -1`), and a standard output that cannot be written (`> /dev/full`) is
/// a one-line error: both panicked in `println!`.
#[cfg(unix)]
#[test]
fn a_closed_or_full_stdout_never_panics() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clipa"))
        .args(["models"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the clipa binary runs");
    // The reader leaves before anything is written, as `head` does after
    // its line.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("clipa models ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_clipa"))
        .args(["models"])
        .stdout(full)
        .output()
        .expect("the clipa binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot write to standard output") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// Evaluation data that cannot be read (a missing zero-shot folder, two
/// class names for three class folders) fails before the first step, in
/// seconds and with no run folder left behind, where it failed at the end
/// of a stage with that stage's training lost.
#[test]
fn a_bad_evaluation_path_fails_before_training() {
    let tmp = scratch();
    let zs = tmp.path().join("zs");
    for class in ["a", "b", "c"] {
        std::fs::create_dir_all(zs.join(class)).unwrap();
        std::fs::write(zs.join(class).join("0.png"), b"not read before training").unwrap();
    }
    let names = tmp.path().join("cn2.txt");
    std::fs::write(&names, "first\nsecond\n").unwrap();
    let run = tmp.path().join("run");
    for (extra, needle) in [
        (vec!["--zeroshot-data", "/nope"], "/nope"),
        (
            vec!["--zeroshot-data", s(&zs), "--classnames", s(&names)],
            "cn2.txt",
        ),
    ] {
        let t0 = Instant::now();
        let args = [
            &TINY[..],
            &["--steps", "200", "--output", s(&run)],
            &extra[..],
        ]
        .concat();
        assert_one_line_error(&args, needle);
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(!run.exists(), "no run folder is left behind");
    }
}

/// `--init-from` weights of another model than the run's are refused
/// naming both, where `--model` was silently ignored; `eval` counts the
/// unreadable images of a zero-shot folder.
#[test]
fn init_from_another_model_is_refused_and_eval_counts_bad_images() {
    let tmp = scratch();
    let first = tmp.path().join("first");
    let out = clipa(&[&TINY[..], &["--steps", "1", "--output", s(&first)]].concat());
    assert!(out.status.success(), "{}", text(&out).1);
    let ckpt = first.join("checkpoints").join("step-00000001");
    let second = tmp.path().join("second");
    let args = [
        &TINY[..],
        &[
            "--steps",
            "1",
            "--model",
            "scale-w32",
            "--init-from",
            s(&ckpt),
        ],
        &["--output", s(&second)],
    ]
    .concat();
    assert_one_line_error(&args, "but the run's model 'scale-w32' is a");
    assert!(!second.exists(), "no run folder is left behind");

    // A corrupt image in a zero-shot folder is counted and reported by
    // `eval`, where it was dropped without a word.
    let zs = tmp.path().join("zs");
    for (class, v) in [("dark", 40u8), ("light", 220u8)] {
        std::fs::create_dir_all(zs.join(class)).unwrap();
        for k in 0..2u8 {
            image::RgbImage::from_pixel(32, 32, image::Rgb([v, v ^ k, v]))
                .save(zs.join(class).join(format!("{k}.png")))
                .unwrap();
        }
    }
    std::fs::write(zs.join("dark").join("broken.png"), b"not a png").unwrap();
    let eval = ["eval", "--checkpoint", s(&ckpt), "--zeroshot-data", s(&zs)];
    let out = clipa(&eval);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("(4 images") && stdout.contains("1 unreadable images skipped"),
        "{stdout}"
    );
    let out = clipa(&[&eval[..], &["--json"]].concat());
    let report: serde_json::Value = serde_json::from_str(text(&out).0.trim()).expect("eval JSON");
    assert_eq!(report["zeroshot"]["skipped"], 1, "{report}");
}

/// Without `XDG_RUNTIME_DIR` (containers, CI), probing the WGPU adapter
/// prints no `error:` line: Mesa's Wayland client printed two, which read
/// as if clipa had failed.
#[cfg(target_os = "linux")]
#[test]
fn probing_the_graphics_stack_prints_no_error_lines() {
    let out = Command::new(env!("CARGO_BIN_EXE_clipa"))
        .arg("backends")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("the clipa binary runs");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("wgpu"), "{stdout}");
    assert!(!stderr.lines().any(|l| l.starts_with("error")), "{stderr}");
}
