//! The sweep file (`clipa sweep --config sweep.toml`): which models, which
//! token counts by which strategy, and the two training phases every point
//! runs. A point is one pre-train at reduced tokens followed by a short
//! fine-tune at full length, as in CLIPA §4 (the inverse-scaling figures
//! fix the samples seen and vary model size and token count).
//!
//! The grid is a list of `[[grid]]` blocks, each a cross product
//! `models × image strategies × image tokens × text strategies × text
//! tokens`; the sweep runs their union. A full-length axis needs no
//! strategy, so points at full length are the same whatever strategy the
//! block names, and run once.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::eval::EvaluatorConfig;
use crate::model::ClipConfig;
use crate::reduce::image::{BlockMask, GridMask, RandomMask};
use crate::reduce::{ImageReduction, TextReduction};
use crate::{Error, Result};

/// How image tokens are removed (closed choice; CLIPA §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageStrategy {
    /// A lower resolution (every released CLIPA model).
    Resize,
    /// A uniformly random subset of patches, per sample.
    Random,
    /// One patch per `k×k` window.
    Grid,
    /// One contiguous block.
    Block,
}

impl ImageStrategy {
    /// Every strategy, in figure order.
    pub const ALL: [Self; 4] = [Self::Resize, Self::Random, Self::Grid, Self::Block];

    /// The config and CSV spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Resize => "resize",
            Self::Random => "random",
            Self::Grid => "grid",
            Self::Block => "block",
        }
    }

    /// The reduction that leaves exactly `tokens` patches of a `grid×grid`
    /// patch grid with `patch`-pixel patches, or an error naming why this
    /// strategy cannot (a resize needs a square count, a grid mask a
    /// window that tiles the grid).
    pub fn reduction(self, tokens: usize, grid: usize, patch: usize) -> Result<ImageReduction> {
        let full = grid * grid;
        let bad = |why: &str| {
            Err(Error::Config(format!(
                "{} image tokens by {}: {why}",
                tokens,
                self.as_str()
            )))
        };
        if tokens == 0 || tokens > full {
            return bad(&format!("must be between 1 and {full}"));
        }
        if tokens == full {
            return Ok(ImageReduction::None);
        }
        let side = (tokens as f64).sqrt().round() as usize;
        let ratio = 1.0 - tokens as f64 / full as f64;
        let r = match self {
            Self::Resize if side * side == tokens => ImageReduction::Resize {
                size: (side * patch) as u32,
            },
            Self::Resize => return bad("a resize keeps a square number of patches"),
            Self::Random => ImageReduction::Random(RandomMask { ratio }),
            Self::Block => ImageReduction::Block(BlockMask { ratio }),
            Self::Grid => {
                let k = (full as f64 / tokens as f64).sqrt().round() as usize;
                if k < 2 || k * k * tokens != full || !grid.is_multiple_of(k) {
                    return bad("a grid mask keeps one patch per k×k window that tiles the grid");
                }
                ImageReduction::Grid(GridMask {
                    window: k,
                    per_window: 1,
                })
            }
        };
        // The mask ratio went through floating point: check the count.
        let kept = match r.mask() {
            Some(m) => m.kept((grid, grid)),
            None => side * side,
        };
        if kept != tokens {
            return bad(&format!("the nearest mask keeps {kept}"));
        }
        Ok(r)
    }
}

impl std::str::FromStr for ImageStrategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "image strategy {s:?}: expected resize, random, grid or block"
                ))
            })
    }
}

/// Where a sweep's data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SweepData {
    /// The built-in synthetic caption set, scored on its held-out
    /// colour–shape pairs.
    Synthetic,
    /// Fashion-MNIST from Debian's IDX files, converted into the sweep
    /// folder on first use (`clipa data fashion-mnist`).
    FashionMnist {
        /// Folder with the four IDX files (default
        /// `/usr/share/datasets/fashion-mnist`).
        #[serde(default)]
        idx_dir: Option<PathBuf>,
        /// Test images scored per evaluation (the first N of the 10,000).
        #[serde(default)]
        eval_images: Option<usize>,
    },
    /// Your own data, as `clipa train` takes it.
    Files {
        /// `--train-data`: WebDataset shards or a CSV/TSV file.
        train_data: String,
        /// `--zeroshot-data`: a `root/<class>/*` image folder.
        zeroshot_data: PathBuf,
        /// `--classnames` for `zeroshot_data`.
        #[serde(default)]
        classnames: Option<PathBuf>,
    },
}

