//! Run checkpoints: everything a killed run needs to continue as if it had
//! never stopped — weights, optimiser moments, step, stage, data-loader
//! position and the resolved config.
//!
//! A checkpoint is a folder `RUN/checkpoints/step-00001234/` holding
//! `config.json` + `model.safetensors` (a plain model checkpoint, so `clipa
//! eval --checkpoint` and `export-openclip` read it as is),
//! `optimizer.safetensors` and `manifest.json`. It is assembled in a hidden
//! temporary folder, every file fsynced, then renamed into place: a crash at
//! any moment leaves either no checkpoint or a complete one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use crate::checkpoint::Checkpoint;
use crate::data::DataStatsSnapshot;
use crate::data::loader::LoaderState;
use crate::data::tokenizer::Tokenizer;
use crate::io::{read_safetensors, sync_dir, write_atomic, write_safetensors};
use crate::model::ClipConfig;
use crate::state::StateDict;
use crate::{Error, Result};

/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// Optimiser state file inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Manifest file inside a checkpoint.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Where a run stands, stored in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Optimiser steps completed over the whole run.
    pub step: u64,
    /// The stage the next step belongs to.
    pub stage: usize,
    /// Steps completed inside that stage.
    pub stage_step: u64,
    /// Each loader's position after the last consumed batch, one per part
    /// of the data (`crate::data::part`; empty at a stage boundary: the
    /// next stage starts fresh loaders). Written as one object for a run
    /// read in one part, as before parts existed, and as a list otherwise.
    #[serde(with = "positions")]
    pub loader: Vec<LoaderState>,
    /// Good and bad data seen so far.
    pub data: DataStatsSnapshot,
    /// Non-finite steps skipped so far.
    pub nonfinite_skipped: u32,
    /// Training seconds so far (excluding evaluation and checkpoints).
    pub train_seconds: f64,
    /// The resolved run config.
    pub config: TrainConfig,
    /// Each other file of the checkpoint folder by name, with its SHA-256
    /// (lowercase hex), checked on load. Empty in checkpoints written
    /// before digests, which load unchecked.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
}

/// The checkpoints folder of a run.
pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Writes a checkpoint for `manifest.step` and keeps the newest `keep`.
pub fn save(
    run: &Path,
    manifest: &Manifest,
    model_config: &ClipConfig,
    model: &StateDict,
    tokenizer: &Tokenizer,
    optimizer: &StateDict,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    let name = format!("step-{:08}", manifest.step);
    let dir = root.join(&name);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    crate::checkpoint::save(&tmp, model_config, model, tokenizer)?;
    write_safetensors(&tmp.join(OPTIMIZER_FILE), optimizer, HashMap::new())?;
    // The digests of what was written, read back (from the page cache).
    let mut manifest = manifest.clone();
    manifest.files = digests(&tmp)?;
    let json = serde_json::to_string_pretty(&manifest).expect("manifests serialise");
    write_atomic(&tmp.join(MANIFEST_FILE), json.as_bytes())?;
    if dir.exists() {
        // The same step saved twice (a periodic save that is also a stage
        // end): the older copy goes.
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    sync_dir(&root)?;
    let all = list(run)?;
    for (_, old) in all.iter().rev().skip(keep) {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(dir)
}

/// Complete checkpoints of a run as `(step, folder)`, oldest first.
/// Leftover temporary folders of a killed save are ignored.
pub fn list(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = checkpoints_dir(run);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(&root, e))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step
            && path.join(MANIFEST_FILE).is_file()
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint of a run, if any.
pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run)?.pop().map(|(_, p)| p))
}

