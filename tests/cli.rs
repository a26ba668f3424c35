//! The binary's contract: help and version, one-line errors with exit code
//! 2, `backends` and `check`.

use crate::common::{clipa, text};

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
    assert!(cpu.contains("yes") && cpu.contains("ndarray"), "{cpu}");
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
    assert!(stdout.contains("ok: cpu matches the cpu"), "{stdout}");
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
}