/// One training phase of every point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Optimiser steps.
    pub steps: u64,
    /// Global batch.
    pub batch_size: usize,
    /// Learning rate per 256 samples.
    pub base_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
}

/// One `[[grid]]` block: a cross product of models and token counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// Model presets (`clipa models`).
    pub models: Vec<String>,
    /// Image strategies.
    #[serde(default = "resize_only")]
    pub image: Vec<ImageStrategy>,
    /// Image tokens kept in pre-training (CLS not counted).
    pub image_tokens: Vec<usize>,
    /// Text strategies.
    #[serde(default = "truncate_only")]
    pub text: Vec<TextReduction>,
    /// Text tokens in pre-training (specials included).
    pub text_tokens: Vec<usize>,
}

fn resize_only() -> Vec<ImageStrategy> {
    vec![ImageStrategy::Resize]
}

fn truncate_only() -> Vec<TextReduction> {
    vec![TextReduction::Truncate]
}

/// A whole sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Name, for the default output folder.
    pub name: String,
    /// Master seed of every point.
    pub seed: u64,
    /// Full image side in pixels (the fine-tune's, and the one reductions
    /// start from).
    pub image_size: u32,
    /// Full text length (the fine-tune's).
    pub text_length: usize,
    /// The data.
    pub data: SweepData,
    /// Pre-training at reduced tokens.
    pub pretrain: Phase,
    /// Fine-tuning at full tokens, from the pre-trained weights.
    pub finetune: Phase,
    /// The grid blocks.
    #[serde(rename = "grid")]
    pub grids: Vec<Grid>,
    /// Extra evaluations after each phase (zero-shot folders, retrieval).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluators: Vec<EvaluatorConfig>,
    /// The WordPiece vocabulary (`vocab.txt` or `tokenizer.json`) of the
    /// grid's CLIPA-v2 models (`clipa-s16`, `clipa-b16`, …); fine-tunes read
    /// the copy in their pre-training checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<std::path::PathBuf>,
}

/// Names accepted by [`SweepConfig::preset`].
pub const PRESETS: [&str; 2] = ["cpu", "tiny"];

impl SweepConfig {
    /// The named preset.
    ///
    /// - `cpu`: the inverse scaling law on a laptop CPU. Three model sizes
    ///   (`scale-w32/64/128`) on Fashion-MNIST at 32 px: image tokens
    ///   64/16/4 by resize, text tokens 16/8/4 by syntax masking, and at the
    ///   middle size every image strategy at 16 tokens and every text
    ///   strategy at 4. 250 pre-training steps and 100 fine-tuning steps at
    ///   batch 64 per point (16,000 + 6,400 samples), 21 points.
    /// - `tiny`: two points of the smallest model on synthetic data, a few
    ///   steps each (the CLI tests).
    ///
    /// Long because it is the grid itself, point by point, as the figures
    /// show it.
    pub fn preset(name: &str) -> Result<Self> {
        let models = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Ok(match name {
            "cpu" => Self {
                name: "cpu".into(),
                seed: 0,
                image_size: 32,
                // Every Fashion-MNIST caption fits in 16 tokens, so 16 is
                // the full length: a longer context would add padding only.
                text_length: 16,
                data: SweepData::FashionMnist {
                    idx_dir: None,
                    eval_images: Some(5000),
                },
                pretrain: Phase {
                    steps: 250,
                    batch_size: 64,
                    base_lr: 1e-3,
                    warmup_steps: 25,
                },
                // Long and fast enough to adapt a 16 px or 8 px pre-train to
                // 32 px: 50 steps at 1e-4 left such points below where they
                // started (w32, 16 tokens: 42.5 % → 18.8 %; 100 steps at
                // 5e-4: 31.5 %).
                finetune: Phase {
                    steps: 100,
                    batch_size: 64,
                    base_lr: 5e-4,
                    warmup_steps: 10,
                },
                grids: vec![
                    Grid {
                        models: models(&["scale-w32", "scale-w64", "scale-w128"]),
                        image: vec![ImageStrategy::Resize],
                        image_tokens: vec![64, 16, 4],
                        text: vec![TextReduction::Syntax],
                        text_tokens: vec![16],
                    },
                    Grid {
                        models: models(&["scale-w32", "scale-w64", "scale-w128"]),
                        image: vec![ImageStrategy::Resize],
                        image_tokens: vec![64],
                        text: vec![TextReduction::Syntax],
                        text_tokens: vec![16, 8, 4],
                    },
                    Grid {
                        models: models(&["scale-w64"]),
                        image: ImageStrategy::ALL.to_vec(),
                        image_tokens: vec![16],
                        text: vec![TextReduction::Truncate],
                        text_tokens: vec![16],
                    },
                    Grid {
                        models: models(&["scale-w64"]),
                        image: vec![ImageStrategy::Resize],
                        image_tokens: vec![64],
                        text: TextReduction::ALL.to_vec(),
                        text_tokens: vec![4],
                    },
                ],
                evaluators: Vec::new(),
                vocab: None,
            },
            "tiny" => Self {
                name: "tiny".into(),
                seed: 0,
                image_size: 32,
                text_length: 16,
                data: SweepData::Synthetic,
                pretrain: Phase {
                    steps: 3,
                    batch_size: 8,
                    base_lr: 1e-3,
                    warmup_steps: 1,
                },
                finetune: Phase {
                    steps: 2,
                    batch_size: 8,
                    base_lr: 1e-4,
                    warmup_steps: 1,
                },
                grids: vec![Grid {
                    models: models(&["scale-w32"]),
                    image: vec![ImageStrategy::Resize],
                    image_tokens: vec![64, 16],
                    text: vec![TextReduction::Truncate],
                    text_tokens: vec![16],
                }],
                evaluators: Vec::new(),
                vocab: None,
            },
            other => {
                return Err(Error::Config(format!(
                    "unknown sweep preset '{other}'; presets: {}",
                    PRESETS.join(", ")
                )));
            }
        })
    }

