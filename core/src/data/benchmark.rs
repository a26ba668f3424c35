//! clip_benchmark's WebDataset layout, the one its `wds_*` datasets ship in
//! (LAION-AI/CLIP_benchmark `datasets/builder.py::build_wds_dataset`, written
//! by `webdataset_builder.py::convert_dataset`):
//!
//! ```text
//! root/
//!   classnames.txt                          one class name a line, label order
//!   zeroshot_classification_templates.txt   one prompt a line, `{c}` the class
//!   dataset_type.txt                        `retrieval` for caption sets (optional)
//!   test/nshards.txt                        n, the number of shards
//!   test/0.tar … test/{n-1}.tar             `s0000000.webp|png|jpg` + `.cls` or `.txt`
//! ```
//!
//! A classification sample's `cls` is its label in decimal; a retrieval
//! sample's `txt` holds its captions, one a line. Other splits (`train/`)
//! sit beside `test/`. clip_benchmark requires `nshards.txt`; a split folder
//! without one is read as all its `.tar` files, in numeric order.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::brace::{SourceSpec, parse_sources};
use super::shards::{SampleTarget, WebDataset};
use crate::{Error, Result};

/// The class names, in label order, at the dataset root.
pub const CLASSNAMES_FILE: &str = "classnames.txt";
/// The zero-shot prompts at the dataset root; `{c}` is the class name.
pub const TEMPLATES_FILE: &str = "zeroshot_classification_templates.txt";
/// The shard count inside a split folder.
pub const NSHARDS_FILE: &str = "nshards.txt";
/// The split evaluated unless told otherwise (clip_benchmark's `--split`).
pub const DEFAULT_SPLIT: &str = "test";
/// Samples per shard, as clip_benchmark's converter writes them
/// (`max_count`).
pub const SAMPLES_PER_SHARD: usize = 10_000;

/// One split of a dataset in clip_benchmark's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchmarkSplit {
    /// The dataset root, where the class names and templates live.
    pub root: PathBuf,
    /// The split's name (`test`).
    pub split: String,
    /// Its shards, in order.
    pub shards: Vec<PathBuf>,
}

impl BenchmarkSplit {
    /// Whether `root` has a split folder `split` in this layout: one with
    /// `nshards.txt` or a `.tar` shard.
    pub fn is_root(root: &Path, split: &str) -> bool {
        is_split_dir(&root.join(split))
    }

    /// The split `split` of the dataset at `root`. Errs if `root` has no
    /// such split, or its `nshards.txt` is not a positive count of shards
    /// that all exist.
    pub fn open(root: &Path, split: &str) -> Result<Self> {
        let dir = root.join(split);
        if !is_split_dir(&dir) {
            return Err(Error::Config(format!(
                "{} is not a clip_benchmark dataset with a `{split}` split \
                 ({split}/{NSHARDS_FILE} or {split}/*.tar)",
                root.display()
            )));
        }
        Ok(Self {
            root: root.to_path_buf(),
            split: split.to_string(),
            shards: list_shards(&dir)?,
        })
    }

    /// What `path` names in this layout: a dataset root (its
    /// [`DEFAULT_SPLIT`]) or one split folder of one; `None` for anything
    /// else (an image folder, a shard pattern, a CSV).
    pub fn locate(path: &Path) -> Result<Option<Self>> {
        if Self::is_root(path, DEFAULT_SPLIT) {
            return Self::open(path, DEFAULT_SPLIT).map(Some);
        }
        if is_split_dir(path) {
            let split = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let root = path.parent().filter(|p| !p.as_os_str().is_empty());
            return Ok(Some(Self {
                root: root.unwrap_or(Path::new(".")).to_path_buf(),
                split: split.unwrap_or_else(|| DEFAULT_SPLIT.into()),
                shards: list_shards(path)?,
            }));
        }
        Ok(None)
    }

    /// The shards of a pattern (`root/test/{0..3}.tar`, `::`-joined
    /// sources read in order), with the folder above their folder as the
    /// root whose class names and templates apply.
    pub fn from_spec(spec: &str) -> Result<Self> {
        let shards: Vec<PathBuf> = parse_sources(spec, None)?
            .into_iter()
            .flat_map(|s| s.files)
            .collect();
        let first = shards
            .first()
            .expect("parse_sources finds a file per source");
        let dir = first.parent().unwrap_or(Path::new(""));
        let root = dir.parent().filter(|p| !p.as_os_str().is_empty());
        let root = root.unwrap_or(Path::new(".")).to_path_buf();
        let split = dir.file_name().map_or_else(
            || DEFAULT_SPLIT.to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Self {
            root,
            split,
            shards,
        })
    }

