//! The query, key and value projections as one product on wgpu and cuda:
//! `x·[Wq | Wk | Wv] + [bq | bk | bv]`, written packed for the attention
//! kernel ([`super::CubeAttention::attention_packed`]), with the weights
//! and biases staying three parameters each (OpenCLIP's `in_proj` split in
//! three, the layout of checkpoints and imports).

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
use clipa_core::kernels::{QkvKernel, qkv_composed, split_k_chunks};
use cubecl::CubeDim;

use super::common::{Fr, empty_as, execute, grid, register_as, tracked};
use super::linear::{COLS, UNITS};

/// The inner (non-autodiff) CubeCL backend with Burn's fusion.
type Inner<R, BT> = Fusion<CubeBackend<R, f32, i32, BT>>;

/// `x·[Wq | Wk | Wv] + [bq | bk | bv]` on the autodiff backend that trains.
///
/// - Forward, two launches: ours packs the three weights into one
///   `[d_in, 3·width]` and the biases into one `[3·width]` (3·d_in·width +
///   3·width elements copied), then one product with the bias added by
///   Burn's fusion. Three separate projections are three products.
/// - Backward, three launches: dx = dy·Wᵀ against the packed weight; the
///   weight gradient as split-K partials `[chunks, d_in, 3·width]` (one
///   chunk below [`ROWS_PER_CHUNK`](clipa_core::kernels::ROWS_PER_CHUNK)·2
///   rows); and one launch of ours that adds the partials in chunk order
///   and the rows of dy, writing the six gradients (three weights, three
///   biases) apart. Three projections take nine launches, and two adds
///   for x's gradient.
/// - Mixed precision: the parameters stay the float32 master weights; the
///   packing launch casts them to x's bf16 as it copies, and the sums
///   write their gradients in float32. No cast of its own either way,
///   where a cast per parameter and its backward took twelve launches.
pub struct CubeQkv;

impl<R: CubeRuntime, BT: BoolElement> QkvKernel<Autodiff<Inner<R, BT>>> for CubeQkv {
    fn qkv(
        &self,
        x: Tensor<Autodiff<Inner<R, BT>>, 3>,
        w: [Tensor<Autodiff<Inner<R, BT>>, 2>; 3],
        b: [Tensor<Autodiff<Inner<R, BT>>, 1>; 3],
    ) -> Tensor<Autodiff<Inner<R, BT>>, 3> {
        let dtype = x.dtype();
        // The parameters' dtype: x's, or float32 master weights under
        // mixed precision, cast by the packing launch.
        let master = w[0].dtype();
        let shapes_agree = w.iter().all(|t| t.dims() == w[0].dims())
            && b.iter().all(|t| t.dims() == [w[0].dims()[1]]);
        let takes = matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && (master == dtype || master == DType::F32)
            && shapes_agree
            && w.iter().all(|t| t.dtype() == master)
            && b.iter().all(|t| t.dtype() == master);
        if !takes {
            let cast = FloatDType::from(dtype);
            return qkv_composed(x, w.map(|t| t.cast(cast)), b.map(|t| t.cast(cast)));
        }
        let [batch, tokens, d_in] = x.dims();
        let width = w[0].dims()[1];
        let x = x.into_primitive().tensor();
        let w = w.map(|t| t.into_primitive().tensor());
        let b = b.map(|t| t.into_primitive().tensor());
        let inputs: Vec<FusionTensor<Fr<R>>> = w
            .iter()
            .chain(b.iter())
            .map(|t| t.primitive.clone())
            .collect();
        let shapes = vec![Shape::new([d_in, 3 * width]), Shape::new([3 * width])];
        let mut packed =
            register_as::<R, _>("clipa_qkv_pack", inputs, shapes, dtype, |desc| QkvOp::<
                CubeBackend<R, f32, i32, BT>,
            > {
                desc,
                backward: false,
                _b: PhantomData,
            })
            .into_iter();
        let (wp, bp) = (packed.next().expect("W"), packed.next().expect("b"));
        let float = |t: FusionTensor<Fr<R>>| TensorPrimitive::<Inner<R, BT>>::Float(t);
        let xi = Tensor::<Inner<R, BT>, 3>::from_primitive(float(x.primitive.clone()));
        let wi = Tensor::<Inner<R, BT>, 2>::from_primitive(float(wp.clone()));
        let bi = Tensor::<Inner<R, BT>, 1>::from_primitive(float(bp));
        let y = xi.reshape([batch * tokens, d_in]).matmul(wi) + bi.reshape([1, 3 * width]); // [rows, 3·width]
        let y = y
            .reshape([batch, tokens, 3 * width])
            .into_primitive()
            .tensor();
        let parents = [&x, &w[0], &w[1], &w[2], &b[0], &b[1], &b[2]];
        let out = tracked(
            QkvBackward::<R, BT>(master, PhantomData),
            parents,
            [x.primitive.clone(), wp],
            y,
        );
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn takes_master_weights(&self) -> bool {
        true
    }
}

/// The backward of [`CubeQkv`], with the parameters' dtype (their
/// gradients'); its state is `[x, W packed]`.
#[derive(Debug)]
struct QkvBackward<R, BT>(DType, PhantomData<(R, BT)>);

impl<R: CubeRuntime, BT: BoolElement> Backward<Inner<R, BT>, 7> for QkvBackward<R, BT> {
    type State = [FusionTensor<Fr<R>>; 2];

