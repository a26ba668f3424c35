//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh, empty temporary folder (tempfile's), deleted with everything
/// in it when the returned guard drops, also while a failing test unwinds:
/// bind it for the whole test.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("clipa-it-")
        .tempdir()
        .expect("a temporary folder")
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

/// `clipa ARGS` must exit 2 with one `error:` line holding `needle`, and no
/// panic.
pub fn assert_one_line_error(args: &[&str], needle: &str) {
    let out = clipa(args);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    let errors = stderr.lines().filter(|l| l.starts_with("error")).count();
    assert_eq!(errors, 1, "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
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

/// Where Debian's `dataset-fashion-mnist` puts the IDX files.
const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Whether Debian's Fashion-MNIST is installed. When it is not, prints why
/// `test` is skipped; under CI it fails instead, as `.ci/run` installs it
/// and a silent skip would hide the data tests.
pub fn fashion_mnist_installed(test: &str) -> bool {
    if Path::new(FASHION_MNIST).is_dir() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: {FASHION_MNIST} not found, and CI installs dataset-fashion-mnist"
    );
    eprintln!("SKIPPED {test}: {FASHION_MNIST} not found (apt-get install dataset-fashion-mnist)");
    false
}

/// `clipa data fashion-mnist --out OUT` with the first `train` training
/// and `test` test images and `extra` flags; it must succeed.
pub fn convert_fashion_mnist(out: &Path, train: usize, test: usize, extra: &[&str]) {
    let (train, test) = (train.to_string(), test.to_string());
    let mut args = vec![
        "data",
        "fashion-mnist",
        "--out",
        s(out),
        "--limit-train",
        &train,
        "--limit-test",
        &test,
    ];
    args.extend_from_slice(extra);
    let out = clipa(&args);
    assert!(out.status.success(), "{:?}", text(&out));
}

/// Called when a test needs a device that is not there: panics in CI,
/// prints the reason and returns elsewhere.
pub fn skip_or_fail(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test}: no device under CI=true: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}
