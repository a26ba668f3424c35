//! Image token reduction (CLIPA §3.1, Fig. 2 "image" strategies; CLIPA-v2
//! report Table 2 for the mask-ratio ablation).
//!
//! Patches are numbered row-major over the `[grid_h, grid_w]` patch grid,
//! without CLS (the tower always keeps CLS). A mask returns the kept patch
//! indices sorted ascending, so the kept tokens stay in image order. The
//! number kept depends only on the strategy and the grid, never on the
//! draw, so a batch stacks into one `[batch, kept]` index tensor.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::IMAGE_STREAM;
use crate::rng::Rng;
use crate::{Error, Result};

/// One image-masking strategy: how many patches it keeps and which.
pub trait PatchMask {
    /// Patches kept out of a `grid` = `(rows, cols)` patch grid.
    fn kept(&self, grid: (usize, usize)) -> usize;
    /// One draw: `kept(grid)` distinct patch indices, ascending.
    fn draw(&self, grid: (usize, usize), rng: &mut Rng) -> Vec<usize>;
}

/// Random masking (CLIPA §3.1; FLIP; JAX `models/vit.py::random_masking`;
/// OpenCLIP `PatchDropout`): keep a uniformly random subset of
/// `⌊L·(1−r)⌋` of the `L` patches (at least one), drawn per sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomMask {
    /// Fraction of patches dropped, `0 ≤ r < 1`.
    pub ratio: f64,
}

impl PatchMask for RandomMask {
    fn kept(&self, (h, w): (usize, usize)) -> usize {
        let l = h * w;
        ((l as f64 * (1.0 - self.ratio)).floor() as usize).clamp(1, l)
    }

    fn draw(&self, grid: (usize, usize), rng: &mut Rng) -> Vec<usize> {
        rng.choose_sorted(grid.0 * grid.1, self.kept(grid))
    }
}

/// Grid masking (CLIPA §3.1: "preserve one patch in each 2×2 grid window";
/// no public code, so this is our definition).
///
/// The grid is tiled from the top-left by `k×k` windows. Each full window
/// keeps `per_window` patches (default 1), at positions drawn uniformly
/// inside the window, independently per window and per sample; so the kept
/// patches cover the whole image and the keep fraction is `per_window/k²`
/// (k=2: 25 %, 50 % or 75 %). Other ratios are not expressible: pick the
/// nearest `per_window/k²`.
///
/// When `k` does not divide the grid, the last row/column of windows is
/// partial with area `a < k²`; such a window keeps
/// `max(1, round(per_window·a/k²))` patches, so coverage still holds and
/// the keep fraction stays close to `per_window/k²`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridMask {
    /// Window side `k ≥ 2`.
    pub window: usize,
    /// Patches kept per full window, `1 ≤ per_window < k²`.
    pub per_window: usize,
}

impl GridMask {
    /// The windows as `(row0, col0, rows, cols)`, row-major.
    fn windows(
        &self,
        (h, w): (usize, usize),
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let k = self.window;
        (0..h.div_ceil(k)).flat_map(move |i| {
            (0..w.div_ceil(k)).map(move |j| {
                let (r0, c0) = (i * k, j * k);
                (r0, c0, k.min(h - r0), k.min(w - c0))
            })
        })
    }

    /// Patches kept in a window of `area` cells.
    fn keep_in(&self, area: usize) -> usize {
        let k2 = self.window * self.window;
        if area == k2 {
            self.per_window
        } else {
            ((self.per_window * area) as f64 / k2 as f64)
                .round()
                .max(1.0) as usize
        }
        .min(area)
    }
}

impl PatchMask for GridMask {
    fn kept(&self, grid: (usize, usize)) -> usize {
        self.windows(grid)
            .map(|(_, _, r, c)| self.keep_in(r * c))
            .sum()
    }

    fn draw(&self, grid: (usize, usize), rng: &mut Rng) -> Vec<usize> {
        let mut kept = Vec::with_capacity(self.kept(grid));
        for (r0, c0, rows, cols) in self.windows(grid) {
            for cell in rng.choose_sorted(rows * cols, self.keep_in(rows * cols)) {
                kept.push((r0 + cell / cols) * grid.1 + c0 + cell % cols);
            }
        }
        kept.sort_unstable();
        kept
    }
}

