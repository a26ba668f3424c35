//! LayerNorm as our own CubeCL kernels (wgpu, cuda), forward and backward,
//! for training: one launch forward and two backward, where Burn 0.21's
//! autodiff runs the decomposed norm (means, variance, their gradients).

use std::marker::PhantomData;

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, tensor::CubeTensor};
use burn_fusion::stream::Operation;
use burn_fusion::{Fusion, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer};
use clipa_core::kernels::LayerNormKernel;
use cubecl::{CubeCount, CubeDim};

use super::common::{Fr, empty, execute, grid, register, take_earlier_grad, tracked};

/// The inner (non-autodiff) CubeCL backend with Burn's fusion, float32.
type Inner<R, BT> = Fusion<CubeBackend<R, f32, i32, BT>>;

/// Units per cube: one row (forward) or part (backward) a cube, its units
/// striding over the row's columns, or one column a unit (the parameter
/// gradients' totals).
const UNITS: u32 = 128;

/// Rows each cube of the backward takes, one after another: the parts of
/// the parameter gradients' first phase. Fewer rows a cube would give a
/// GPU more cubes but phase two more parts to add.
const ROWS_PER_PART: usize = 32;

/// `(x − mean)·rstd·γ + β` over each row, in our kernels, with its
/// backward, on the autodiff backend that trains.
///
/// - Forward, one launch: a cube per row; the mean, then the variance
///   about it (two passes over the row, in cache), by cube-wide sums; the
///   row's mean and 1/√(var + ε) are saved.
/// - Backward, two launches and no atomics: a cube per 32 rows gives,
///   row after row, the input gradient rstd·(g − mean(g) − x̂·mean(g·x̂))
///   with g = dy·γ, and the part's sums of dy·x̂ and dy per column; then
///   per column, their totals dγ, dβ in part order. x's gradient from its
///   other uses so far (a pre-LN block's residual branch) is added into
///   dx by the first launch, where autodiff would add it in one more.
///
/// Reads and writes: forward, x twice and y once per element; backward, x
/// and dy twice and dx once. Burn's decomposition makes about 4 passes
/// forward and 10 backward, each a launch.
pub struct CubeLayerNorm;

