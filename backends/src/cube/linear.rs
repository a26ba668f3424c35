//! `x·W + b` for training on wgpu and cuda: Burn's matrix products, with
//! the backward's bias gradient and split-K weight-gradient sum in one
//! launch of ours, where Burn 0.21's `linear` backward runs three
//! reductions (the weight's batch sum and the bias's two axis sums).

use std::marker::PhantomData;

use burn::tensor::{DType, FloatDType, Shape, Tensor, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, tensor::CubeTensor};
use burn_fusion::stream::Operation;
use burn_fusion::{Fusion, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer};
use clipa_core::kernels::{LinearKernel, linear_composed, split_k_chunks};
use cubecl::CubeDim;

use super::common::{Fr, empty_as, execute, grid, register_as, register_typed, tracked};

/// The inner (non-autodiff) CubeCL backend with Burn's fusion.
type Inner<R, BT> = Fusion<CubeBackend<R, f32, i32, BT>>;

/// Units per cube of the sums.
pub(super) const UNITS: u32 = 256;
/// Columns of the bias gradient each cube adds up; its `UNITS / COLS`
/// lanes stride over the rows.
pub(super) const COLS: usize = 32;

/// A linear layer `x·W + b` (+ a residual) on the autodiff backend that
/// trains.
///
/// - Forward: one product `[rows, d_in]·[d_in, d_out]` with the bias added
///   (Burn's fusion folds the add into the product's output).
/// - Backward, three launches: dx = dy·Wᵀ; the weight gradient as split-K
///   partials `[chunks, d_in, d_out]` (each a deep GEMM over about
///   [`ROWS_PER_CHUNK`](clipa_core::kernels::ROWS_PER_CHUNK) rows, so a GPU
///   has thread blocks to spare); and one launch of ours that adds the
///   partials in chunk order into dW and the rows of dy into db, in fixed
///   order with no atomics. Burn's composition runs those as three
///   reductions after the two products.
///
/// The sums read the partials once (`chunks·d_in·d_out`) and dy once
/// (`rows·d_out`), and accumulate in float32 for bf16 inputs.
///
/// Mixed precision: W and b stay the float32 master weights; one launch of
/// ours casts both to x's bf16 for the product (a cast of each and their
/// backward took four), and the sums write their gradients in float32.
pub struct CubeLinear;

impl<R: CubeRuntime, BT: BoolElement> LinearKernel<Autodiff<Inner<R, BT>>> for CubeLinear {
    fn linear(
        &self,
        x: Tensor<Autodiff<Inner<R, BT>>, 3>,
        w: Tensor<Autodiff<Inner<R, BT>>, 2>,
        b: Tensor<Autodiff<Inner<R, BT>>, 1>,
        residual: Option<Tensor<Autodiff<Inner<R, BT>>, 3>>,
    ) -> Tensor<Autodiff<Inner<R, BT>>, 3> {
        let dtype = x.dtype();
        // The parameters' dtype: x's, or float32 master weights under mixed
        // precision, cast by a launch of ours.
        let master = w.dtype();
        let takes = matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && (master == dtype || master == DType::F32)
            && b.dtype() == master;
        let y = if takes {
            let [batch, tokens, d_in] = x.dims();
            let d_out = w.dims()[1];
            let [x, w, b] = [
                x.into_primitive().tensor(),
                w.into_primitive().tensor(),
                b.into_primitive().tensor(),
            ];
            let inner = |t: &FusionTensor<Fr<R>>| -> TensorPrimitive<Inner<R, BT>> {
                TensorPrimitive::Float(t.clone())
            };
            // W and b in x's dtype, `[d_in, d_out]` and `[d_out]`.
            let (wc, bc) = match master == dtype {
                true => (w.primitive.clone(), b.primitive.clone()),
                false => cast_pair::<R, BT>(w.primitive.clone(), b.primitive.clone(), dtype),
            };
            let xi = Tensor::<Inner<R, BT>, 3>::from_primitive(inner(&x.primitive));
            let wi = Tensor::<Inner<R, BT>, 2>::from_primitive(inner(&wc));
            let bi = Tensor::<Inner<R, BT>, 1>::from_primitive(inner(&bc));
            let y = xi.reshape([batch * tokens, d_in]).matmul(wi) + bi.reshape([1, d_out]); // [rows, d_out]
            let y = y.reshape([batch, tokens, d_out]).into_primitive().tensor();
            let state = [x.primitive.clone(), wc];
            let op = LinearBackward::<R, BT>(master, PhantomData);
            let out = tracked(op, [&x, &w, &b], state, y);
            Tensor::from_primitive(TensorPrimitive::Float(out))
        } else {
            let cast = FloatDType::from(dtype);
            linear_composed(x, w.cast(cast), Some(b.cast(cast)))
        };
        match residual {
            Some(r) => r + y,
            None => y,
        }
    }

