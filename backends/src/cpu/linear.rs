//! `x·W + b` under autodiff on flex: one `gemm` forward with the bias
//! folded in, and one `gemm` per input gradient backward, each reading its
//! transposed operand in place.
//!
//! Burn's linear on flex is a matrix product into a zeroed and then
//! re-aligned output buffer, then a broadcast add of the bias into another;
//! backward is two products, the weight's over `[chunks, d_in, d_out]`
//! partial products that are then summed ([`clipa_core::nn::linear_in`]'s
//! split-K), and a sum over rows for the bias. Here forward writes the bias
//! rows and lets `gemm` add `x·W` onto them; backward computes `dX = dY·Wᵀ`
//! and `dW = Xᵀ·dY` as one product each on rayon's threads (`gemm` packs
//! its operands, so a deep product is no worse on the CPU than chunks),
//! and `db` as per-task column sums added in task order.
//!
//! Uses `unsafe` to call the shared `gemm` product (`super::gemm`); each
//! block says why it holds.
#![allow(unsafe_code)]

use super::gemm::{Parallelism, Unset, product};
use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use clipa_core::nn::LinearKernel;
use rayon::prelude::*;

use super::vmath::{self, vectorised};
use super::{Backend, dense_flex};

/// The linear-layer kernel of the CPU backend, for training
/// (`Autodiff<Flex>`) and inference (`Flex`).
pub struct FlexLinear;

/// Rows per rayon task of the bias gradient's column sums.
const ROWS: usize = 256;

impl LinearKernel<Flex> for FlexLinear {
    fn linear(
        &self,
        x: Tensor<Flex, 2>,
        w: Tensor<Flex, 2>,
        b: Tensor<Flex, 1>,
    ) -> Tensor<Flex, 2> {
        if [x.dtype(), w.dtype(), b.dtype()]
            .iter()
            .any(|d| *d != DType::F32)
        {
            return burn::tensor::module::linear(x, w, Some(b));
        }
        let x = dense_flex(x.into_primitive().tensor());
        let w = dense_flex(w.into_primitive().tensor());
        let b = dense_flex(b.into_primitive().tensor());
        Tensor::from_primitive(TensorPrimitive::Float(forward(&x, &w, &b)))
    }
}

