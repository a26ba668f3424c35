//! Token embedding lookup through a backend kernel where the backend
//! registers one.

use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// `emb`'s rows at `ids`: the backend's registered [`EmbeddingKernel`]
/// where it has one, else Burn's own `Embedding::forward`.
///
/// Burn's backward of the lookup is the backend's `embedding_backward`,
/// which on flex zeroes a `[vocab, width]` gradient and adds the rows into
/// it on one thread: at bench-tiny's 49408 × 256 table, 50 MB written and
/// copied once more every step while the other threads wait.
///
/// # Shapes
/// `ids`: `[batch, len]` → `[batch, len, width]`
pub fn embedding_in<B: Backend>(emb: &Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    match crate::kernels::lookup::<dyn EmbeddingKernel<B>>() {
        Some(kernel) => kernel.embedding(emb.weight.val(), ids),
        None => emb.forward(ids),
    }
}

/// A backend's own embedding lookup, registered per backend type
/// ([`crate::kernels`]) and used by [`embedding_in`].
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
