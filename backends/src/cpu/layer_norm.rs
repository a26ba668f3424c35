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
//! added in task order (deterministic). Inference needs no kernel: flex's
//! own `layer_norm` is already one pass.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::ModuleOps;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use clipa_core::nn::LayerNormKernel;
use rayon::prelude::*;

use super::vmath::{self, dot, sum, vectorised};
use super::{Backend, dense_flex, zeros};

/// The LayerNorm kernel of the CPU backend under autodiff.
pub struct FlexLayerNorm;

/// Rows per rayon task: enough to amortise a task's `[2, width]` partial
/// sums of the parameter gradients.
const ROWS: usize = 64;

impl LayerNormKernel<Backend> for FlexLayerNorm {
    fn layer_norm(
        &self,
        x: Tensor<Backend, 2>,
        gamma: Tensor<Backend, 1>,
        beta: Tensor<Backend, 1>,
        eps: f64,
    ) -> Tensor<Backend, 2> {
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
    x: Tensor<Backend, 2>,
    gamma: Tensor<Backend, 1>,
    beta: Tensor<Backend, 1>,
    eps: f64,
) -> Tensor<Backend, 2> {
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
    /// The normalised input x̂ = (x − mean)/√(var + ε), `[rows, width]`.
    x_hat: FlexTensor,
    /// √(var + ε) per row, `[rows]`.
    std: FlexTensor,
    /// γ, `[width]`.
    gamma: FlexTensor,
}

/// `x̂·γ + β`, and, when `save`, x̂ and √(var + ε) per row for backward.
/// As the decomposition computes it: the mean, the centred row, the biased
/// variance as the mean of its squares, √(var + ε), a division.
fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f32,
    save: bool,
) -> (FlexTensor, Option<(FlexTensor, FlexTensor)>) {
    let [rows, width] = x.layout().shape().dims::<2>();
    let shape = x.layout().shape().clone();
    let mut y = zeros(shape.clone());
    let (x, gamma, beta) = (
        x.storage::<f32>(),
        gamma.storage::<f32>(),
        beta.storage::<f32>(),
    );
    // One row; returns √(var + ε).
    let row = |x: &[f32], y: &mut [f32], x_hat: Option<&mut [f32]>| -> f32 {
        normalise_row(x, y, x_hat, gamma, beta, eps)
    };
    let ys = y.storage_mut::<f32>().par_chunks_mut(width);
    let xs = x.par_chunks(width);
    if !save {
        ys.zip(xs).with_min_len(ROWS).for_each(|(y, x)| {
            row(x, y, None);
        });
        return (y, None);
    }
    let mut x_hat = zeros(shape);
    let mut std = zeros(Shape::new([rows]));
    ys.zip(xs)
        .zip(x_hat.storage_mut::<f32>().par_chunks_mut(width))
        .zip(std.storage_mut::<f32>().par_iter_mut())
        .with_min_len(ROWS)
        .for_each(|(((y, x), h), sd)| *sd = row(x, y, Some(h)));
    (y, Some((x_hat, std)))
}

/// The backward step of [`FlexLayerNorm`].
#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = dense_flex(grads.consume::<Flex>(&ops.node));
        let [dx, dgamma, dbeta] = backward(&ops.state, &dy);
        for (parent, g) in ops.parents.into_iter().zip([dx, dgamma, dbeta]) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// `[dx, dγ, dβ]` from the output's gradient `dy` `[rows, width]`.
fn backward(saved: &Saved, dy: &FlexTensor) -> [FlexTensor; 3] {
    let [rows, width] = saved.x_hat.layout().shape().dims::<2>();
    let mut dx = zeros(Shape::new([rows, width]));
    let (x_hat, std, gamma, dy_s) = (
        saved.x_hat.storage::<f32>(),
        saved.std.storage::<f32>(),
        saved.gamma.storage::<f32>(),
        dy.storage::<f32>(),
    );
    // Each task: ROWS rows of dx, and its partial [dγ | dβ].
    let partials: Vec<Vec<f32>> = dx
        .storage_mut::<f32>()
        .par_chunks_mut(ROWS * width)
        .zip(x_hat.par_chunks(ROWS * width))
        .zip(dy_s.par_chunks(ROWS * width))
        .zip(std.par_chunks(ROWS))
        .map(|(((dx, x_hat), dy), std)| backward_rows(dx, x_hat, dy, std, gamma))
        .collect();
    let mut total = vmath::add_in_order(&partials, 2 * width);
    let dbeta = total.split_off(width);
    let param = |v: Vec<f32>| FlexTensor::from_data(burn::tensor::TensorData::new(v, [width]));
    [dx, param(total), param(dbeta)]
}