/// Removes the temporary folders (`checkpoints/.tmp-*`) of saves that a
/// killed run left half-written, saying how many and how large. Only under
/// the run's lock ([`super::lock::RunLock`]): no live save is touched.
pub fn remove_stale_temps(run: &Path, observer: &mut dyn super::Observer) -> Result<()> {
    let root = checkpoints_dir(run);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    let (mut count, mut bytes) = (0usize, 0u64);
    for entry in entries {
        let path = entry.map_err(|e| Error::io(&root, e))?.path();
        let stale = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".tmp-"));
        if !stale {
            continue;
        }
        bytes += folder_bytes(&path);
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        count += 1;
    }
    if count > 0 {
        observer.message(&format!(
            "removed {count} partial checkpoint folder(s) of an interrupted save ({:.1} MB)",
            bytes as f64 / 1e6
        ));
    }
    Ok(())
}

/// The bytes of the files directly inside `dir` (a checkpoint has no
/// subfolders).
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The SHA-256 of every file of checkpoint folder `dir` but the manifest,
/// by name.
fn digests(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name != MANIFEST_FILE && path.is_file() {
            out.insert(name.to_string(), sha256_file(&path)?);
        }
    }
    Ok(out)
}

/// A file's SHA-256 in lowercase hex, read in 1 MiB blocks.
fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks every file the manifest lists against its digest: an error
/// naming the first damaged or missing one.
fn verify(dir: &Path, manifest: &Manifest) -> Result<()> {
    for (name, want) in &manifest.files {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::Format {
                path,
                reason: "missing from its checkpoint (the manifest lists it)".into(),
            });
        }
        if &sha256_file(&path)? != want {
            return Err(Error::Format {
                path,
                reason: "damaged: its SHA-256 differs from the one its manifest recorded".into(),
            });
        }
    }
    Ok(())
}

/// Reads a checkpoint folder: manifest, model (config, weights, tokenizer)
/// and optimiser state.
pub fn load(dir: &Path) -> Result<(Manifest, Checkpoint, StateDict)> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.clone(),
        reason: format!("not a clipa run manifest: {e}"),
    })?;
    if manifest.version != MANIFEST_VERSION {
        return Err(Error::Format {
            path,
            reason: format!(
                "manifest version {} (this clipa reads {MANIFEST_VERSION})",
                manifest.version
            ),
        });
    }
    verify(dir, &manifest)?;
    let model = crate::checkpoint::load(dir)?;
    let optimizer = read_safetensors(&dir.join(OPTIMIZER_FILE))?.tensors;
    Ok((manifest, model, optimizer))
}

/// The settings that may change between a run and its resumption; every
/// other difference makes the resume refuse.
const MUTABLE: [&str; 11] = [
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "data.workers",
    "data.zeroshot_data",
    "data.classnames",
    "skip_nonfinite",
    // Memory, not arithmetic: a run may resume on a smaller GPU.
    "grad_checkpointing",
    // Where the vocabulary was read from: a resumed run reads its own copy
    // in the checkpoint.
    "vocab",
    // Where the logged metrics also go (TensorBoard), not what is trained.
    "report_to",
];

/// Checks that `now` may continue a run saved with `saved`; the error names
/// every differing setting.
pub fn check_resumable(saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    let a = serde_json::to_value(saved).expect("configs serialise");
    let b = serde_json::to_value(now).expect("configs serialise");
    let mut diffs = Vec::new();
    diff("", &a, &b, &mut diffs);
    diffs.retain(|d| !MUTABLE.contains(&d.as_str()));
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "cannot resume: the checkpoint was trained with different settings ({})",
            diffs.join(", ")
        )))
    }
}

fn diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), u, v, out);
            }
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}

/// `Manifest::loader` on disk: `null`, one position, or a list of them.
mod positions {
    use super::LoaderState;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum OnDisk {
        One(LoaderState),
        Parts(Vec<LoaderState>),
    }