    /// The shards, read for `target` (`cls` labels or `txt` captions).
    pub fn webdataset(&self, target: SampleTarget) -> Result<WebDataset> {
        let pattern = self.root.join(&self.split).display().to_string();
        let source = SourceSpec {
            pattern,
            files: self.shards.clone(),
            weight: 1.0,
        };
        Ok(WebDataset::new(vec![source])?.with_target(target))
    }

    /// The root's `classnames.txt`, if it has one.
    pub fn classnames(&self) -> Result<Option<Vec<String>>> {
        optional_lines(&self.root.join(CLASSNAMES_FILE))
    }

    /// The root's `zeroshot_classification_templates.txt`, if it has one,
    /// as written (`{c}` placeholders).
    pub fn templates(&self) -> Result<Option<Vec<String>>> {
        optional_lines(&self.root.join(TEMPLATES_FILE))
    }
}

/// Whether `dir` is a split folder: it holds `nshards.txt`, or shards and
/// no subfolder (an image folder with a stray `.tar` stays a folder).
pub fn is_split_dir(dir: &Path) -> bool {
    if dir.join(NSHARDS_FILE).is_file() {
        return true;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    !paths.iter().any(|p| p.is_dir()) && paths.iter().any(|p| p.is_file() && is_shard(p))
}

/// Whether `data` is a shard pattern rather than a folder or a file:
/// braces, `::`-joined sources, or a single `.tar`/`.tar.gz`/`.tgz`.
pub fn is_shard_spec(data: &str) -> bool {
    !Path::new(data).is_dir()
        && (data.contains('{') || data.contains("::") || is_shard(Path::new(data)))
}

fn is_shard(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase());
    name.is_some_and(|n| n.ends_with(".tar") || n.ends_with(".tar.gz") || n.ends_with(".tgz"))
}

/// The shards of split folder `dir`: `0.tar … {n-1}.tar` after its
/// `nshards.txt`, else every shard file, numbered names in numeric order.
fn list_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let nshards = dir.join(NSHARDS_FILE);
    if nshards.is_file() {
        let text = std::fs::read_to_string(&nshards).map_err(|e| Error::io(&nshards, e))?;
        let n = text
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::Format {
                path: nshards.clone(),
                reason: format!("{:?} is not a positive shard count", text.trim()),
            })?;
        let shards: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("{i}.tar"))).collect();
        if let Some(missing) = shards.iter().find(|s| !s.is_file()) {
            return Err(Error::Format {
                path: nshards,
                reason: format!("{n} shards listed, but {} is missing", missing.display()),
            });
        }
        return Ok(shards);
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_shard(p))
        .collect();
    let number = |p: &Path| -> Option<u64> {
        let name = p.file_name()?.to_str()?;
        name.split('.').next()?.parse().ok()
    };
    shards.sort_by(|a, b| {
        (number(a).is_none(), number(a), a).cmp(&(number(b).is_none(), number(b), b))
    });
    Ok(shards)
}

/// The trimmed non-empty lines of `path`, or `None` if it does not exist.
fn optional_lines(path: &Path) -> Result<Option<Vec<String>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// A dataset's name, for reports: a clip_benchmark root's folder name (also
/// when given one of its split folders or shards), an image folder's name,
/// a CSV's file stem, or the folder holding a shard pattern's files.
pub fn dataset_name(data: &str) -> String {
    let path = Path::new(data);
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let named = if let Ok(Some(split)) = BenchmarkSplit::locate(path) {
        name(&split.root.canonicalize().unwrap_or(split.root))
    } else if is_shard_spec(data) {
        let first = data.split("::").next().unwrap_or(data);
        Path::new(first).parent().and_then(|dir| {
            match is_split_dir(dir) && dir.join(NSHARDS_FILE).is_file() {
                true => dir.parent().and_then(name),
                false => name(dir),
            }
        })
    } else if path.is_dir() {
        name(&path.canonicalize().unwrap_or(path.into()))
    } else {
        path.file_stem().map(|n| n.to_string_lossy().into_owned())
    };
    named
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| data.to_string())
}

/// The key of sample `index`, as clip_benchmark's converter writes it.
pub fn sample_key(index: usize) -> String {
    format!("s{index:07}")
}

