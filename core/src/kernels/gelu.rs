//! The exact GELU: the op, its kernel trait and its composition.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::Resolved;

/// A backend's own exact GELU, used by [`gelu`].
pub trait GeluKernel<B: Backend>: Send + Sync {
    /// GELU of `x` (`[numel]`): the value of [`gelu_composed`] and, on an
    /// autodiff backend, its gradient, each within float rounding.
    fn gelu(&self, x: Tensor<B, 1>) -> Tensor<B, 1>;
}

/// The exact GELU of `x`: the resolved [`GeluKernel`] where there is one,
/// else [`gelu_composed`].
///
/// # Shapes
/// any → the same
pub fn gelu<B: Backend, const D: usize>(kernels: &Resolved<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    match kernels.gelu() {
        Some(kernel) => {
            let shape = x.shape();
            let numel = shape.num_elements();
            kernel.gelu(x.reshape([numel])).reshape(shape) // [numel] → x's shape
        }
        None => gelu_composed(x),
    }
}

/// The exact GELU, `x·½(1 + erf(x/√2))`, from Burn's element-wise ops: runs
/// on every backend. Composed from erf rather than Burn's fused `gelu`: in
/// Burn 0.21 the CubeCL (wgpu, cuda) backward of the fused op is the tanh
/// approximation's, off by ~4e-4 relative error, while erf's own backward
/// is exact to f32 (tests/backends.rs::activations_match_cpu_on_wgpu).
pub fn gelu_composed<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    (x.clone() * ((x * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0)) * 0.5
}
