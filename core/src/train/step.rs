//! One training step, whole: forward, contrastive loss and backward (with
//! micro-batches and replicas, in [`super::grads`]), the global gradient
//! norm, a finite check, clipping, AdamW, and the temperature clamp. The
//! trainer, `clipa bench` and the criterion benches all run this function.

use std::time::Instant;

use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use super::batch::DeviceBatch;
use super::grads::loss_and_grads;
use super::optim::{AdamW, clip_factor};
use crate::dist::Replica;
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
    /// Synchronise the device between the gradient and the update, so that
    /// [`StepStats::grads_secs`] and [`StepStats::optim_secs`] are times
    /// (`clipa bench`); a training run leaves the device queue alone.
    pub timed: bool,
}

/// What one step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// The batch's loss.
    pub loss: f64,
    /// The global gradient norm, before clipping.
    pub grad_norm: f64,
    /// Whether the update was applied: a non-finite loss or gradient norm
    /// leaves every weight as it was.
    pub applied: bool,
    /// Seconds of forward, loss and backward (with [`StepConfig::timed`]).
    pub grads_secs: f64,
    /// Seconds of the update (with [`StepConfig::timed`]).
    pub optim_secs: f64,
}

/// One optimiser step of `model` on `batch` at learning rate `lr`
/// (nanoGPT's loop body: loss, backward, clip, step).
pub fn train_step<B: AutodiffBackend>(
    model: ClipModel<B>,
    opt: &mut AdamW<B::InnerBackend>,
    batch: &DeviceBatch<B>,
    lr: f64,
    cfg: &StepConfig,
    replica: &Replica<B>,
) -> Result<(ClipModel<B>, StepStats)> {
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
        replica,
    )?;
    let norm = opt.grad_norm(&model, &grads);
    sync(&device)?;
    let t1 = Instant::now();
    // finite check → clip → AdamW → clamp
    let applied = loss.is_finite() && norm.is_finite();
    let model = match applied {
        true => clamp_logit_scale(opt.step(lr, model, grads, clip_factor(norm, cfg.grad_clip))),
        false => model,
    };
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

/// Keeps the temperature at most 100 (OpenCLIP clamps `logit_scale` to
/// `[0, ln 100]` after every step).
fn clamp_logit_scale<B: AutodiffBackend>(mut model: ClipModel<B>) -> ClipModel<B> {
    model.logit_scale = model
        .logit_scale
        .map(|t| Tensor::from_inner(t.inner().clamp(0.0, 100f32.ln())).require_grad());
    model
}
