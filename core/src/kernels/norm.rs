//! LayerNorm: the op and its kernel trait (composed: Burn's own forward).

use burn::nn::LayerNorm;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::Resolved;

/// A backend's own LayerNorm with a bias, used by [`layer_norm`].
pub trait LayerNormKernel<B: Backend>: Send + Sync {
    /// `(x − mean)/√(var + eps)·gamma + beta` over each row, the variance
    /// biased (PyTorch's): the value of Burn's `LayerNorm::forward` and, on
    /// an autodiff backend, its gradients for `x`, `gamma` and `beta`, each
    /// within float rounding.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, width]`; `gamma`, `beta`: `[width]`
    /// - output: `[batch, tokens, width]`
    fn layer_norm(
        &self,
        x: Tensor<B, 3>,
        gamma: Tensor<B, 1>,
        beta: Tensor<B, 1>,
        eps: f64,
    ) -> Tensor<B, 3>;
}

/// `ln(x)` over the last dimension: the resolved [`LayerNormKernel`] where
/// there is one, else Burn's own `LayerNorm::forward` (its generic
/// decomposition under autodiff: about 9 passes forward and 20 backward
/// without fusion). `eps` must be the one `ln` was built with (the model
/// configs' `ln_eps`): Burn keeps the layer's own private.
///
/// # Shapes
/// `[..., width]` → `[..., width]`
pub fn layer_norm<B: Backend, const D: usize>(
    kernels: &Resolved<B>,
    ln: &LayerNorm<B>,
    eps: f64,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let (Some(kernel), Some(beta)) = (kernels.layer_norm(), ln.beta.as_ref()) else {
        return ln.forward(x);
    };
    let shape = x.shape();
    let width = shape[D - 1];
    let rows = shape.num_elements() / width;
    let (gamma, beta) = (ln.gamma.val(), beta.val());
    if D == 3 {
        // The same tensor, graph node included (a reshape would add a node
        // between the residual stream and the norm, and the kernel could
        // not add its input gradient into the residual's).
        let y = kernel.layer_norm(Tensor::from_primitive(x.into_primitive()), gamma, beta, eps);
        return Tensor::from_primitive(y.into_primitive());
    }
    kernel
        .layer_norm(x.reshape([1, rows, width]), gamma, beta, eps)
        .reshape(shape) // [1, rows, width] → x's shape
}