    pub fn serialize<S: Serializer>(v: &[LoaderState], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [] => s.serialize_none(),
            [one] => one.serialize(s),
            parts => parts.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LoaderState>, D::Error> {
        Ok(match Option::<OnDisk>::deserialize(d)? {
            None => Vec::new(),
            Some(OnDisk::One(one)) => vec![one],
            Some(OnDisk::Parts(parts)) => parts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;

    /// A save that fails part-way (its temporary folder cannot be made: a
    /// file stands in its place, as a full disk fails a write) returns the
    /// error and leaves the run's checkpoints as they were; the newest
    /// complete one still loads with its digests checked. Flipping a byte
    /// of its weights is then found.
    #[test]
    fn a_failed_save_keeps_the_last_good_checkpoint_and_damage_is_found() {
        let run = tempfile::tempdir().unwrap();
        let run = run.path();
        let cfg = TrainConfig::preset("tiny").unwrap();
        let model_cfg = cfg.model_config().unwrap();
        let model = model_cfg.init::<TestBackend>(&Default::default());
        let tokenizer = Tokenizer::for_text(&model_cfg.text, None).unwrap();
        let state = crate::state::state_dict(&model);
        let mut manifest = Manifest {
            version: MANIFEST_VERSION,
            step: 1,
            stage: 0,
            stage_step: 1,
            loader: Vec::new(),
            data: DataStatsSnapshot::default(),
            nonfinite_skipped: 0,
            train_seconds: 0.0,
            config: cfg.clone(),
            files: BTreeMap::new(),
        };
        let save =
            |m: &Manifest| save(run, m, &model_cfg, &state, &tokenizer, &StateDict::new(), 3);
        let first = save(&manifest).unwrap();
        manifest.step = 2;
        let blocker =
            checkpoints_dir(run).join(format!(".tmp-step-00000002-{}", std::process::id()));
        std::fs::write(&blocker, b"in the way").unwrap();
        // remove_dir_all refuses a file: the save fails before writing.
        assert!(save(&manifest).is_err());
        assert_eq!(list(run).unwrap(), vec![(1, first.clone())]);
        let (loaded, ..) = load(&first).unwrap();
        assert_eq!(loaded.step, 1);
        assert!(
            loaded.files.contains_key("model.safetensors"),
            "{:?}",
            loaded.files
        );

        let weights = first.join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let at = bytes.len() - 1;
        bytes[at] ^= 1;
        std::fs::write(&weights, bytes).unwrap();
        let err = load(&first).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    /// Loader positions on disk: one object for a run read in one part
    /// (the format before parts, which still loads), a list for several,
    /// `null` at a stage boundary.
    #[test]
    fn loader_positions_round_trip_in_every_form() {
        let state = |batches| LoaderState {
            seed: 1,
            num_shards: 4,
            shuffle_buffer: 8,
            resampled: false,
            batches,
            next_worker: 0,
            epoch: 0,
            workers: Vec::new(),
        };
        let manifest = |loader| Manifest {
            version: MANIFEST_VERSION,
            step: 3,
            stage: 0,
            stage_step: 3,
            loader,
            data: DataStatsSnapshot::default(),
            nonfinite_skipped: 0,
            train_seconds: 0.0,
            config: TrainConfig::preset("tiny").unwrap(),
            files: BTreeMap::new(),
        };
        for (loader, form) in [
            (vec![], "null"),
            (vec![state(3)], "{"),
            (vec![state(3), state(5)], "["),
        ] {
            let json = serde_json::to_value(manifest(loader.clone())).unwrap();
            assert!(json["loader"].to_string().starts_with(form), "{json}");
            let back: Manifest = serde_json::from_value(json).unwrap();
            assert_eq!(back.loader, loader);
        }
    }

    #[test]
    fn resume_check_names_the_mismatch_and_allows_logging_changes() {
        let a = TrainConfig::preset("tiny").unwrap();
        let mut b = a.clone();
        b.log_every = 7;
        b.data.workers = 3;
        check_resumable(&a, &b).unwrap();
        b.stages[0].batch_size = 99;
        b.model = "demo".into();
        let err = check_resumable(&a, &b).unwrap_err().to_string();
        assert!(
            err.contains("stages[0].batch_size") && err.contains("model"),
            "{err}"
        );
    }
}
