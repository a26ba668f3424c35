//! Token reduction, the heart of CLIPA ("An Inverse Scaling Law for CLIP
//! Training", Li, Wang, Xie 2023, §3): the larger the encoders, the fewer
//! image and text tokens they need during pre-training.
//!
//! - Image strategies ([`ImageReduction`]) decide which patch tokens enter
//!   the vision tower. `Resize` lowers the resolution in the data pipeline;
//!   the masks produce per-sample kept-patch indices that the tower gathers
//!   right after the position embedding, so dropped tokens cost nothing
//!   (CLS is always kept by the tower).
//! - Text strategies ([`TextReduction`]) run in the batcher on token ids.
//!
//! Every draw is keyed by `(seed, step, sample index)` (see [`crate::rng`]),
//! so a resumed run draws exactly the masks of the uninterrupted run.
//! Evaluation never reduces tokens: it simply passes no keep indices.

pub mod image;
pub mod syntax;
pub mod text;

pub use image::{BlockMask, GridMask, ImageReduction, PatchMask, RandomMask};
pub use text::{TextReducer, TextReduction};

/// Stream tag of the image masks in `Rng::keyed(&[seed, step, sample, tag])`,
/// so image and text draws of one sample are independent.
pub const IMAGE_STREAM: u64 = 0x1A6E;
