//! `clipa bench`: times a training step (forward, loss, backward, AdamW
//! update) and an inference step for any model at any batch and token
//! counts, on any backend, so that a user can size a job before launching
//! it. Inputs are synthetic (the data loader has its own criterion bench);
//! masks and text reductions are drawn per step as the trainer draws them.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use crate::data::tokenizer::Tokenizer;
use crate::dist::Replica;
use crate::host;
use crate::model::{ClipConfig, ClipModel};
use crate::reduce::{ImageReduction, TextReducer, TextReduction};
use crate::train::batch::DeviceBatch;
use crate::train::lit::LockConfig;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::step::{StepConfig, train_step};
use crate::train::{LossKind, Precision};
use crate::{Error, Result};

/// One configuration to time.
#[derive(Debug, Clone)]
pub struct BenchCase {
    /// Label in the report (`img32`, `img32_pd0.75`, …).
    pub name: String,
    /// The model, at its full resolution and context.
    pub model: ClipConfig,
    /// The model's tokenizer, which turns the bench captions into ids.
    pub tokenizer: Tokenizer,
    /// Global batch.
    pub batch: usize,
    /// Image side before reduction.
    pub image_size: u32,
    /// Image token reduction.
    pub image_reduction: ImageReduction,
    /// Text tokens per caption after reduction.
    pub text_length: usize,
    /// How captions are cut to `text_length`.
    pub text_reduction: TextReduction,
    /// Micro-batches per step (cached-feature accumulation).
    pub accum_steps: usize,
    /// Block compute precision.
    pub precision: Precision,
    /// Per-block activation checkpointing.
    pub grad_checkpointing: bool,
    /// Locked towers (LiT): no gradient, no optimiser state; a tower locked
    /// whole runs without autodiff.
    pub lock: LockConfig,
}

impl BenchCase {
    /// Image side the model sees (after a `resize:` reduction).
    pub fn pixels(&self) -> usize {
        self.image_reduction.image_size(self.image_size) as usize
    }

    /// Patch tokens per image after reduction (CLS not counted).
    pub fn image_tokens(&self) -> usize {
        let g = self.pixels() / self.model.vision.patch_size;
        match self.image_reduction.mask() {
            Some(mask) => mask.kept((g, g)),
            None => g * g,
        }
    }

    /// FLOPs of one training step over the whole batch (3 × forward).
    pub fn train_flops(&self) -> u64 {
        self.model
            .flops(self.image_tokens(), self.text_length)
            .train()
            * self.batch as u64
    }

    /// Forward FLOPs of one inference step over the whole batch.
    pub fn infer_flops(&self) -> u64 {
        self.model
            .flops(self.image_tokens(), self.text_length)
            .forward()
            * self.batch as u64
    }
}

/// The cases of `shared/bench/README.md`, which OpenCLIP's peer benchmark
/// also runs: `bench-tiny` at batch 64.
pub fn peer_sweep() -> Result<Vec<BenchCase>> {
    let model = ClipConfig::bench_tiny();
    let base = BenchCase {
        name: String::new(),
        tokenizer: Tokenizer::for_text(&model.text, None)?,
        model,
        batch: 64,
        image_size: 32,
        image_reduction: ImageReduction::None,
        text_length: 32,
        text_reduction: TextReduction::Truncate,
        accum_steps: 1,
        precision: Precision::Auto,
        grad_checkpointing: false,
        lock: LockConfig::default(),
    };
    let case = |name: &str, image: &str, text_length: usize| -> Result<BenchCase> {
        Ok(BenchCase {
            name: name.into(),
            image_reduction: image.parse()?,
            text_length,
            ..base.clone()
        })
    };
    Ok(vec![
        case("img32", "none", 32)?,
        case("img16", "resize:16", 32)?,
        case("img32_pd0.75", "random:0.75", 32)?,
        case("img16_txt8", "resize:16", 8)?,
        case("img32_txt8", "none", 8)?,
    ])
}