    fn takes_master_weights(&self) -> bool {
        true
    }
}

/// The backward of [`CubeLinear`], with the parameters' dtype (their
/// gradients'); its state is `[x, W]`, W in x's dtype.
#[derive(Debug)]
struct LinearBackward<R, BT>(DType, PhantomData<(R, BT)>);

impl<R: CubeRuntime, BT: BoolElement> Backward<Inner<R, BT>, 3> for LinearBackward<R, BT> {
    type State = [FusionTensor<Fr<R>>; 2];

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        type T<R, BT, const D: usize> = Tensor<Inner<R, BT>, D>;
        let [nx, nw, nb] = ops.parents;
        let dy = grads.consume::<Inner<R, BT>>(&ops.node);
        let [x, w] = ops.state;
        let [batch, tokens, d_in] = x.shape.dims::<3>();
        let d_out = w.shape.dims::<2>()[1];
        let rows = batch * tokens;
        let dy = T::<R, BT, 3>::from_primitive(TensorPrimitive::Float(dy)).reshape([rows, d_out]); // [rows, d_out]
        if let Some(node) = nx {
            let w = T::<R, BT, 2>::from_primitive(TensorPrimitive::Float(w));
            let dx = dy
                .clone()
                .matmul(w.transpose())
                .reshape([batch, tokens, d_in]);
            grads.register::<Inner<R, BT>>(node.id, dx.into_primitive().tensor());
        }
        if nw.is_none() && nb.is_none() {
            return;
        }
        let x = T::<R, BT, 3>::from_primitive(TensorPrimitive::Float(x));
        let master = self.0;
        let chunks = split_k_chunks(rows);
        // dW whole from one product, or as split-K partials [chunks, d_in,
        // d_out] for the sums to add. Float32 master weights take theirs
        // from the sums even in one chunk: the sums write float32.
        let direct = chunks == 1 && master == dy.dtype();
        let (dw, parts) = match &nw {
            None => (None, None),
            Some(_) if direct => {
                let dw = x.reshape([rows, d_in]).transpose().matmul(dy.clone());
                (Some(dw.into_primitive().tensor()), None)
            }
            Some(_) => {
                let per = rows / chunks;
                let parts = x
                    .reshape([chunks, per, d_in])
                    .swap_dims(1, 2)
                    .matmul(dy.clone().reshape([chunks, per, d_out])); // [chunks, d_in, d_out]
                (None, Some(parts.into_primitive().tensor()))
            }
        };
        let dy = dy.into_primitive().tensor();
        let (dw, db) = match (parts, &nb) {
            (Some(parts), _) => {
                let mut out = sums::<R, BT>(Some(parts), dy, d_in, master).into_iter();
                (out.next(), out.next())
            }
            (None, Some(_)) => (dw, sums::<R, BT>(None, dy, d_in, master).pop()),
            (None, None) => (dw, None),
        };
        if let (Some(node), Some(dw)) = (nw, dw) {
            let dw =
                T::<R, BT, 1>::from_primitive(TensorPrimitive::Float(dw)).reshape([d_in, d_out]);
            grads.register::<Inner<R, BT>>(node.id, dw.into_primitive().tensor());
        }
        if let (Some(node), Some(db)) = (nb, db) {
            grads.register::<Inner<R, BT>>(node.id, db);
        }
    }
}

/// One launch: `[dW, db]` (dW flat, `[d_in·d_out]`) in `dtype` from the
/// partials `[chunks, d_in, d_out]` and dy `[rows, d_out]`, or `[db]`
/// alone without partials.
fn sums<R: CubeRuntime, BT: BoolElement>(
    parts: Option<FusionTensor<Fr<R>>>,
    dy: FusionTensor<Fr<R>>,
    d_in: usize,
    dtype: DType,
) -> Vec<FusionTensor<Fr<R>>> {
    let d_out = dy.shape.dims::<2>()[1];
    let mut shapes = vec![Shape::new([d_out])];
    let mut inputs = vec![dy];
    if let Some(parts) = parts {
        shapes.insert(0, Shape::new([d_in * d_out]));
        inputs.insert(0, parts);
    }
    register_as::<R, _>("clipa_linear_grad_sums", inputs, shapes, dtype, |desc| {
        LinearOp::<CubeBackend<R, f32, i32, BT>> {
            desc,
            cast: false,
            _b: PhantomData,
        }
    })
}

