//! What a training step holds in memory at its peak, estimated from the
//! config before the first step, against what the device has: a batch too
//! large for the machine is a one-line error naming the estimate and what
//! to lower, where it grew until the system killed the run.
//!
//! The estimate is a lower bound (float32 throughout, only what the
//! backward must keep), so a run it refuses could not have fitted; a run it
//! lets through may still be close.

use super::config::{StageConfig, TrainConfig};
use super::lit::{Frozen, first_trained_block};
use crate::model::ClipConfig;
use crate::{Error, Result};

/// A step's memory, by kind, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepMemory {
    /// Weights, their gradients and AdamW's two moments: 16 bytes a
    /// parameter.
    pub weights: u64,
    /// The activations autodiff keeps for the backward.
    pub activations: u64,
    /// The batch: images as float32 pixels, captions as token ids.
    pub batch: u64,
}

impl StepMemory {
    /// All of it.
    pub fn total(&self) -> u64 {
        self.weights + self.activations + self.batch
    }
}

/// The estimate for `stage` of a run of `model`. Per token of each
/// transformer block the backward keeps at least the block's input, both
/// LayerNorm outputs, q, k and v, the attention output, the MLP's hidden
/// layer before and after its activation and its output: `9·width +
/// 2·mlp` floats. With per-block checkpointing only each block's input is
/// kept, plus one block's worth while it is recomputed.
///
/// A locked tower (`frozen`) keeps activations only for its trained blocks,
/// and its parameters are counted at 4 bytes (the weights alone; the
/// trained groups' gradients and moments are left out, to stay a lower
/// bound).
pub fn step_memory(
    model: &ClipConfig,
    stage: &StageConfig,
    grad_checkpointing: bool,
    frozen: Frozen,
) -> StepMemory {
    let batch = stage.batch_size as u64;
    let px = stage.image_reduction.image_size(stage.image_size) as u64;
    let grid = px / model.vision.patch_size.max(1) as u64;
    let patches = match stage.image_reduction.mask() {
        Some(mask) => mask.kept((grid as usize, grid as usize)) as u64,
        None => grid * grid,
    };
    let tower = |tokens: u64, width: usize, mlp: usize, layers: usize, lock: Option<usize>| {
        let trained = (layers - first_trained_block(layers, lock)) as u64;
        let (width, mlp) = (width as u64, mlp as u64);
        let block = tokens * (9 * width + 2 * mlp);
        let kept = match (grad_checkpointing, trained) {
            (_, 0) => 0,
            (true, n) => n * tokens * width + block,
            (false, n) => n * block,
        };
        4 * batch * kept
    };
    let (v, t) = (&model.vision, &model.text);
    let activations = tower(patches + 1, v.width, v.mlp_width, v.layers, frozen.image)
        + tower(
            stage.text_length as u64,
            t.width,
            t.mlp_width,
            t.layers,
            frozen.text,
        );
    let (vp, tp) = model.tower_params();
    let bytes = |params: u64, lock: Option<usize>| match lock {
        Some(_) => 4 * params,
        None => 16 * params,
    };
    StepMemory {
        weights: bytes(vp, frozen.image) + bytes(tp, frozen.text) + 16,
        activations,
        batch: batch * (4 * 3 * px * px + 8 * stage.text_length as u64),
    }
}

/// Checks every stage of `cfg`, split over `replicas` data-parallel
/// replicas (each holds the weights and its share of the batch), against
/// `available` bytes free to each replica: an error naming the first stage
/// that cannot fit, its estimate and what to lower.
pub fn check_fits(cfg: &TrainConfig, replicas: usize, available: u64) -> Result<()> {
    let model = cfg.model_config()?;
    let replicas = replicas.max(1) as u64;
    for stage in &cfg.stages {
        let mut need = step_memory(&model, stage, cfg.grad_checkpointing, cfg.lock.frozen());
        need.activations /= replicas;
        need.batch /= replicas;
        if need.total() > available {
            let gb = |b: u64| b as f64 / 1e9;
            let lower = match cfg.grad_checkpointing {
                true => "lower --batch-size (or the image size or text length)",
                false => {
                    "lower --batch-size (or the image size or text length), or pass --grad-checkpointing"
                }
            };
            return Err(Error::Config(format!(
                "stage '{}' needs at least {:.1} GB a step (activations {:.1}, weights and optimiser state {:.1}, batch {:.1}), more than the {:.1} GB free: {lower}",
                stage.name,
                gb(need.total()),
                gb(need.activations),
                gb(need.weights),
                gb(need.batch),
                gb(available)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny preset's estimate by hand, checkpointing's saving, and a
    /// batch of a million refused with the numbers in the message.
    #[test]
    fn the_estimate_counts_by_hand_and_refuses_what_cannot_fit() {
        let mut cfg = TrainConfig::preset("tiny").unwrap();
        let model = cfg.model_config().unwrap();
        let stage = cfg.stages[0].clone();
        let m = step_memory(&model, &stage, false, Frozen::default());
        let (v, t) = (&model.vision, &model.text);
        let grid = (stage.image_size as usize / v.patch_size) as u64;
        let per = |tokens: u64, w: usize, mlp: usize, layers: usize| {
            tokens * (9 * w as u64 + 2 * mlp as u64) * layers as u64
        };
        let floats = per(grid * grid + 1, v.width, v.mlp_width, v.layers)
            + per(stage.text_length as u64, t.width, t.mlp_width, t.layers);
        assert_eq!(m.activations, 4 * stage.batch_size as u64 * floats);
        assert_eq!(m.weights, 16 * model.num_params());
        let px = stage.image_size as u64;
        let batch = stage.batch_size as u64 * (12 * px * px + 8 * stage.text_length as u64);
        assert_eq!(m.batch, batch);
        assert!(step_memory(&model, &stage, true, Frozen::default()).activations < m.activations);
        // A locked image tower keeps no activations and no optimiser state.
        let lit = step_memory(
            &model,
            &stage,
            false,
            Frozen {
                image: Some(0),
                text: None,
            },
        );
        let (vp, _) = model.tower_params();
        assert_eq!(m.weights - lit.weights, 12 * vp);
        assert!(lit.activations < m.activations);

        assert!(check_fits(&cfg, 1, 1 << 40).is_ok());
        cfg.stages[0].batch_size = 1_000_000;
        let err = check_fits(&cfg, 1, 16 << 30).unwrap_err().to_string();
        assert!(
            err.contains("needs at least") && err.contains("--batch-size"),
            "{err}"
        );
    }
}
