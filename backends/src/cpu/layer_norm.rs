//! LayerNorm under autodiff on flex, forward and backward each one pass
//! over the rows on rayon's threads.
//!
//! Burn's autodiff runs LayerNorm as its generic decomposition: mean,
//! subtract, square, mean, add ε, square root, divide, scale, shift, each
//! a flex kernel over `[rows, width]`, and about 20 more backward, several
//! of them broadcasts. Here forward computes each row's mean and
//! √(var + ε) and writes the output and the normalised row x̂ (saved for
//! backward) in one pass; backward computes
//! `dx = (g − mean(g) − x̂·mean(g·x̂)) / √(var + ε)` with `g = dy·γ`, and the
//! parameter gradients `dγ = Σ dy·x̂`, `dβ = Σ dy` as per-task partial sums
//! added in task order (deterministic). dx goes straight into the input's
//! earlier gradient where it has one (the residual stream's, in a block).
//! No output is zeroed before it is written. Inference needs no kernel:
//! flex's own `layer_norm` is already one pass.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::ModuleOps;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use clipa_core::kernels::LayerNormKernel;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::gemm::Unset;
use super::tensor::{Backend, dense_flex, take_earlier_grad};
use super::vmath::{self, product_sum_and_dot, sum, sum_sq_dev, vectorised};

/// The LayerNorm kernel of the CPU backend under autodiff.
pub struct FlexLayerNorm;

/// Rows per rayon task: enough to amortise a task's `[2, width]` partial
/// sums of the parameter gradients.
const ROWS: usize = 64;

impl LayerNormKernel<Backend> for FlexLayerNorm {
    fn layer_norm(
        &self,
        x: Tensor<Backend, 3>,
        gamma: Tensor<Backend, 1>,
        beta: Tensor<Backend, 1>,
        eps: f64,
    ) -> Tensor<Backend, 3> {
        if [x.dtype(), gamma.dtype(), beta.dtype()]
            .iter()
            .any(|d| *d != DType::F32)
        {
            return composed(x, gamma, beta, eps);
        }
        let [x, gamma, beta] = [
            x.into_primitive().tensor(),
            gamma.into_primitive().tensor(),
            beta.into_primitive().tensor(),
        ];
        let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone()];
        let [x, gamma, beta] = [x, gamma, beta].map(|t| dense_flex(t.primitive));
        let out = match LayerNormBackward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, saved) = forward(&x, &gamma, &beta, eps as f32, true);
                let (x_hat, std) = saved.expect("asked for");
                prep.finish(Saved { x_hat, std, gamma }, y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward(&x, &gamma, &beta, eps as f32, false).0)
            }
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// Burn's own LayerNorm op, for dtypes the kernel does not take.
fn composed(
    x: Tensor<Backend, 3>,
    gamma: Tensor<Backend, 1>,
    beta: Tensor<Backend, 1>,
    eps: f64,
) -> Tensor<Backend, 3> {
    let y = <Backend as ModuleOps<Backend>>::layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        Some(beta.into_primitive().tensor()),
        eps,
    );
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// What backward needs.
#[derive(Clone, Debug)]
struct Saved {
    /// The normalised input x̂ = (x − mean)/√(var + ε), x's shape
    /// `[batch, tokens, width]`.
    x_hat: FlexTensor,
    /// √(var + ε) per row, `[batch·tokens]`.
    std: FlexTensor,
    /// γ, `[width]`.
    gamma: FlexTensor,
}

/// `x̂·γ + β`, and, when `save`, x̂ and √(var + ε) per row for backward.
/// As the decomposition computes it: the mean, the centred row, the biased
/// variance as the mean of its squares, √(var + ε), a division. The outputs
/// are written in full by the rayon tasks, never zeroed first (a `memset`
/// of all three on this thread while the workers waited: 2 % of a
/// bench-tiny img32 step).
fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f32,
    save: bool,
) -> (FlexTensor, Option<(FlexTensor, FlexTensor)>) {
    let shape = x.layout().shape().clone();
    let width = gamma.layout().shape().num_elements();
    let rows = shape.num_elements() / width;
    let mut y = Unset::new(shape.clone());
    let (x, gamma, beta) = (
        x.storage::<f32>(),
        gamma.storage::<f32>(),
        beta.storage::<f32>(),
    );
    let ys = y.slots().par_chunks_mut(width);
    let xs = x.par_chunks(width);
    if !save {
        ys.zip(xs).with_min_len(ROWS).for_each(|(y, x)| {
            normalise_row(x, y, None, gamma, beta, eps);
        });
        // SAFETY: the rows cover y, and `normalise_row` writes each one.
        #[allow(unsafe_code)]
        return (unsafe { y.finish() }, None);
    }
    let (mut x_hat, mut std) = (Unset::new(shape), Unset::new(Shape::new([rows])));
    ys.zip(xs)
        .zip(x_hat.slots().par_chunks_mut(width))
        .zip(std.slots().par_iter_mut())
        .with_min_len(ROWS)
        .for_each(|(((y, x), h), sd)| {
            sd.write(normalise_row(x, y, Some(h), gamma, beta, eps));
        });
    // SAFETY: the rows cover y and x̂, and `normalise_row` writes each one
    // and returns the row's √(var + ε), written into its slot of `std`.
    #[allow(unsafe_code)]
    let out = unsafe { (y.finish(), Some((x_hat.finish(), std.finish()))) };
    out
}

