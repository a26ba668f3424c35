//! The token-embedding lookup: the op and its kernel trait (composed:
//! Burn's own `Embedding::forward`).

use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::Resolved;

/// A backend's own embedding lookup, used by [`embedding`].
pub trait EmbeddingKernel<B: Backend>: Send + Sync {
    /// `table[ids]`: the value of Burn's `embedding` and, on an autodiff
    /// backend, the table's (dense) gradient, each exactly: a row's
    /// gradient is the sum of the output rows that looked it up, added in
    /// token order as Burn's `select_add` adds them.
    ///
    /// # Shapes
    /// - `table`: `[vocab, width]`; `ids`: `[batch, len]`, each `< vocab`
    /// - output: `[batch, len, width]`
    fn embedding(&self, table: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3>;
}

/// `emb`'s rows at `ids`: the resolved [`EmbeddingKernel`] where there is
/// one, else Burn's own `Embedding::forward`, whose backward zeroes and
/// fills the whole `[vocab, width]` gradient (50 MB at bench-tiny's table).
///
/// # Shapes
/// `ids`: `[batch, len]` → `[batch, len, width]`
pub fn embedding<B: Backend>(
    kernels: &Resolved<B>,
    emb: &Embedding<B>,
    ids: Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    match kernels.embedding() {
        Some(kernel) => kernel.embedding(emb.weight.val(), ids),
        None => emb.forward(ids),
    }
}
