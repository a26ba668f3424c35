//! One AdamW update of one parameter: the kernel trait and its
//! composition. The optimiser itself (moments by path, checkpoints) is
//! [`crate::train::optim::AdamW`], which resolves its kernel once.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

/// The scalars of one AdamW update of one parameter, with the bias
/// corrections folded in (see [`adamw_composed`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// First-moment decay β₁.
    pub beta1: f64,
    /// Second-moment decay β₂.
    pub beta2: f64,
    /// The denominator's epsilon, ε·√(1 − β₂ᵗ).
    pub eps: f64,
    /// The step size, lr·√(1 − β₂ᵗ) / (1 − β₁ᵗ).
    pub step_size: f64,
    /// The weights' multiplier before the step: 1 − lr·wd (decoupled
    /// decay), exactly 1 where the parameter is not decayed.
    pub keep: f64,
}

/// [`AdamWScalars`] in float32, as Burn's scalar ops convert them: the
/// coefficients a kernel multiplies by, `1 − β` rounded once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWF32 {
    /// β₁.
    pub beta1: f32,
    /// 1 − β₁.
    pub one_minus_beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// 1 − β₂.
    pub one_minus_beta2: f32,
    /// The denominator's epsilon.
    pub eps: f32,
    /// The step size.
    pub step_size: f32,
    /// The weights' multiplier before the step.
    pub keep: f32,
}

impl AdamWScalars {
    /// The scalars in float32 ([`AdamWF32`]).
    pub fn to_f32(&self) -> AdamWF32 {
        AdamWF32 {
            beta1: self.beta1 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
            step_size: self.step_size as f32,
            keep: self.keep as f32,
        }
    }
}

/// What one step's updates depend on that only the device knows: the
/// clipping factor and the finite check, both `[1]` tensors, so that the
/// host never waits for the gradient norm.
#[derive(Debug, Clone)]
pub struct UpdateGuard<B: Backend> {
    /// The gradients' multiplier (the clipping factor) `[1]`; `None` when
    /// clipping is off.
    pub scale: Option<Tensor<B, 1>>,
    /// `[1]`: false leaves every parameter and moment as it was (a
    /// non-finite loss or gradient norm).
    pub apply: Tensor<B, 1, Bool>,
    /// `[scale (1 without clipping), apply (1 or 0)]`, `[2]`: both in one
    /// float tensor, packed once per step, for kernels that read them.
    pub packed: Tensor<B, 1>,
}

impl<B: Backend> UpdateGuard<B> {
    /// The guard of a step: `scale` (`None`: no clipping) and `apply`,
    /// both `[1]` on the device.
    pub fn new(scale: Option<Tensor<B, 1>>, apply: Tensor<B, 1, Bool>) -> Self {
        // [scale, apply] as e₀·scale + e₁·apply: element-wise ops that fuse
        // into one launch on a GPU, where a concatenation is several.
        let device = apply.device();
        let unit = |v: [f32; 2]| Tensor::<B, 1>::from_floats(v, &device);
        let apply_f = unit([0.0, 1.0]) * apply.clone().float(); // [2]
        let packed = match &scale {
            Some(s) => unit([1.0, 0.0]) * s.clone() + apply_f,
            None => unit([1.0, 0.0]) + apply_f,
        };
        Self {
            scale,
            apply,
            packed,
        }
    }

    /// An update that is applied, unscaled.
    pub fn always(device: &B::Device) -> Self {
        Self::new(None, Tensor::from_bool([true].into(), device))
    }
}

/// One parameter's share of an AdamW step: the parameter `w`, its gradient
/// `g` and its moments `m`, `v`, all flattened to `[numel]`, with the
/// scalars of its update (decay differs between parameters).
#[derive(Debug, Clone)]
pub struct AdamWSlot<B: Backend> {
    /// The parameter `[numel]`.
    pub w: Tensor<B, 1>,
    /// Its gradient `[numel]`, before the clipping factor.
    pub g: Tensor<B, 1>,
    /// The first moment `[numel]`.
    pub m: Tensor<B, 1>,
    /// The second moment `[numel]`.
    pub v: Tensor<B, 1>,
    /// The update's scalars.
    pub s: AdamWScalars,
}

/// The AdamW updates of every parameter of a step, computed by a backend's
/// own kernel ([`super::Kernels::adamw`]). [`adamw_composed`] builds one
/// parameter's update from Burn's element-wise ops, about 13 passes over
/// the parameter and its moments (each a separate kernel on a backend
/// without fusion) for each of a model's hundreds of parameter tensors; a
/// kernel does it in one pass, and may take many parameters per launch.
pub trait AdamWKernel<B: Backend>: Send + Sync {
    /// Returns the updated `[w, m, v]` of each slot, in the slots' order,
    /// as [`adamw_composed`] computes them: `g` scaled by `guard.scale`,
    /// and `w`, `m`, `v` returned as they were where `guard.apply` is false.
    fn update(&self, slots: Vec<AdamWSlot<B>>, guard: &UpdateGuard<B>) -> Vec<[Tensor<B, 1>; 3]>;
}

/// The AdamW update from Burn's element-wise ops, on any backend.
///
/// torch.optim.AdamW's step, lr/bc1 · m / (√v/√bc2 + ε), with the bias
/// corrections folded into two scalars (multiply through by √bc2):
/// lr·√bc2/bc1 · m / (√v + ε·√bc2). Identical in exact arithmetic, and four
/// passes over the parameter instead of six, which counts for the 12.6
/// M-entry token embedding. Decoupled decay first (torch's order), skipped
/// where it is zero. The guard's selects keep a non-finite step from
/// touching anything (a fusing backend folds them into the same kernel).
pub fn adamw_composed<B: Backend>(slot: AdamWSlot<B>, guard: &UpdateGuard<B>) -> [Tensor<B, 1>; 3] {
    let AdamWSlot { w, g, m, v, s } = slot;
    let [n] = w.dims();
    // Clipping is rare: no pass over the gradient when it is off.
    let g = match &guard.scale {
        Some(scale) => g * scale.clone().expand([n]),
        None => g,
    };
    let m1 = m.clone() * s.beta1 + g.clone() * (1.0 - s.beta1);
    let v1 = v.clone() * s.beta2 + g.powi_scalar(2) * (1.0 - s.beta2);
    let step = m1.clone() / (v1.clone().sqrt() + s.eps) * s.step_size;
    let w1 = if s.keep == 1.0 {
        w.clone()
    } else {
        w.clone() * s.keep
    };
    let skip = guard.apply.clone().bool_not().expand([n]); // [n]
    [
        (w1 - step).mask_where(skip.clone(), w),
        m1.mask_where(skip.clone(), m),
        v1.mask_where(skip, v),
    ]
}