    /// Reads a sweep file (unknown keys are errors).
    pub fn from_toml(text: &str, path: &std::path::Path) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        })?;
        Ok(cfg)
    }

    /// The sweep as TOML, as written to the sweep folder.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a SweepConfig always serialises")
    }

    /// Every point of the union of the grid blocks, in file order, each
    /// once. Errors name the block and the value that cannot run.
    pub fn points(&self) -> Result<Vec<SweepPoint>> {
        let mut out: Vec<SweepPoint> = Vec::new();
        if self.grids.is_empty() {
            return Err(Error::Config("a sweep needs at least one [[grid]]".into()));
        }
        for (gi, g) in self.grids.iter().enumerate() {
            let tag = format!("grid {}", gi + 1);
            if g.models.is_empty()
                || g.image.is_empty()
                || g.image_tokens.is_empty()
                || g.text.is_empty()
                || g.text_tokens.is_empty()
            {
                return Err(Error::Config(format!(
                    "{tag}: models, image, image_tokens, text and text_tokens must not be empty"
                )));
            }
            for m in &g.models {
                let model =
                    ClipConfig::preset(m).map_err(|e| Error::Config(format!("{tag}: {e}")))?;
                let patch = model.vision.patch_size;
                if !(self.image_size as usize).is_multiple_of(patch) {
                    return Err(Error::Config(format!(
                        "{tag}: image_size {} is not a multiple of {m}'s patch size {patch}",
                        self.image_size
                    )));
                }
                let grid = self.image_size as usize / patch;
                for &is in &g.image {
                    for &it in &g.image_tokens {
                        is.reduction(it, grid, patch)
                            .map_err(|e| Error::Config(format!("{tag}, {m}: {e}")))?;
                        for &ts in &g.text {
                            for &tt in &g.text_tokens {
                                if tt < 3 || tt > self.text_length {
                                    return Err(Error::Config(format!(
                                        "{tag}: text tokens {tt} must be between 3 and the full length {}",
                                        self.text_length
                                    )));
                                }
                                let p = SweepPoint {
                                    model: m.clone(),
                                    image: (it < grid * grid).then_some(is),
                                    image_tokens: it,
                                    text: (tt < self.text_length).then_some(ts),
                                    text_tokens: tt,
                                };
                                if !out.contains(&p) {
                                    out.push(p);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Checks every value; call after reading.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [("pretrain", &self.pretrain), ("finetune", &self.finetune)] {
            if p.steps == 0 || p.batch_size == 0 || !(p.base_lr.is_finite() && p.base_lr > 0.0) {
                return Err(Error::Config(format!(
                    "[{name}]: steps, batch_size and base_lr must be positive"
                )));
            }
        }
        if self.text_length < 3 {
            return Err(Error::Config("text_length must be at least 3".into()));
        }
        if let SweepData::FashionMnist {
            eval_images: Some(0),
            ..
        } = self.data
        {
            return Err(Error::Config("data.eval_images must be positive".into()));
        }
        // Every model's tokenizer, before any point trains.
        for point in self.points()? {
            let model = crate::model::ClipConfig::preset(&point.model)?;
            crate::data::tokenizer::Tokenizer::for_text(&model.text, self.vocab.as_deref())
                .map_err(|e| Error::Config(format!("model {}: {e}", point.model)))?;
        }
        Ok(())
    }
}

/// One point of the sweep: a model and its pre-training token counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Model preset.
    pub model: String,
    /// How image tokens are removed; `None` at the full count.
    pub image: Option<ImageStrategy>,
    /// Image tokens kept in pre-training.
    pub image_tokens: usize,
    /// How captions are cut; `None` at the full length.
    pub text: Option<TextReduction>,
    /// Text tokens in pre-training.
    pub text_tokens: usize,
}

impl SweepPoint {
    /// A folder-safe name, unique in the sweep: `scale-w64_i16-resize_t8-syntax`.
    pub fn id(&self) -> String {
        let i = self.image.map_or("full", ImageStrategy::as_str);
        let t = self.text.map_or("full", TextReduction::as_str);
        format!(
            "{}_i{}-{i}_t{}-{t}",
            self.model, self.image_tokens, self.text_tokens
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_strategy_keeps_exactly_the_tokens_asked_for() {
        // 32 px, patch 4: an 8×8 grid.
        for s in ImageStrategy::ALL {
            let r = s.reduction(16, 8, 4).unwrap();
            let kept = match r.mask() {
                Some(m) => m.kept((8, 8)),
                None => {
                    let g = r.image_size(32) as usize / 4;
                    g * g
                }
            };
            assert_eq!(kept, 16, "{s:?} → {r}");
            assert_eq!(s.reduction(64, 8, 4).unwrap(), ImageReduction::None);
        }
        assert_eq!(
            ImageStrategy::Resize.reduction(4, 8, 4).unwrap(),
            ImageReduction::Resize { size: 8 }
        );
        assert_eq!(
            ImageStrategy::Grid.reduction(4, 8, 4).unwrap().to_string(),
            "grid:4"
        );
        // 12 is not square, and no k×k window keeps 12 of 64.
        assert!(ImageStrategy::Resize.reduction(12, 8, 4).is_err());
        assert!(ImageStrategy::Grid.reduction(12, 8, 4).is_err());
        assert_eq!(
            ImageStrategy::Random
                .reduction(12, 8, 4)
                .unwrap()
                .mask()
                .unwrap()
                .kept((8, 8)),
            12
        );
        assert!(ImageStrategy::Random.reduction(65, 8, 4).is_err());
        assert!(ImageStrategy::Random.reduction(0, 8, 4).is_err());
    }

    #[test]
    fn cpu_preset_is_twenty_one_distinct_points() {
        let cfg = SweepConfig::preset("cpu").unwrap();
        cfg.validate().unwrap();
        let points = cfg.points().unwrap();
        // 3 sizes × (64, 16, 4 image) + 3 × (8, 4 text) + 3 masks + 3 text
        // strategies at the middle size; the full-length points are shared.
        assert_eq!(points.len(), 9 + 6 + 3 + 3, "{points:#?}");
        let ids: Vec<String> = points.iter().map(SweepPoint::id).collect();
        assert!(ids.contains(&"scale-w64_i64-full_t16-full".to_string()));
        assert!(ids.contains(&"scale-w64_i16-grid_t16-full".to_string()));
        assert!(ids.contains(&"scale-w128_i64-full_t4-syntax".to_string()));
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn presets_round_trip_and_bad_values_are_named() {
        for name in PRESETS {
            let cfg = SweepConfig::preset(name).unwrap();
            let back = SweepConfig::from_toml(&cfg.to_toml(), "s.toml".as_ref()).unwrap();
            assert_eq!(back, cfg, "{name}");
        }
        assert!(SweepConfig::preset("gpu-xl").is_err());
        let mut cfg = SweepConfig::preset("tiny").unwrap();
        cfg.grids[0].text_tokens = vec![32];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("text tokens 32"), "{err}");
        let mut cfg = SweepConfig::preset("tiny").unwrap();
        cfg.grids[0].models = vec!["clipa-h14".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("patch size 14"), "{err}");
        let text = SweepConfig::preset("tiny")
            .unwrap()
            .to_toml()
            .replace("seed = 0", "seed = 0\nsed = 1");
        let err = SweepConfig::from_toml(&text, "s.toml".as_ref())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sed"), "{err}");
    }
}
