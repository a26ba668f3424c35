//! Data: sources (WebDataset shards, CSV/TSV, image folders, the built-in
//! synthetic set), decoding and augmentation, the CLIP and WordPiece
//! tokenizers, and the parallel loader that feeds training.
//!
//! The pieces meet at two types: a [`ShardSource`] splits a dataset into
//! shards that workers open independently, and each shard yields
//! [`RawSample`]s. Bad data never stops a run: it is skipped and counted in
//! [`DataStats`].

pub mod augment;
pub mod benchmark;
pub mod brace;
pub mod csv;
pub mod fmnist;
pub mod folder;
pub mod loader;
pub mod part;
pub mod shards;
pub mod synthetic;
pub mod tokenizer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::Result;

/// Opens an image–caption dataset: a `.csv`/`.tsv` file (columns named by
/// `img_key` and `caption_key`) or WebDataset shards (`/d/{000..009}.tar`,
/// `::`-joined sources with optional `weights`).
pub fn open_caption_source(
    spec: &str,
    weights: Option<&str>,
    img_key: &str,
    caption_key: &str,
) -> Result<Arc<dyn ShardSource>> {
    let lower = spec.to_ascii_lowercase();
    Ok(if lower.ends_with(".csv") || lower.ends_with(".tsv") {
        Arc::new(csv::CsvDataset::open(
            Path::new(spec),
            &csv::CsvOptions {
                img_key: img_key.into(),
                caption_key: caption_key.into(),
                ..csv::CsvOptions::default()
            },
        )?)
    } else {
        Arc::new(shards::WebDataset::from_spec(spec, weights)?)
    })
}

/// The image of a [`RawSample`] as its source delivers it.
#[derive(Debug, Clone)]
pub enum ImagePayload {
    /// Encoded file bytes (JPEG, PNG, WebP), decoded by a loader worker.
    Encoded(Vec<u8>),
    /// Pixels a source generated itself (the synthetic set, IDX files).
    Decoded(image::RgbImage),
}

/// One image–caption pair before decoding and augmentation.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// Where the sample came from (`shard.tar/000123`, a file path), for
    /// bad-data reports.
    pub key: String,
    /// The image.
    pub image: ImagePayload,
    /// The caption, or the class name for classification folders.
    pub caption: String,
    /// The class index for classification data, `None` for captions.
    pub label: Option<usize>,
}

/// A dataset divided into shards that loader workers open independently.
///
/// Shard `i` must yield the same samples in the same order every time it is
/// opened: determinism and resume rest on it.
pub trait ShardSource: Send + Sync {
    /// Number of shards in one pass over the data.
    fn num_shards(&self) -> usize;
    /// A short name of shard `i` for logs and error messages.
    fn shard_name(&self, i: usize) -> String;
    /// Opens shard `i`. Bad samples inside it are skipped and counted in
    /// `stats`; an unreadable shard is an `Err`, which the loader counts and
    /// skips. The iterator borrows `stats` too, because bad samples are
    /// only found (and counted) as it advances; an implementation that does
    /// not need `stats` may still write the elided `-> ... + '_` form.
    fn open<'a>(
        &'a self,
        i: usize,
        stats: &'a DataStats,
    ) -> Result<Box<dyn Iterator<Item = RawSample> + Send + 'a>>;

    /// One shard drawn with replacement (`--dataset-resampled`); uniform
    /// unless a source weights its shards.
    fn draw_shard(&self, rng: &mut crate::rng::Rng) -> usize {
        rng.below(self.num_shards())
    }
}

/// Counters of good and bad data, shared by all loader workers.
#[derive(Debug, Default)]
pub struct DataStats {
    /// Good samples read: counted when read, as bad ones are, so that the
    /// two share a base; a sample whose image then fails to decode moves
    /// to `bad_images`.
    pub samples: AtomicU64,
    /// Images that failed to decode.
    pub bad_images: AtomicU64,
    /// Samples with an empty or missing caption (a missing or bad class
    /// label, in labelled shards), or missing image.
    pub bad_captions: AtomicU64,
    /// Shards that could not be opened or ended early (truncated tar).
    pub bad_shards: AtomicU64,
    /// The shards already warned about ([`DataStats::warn_shard`]).
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A plain copy of [`DataStats`] for reports and the run summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStatsSnapshot {
    /// Good samples read.
    pub samples: u64,
    /// Images that failed to decode.
    pub bad_images: u64,
    /// Samples with an empty or missing caption, or missing image.
    pub bad_captions: u64,
    /// Shards that could not be opened or ended early.
    pub bad_shards: u64,
}

impl DataStats {
    /// Adds one to `counter` (one of this struct's fields).
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Warns about bad shard `shard` once: a shard met again (every epoch,
    /// by every worker) is counted in `bad_shards` but not warned about
    /// again, and the message loses the control characters and the length
    /// that a corrupt tar header's bytes bring into it.
    pub fn warn_shard(&self, shard: &str, message: &str) {
        let first = self
            .warned
            .lock()
            .map_or(true, |mut seen| seen.insert(shard.to_string()));
        if first {
            tracing::warn!(
                "{}: {} (a shard warns once; the run's report counts bad shards)",
                printable(shard),
                printable(message)
            );
        }
    }

    /// The current counts.
    pub fn snapshot(&self) -> DataStatsSnapshot {
        DataStatsSnapshot {
            samples: self.samples.load(Ordering::Relaxed),
            bad_images: self.bad_images.load(Ordering::Relaxed),
            bad_captions: self.bad_captions.load(Ordering::Relaxed),
            bad_shards: self.bad_shards.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::AddAssign for DataStatsSnapshot {
    fn add_assign(&mut self, o: Self) {
        self.samples += o.samples;
        self.bad_images += o.bad_images;
        self.bad_captions += o.bad_captions;
        self.bad_shards += o.bad_shards;
    }
}

impl DataStatsSnapshot {
    /// Samples read, good and bad (each counted once; shards are not
    /// samples): the base of the bad share and of the report.
    pub fn read(&self) -> u64 {
        self.samples + self.bad_images + self.bad_captions
    }
}

/// The longest message [`printable`] keeps, in characters.
const PRINTABLE_MAX: usize = 200;

/// `text` safe for a terminal: control characters escaped (`\u{1b}`), cut
/// to [`PRINTABLE_MAX`] characters with `…`.
pub fn printable(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == PRINTABLE_MAX {
            out.push('…');
            break;
        }
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod printable_tests {
    use super::*;

    /// Control characters are escaped and long text is cut.
    #[test]
    fn control_characters_are_escaped_and_long_text_cut() {
        assert_eq!(printable("a\u{1b}[31mb\0"), "a\\u{1b}[31mb\\u{0}");
        let long = "x".repeat(500);
        let cut = printable(&long);
        assert_eq!(cut.chars().count(), PRINTABLE_MAX + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(printable("plain text"), "plain text");
    }
}