    fn backward(
        self,
        ops: Ops<Self::State, 7>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        type T<R, BT, const D: usize> = Tensor<Inner<R, BT>, D>;
        let [nx, params @ ..] = ops.parents;
        let dy = grads.consume::<Inner<R, BT>>(&ops.node);
        let [x, w] = ops.state;
        let [batch, tokens, d_in] = x.shape.dims::<3>();
        let width3 = w.shape.dims::<2>()[1];
        let rows = batch * tokens;
        let float = |t: FusionTensor<Fr<R>>| TensorPrimitive::<Inner<R, BT>>::Float(t);
        let dy = T::<R, BT, 3>::from_primitive(float(dy)).reshape([rows, width3]); // [rows, 3·width]
        if let Some(node) = nx {
            let w = T::<R, BT, 2>::from_primitive(float(w));
            let dx = dy
                .clone()
                .matmul(w.transpose())
                .reshape([batch, tokens, d_in]);
            grads.register::<Inner<R, BT>>(node.id, dx.into_primitive().tensor());
        }
        if params.iter().all(Option::is_none) {
            return;
        }
        // The weight gradient's split-K partials [chunks, d_in, 3·width]:
        // one chunk is the whole gradient, which the sums still split.
        let chunks = split_k_chunks(rows);
        let per = rows / chunks;
        let x = T::<R, BT, 3>::from_primitive(float(x));
        let parts = x
            .reshape([chunks, per, d_in])
            .swap_dims(1, 2)
            .matmul(dy.clone().reshape([chunks, per, width3])); // [chunks, d_in, 3·width]
        let parts = parts.into_primitive().tensor();
        let dy = dy.into_primitive().tensor();
        let width = width3 / 3;
        let dtype = self.0;
        let mut shapes = vec![Shape::new([d_in, width]); 3];
        shapes.extend([
            Shape::new([width]),
            Shape::new([width]),
            Shape::new([width]),
        ]);
        let out = register_as::<R, _>(
            "clipa_qkv_grad_sums",
            vec![parts, dy],
            shapes,
            dtype,
            |desc| QkvOp::<CubeBackend<R, f32, i32, BT>> {
                desc,
                backward: true,
                _b: PhantomData,
            },
        );
        for (node, g) in params.into_iter().zip(out) {
            if let Some(node) = node {
                grads.register::<Inner<R, BT>>(node.id, g);
            }
        }
    }
}

/// The packing (forward) or the gradients' sums (backward) as an operation
/// on the fusion stream.
#[derive(Debug)]
struct QkvOp<B> {
    desc: CustomOpIr,
    backward: bool,
    _b: PhantomData<B>,
}

impl<R: CubeRuntime, BT: BoolElement> Operation<Fr<R>> for QkvOp<CubeBackend<R, f32, i32, BT>> {
    fn execute(&self, handles: &mut HandleContainer<<Fr<R> as FusionRuntime>::FusionHandle>) {
        // Outputs are of one dtype, which the registration set.
        let dtype = self.desc.outputs[0].dtype;
        execute::<R, BT>(handles, &self.desc, true, |inputs| match self.backward {
            false => launch_pack(&inputs, dtype),
            true => launch_sums(&inputs, dtype),
        });
    }
}

/// `[W, b]` packed from contiguous `[Wq, Wk, Wv, bq, bk, bv]`, in
/// `dtype` (the parameters' own, or the compute dtype they are cast to).
fn launch_pack<R: CubeRuntime>(inputs: &[CubeTensor<R>], dtype: DType) -> Vec<CubeTensor<R>> {
    let w = &inputs[0];
    let [d_in, width] = w.meta.shape().dims::<2>();
    let wp = empty_as(w, Shape::new([d_in, 3 * width]), dtype);
    let bp = empty_as(w, Shape::new([3 * width]), dtype);
    let total = 3 * width * (d_in + 1);
    let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
    kernel::pack_kernel::launch::<R>(
        &w.client,
        grid(total.div_ceil(UNITS as usize)),
        CubeDim::new_1d(UNITS),
        arg(&inputs[0]),
        arg(&inputs[1]),
        arg(&inputs[2]),
        arg(&inputs[3]),
        arg(&inputs[4]),
        arg(&inputs[5]),
        arg(&wp),
        arg(&bp),
        UNITS as usize,
        [w.dtype.into(), dtype.into()],
    );
    vec![wp, bp]
}

/// `[dWq, dWk, dWv, dbq, dbk, dbv]` in `dtype` (the parameters') from
/// contiguous `[partials, dy]`.
fn launch_sums<R: CubeRuntime>(inputs: &[CubeTensor<R>], dtype: DType) -> Vec<CubeTensor<R>> {
    let [parts, dy] = [&inputs[0], &inputs[1]];
    let [rows, width3] = dy.meta.shape().dims::<2>();
    let width = width3 / 3;
    let d_in = parts.meta.shape()[1];
    let dw: Vec<_> = (0..3)
        .map(|_| empty_as(dy, Shape::new([d_in, width]), dtype))
        .collect();
    let db: Vec<_> = (0..3)
        .map(|_| empty_as(dy, Shape::new([width]), dtype))
        .collect();
    let dw_cubes = (d_in * width3).div_ceil(UNITS as usize);
    let db_cubes = width3.div_ceil(COLS);
    let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
    kernel::split_sums_kernel::launch::<R>(
        &dy.client,
        grid(dw_cubes + db_cubes),
        CubeDim::new_1d(UNITS),
        arg(parts),
        arg(dy),
        arg(&dw[0]),
        arg(&dw[1]),
        arg(&dw[2]),
        arg(&db[0]),
        arg(&db[1]),
        arg(&db[2]),
        dw_cubes,
        rows,
        COLS,
        UNITS as usize,
        [dy.dtype.into(), dtype.into()],
    );
    dw.into_iter().chain(db).collect()
}

mod kernel {
    use cubecl::prelude::*;

