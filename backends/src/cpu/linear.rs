//! `x·W + b` under autodiff on flex: one `gemm` forward with the bias
//! folded in, and one `gemm` per input gradient backward, each reading its
//! transposed operand in place.
//!
//! Burn's linear on flex is a matrix product into a zeroed and then
//! re-aligned output buffer, then a broadcast add of the bias into another;
//! backward is two products, the weight's over `[chunks, d_in, d_out]`
//! partial products that are then summed ([`clipa_core::kernels::linear_composed`]'s
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
use clipa_core::kernels::LinearKernel;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::tensor::{Backend, dense_flex, take_earlier_grad};
use super::vmath::{self, vectorised};

/// The linear-layer kernel of the CPU backend, for training
/// (`Autodiff<Flex>`) and inference (`Flex`).
pub struct FlexLinear;

/// Rows per rayon task of the bias gradient's column sums.
const ROWS: usize = 256;

impl LinearKernel<Flex> for FlexLinear {
    fn linear(
        &self,
        x: Tensor<Flex, 3>,
        w: Tensor<Flex, 2>,
        b: Tensor<Flex, 1>,
        residual: Option<Tensor<Flex, 3>>,
    ) -> Tensor<Flex, 3> {
        if !all_f32(&x, &w, &b, residual.as_ref()) {
            return composed(x, w, b, residual);
        }
        let x = dense_flex(x.into_primitive().tensor());
        let w = dense_flex(w.into_primitive().tensor());
        let b = dense_flex(b.into_primitive().tensor());
        let r = residual.map(|r| dense_flex(r.into_primitive().tensor()));
        Tensor::from_primitive(TensorPrimitive::Float(forward(&x, &w, &b, r.as_ref())))
    }
}

