//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh, empty temporary folder for test `name` in this process,
/// deleted when the returned guard drops: bind it for the whole test.
pub fn scratch(name: &str) -> Scratch {
    let dir = Scratch::absent(name);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    dir
}

/// The temporary folder `clipa-it-<name>-<pid>`, removed with everything in
/// it when dropped, also while a failing test unwinds. Every run has a new
/// pid, so folders left behind were never reused or removed, and repeated
/// runs filled the disk. (`clipa-core` has the same guard, but only for its
/// own unit tests.)
///
/// Bind it for the whole test (`let dir = scratch("x");`): `let _ =` or a
/// temporary would delete the folder at once. Where a `PathBuf` is needed,
/// pass `dir.to_path_buf()` or `dir.join(..)` and keep the guard.
#[derive(Debug)]
#[must_use = "the folder is deleted as soon as the guard is dropped"]
pub struct Scratch(PathBuf);

impl Scratch {
    /// The folder's path with nothing there yet, for a run folder that
    /// `clipa` must create itself.
    pub fn absent(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("clipa-it-{name}-{}", std::process::id()));
        // A folder left by an earlier process with the same pid would
        // otherwise leak its files into this test.
        std::fs::remove_dir_all(&dir).ok();
        Self(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;

    /// The folder's path, so that `dir.join(..)` and `&dir` as `&Path` work.
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    /// The folder's path, for `std::fs` functions that take `AsRef<Path>`.
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    /// Removes the folder. Errors are ignored: a leftover folder must not
    /// turn a passing test into a failure.
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// A temporary path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Imports fixture folder `fx` into checkpoint `ckpt` through the binary;
/// returns the fixture's weights file.
pub fn import_fixture(fx: &Path, ckpt: &Path) -> PathBuf {
    let weights = fx.join("openclip_tiny_weights.safetensors");
    import_openclip(&weights, &fx.join("model_cfg/CLIPA-tiny-ref.json"), ckpt);
    weights
}

/// `clipa import-openclip --weights --config --out`, which must succeed.
pub fn import_openclip(weights: &Path, config: &Path, ckpt: &Path) {
    let out = clipa(&[
        "import-openclip",
        "--weights",
        s(weights),
        "--config",
        s(config),
        "--out",
        s(ckpt),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
}

/// `(step, loss)` of every line of a run folder's `metrics.jsonl` (none
/// when it does not exist yet).
pub fn curve(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("metrics lines are JSON");
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Runs the `clipa` binary built for this test run.
pub fn clipa(args: &[&str]) -> Output {
    clipa_with_env(args, &[])
}

/// [`clipa`] with extra environment variables set.
pub fn clipa_with_env(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clipa"))
        .args(args)
        .env_remove("CLIPA_BACKEND")
        .env_remove("CLIPA_DEVICE")
        .envs(vars.iter().copied())
        .output()
        .expect("the clipa binary runs")
}

/// Stdout and stderr of a run, for assertion messages.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether the run is under CI (`CI=true`), where a missing GPU adapter is
/// a failure rather than a skip: a silently skipped WGPU test would hide a
/// broken backend.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The folder of OpenCLIP fixture `name` (`CLIPA_FIXTURES`, else
/// `shared/fixtures/openclip` beside the checkout), or `None` after
/// [`missing_fixtures`] has reported its absence.
pub fn fixture_dir(name: &str) -> Option<std::path::PathBuf> {
    let root = std::env::var_os("CLIPA_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/fixtures/openclip")
        });
    let dir = root.join(name);
    if dir.is_dir() {
        Some(dir)
    } else {
        missing_fixtures(name);
        None
    }
}

/// The CLIPA-v2-style hub fixture folder (`openclip_hub/clipa_v2_tiny`
/// beside the OpenCLIP fixtures), or `None` after [`missing_fixtures`] has
/// reported its absence.
pub fn hub_fixture() -> Option<PathBuf> {
    let root = std::env::var_os("CLIPA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/openclip")
        });
    let dir = root.join("../openclip_hub/clipa_v2_tiny");
    if dir.is_dir() {
        Some(dir)
    } else {
        missing_fixtures("openclip_hub/clipa_v2_tiny");
        None
    }
}

/// Called when the OpenCLIP fixtures (`shared/fixtures/openclip` beside
/// the checkout, or `CLIPA_FIXTURES`) are missing: a failure under CI,
/// unless `CLIPA_FIXTURES_OPTIONAL=1` says the CI host has no copy of them
/// (GitHub Actions), in which case the tests print why they skipped.
pub fn missing_fixtures(test: &str) {
    let reason = "OpenCLIP fixtures not found (set CLIPA_FIXTURES)";
    if std::env::var("CLIPA_FIXTURES_OPTIONAL").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: {reason}");
    } else {
        skip_or_fail(test, reason);
    }
}

/// Called when a test needs a device that is not there: panics in CI,
/// prints the reason and returns elsewhere.
pub fn skip_or_fail(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test}: no device under CI=true: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}
