//! The sum of squares of many tensors (the global gradient norm's square):
//! the op's kernel trait and its composition.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// A backend's own sum of squares over a list of tensors, used by
/// [`crate::train::optim::AdamW::grad_norm`].
pub trait SumSquaresKernel<B: Backend>: Send + Sync {
    /// `Σ_t Σ_i t[i]²` over every tensor of `tensors` (each flattened to
    /// `[numel]`), as a one-element tensor on their device: the value of
    /// [`sum_squares_composed`] within float rounding.
    fn sum_squares(&self, tensors: Vec<Tensor<B, 1>>) -> Tensor<B, 1>;
}

/// `Σ_t Σ_i t[i]²` from Burn's ops: a square, a sum and an add per tensor
/// (three kernels each on a backend without fusion), `[1]` on `device`
/// (zero for an empty list).
pub fn sum_squares_composed<B: Backend>(
    tensors: Vec<Tensor<B, 1>>,
    device: &B::Device,
) -> Tensor<B, 1> {
    tensors
        .into_iter()
        .map(|t| t.powi_scalar(2).sum()) // [1]
        .reduce(|a, b| a + b)
        .unwrap_or_else(|| Tensor::zeros([1], device))
}