impl LinearKernel<Backend> for FlexLinear {
    fn linear(
        &self,
        x: Tensor<Backend, 3>,
        w: Tensor<Backend, 2>,
        b: Tensor<Backend, 1>,
        residual: Option<Tensor<Backend, 3>>,
    ) -> Tensor<Backend, 3> {
        if !all_f32(&x, &w, &b, residual.as_ref()) {
            return composed(x, w, b, residual);
        }
        let [x, w, b] = [
            x.into_primitive().tensor(),
            w.into_primitive().tensor(),
            b.into_primitive().tensor(),
        ];
        let r = residual.map(|r| r.into_primitive().tensor());
        let nodes = [x.node.clone(), w.node.clone(), b.node.clone()];
        let r_node = r.as_ref().map(|r| r.node.clone());
        let [x, w, b] = [x, w, b].map(|t| dense_flex(t.primitive));
        let r = r.map(|r| dense_flex(r.primitive));
        let y = forward(&x, &w, &b, r.as_ref());
        let saved = Saved { x, w };
        // Two steps, as the residual is a fourth parent or none.
        let out = match r_node {
            None => match LinearBackward
                .prepare::<NoCheckpointing>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(saved, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            },
            Some(r_node) => {
                let [x_node, w_node, b_node] = nodes;
                match LinearAddBackward
                    .prepare::<NoCheckpointing>([x_node, w_node, b_node, r_node])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => prep.finish(saved, y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            }
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// Whether every operand is float32, the one dtype the kernel takes.
fn all_f32<B: burn::tensor::backend::Backend>(
    x: &Tensor<B, 3>,
    w: &Tensor<B, 2>,
    b: &Tensor<B, 1>,
    residual: Option<&Tensor<B, 3>>,
) -> bool {
    [x.dtype(), w.dtype(), b.dtype()]
        .into_iter()
        .chain(residual.map(Tensor::dtype))
        .all(|d| d == DType::F32)
}

/// Burn's own linear, then the residual add: for the dtypes the kernel
/// does not take.
fn composed<B: burn::tensor::backend::Backend>(
    x: Tensor<B, 3>,
    w: Tensor<B, 2>,
    b: Tensor<B, 1>,
    residual: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    let y = burn::tensor::module::linear(x, w, Some(b));
    match residual {
        Some(r) => r + y,
        None => y,
    }
}

/// `[rows, d_in, d_out]` of `x` `[batch, tokens, d_in]` and `w`
/// `[d_in, d_out]`. The `gemm` calls trust these sizes, so a weight that
/// does not fit stops here rather than being read out of bounds.
fn dims(x: &FlexTensor, w: &FlexTensor) -> [usize; 3] {
    let [batch, tokens, d_in] = x.layout().shape().dims::<3>();
    let [w_in, d_out] = w.layout().shape().dims::<2>();
    assert_eq!(
        w_in, d_in,
        "linear kernel: weight rows must match the input width"
    );
    [batch * tokens, d_in, d_out]
}

/// `x·w + b` (`+ r`), `[batch, tokens, d_out]`: the bias rows (each plus
/// its row of r), with `x·w` added onto them.
fn forward(x: &FlexTensor, w: &FlexTensor, b: &FlexTensor, r: Option<&FlexTensor>) -> FlexTensor {
    let [rows, d_in, d_out] = dims(x, w);
    let [batch, tokens, _] = x.layout().shape().dims::<3>();
    let shape = Shape::new([batch, tokens, d_out]);
    let mut y = Unset::new(shape.clone());
    let bias = b.storage::<f32>();
    assert_eq!(bias.len(), d_out, "linear kernel: one bias per output");
    match r {
        Some(r) => {
            assert_eq!(
                r.layout().shape(),
                &shape,
                "linear kernel: the residual is the output's shape"
            );
            y.slots()
                .par_chunks_mut(d_out)
                .zip(r.storage::<f32>().par_chunks(d_out))
                .with_min_len(ROWS)
                .for_each(|(y, r)| add_bias_row(y, r, bias));
        }
        None => y
            .slots()
            .par_chunks_mut(d_out)
            .with_min_len(ROWS)
            .for_each(|y| {
                y.iter_mut().zip(bias).for_each(|(y, &b)| {
                    y.write(b);
                });
            }),
    }
    let ys = y.ptr();
    let (x, w) = (x.storage::<f32>(), w.storage::<f32>());
    // SAFETY: x is [rows, d_in], w [d_in, d_out], y [rows, d_out], all
    // contiguous row-major buffers of exactly that size (`dense_flex`,
    // `Unset`); y is this function's own, every row written above.
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

vectorised! {
    /// One row of y: `r + b`, written in full.
    fn add_bias_row(y: &mut [MaybeUninit<f32>], r: &[f32], bias: &[f32]) {
        y.iter_mut().zip(r.iter().zip(bias)).for_each(|(y, (&r, &b))| {
            y.write(r + b);
        });
    }
}

/// What backward needs.
#[derive(Clone, Debug)]
struct Saved {
    /// The input `[batch, tokens, d_in]`.
    x: FlexTensor,
    /// The weight `[d_in, d_out]`.
    w: FlexTensor,
}

/// The backward step of [`FlexLinear`]: parents x, w and b.
#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        backward(ops, grads);
    }
}

/// The backward step of [`FlexLinear`] with a residual: parents x, w, b
/// and the residual, whose gradient is the output's.
#[derive(Debug)]
struct LinearAddBackward;

impl Backward<Flex, 4> for LinearAddBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        backward(ops, grads);
    }
}

/// Registers the gradients of x, w, b and (as parent 3, where `N` is 4)
/// the residual.
fn backward<const N: usize>(ops: Ops<Saved, N>, grads: &mut Gradients) {
    let dy = dense_flex(grads.consume::<Flex>(&ops.node));
    let [rows, d_in, d_out] = dims(&ops.state.x, &ops.state.w);
    // The query, key and value projections share one input: the second
    // and third add their dx onto the gradient the first registered
    // (`gemm` with alpha 1), where `register` would add the two.
    let earlier = take_earlier_grad(grads, &ops, 0, ops.state.x.layout().shape());
    let Saved { x, w } = &ops.state;
    let (dys, xs, ws) = (dy.storage::<f32>(), x.storage::<f32>(), w.storage::<f32>());
    let parent = |i: usize| ops.parents.get(i).cloned().flatten();
    if let Some(node) = parent(0) {
        // dy is [rows, d_out] and w [d_in, d_out], contiguous; wᵀ is read
        // in place (column stride d_out, row stride 1).
        let dx_of = |dst: *mut f32, alpha: f32| {
            // SAFETY: dst is a contiguous [rows, d_in] buffer that only
            // this product touches (the callers' below).
            unsafe {
                product(
                    [rows, d_in, d_out],
                    (dst, 1, d_in as isize),
                    (dys.as_ptr(), 1, d_out as isize),
                    (ws.as_ptr(), d_out as isize, 1),
                    alpha,
                    1.0,
                    Parallelism::Rayon(0),
                );
            }
        };
        let dx = match earlier {
            // Onto the earlier gradient (x's shape, dense, float32; copied
            // first where shared).
            Some(mut g) => {
                dx_of(g.storage_mut::<f32>().as_mut_ptr(), 1.0);
                g
            }
            // A new buffer, which the product (alpha 0) writes in full.
            None => {
                let mut dx = Unset::new(x.layout().shape().clone());
                // SAFETY: offset 0 of a buffer of rows·d_in elements.
                dx_of(unsafe { dx.ptr().at(0) }, 0.0);
                // SAFETY: written in full just above.
                unsafe { dx.finish() }
            }
        };
        grads.register::<Flex>(node.id, dx);
    }
    if let Some(node) = parent(1) {
        let mut dw = Unset::new(Shape::new([d_in, d_out]));
        // SAFETY: xᵀ is read in place from x [rows, d_in] (column stride
        // d_in, row stride 1); dy is [rows, d_out]; dw is this step's own
        // [d_in, d_out] buffer, which the product (alpha 0) writes in full.
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
    if let Some(node) = parent(2) {
        grads.register::<Flex>(node.id, column_sums(dys, d_out));
    }
    if let Some(node) = parent(3) {
        // The residual's gradient is the output's (a shared buffer, no
        // copy).
        grads.register::<Flex>(node.id, dy.clone());
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
    /// gradients of the input, weight and bias (and the residual) through a
    /// weighted sum, at a row count that is no multiple of the task size,
    /// on an intermediate input as in the model. Cases: plain; with a
    /// residual; and the input shared by three layers (as the query, key
    /// and value projections share theirs), each adding its dx onto the
    /// gradient the one after it registered.
    #[test]
    fn flex_linear_matches_burns() {
        let device = Default::default();
        let (batch, tokens, d_in, d_out) = (2, ROWS + 9, 19, 23);
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
        let data = |seed, width| normal_data([batch, tokens, width], seed, 1.0);
        let mix = Tensor::<Backend, 3>::from_data(data(9, d_out), &device);
        let run = |fused: bool, residual: bool, uses: usize| {
            let x = Tensor::<Backend, 3>::from_data(data(1, d_in), &device).require_grad();
            let r = Tensor::<Backend, 3>::from_data(data(4, d_out), &device).require_grad();
            let h = x.clone() * 1.5;
            let g = r.clone() * 0.5;
            let mut loss = None;
            for u in 0..uses {
                let y = if fused {
                    FlexLinear.linear(h.clone(), w.val(), b.val(), residual.then(|| g.clone()))
                } else {
                    let y = burn::tensor::module::linear(h.clone(), w.val(), Some(b.val()));
                    if residual { g.clone() + y } else { y }
                };
                let term = (y * mix.clone() * (u as f64 + 1.0)).sum();
                loss = Some(match loss {
                    Some(l) => l + term,
                    None => term,
                });
            }
            let loss = loss.expect("one use at least");
            let value = loss.clone().into_data();
            let grads = loss.backward();
            let got = |t: Option<Tensor<Flex, 2>>| t.expect("a gradient").into_data();
            let got3 = |t: Option<Tensor<Flex, 3>>| t.expect("a gradient").into_data();
            let mut out = vec![
                value,
                got3(x.grad(&grads)),
                got(w.val().grad(&grads)),
                b.val().grad(&grads).expect("a bias gradient").into_data(),
            ];
            if residual {
                out.push(got3(r.grad(&grads)));
            }
            out
        };
        for (residual, uses) in [(false, 1), (true, 1), (false, 3)] {
            let (fused, composed) = (run(true, residual, uses), run(false, residual, uses));
            for (name, (f, c)) in ["loss", "dx", "dw", "db", "dr"]
                .iter()
                .zip(fused.iter().zip(&composed))
            {
                let err = relative_error(f, c);
                assert!(
                    err <= 1e-6,
                    "residual {residual}, {uses} uses, {name}: relative error {err:.2e}"
                );
            }
        }
    }
}
