//! The binary's contract: help and version, one-line errors with exit code
//! 2, `backends` and `check`.

use crate::common::{clipa, clipa_with_env, text};

#[test]
fn help_and_version() {
    let out = clipa(&["--help"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    for word in ["backends", "check", "--backend", "--device"] {
        assert!(stdout.contains(word), "--help lacks {word}:\n{stdout}");
    }
    let out = clipa(&["--version"]);
    let (stdout, _) = text(&out);
    assert_eq!(
        stdout.trim(),
        format!("clipa {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `clipa train --help` lists every training preset of core's table with
/// its one-line description (clap may wrap it: compared word for word).
#[test]
fn train_help_lists_every_preset_with_its_description() {
    let out = clipa(&["train", "--help"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let help = words(&stdout);
    for preset in clipa_core::train::presets::PRESETS {
        let line = words(&format!("- {}: {}", preset.name, preset.about));
        assert!(help.contains(&line), "--help lacks `{line}`:\n{stdout}");
    }
}

#[test]
fn unknown_backend_is_a_usage_error() {
    let out = clipa(&["--backend", "tpu", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let (_, stderr) = text(&out);
    assert!(stderr.contains("invalid value 'tpu'"), "{stderr}");
}

#[test]
fn backends_lists_every_backend() {
    let out = clipa(&["backends"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for name in ["cpu", "wgpu", "cuda"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(name)),
            "no line for {name}:\n{stdout}"
        );
    }
    let cpu = stdout.lines().find(|l| l.starts_with("cpu")).unwrap();
    assert!(cpu.contains("yes") && cpu.contains("flex"), "{cpu}");
}

#[test]
fn cuda_check_without_gpu_is_one_clear_line() {
    let out = clipa(&["--backend", "cuda", "check"]);
    let (stdout, stderr) = text(&out);
    if out.status.success() {
        // A machine with a working CUDA GPU and a cuda build.
        assert!(stdout.contains("ok: cuda matches"), "{stdout}");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: backend 'cuda'"), "{stderr}");
    assert!(
        lines[0].contains("not compiled") || lines[0].contains("no usable device"),
        "{stderr}"
    );
}

#[test]
fn bad_device_index_is_an_error_not_a_fallback() {
    let out = clipa(&["--backend", "cpu", "--device", "3", "check"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("only device 0"), "{stderr}");
}

#[test]
fn cpu_check_passes() {
    let out = clipa(&["--backend", "cpu", "check", "--batch", "2", "--tokens", "5"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("attention") && stdout.contains("block"),
        "{stdout}"
    );
    // The float32 backends default to 1e-4 (cuda's TF32 products get 1e-2).
    assert!(
        stdout.contains("ok: cpu matches the cpu within 1e-4 "),
        "{stdout}"
    );
}

#[test]
fn check_rejects_inconsistent_shapes() {
    let out = clipa(&["check", "--width", "10", "--heads", "4"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr.trim(),
        "error: --width 10 is not a multiple of --heads 4"
    );
    let out = clipa(&["check", "--tolerance", "0"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr.trim(),
        "error: --tolerance must be a positive number"
    );
}

/// `RAYON_NUM_THREADS` sets the CPU backend's compute threads, and the
/// bench reports the count it ran on (the one-thread pool runs the job on
/// the calling thread, `cpu::on_worker`).
#[test]
fn bench_reports_the_cpu_threads_it_ran_on() {
    let out = clipa_with_env(
        &[
            "bench",
            "--model",
            "tiny",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--json",
        ],
        &[("RAYON_NUM_THREADS", "1")],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["threads"], 1, "{v}");
    assert_eq!(v["device"], "cpu:0 (flex, 1 thread)", "{v}");
    assert!(
        v["cases"][0]["median_ms"].as_f64().is_some_and(|x| x > 0.0),
        "{v}"
    );
}

/// On wgpu the bench counts a step's kernel launches from CubeCL's launch
/// log, and the step reads nothing back to the host.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_bench_counts_kernel_launches_and_no_host_reads() {
    use crate::common::skip_or_fail;

    if let Err(err) = clipa_backends::probe(clipa_backends::BackendKind::Wgpu, None) {
        return skip_or_fail(
            "wgpu_bench_counts_kernel_launches_and_no_host_reads",
            &err.to_string(),
        );
    }
    let out = clipa(&[
        "--backend",
        "wgpu",
        "bench",
        "--model",
        "tiny",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let c = &v["cases"][0];
    assert_eq!(c["host_syncs_per_step"].as_f64(), Some(0.0), "{c}");
    // A tiny-model step is hundreds of launches (974 on lavapipe at the time
    // of writing); none counted would mean the log was not read.
    assert!(
        c["kernels_per_step"].as_f64().is_some_and(|k| k > 100.0),
        "{c}"
    );
}

#[test]
fn bench_json_reports_every_field() {
    let out = clipa(&[
        "bench",
        "--model",
        "tiny",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--image-reduction",
        "random:0.5",
        "--text-length",
        "8",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let cases = v["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 1);
    let c = &cases[0];
    assert_eq!(c["name"], "tiny_b4_img32_pd0.50_txt8", "{c}");
    assert_eq!(
        (c["image_tokens"].as_u64(), c["text_tokens"].as_u64()),
        (Some(32), Some(8))
    );
    for key in [
        "median_ms",
        "min_ms",
        "max_ms",
        "images_per_s",
        "train_gflop",
        "tflops",
        "grads_median_ms",
        "optim_median_ms",
    ] {
        assert!(c[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {c}");
    }
    assert!(c["min_ms"].as_f64() <= c["median_ms"].as_f64());
    // The two parts of a step are each shorter than the slowest whole step.
    for part in ["grads_median_ms", "optim_median_ms"] {
        assert!(c[part].as_f64() < c["max_ms"].as_f64(), "{part}: {c}");
    }
    // The CPU reports the process's peak resident set.
    assert!(c["peak_mem_mb"].as_f64().is_some_and(|m| m > 1.0), "{c}");
    // A step reads nothing back to the host; the CPU launches no kernels.
    assert_eq!(c["host_syncs_per_step"].as_f64(), Some(0.0), "{c}");
    assert!(c["kernels_per_step"].is_null(), "{c}");
    // A wrong flag is one line and exit code 2.
    let bad = clipa(&["bench", "--image-reduction", "random:2", "--steps", "1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad).1.contains("--image-reduction"),
        "{:?}",
        text(&bad)
    );
}