/// Writes one classification shard to `w`: per sample its index (for the
/// key), its image's extension (`png`, `webp`, `jpg`) and bytes, and its
/// label as a `cls` member. Headers carry no time, so the same samples give
/// the same bytes.
pub fn write_labelled_shard<'a>(
    w: &mut dyn Write,
    samples: impl Iterator<Item = (usize, &'a str, Vec<u8>, usize)>,
) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(w);
    for (index, ext, image, label) in samples {
        let key = sample_key(index);
        for (ext, data) in [(ext, image), ("cls", label.to_string().into_bytes())] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            tar.append_data(&mut h, format!("{key}.{ext}"), data.as_slice())?;
        }
    }
    tar.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataStats, ShardSource};

    /// A root with classnames, templates and a `test` split of `shards`
    /// shards of two samples each.
    fn root(shards: usize, with_count: bool) -> tempfile::TempDir {
        let d_tmp = tempfile::tempdir().unwrap();
        let d = d_tmp.path().join("wds_toy");
        std::fs::create_dir_all(d.join("test")).unwrap();
        std::fs::write(d.join(CLASSNAMES_FILE), "cat\ndog\n\n").unwrap();
        std::fs::write(d.join(TEMPLATES_FILE), "a photo of a {c}.\n").unwrap();
        for s in 0..shards {
            let mut bytes = Vec::new();
            let samples = (0..2).map(|k| (2 * s + k, "png", vec![k as u8], (s + k) % 2));
            write_labelled_shard(&mut bytes, samples).unwrap();
            std::fs::write(d.join(format!("test/{s}.tar")), bytes).unwrap();
        }
        if with_count {
            std::fs::write(d.join("test").join(NSHARDS_FILE), format!("{shards}\n")).unwrap();
        }
        d_tmp
    }

    #[test]
    fn reads_root_split_and_metadata() {
        let d_tmp = root(11, true);
        let d = d_tmp.path().join("wds_toy");
        assert!(BenchmarkSplit::is_root(&d, "test"));
        assert!(!BenchmarkSplit::is_root(&d, "train"));
        let split = BenchmarkSplit::locate(&d).unwrap().expect("a root");
        assert_eq!(split.split, "test");
        assert_eq!(split.shards.len(), 11);
        assert!(split.shards[10].ends_with("test/10.tar"));
        assert_eq!(split.classnames().unwrap().unwrap(), ["cat", "dog"]);
        assert_eq!(split.templates().unwrap().unwrap(), ["a photo of a {c}."]);
        // The split folder itself names the same split.
        let same = BenchmarkSplit::locate(&d.join("test")).unwrap().unwrap();
        assert_eq!(
            (same.root.as_path(), &same.shards),
            (d.as_path(), &split.shards)
        );
        let ds = split.webdataset(SampleTarget::Label).unwrap();
        let stats = DataStats::default();
        let labels: Vec<(String, Option<usize>)> = (0..ds.num_shards())
            .flat_map(|i| ds.open(i, &stats).unwrap().collect::<Vec<_>>())
            .map(|s| (s.key, s.label))
            .take(4)
            .collect();
        assert_eq!(
            labels,
            [
                ("0.tar/s0000000".to_string(), Some(0)),
                ("0.tar/s0000001".to_string(), Some(1)),
                ("1.tar/s0000002".to_string(), Some(1)),
                ("1.tar/s0000003".to_string(), Some(0)),
            ]
        );
        assert_eq!(dataset_name(d.to_str().unwrap()), "wds_toy");
        assert_eq!(dataset_name(d.join("test").to_str().unwrap()), "wds_toy");
        assert_eq!(
            dataset_name(&format!("{}/test/{{0..3}}.tar", d.display())),
            "wds_toy"
        );
        assert_eq!(dataset_name("/data/coco/captions.csv"), "captions");
    }

    #[test]
    fn without_nshards_every_tar_in_numeric_order() {
        let d_tmp = root(11, false);
        let d = d_tmp.path().join("wds_toy");
        let split = BenchmarkSplit::open(&d, "test").unwrap();
        let names: Vec<String> = split
            .shards
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names[..3], ["0.tar", "1.tar", "2.tar"]);
        assert_eq!(names[10], "10.tar");
    }

    #[test]
    fn bad_layouts_are_errors_or_not_benchmarks() {
        let d_tmp = root(2, true);
        let d = d_tmp.path().join("wds_toy");
        std::fs::write(d.join("test").join(NSHARDS_FILE), "3\n").unwrap();
        let e = BenchmarkSplit::locate(&d).unwrap_err().to_string();
        assert!(
            e.contains("3 shards listed") && e.contains("2.tar is missing"),
            "{e}"
        );
        std::fs::write(d.join("test").join(NSHARDS_FILE), "zero").unwrap();
        let e = BenchmarkSplit::open(&d, "test").unwrap_err().to_string();
        assert!(e.contains("not a positive shard count"), "{e}");
        let e = BenchmarkSplit::open(&d, "val").unwrap_err().to_string();
        assert!(e.contains("with a `val` split"), "{e}");
        // An image folder is no benchmark, even with a tar beside its
        // classes.
        let folder = d_tmp.path().join("folder");
        std::fs::create_dir_all(folder.join("cat")).unwrap();
        std::fs::write(folder.join("cat/0.png"), b"png").unwrap();
        std::fs::write(folder.join("backup.tar"), b"").unwrap();
        assert_eq!(BenchmarkSplit::locate(&folder).unwrap(), None);
    }
}
