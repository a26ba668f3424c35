//! What a zero-shot evaluation reads, told apart by what is on disk: an
//! image folder (torchvision's `ImageFolder`, labels from the class
//! folders), or clip_benchmark's WebDataset layout (`build_wds_dataset`:
//! labels from each sample's `cls`, class names and `{c}` prompts from the
//! dataset root; see [`crate::data::benchmark`]).

use std::path::Path;

use super::zeroshot::{TemplateSet, ZeroShotTask, imagenet_classnames, templates_from_lines};
use crate::data::ShardSource;
use crate::data::benchmark::{BenchmarkSplit, CLASSNAMES_FILE, TEMPLATES_FILE, is_shard_spec};
use crate::data::folder::ImageFolder;
use crate::data::shards::{SampleTarget, WebDataset};
use crate::{Error, Result};

/// A zero-shot evaluation set.
#[derive(Debug)]
pub enum ZeroShotData {
    /// `root/<class>/*` images, labelled by sorted folder (or by name, see
    /// [`ImageFolder::open`]).
    Folder(ImageFolder),
    /// WebDataset shards whose samples carry a `cls` label.
    Shards {
        /// The shards, read for labels.
        shards: WebDataset,
        /// Class names in label order: the given file's, else the dataset
        /// root's `classnames.txt`.
        classnames: Vec<String>,
        /// The dataset's own prompts (`{c}` read as `{}`), if it ships them.
        templates: Option<Vec<String>>,
    },
}

impl ZeroShotData {
    /// Opens `data`: a clip_benchmark dataset root (its `test` split), one
    /// split folder of one, a shard pattern (`root/test/{0..3}.tar`), or
    /// else an image folder. `classnames` replaces the dataset's own names.
    pub fn open(data: &Path, classnames: Option<&Path>) -> Result<Self> {
        let text = data.to_string_lossy();
        let split = if is_shard_spec(&text) {
            Some(BenchmarkSplit::from_spec(&text)?)
        } else {
            BenchmarkSplit::locate(data)?
        };
        let Some(split) = split else {
            return ImageFolder::open(data, classnames).map(Self::Folder);
        };
        let classnames = match classnames {
            Some(path) => read_names(path)?,
            None => split.classnames()?.ok_or_else(|| {
                Error::Config(format!(
                    "{} has no {CLASSNAMES_FILE}: name the classes with a class-names file",
                    split.root.display()
                ))
            })?,
        };
        if classnames.is_empty() {
            return Err(Error::Format {
                path: split.root.join(CLASSNAMES_FILE),
                reason: "no class names".into(),
            });
        }
        let templates = match split.templates()? {
            Some(lines) => Some(
                templates_from_lines(&lines).map_err(|reason| Error::Format {
                    path: split.root.join(TEMPLATES_FILE),
                    reason,
                })?,
            ),
            None => None,
        };
        Ok(Self::Shards {
            shards: split.webdataset(SampleTarget::Label)?,
            classnames,
            templates,
        })
    }

    /// The images and labels.
    pub fn source(&self) -> &dyn ShardSource {
        match self {
            Self::Folder(folder) => folder,
            Self::Shards { shards, .. } => shards,
        }
    }

    /// The class names and prompts to score against. `templates` overrides
    /// the default: for a folder, OpenAI's 80 when it is ImageNet (1,000
    /// classes and no class-names file, `classnames_given` false; the
    /// bundled ImageNet names then replace the folder names), else
    /// [`TemplateSet::Photo`]; for shards, the dataset's own prompts, else
    /// `Photo`.
    pub fn task(
        &self,
        classnames_given: bool,
        templates: Option<&TemplateSet>,
    ) -> Result<ZeroShotTask> {
        let (classnames, own) = match self {
            Self::Folder(folder) => {
                let imagenet = !classnames_given && folder.classes.len() == 1000;
                if imagenet {
                    (imagenet_classnames(), TemplateSet::Openai.load()?)
                } else {
                    (folder.classes.clone(), TemplateSet::Photo.load()?)
                }
            }
            Self::Shards {
                classnames,
                templates,
                ..
            } => (
                classnames.clone(),
                match templates {
                    Some(t) => t.clone(),
                    None => TemplateSet::Photo.load()?,
                },
            ),
        };
        let templates = match templates {
            Some(set) => set.load()?,
            None => own,
        };
        Ok(ZeroShotTask {
            classnames,
            templates,
        })
    }
}

