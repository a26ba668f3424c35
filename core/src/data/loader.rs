//! The parallel loader: shards → worker threads (read, shuffle, decode,
//! augment) → one batcher thread → a bounded queue of ready batches.
//!
//! The batch stream is a pure function of (source, config, start state),
//! whatever the thread timing, so runs repeat and resume exactly:
//! - Global shard slot `g = worker + workers·j` is worker `worker`'s `j`-th
//!   slot. Slot `g` lies in epoch `g / num_shards` and reads shard
//!   `perm_epoch[g % num_shards]` (a keyed shuffle per epoch, as
//!   WebDataset's shard shuffle), or with `resampled` a keyed draw weighted by the source.
//! - Each worker streams its slots through a shuffle window of
//!   `shuffle_buffer` samples (cut at epoch ends, so every epoch holds each
//!   sample once), permuted by a keyed rng; sample `i` of window `k` is
//!   augmented with `Rng::keyed([seed, worker, k, i, AUG])`.
//! - The batcher takes samples from the workers in a fixed round robin.
//! - [`LoaderState`] records, per worker, where its current window starts
//!   and how much of it was consumed; a resumed worker re-reads that window
//!   (part of one or two shards) and skips what was consumed, undecoded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::augment::{ImageTransform, TrainAugment};
use super::{DataStats, DataStatsSnapshot, ShardSource};
use crate::{Error, Result};

mod worker;

/// Everything that shapes the batch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Output side in pixels; images are `[size, size, 3]` u8.
    pub image_size: u32,
    /// Worker threads. Part of the stream's identity: changing it changes
    /// the order of samples (and a resume state must match it).
    pub workers: usize,
    /// Ready batches queued ahead of the trainer.
    pub prefetch: usize,
    /// Samples per worker shuffle window (1 = no sample shuffle).
    pub shuffle_buffer: usize,
    /// Seed of shard order, sample shuffle and augmentation.
    pub seed: u64,
    /// Draw shards with replacement instead of epoch permutations.
    pub resampled: bool,
    /// Augmentation or eval transform.
    pub transform: ImageTransform,
    /// Largest tolerated share of unusable samples and shards.
    pub max_bad_fraction: f64,
}

impl LoaderConfig {
    /// Training defaults for `batch_size` images of `image_size`²: CLIPA
    /// augmentation, 4 workers, 2 batches prefetched, a 1000-sample window.
    pub fn new(batch_size: usize, image_size: u32) -> Self {
        Self {
            batch_size,
            image_size,
            workers: 4,
            prefetch: 2,
            shuffle_buffer: 1000,
            seed: 0,
            resampled: false,
            transform: ImageTransform::Train(TrainAugment::default()),
            max_bad_fraction: 0.1,
        }
    }

    /// Rejects values the loader cannot run with.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("batch_size", self.batch_size),
            ("image_size", self.image_size as usize),
            ("workers", self.workers),
            ("prefetch", self.prefetch),
            ("shuffle_buffer", self.shuffle_buffer),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("loader {name} must be at least 1")));
        }
        if !(0.0..=1.0).contains(&self.max_bad_fraction) {
            return Err(Error::Config(format!(
                "max_bad_fraction {} must lie in 0..=1",
                self.max_bad_fraction
            )));
        }
        if let ImageTransform::Train(aug) = &self.transform {
            aug.validate()?;
        }
        Ok(())
    }
}

/// Where one worker stands: its current shuffle window and how much of it
/// the trainer has consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCursor {
    /// Index of the window (counts from 0 for this worker).
    pub window: u64,
    /// The worker-local slot in which the window starts.
    pub slot: u64,
    /// Samples of that slot's shard read before the window starts.
    pub skip: u64,
    /// Window entries consumed (delivered or found bad).
    pub taken: u64,
    /// Epoch of the window.
    pub epoch: u64,
}

/// The loader's position after a batch, small enough for every checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Seed of the stream (must match on resume).
    pub seed: u64,
    /// Shards of the source (must match on resume).
    pub num_shards: u64,
    /// Shuffle window size (must match on resume).
    pub shuffle_buffer: u64,
    /// Whether shards are drawn with replacement (must match on resume).
    pub resampled: bool,
    /// Batches delivered so far; the next batch's index.
    pub batches: u64,
    /// The worker that supplies the next sample.
    pub next_worker: usize,
    /// The oldest epoch a worker is still reading.
    pub epoch: u64,
    /// One cursor per worker.
    pub workers: Vec<WorkerCursor>,
}

impl LoaderState {
    /// The state before the first batch.
    fn fresh(config: &LoaderConfig, num_shards: usize) -> Self {
        let n = num_shards as u64;
        let w = config.workers as u64;
        Self {
            seed: config.seed,
            num_shards: n,
            shuffle_buffer: config.shuffle_buffer as u64,
            resampled: config.resampled,
            batches: 0,
            next_worker: 0,
            epoch: 0,
            workers: (0..w)
                .map(|i| WorkerCursor {
                    window: 0,
                    slot: 0,
                    skip: 0,
                    taken: 0,
                    epoch: i / n,
                })
                .collect(),
        }
    }