impl LinearKernel<Backend> for FlexLinear {
    fn linear(
        &self,
        x: Tensor<Backend, 2>,
        w: Tensor<Backend, 2>,
        b: Tensor<Backend, 1>,
    ) -> Tensor<Backend, 2> {
        if [x.dtype(), w.dtype(), b.dtype()]
            .iter()
            .any(|d| *d != DType::F32)
        {
            return burn::tensor::module::linear(x, w, Some(b));
        }
        let [x, w, b] = [
            x.into_primitive().tensor(),
            w.into_primitive().tensor(),
            b.into_primitive().tensor(),
        ];
        let nodes = [x.node.clone(), w.node.clone(), b.node.clone()];
        let [x, w, b] = [x, w, b].map(|t| dense_flex(t.primitive));
        let y = forward(&x, &w, &b);
        let out = match LinearBackward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(Saved { x, w }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// `[rows, d_in, d_out]` of `x` `[rows, d_in]` and `w` `[d_in, d_out]`.
/// The `gemm` calls trust these sizes, so a weight that does not fit
/// stops here rather than being read out of bounds.
fn dims(x: &FlexTensor, w: &FlexTensor) -> [usize; 3] {
    let [rows, d_in] = x.layout().shape().dims::<2>();
    let [w_in, d_out] = w.layout().shape().dims::<2>();
    assert_eq!(
        w_in, d_in,
        "linear kernel: weight rows must match the input width"
    );
    [rows, d_in, d_out]
}

/// `x·w + b`, `[rows, d_out]`: the bias rows, with `x·w` added onto them.
fn forward(x: &FlexTensor, w: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let [rows, d_in, d_out] = dims(x, w);
    let mut y = Unset::new(Shape::new([rows, d_out]));
    let bias = b.storage::<f32>();
    assert_eq!(bias.len(), d_out, "linear kernel: one bias per output");
    let ys = y.ptr();
    (0..rows).into_par_iter().with_min_len(ROWS).for_each(|r| {
        // SAFETY: row r of y, d_out elements within its [rows, d_out]
        // buffer, is this task's alone; bias is d_out long.
        unsafe { std::ptr::copy_nonoverlapping(bias.as_ptr(), ys.at(r * d_out), d_out) }
    });
    let (x, w) = (x.storage::<f32>(), w.storage::<f32>());
    // SAFETY: x is [rows, d_in], w [d_in, d_out], y [rows, d_out], all
    // contiguous row-major buffers of exactly that size (`dense_flex`,
    // `Unset`); y is this function's own, every row holding the bias.
    unsafe {
        product(
            [rows, d_out, d_in],
            (ys.at(0), 1, d_out as isize),
            (x.as_ptr(), 1, d_in as isize),
            (w.as_ptr(), 1, d_out as isize),
            1.0,
            1.0,
            Parallelism::Rayon(0),
        );
        y.finish()
    }
}

/// What backward needs.
#[derive(Clone, Debug)]
struct Saved {
    /// The input `[rows, d_in]`.
    x: FlexTensor,
    /// The weight `[d_in, d_out]`.
    w: FlexTensor,
}

/// The backward step of [`FlexLinear`].
#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = dense_flex(grads.consume::<Flex>(&ops.node));
        let Saved { x, w } = &ops.state;
        let [rows, d_in, d_out] = dims(x, w);
        let [px, pw, pb] = ops.parents;
        let (dys, xs, ws) = (dy.storage::<f32>(), x.storage::<f32>(), w.storage::<f32>());
        if let Some(node) = px {
            let mut dx = Unset::new(Shape::new([rows, d_in]));
            // SAFETY: dy is [rows, d_out] and w [d_in, d_out], contiguous;
            // wᵀ is read in place (column stride d_out, row stride 1); dx
            // is this step's own [rows, d_in] buffer, which the product
            // (alpha 0) writes in full.
            let dx = unsafe {
                product(
                    [rows, d_in, d_out],
                    (dx.ptr().at(0), 1, d_in as isize),
                    (dys.as_ptr(), 1, d_out as isize),
                    (ws.as_ptr(), d_out as isize, 1),
                    0.0,
                    1.0,
                    Parallelism::Rayon(0),
                );
                dx.finish()
            };
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = pw {
            let mut dw = Unset::new(Shape::new([d_in, d_out]));
            // SAFETY: xᵀ is read in place from x [rows, d_in] (column
            // stride d_in, row stride 1); dy is [rows, d_out]; dw is this
            // step's own [d_in, d_out] buffer, written in full as dx.
            let dw = unsafe {
                product(
                    [d_in, d_out, rows],
                    (dw.ptr().at(0), 1, d_out as isize),
                    (xs.as_ptr(), d_in as isize, 1),
                    (dys.as_ptr(), 1, d_out as isize),
                    0.0,
                    1.0,
                    Parallelism::Rayon(0),
                );
                dw.finish()
            };
            grads.register::<Flex>(node.id, dw);
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, column_sums(dys, d_out));
        }
    }
}

/// Σ over the rows of `m` (`[rows, width]`, row-major): per-task partial
/// sums, added in task order so that the result does not depend on
/// scheduling.
fn column_sums(m: &[f32], width: usize) -> FlexTensor {
    let partials: Vec<Vec<f32>> = m
        .par_chunks(ROWS * width)
        .map(|rows| sum_rows(rows, width))
        .collect();
    let total = vmath::add_in_order(&partials, width);
    FlexTensor::from_data(burn::tensor::TensorData::new(total, [width]))
}

vectorised! {
    /// Σ over the rows of one task's block.
    fn sum_rows(rows: &[f32], width: usize) -> Vec<f32> {
        let mut acc = vec![0f32; width];
        for r in rows.chunks_exact(width) {
            acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use clipa_core::numeric::{normal_data, relative_error};

    /// The kernel against Burn's linear under autodiff: the output and the
    /// gradients of the input, weight and bias through a weighted sum, at
    /// a row count that is no multiple of the task size, on an
    /// intermediate input as in the model.
    #[test]
    fn flex_linear_matches_burns() {
        let device = Default::default();
        let (rows, d_in, d_out) = (2 * ROWS + 9, 19, 23);
        let leaf = |shape: Vec<usize>, seed| {
            Param::from_tensor(Tensor::<Backend, 2>::from_data(
                normal_data(shape, seed, 1.0),
                &device,
            ))
        };
        let w = leaf(vec![d_in, d_out], 2);
        let b = Param::from_tensor(Tensor::<Backend, 1>::from_data(
            normal_data([d_out], 3, 1.0),
            &device,
        ));
        let mix = Tensor::<Backend, 2>::from_data(normal_data([rows, d_out], 9, 1.0), &device);
        let run = |fused: bool| {
            let x = Tensor::<Backend, 2>::from_data(normal_data([rows, d_in], 1, 1.0), &device)
                .require_grad();
            let h = x.clone() * 1.5;
            let y = if fused {
                FlexLinear.linear(h, w.val(), b.val())
            } else {
                burn::tensor::module::linear(h, w.val(), Some(b.val()))
            };
            let grads = (y.clone() * mix.clone()).sum().backward();
            let got = |t: Option<Tensor<Flex, 2>>| t.expect("a gradient").into_data();
            [
                y.into_data(),
                got(x.grad(&grads)),
                got(w.val().grad(&grads)),
                b.val().grad(&grads).expect("a bias gradient").into_data(),
            ]
        };
        let (fused, composed) = (run(true), run(false));
        for (name, (f, c)) in ["y", "dx", "dw", "db"]
            .iter()
            .zip(fused.iter().zip(&composed))
        {
            let err = relative_error(f, c);
            assert!(err <= 1e-6, "{name}: relative error {err:.2e}");
        }
    }
}