/// A class-names file: one name a non-empty line, any number of them.
fn read_names(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataStats;
    use crate::data::benchmark::{NSHARDS_FILE, write_labelled_shard};

    fn wds_root(dir: &Path, templates: Option<&str>) -> std::path::PathBuf {
        let root = dir.join("wds_toy");
        std::fs::create_dir_all(root.join("test")).unwrap();
        std::fs::write(root.join(CLASSNAMES_FILE), "cat\ndog\nbird\n").unwrap();
        if let Some(t) = templates {
            std::fs::write(root.join(TEMPLATES_FILE), t).unwrap();
        }
        let mut bytes = Vec::new();
        let samples = (0..3).map(|i| (i, "png", vec![i as u8], 2 - i));
        write_labelled_shard(&mut bytes, samples).unwrap();
        std::fs::write(root.join("test/0.tar"), bytes).unwrap();
        std::fs::write(root.join("test").join(NSHARDS_FILE), "1\n").unwrap();
        root
    }

    #[test]
    fn a_benchmark_root_gives_shards_with_its_names_and_prompts() {
        let d_tmp = tempfile::tempdir().unwrap();
        let root = wds_root(d_tmp.path(), Some("a photo of a {c}.\nitap of a {c}.\n"));
        for data in [
            root.clone(),
            root.join("test"),
            root.join("test/{0..0}.tar"),
        ] {
            let set = ZeroShotData::open(&data, None).unwrap();
            assert!(matches!(set, ZeroShotData::Shards { .. }), "{data:?}");
            let task = set.task(false, None).unwrap();
            assert_eq!(task.classnames, ["cat", "dog", "bird"]);
            assert_eq!(task.templates, ["a photo of a {}.", "itap of a {}."]);
            let stats = DataStats::default();
            let labels: Vec<Option<usize>> = set
                .source()
                .open(0, &stats)
                .unwrap()
                .map(|s| s.label)
                .collect();
            assert_eq!(labels, [Some(2), Some(1), Some(0)]);
        }
        let set = ZeroShotData::open(&root, None).unwrap();
        let simple = set.task(false, Some(&TemplateSet::Simple)).unwrap();
        assert_eq!(simple.templates.len(), 7, "--templates wins");
        // Given class names replace the root's.
        let names = d_tmp.path().join("names.txt");
        std::fs::write(&names, "a\nb\nc\nd\n").unwrap();
        let task = ZeroShotData::open(&root, Some(&names))
            .unwrap()
            .task(true, None)
            .unwrap();
        assert_eq!(task.classnames, ["a", "b", "c", "d"]);
    }

    #[test]
    fn missing_names_default_prompts_and_bad_prompts() {
        let d_tmp = tempfile::tempdir().unwrap();
        let root = wds_root(d_tmp.path(), None);
        let task = ZeroShotData::open(&root, None)
            .unwrap()
            .task(false, None)
            .unwrap();
        assert_eq!(task.templates, TemplateSet::Photo.load().unwrap());
        std::fs::write(root.join(TEMPLATES_FILE), "a photo\n").unwrap();
        let e = ZeroShotData::open(&root, None).unwrap_err().to_string();
        assert!(e.contains("has no {} or {c}"), "{e}");
        std::fs::remove_file(root.join(TEMPLATES_FILE)).unwrap();
        std::fs::remove_file(root.join(CLASSNAMES_FILE)).unwrap();
        let e = ZeroShotData::open(&root, None).unwrap_err().to_string();
        assert!(e.contains("has no classnames.txt"), "{e}");
        // An image folder stays an image folder.
        let folder = d_tmp.path().join("folder");
        std::fs::create_dir_all(folder.join("cat")).unwrap();
        std::fs::write(folder.join("cat/0.png"), b"png").unwrap();
        let set = ZeroShotData::open(&folder, None).unwrap();
        assert!(matches!(set, ZeroShotData::Folder(_)));
        assert_eq!(set.task(false, None).unwrap().classnames, ["cat"]);
    }
}