    /// Checks that a stored state belongs to this stream.
    fn check(&self, config: &LoaderConfig, num_shards: usize) -> Result<()> {
        let want = Self::fresh(config, num_shards);
        let same = (
            self.seed,
            self.num_shards,
            self.shuffle_buffer,
            self.resampled,
            self.workers.len(),
        ) == (
            want.seed,
            want.num_shards,
            want.shuffle_buffer,
            want.resampled,
            want.workers.len(),
        );
        if !same || self.next_worker >= config.workers {
            return Err(Error::Config(format!(
                "loader state (seed {}, {} shards, window {}, resampled {}, {} workers) does not match the data \
                 config (seed {}, {} shards, window {}, resampled {}, {} workers)",
                self.seed,
                self.num_shards,
                self.shuffle_buffer,
                self.resampled,
                self.workers.len(),
                want.seed,
                want.num_shards,
                want.shuffle_buffer,
                want.resampled,
                want.workers.len()
            )));
        }
        Ok(())
    }
}

/// One batch of augmented images with their captions.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Pixels, `[batch, size, size, 3]` u8, normalised on the device.
    pub images: Vec<u8>,
    /// Side of each image.
    pub size: u32,
    /// One caption per image.
    pub captions: Vec<String>,
    /// Class indices for classification data.
    pub labels: Vec<Option<usize>>,
    /// Sample keys, for reports.
    pub keys: Vec<String>,
    /// Batch number since the start of the run (continues across resumes).
    pub index: u64,
    /// The loader position after this batch, to store in checkpoints.
    pub state: LoaderState,
}

/// One decoded, augmented sample on its way from a worker to the batcher.
struct Item {
    pixels: Vec<u8>,
    caption: String,
    label: Option<usize>,
    key: String,
    cursor: WorkerCursor,
}

/// What the threads share.
struct Shared {
    stats: DataStats,
    stop: AtomicBool,
    fatal: Mutex<Option<Error>>,
    /// Per worker: epochs it has finished since the start, for the
    /// "a whole pass yielded nothing" check.
    passes: Vec<AtomicU64>,
    /// Whether any worker has handed a sample to the batcher: the
    /// `samples` count also holds samples read but not yet decoded.
    delivered: AtomicBool,
    max_bad_fraction: f64,
}

/// Samples (and shards) read before the bad share is judged. One broken
/// file among the first 32 is 3 %, well under the default 10 %, so it does
/// not stop a run; a set of a few dozen samples with much bad data still
/// stops before its first batch (a minimum above the set's size would let
/// a short run end first).
const MIN_ATTEMPTS: u64 = 32;

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.fatal.lock().map_or(true, |f| f.is_some())
    }

    /// Records the first fatal error; the batcher hands it to the trainer.
    fn fail(&self, err: Error) {
        if let Ok(mut slot) = self.fatal.lock()
            && slot.is_none()
        {
            *slot = Some(err);
        }
    }

    /// Fails the run when the bad share of what was read exceeds the
    /// configured maximum. Called on every read and every bad find, so the
    /// share is judged as soon as the counts change.
    fn check_bad(&self, place: &str) -> bool {
        let s = self.stats.snapshot();
        let bad = s.bad_images + s.bad_captions + s.bad_shards;
        let total = s.read() + s.bad_shards;
        if total >= MIN_ATTEMPTS && bad as f64 > self.max_bad_fraction * total as f64 {
            self.fail(Error::Format {
                path: place.into(),
                reason: format!(
                    "{bad} of {total} samples and shards were unusable ({} images, {} captions, {} shards), \
                     more than max_bad_fraction {}",
                    s.bad_images, s.bad_captions, s.bad_shards, self.max_bad_fraction
                ),
            });
            return true;
        }
        false
    }
}

/// A running loader. Dropping it stops and joins its threads.
pub struct Loader {
    batches: Option<Receiver<Result<Batch>>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    epoch: u64,
    failed: Option<String>,
}

/// How often a waiting batcher looks for a fatal error or a stop.
const POLL: Duration = Duration::from_millis(20);