/// Block masking (CLIPA §3.1: "keep a single block and remove other
/// patches"; no public code, so this is our definition).
///
/// Keeps one axis-aligned rectangle of `bh×bw` patches and drops all
/// others. The shape is fixed by the grid and the ratio: among all
/// rectangles that fit, the one whose area is closest to `L·(1−r)`,
/// ties broken towards the squarest, then the wider. Its top-left corner is
/// uniform over all positions where it fits, drawn per sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockMask {
    /// Fraction of patches dropped, `0 ≤ r < 1`.
    pub ratio: f64,
}

impl BlockMask {
    /// The block's `(rows, cols)` on a `(h, w)` grid.
    pub fn shape(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let target = (h * w) as f64 * (1.0 - self.ratio);
        let mut best = (1, 1);
        let mut best_key = (f64::INFINITY, usize::MAX, 0usize);
        for bh in 1..=h {
            for bw in 1..=w {
                let key = ((bh * bw) as f64 - target).abs();
                let squareness = bh.abs_diff(bw);
                let cand = (key, squareness, usize::MAX - bw);
                if cand.0 < best_key.0 - 1e-9
                    || ((cand.0 - best_key.0).abs() <= 1e-9
                        && (cand.1, cand.2) < (best_key.1, best_key.2))
                {
                    best = (bh, bw);
                    best_key = cand;
                }
            }
        }
        best
    }
}

impl PatchMask for BlockMask {
    fn kept(&self, grid: (usize, usize)) -> usize {
        let (bh, bw) = self.shape(grid);
        bh * bw
    }

    fn draw(&self, grid: (usize, usize), rng: &mut Rng) -> Vec<usize> {
        let (bh, bw) = self.shape(grid);
        let r0 = rng.below(grid.0 - bh + 1);
        let c0 = rng.below(grid.1 - bw + 1);
        (r0..r0 + bh)
            .flat_map(|r| (c0..c0 + bw).map(move |c| r * grid.1 + c))
            .collect()
    }
}

/// The image token reduction of a training stage (closed choice).
///
/// CLI and config spelling: `none`, `resize:112`, `random:0.75`, `grid:2`
/// (or `grid:2:2` for two kept per 2×2 window), `block:0.75`. The number
/// after `random` and `block` is the **mask ratio** (fraction dropped), as
/// in the paper, FLIP and OpenCLIP's `--force-patch-dropout`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ImageReduction {
    /// Every patch at the stage's image size.
    None,
    /// Train at a lower resolution (CLIPA's released models): the data
    /// pipeline resizes to `size` pixels, so the tower sees
    /// `(size/patch)²` patches. No mask is drawn.
    Resize {
        /// Image side in pixels.
        size: u32,
    },
    /// [`RandomMask`].
    Random(RandomMask),
    /// [`GridMask`].
    Grid(GridMask),
    /// [`BlockMask`].
    Block(BlockMask),
}

impl ImageReduction {
    /// The mask strategy, or `None` when every patch of the (possibly
    /// resized) image enters the tower.
    pub fn mask(&self) -> Option<&dyn PatchMask> {
        match self {
            Self::None | Self::Resize { .. } => None,
            Self::Random(m) => Some(m),
            Self::Grid(m) => Some(m),
            Self::Block(m) => Some(m),
        }
    }

    /// The image side the data pipeline produces: the resize target, or the
    /// stage's `image_size`.
    pub fn image_size(&self, stage_size: u32) -> u32 {
        match self {
            Self::Resize { size } => *size,
            _ => stage_size,
        }
    }

    /// Kept-patch indices for a batch, flattened `[batch, kept]`, with one
    /// independent draw per sample keyed by `(seed, step, first + i)`; or
    /// `None` when nothing is masked.
    pub fn keep_indices(
        &self,
        grid: (usize, usize),
        batch: usize,
        seed: u64,
        step: u64,
        first: u64,
    ) -> Option<(usize, Vec<i64>)> {
        let mask = self.mask()?;
        let kept = mask.kept(grid);
        let mut out = Vec::with_capacity(batch * kept);
        for i in 0..batch as u64 {
            let mut rng = Rng::keyed(&[seed, step, first + i, IMAGE_STREAM]);
            out.extend(mask.draw(grid, &mut rng).into_iter().map(|p| p as i64));
        }
        Some((kept, out))
    }