/// One launch: W `[d_in, d_out]` and b `[d_out]` cast to `dtype` (mixed
/// precision's float32 master weights to the product's bf16).
fn cast_pair<R: CubeRuntime, BT: BoolElement>(
    w: FusionTensor<Fr<R>>,
    b: FusionTensor<Fr<R>>,
    dtype: DType,
) -> (FusionTensor<Fr<R>>, FusionTensor<Fr<R>>) {
    let outputs = vec![(w.shape.clone(), dtype), (b.shape.clone(), dtype)];
    let out = register_typed::<R, _>("clipa_linear_cast", vec![w, b], outputs, |desc| LinearOp::<
        CubeBackend<R, f32, i32, BT>,
    > {
        desc,
        cast: true,
        _b: PhantomData,
    });
    let [wc, bc]: [FusionTensor<Fr<R>>; 2] = out.try_into().expect("two outputs");
    (wc, bc)
}

/// [`sums`] or [`cast_pair`] as an operation on the fusion stream.
#[derive(Debug)]
struct LinearOp<B> {
    desc: CustomOpIr,
    cast: bool,
    _b: PhantomData<B>,
}

impl<R: CubeRuntime, BT: BoolElement> Operation<Fr<R>> for LinearOp<CubeBackend<R, f32, i32, BT>> {
    fn execute(&self, handles: &mut HandleContainer<<Fr<R> as FusionRuntime>::FusionHandle>) {
        // Outputs are of one dtype, which the registration set.
        let dtype = self.desc.outputs[0].dtype;
        execute::<R, BT>(handles, &self.desc, true, |inputs| match self.cast {
            false => launch(&inputs, dtype),
            true => launch_cast(&inputs, dtype),
        });
    }
}

/// `[W, b]` in `dtype` from contiguous `[W, b]`.
fn launch_cast<R: CubeRuntime>(inputs: &[CubeTensor<R>], dtype: DType) -> Vec<CubeTensor<R>> {
    let [w, b] = [&inputs[0], &inputs[1]];
    let wc = empty_as(w, w.meta.shape().clone(), dtype);
    let bc = empty_as(w, b.meta.shape().clone(), dtype);
    let total = w.meta.num_elements() + b.meta.num_elements();
    let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
    kernel::cast_pair_kernel::launch::<R>(
        &w.client,
        grid(total.div_ceil(UNITS as usize)),
        CubeDim::new_1d(UNITS),
        arg(w),
        arg(b),
        arg(&wc),
        arg(&bc),
        UNITS as usize,
        [w.dtype.into(), dtype.into()],
    );
    vec![wc, bc]
}

/// `[dW, db]` in `dtype` from contiguous `[parts, dy]`, or `[db]` from
/// `[dy]`.
fn launch<R: CubeRuntime>(inputs: &[CubeTensor<R>], dtype: DType) -> Vec<CubeTensor<R>> {
    let dy = inputs.last().expect("dy");
    let [rows, d_out] = dy.meta.shape().dims::<2>();
    let db = empty_as(dy, Shape::new([d_out]), dtype);
    let db_cubes = d_out.div_ceil(COLS);
    let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
    let dim = CubeDim::new_1d(UNITS);
    match inputs {
        [parts, dy] => {
            let n = parts.meta.num_elements() / parts.meta.shape()[0];
            let dw = empty_as(dy, Shape::new([n]), dtype);
            let dw_cubes = n.div_ceil(UNITS as usize);
            kernel::sums_kernel::launch::<R>(
                &dy.client,
                grid(dw_cubes + db_cubes),
                dim,
                arg(parts),
                arg(dy),
                arg(&dw),
                arg(&db),
                dw_cubes,
                rows,
                COLS,
                UNITS as usize,
                [dy.dtype.into(), dtype.into()],
            );
            vec![dw, db]
        }
        _ => {
            kernel::bias_kernel::launch::<R>(
                &dy.client,
                grid(db_cubes),
                dim,
                arg(dy),
                arg(&db),
                rows,
                COLS,
                UNITS as usize,
                [dy.dtype.into(), dtype.into()],
            );
            vec![db]
        }
    }
}

pub(super) mod kernel {
    use cubecl::prelude::*;

    use crate::cube::common::kernel::cube_index;