impl Loader {
    /// Starts the workers and the batcher, from the beginning or from the
    /// `state` of a batch that a checkpoint stored.
    pub fn start(
        source: Arc<dyn ShardSource>,
        config: LoaderConfig,
        resume: Option<LoaderState>,
    ) -> Result<Self> {
        config.validate()?;
        let shards = source.num_shards();
        if shards == 0 {
            return Err(Error::Config("the dataset has no shards".into()));
        }
        let state = match resume {
            Some(state) => {
                state.check(&config, shards)?;
                state
            }
            None => LoaderState::fresh(&config, shards),
        };
        let shared = Arc::new(Shared {
            stats: DataStats::default(),
            stop: AtomicBool::new(false),
            fatal: Mutex::new(None),
            passes: (0..config.workers).map(|_| AtomicU64::new(0)).collect(),
            delivered: AtomicBool::new(false),
            max_bad_fraction: config.max_bad_fraction,
        });
        let per_worker = config.batch_size.div_ceil(config.workers);
        let mut threads = Vec::with_capacity(config.workers + 1);
        let mut inputs = Vec::with_capacity(config.workers);
        let spawn_err =
            |e: std::io::Error| Error::Config(format!("cannot start a loader thread: {e}"));
        for (id, cursor) in state.workers.iter().enumerate() {
            let (tx, rx) = sync_channel(per_worker);
            let job = worker::Worker::new(
                id,
                &config,
                shards,
                *cursor,
                Arc::clone(&source),
                Arc::clone(&shared),
                tx,
            );
            let handle = std::thread::Builder::new()
                .name(format!("clipa-loader-{id}"))
                .spawn(move || job.run());
            threads.push(handle.map_err(spawn_err)?);
            inputs.push(rx);
        }
        let (tx, rx) = sync_channel(config.prefetch);
        let batcher = Batcher {
            inputs,
            out: tx,
            shared: Arc::clone(&shared),
            state: state.clone(),
            config,
        };
        let handle = std::thread::Builder::new()
            .name("clipa-batcher".into())
            .spawn(move || batcher.run());
        threads.push(handle.map_err(spawn_err)?);
        Ok(Self {
            batches: Some(rx),
            shared,
            threads,
            epoch: state.epoch,
            failed: None,
        })
    }

    /// The next batch; blocks until it is ready. The stream is endless;
    /// it fails only on too much bad data or a pass that yields nothing.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let stopped = |why: &str| Error::Format {
            path: "data loader".into(),
            reason: why.to_string(),
        };
        let Some(rx) = &self.batches else {
            return Err(stopped("stopped"));
        };
        match rx.recv() {
            Ok(Ok(batch)) => {
                self.epoch = batch.state.epoch;
                Ok(batch)
            }
            Ok(Err(err)) => {
                self.failed = Some(err.to_string());
                Err(err)
            }
            Err(_) => Err(stopped(&format!(
                "stopped after: {}",
                self.failed.as_deref().unwrap_or("a worker died")
            ))),
        }
    }

    /// Counts of good and bad data so far (this process only).
    pub fn stats(&self) -> DataStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The oldest epoch still being read as of the last batch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Dropping the queue unblocks the batcher, whose exit unblocks the
        // workers' sends; everyone polls `stop` while reading.
        self.batches = None;
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// The thread that deals samples from the workers into batches in a fixed
/// round robin, so that batch content never depends on timing.
struct Batcher {
    inputs: Vec<Receiver<Item>>,
    out: SyncSender<Result<Batch>>,
    shared: Arc<Shared>,
    state: LoaderState,
    config: LoaderConfig,
}

impl Batcher {
    fn run(mut self) {
        loop {
            let batch = match self.assemble() {
                Ok(Some(batch)) => Ok(batch),
                Ok(None) => return,
                Err(err) => Err(err),
            };
            let failed = batch.is_err();
            if self.out.send(batch).is_err() || failed {
                self.shared.stop.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    /// One batch; `Ok(None)` when the loader is being dropped.
    fn assemble(&mut self) -> Result<Option<Batch>> {
        // Workers read ahead: a stop they found holds from the next batch,
        // not only once the samples already queued run out.
        if let Some(err) = self.shared.fatal.lock().ok().and_then(|mut f| f.take()) {
            return Err(err);
        }
        let (b, size) = (self.config.batch_size, self.config.image_size);
        let len = (size as usize).pow(2) * 3;
        let mut images = vec![0u8; b * len];
        let (mut captions, mut labels, mut keys) = (
            Vec::with_capacity(b),
            Vec::with_capacity(b),
            Vec::with_capacity(b),
        );
        for slot in images.chunks_exact_mut(len) {
            let w = self.state.next_worker;
            let item = loop {
                match self.inputs[w].recv_timeout(POLL) {
                    Ok(item) => break item,
                    Err(RecvTimeoutError::Timeout) if !self.shared.stopping() => continue,
                    Err(_) => {
                        let fatal = self.shared.fatal.lock().ok().and_then(|mut f| f.take());
                        return match fatal {
                            Some(err) => Err(err),
                            None if self.shared.stop.load(Ordering::Relaxed) => Ok(None),
                            None => Err(Error::Format {
                                path: "data loader".into(),
                                reason: format!("worker {w} died"),
                            }),
                        };
                    }
                }
            };
            slot.copy_from_slice(&item.pixels);
            captions.push(item.caption);
            labels.push(item.label);
            keys.push(item.key);
            self.state.workers[w] = item.cursor;
            self.state.next_worker = (w + 1) % self.inputs.len();
        }
        self.state.epoch = self
            .state
            .workers
            .iter()
            .map(|c| c.epoch)
            .min()
            .unwrap_or(0);
        let index = self.state.batches;
        self.state.batches += 1;
        Ok(Some(Batch {
            images,
            size,
            captions,
            labels,
            keys,
            index,
            state: self.state.clone(),
        }))
    }
}

#[cfg(test)]
mod tests;