/// The backward step of [`FlexLayerNorm`].
#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = dense_flex(grads.consume::<Flex>(&ops.node));
        // In a pre-LN block the norm's input is the residual stream, whose
        // gradient from the residual add is registered before this step
        // runs: dx is added into it.
        let shape = ops.state.x_hat.layout().shape().clone();
        let into = take_earlier_grad(grads, &ops, 0, &shape);
        let [x, gamma, beta] = ops.parents;
        let (dx, [dgamma, dbeta]) = backward(&ops.state, &dy, into);
        for (parent, g) in [x, gamma, beta].into_iter().zip([dx, dgamma, dbeta]) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// Where a task writes its rows of dx.
enum Dx<'a> {
    /// A new buffer: each element written.
    Unset(&'a mut [MaybeUninit<f32>]),
    /// The input's earlier gradient: dx added to each element.
    Add(&'a mut [f32]),
}

/// `(dx, [dγ, dβ])` from the output's gradient `dy` (x's shape). dx is
/// added into `into` where given (the input's earlier gradient, float32, of
/// x's shape) as `dx + into` element by element, the bits of autodiff's own
/// `register` (which adds the new gradient to the old); else it is written
/// into a new buffer, never zeroed first.
fn backward(
    saved: &Saved,
    dy: &FlexTensor,
    into: Option<FlexTensor>,
) -> (FlexTensor, [FlexTensor; 2]) {
    let width = saved.gamma.layout().shape().num_elements();
    let task = ROWS * width;
    // Each task: ROWS rows of dx, and its partial [dγ | dβ].
    let (dx, partials) = match into {
        Some(mut g) => {
            let partials = tasks(
                saved,
                dy,
                g.storage_mut::<f32>().par_chunks_mut(task).map(Dx::Add),
            );
            (g, partials)
        }
        None => {
            let mut fresh = Unset::new(saved.x_hat.layout().shape().clone());
            let partials = tasks(saved, dy, fresh.slots().par_chunks_mut(task).map(Dx::Unset));
            // SAFETY: the tasks cover every row, and `backward_rows` writes
            // each element of its rows.
            #[allow(unsafe_code)]
            let dx = unsafe { fresh.finish() };
            (dx, partials)
        }
    };
    let mut total = vmath::add_in_order(&partials, 2 * width);
    let dbeta = total.split_off(width);
    let param = |v: Vec<f32>| FlexTensor::from_data(burn::tensor::TensorData::new(v, [width]));
    (dx, [param(total), param(dbeta)])
}

/// Runs [`backward_rows`] on each task's rows of dx, `ROWS` rows apiece,
/// and returns the tasks' partial `[dγ | dβ]` in task order.
fn tasks<'a>(
    saved: &Saved,
    dy: &FlexTensor,
    dx: impl IndexedParallelIterator<Item = Dx<'a>>,
) -> Vec<Vec<f32>> {
    let width = saved.gamma.layout().shape().num_elements();
    let (x_hat, std, gamma) = (
        saved.x_hat.storage::<f32>(),
        saved.std.storage::<f32>(),
        saved.gamma.storage::<f32>(),
    );
    dx.zip(x_hat.par_chunks(ROWS * width))
        .zip(dy.storage::<f32>().par_chunks(ROWS * width))
        .zip(std.par_chunks(ROWS))
        .map(|(((dx, x_hat), dy), std)| backward_rows(dx, x_hat, dy, std, gamma))
        .collect()
}

vectorised! {
    /// One row of [`forward`]: writes `y = x̂·γ + β` and, when given, x̂;
    /// returns √(var + ε). The centred row is recomputed where it is used,
    /// the same rounded `x − mean` each time.
    fn normalise_row(
        x: &[f32],
        y: &mut [MaybeUninit<f32>],
        x_hat: Option<&mut [MaybeUninit<f32>]>,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) -> f32 {
        let n = x.len() as f32;
        let mean = sum(x) / n;
        let sd = (sum_sq_dev(x, mean) / n + eps).sqrt();
        if let Some(x_hat) = x_hat {
            x_hat.iter_mut().zip(x).for_each(|(h, &x)| {
                h.write((x - mean) / sd);
            });
        }
        y.iter_mut()
            .zip(x)
            .zip(gamma.iter().zip(beta))
            .for_each(|((y, &x), (&g, &b))| {
                y.write((x - mean) / sd * g + b);
            });
        sd
    }
}

