//! LayerNorm through a backend kernel where the backend registers one.

use burn::nn::LayerNorm;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// `ln(x)` over the last dimension: the backend's registered
/// [`LayerNormKernel`] where it has one, else Burn's own
/// `LayerNorm::forward`. `eps` must be the one `ln` was built with (the
/// model configs' `ln_eps`): Burn keeps the layer's own private.
///
/// On a backend without kernel fusion, Burn's forward under autodiff is its
/// generic decomposition, 9 element-wise and reduction passes forward and
/// about 20 backward, several of them broadcasts.
///
/// # Shapes
/// `[..., width]` → `[..., width]`
pub fn layer_norm_in<B: Backend, const D: usize>(
    ln: &LayerNorm<B>,
    eps: f64,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let (Some(kernel), Some(beta)) = (
        crate::kernels::lookup::<dyn LayerNormKernel<B>>(),
        ln.beta.as_ref(),
    ) else {
        return ln.forward(x);
    };
    let shape = x.shape();
    let width = shape[D - 1];
    let rows = shape.num_elements() / width;
    kernel
        .layer_norm(x.reshape([rows, width]), ln.gamma.val(), beta.val(), eps)
        .reshape(shape) // [rows, width] → x's shape
}

/// A backend's own LayerNorm with a bias, registered per backend type
/// ([`crate::kernels`]) and used by [`layer_norm_in`].
pub trait LayerNormKernel<B: Backend>: Send + Sync {
    /// `(x − mean)/√(var + eps)·gamma + beta` over each row, the variance
    /// biased (PyTorch's): the value of Burn's `LayerNorm::forward` and, on
    /// an autodiff backend, its gradients for `x`, `gamma` and `beta`, each
    /// within float rounding.
    ///
    /// # Shapes
    /// - `x`: `[rows, width]`; `gamma`, `beta`: `[width]`
    /// - output: `[rows, width]`
    fn layer_norm(
        &self,
        x: Tensor<B, 2>,
        gamma: Tensor<B, 1>,
        beta: Tensor<B, 1>,
        eps: f64,
    ) -> Tensor<B, 2>;
}
