//! The built-in synthetic caption dataset: coloured shapes of several kinds,
//! sizes and positions on varied backgrounds, each with a caption that
//! describes it ("a small red triangle at the top left").
//!
//! It is generated on the fly from the sample index, so it needs no files
//! and is identical on every machine. It is compositional on purpose: a
//! caption names colour, shape, size and position, and one (colour, shape)
//! pair per colour never appears in training. Zero-shot evaluation on those
//! held-out pairs can only score well if the model learnt colour and shape
//! as separate concepts (chance is one in [`NUM_CLASSES`]).

use image::{Rgb, RgbImage};

use super::{DataStats, ImagePayload, RawSample, ShardSource};
use crate::Result;
use crate::rng::Rng;

/// Colour words and their RGB values (saturated, far from the greys used
/// for backgrounds).
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 180, 40]),
    ("blue", [40, 70, 230]),
    ("yellow", [235, 215, 30]),
    ("purple", [140, 40, 190]),
    ("orange", [245, 130, 20]),
    ("cyan", [30, 210, 220]),
    ("pink", [250, 120, 190]),
];

/// The shapes drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// An axis-aligned filled square.
    Square,
    /// An upward filled triangle.
    Triangle,
    /// A plus sign.
    Cross,
    /// A ring (annulus).
    Ring,
}

/// Every shape, in class order.
pub const SHAPES: [Shape; 5] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Cross,
    Shape::Ring,
];

impl Shape {
    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
            Self::Cross => "cross",
            Self::Ring => "ring",
        }
    }

    /// Whether the point `(dx, dy)`, in units of the shape's half-size and
    /// relative to its centre, is inside.
    fn contains(self, dx: f32, dy: f32) -> bool {
        match self {
            Self::Circle => dx * dx + dy * dy <= 1.0,
            Self::Square => dx.abs() <= 0.85 && dy.abs() <= 0.85,
            // Apex at dy = -1, base at dy = +0.9.
            Self::Triangle => (-1.0..=0.9).contains(&dy) && dx.abs() <= (dy + 1.0) * 0.55,
            Self::Cross => {
                (dx.abs() <= 0.3 && dy.abs() <= 1.0) || (dy.abs() <= 0.3 && dx.abs() <= 1.0)
            }
            Self::Ring => (0.36..=1.0).contains(&(dx * dx + dy * dy)),
        }
    }
}

/// Size words and the shape's half-size as a fraction of the image side.
pub const SIZES: [(&str, f32); 2] = [("small", 0.14), ("large", 0.26)];

/// Position phrases and the shape centre as fractions of the image side.
pub const POSITIONS: [(&str, [f32; 2]); 5] = [
    ("top left", [0.27, 0.27]),
    ("top right", [0.73, 0.27]),
    ("bottom left", [0.27, 0.73]),
    ("bottom right", [0.73, 0.73]),
    ("center", [0.5, 0.5]),
];

/// Zero-shot classes: every (colour, shape) pair.
pub const NUM_CLASSES: usize = COLOURS.len() * SHAPES.len();

/// One drawn sample's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributes {
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`SIZES`].
    pub size: usize,
    /// Index into [`POSITIONS`].
    pub position: usize,
}

impl Attributes {
    /// The zero-shot class: `colour * SHAPES.len() + shape`.
    pub fn class(&self) -> usize {
        self.colour * SHAPES.len() + self.shape
    }

    /// The caption, e.g. "a small red triangle at the top left".
    pub fn caption(&self) -> String {
        let pos = POSITIONS[self.position].0;
        let at = if pos == "center" { "in the" } else { "at the" };
        format!(
            "a {} {} {} {at} {pos}",
            SIZES[self.size].0,
            COLOURS[self.colour].0,
            SHAPES[self.shape].name()
        )
    }
}

/// Whether a (colour, shape) pair is held out of training: one shape per
/// colour, rotating, so every colour and every shape is still seen in
/// training with other partners (8 of the 40 pairs).
pub fn is_held_out(colour: usize, shape: usize) -> bool {
    shape == colour % SHAPES.len()
}

