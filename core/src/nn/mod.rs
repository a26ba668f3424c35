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
pub fn linear_in<B: Backend, const D: usize>(lin: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let w = lin.weight.val(); // [d_in, d_out]
    let b = lin.bias.as_ref().map(|b| b.val()); // [d_out]
    if w.dtype() == x.dtype() {
        return burn::tensor::module::linear(x, w, b);
    }
    let dt = FloatDType::from(x.dtype());
    burn::tensor::module::linear(x, w.cast(dt), b.map(|b| b.cast(dt)))
}
