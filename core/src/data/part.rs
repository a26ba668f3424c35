//! One part of a dataset split across the machines of a run, as
//! OpenCLIP's `wds.split_by_node`: part `p` of `P` reads shards
//! `p, p + P, p + 2P, …`, so no machine opens another's shards and no
//! process decodes the global batch.
//!
//! Each part runs its own loader (with its own seed, see [`part_seed`]), and
//! a step's global batch is the parts' batches one after the other: part
//! `p` supplies global rows `p·B/P .. (p+1)·B/P`. The split is fixed by the
//! number of parts, not by the machines that read them, so a run read in 2
//! parts sees the same batches on two machines as on one (`--data-parts`).

use std::sync::Arc;

use super::{DataStats, RawSample, ShardSource};
use crate::rng::Rng;
use crate::{Error, Result};

/// Shards `part, part + parts, …` of `inner`. With resampling (shards drawn
/// with replacement, `--dataset-resampled`) every part draws from all
/// shards, as in OpenCLIP, and only its seed sets it apart.
pub struct Part {
    inner: Arc<dyn ShardSource>,
    part: usize,
    parts: usize,
    resampled: bool,
}

impl Part {
    /// Part `part` of `parts`. Fails when a part would get no shard: every
    /// machine needs one (OpenCLIP asserts the same).
    pub fn new(
        inner: Arc<dyn ShardSource>,
        part: usize,
        parts: usize,
        resampled: bool,
    ) -> Result<Self> {
        assert!(part < parts, "part {part} of {parts}");
        let shards = inner.num_shards();
        if !resampled && shards < parts {
            return Err(Error::Config(format!(
                "the training data has {shards} shard(s), fewer than the {parts} parts it is read in \
                 (one per node, or --data-parts): split it into at least {parts} shards"
            )));
        }
        Ok(Self {
            inner,
            part,
            parts,
            resampled,
        })
    }

    /// The index in `inner` of this part's shard `i`.
    fn shard(&self, i: usize) -> usize {
        if self.resampled {
            i
        } else {
            self.part + i * self.parts
        }
    }
}

/// The loader seed of part `part`: the run's seed for part 0 (so a run in
/// one part reads as it always did), a different stream for the others.
pub fn part_seed(seed: u64, part: usize) -> u64 {
    if part == 0 {
        seed
    } else {
        Rng::keyed(&[seed, part as u64, 0x7061_7274]).next_u64()
    }
}

impl ShardSource for Part {
    fn num_shards(&self) -> usize {
        let n = self.inner.num_shards();
        if self.resampled {
            n
        } else {
            // Shards `part, part + parts, …` below `n`.
            (n - self.part).div_ceil(self.parts)
        }
    }

    fn shard_name(&self, i: usize) -> String {
        self.inner.shard_name(self.shard(i))
    }

    fn open<'a>(
        &'a self,
        i: usize,
        stats: &'a DataStats,
    ) -> Result<Box<dyn Iterator<Item = RawSample> + Send + 'a>> {
        self.inner.open(self.shard(i), stats)
    }

    fn draw_shard(&self, rng: &mut Rng) -> usize {
        // Only called with resampling, where indices are the inner ones.
        self.inner.draw_shard(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{SHARD_LEN, Split, SyntheticCaptions};

    fn source(shards: usize) -> Arc<dyn ShardSource> {
        Arc::new(SyntheticCaptions::new(
            Split::Train,
            shards * SHARD_LEN - 7,
            8,
            1,
        ))
    }

    /// The parts cover every shard exactly once, each one every P-th.
    #[test]
    fn parts_split_the_shards_between_them() {
        let inner = source(10);
        for parts in [1, 2, 3, 4] {
            let mut seen = Vec::new();
            for p in 0..parts {
                let part = Part::new(inner.clone(), p, parts, false).unwrap();
                for i in 0..part.num_shards() {
                    let name = part.shard_name(i);
                    assert_eq!(name, inner.shard_name(p + i * parts));
                    seen.push(name);
                }
            }
            seen.sort();
            let mut all: Vec<_> = (0..10).map(|i| inner.shard_name(i)).collect();
            all.sort();
            assert_eq!(seen, all, "{parts} parts");
        }
    }

    /// A part's shard holds the inner shard's samples.
    #[test]
    fn a_part_opens_the_inner_shard() {
        let inner = source(5);
        let part = Part::new(inner.clone(), 1, 2, false).unwrap();
        let stats = DataStats::default();
        let first = |s: &dyn ShardSource, i| s.open(i, &stats).unwrap().next().unwrap();
        assert_eq!(first(&part, 1).caption, first(&*inner, 3).caption);
    }

    #[test]
    fn too_few_shards_for_the_parts_is_a_config_error() {
        let err = Part::new(source(3), 0, 4, false).err().unwrap().to_string();
        assert!(err.contains("3 shard(s), fewer than the 4 parts"), "{err}");
        // Resampled parts draw from every shard: no minimum.
        let part = Part::new(source(3), 3, 4, true).unwrap();
        assert_eq!(part.num_shards(), 3);
    }

    #[test]
    fn part_zero_keeps_the_run_seed() {
        assert_eq!(part_seed(42, 0), 42);
        assert_ne!(part_seed(42, 1), 42);
        assert_ne!(part_seed(42, 1), part_seed(42, 2));
    }
}
