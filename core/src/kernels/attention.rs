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

    /// [`Self::attention`] on q, k and v packed side by side, as the
    /// packed projection ([`super::QkvKernel`]) writes them: q's heads,
    /// then k's, then v's. A kernel that reads this layout where it lies
    /// overrides it; by default the three are split off and passed on.
    ///
    /// # Shapes
    /// - `qkv`: `[batch, tokens, 3·heads, head_dim]`
    /// - output: `[batch, tokens, heads, head_dim]`
    fn attention_packed(&self, qkv: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
        let [q, k, v] = unpack(qkv);
        self.attention(q, k, v, causal)
    }
}

/// q, k and v of a packed `[batch, tokens, 3·heads, head_dim]`, each
/// `[batch, tokens, heads, head_dim]`.
fn unpack<B: Backend>(qkv: Tensor<B, 4>) -> [Tensor<B, 4>; 3] {
    let heads = qkv.dims()[2] / 3;
    [0, 1, 2].map(|i| qkv.clone().narrow(2, i * heads, heads))
}

/// [`attention`] on packed q, k and v ([`AttentionKernel::attention_packed`]).
///
/// # Shapes
/// - `qkv`: `[batch, tokens, 3·heads, head_dim]`
/// - output: `[batch, tokens, heads, head_dim]`
pub fn attention_packed<B: Backend>(
    kernels: &Resolved<B>,
    qkv: Tensor<B, 4>,
    causal: bool,
) -> Tensor<B, 4> {
    match kernels.attention() {
        Some(kernel) => kernel.attention_packed(qkv, causal),
        None => {
            let [q, k, v] = unpack(qkv);
            attention_composed(q, k, v, causal)
        }
    }
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
