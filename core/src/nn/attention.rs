//! Multi-head self-attention, as OpenCLIP's `nn.MultiheadAttention` computes
//! it: separate q/k/v projections (OpenCLIP's `in_proj` split in three),
//! softmax(q·kᵀ/√d)·v per head, then an output projection.

use crate::kernels::{self, Resolved, linear, linear_add};
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

/// Configuration of [`Attention`].
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Model width (embedding size of each token).
    pub width: usize,
    /// Number of heads; must divide `width`.
    pub heads: usize,
}

/// Multi-head self-attention with q/k/v and output projections.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection, weight `[width, width]` (in, out).
    pub query: Linear<B>,
    /// Key projection.
    pub key: Linear<B>,
    /// Value projection.
    pub value: Linear<B>,
    /// Output projection.
    pub out: Linear<B>,
    /// Number of heads.
    #[module(skip)]
    pub heads: usize,
    /// The kernels its ops run, resolved when it was built.
    #[module(skip)]
    pub kernels: Resolved<B>,
}

impl AttentionConfig {
    /// Builds the layer with PyTorch's default (Kaiming-uniform) init.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        assert!(
            self.heads > 0 && self.width.is_multiple_of(self.heads),
            "heads ({}) must divide width ({}); validated by model configs",
            self.heads,
            self.width
        );
        let linear = || LinearConfig::new(self.width, self.width).init(device);
        Attention {
            query: linear(),
            key: linear(),
            value: linear(),
            out: linear(),
            heads: self.heads,
            kernels: Resolved::installed(),
        }
    }
}

impl<B: Backend> Attention<B> {
    /// Self-attention over a token sequence.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, width]`
    /// - output: `[batch, tokens, width]`
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        self.forward_onto(x, causal, None)
    }

    /// `residual + self.forward(x, causal)`, the residual added by the
    /// output projection ([`kernels::linear_add`]) where given.
    ///
    /// # Shapes
    /// - `x`, `residual` and the output: `[batch, tokens, width]`
    pub fn forward_onto(
        &self,
        x: Tensor<B, 3>,
        causal: bool,
        residual: Option<Tensor<B, 3>>,
    ) -> Tensor<B, 3> {
        let [batch, tokens, width] = x.dims();
        let head_dim = width / self.heads;
        // The projections' own layout, each head a column block: a free
        // reshape, no copy.
        let split = |t: Tensor<B, 3>| t.reshape([batch, tokens, self.heads, head_dim]);
        // In `x`'s dtype: bf16 under mixed precision (see `ResidualBlock`).
        let ks = &self.kernels;
        let packed = ks.qkv().and_then(|kernel| {
            // The float32 master weights as they are where the kernel casts
            // them in its own launch.
            let dtype = match kernel.takes_master_weights() {
                true => None,
                false => Some(x.dtype()),
            };
            Some((kernel, self.packed_params(dtype)?))
        });
        let y = match packed {
            // One product for the three projections, read by the attention
            // kernel where it lies.
            Some((kernel, (w, b))) => {
                let qkv = kernel.qkv(x, w, b); // [batch, tokens, 3·width]
                let qkv = qkv.reshape([batch, tokens, 3 * self.heads, head_dim]);
                kernels::attention_packed(ks, qkv, causal)
            }
            None => {
                let q = split(linear(ks, &self.query, x.clone())); // [batch, tokens, heads, head_dim]
                let k = split(linear(ks, &self.key, x.clone()));
                let v = split(linear(ks, &self.value, x));
                kernels::attention(ks, q, k, v, causal) // [batch, tokens, heads, head_dim]
            }
        };
        let y = y.reshape([batch, tokens, width]);
        match residual {
            Some(r) => linear_add(ks, &self.out, y, r),
            None => linear(ks, &self.out, y),
        }
    }
}

impl<B: Backend> Attention<B> {
    /// The q, k and v weights and biases, cast to `dtype` where given
    /// (from the float32 master copy under mixed precision, as
    /// [`kernels::linear`] does), or `None` where a projection has no bias.
    #[allow(clippy::type_complexity)]
    fn packed_params(
        &self,
        dtype: Option<DType>,
    ) -> Option<([Tensor<B, 2>; 3], [Tensor<B, 1>; 3])> {
        let layers = [&self.query, &self.key, &self.value];
        let cast = |t: Tensor<B, 2>| match dtype {
            Some(d) if d != t.dtype() => t.cast(FloatDType::from(d)),
            _ => t,
        };
        let w = layers.map(|l| cast(l.weight.val()));
        let b = [
            self.query.bias.as_ref()?.val(),
            self.key.bias.as_ref()?.val(),
            self.value.bias.as_ref()?.val(),
        ];
        let b = b.map(|b| match dtype {
            Some(d) if d != b.dtype() => b.cast(FloatDType::from(d)),
            _ => b,
        });
        Some((w, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::{TestBackend, assert_close};
    use burn::tensor::activation::softmax;
    use burn::tensor::{Distribution, Tensor};

    /// The fused attention op against an explicit softmax(q kᵀ/√d) v.
    #[test]
    fn matches_explicit_softmax_attention() {
        let device = Default::default();
        let attn = AttentionConfig::new(8, 2).init::<TestBackend>(&device);
        let x =
            Tensor::<TestBackend, 3>::random([2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        for causal in [false, true] {
            let got = attn.forward(x.clone(), causal);
            let split = |t: Tensor<TestBackend, 3>| t.reshape([2, 5, 2, 4]).swap_dims(1, 2);
            let q = split(attn.query.forward(x.clone()));
            let k = split(attn.key.forward(x.clone()));
            let v = split(attn.value.forward(x.clone()));
            let mut scores = q.matmul(k.swap_dims(2, 3)) / 2.0; // √4
            if causal {
                let mask =
                    Tensor::<TestBackend, 2, burn::tensor::Bool>::tril_mask([5, 5], 0, &device)
                        .unsqueeze::<4>();
                scores = scores.mask_fill(mask, f32::NEG_INFINITY);
            }
            let y = softmax(scores, 3)
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([2, 5, 8]);
            let want = attn.out.forward(y);
            assert_close(&got.into_data(), &want.into_data(), 1e-5, "attention");
        }
    }

    /// With a causal mask, the first token only sees itself: its output
    /// must not change when later tokens change.
    #[test]
    fn causal_mask_hides_the_future() {
        let device = Default::default();
        let attn = AttentionConfig::new(8, 2).init::<TestBackend>(&device);
        let x =
            Tensor::<TestBackend, 3>::random([1, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let tail =
            Tensor::<TestBackend, 3>::random([1, 3, 8], Distribution::Normal(0.0, 1.0), &device);
        let x2 = Tensor::cat(vec![x.clone().narrow(1, 0, 1), tail], 1);
        let a = attn.forward(x, true).narrow(1, 0, 1);
        let b = attn.forward(x2.clone(), true).narrow(1, 0, 1);
        assert_close(
            &a.into_data(),
            &b.clone().into_data(),
            1e-6,
            "causal first token",
        );
        let c = attn.forward(x2, false).narrow(1, 0, 1);
        let diff = (b - c).abs().max().into_scalar();
        assert!(
            diff > 1e-4,
            "bidirectional attention must see the future (diff {diff})"
        );
    }
}