    /// Checks the parameters (ratios in `[0, 1)`, windows ≥ 2, …).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("image reduction {self}: {m}")));
        match *self {
            Self::None => Ok(()),
            Self::Resize { size: 0 } => bad("size must be positive".into()),
            Self::Random(RandomMask { ratio }) | Self::Block(BlockMask { ratio })
                if !(0.0..1.0).contains(&ratio) =>
            {
                bad("the mask ratio must be in [0, 1)".into())
            }
            Self::Grid(GridMask { window, per_window })
                if window < 2 || per_window == 0 || per_window >= window * window =>
            {
                bad(format!(
                    "needs window ≥ 2 and 1 ≤ kept per window < {}",
                    window * window
                ))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for ImageReduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Resize { size } => write!(f, "resize:{size}"),
            Self::Random(m) => write!(f, "random:{}", m.ratio),
            Self::Grid(GridMask {
                window,
                per_window: 1,
            }) => write!(f, "grid:{window}"),
            Self::Grid(m) => write!(f, "grid:{}:{}", m.window, m.per_window),
            Self::Block(m) => write!(f, "block:{}", m.ratio),
        }
    }
}

impl FromStr for ImageReduction {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let usage = || {
            Error::Config(format!(
                "image reduction `{s}`: expected none | resize:PX | random:RATIO | grid:K[:KEPT] | block:RATIO"
            ))
        };
        let mut parts = s.trim().split(':');
        let kind = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let num = |i: usize| -> Result<f64> {
            args.get(i).and_then(|a| a.parse().ok()).ok_or_else(usage)
        };
        let int = |i: usize| -> Result<usize> {
            args.get(i).and_then(|a| a.parse().ok()).ok_or_else(usage)
        };
        let parsed = match (kind, args.len()) {
            ("none" | "full", 0) => Self::None,
            ("resize", 1) => Self::Resize {
                size: int(0)? as u32,
            },
            ("random", 1) => Self::Random(RandomMask { ratio: num(0)? }),
            ("block", 1) => Self::Block(BlockMask { ratio: num(0)? }),
            ("grid", 1) => Self::Grid(GridMask {
                window: int(0)?,
                per_window: 1,
            }),
            ("grid", 2) => Self::Grid(GridMask {
                window: int(0)?,
                per_window: int(1)?,
            }),
            _ => return Err(usage()),
        };
        parsed.validate()?;
        Ok(parsed)
    }
}

