//! Contrastive losses, the one place they live. The softmax CLIP loss
//! follows OpenCLIP `loss.py::ClipLoss` and CLIPA
//! `bidirectional_contrastive_loss`: the mean of the image→text and
//! text→image cross-entropies, with the matching caption of each image on
//! the diagonal; the sigmoid loss follows OpenCLIP `SigLipLoss`.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// The contrastive loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Softmax CLIP loss (OpenCLIP `ClipLoss`).
    Softmax,
    /// Sigmoid loss (SigLIP; OpenCLIP `SigLipLoss`).
    Sigmoid,
}

impl std::str::FromStr for LossKind {
    type Err = crate::Error;

    /// `softmax` or `sigmoid`, as in the run config.
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "softmax" => Ok(Self::Softmax),
            "sigmoid" => Ok(Self::Sigmoid),
            other => Err(crate::Error::Config(format!(
                "loss {other:?}: expected softmax or sigmoid"
            ))),
        }
    }
}

/// `logits_per_image` = exp(`scale`) · image · textᵀ on unit features;
/// `scale` is the model's `logit_scale` (log-space).
///
/// # Shapes
/// `image` `[n, dim]`, `text` `[m, dim]`, `scale` `[1]` → `[n, m]`
pub fn logits<B: Backend>(
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    scale: Tensor<B, 1>,
) -> Tensor<B, 2> {
    image.matmul(text.transpose()) * scale.exp().unsqueeze::<2>()
}

/// log Σ_j exp(x_ij) of each row of `x`, shifted by the row's maximum for
/// range; the shift is detached, its gradient cancelling exactly, so the
/// backward is the softmax alone.
///
/// # Shapes
/// `[n, m]` → `[n]`
fn logsumexp_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = x.dims();
    let max = x.clone().detach().max_dim(1); // [n, 1]
    ((x - max.clone()).exp().sum_dim(1).log() + max).reshape([n])
}

/// The CLIP loss on `logits_per_image` `[batch, batch]`:
/// `(CE(rows) + CE(columns)) / 2`, returned as `[1]`.
pub fn clip_loss<B: Backend>(logits_per_image: Tensor<B, 2>) -> Tensor<B, 1> {
    let per_text = logits_per_image.clone().transpose();
    clip_loss_rows(logits_per_image, per_text, 0)
}

/// One replica's share of the CLIP loss (OpenCLIP `--local-loss`): its `n`
/// images against every caption of the global batch and its `n` captions
/// against every image, the matching pair of row `i` in column `offset + i`.
/// The mean of the replicas' shares is the loss of the global batch.
///
/// # Shapes
/// `per_image`, `per_text`: `[n, global]` → `[1]`
pub fn clip_loss_rows<B: Backend>(
    per_image: Tensor<B, 2>,
    per_text: Tensor<B, 2>,
    offset: usize,
) -> Tensor<B, 1> {
    // CE = logsumexp(row) − the matching pair's logit, in each direction.
    // The pair's logit s·⟨image, text⟩ is the same in both, so it is
    // gathered once, and neither direction's full log-softmax is formed:
    // fewer launches on a GPU than two `log_softmax`es and two gathers,
    // forward and backward (docs/BENCHMARKS.md).
    let [n, _] = per_image.dims();
    let device = per_image.device();
    let labels =
        Tensor::<B, 1, Int>::arange(offset as i64..(offset + n) as i64, &device).reshape([n, 1]); // [n, 1]
    let pair = per_image.clone().gather(1, labels).reshape([n]); // [n]
    let lse = logsumexp_rows(per_image) + logsumexp_rows(per_text); // [n]
    (lse / 2.0 - pair).mean().reshape([1])
}

/// The SigLIP loss (Zhai et al. 2023; OpenCLIP `SigLipLoss`) on biased
/// logits `t·img·txtᵀ + b` `[batch, batch]`: every pair is a binary
/// problem, +1 on the diagonal and −1 elsewhere,
/// `−Σ log σ(label · logit) / batch`, returned as `[1]`.
pub fn siglip_loss<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    siglip_loss_rows(logits, 0)
}

