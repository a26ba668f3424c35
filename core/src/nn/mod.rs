//! Transformer building blocks shared by the vision and text towers.
//!
//! Layouts follow OpenCLIP's `transformer.py` (`ResidualAttentionBlock`), so
//! OpenCLIP weights map one to one: pre-LN, `x + attn(ln_1(x))`,
//! `x + mlp(ln_2(x))`.

mod attention;
mod block;

pub use attention::{Attention, AttentionConfig};
pub use block::{Activation, Mlp, ResidualBlock, ResidualBlockConfig};

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

/// `x·W + b` computed in `x`'s dtype. Under mixed precision the block hands
/// its sub-layers bf16 activations while the parameters stay the float32
/// master copy: the weights are cast for the product, and the cast's
/// backward returns their gradient in float32 (`torch.autocast`'s linear).
///
/// The leading dimensions are folded into one before the product, so the
/// weight gradient is a single `[d_in, tokens]·[tokens, d_out]` GEMM over
/// every token of the batch. Given `[batch, seq, d_in]` directly, Burn
/// 0.21's default `linear_weight_backward` runs one `[d_in, seq]` product
/// per sample and sums a `[batch, d_in, d_out]` temporary: on the CPU that
/// was most of the backward pass (67 MB per MLP layer at batch 64).
pub fn linear_in<B: Backend, const D: usize>(lin: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let w = lin.weight.val(); // [d_in, d_out]
    let b = lin.bias.as_ref().map(|b| b.val()); // [d_out]
    let (w, b) = if w.dtype() == x.dtype() {
        (w, b)
    } else {
        let dt = FloatDType::from(x.dtype());
        (w.cast(dt), b.map(|b| b.cast(dt)))
    };
    if D <= 2 {
        return burn::tensor::module::linear(x, w, b);
    }
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    let x = x.reshape([rows, d_in]); // [tokens, d_in]
    dims[D - 1] = w.dims()[1];
    burn::tensor::module::linear(x, w, b).reshape(dims) // [..., d_out]
}
