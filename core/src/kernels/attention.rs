//! Multi-head attention's core, softmax(q·kᵀ/√d)·v: the op, its kernel
//! trait and its composition (the projections stay in `nn::Attention`).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;

use super::Resolved;

/// A backend's own multi-head attention, used by [`attention`].
pub trait AttentionKernel<B: Backend>: Send + Sync {
    /// softmax(q·kᵀ/√head_dim)·v for every batch row and head, the future
    /// masked where `causal`: the value of [`attention_composed`] and, on
    /// an autodiff backend, its gradients, each within float rounding.
    ///
    /// # Shapes
    /// - `q`, `k`, `v`: `[batch, tokens, heads, head_dim]`
    /// - output: `[batch, tokens, heads, head_dim]`
    fn attention(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        causal: bool,
    ) -> Tensor<B, 4>;
}

/// softmax(q·kᵀ/√head_dim)·v per head: the resolved [`AttentionKernel`]
/// where there is one, else [`attention_composed`].
///
/// # Shapes
/// - `q`, `k`, `v`: `[batch, tokens, heads, head_dim]`
/// - output: `[batch, tokens, heads, head_dim]`
pub fn attention<B: Backend>(
    kernels: &Resolved<B>,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
) -> Tensor<B, 4> {
    match kernels.attention() {
        Some(kernel) => kernel.attention(q, k, v, causal),
        None => attention_composed(q, k, v, causal),
    }
}

/// softmax(q·kᵀ/√head_dim)·v per head from Burn's generic ops: runs on
/// every backend. The heads move to the front (`[batch, heads, tokens,
/// head_dim]`) for Burn's attention op and back after it: a fused kernel on
/// CubeCL backends at inference, matmul + softmax under autodiff so that
/// the backward pass is exact.
///
/// # Shapes
/// - `q`, `k`, `v`: `[batch, tokens, heads, head_dim]`
/// - output: `[batch, tokens, heads, head_dim]`
pub fn attention_composed<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
) -> Tensor<B, 4> {
    let front = |t: Tensor<B, 4>| t.swap_dims(1, 2); // [batch, heads, tokens, head_dim]
    let options = AttentionModuleOptions {
        is_causal: causal,
        ..Default::default()
    };
    module::attention(front(q), front(k), front(v), None, None, options).swap_dims(1, 2)
}
