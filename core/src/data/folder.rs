//! Image folders for classification, ImageNet-val style:
//! `root/<class>/*.{jpg,jpeg,png,webp}`.
//!
//! Follows torchvision's `ImageFolder` (`find_classes`): classes are the
//! sorted subfolder names and labels index that order. The names used for
//! captions and zero-shot prompts come from an optional class-names file
//! (one per line, in sorted-folder order, as OpenCLIP's
//! `zero_shot_metadata.py` lists them) or else from the folder names with
//! `_` read as a space. A class-names file that lists exactly the folder
//! names, in another order, is read as a mapping instead: label `i` is the
//! folder named on line `i`, and a warning says so (sorted-folder labels
//! would silently score every class against another's name).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{DataStats, ImagePayload, RawSample, ShardSource};
use crate::{Error, Result};

/// Images per shard.
pub const FILES_PER_SHARD: usize = 1000;

/// A class-per-subfolder image dataset.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// Human-readable class names, indexed by label.
    pub classes: Vec<String>,
    /// Whether labels follow the class-names file's order of the folder
    /// names rather than the sorted folders.
    pub labels_by_name: bool,
    /// Every image with its label, sorted by class folder then file name.
    files: Vec<(PathBuf, usize)>,
    files_per_shard: usize,
}

/// Opens `root`, naming classes from `classnames` if given.
pub fn open(root: &Path, classnames: Option<&Path>) -> Result<ImageFolder> {
    ImageFolder::open(root, classnames)
}

impl ImageFolder {
    /// Scans `root` (one level of class folders, one of images in each).
    ///
    /// Errors if `root` is missing, has no class folders or no images, or
    /// the class-names file does not have one line per class. A file that
    /// lists the folder names in another order maps labels by name.
    pub fn open(root: &Path, classnames: Option<&Path>) -> Result<Self> {
        let mut folders: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            if entry.path().is_dir() {
                folders.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    entry.path(),
                ));
            }
        }
        if folders.is_empty() {
            return Err(Error::Format {
                path: root.into(),
                reason: "no class subfolders".into(),
            });
        }
        folders.sort();
        let mut files = Vec::new();
        for (label, (_, folder)) in folders.iter().enumerate() {
            let mut images: Vec<PathBuf> = Vec::new();
            for entry in std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))? {
                let path = entry.map_err(|e| Error::io(folder, e))?.path();
                if path.is_file() && is_image(&path) {
                    images.push(path);
                }
            }
            images.sort();
            files.extend(images.into_iter().map(|p| (p, label)));
        }
        if files.is_empty() {
            return Err(Error::Format {
                path: root.into(),
                reason: "no images in the class subfolders".into(),
            });
        }
        let mut labels_by_name = false;
        let classes = match classnames {
            Some(path) => {
                let names = read_classnames(path, folders.len())?;
                let folder_names: Vec<&str> = folders.iter().map(|(n, _)| n.as_str()).collect();
                if let Some(label_of) = labels_by_position(&names, &folder_names) {
                    for file in &mut files {
                        file.1 = label_of[file.1];
                    }
                    labels_by_name = true;
                    say_once(path);
                }
                names
            }
            None => folders
                .iter()
                .map(|(name, _)| name.replace('_', " "))
                .collect(),
        };
        Ok(Self {
            classes,
            labels_by_name,
            files,
            files_per_shard: FILES_PER_SHARD,
        })
    }

    /// The same dataset cut into shards of `n` images (at least one).
    pub fn with_files_per_shard(mut self, n: usize) -> Self {
        self.files_per_shard = n.max(1);
        self
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are no images (never true after [`Self::open`]).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Every image path with its label, in shard order.
    pub fn files(&self) -> &[(PathBuf, usize)] {
        &self.files
    }
}