/// What one case measured. Times are device-synchronised wall clock.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// The case's label.
    pub name: String,
    /// Median training step, ms.
    pub median_ms: f64,
    /// Fastest training step, ms.
    pub min_ms: f64,
    /// Slowest training step, ms.
    pub max_ms: f64,
    /// Images (pairs) per second at the median.
    pub images_per_s: f64,
    /// FLOPs of one training step, in GFLOP (the model's FLOP counter).
    pub train_gflop: f64,
    /// Achieved training TFLOP/s at the median.
    pub tflops: f64,
    /// Median of the step's first part: batch upload, forward, loss,
    /// backward and gradient collection, ms.
    pub grads_median_ms: f64,
    /// Median of the AdamW update over every parameter, ms. Scales with the
    /// parameter count, not the tokens: the fixed cost of a step.
    pub optim_median_ms: f64,
    /// Median inference step (both towers, no gradients), ms.
    pub infer_median_ms: f64,
    /// Inference images (pairs) per second at the median.
    pub infer_images_per_s: f64,
    /// Peak memory in MB (see [`BenchHooks::peak_memory`]); `None` where the
    /// backend cannot say.
    pub peak_mem_mb: Option<f64>,
    /// Reads from the device to the host inside a training step, mean over
    /// the timed steps (none log: 0 is the goal).
    pub host_syncs_per_step: f64,
    /// Device kernels one training step launches, mean over the timed
    /// steps; `None` on the CPU backend (no kernels) or where CubeCL's
    /// launch log could not be set up.
    pub kernels_per_step: Option<f64>,
    /// Image tokens per sample after reduction (CLS not counted).
    pub image_tokens: usize,
    /// Text tokens per sample.
    pub text_tokens: usize,
    /// Batch.
    pub batch: usize,
}

/// Backend-specific measurements the generic code cannot take.
pub trait BenchHooks {
    /// Starts a new peak-memory window.
    fn reset_peak_memory(&mut self);
    /// Peak memory in bytes since the last reset, if known.
    fn peak_memory(&mut self) -> Option<u64>;
    /// The device kernels launched so far, after the device has finished
    /// what was queued; `None` where the backend cannot count them (the
    /// CPU backend has no kernel launches).
    fn kernel_launches(&mut self) -> Option<u64> {
        None
    }
}

/// No backend measurements (the criterion benches, tests).
pub struct NoHooks;

impl BenchHooks for NoHooks {
    fn reset_peak_memory(&mut self) {}
    fn peak_memory(&mut self) -> Option<u64> {
        None
    }
}

/// Steps per measurement.
#[derive(Debug, Clone, Copy)]
pub struct BenchSteps {
    /// Untimed steps first (kernel compilation, allocator warm-up).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
}

/// The median of `xs` (sorted in place).
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Captions long enough for every text length and reduction.
fn captions(batch: usize) -> Vec<String> {
    const COLOURS: [&str; 5] = ["red", "green", "blue", "yellow", "white"];
    const THINGS: [&str; 5] = ["dog", "bicycle", "teapot", "sailboat", "guitar"];
    (0..batch)
        .map(|i| {
            format!(
                "a photo of a small {} {} standing next to an old wooden fence in a quiet \
                 green park on a bright sunny morning with tall trees and a few people walking \
                 their dogs along the winding path near the lake number {i}",
                COLOURS[i % 5],
                THINGS[(i / 5) % 5]
            )
        })
        .collect()
}

/// Device-synchronised times of one training step, seconds.
#[derive(Debug, Clone, Copy)]
pub struct StepTimes {
    /// Batch upload, forward, loss, backward and gradient collection.
    pub grads: f64,
    /// The AdamW update.
    pub optim: f64,
    /// Reads from the device to the host inside the step ([`crate::host`]).
    pub host_reads: u64,
    /// Device kernels the step launched, where the backend counts them.
    pub kernels: Option<u64>,
}

impl StepTimes {
    /// The whole step.
    pub fn total(&self) -> f64 {
        self.grads + self.optim
    }
}

/// A case made ready to time on one device: its model, optimiser and
/// inputs. `clipa bench` and the criterion benches both drive it.
pub struct BenchRun<B: AutodiffBackend> {
    case: BenchCase,
    device: B::Device,
    // `Option` so that a step can move the model through the optimiser.
    model: Option<ClipModel<B>>,
    opt: AdamW<B::InnerBackend>,
    tokenizer: Tokenizer,
    reducer: TextReducer,
    captions: Vec<String>,
    images: Vec<u8>, // [batch, px, px, 3]
}

