//! What the CubeCL kernels share: registering an operation on the fusion
//! stream, allocating outputs, and a cube-wide sum.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, tensor::CubeTensor};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::CubeCount;

/// The fusion runtime of CubeCL runtime `R`.
pub(super) type Fr<R> = FusionCubeRuntime<R>;

/// Registers the operation `op(desc)` named `name` on the fusion stream:
/// `inputs` in, float32 tensors of `shapes` out. Only queues it: nothing
/// blocks or reads back.
pub(super) fn register<R: CubeRuntime, O: Operation<Fr<R>> + 'static>(
    name: &'static str,
    inputs: Vec<FusionTensor<Fr<R>>>,
    shapes: Vec<Shape>,
    op: impl FnOnce(CustomOpIr) -> O,
) -> Vec<FusionTensor<Fr<R>>> {
    register_as(name, inputs, shapes, DType::F32, op)
}

/// [`register`] with outputs of `dtype`.
pub(super) fn register_as<R: CubeRuntime, O: Operation<Fr<R>> + 'static>(
    name: &'static str,
    inputs: Vec<FusionTensor<Fr<R>>>,
    shapes: Vec<Shape>,
    dtype: DType,
    op: impl FnOnce(CustomOpIr) -> O,
) -> Vec<FusionTensor<Fr<R>>> {
    let outputs = shapes.into_iter().map(|s| (s, dtype)).collect();
    register_typed(name, inputs, outputs, op)
}

/// [`register`] with each output's shape and dtype.
pub(super) fn register_typed<R: CubeRuntime, O: Operation<Fr<R>> + 'static>(
    name: &'static str,
    inputs: Vec<FusionTensor<Fr<R>>>,
    outputs: Vec<(Shape, DType)>,
    op: impl FnOnce(CustomOpIr) -> O,
) -> Vec<FusionTensor<Fr<R>>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let inputs: Vec<_> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let outputs: Vec<_> = outputs
        .into_iter()
        .map(|(s, dtype)| TensorIr::uninit(client.create_empty_handle(), s, dtype))
        .collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    client.register(streams, OperationIr::Custom(desc.clone()), op(desc))
}

/// Runs a custom operation: its inputs taken from `handles` (made
/// contiguous where `contiguous`), `launch` on them, its outputs
/// registered in order.
pub(super) fn execute<R: CubeRuntime, BT: BoolElement>(
    handles: &mut HandleContainer<<Fr<R> as FusionRuntime>::FusionHandle>,
    desc: &CustomOpIr,
    contiguous: bool,
    launch: impl FnOnce(Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>>,
) {
    type B<R, BT> = CubeBackend<R, f32, i32, BT>;
    let inputs: Vec<CubeTensor<R>> = desc
        .inputs
        .iter()
        .map(|t| handles.get_float_tensor::<B<R, BT>>(t))
        .map(|t| match contiguous {
            true => burn_cubecl::kernel::into_contiguous(t),
            false => t,
        })
        .collect();
    for (ir, t) in desc.outputs.iter().zip(launch(inputs)) {
        handles.register_float_tensor::<B<R, BT>>(&ir.id, t);
    }
}

/// `out`, the result of an op on autodiff tensors `parents`, with `op`'s
/// backward recorded (with `state`) where any parent is tracked.
pub(super) fn tracked<B: Backend, O: Backward<B, N>, const N: usize>(
    op: O,
    parents: [&FloatTensor<Autodiff<B>>; N],
    state: O::State,
    out: B::FloatTensorPrimitive,
) -> FloatTensor<Autodiff<B>> {
    let nodes = parents.map(|t| t.node.clone());
    match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// The gradient registered so far for parent `i` of `ops`, taken out of
/// `grads` for the caller's kernel to add into the one it registers (where
/// `Gradients::register` would add the two in a launch of its own): `Some`
/// only where it is float32 and of `shape`; one of another kind stays
/// registered. `Gradients::remove` takes an autodiff tensor, so an empty
/// probe carries the node.
pub(super) fn take_earlier_grad<R: CubeRuntime, BT: BoolElement, S, const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<S, N>,
    i: usize,
    shape: &Shape,
    device: &burn::tensor::Device<Fusion<CubeBackend<R, f32, i32, BT>>>,
) -> Option<FusionTensor<Fr<R>>> {
    type Inner<R, BT> = Fusion<CubeBackend<R, f32, i32, BT>>;
    let node = ops.parents[i].as_ref()?;
    let mut probe = Tensor::<Autodiff<Inner<R, BT>>, 1>::empty([0], device)
        .into_primitive()
        .tensor();
    probe.node = node.clone();
    probe.rc = Arc::new(node.id);
    let g = grads.remove::<Inner<R, BT>>(&probe)?;
    if g.dtype == DType::F32 && &g.shape == shape {
        Some(g)
    } else {
        grads.register::<Inner<R, BT>>(node.id, g);
        None
    }
}

/// A contiguous float32 tensor of `shape` on `like`'s device, not
/// initialised.
pub(super) fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape) -> CubeTensor<R> {
    empty_as(like, shape, DType::F32)
}

/// [`empty`] of `dtype`.
pub(super) fn empty_as<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Shape,
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// `cubes` cubes laid out over x then y (see [`kernel::cube_index`]), the
/// x side under the devices' 65,535 limit.
pub(super) fn grid(cubes: usize) -> CubeCount {
    let x = cubes.clamp(1, 32_768) as u32;
    CubeCount::Static(x, cubes.div_ceil(x as usize).max(1) as u32, 1)
}

/// Kernel helpers.
pub(super) mod kernel {
    use cubecl::prelude::*;

    /// The cube's index in a [`super::grid`]: cubes are laid out over x
    /// then y.
    #[cube]
    pub(in crate::cube) fn cube_index() -> usize {
        CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
    }

    /// Adds `shared[0..CUBE_DIM_X]` into `shared[0]` by halving (the cube a
    /// power of two), in a fixed order; every unit of the cube takes part,
    /// and all see the sum after it.
    #[cube]
    pub(in crate::cube) fn tree_sum<F: Float>(shared: &mut SharedMemory<F>) {
        let u = UNIT_POS_X as usize;
        let mut half = CUBE_DIM_X as usize / 2;
        while half > 0 {
            if u < half {
                shared[u] = shared[u] + shared[u + half];
            }
            sync_cube();
            half /= 2;
        }
    }
}