/// The image files of `inputs`: files as given, folders searched
/// recursively (sorted, subfolders in name order), keeping JPEG, PNG and
/// WebP files, as the loader reads them.
pub fn image_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut stack = vec![input.clone()];
            let mut found = Vec::new();
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                    let path = entry.map_err(|e| Error::io(&dir, e))?.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if is_image(&path) {
                        found.push(path);
                    }
                }
            }
            found.sort();
            out.extend(found);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            return Err(Error::Config(format!(
                "{} is neither an image file nor a folder",
                input.display()
            )));
        }
    }
    if out.is_empty() {
        return Err(Error::Config(
            "no JPEG, PNG or WebP images found in the given paths".into(),
        ));
    }
    Ok(out)
}

fn is_image(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    ["jpg", "jpeg", "png", "webp"]
        .iter()
        .any(|x| ext.eq_ignore_ascii_case(x))
}

/// One name per non-empty line; exactly `n` of them.
fn read_classnames(path: &Path, n: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != n {
        return Err(Error::Format {
            path: path.into(),
            reason: format!("{} class names for {n} class folders", names.len()),
        });
    }
    Ok(names)
}

/// When `names` lists exactly the (distinct) `folders`, in another order:
/// each sorted folder's label, its line in `names`.
fn labels_by_position(names: &[String], folders: &[&str]) -> Option<Vec<usize>> {
    let mut listed: Vec<&str> = names.iter().map(String::as_str).collect();
    listed.sort_unstable();
    let mut present = folders.to_vec();
    present.sort_unstable();
    let distinct = listed.windows(2).all(|w| w[0] != w[1]);
    if names.iter().map(String::as_str).eq(folders.iter().copied())
        || !distinct
        || listed != present
    {
        return None;
    }
    let label_of = folders
        .iter()
        .map(|f| names.iter().position(|n| n == f))
        .collect::<Option<Vec<usize>>>()
        .expect("the same names, as sets");
    Some(label_of)
}

/// Warns once per class-names file (an evaluator reopens its folder at
/// every evaluation) that its order, not the folders', gives the labels.
fn say_once(path: &Path) {
    static SAID: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let first = SAID
        .lock()
        .map_or(true, |mut said| said.insert(path.to_path_buf()));
    if first {
        tracing::warn!(
            "{}: class names file lists the folders in another order: labels follow the file",
            path.display()
        );
    }
}

impl ShardSource for ImageFolder {
    fn num_shards(&self) -> usize {
        self.files.len().div_ceil(self.files_per_shard)
    }

    fn shard_name(&self, i: usize) -> String {
        match self.files.get(i * self.files_per_shard) {
            Some((p, _)) => format!("{} (+{} more)", p.display(), self.files_per_shard - 1),
            None => format!("<shard {i}>"),
        }
    }