/// The class names of the zero-shot task ("red circle", …), in class order.
pub fn class_names() -> Vec<String> {
    (0..NUM_CLASSES)
        .map(|c| {
            format!(
                "{} {}",
                COLOURS[c / SHAPES.len()].0,
                SHAPES[c % SHAPES.len()].name()
            )
        })
        .collect()
}

/// Zero-shot prompt templates (`{}` is the class name): every size and
/// position, so the class embedding is the mean over captions the model
/// could have seen, as CLIP's prompt ensembling does.
pub fn templates() -> Vec<String> {
    let mut out = Vec::new();
    for (size, _) in SIZES {
        for (pos, _) in POSITIONS {
            let at = if pos == "center" { "in the" } else { "at the" };
            out.push(format!("a {size} {{}} {at} {pos}"));
        }
    }
    out
}

/// Which part of the synthetic set to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training pairs: every (colour, shape) pair that is not held out.
    Train,
    /// Evaluation on held-out pairs only (the zero-shot test).
    HeldOut,
    /// Evaluation on pairs seen in training (fresh images).
    Seen,
}

/// The synthetic dataset as a [`ShardSource`]: `len` samples of `size`
/// pixels, in shards of [`SHARD_LEN`].
#[derive(Debug, Clone)]
pub struct SyntheticCaptions {
    /// Which pairs are drawn.
    pub split: Split,
    /// Samples in one pass.
    pub len: usize,
    /// Image side in pixels.
    pub size: u32,
    /// Seed of the generator (the split is mixed in, so splits differ).
    pub seed: u64,
}

/// Samples per shard.
pub const SHARD_LEN: usize = 1024;

impl SyntheticCaptions {
    /// A dataset of `len` samples.
    pub fn new(split: Split, len: usize, size: u32, seed: u64) -> Self {
        Self {
            split,
            len,
            size,
            seed,
        }
    }

    /// The attributes of sample `index` (uniform over the split's pairs,
    /// sizes and positions).
    pub fn attributes(&self, index: u64) -> Attributes {
        let mut rng = Rng::keyed(&[self.seed, self.split as u64, index, 0xA77]);
        loop {
            let a = Attributes {
                colour: rng.below(COLOURS.len()),
                shape: rng.below(SHAPES.len()),
                size: rng.below(SIZES.len()),
                position: rng.below(POSITIONS.len()),
            };
            let held = is_held_out(a.colour, a.shape);
            if held == (self.split == Split::HeldOut) {
                return a;
            }
        }
    }

    /// Sample `index`: its attributes, rendered, and its caption.
    pub fn sample(&self, index: u64) -> RawSample {
        let attrs = self.attributes(index);
        let mut rng = Rng::keyed(&[self.seed, self.split as u64, index, 0xD4A]);
        RawSample {
            key: format!("synthetic/{:?}/{index}", self.split),
            image: ImagePayload::Decoded(render(&attrs, self.size, &mut rng)),
            caption: attrs.caption(),
            label: Some(attrs.class()),
        }
    }
}

/// Draws `attrs` on a `size`×`size` background: a random mid-grey tint with
/// per-pixel noise; the shape jitters a little around its nominal position
/// and size; edges are antialiased with 4×4 supersampling.
pub fn render(attrs: &Attributes, size: u32, rng: &mut Rng) -> RgbImage {
    let s = size as f32;
    let base = rng.range(70.0, 170.0) as f32;
    let tint = [
        rng.range(-20.0, 20.0),
        rng.range(-20.0, 20.0),
        rng.range(-20.0, 20.0),
    ];
    let [cx, cy] = POSITIONS[attrs.position].1;
    let (cx, cy) = (
        (cx + rng.range(-0.05, 0.05) as f32) * s,
        (cy + rng.range(-0.05, 0.05) as f32) * s,
    );
    let half = SIZES[attrs.size].1 * s * rng.range(0.9, 1.1) as f32;
    let colour = COLOURS[attrs.colour].1;
    let shape = SHAPES[attrs.shape];
    let mut img = RgbImage::new(size, size);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let mut cover = 0.0f32;
        for sy in 0..4 {
            for sx in 0..4 {
                let dx = (x as f32 + (sx as f32 + 0.5) / 4.0 - cx) / half;
                let dy = (y as f32 + (sy as f32 + 0.5) / 4.0 - cy) / half;
                cover += shape.contains(dx, dy) as u8 as f32 / 16.0;
            }
        }
        let noise = rng.range(-12.0, 12.0) as f32;
        let mut out = [0u8; 3];
        for c in 0..3 {
            let bg = base + tint[c] as f32 + noise;
            out[c] = (bg * (1.0 - cover) + colour[c] as f32 * cover)
                .round()
                .clamp(0.0, 255.0) as u8;
        }
        *px = Rgb(out);
    }
    img
}