/// `n` deterministic noise bytes: the bench's images, as a loader hands
/// them over (u8, normalised on the device).
fn noise_pixels(n: usize) -> Vec<u8> {
    (0..n as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

impl<B: AutodiffBackend> BenchRun<B> {
    /// Checks `case` and builds its model and inputs on `device`.
    pub fn new(case: &BenchCase, device: &B::Device) -> Result<Self> {
        if case.batch == 0 || case.accum_steps == 0 || !case.batch.is_multiple_of(case.accum_steps)
        {
            return Err(Error::Config(format!(
                "bench {}: batch {} must be a positive multiple of the accumulation steps {}",
                case.name, case.batch, case.accum_steps
            )));
        }
        let px = case.pixels();
        let patch = case.model.vision.patch_size;
        if px == 0 || !px.is_multiple_of(patch) {
            return Err(Error::Config(format!(
                "bench {}: image size {px} is not a multiple of the patch size {patch}",
                case.name
            )));
        }
        if case.text_length == 0 || case.text_length > case.model.text.context_length {
            return Err(Error::Config(format!(
                "bench {}: text length {} outside 1..={}",
                case.name, case.text_length, case.model.text.context_length
            )));
        }
        let model = case.model.init::<B>(device).resize(px, case.text_length);
        let (mut model, _) = case.lock.apply(model);
        model.set_compute_dtype(case.precision.compute_dtype::<B>(device)?);
        Ok(Self {
            case: case.clone(),
            device: device.clone(),
            model: Some(model),
            // The peer benchmark's AdamW: β = (0.9, 0.98), ε = 1e-6, decay 0.1.
            opt: AdamW::new(AdamWConfig {
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-6,
                weight_decay: 0.1,
            }),
            tokenizer: case.tokenizer.clone(),
            reducer: TextReducer::new(case.text_reduction, case.text_length),
            captions: captions(case.batch),
            images: noise_pixels(case.batch * px * px * 3),
        })
    }

    fn sync(&self) -> Result<()> {
        B::sync(&self.device).map_err(|e| Error::Backend(format!("{e:?}")))
    }

    /// The inputs of step `step`: masks and text reduction drawn per step,
    /// as the trainer draws them, and the pixels uploaded and normalised.
    fn batch(&self, step: u64) -> DeviceBatch<B> {
        let case = &self.case;
        let g = case.pixels() / case.model.vision.patch_size;
        let ids = self
            .reducer
            .apply_batch(&self.tokenizer, &self.captions, 0, step, 0);
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let keep = case
            .image_reduction
            .keep_indices((g, g), case.batch, 0, step, 0);
        DeviceBatch::from_host(
            &self.images,
            &ids,
            keep.as_ref().map(|(kept, idx)| (*kept, idx.as_slice())),
            0..case.batch,
            case.pixels(),
            &case.model.normalization,
            &self.device,
        )
    }

    /// One training step ([`train_step`]: forward, loss, backward, gradient
    /// norm, AdamW), timed between device syncs, its host reads and (with
    /// `hooks` that count them) kernel launches counted.
    pub fn train_step(&mut self, step: u64, hooks: &mut dyn BenchHooks) -> Result<StepTimes> {
        let model = self
            .model
            .take()
            .expect("the model is put back after every step");
        // Built before the clock starts, as the inference step and the peer
        // benchmark (which draws its batches up front) do: tokenising and
        // drawing masks is the loader's work, not the step's.
        let batch = self.batch(step);
        self.sync()?;
        let cfg = StepConfig {
            accum_steps: self.case.accum_steps,
            grad_checkpointing: self.case.grad_checkpointing,
            frozen: self.case.lock.frozen(),
            timed: true,
            ..StepConfig::plain(LossKind::Softmax)
        };
        let (launches, reads) = (hooks.kernel_launches(), host::reads());
        let (model, stats) =
            train_step(model, &mut self.opt, &batch, 1e-4, &cfg, &Replica::single())?;
        let host_reads = host::reads() - reads;
        let kernels = hooks.kernel_launches().zip(launches).map(|(b, a)| b - a);
        self.model = Some(model);
        // Read after the counts: the bench's own check, not the step's.
        if !stats.read().applied {
            return Err(Error::Backend(format!(
                "bench {}: non-finite loss at step {step}",
                self.case.name
            )));
        }
        Ok(StepTimes {
            grads: stats.grads_secs,
            optim: stats.optim_secs,
            host_reads,
            kernels,
        })
    }

    /// One inference step (both towers, no gradients), seconds.
    pub fn infer_step(&self, step: u64) -> Result<f64> {
        let inner = self
            .model
            .as_ref()
            .expect("the model is put back after every step")
            .valid();
        let batch = self.batch(step);
        self.sync()?;
        let t0 = Instant::now();
        let img = inner.encode_image(batch.images.inner(), batch.keep.map(Tensor::inner));
        let txt = inner.encode_text(batch.ids.inner());
        drop((img, txt));
        self.sync()?;
        Ok(t0.elapsed().as_secs_f64())
    }
}

/// Times `case` on `device`.
pub fn run_case<B: AutodiffBackend>(
    case: &BenchCase,
    steps: BenchSteps,
    device: &B::Device,
    hooks: &mut dyn BenchHooks,
) -> Result<BenchResult> {
    if steps.steps == 0 {
        return Err(Error::Config("bench: --steps must be positive".into()));
    }
    hooks.reset_peak_memory();
    let mut run = BenchRun::<B>::new(case, device)?;
    let mut times = Vec::with_capacity(steps.steps);
    let mut grad_times = Vec::with_capacity(steps.steps);
    let mut optim_times = Vec::with_capacity(steps.steps);
    let (mut reads, mut kernels) = (0, Some(0));
    for step in 0..(steps.warmup + steps.steps) as u64 {
        let t = run.train_step(step, hooks)?;
        if step as usize >= steps.warmup {
            times.push(t.total() * 1e3);
            grad_times.push(t.grads * 1e3);
            optim_times.push(t.optim * 1e3);
            reads += t.host_reads;
            kernels = kernels.zip(t.kernels).map(|(a, b)| a + b);
        }
    }
    let per_step = |n: u64| n as f64 / steps.steps as f64;
    let warmup = steps.warmup.min(2);
    let mut infer = Vec::with_capacity(steps.steps);
    for step in 0..(warmup + steps.steps) as u64 {
        let t = run.infer_step(step)?;
        if step as usize >= warmup {
            infer.push(t * 1e3);
        }
    }
    let peak = hooks.peak_memory();

    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max_ms = times.iter().copied().fold(0.0, f64::max);
    let median_ms = median(&mut times);
    let infer_median_ms = median(&mut infer);
    let train_flops = case.train_flops() as f64;
    Ok(BenchResult {
        name: case.name.clone(),
        median_ms,
        min_ms,
        max_ms,
        images_per_s: case.batch as f64 / (median_ms / 1e3),
        train_gflop: train_flops / 1e9,
        tflops: train_flops / (median_ms / 1e3) / 1e12,
        grads_median_ms: median(&mut grad_times),
        optim_median_ms: median(&mut optim_times),
        infer_median_ms,
        infer_images_per_s: case.batch as f64 / (infer_median_ms / 1e3),
        peak_mem_mb: peak.map(|b| b as f64 / 1e6),
        host_syncs_per_step: per_step(reads),
        kernels_per_step: kernels.map(per_step),
        image_tokens: case.image_tokens(),
        text_tokens: case.text_length,
        batch: case.batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;

    #[test]
    fn peer_sweep_counts_tokens_and_flops() {
        let cases = peer_sweep().unwrap();
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["img32", "img16", "img32_pd0.75", "img16_txt8", "img32_txt8"]
        );
        let tokens: Vec<(usize, usize)> = cases
            .iter()
            .map(|c| (c.image_tokens(), c.text_length))
            .collect();
        assert_eq!(tokens, [(64, 32), (16, 32), (16, 32), (16, 8), (64, 8)]);
        // Resize and masking to 16 tokens cost the same FLOPs.
        assert_eq!(cases[1].train_flops(), cases[2].train_flops());
        // img32 by hand: per pair, 2 × macs; vision 65 tokens, text 32.
        let blocks = |t: u64| 4 * (4 * t * 256 * 256 + 2 * t * t * 256 + 2 * t * 256 * 1024);
        let vision = 64 * 48 * 256 + blocks(65) + 256 * 256;
        let text = blocks(32) + 256 * 256;
        assert_eq!(cases[0].train_flops(), 3 * 2 * (vision + text) * 64);
    }

    #[test]
    fn a_tiny_case_runs_and_reports() {
        let device = Default::default();
        let case = BenchCase {
            name: "tiny".into(),
            model: ClipConfig::tiny(),
            tokenizer: Tokenizer::clip(),
            batch: 4,
            image_size: 32,
            image_reduction: "random:0.5".parse().unwrap(),
            text_length: 8,
            text_reduction: TextReduction::Random,
            accum_steps: 2,
            precision: Precision::F32,
            grad_checkpointing: true,
            lock: LockConfig::default(),
        };
        let steps = BenchSteps {
            warmup: 1,
            steps: 3,
        };
        let r = run_case::<TestBackend>(&case, steps, &device, &mut NoHooks).unwrap();
        assert_eq!((r.image_tokens, r.text_tokens, r.batch), (32, 8, 4));
        assert!(r.min_ms <= r.median_ms && r.median_ms <= r.max_ms, "{r:?}");
        assert!(r.min_ms > 0.0 && r.infer_median_ms > 0.0, "{r:?}");
        let want = r.train_gflop * 1e9 / (r.median_ms / 1e3) / 1e12;
        assert!((r.tflops - want).abs() <= 1e-9 * want, "{r:?}");
        assert_eq!(r.peak_mem_mb, None);
        let mut bad = case.clone();
        bad.text_length = 99;
        let err = run_case::<TestBackend>(&bad, steps, &device, &mut NoHooks).unwrap_err();
        assert!(err.to_string().contains("text length 99"), "{err}");
    }
}
