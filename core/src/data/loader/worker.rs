//! One loader worker: reads its shard slots, shuffles them window by
//! window, decodes and augments, and sends samples to the batcher in its
//! own fixed order (see the parent module for the scheme).

use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use super::{Item, LoaderConfig, Shared, WorkerCursor};
use crate::data::augment::Augmenter;
use crate::data::{DataStats, RawSample, ShardSource};
use crate::rng::Rng;
use crate::{Error, Result};

/// Purposes of keyed streams, so that no two draws share a key.
const ORDER_KEY: u64 = u64::from_le_bytes(*b"order\0\0\0");
const DRAW_KEY: u64 = u64::from_le_bytes(*b"draw\0\0\0\0");
const SHUFFLE_KEY: u64 = u64::from_le_bytes(*b"shuffle\0");
const AUG_KEY: u64 = u64::from_le_bytes(*b"augment\0");

/// Pseudo-epochs (`num_shards` draws each) a resampled stream may yield
/// nothing before the loader gives up: one round of draws can miss the
/// few good shards of a mostly broken set (p ≈ e^-good), four rarely do.
const RESAMPLED_PASSES: u64 = 4;

/// Which shard each of a worker's slots reads.
struct Plan {
    seed: u64,
    worker: u64,
    workers: u64,
    shards: u64,
    resampled: bool,
    /// The shard permutation of the epoch last asked for.
    order: (u64, Vec<usize>),
}

impl Plan {
    fn epoch_of(&self, slot: u64) -> u64 {
        (self.worker + self.workers * slot) / self.shards
    }

    fn shard(&mut self, slot: u64, source: &dyn ShardSource) -> usize {
        let g = self.worker + self.workers * slot;
        if self.resampled {
            return source.draw_shard(&mut Rng::keyed(&[self.seed, g, DRAW_KEY]));
        }
        let epoch = g / self.shards;
        if self.order.0 != epoch || self.order.1.is_empty() {
            let mut perm: Vec<usize> = (0..self.shards as usize).collect();
            Rng::keyed(&[self.seed, epoch, ORDER_KEY]).shuffle(&mut perm);
            self.order = (epoch, perm);
        }
        self.order.1[(g % self.shards) as usize]
    }
}

/// The state of the slot being read.
enum Slot<'a> {
    /// Not opened yet: open it, then skip `read` samples.
    Pending,
    Open(Box<dyn Iterator<Item = RawSample> + Send + 'a>),
    /// Could not be opened.
    Failed,
}

/// What the reader produced.
enum Next {
    Sample(RawSample),
    /// The next slot belongs to another epoch than the window's.
    EpochEnd,
    /// The loader is stopping or has failed.
    Stop,
}

/// A worker's sequential view of its slots.
struct Reader<'a> {
    plan: Plan,
    source: &'a dyn ShardSource,
    shared: &'a Shared,
    id: usize,
    slot: u64,
    /// Samples read from the current slot (or to skip when it opens).
    read: u64,
    open: Slot<'a>,
    /// Epoch of the first slot and the epochs that count as complete from
    /// there (a resumed worker starts inside its first epoch).
    start_epoch: u64,
    partial_first: u64,
}

impl Reader<'_> {
    fn next(&mut self, window_epoch: Option<u64>) -> Next {
        loop {
            match &mut self.open {
                Slot::Open(samples) => {
                    let next = samples.next();
                    // Sources count bad captions (and missing images) as they
                    // read, so good samples are counted here, when read, and
                    // the share is judged on every read, not once a window.
                    if next.is_some() {
                        DataStats::bump(&self.shared.stats.samples);
                    }
                    if self.shared.check_bad("data") {
                        return Next::Stop;
                    }
                    match next {
                        Some(sample) => {
                            self.read += 1;
                            return Next::Sample(sample);
                        }
                        None => self.advance(),
                    }
                }
                Slot::Failed => self.advance(),
                Slot::Pending => {
                    let epoch = self.plan.epoch_of(self.slot);
                    if window_epoch.is_some_and(|e| e != epoch) {
                        return Next::EpochEnd;
                    }
                    if self.shared.stopping() || self.nothing_in_a_pass(epoch) {
                        return Next::Stop;
                    }
                    let shard = self.plan.shard(self.slot, self.source);
                    self.open = match self.source.open(shard, &self.shared.stats) {
                        Ok(mut samples) => {
                            // Resume: what the last run consumed is read, not decoded.
                            for _ in 0..self.read {
                                if samples.next().is_none() {
                                    break;
                                }
                                // The source counts the bad ones it passes
                                // again; the good ones count too, or the share
                                // would lean to the bad.
                                DataStats::bump(&self.shared.stats.samples);
                            }
                            Slot::Open(samples)
                        }
                        Err(err) => {
                            DataStats::bump(&self.shared.stats.bad_shards);
                            let name = self.source.shard_name(shard);
                            self.shared
                                .stats
                                .warn_shard(&name, &format!("skipped: {err}"));
                            if self.shared.check_bad(&name) {
                                return Next::Stop;
                            }
                            Slot::Failed
                        }
                    };
                }
            }
        }
    }

    fn advance(&mut self) {
        self.slot += 1;
        self.read = 0;
        self.open = Slot::Pending;
    }

    /// Records that this worker finished every epoch before `epoch`, and
    /// fails the run when all workers have done a whole pass (or
    /// [`RESAMPLED_PASSES`]) without delivering a single sample.
    fn nothing_in_a_pass(&self, epoch: u64) -> bool {
        let done = (epoch - self.start_epoch).saturating_sub(self.partial_first);
        let passes = &self.shared.passes;
        passes[self.id].fetch_max(done, std::sync::atomic::Ordering::Relaxed);
        let need = if self.plan.resampled {
            RESAMPLED_PASSES
        } else {
            1
        };
        let all_done = passes
            .iter()
            .all(|p| p.load(std::sync::atomic::Ordering::Relaxed) >= need);
        if all_done
            && !self
                .shared
                .delivered
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.shared.fail(Error::Format {
                path: self.source.shard_name(0).into(),
                reason: format!(
                    "no usable sample in {need} whole pass(es) over {} shards",
                    self.plan.shards
                ),
            });
            return true;
        }
        false
    }

    /// Up to `cap` samples from the current position, stopping at the end
    /// of the first sample's epoch; `None` when the loader stops.
    fn fill(&mut self, cap: usize) -> Option<(Vec<RawSample>, u64)> {
        let Next::Sample(first) = self.next(None) else {
            return None;
        };
        let epoch = self.plan.epoch_of(self.slot);
        let mut window = Vec::with_capacity(cap.min(4096));
        window.push(first);
        while window.len() < cap {
            match self.next(Some(epoch)) {
                Next::Sample(sample) => window.push(sample),
                Next::EpochEnd => break,
                Next::Stop => return None,
            }
        }
        Some((window, epoch))
    }
}