    fn open<'a>(
        &'a self,
        i: usize,
        stats: &'a DataStats,
    ) -> Result<Box<dyn Iterator<Item = RawSample> + Send + 'a>> {
        let start = i * self.files_per_shard;
        if start >= self.files.len() {
            return Err(Error::Config(format!(
                "shard {i} out of range ({} shards)",
                self.num_shards()
            )));
        }
        let chunk = &self.files[start..(start + self.files_per_shard).min(self.files.len())];
        Ok(Box::new(chunk.iter().filter_map(
            move |(path, label)| match std::fs::read(path) {
                Ok(bytes) => Some(RawSample {
                    key: path.display().to_string(),
                    image: ImagePayload::Encoded(bytes),
                    caption: self.classes[*label].clone(),
                    label: Some(*label),
                }),
                Err(_) => {
                    DataStats::bump(&stats.bad_images);
                    None
                }
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn tree() -> tempfile::TempDir {
        let d_tmp = tempfile::tempdir().unwrap();

        let d = d_tmp.path();
        for (class, files) in [
            ("n02_golden_retriever", &["b.JPG", "a.png", "notes.txt"][..]),
            ("n01_tench", &["z.webp"]),
        ] {
            std::fs::create_dir_all(d.join(class)).unwrap();
            for f in files {
                std::fs::write(d.join(class).join(f), f.as_bytes()).unwrap();
            }
        }
        std::fs::write(d.join("README"), b"not a class").unwrap();
        d_tmp
    }

    #[test]
    fn labels_follow_sorted_folders() {
        let d_tmp = tree();
        let d = d_tmp.path();
        let ds = open(d, None).unwrap().with_files_per_shard(2);
        assert_eq!(ds.classes, ["n01 tench", "n02 golden retriever"]);
        assert_eq!((ds.len(), ds.num_shards()), (3, 2));
        let stats = DataStats::default();
        let got: Vec<(Option<usize>, String, String)> = (0..2)
            .flat_map(|i| ds.open(i, &stats).unwrap().collect::<Vec<_>>())
            .map(|s| {
                (
                    s.label,
                    s.caption,
                    s.key.rsplit('/').next().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            got[0],
            (Some(0), "n01 tench".to_string(), "z.webp".to_string())
        );
        assert_eq!(got[1].2, "a.png");
        assert_eq!(
            got[2],
            (
                Some(1),
                "n02 golden retriever".to_string(),
                "b.JPG".to_string()
            )
        );
        // A file that vanished after the scan is a bad image, not an error.
        std::fs::remove_file(d.join("n01_tench/z.webp")).unwrap();
        assert_eq!(ds.open(0, &stats).unwrap().count(), 1);
        assert_eq!(stats.bad_images.load(Relaxed), 1);
    }

    #[test]
    fn classnames_file_and_errors() {
        let d_tmp = tree();
        let d = d_tmp.path();
        let names = d.join("names.txt");
        std::fs::write(&names, "tench\ngolden retriever\n\n").unwrap();
        assert_eq!(
            open(d, Some(&names)).unwrap().classes,
            ["tench", "golden retriever"]
        );
        std::fs::write(&names, "tench\n").unwrap();
        let e = open(d, Some(&names)).unwrap_err().to_string();
        assert!(e.contains("1 class names for 2 class folders"), "{e}");
        assert!(matches!(
            open(&d.join("missing"), None),
            Err(Error::Io { .. })
        ));
        let empty = d.join("n01_tench");
        let e = open(&empty, None).unwrap_err().to_string();
        assert!(e.contains("no class subfolders"), "{e}");
    }

    #[test]
    fn a_file_naming_the_folders_in_another_order_maps_by_name() {
        let d_tmp = tree();
        let d = d_tmp.path();
        let names = d.join("names.txt");
        let labels = |ds: &ImageFolder| -> Vec<(String, usize)> {
            ds.files()
                .iter()
                .map(|(p, l)| (p.file_name().unwrap().to_string_lossy().into_owned(), *l))
                .collect()
        };
        // Sorted folders: n01_tench is 0. The file puts it second.
        std::fs::write(&names, "n02_golden_retriever\nn01_tench\n").unwrap();
        let ds = open(d, Some(&names)).unwrap();
        assert!(ds.labels_by_name);
        assert_eq!(ds.classes, ["n02_golden_retriever", "n01_tench"]);
        assert_eq!(
            labels(&ds),
            [
                ("z.webp".into(), 1),
                ("a.png".into(), 0),
                ("b.JPG".into(), 0)
            ]
        );
        let stats = DataStats::default();
        let first = ds.open(0, &stats).unwrap().next().unwrap();
        assert_eq!(
            (first.label, first.caption.as_str()),
            (Some(1), "n01_tench")
        );
        // The folders in their own order, display names, or a repeated
        // name: labels follow the sorted folders, as before.
        for text in [
            "n01_tench\nn02_golden_retriever\n",
            "golden retriever\ntench\n",
            "n01_tench\nn01_tench\n",
        ] {
            std::fs::write(&names, text).unwrap();
            let ds = open(d, Some(&names)).unwrap();
            assert!(!ds.labels_by_name, "{text}");
            assert_eq!(labels(&ds)[0], ("z.webp".into(), 0), "{text}");
        }
    }
}
