//! The sum of squares of all gradients (the global norm's square) in a
//! handful of CubeCL launches (wgpu, cuda), deterministic, no atomics.

use std::marker::PhantomData;

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, tensor::CubeTensor};
use burn_fusion::stream::Operation;
use burn_fusion::{Fusion, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer};
use clipa_core::kernels::{SumSquaresKernel, sum_squares_composed};
use cubecl::prelude::SequenceArg;
use cubecl::{CubeCount, CubeDim};

use super::common::{Fr, empty, execute, register};
use super::multi::{CUBE, chunks};

/// The inner (non-autodiff) CubeCL backend with Burn's fusion, float32.
type Inner<R, BT> = Fusion<CubeBackend<R, f32, i32, BT>>;

/// `Σ_t Σ_i t[i]²` over all gradients as one custom operation on the
/// fusion stream: one launch per chunk of tensors (as many as the binding
/// limit allows, [`chunks`]), each cube writing the sum of its share to a
/// partials buffer, then one launch that adds the partials in a fixed
/// order. [`sum_squares_composed`] is a square, a sum and an add per
/// tensor: 142 reductions and as many adds a bench-tiny step.
pub struct CubeSumSquares;

impl<R: CubeRuntime, BT: BoolElement> SumSquaresKernel<Inner<R, BT>> for CubeSumSquares {
    fn sum_squares(&self, tensors: Vec<Tensor<Inner<R, BT>, 1>>) -> Tensor<Inner<R, BT>, 1> {
        let Some(first) = tensors.first() else {
            return Tensor::zeros([1], &Default::default());
        };
        if tensors.iter().any(|t| t.dtype() != DType::F32) {
            let device = first.device();
            return sum_squares_composed(tensors, &device);
        }
        let prims: Vec<_> = tensors
            .into_iter()
            .map(|t| t.into_primitive().tensor())
            .collect();
        let out = register::<R, _>("clipa_sum_squares", prims, vec![Shape::new([1])], |desc| {
            SumSquaresOp::<CubeBackend<R, f32, i32, BT>> {
                desc,
                _b: PhantomData,
            }
        })
        .remove(0);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// The sum of squares of the inputs as one operation on the fusion stream.
#[derive(Debug)]
struct SumSquaresOp<B> {
    desc: CustomOpIr,
    _b: PhantomData<B>,
}

impl<R: CubeRuntime, BT: BoolElement> Operation<Fr<R>>
    for SumSquaresOp<CubeBackend<R, f32, i32, BT>>
{
    fn execute(&self, handles: &mut HandleContainer<<Fr<R> as FusionRuntime>::FusionHandle>) {
        execute::<R, BT>(handles, &self.desc, true, |tensors| {
            vec![sum_squares::<R>(&tensors)]
        });
    }
}

/// `Σ_t Σ_i t[i]²` of contiguous, non-empty `tensors`, `[1]`.
fn sum_squares<R: CubeRuntime>(tensors: &[CubeTensor<R>]) -> CubeTensor<R> {
    let client = tensors[0].client.clone();
    let numels: Vec<usize> = tensors.iter().map(|t| t.meta.num_elements()).collect();
    // One binding a tensor, plus the partials and CubeCL's info.
    let per_launch = (client.properties().hardware.max_bindings as usize).saturating_sub(2);
    let launches = chunks(&numels, &vec![(); numels.len()], per_launch);
    let total: usize = launches
        .iter()
        .map(|c| c.slots.len() * c.cubes_x as usize)
        .sum();
    // [total]: every cube of every launch writes its one slot.
    let partials = empty(&tensors[0], Shape::new([total]));
    let mut offset = 0;
    for chunk in &launches {
        let mut seq = SequenceArg::new();
        for &i in &chunk.slots {
            seq.push(tensors[i].clone().into_tensor_arg());
        }
        kernel::partials_kernel::launch::<R>(
            &client,
            CubeCount::Static(chunk.cubes_x, chunk.slots.len() as u32, 1),
            CubeDim::new_1d(CUBE),
            seq,
            partials.clone().into_tensor_arg(),
            offset,
            chunk.slots.len(),
            CUBE as usize,
            DType::F32.into(),
        );
        offset += chunk.slots.len() * chunk.cubes_x as usize;
    }
    let out = empty(&tensors[0], Shape::new([1]));
    kernel::total_kernel::launch::<R>(
        &client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(CUBE),
        partials.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        CUBE as usize,
        DType::F32.into(),
    );
    out
}

mod kernel {
    use cubecl::prelude::*;

    use crate::cube::common::kernel::tree_sum;

    /// Cube `(x, y)` writes the sum of squares of its strided share of
    /// tensor `y` to `partials[offset + y · cubes_x + x]`.
    #[cube(launch)]
    pub(super) fn partials_kernel<F: Float>(
        xs: &Sequence<Tensor<F>>,
        partials: &mut Tensor<F>,
        offset: usize,
        #[comptime] count: usize,
        #[comptime] units: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let slot = CUBE_POS_Y as usize;
        let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
        let mut acc = F::new(0.0);
        #[unroll]
        for t in 0..count {
            if slot == t {
                let x = xs.index(t);
                let mut i = ABSOLUTE_POS_X as usize;
                while i < x.len() {
                    let xi = x[i];
                    acc += xi * xi;
                    i += stride;
                }
            }
        }
        let mut shared = SharedMemory::<F>::new(units);
        shared[UNIT_POS_X as usize] = acc;
        sync_cube();
        tree_sum::<F>(&mut shared);
        if UNIT_POS_X == 0 {
            partials[offset + slot * CUBE_COUNT_X as usize + CUBE_POS_X as usize] = shared[0];
        }
    }

    /// `out[0] = Σ partials`, one cube, in a fixed order.
    #[cube(launch)]
    pub(super) fn total_kernel<F: Float>(
        partials: &Tensor<F>,
        out: &mut Tensor<F>,
        #[comptime] units: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let mut acc = F::new(0.0);
        let mut i = UNIT_POS_X as usize;
        while i < partials.len() {
            acc += partials[i];
            i += units;
        }
        let mut shared = SharedMemory::<F>::new(units);
        shared[UNIT_POS_X as usize] = acc;
        sync_cube();
        tree_sum::<F>(&mut shared);
        if UNIT_POS_X == 0 {
            out[0] = shared[0];
        }
    }
}
