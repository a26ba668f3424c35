//! AdamW in one CubeCL kernel per parameter (wgpu, cuda), the guard read on
//! the device.

use std::marker::PhantomData;

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, tensor::CubeTensor};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use clipa_core::kernels::{AdamWF32, AdamWKernel, AdamWScalars, UpdateGuard, adamw_composed};
use cubecl::{CubeDim, calculate_cube_count_elemwise};

/// The inner (non-autodiff) CubeCL backend with Burn's fusion, float32.
type Inner<R, BT> = Fusion<CubeBackend<R, f32, i32, BT>>;

/// AdamW as one kernel launch per parameter, in place.
///
/// [`adamw_composed`] is about a dozen element-wise ops per parameter plus
/// the guard's three selects, which Burn 0.21's fusion does not fold into
/// one kernel (docs/BENCHMARKS.md has the launch counts per step). Here
/// each parameter is one custom operation on the fusion stream (as
/// burn-vision registers its own), which reads w, g, m, v once and writes
/// w, m, v in place: 28 bytes per parameter. The guard (`[scale, apply]`,
/// packed once per step by [`UpdateGuard`]) is read on the device, so a
/// step not applied writes nothing and the host never waits.
pub struct CubeAdamW;

impl<R: CubeRuntime, BT: BoolElement> AdamWKernel<Inner<R, BT>> for CubeAdamW {
    fn update(
        &self,
        w: Tensor<Inner<R, BT>, 1>,
        g: Tensor<Inner<R, BT>, 1>,
        m: Tensor<Inner<R, BT>, 1>,
        v: Tensor<Inner<R, BT>, 1>,
        s: &AdamWScalars,
        guard: &UpdateGuard<Inner<R, BT>>,
    ) -> [Tensor<Inner<R, BT>, 1>; 3] {
        if [&w, &g, &m, &v].iter().any(|t| t.dtype() != DType::F32) {
            return adamw_composed(w, g, m, v, s, guard);
        }
        let [n] = w.dims();
        let packed = guard.packed.clone().into_primitive().tensor();
        let [w, g, m, v] = [w, g, m, v].map(|t| t.into_primitive().tensor());
        let client = w.client.clone();
        let streams = OperationStreams::with_inputs([&w, &g, &m, &v, &packed]);
        let out = || TensorIr::uninit(client.create_empty_handle(), Shape::new([n]), DType::F32);
        let desc = CustomOpIr::new(
            "clipa_adamw",
            &[
                w.into_ir(),
                g.into_ir(),
                m.into_ir(),
                v.into_ir(),
                packed.into_ir(),
            ],
            &[out(), out(), out()],
        );
        let op = AdamWOp::<CubeBackend<R, f32, i32, BT>> {
            desc: desc.clone(),
            k: s.to_f32(),
            _b: PhantomData,
        };
        let [w, m, v]: [_; 3] = client
            .register(streams, OperationIr::Custom(desc), op)
            .try_into()
            .expect("three outputs");
        [w, m, v].map(|t| Tensor::from_primitive(TensorPrimitive::Float(t)))
    }
}

/// The update of one parameter as an operation on the fusion stream.
#[derive(Debug)]
struct AdamWOp<B> {
    desc: CustomOpIr,
    k: AdamWF32,
    _b: PhantomData<B>,
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>>
    for AdamWOp<CubeBackend<R, f32, i32, BT>>
{
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>,
    ) {
        type B<R, BT> = CubeBackend<R, f32, i32, BT>;
        let ([w, g, m, v, packed], [wo, mo, vo]) = self.desc.as_fixed();
        let get = |h: &mut HandleContainer<_>, t| h.get_float_tensor::<B<R, BT>>(t);
        let (w, g, m, v, packed) = (
            get(handles, w),
            get(handles, g),
            get(handles, m),
            get(handles, v),
            get(handles, packed),
        );
        let [w, m, v] = launch::<R>(w, g, m, v, packed, &self.k);
        handles.register_float_tensor::<B<R, BT>>(&wo.id, w);
        handles.register_float_tensor::<B<R, BT>>(&mo.id, m);
        handles.register_float_tensor::<B<R, BT>>(&vo.id, v);
    }
}

/// Launches [`kernel::adamw_kernel`] over `w`'s elements, writing `w`, `m` and `v`
/// in place where nothing else holds them (a copy first where something
/// does, so no other tensor sees the update).
fn launch<R: CubeRuntime>(
    w: CubeTensor<R>,
    g: CubeTensor<R>,
    m: CubeTensor<R>,
    v: CubeTensor<R>,
    packed: CubeTensor<R>,
    k: &AdamWF32,
) -> [CubeTensor<R>; 3] {
    let own = |t: CubeTensor<R>| {
        if t.can_mut() && t.is_contiguous() {
            t
        } else {
            t.copy()
        }
    };
    let (w, m, v) = (own(w), own(m), own(v));
    let g = burn_cubecl::kernel::into_contiguous(g);
    let client = w.client.clone();
    let n = w.meta.num_elements();
    let cube_dim = CubeDim::new(&client, n);
    let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
    kernel::adamw_kernel::launch::<R>(
        &client,
        cube_count,
        cube_dim,
        w.clone().into_tensor_arg(),
        g.into_tensor_arg(),
        m.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        packed.into_tensor_arg(),
        k.beta1,
        k.one_minus_beta1,
        k.beta2,
        k.one_minus_beta2,
        k.eps,
        k.step_size,
        k.keep,
        DType::F32.into(),
    );
    [w, m, v]
}

mod kernel {
    use cubecl::prelude::*;

    /// One AdamW update per element, operation for operation as
    /// [`adamw_composed`]; `packed` is `[grad scale, apply]`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw_kernel<F: Float>(
        w: &mut Tensor<F>,
        g: &Tensor<F>,
        m: &mut Tensor<F>,
        v: &mut Tensor<F>,
        packed: &Tensor<F>,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        eps: f32,
        step_size: f32,
        keep: f32,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= w.len() || packed[1] < F::new(0.5) {
            terminate!();
        }
        let gi = g[i] * packed[0];
        let mi = m[i] * F::cast_from(beta1) + gi * F::cast_from(one_minus_beta1);
        let vi = v[i] * F::cast_from(beta2) + gi * gi * F::cast_from(one_minus_beta2);
        m[i] = mi;
        v[i] = vi;
        w[i] = w[i] * F::cast_from(keep)
            - mi / (F::sqrt(vi) + F::cast_from(eps)) * F::cast_from(step_size);
    }
}
