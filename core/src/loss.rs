//! Contrastive losses. The softmax CLIP loss follows OpenCLIP `loss.py::
//! ClipLoss` and CLIPA `bidirectional_contrastive_loss`: the mean of the
//! image→text and text→image cross-entropies, with the matching caption of
//! each image on the diagonal.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Mean cross-entropy of each row of `logits` against its diagonal entry.
///
/// # Shapes
/// `[n, m]` (n ≤ m) → `[1]`
fn diagonal_cross_entropy<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    let labels = Tensor::<B, 1, Int>::arange(0..n as i64, &device).reshape([n, 1]); // [n, 1]
    let picked = log_softmax(logits, 1).gather(1, labels); // [n, 1]
    -picked.mean().reshape([1])
}

/// The CLIP loss on `logits_per_image` `[batch, batch]`:
/// `(CE(rows) + CE(columns)) / 2`, returned as `[1]`.
pub fn clip_loss<B: Backend>(logits_per_image: Tensor<B, 2>) -> Tensor<B, 1> {
    let per_text = logits_per_image.clone().transpose();
    (diagonal_cross_entropy(logits_per_image) + diagonal_cross_entropy(per_text)) / 2.0
}

/// The SigLIP loss (Zhai et al. 2023; OpenCLIP `SigLipLoss`) on biased
/// logits `t·img·txtᵀ + b` `[batch, batch]`: every pair is a binary
/// problem, +1 on the diagonal and −1 elsewhere,
/// `−Σ log σ(label · logit) / batch`, returned as `[1]`.
pub fn siglip_loss<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    let eye = Tensor::<B, 2>::eye(n, &device); // [n, n]
    let labels = eye * 2.0 - 1.0; // +1 diagonal, −1 elsewhere
    let z = labels * logits;
    // log σ(z) = −softplus(−z), written stably as min(z, 0) − log(1 + e^−|z|).
    let log_sig = z.clone().clamp_max(0.0) - z.abs().neg().exp().log1p();
    -log_sig.sum().reshape([1]) / n as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;

    #[test]
    fn uniform_logits_give_log_n() {
        let device = Default::default();
        let logits = Tensor::<TestBackend, 2>::zeros([4, 4], &device);
        let loss = clip_loss(logits).into_scalar();
        assert!((loss - 4f32.ln()).abs() < 1e-6, "{loss}");
    }

    #[test]
    fn matches_a_hand_computed_value() {
        // torch: F.cross_entropy(L, arange(2)) and on L.T, averaged, with
        // L = [[2, 0], [1, 3]]: rows 0.126928 and 0.126928; columns
        // -log(e²/(e²+e)) = 0.313262 and -log(e³/(e³+1)) = 0.048587.
        let device = Default::default();
        let logits = Tensor::<TestBackend, 2>::from_floats([[2.0, 0.0], [1.0, 3.0]], &device);
        let loss = clip_loss(logits).into_scalar();
        let want = (0.126_928 * 2.0 + 0.313_262 + 0.048_587) / 4.0;
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
    }

    #[test]
    fn siglip_matches_a_hand_computed_value() {
        // torch: labels = 2*eye(2)-1; -F.logsigmoid(labels*L).sum()/2 with
        // L = [[2, 0], [1, -3]]: -(logσ(2) + logσ(0) + logσ(-1) + logσ(-3))/2
        //  = (0.126928 + 0.693147 + 1.313262 + 3.048587) / 2 = 2.590962.
        let device = Default::default();
        let logits = Tensor::<TestBackend, 2>::from_floats([[2.0, 0.0], [1.0, -3.0]], &device);
        let loss = siglip_loss(logits).into_scalar();
        assert!((loss - 2.590_962).abs() < 1e-5, "{loss}");
        // Large logits of the right sign cost nothing and stay finite.
        let sure = Tensor::<TestBackend, 2>::from_floats([[80.0, -80.0], [-80.0, 80.0]], &device);
        let loss = siglip_loss(sure).into_scalar();
        assert!(loss.is_finite() && loss < 1e-6, "{loss}");
    }
}