impl ShardSource for SyntheticCaptions {
    fn num_shards(&self) -> usize {
        self.len.div_ceil(SHARD_LEN)
    }

    fn shard_name(&self, i: usize) -> String {
        format!("synthetic:{:?}:{i}", self.split)
    }

    fn open(
        &self,
        i: usize,
        stats: &DataStats,
    ) -> Result<Box<dyn Iterator<Item = RawSample> + Send + '_>> {
        let _ = stats; // generated data is never bad
        let start = i * SHARD_LEN;
        let end = (start + SHARD_LEN).min(self.len);
        Ok(Box::new((start..end).map(move |k| self.sample(k as u64))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_and_classes_line_up() {
        let a = Attributes {
            colour: 0,
            shape: 2,
            size: 0,
            position: 0,
        };
        assert_eq!(a.caption(), "a small red triangle at the top left");
        assert_eq!(class_names()[a.class()], "red triangle");
        assert_eq!(templates()[0].replace("{}", "red triangle"), a.caption());
        assert_eq!(templates().len(), 10);
        let held: usize = (0..8)
            .flat_map(|c| (0..5).map(move |s| (c, s)))
            .filter(|&(c, s)| is_held_out(c, s))
            .count();
        assert_eq!(held, 8);
    }

    #[test]
    fn splits_respect_the_held_out_pairs() {
        let train = SyntheticCaptions::new(Split::Train, 500, 32, 1);
        let test = SyntheticCaptions::new(Split::HeldOut, 500, 32, 1);
        let mut seen_classes = std::collections::BTreeSet::new();
        for i in 0..500 {
            let a = train.attributes(i);
            assert!(!is_held_out(a.colour, a.shape));
            seen_classes.insert(a.class());
            let b = test.attributes(i);
            assert!(is_held_out(b.colour, b.shape));
        }
        assert_eq!(
            seen_classes.len(),
            NUM_CLASSES - 8,
            "every training pair appears"
        );
    }

    #[test]
    fn rendering_is_deterministic_and_puts_the_colour_where_the_caption_says() {
        let ds = SyntheticCaptions::new(Split::Train, 10, 32, 3);
        let a = ds.sample(4);
        let b = ds.sample(4);
        let (ImagePayload::Decoded(ia), ImagePayload::Decoded(ib)) = (&a.image, &b.image) else {
            panic!("synthetic samples are decoded")
        };
        assert_eq!(ia, ib);
        assert_eq!(a.caption, b.caption);
        // A large blue square at the bottom right: its centre pixel is blue,
        // the opposite corner is background grey.
        let attrs = Attributes {
            colour: 2,
            shape: 1,
            size: 1,
            position: 3,
        };
        let img = render(&attrs, 32, &mut Rng::new(0));
        assert_eq!(img.get_pixel(23, 23).0, COLOURS[2].1);
        let corner = img.get_pixel(3, 3).0;
        let spread = corner.iter().max().unwrap() - corner.iter().min().unwrap();
        assert!(spread < 50, "background should be a near-grey: {corner:?}");
    }

    #[test]
    fn shards_cover_every_index_once() {
        let ds = SyntheticCaptions::new(Split::Seen, 2100, 8, 0);
        assert_eq!(ds.num_shards(), 3);
        let stats = DataStats::default();
        let n: usize = (0..3).map(|i| ds.open(i, &stats).unwrap().count()).sum();
        assert_eq!(n, 2100);
    }
}
