//! The query, key and value projections as one packed product: the op,
//! its kernel trait and its composition.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::linear_composed;

/// A backend's own packed q/k/v projection, used by `nn::Attention` where
/// the backend also has an attention kernel that reads the packed layout
/// ([`super::AttentionKernel::attention_packed`]).
pub trait QkvKernel<B: Backend>: Send + Sync {
    /// `x·[Wq | Wk | Wv] + [bq | bk | bv]`: the three projections' outputs
    /// side by side in one tensor, with the value of [`qkv_composed`] and,
    /// on an autodiff backend, the gradients of `x` and of each weight and
    /// bias, within float rounding.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, d_in]`
    /// - `w`: three `[d_in, width]`; `b`: three `[width]`
    /// - output: `[batch, tokens, 3·width]` (q's columns, then k's, then v's)
    fn qkv(&self, x: Tensor<B, 3>, w: [Tensor<B, 2>; 3], b: [Tensor<B, 1>; 3]) -> Tensor<B, 3>;

    /// Whether [`Self::qkv`] also takes `w` and `b` as the float32 master
    /// weights of mixed precision with `x` narrower (bf16), as
    /// [`super::LinearKernel::takes_master_weights`]; where not, the caller
    /// casts them first.
    fn takes_master_weights(&self) -> bool {
        false
    }
}

/// [`QkvKernel::qkv`] from Burn's ops: three products and a concatenation.
///
/// # Shapes
/// `x`: `[batch, tokens, d_in]` → `[batch, tokens, 3·width]`
pub fn qkv_composed<B: Backend>(
    x: Tensor<B, 3>,
    w: [Tensor<B, 2>; 3],
    b: [Tensor<B, 1>; 3],
) -> Tensor<B, 3> {
    let parts = w
        .into_iter()
        .zip(b)
        .map(|(w, b)| linear_composed(x.clone(), w, Some(b)))
        .collect();
    Tensor::cat(parts, 2)
}
