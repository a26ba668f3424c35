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

/// The repository's reference fixtures, `tests/fixtures/` (made by
/// `tests/fixtures/make_fixtures.py`), or the folder `CLIPA_FIXTURES` names
/// (`ci/gpu.sh` runs the test binary away from the checkout).
fn fixtures_root() -> PathBuf {
    std::env::var_os("CLIPA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"))
}

/// The folder of OpenCLIP parity fixture `name` (`openai_style`,
/// `clipa_style`), ready to read: the repository keeps its safetensors files
/// gzipped, and they are unpacked once into cargo's per-target temporary
/// folder, where they are reused by later runs.
pub fn fixture_dir(name: &str) -> PathBuf {
    static UNPACK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = UNPACK.lock().unwrap_or_else(|e| e.into_inner());
    let src = fixtures_root().join("openclip").join(name);
    assert!(src.is_dir(), "fixture {} is missing", src.display());
    let dst = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("fixtures")
        .join(name);
    copy_unpacked(&src, &dst);
    dst
}

/// Copies the folder `src` into `dst`, gunzipping `*.gz` files; a file whose
/// copy is already there, byte for byte, is left alone.
fn copy_unpacked(src: &Path, dst: &Path) {
    use std::io::Read;
    std::fs::create_dir_all(dst).expect("fixture folder");
    for entry in std::fs::read_dir(src).expect("fixture folder readable") {
        let path = entry.expect("fixture entry").path();
        let name = path.file_name().unwrap().to_str().expect("utf-8 name");
        if path.is_dir() {
            copy_unpacked(&path, &dst.join(name));
            continue;
        }
        let bytes = std::fs::read(&path).expect("fixture readable");
        let (name, bytes) = match name.strip_suffix(".gz") {
            Some(stem) => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&bytes[..])
                    .read_to_end(&mut out)
                    .expect("fixture gunzips");
                (stem, out)
            }
            None => (name, bytes),
        };
        let target = dst.join(name);
        if std::fs::read(&target).is_ok_and(|old| old == bytes) {
            continue;
        }
        // Written whole, then renamed: a concurrent test binary never reads half.
        let tmp = dst.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, &bytes).expect("fixture copy");
        std::fs::rename(&tmp, &target).expect("fixture copy");
    }
}

/// The CLIPA-v2-style hub fixture folder (`openclip_hub/clipa_v2_tiny`).
pub fn hub_fixture() -> PathBuf {
    let dir = fixtures_root().join("openclip_hub/clipa_v2_tiny");
    assert!(dir.is_dir(), "fixture {} is missing", dir.display());
    dir
}

/// Called when a test needs a device that is not there: panics in CI,
/// prints the reason and returns elsewhere.
pub fn skip_or_fail(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test}: no device under CI=true: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}