vectorised! {
    /// One task of [`backward`]: its rows of dx `[rows, width]`, and its
    /// partial `[dγ | dβ]` `[2·width]`. With `g = dy·γ`,
    /// `dx = (g − mean(g) − x̂·mean(g·x̂)) / √(var + ε)`.
    fn backward_rows(
        dx: Dx<'_>,
        x_hat: &[f32],
        dy: &[f32],
        std: &[f32],
        gamma: &[f32],
    ) -> Vec<f32> {
        let width = gamma.len();
        let n = width as f32;
        let mut dx = dx;
        let mut acc = vec![0f32; 2 * width];
        let (dgamma, dbeta) = acc.split_at_mut(width);
        let rows = x_hat.chunks_exact(width).zip(dy.chunks_exact(width)).zip(std);
        for (r, ((h, dy), &sd)) in rows.enumerate() {
            let (sum_g, dot_gh) = product_sum_and_dot(dy, gamma, h);
            let (mean_g, mean_gh) = (sum_g / n, dot_gh / n);
            let grad = |d: f32, w: f32, h: f32| (d * w - mean_g - h * mean_gh) / sd;
            let terms = dy.iter().zip(gamma).zip(h);
            let span = r * width..(r + 1) * width;
            match &mut dx {
                Dx::Unset(out) => out[span].iter_mut().zip(terms).for_each(|(o, ((&d, &w), &h))| {
                    o.write(grad(d, w, h));
                }),
                Dx::Add(out) => out[span]
                    .iter_mut()
                    .zip(terms)
                    .for_each(|(o, ((&d, &w), &h))| *o += grad(d, w, h)),
            }
            dgamma
                .iter_mut()
                .zip(dy.iter().zip(h))
                .for_each(|(a, (&d, &h))| *a += d * h);
            dbeta.iter_mut().zip(dy).for_each(|(a, &d)| *a += d);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use clipa_core::numeric::{normal_data, relative_error};
    use clipa_core::state::grads_dict;

    /// The kernel against Burn's LayerNorm under autodiff: the output and
    /// the gradients of the input, γ and β through a weighted sum, at a
    /// row count that is no multiple of the task size and a width that is
    /// no multiple of 16, on an intermediate input as in the model. The
    /// input also feeds a residual-like second use, created after the norm
    /// (its gradient is registered first, and the kernel adds dx into it)
    /// and before it (autodiff adds the two).
    #[test]
    fn flex_layer_norm_matches_burns() {
        let device = Default::default();
        let (batch, tokens, width) = (3, ROWS + 5, 37);
        let mut ln = LayerNormConfig::new(width)
            .with_epsilon(1e-5)
            .init::<Backend>(&device);
        // Non-trivial γ and β, so that their gradients and uses are tested.
        let param =
            |seed| Param::from_tensor(Tensor::from_data(normal_data([width], seed, 1.0), &device));
        ln.gamma = param(5);
        ln.beta = Some(param(6));
        let weights = |seed| {
            Tensor::<Backend, 3>::from_data(normal_data([batch, tokens, width], seed, 1.0), &device)
        };
        let (w, w2) = (weights(9), weights(10));
        let run = |fused: bool, residual_after: Option<bool>| {
            let x = Tensor::<Backend, 3>::from_data(
                normal_data([batch, tokens, width], 1, 2.0),
                &device,
            )
            .require_grad();
            let h = x.clone() * 1.5 + 0.3;
            let residual = || (h.clone() * w2.clone()).sum();
            let before = (residual_after == Some(false)).then(residual);
            let y = if fused {
                let beta = ln.beta.as_ref().expect("a bias").val();
                FlexLayerNorm.layer_norm(h.clone(), ln.gamma.val(), beta, 1e-5)
            } else {
                ln.forward(h.clone())
            };
            let after = (residual_after == Some(true)).then(residual);
            let mut loss = (y.clone() * w.clone()).sum();
            for r in [before, after].into_iter().flatten() {
                loss = loss + r;
            }
            let grads = loss.backward();
            let dx = x.grad(&grads).expect("x has a gradient").into_data();
            (y.into_data(), dx, grads_dict(&ln, &grads))
        };
        for residual_after in [None, Some(true), Some(false)] {
            let ((yf, dxf, gf), (yc, dxc, gc)) =
                (run(true, residual_after), run(false, residual_after));
            let err = relative_error(&yf, &yc);
            assert!(
                err <= 1e-6,
                "{residual_after:?}: value relative error {err:.2e}"
            );
            let err = relative_error(&dxf, &dxc);
            assert!(
                err <= 1e-5,
                "{residual_after:?}: dx relative error {err:.2e}"
            );
            assert_eq!(gf.len(), 2, "γ and β get gradients");
            for (name, g) in &gf {
                let err = relative_error(g, &gc[name]);
                assert!(
                    err <= 1e-5,
                    "{residual_after:?} {name}: relative error {err:.2e}"
                );
            }
        }
    }
}