vectorised! {
    /// One row of [`forward`]: `y = x̂·γ + β` and, when given, x̂; returns
    /// √(var + ε).
    fn normalise_row(
        x: &[f32],
        y: &mut [f32],
        x_hat: Option<&mut [f32]>,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) -> f32 {
        let n = x.len() as f32;
        let mean = sum(x) / n;
        // y holds the centred row until the last pass.
        y.iter_mut().zip(x).for_each(|(c, &x)| *c = x - mean);
        let sd = (dot(y, y) / n + eps).sqrt();
        if let Some(x_hat) = x_hat {
            x_hat.iter_mut().zip(&*y).for_each(|(h, &c)| *h = c / sd);
        }
        y.iter_mut()
            .zip(gamma.iter().zip(beta))
            .for_each(|(c, (&g, &b))| *c = *c / sd * g + b);
        sd
    }
}

vectorised! {
    /// One task of [`backward`]: its rows of dx `[rows, width]`, written in
    /// place, and its partial `[dγ | dβ]` `[2·width]`.
    fn backward_rows(
        dx: &mut [f32],
        x_hat: &[f32],
        dy: &[f32],
        std: &[f32],
        gamma: &[f32],
    ) -> Vec<f32> {
        let width = gamma.len();
        let n = width as f32;
        let mut acc = vec![0f32; 2 * width];
        let (dgamma, dbeta) = acc.split_at_mut(width);
        let rows = dx
            .chunks_exact_mut(width)
            .zip(x_hat.chunks_exact(width))
            .zip(dy.chunks_exact(width))
            .zip(std);
        for (((dx, h), dy), &sd) in rows {
            // dx holds g = dy·γ until the last pass.
            dx.iter_mut()
                .zip(dy.iter().zip(gamma))
                .for_each(|(g, (&d, &w))| *g = d * w);
            let mean_g = sum(dx) / n;
            let mean_gh = dot(dx, h) / n;
            dx.iter_mut()
                .zip(h)
                .for_each(|(g, &h)| *g = (*g - mean_g - h * mean_gh) / sd);
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
    /// no multiple of 16, on an intermediate input as in the model.
    #[test]
    fn flex_layer_norm_matches_burns() {
        let device = Default::default();
        let (rows, width) = (3 * ROWS + 7, 37);
        let mut ln = LayerNormConfig::new(width)
            .with_epsilon(1e-5)
            .init::<Backend>(&device);
        // Non-trivial γ and β, so that their gradients and uses are tested.
        let param =
            |seed| Param::from_tensor(Tensor::from_data(normal_data([width], seed, 1.0), &device));
        ln.gamma = param(5);
        ln.beta = Some(param(6));
        let w = Tensor::<Backend, 2>::from_data(normal_data([rows, width], 9, 1.0), &device);
        let run = |fused: bool| {
            let x = Tensor::<Backend, 2>::from_data(normal_data([rows, width], 1, 2.0), &device)
                .require_grad();
            let h = x.clone() * 1.5 + 0.3;
            let y = if fused {
                let beta = ln.beta.as_ref().expect("a bias").val();
                FlexLayerNorm.layer_norm(h, ln.gamma.val(), beta, 1e-5)
            } else {
                ln.forward(h)
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            let dx = x.grad(&grads).expect("x has a gradient").into_data();
            (y.into_data(), dx, grads_dict(&ln, &grads))
        };
        let ((yf, dxf, gf), (yc, dxc, gc)) = (run(true), run(false));
        let err = relative_error(&yf, &yc);
        assert!(err <= 1e-6, "value relative error {err:.2e}");
        let err = relative_error(&dxf, &dxc);
        assert!(err <= 1e-5, "dx relative error {err:.2e}");
        assert_eq!(gf.len(), 2, "γ and β get gradients");
        for (name, g) in &gf {
            let err = relative_error(g, &gc[name]);
            assert!(err <= 1e-5, "{name}: relative error {err:.2e}");
        }
    }
}