/// A worker thread's job.
pub(super) struct Worker {
    id: usize,
    plan: Plan,
    window: usize,
    cursor: WorkerCursor,
    augmenter: Augmenter,
    source: Arc<dyn ShardSource>,
    shared: Arc<Shared>,
    tx: SyncSender<Item>,
}

impl Worker {
    pub(super) fn new(
        id: usize,
        config: &LoaderConfig,
        shards: usize,
        cursor: WorkerCursor,
        source: Arc<dyn ShardSource>,
        shared: Arc<Shared>,
        tx: SyncSender<Item>,
    ) -> Self {
        let plan = Plan {
            seed: config.seed,
            worker: id as u64,
            workers: config.workers as u64,
            shards: shards as u64,
            resampled: config.resampled,
            order: (0, Vec::new()),
        };
        let augmenter = Augmenter::new(config.transform, config.image_size);
        Self {
            id,
            plan,
            window: config.shuffle_buffer,
            cursor,
            augmenter,
            source,
            shared,
            tx,
        }
    }

    pub(super) fn run(self) {
        let Worker {
            id,
            plan,
            window: cap,
            cursor,
            mut augmenter,
            source,
            shared,
            tx,
        } = self;
        let fresh = cursor.window == 0 && cursor.slot == 0 && cursor.skip == 0;
        let mut reader = Reader {
            start_epoch: plan.epoch_of(cursor.slot),
            partial_first: u64::from(!fresh),
            plan,
            source: &*source,
            shared: &shared,
            id,
            slot: cursor.slot,
            read: cursor.skip,
            open: Slot::Pending,
        };
        let (seed, id) = (reader.plan.seed, id as u64);
        let (mut window, mut taken) = (cursor.window, cursor.taken);
        loop {
            let (slot, skip) = (reader.slot, reader.read);
            let Some((mut samples, epoch)) = reader.fill(cap) else {
                return;
            };
            if shared.check_bad("data") {
                return;
            }
            Rng::keyed(&[seed, id, window, SHUFFLE_KEY]).shuffle(&mut samples);
            for (i, sample) in samples.into_iter().enumerate().skip(taken as usize) {
                if shared.stopping() {
                    return;
                }
                let i = i as u64;
                let cursor = WorkerCursor {
                    window,
                    slot,
                    skip,
                    taken: i + 1,
                    epoch,
                };
                let key = sample.key.clone();
                match prepare(
                    &mut augmenter,
                    sample,
                    cursor,
                    &mut Rng::keyed(&[seed, id, window, i, AUG_KEY]),
                ) {
                    Ok(item) => {
                        shared
                            .delivered
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        if tx.send(item).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        // Counted as good when read; it moves to the bad.
                        DataStats::bump(&shared.stats.bad_images);
                        shared
                            .stats
                            .samples
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!("skipping {key}: {err}");
                        if shared.check_bad(&key) {
                            return;
                        }
                    }
                }
            }
            window += 1;
            taken = 0;
        }
    }
}

/// Decodes and augments one sample.
fn prepare(
    augmenter: &mut Augmenter,
    sample: RawSample,
    cursor: WorkerCursor,
    rng: &mut Rng,
) -> Result<Item> {
    let mut pixels = vec![0u8; augmenter.output_len()];
    augmenter.apply_payload(sample.image, &sample.key, rng, &mut pixels)?;
    Ok(Item {
        pixels,
        caption: sample.caption,
        label: sample.label,
        key: sample.key,
        cursor,
    })
}
