//! One training step, whole: forward, contrastive loss and backward (with
//! micro-batches and replicas, in [`super::grads`]), the global gradient
//! norm, a finite check, clipping, AdamW, and the temperature clamp. The
//! trainer, `clipa bench` and the criterion benches all run this function.

use std::time::Instant;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, DType, FloatDType, Tensor};

use super::batch::DeviceBatch;
use super::grads::loss_and_grads;
use super::lit::Frozen;
use super::optim::{AdamW, clip_factor};
use crate::dist::Replica;
use crate::host;
use crate::kernels::UpdateGuard;
use crate::loss::LossKind;
use crate::model::ClipModel;
use crate::{Error, Result};

/// The settings of a run that shape its steps.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    /// The contrastive loss.
    pub loss: LossKind,
    /// Micro-batches per step (OpenCLIP's cached-feature accumulation).
    pub accum_steps: usize,
    /// Per-block activation checkpointing.
    pub grad_checkpointing: bool,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// The locked parts of the towers (LiT).
    pub frozen: Frozen,
    /// Synchronise the device between the gradient and the update, so that
    /// [`StepStats::grads_secs`] and [`StepStats::optim_secs`] are times
    /// (`clipa bench`); a training run leaves the device queue alone.
    pub timed: bool,
}

impl StepConfig {
    /// A plain step with `loss`: one micro-batch, no checkpointing, no
    /// clipping, untimed.
    pub fn plain(loss: LossKind) -> Self {
        Self {
            loss,
            accum_steps: 1,
            grad_checkpointing: false,
            grad_clip: None,
            frozen: Frozen::default(),
            timed: false,
        }
    }
}

/// What one step did, on the device: nothing here is read to the host
/// until someone asks ([`StepStats::read`]), so a step never waits for
/// the device.
#[derive(Debug, Clone)]
pub struct StepStats<B: Backend> {
    /// The batch's loss `[1]`.
    pub loss: Tensor<B, 1>,
    /// The global gradient norm before clipping `[1]`.
    pub grad_norm: Tensor<B, 1>,
    /// `[1]`: whether the update was applied. A non-finite loss or gradient
    /// norm leaves every weight and moment as it was.
    pub applied: Tensor<B, 1, Bool>,
    /// Seconds of forward, loss and backward (with [`StepConfig::timed`]).
    pub grads_secs: f64,
    /// Seconds of the update (with [`StepConfig::timed`]).
    pub optim_secs: f64,
}

/// [`StepStats`]' values on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepValues {
    /// The batch's loss.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the update was applied.
    pub applied: bool,
}

impl<B: Backend> StepStats<B> {
    /// The loss, gradient norm and finite check on the host: one read.
    pub fn read(&self) -> StepValues {
        read_all([self])[0]
    }
}

/// The values of several steps' stats on the host, in their order: one
/// read for all of them (the trainer's log window).
pub fn read_all<'a, B: Backend>(
    stats: impl IntoIterator<Item = &'a StepStats<B>>,
) -> Vec<StepValues> {
    let stats: Vec<&StepStats<B>> = stats.into_iter().collect();
    let n = stats.len();
    if n == 0 {
        return Vec::new();
    }
    let mut parts = Vec::with_capacity(3 * n);
    parts.extend(stats.iter().map(|s| s.loss.clone()));
    parts.extend(stats.iter().map(|s| s.grad_norm.clone()));
    parts.extend(stats.iter().map(|s| s.applied.clone().float()));
    let v = host::read(Tensor::cat(parts, 0)); // [3n]: losses, norms, applied
    (0..n)
        .map(|i| StepValues {
            loss: v[i],
            grad_norm: v[n + i],
            applied: v[2 * n + i] > 0.5,
        })
        .collect()
}

/// One optimiser step of `model` on `batch` at learning rate `lr`
/// (nanoGPT's loop body: loss, backward, clip, step). The finite check
/// and the clipping factor are decided on the device, so the step reads
/// nothing back to the host.
pub fn train_step<B: AutodiffBackend>(
    model: ClipModel<B>,
    opt: &mut AdamW<B::InnerBackend>,
    batch: &DeviceBatch<B>,
    lr: f64,
    cfg: &StepConfig,
    replica: &Replica<B>,
) -> Result<(ClipModel<B>, StepStats<B::InnerBackend>)> {
    let sync = |device: &B::Device| match cfg.timed {
        true => B::sync(device).map_err(|e| Error::Backend(format!("{e:?}"))),
        false => Ok(()),
    };
    let device = batch.ids.device();
    let t0 = Instant::now();
    // forward → loss → backward; the gradients are summed over micro-batches
    // and replicas, so the norm is the same on every replica.
    let (loss, grads) = loss_and_grads(
        &model,
        batch,
        cfg.loss,
        cfg.accum_steps,
        cfg.grad_checkpointing,
        cfg.frozen,
        replica,
    )?;
    let norm = opt.grad_norm(&model, &grads); // [1]
    sync(&device)?;
    let t1 = Instant::now();
    // finite check → clip → AdamW → clamp, each decided on the device
    let applied = finite(loss.clone()).bool_and(finite(norm.clone())); // [1]
    let scale = cfg.grad_clip.map(|max| clip_factor(norm.clone(), max));
    let guard = UpdateGuard::new(scale, applied.clone());
    let model = clamp_logit_scale(opt.step(lr, model, grads, &guard));
    sync(&device)?;
    let stats = StepStats {
        loss,
        grad_norm: norm,
        applied,
        grads_secs: (t1 - t0).as_secs_f64(),
        optim_secs: t1.elapsed().as_secs_f64(),
    };
    Ok((model, stats))
}

/// Whether `x` `[1]` is finite: |x| ≤ f32::MAX (in float32, whose largest
/// value a narrower type would round to ∞) is false for NaN and ±∞. Two
/// element-wise ops that fuse with the guard's others on a GPU, where
/// Burn's `is_finite` is five unfused launches.
fn finite<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1, Bool> {
    let x = match x.dtype() {
        DType::F32 => x,
        _ => x.cast(FloatDType::F32),
    };
    x.abs().lower_equal_elem(f32::MAX)
}

/// Keeps the temperature at most 100 (OpenCLIP clamps `logit_scale` to
/// `[0, ln 100]` after every step).
fn clamp_logit_scale<B: AutodiffBackend>(mut model: ClipModel<B>) -> ClipModel<B> {
    model.logit_scale = model
        .logit_scale
        .map(|t| Tensor::from_inner(t.inner().clamp(0.0, 100f32.ln())).require_grad());
    model
}