impl<R: CubeRuntime, BT: BoolElement> LayerNormKernel<Autodiff<Inner<R, BT>>> for CubeLayerNorm {
    fn layer_norm(
        &self,
        x: Tensor<Autodiff<Inner<R, BT>>, 3>,
        gamma: Tensor<Autodiff<Inner<R, BT>>, 1>,
        beta: Tensor<Autodiff<Inner<R, BT>>, 1>,
        eps: f64,
    ) -> Tensor<Autodiff<Inner<R, BT>>, 3> {
        let f32_only = [x.dtype(), gamma.dtype(), beta.dtype()]
            .iter()
            .all(|d| *d == DType::F32);
        if !f32_only {
            return composed(x, gamma, beta, eps);
        }
        let x = x.into_primitive().tensor();
        let [gamma, beta] = [gamma, beta].map(|t| t.into_primitive().tensor());
        let [y, mean, rstd] = forward::<R, BT>(
            x.primitive.clone(),
            gamma.primitive.clone(),
            beta.primitive.clone(),
            eps,
        );
        let state = [x.primitive.clone(), gamma.primitive.clone(), mean, rstd];
        let out = tracked(
            LayerNormBackward::<R, BT>(PhantomData),
            [&x, &gamma, &beta],
            state,
            y,
        );
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// The LayerNorm from Burn's ops, for dtypes the kernels do not take.
fn composed<B: burn::tensor::backend::Backend>(
    x: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 3> {
    let [_, _, w] = x.dims();
    let mean = x.clone().mean_dim(2); // [batch, tokens, 1]
    let xc = x - mean;
    let var = xc.clone().powi_scalar(2).mean_dim(2); // [batch, tokens, 1]
    let xhat = xc / (var + eps).sqrt();
    xhat * gamma.reshape([1, 1, w]) + beta.reshape([1, 1, w])
}

/// The backward of [`CubeLayerNorm`]; its state is `[x, γ, mean, rstd]`.
#[derive(Debug)]
struct LayerNormBackward<R, BT>(PhantomData<(R, BT)>);

impl<R: CubeRuntime, BT: BoolElement> Backward<Inner<R, BT>, 3> for LayerNormBackward<R, BT> {
    type State = [FusionTensor<Fr<R>>; 4];

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dy = grads.consume::<Inner<R, BT>>(&ops.node);
        let x_shape = ops.state[0].shape.clone();
        // x's gradient from its other uses so far (a pre-LN block's
        // residual branch): the first launch adds it into dx.
        let device = dy.client.device().clone();
        let earlier = take_earlier_grad::<R, BT, _, 3>(grads, &ops, 0, &x_shape, &device);
        let [nx, ngamma, nbeta] = ops.parents;
        let [x, gamma, mean, rstd] = ops.state;
        let w = gamma.shape.num_elements();
        let rows = x.shape.num_elements() / w;
        let shapes = vec![x_shape, Shape::new([w]), Shape::new([w])];
        let mut inputs = vec![x, gamma, mean, rstd, dy];
        inputs.extend(earlier);
        let out = register::<R, _>("clipa_layer_norm_backward", inputs, shapes, |desc| {
            LayerNormOp::<CubeBackend<R, f32, i32, BT>> {
                desc,
                eps: 0.0,
                rows,
                backward: true,
                _b: PhantomData,
            }
        });
        for (node, g) in [nx, ngamma, nbeta].into_iter().zip(out) {
            if let Some(node) = node {
                grads.register::<Inner<R, BT>>(node.id, g);
            }
        }
    }
}

/// `[y, mean, rstd]`: y of x's shape, mean and rstd `[rows]`.
fn forward<R: CubeRuntime, BT: BoolElement>(
    x: FusionTensor<Fr<R>>,
    gamma: FusionTensor<Fr<R>>,
    beta: FusionTensor<Fr<R>>,
    eps: f64,
) -> [FusionTensor<Fr<R>>; 3] {
    let rows = x.shape.num_elements() / gamma.shape.num_elements();
    let shapes = vec![x.shape.clone(), Shape::new([rows]), Shape::new([rows])];
    let out = register::<R, _>("clipa_layer_norm", vec![x, gamma, beta], shapes, |desc| {
        LayerNormOp::<CubeBackend<R, f32, i32, BT>> {
            desc,
            eps,
            rows,
            backward: false,
            _b: PhantomData,
        }
    });
    out.try_into().expect("three outputs")
}

/// The forward or the backward as an operation on the fusion stream.
#[derive(Debug)]
struct LayerNormOp<B> {
    desc: CustomOpIr,
    eps: f64,
    rows: usize,
    backward: bool,
    _b: PhantomData<B>,
}

impl<R: CubeRuntime, BT: BoolElement> Operation<Fr<R>>
    for LayerNormOp<CubeBackend<R, f32, i32, BT>>
{
    fn execute(&self, handles: &mut HandleContainer<<Fr<R> as FusionRuntime>::FusionHandle>) {
        execute::<R, BT>(handles, &self.desc, true, |inputs| match self.backward {
            false => launch_forward(&inputs, self.rows, self.eps),
            true => launch_backward(&inputs, self.rows),
        });
    }
}

/// `[y, mean, rstd]` from contiguous `[x, γ, β]`.
fn launch_forward<R: CubeRuntime>(
    inputs: &[CubeTensor<R>],
    rows: usize,
    eps: f64,
) -> Vec<CubeTensor<R>> {
    let [x, gamma, beta] = [&inputs[0], &inputs[1], &inputs[2]];
    let y = empty(x, x.meta.shape().clone());
    let (mean, rstd) = (empty(x, Shape::new([rows])), empty(x, Shape::new([rows])));
    let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
    kernel::forward_kernel::launch::<R>(
        &x.client,
        grid(rows),
        CubeDim::new_1d(UNITS),
        arg(x),
        arg(gamma),
        arg(beta),
        arg(&y),
        arg(&mean),
        arg(&rstd),
        rows,
        eps as f32,
        UNITS as usize,
        DType::F32.into(),
    );
    vec![y, mean, rstd]
}

/// `[dx, dγ, dβ]` from contiguous `[x, γ, mean, rstd, dy]`, and x's
/// earlier gradient to add into dx where one follows.
fn launch_backward<R: CubeRuntime>(inputs: &[CubeTensor<R>], rows: usize) -> Vec<CubeTensor<R>> {
    let [x, gamma, mean, rstd, dy] = [0, 1, 2, 3, 4].map(|i| &inputs[i]);
    // Without one, dy stands in (bound read-only, never read as such).
    let earlier = inputs.get(5);
    let w = gamma.meta.num_elements();
    let dx = empty(x, x.meta.shape().clone());
    let parts = rows.div_ceil(ROWS_PER_PART);
    // [parts, w] each: phase one's sums of dy·x̂ and dy over 32 rows.
    let (pg, pb) = (
        empty(x, Shape::new([parts, w])),
        empty(x, Shape::new([parts, w])),
    );
    let (dgamma, dbeta) = (empty(x, Shape::new([w])), empty(x, Shape::new([w])));
    let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
    kernel::backward_kernel::launch::<R>(
        &x.client,
        grid(parts),
        CubeDim::new_1d(UNITS),
        arg(x),
        arg(gamma),
        arg(mean),
        arg(rstd),
        arg(dy),
        arg(earlier.unwrap_or(dy)),
        arg(&dx),
        arg(&pg),
        arg(&pb),
        rows,
        ROWS_PER_PART,
        UNITS as usize,
        earlier.is_some(),
        DType::F32.into(),
    );
    let columns = w.div_ceil(UNITS as usize) as u32;
    kernel::param_total_kernel::launch::<R>(
        &x.client,
        CubeCount::Static(columns, 1, 1),
        CubeDim::new_1d(UNITS),
        arg(&pg),
        arg(&pb),
        arg(&dgamma),
        arg(&dbeta),
        DType::F32.into(),
    );
    vec![dx, dgamma, dbeta]
}

mod kernel {
    use cubecl::prelude::*;

    use crate::cube::common::kernel::{cube_index, tree_sum};

    /// `Σ` over the cube of each unit's `value`, seen by every unit.
    #[cube]
    fn cube_sum<F: Float>(value: F, #[comptime] units: usize) -> F {
        let mut shared = SharedMemory::<F>::new(units);
        shared[UNIT_POS_X as usize] = value;
        sync_cube();
        tree_sum::<F>(&mut shared);
        let total = shared[0];
        sync_cube();
        total
    }

    /// A cube per row of x `[rows, w]`: y = (x − mean)·rstd·γ + β.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_kernel<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        beta: &Tensor<F>,
        y: &mut Tensor<F>,
        mean: &mut Tensor<F>,
        rstd: &mut Tensor<F>,
        rows: usize,
        eps: f32,
        #[comptime] units: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let r = cube_index();
        // The whole cube takes the same branch, so its syncs stay uniform.
        if r < rows {
            let w = gamma.len();
            let base = r * w;
            let wf = F::cast_from(w as u32);
            let mut s = F::new(0.0);
            let mut c = UNIT_POS_X as usize;
            while c < w {
                s += x[base + c];
                c += units;
            }
            let mu = cube_sum::<F>(s, units) / wf;
            let mut q = F::new(0.0);
            c = UNIT_POS_X as usize;
            while c < w {
                let d = x[base + c] - mu;
                q += d * d;
                c += units;
            }
            let inv = F::new(1.0) / F::sqrt(cube_sum::<F>(q, units) / wf + F::cast_from(eps));
            c = UNIT_POS_X as usize;
            while c < w {
                y[base + c] = (x[base + c] - mu) * inv * gamma[c] + beta[c];
                c += units;
            }
            if UNIT_POS_X == 0 {
                mean[r] = mu;
                rstd[r] = inv;
            }
        }
    }

    /// A cube per part of `per` rows, row after row: dx = rstd·(g −
    /// mean(g) − x̂·mean(g·x̂)), g = dy·γ (plus `earlier` where
    /// `accumulate`), and the part's sums of dy·x̂ and dy into `pg`, `pb`
    /// `[parts, w]`, each unit adding into its own columns.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_kernel<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        mean: &Tensor<F>,
        rstd: &Tensor<F>,
        dy: &Tensor<F>,
        earlier: &Tensor<F>,
        dx: &mut Tensor<F>,
        pg: &mut Tensor<F>,
        pb: &mut Tensor<F>,
        rows: usize,
        #[comptime] per: usize,
        #[comptime] units: usize,
        #[comptime] accumulate: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let part = cube_index();
        let parts = pg.shape(0);
        // The whole cube takes the same branch, so its syncs stay uniform.
        if part < parts {
            let w = gamma.len();
            let wf = F::cast_from(w as u32);
            let mut c = UNIT_POS_X as usize;
            while c < w {
                pg[part * w + c] = F::new(0.0);
                pb[part * w + c] = F::new(0.0);
                c += units;
            }
            let mut r = part * per;
            let mut end = r + per;
            if end > rows {
                end = rows;
            }
            while r < end {
                let base = r * w;
                let mu = mean[r];
                let inv = rstd[r];
                let mut a = F::new(0.0);
                let mut b = F::new(0.0);
                c = UNIT_POS_X as usize;
                while c < w {
                    let g = dy[base + c] * gamma[c];
                    a += g;
                    b += g * (x[base + c] - mu) * inv;
                    c += units;
                }
                let a = cube_sum::<F>(a, units) / wf;
                let b = cube_sum::<F>(b, units) / wf;
                c = UNIT_POS_X as usize;
                while c < w {
                    let d = dy[base + c];
                    let xhat = (x[base + c] - mu) * inv;
                    let mut g = inv * (d * gamma[c] - a - xhat * b);
                    if accumulate {
                        g += earlier[base + c];
                    }
                    dx[base + c] = g;
                    pg[part * w + c] += d * xhat;
                    pb[part * w + c] += d;
                    c += units;
                }
                r += 1;
            }
        }
    }

    /// A unit per column: dγ, dβ as the totals of the parts, in order.
    #[cube(launch)]
    pub(super) fn param_total_kernel<F: Float>(
        pg: &Tensor<F>,
        pb: &Tensor<F>,
        dgamma: &mut Tensor<F>,
        dbeta: &mut Tensor<F>,
        #[define(F)] _dtype: StorageType,
    ) {
        let w = pg.shape(1);
        let parts = pg.shape(0);
        let c = ABSOLUTE_POS_X as usize;
        if c < w {
            let mut g = F::new(0.0);
            let mut b = F::new(0.0);
            let mut p = 0usize;
            while p < parts {
                g += pg[p * w + c];
                b += pb[p * w + c];
                p += 1;
            }
            dgamma[c] = g;
            dbeta[c] = b;
        }
    }
}
