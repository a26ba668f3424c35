//! The exact GELU in one parallel pass, with its own backward.

use std::mem::MaybeUninit;

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use clipa_core::kernels::{GeluKernel, gelu_composed};
use rayon::prelude::*;

use super::gemm::Unset;
use super::tensor::{Backend, CHUNK, dense, dense_flex};
use super::vmath::{self, vectorised};

/// The exact GELU in one pass on rayon's threads, with its own backward.
///
/// [`gelu_composed`] is 5 element-wise kernels forward and about 10
/// backward on flex, whose `erf` and `exp` run on one thread with scalar
/// libm; at bench-tiny's img32 the composed GELU's `erf` alone took 6 % of
/// a training step. Here one parallel pass computes the value and, under
/// autodiff, the slope `Φ(x) + x·φ(x)` (two `exp`s per element, in
/// [`vmath`]'s vectorised float32 math rather than libm's scalar calls),
/// which the backward step multiplies the incoming gradient by (in place
/// where that buffer is not shared). Φ comes from `erfc`, so the far left
/// tail has no cancellation: more accurate than `½(1 + erf)`.
/// Flex's own fused `gelu_backward` is exact too, but computes `erf` again
/// on one thread, and measured no faster than the composition.
pub struct FlexGelu;

impl GeluKernel<Flex> for FlexGelu {
    fn gelu(&self, x: Tensor<Flex, 1>) -> Tensor<Flex, 1> {
        if x.dtype() != DType::F32 {
            return gelu_composed(x);
        }
        let y = gelu_in_place(dense(x));
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }
}

/// The value only, in place where `x` is not shared.
fn gelu_in_place(mut x: FlexTensor) -> FlexTensor {
    x.storage_mut::<f32>()
        .par_chunks_mut(CHUNK)
        .for_each(gelu_chunk);
    x
}

vectorised! {
    /// GELU in place over one chunk.
    fn gelu_chunk(c: &mut [f32]) {
        c.iter_mut().for_each(|v| *v = vmath::gelu(*v));
    }
}

vectorised! {
    /// GELU and its slope over one chunk of x, written into every slot of
    /// `y` and `slope` (each as long as `x`).
    fn gelu_and_slope_chunk(
        y: &mut [MaybeUninit<f32>],
        slope: &mut [MaybeUninit<f32>],
        x: &[f32],
    ) {
        assert!(y.len() == x.len() && slope.len() == x.len(), "one slot per input");
        for ((y, d), &x) in y.iter_mut().zip(slope.iter_mut()).zip(x) {
            let (value, s) = vmath::gelu_and_slope(x);
            y.write(value);
            d.write(s);
        }
    }
}

vectorised! {
    /// `g ⊙= d` over one chunk.
    fn multiply_chunk(g: &mut [f32], d: &[f32]) {
        g.iter_mut().zip(d).for_each(|(g, d)| *g *= d);
    }
}

impl GeluKernel<Backend> for FlexGelu {
    fn gelu(&self, x: Tensor<Backend, 1>) -> Tensor<Backend, 1> {
        if x.dtype() != DType::F32 {
            return gelu_composed(x);
        }
        let x = x.into_primitive().tensor();
        let node = x.node.clone();
        let input = dense_flex(x.primitive);
        let y = match GeluBackward
            .prepare::<NoCheckpointing>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let shape = input.layout().shape().clone();
                // Written in full by the rayon tasks, never zeroed first (a
                // `memset` of both on this thread while the workers wait).
                let (mut y, mut slope) = (Unset::new(shape.clone()), Unset::new(shape));
                y.slots()
                    .par_chunks_mut(CHUNK)
                    .zip(slope.slots().par_chunks_mut(CHUNK))
                    .zip(input.storage::<f32>().par_chunks(CHUNK))
                    .for_each(|((y, d), x)| gelu_and_slope_chunk(y, d, x));
                // SAFETY: the chunks of both cover every element, and
                // `gelu_and_slope_chunk` writes each one.
                #[allow(unsafe_code)]
                let (y, slope) = unsafe { (y.finish(), slope.finish()) };
                prep.finish(slope, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(gelu_in_place(input)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }
}

/// The backward step of [`FlexGelu`]: the incoming gradient times the
/// saved slope.
#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let slope = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let mut grad = dense_flex(grad);
            grad.storage_mut::<f32>()
                .par_chunks_mut(CHUNK)
                .zip(slope.storage::<f32>().par_chunks(CHUNK))
                .for_each(|(g, d)| multiply_chunk(g, d));
            grad
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clipa_core::numeric::{normal_data, relative_error};

    /// The GELU kernel against the composed GELU: values and gradients
    /// through a weighted sum, on a length that is not a
    /// multiple of the chunk; then inference (no autodiff).
    #[test]
    fn fused_gelu_matches_the_composed_one() {
        let device = Default::default();
        let n = 2 * CHUNK + 5;
        let w = Tensor::<Backend, 1>::from_data(normal_data([n], 2, 1.0), &device);
        let run = |fused: bool| {
            let x =
                Tensor::<Backend, 1>::from_data(normal_data([n], 1, 2.0), &device).require_grad();
            // An intermediate, as in the model (Burn marks only leaves as
            // requiring gradients).
            let h = x.clone() * 1.5;
            let y = if fused {
                GeluKernel::<Backend>::gelu(&FlexGelu, h)
            } else {
                gelu_composed(h)
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            (
                y.into_data(),
                x.grad(&grads).expect("x has a gradient").into_data(),
            )
        };
        let ((yf, gf), (yc, gc)) = (run(true), run(false));
        let err = relative_error(&yf, &yc);
        assert!(err <= 1e-7, "value relative error {err:.2e}");
        let err = relative_error(&gf, &gc);
        assert!(err <= 1e-6, "gradient relative error {err:.2e}");
        let x = Tensor::<Flex, 1>::from_data(normal_data([n], 1, 2.0), &device);
        let yi = GeluKernel::<Flex>::gelu(&FlexGelu, x.clone()).into_data();
        let err = relative_error(&yi, &gelu_composed(x).into_data());
        assert!(err <= 1e-7, "inference value relative error {err:.2e}");
    }
}