    use crate::cube::common::kernel::cube_index;
    use crate::cube::linear::kernel::column_total;

    /// A unit per element of the packed weight `[d_in, 3·width]`, then of
    /// the packed bias `[3·width]`: each copied from its part, cast from
    /// the parameters' dtype `I` to the product's `O`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pack_kernel<I: Float, O: Float>(
        wq: &Tensor<I>,
        wk: &Tensor<I>,
        wv: &Tensor<I>,
        bq: &Tensor<I>,
        bk: &Tensor<I>,
        bv: &Tensor<I>,
        w: &mut Tensor<O>,
        b: &mut Tensor<O>,
        #[comptime] units: usize,
        #[define(I, O)] _dtypes: [StorageType; 2],
    ) {
        let width = bq.len();
        let width3 = 3 * width;
        let n = w.len();
        let i = cube_index() * units + UNIT_POS_X as usize;
        if i < n {
            let r = i / width3;
            let col = i % width3;
            let c = col % width;
            let src = r * width + c;
            let part = col / width;
            if part == 0 {
                w[i] = O::cast_from(wq[src]);
            } else if part == 1 {
                w[i] = O::cast_from(wk[src]);
            } else {
                w[i] = O::cast_from(wv[src]);
            }
        } else if i < n + width3 {
            let col = i - n;
            let c = col % width;
            let part = col / width;
            if part == 0 {
                b[col] = O::cast_from(bq[c]);
            } else if part == 1 {
                b[col] = O::cast_from(bk[c]);
            } else {
                b[col] = O::cast_from(bv[c]);
            }
        }
    }

    /// The packed projection's gradients apart: cubes below `dw_cubes`
    /// add each element of the partials `[chunks, d_in, 3·width]` over the
    /// chunks in order into dWq, dWk or dWv by its column; the rest add
    /// the rows of dy `[rows, 3·width]` ([`column_total`]) into dbq, dbk
    /// or dbv; in float32, written in the parameters' dtype `G` (float32
    /// master weights under mixed precision).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn split_sums_kernel<F: Float, G: Float>(
        parts: &Tensor<F>,
        dy: &Tensor<F>,
        dwq: &mut Tensor<G>,
        dwk: &mut Tensor<G>,
        dwv: &mut Tensor<G>,
        dbq: &mut Tensor<G>,
        dbk: &mut Tensor<G>,
        dbv: &mut Tensor<G>,
        dw_cubes: usize,
        rows: usize,
        #[comptime] cols: usize,
        #[comptime] units: usize,
        #[define(F, G)] _dtypes: [StorageType; 2],
    ) {
        let width = dbq.len();
        let width3 = 3 * width;
        let j = cube_index();
        // The whole cube takes the same branch, so the bias cubes' sync
        // stays uniform.
        if j < dw_cubes {
            let n = parts.shape(1) * width3;
            let i = j * units + UNIT_POS_X as usize;
            if i < n {
                let chunks = parts.shape(0);
                let mut acc = f32::new(0.0);
                let mut k = 0usize;
                while k < chunks {
                    acc += f32::cast_from(parts[k * n + i]);
                    k += 1;
                }
                let col = i % width3;
                let dst = (i / width3) * width + col % width;
                let part = col / width;
                if part == 0 {
                    dwq[dst] = G::cast_from(acc);
                } else if part == 1 {
                    dwk[dst] = G::cast_from(acc);
                } else {
                    dwv[dst] = G::cast_from(acc);
                }
            }
        } else {
            let jb = j - dw_cubes;
            let total = column_total::<F>(dy, jb, rows, cols, units);
            let u = UNIT_POS_X as usize;
            let col = jb * cols + u;
            if u < cols && col < width3 {
                let c = col % width;
                let part = col / width;
                if part == 0 {
                    dbq[c] = G::cast_from(total);
                } else if part == 1 {
                    dbk[c] = G::cast_from(total);
                } else {
                    dbv[c] = G::cast_from(total);
                }
            }
        }
    }
}