impl TryFrom<String> for ImageReduction {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<ImageReduction> for String {
    fn from(r: ImageReduction) -> Self {
        r.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(mask: &dyn PatchMask, grid: (usize, usize), n: u64) -> Vec<Vec<usize>> {
        (0..n)
            .map(|i| mask.draw(grid, &mut Rng::keyed(&[7, i])))
            .collect()
    }

    fn assert_sorted_distinct_in_range(kept: &[usize], l: usize) {
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");
        assert!(kept.iter().all(|&p| p < l), "{kept:?}");
    }

    #[test]
    fn random_keeps_floor_count_uniformly() {
        let mask = RandomMask { ratio: 0.75 };
        assert_eq!(mask.kept((14, 14)), 49); // ⌊196·0.25⌋
        assert_eq!(mask.kept((7, 7)), 12); // ⌊49·0.25⌋ = 12
        assert_eq!(RandomMask { ratio: 0.3 }.kept((14, 14)), 137); // ⌊137.2⌋
        let n = 4000;
        let mut hits = vec![0usize; 16];
        for kept in draws(&mask, (4, 4), n) {
            assert_eq!(kept.len(), 4);
            assert_sorted_distinct_in_range(&kept, 16);
            kept.iter().for_each(|&p| hits[p] += 1);
        }
        // Each patch is kept with p = 1/4: 1000 expected, sd ≈ 27.
        for h in hits {
            assert!((h as i64 - 1000).abs() < 140, "{h}");
        }
    }

    #[test]
    fn grid_keeps_one_per_window_and_covers_the_image() {
        let mask = GridMask {
            window: 2,
            per_window: 1,
        };
        assert_eq!(mask.kept((14, 14)), 49);
        let mut hits = vec![0usize; 16];
        for kept in draws(&mask, (4, 4), 4000) {
            assert_eq!(kept.len(), 4);
            assert_sorted_distinct_in_range(&kept, 16);
            let mut windows: Vec<(usize, usize)> =
                kept.iter().map(|p| (p / 4 / 2, p % 4 / 2)).collect();
            windows.sort_unstable();
            assert_eq!(windows, [(0, 0), (0, 1), (1, 0), (1, 1)]);
            kept.iter().for_each(|&p| hits[p] += 1);
        }
        for h in hits {
            assert!(
                (h as i64 - 1000).abs() < 140,
                "position in window not uniform: {h}"
            );
        }
    }

    #[test]
    fn grid_handles_partial_windows_and_more_per_window() {
        // 5×5 with k=2: 4 full windows (1 each), 4 edge windows of area 2
        // (round(0.5) = 1 → rounds half away from zero), 1 corner of area 1.
        let mask = GridMask {
            window: 2,
            per_window: 1,
        };
        assert_eq!(mask.kept((5, 5)), 9);
        for kept in draws(&mask, (5, 5), 200) {
            assert_eq!(kept.len(), 9);
            assert!(
                kept.contains(&24),
                "the 1×1 corner window must keep its only patch"
            );
        }
        let half = GridMask {
            window: 2,
            per_window: 2,
        };
        assert_eq!(half.kept((4, 6)), 12);
        for kept in draws(&half, (4, 6), 100) {
            assert_eq!(kept.len(), 12);
            assert_sorted_distinct_in_range(&kept, 24);
        }
    }

    #[test]
    fn block_is_one_rectangle_with_the_nearest_area() {
        let mask = BlockMask { ratio: 0.75 };
        assert_eq!(mask.shape((14, 14)), (7, 7));
        assert_eq!(BlockMask { ratio: 0.5 }.shape((4, 4)), (2, 4)); // area 8 exactly, squarest, wider
        assert_eq!(BlockMask { ratio: 0.0 }.shape((3, 5)), (3, 5));
        let mut corners = vec![0usize; 4];
        for kept in draws(&BlockMask { ratio: 0.75 }, (4, 4), 4000) {
            assert_eq!(kept.len(), 4);
            let (r0, c0) = (kept[0] / 4, kept[0] % 4);
            let want: Vec<usize> = (r0..r0 + 2)
                .flat_map(|r| (c0..c0 + 2).map(move |c| r * 4 + c))
                .collect();
            assert_eq!(kept, want, "not one contiguous 2×2 block");
            if r0 % 2 == 0 && c0 % 2 == 0 {
                corners[r0 + c0 / 2] += 1; // (0,0)→0 (0,2)→1 (2,0)→2 (2,2)→3
            }
        }
        // 9 positions equally likely: each corner ≈ 444, sd ≈ 20.
        for c in corners {
            assert!((c as i64 - 444).abs() < 100, "{c}");
        }
    }

    #[test]
    fn batch_draws_are_seeded_and_differ_per_sample() {
        let red: ImageReduction = "random:0.5".parse().unwrap();
        let (kept, a) = red.keep_indices((8, 8), 4, 1, 10, 0).unwrap();
        assert_eq!(kept, 32);
        assert_eq!(a.len(), 4 * 32);
        assert_eq!(
            Some((kept, a.clone())),
            red.keep_indices((8, 8), 4, 1, 10, 0)
        );
        let rows: Vec<&[i64]> = a.chunks(kept).collect();
        assert!(
            rows.windows(2).all(|w| w[0] != w[1]),
            "samples share a mask"
        );
        assert_ne!(
            a,
            red.keep_indices((8, 8), 4, 1, 11, 0).unwrap().1,
            "steps share masks"
        );
        assert_ne!(
            a,
            red.keep_indices((8, 8), 4, 2, 10, 0).unwrap().1,
            "seeds share masks"
        );
        assert_eq!(
            ImageReduction::Resize { size: 112 }.keep_indices((7, 7), 2, 0, 0, 0),
            None
        );
    }

    #[test]
    fn parses_and_prints_the_cli_spelling() {
        for s in [
            "none",
            "resize:112",
            "random:0.75",
            "grid:2",
            "grid:2:3",
            "block:0.5",
        ] {
            let r: ImageReduction = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        for bad in [
            "",
            "random",
            "random:1.0",
            "grid:1",
            "grid:2:4",
            "block:x",
            "resize:0",
            "mask:0.5",
        ] {
            assert!(bad.parse::<ImageReduction>().is_err(), "{bad} parsed");
        }
        assert_eq!(ImageReduction::Resize { size: 112 }.image_size(224), 112);
        assert_eq!(ImageReduction::None.image_size(224), 224);
    }
}