    /// Cube `j` of a bias gradient: `Σ_r dy[r, c]` over the `rows` rows of
    /// `dy` `[rows, d_out]` for its `cols` columns `c`, each column's rows
    /// split over the cube's lanes (four loads in flight a lane) and the
    /// lanes' sums added in lane order. The total of column `j·cols + u` is
    /// returned to unit `u < cols` (lane 0); every unit of the cube must
    /// call it.
    #[cube]
    pub(in crate::cube) fn column_total<F: Float>(
        dy: &Tensor<F>,
        j: usize,
        rows: usize,
        #[comptime] cols: usize,
        #[comptime] units: usize,
    ) -> f32 {
        let d_out = dy.shape(1);
        let u = UNIT_POS_X as usize;
        let lanes = units / cols;
        let c = j * cols + u % cols;
        let lane = u / cols;
        let mut acc = f32::new(0.0);
        if c < d_out {
            let step = lanes * 4;
            let mut a0 = f32::new(0.0);
            let mut a1 = f32::new(0.0);
            let mut a2 = f32::new(0.0);
            let mut a3 = f32::new(0.0);
            let mut r = lane;
            while r + 3 * lanes < rows {
                a0 += f32::cast_from(dy[r * d_out + c]);
                a1 += f32::cast_from(dy[(r + lanes) * d_out + c]);
                a2 += f32::cast_from(dy[(r + 2 * lanes) * d_out + c]);
                a3 += f32::cast_from(dy[(r + 3 * lanes) * d_out + c]);
                r += step;
            }
            while r < rows {
                a0 += f32::cast_from(dy[r * d_out + c]);
                r += lanes;
            }
            acc = (a0 + a1) + (a2 + a3);
        }
        let mut shared = SharedMemory::<f32>::new(units);
        shared[u] = acc;
        sync_cube();
        let mut total = f32::new(0.0);
        if lane == 0 {
            let mut l = 0usize;
            while l < lanes {
                total += shared[l * cols + u];
                l += 1;
            }
        }
        total
    }

    /// Cube `j` of the bias gradient `db[c] = Σ_r dy[r, c]`
    /// ([`column_total`]), written in `G`.
    #[cube]
    fn bias_cube<F: Float, G: Float>(
        dy: &Tensor<F>,
        db: &mut Tensor<G>,
        j: usize,
        rows: usize,
        #[comptime] cols: usize,
        #[comptime] units: usize,
    ) {
        let total = column_total::<F>(dy, j, rows, cols, units);
        let u = UNIT_POS_X as usize;
        let c = j * cols + u;
        if u < cols && c < db.len() {
            db[c] = G::cast_from(total);
        }
    }

    /// The weight gradient's split-K sum, then the bias gradient: cubes
    /// below `dw_cubes` give `dw[i] = Σ_k parts[k, i]` (a unit an element,
    /// chunks in order), the rest are [`bias_cube`]s. Added in float32,
    /// written in `G` (float32 master weights under mixed precision).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sums_kernel<F: Float, G: Float>(
        parts: &Tensor<F>,
        dy: &Tensor<F>,
        dw: &mut Tensor<G>,
        db: &mut Tensor<G>,
        dw_cubes: usize,
        rows: usize,
        #[comptime] cols: usize,
        #[comptime] units: usize,
        #[define(F, G)] _dtypes: [StorageType; 2],
    ) {
        let j = cube_index();
        // The whole cube takes the same branch, so the bias cubes' sync
        // stays uniform.
        if j < dw_cubes {
            let n = dw.len();
            let i = j * units + UNIT_POS_X as usize;
            if i < n {
                let chunks = parts.len() / n;
                let mut acc = f32::new(0.0);
                let mut k = 0usize;
                while k < chunks {
                    acc += f32::cast_from(parts[k * n + i]);
                    k += 1;
                }
                dw[i] = G::cast_from(acc);
            }
        } else {
            bias_cube::<F, G>(dy, db, j - dw_cubes, rows, cols, units);
        }
    }

    /// The bias gradient alone: every cube a [`bias_cube`].
    #[cube(launch)]
    pub(super) fn bias_kernel<F: Float, G: Float>(
        dy: &Tensor<F>,
        db: &mut Tensor<G>,
        rows: usize,
        #[comptime] cols: usize,
        #[comptime] units: usize,
        #[define(F, G)] _dtypes: [StorageType; 2],
    ) {
        bias_cube::<F, G>(dy, db, cube_index(), rows, cols, units);
    }

    /// A unit per element of W, then of b, each cast from `I` to `O`.
    #[cube(launch)]
    pub(super) fn cast_pair_kernel<I: Float, O: Float>(
        w: &Tensor<I>,
        b: &Tensor<I>,
        wo: &mut Tensor<O>,
        bo: &mut Tensor<O>,
        #[comptime] units: usize,
        #[define(I, O)] _dtypes: [StorageType; 2],
    ) {
        let n = w.len();
        let i = cube_index() * units + UNIT_POS_X as usize;
        if i < n {
            wo[i] = O::cast_from(w[i]);
        } else if i < n + b.len() {
            bo[i - n] = O::cast_from(b[i - n]);
        }
    }
}