/// One replica's share of the SigLIP loss: its `n` images against every
/// caption of the global batch, positive in column `offset + i`, summed and
/// divided by `n`. The mean of the replicas' shares is the global loss
/// (every pair is counted once, by the replica that holds its image).
///
/// # Shapes
/// `[n, global]` → `[1]`
pub fn siglip_loss_rows<B: Backend>(logits: Tensor<B, 2>, offset: usize) -> Tensor<B, 1> {
    let [n, m] = logits.dims();
    let device = logits.device();
    // +1 where column = offset + row, −1 elsewhere.
    let eye = Tensor::<B, 2>::zeros([n, m], &device)
        .slice_assign([0..n, offset..offset + n], Tensor::<B, 2>::eye(n, &device)); // [n, m]
    let labels = eye * 2.0 - 1.0;
    let z = labels * logits;
    // log σ(z) = −softplus(−z), written stably as min(z, 0) − log(1 + e^−|z|).
    let log_sig = z.clone().clamp_max(0.0) - z.abs().neg().exp().log1p();
    -log_sig.sum().reshape([1]) / n as f32
}

/// The loss on normalised features with the model's temperature (and bias
/// for the sigmoid loss). `scale` is `logit_scale` (log-space).
///
/// # Shapes
/// `image`, `text`: `[batch, dim]` → `[1]`
pub fn contrastive_loss<B: Backend>(
    kind: LossKind,
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    scale: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let logits = logits(image, text, scale); // [batch, batch]
    match kind {
        LossKind::Softmax => clip_loss(logits),
        LossKind::Sigmoid => {
            let bias = bias.expect("the sigmoid loss needs a logit bias");
            siglip_loss(logits + bias.unsqueeze::<2>())
        }
    }
}

/// One replica's share of the loss on the global features (OpenCLIP
/// `--local-loss`): its `n` rows, starting at global row `offset`, against
/// every column. The mean of the replicas' shares is
/// [`contrastive_loss`] of the whole batch.
///
/// # Shapes
/// `image`, `text`: `[global, dim]` → `[1]`
pub fn contrastive_loss_rows<B: Backend>(
    kind: LossKind,
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    offset: usize,
    n: usize,
    scale: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let s = scale.exp().unsqueeze::<2>();
    let rows = |t: &Tensor<B, 2>| t.clone().narrow(0, offset, n); // [n, dim]
    match kind {
        LossKind::Softmax => {
            let per_image = rows(&image).matmul(text.clone().transpose()) * s.clone(); // [n, global]
            let per_text = rows(&text).matmul(image.transpose()) * s; // [n, global]
            clip_loss_rows(per_image, per_text, offset)
        }
        LossKind::Sigmoid => {
            let bias = bias.expect("the sigmoid loss needs a logit bias");
            let logits = rows(&image).matmul(text.transpose()) * s + bias.unsqueeze::<2>();
            siglip_loss_rows(logits, offset)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;
    use burn::tensor::TensorData;

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
    fn row_shares_average_to_the_global_loss() {
        // Two replicas of 3 rows each over a 6×6 batch: the mean of their
        // shares is the loss of the whole batch, for both losses.
        let device = Default::default();
        let values: Vec<f32> = (0..36).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.4).collect();
        let logits = Tensor::<TestBackend, 2>::from_data(TensorData::new(values, [6, 6]), &device);
        let full = clip_loss(logits.clone()).into_scalar();
        let t = logits.clone().transpose();
        let share = |r: usize| {
            clip_loss_rows(
                logits.clone().narrow(0, 3 * r, 3),
                t.clone().narrow(0, 3 * r, 3),
                3 * r,
            )
            .into_scalar()
        };
        let mean = (share(0) + share(1)) / 2.0;
        assert!((mean - full).abs() < 1e-6, "{mean} vs {full}");
        assert!((share(0) - share(1)).abs() > 1e-3, "the shares differ");
        let full = siglip_loss(logits.clone()).into_scalar();
        let share =
            |r: usize| siglip_loss_rows(logits.clone().narrow(0, 3 * r, 3), 3 * r).into_scalar();
        let mean = (share(0) + share(1)) / 2.0;
        assert!((mean - full).abs() < 1e-5, "{mean} vs {full}");
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
