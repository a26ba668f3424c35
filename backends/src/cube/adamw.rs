//! AdamW for every parameter of a step in a handful of CubeCL launches
//! (wgpu, cuda), the guard read on the device.

use std::marker::PhantomData;

use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, tensor::CubeTensor};
use burn_fusion::stream::Operation;
use burn_fusion::{Fusion, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer};
use clipa_core::kernels::{AdamWF32, AdamWKernel, AdamWSlot, UpdateGuard, adamw_composed};
use cubecl::prelude::SequenceArg;
use cubecl::{CubeCount, CubeDim};

use super::common::{empty, register};
use super::multi::{Chunk, chunks, own};

/// The inner (non-autodiff) CubeCL backend with Burn's fusion, float32.
type Inner<R, BT> = Fusion<CubeBackend<R, f32, i32, BT>>;

/// AdamW over all parameters at once: one custom operation on the fusion
/// stream per step, a few launches inside it.
///
/// [`adamw_composed`] is about a dozen element-wise ops per parameter plus
/// the guard's three selects, which Burn 0.21's fusion does not fold into
/// one kernel, for each of bench-tiny's 142 (B/16's ~394) parameter
/// tensors. Here one operation (as burn-vision registers its own) takes
/// every parameter, and launches one kernel per chunk of parameters that
/// share their scalars (decayed or not) and fit the device's binding limit
/// ([`chunks`]); each launch reads w, g, m, v once and writes m, v in
/// place and the new w to a fresh buffer (the module holds the old one
/// until the step returns): 28 bytes per parameter. The guard (`[scale, apply]`, packed once
/// per step by [`UpdateGuard`]) is read on the device, so a step not
/// applied writes nothing and the host never waits.
pub struct CubeAdamW;

impl<R: CubeRuntime, BT: BoolElement> AdamWKernel<Inner<R, BT>> for CubeAdamW {
    fn update(
        &self,
        slots: Vec<AdamWSlot<Inner<R, BT>>>,
        guard: &UpdateGuard<Inner<R, BT>>,
    ) -> Vec<[Tensor<Inner<R, BT>, 1>; 3]> {
        // The master weights are float32; anything else takes the generic path.
        let f32_only = |s: &AdamWSlot<_>| {
            [&s.w, &s.g, &s.m, &s.v]
                .iter()
                .all(|t| t.dtype() == DType::F32)
        };
        if slots.is_empty() || !slots.iter().all(f32_only) {
            return slots
                .into_iter()
                .map(|slot| adamw_composed(slot, guard))
                .collect();
        }
        let mut scalars = Vec::with_capacity(slots.len());
        let mut inputs = Vec::with_capacity(4 * slots.len() + 1);
        let mut shapes = Vec::with_capacity(3 * slots.len());
        for slot in slots {
            scalars.push(slot.s.to_f32());
            shapes.extend([slot.w.shape(), slot.w.shape(), slot.w.shape()]);
            for t in [slot.w, slot.g, slot.m, slot.v] {
                inputs.push(t.into_primitive().tensor());
            }
        }
        inputs.push(guard.packed.clone().into_primitive().tensor());
        let mut out = register::<R, _>("clipa_adamw", inputs, shapes, |desc| AdamWOp::<
            CubeBackend<R, f32, i32, BT>,
        > {
            desc,
            scalars,
            _b: PhantomData,
        })
        .into_iter()
        .map(|t| Tensor::from_primitive(TensorPrimitive::Float(t)));
        let mut updated = Vec::with_capacity(out.len() / 3);
        while let (Some(w), Some(m), Some(v)) = (out.next(), out.next(), out.next()) {
            updated.push([w, m, v]);
        }
        updated
    }
}

/// The update of every parameter as one operation on the fusion stream:
/// inputs `[w, g, m, v]` per parameter then the packed guard, outputs
/// `[w, m, v]` per parameter.
#[derive(Debug)]
struct AdamWOp<B> {
    desc: CustomOpIr,
    /// Each parameter's scalars.
    scalars: Vec<AdamWF32>,
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
        let (inputs, outputs) = (&self.desc.inputs, &self.desc.outputs);
        let mut get = |t| handles.get_float_tensor::<B<R, BT>>(t);
        let packed = get(&inputs[inputs.len() - 1]);
        // The moments are the optimiser's alone: owned, contiguous buffers
        // written in place (a copy first where something else still holds
        // one, so no other tensor sees it). The module still holds each
        // weight while the step runs, so the new weights go to fresh
        // buffers rather than paying a copy of each first.
        let contiguous = burn_cubecl::kernel::into_contiguous::<R>;
        let params: Vec<[CubeTensor<R>; 4]> = inputs[..inputs.len() - 1]
            .chunks_exact(4)
            .map(|c| {
                [
                    contiguous(get(&c[0])),
                    contiguous(get(&c[1])),
                    own(get(&c[2])),
                    own(get(&c[3])),
                ]
            })
            .collect();
        let fresh: Vec<CubeTensor<R>> = params
            .iter()
            .map(|[w, ..]| empty(w, w.meta.shape().clone()))
            .collect();
        let numels: Vec<usize> = params.iter().map(|p| p[0].meta.num_elements()).collect();
        let client = packed.client.clone();
        // Five bindings a parameter, plus the guard and CubeCL's info.
        let per_launch = (client.properties().hardware.max_bindings as usize).saturating_sub(2) / 5;
        for chunk in chunks(&numels, &self.scalars, per_launch) {
            launch::<R>(
                &params,
                &fresh,
                &packed,
                &chunk,
                &self.scalars[chunk.slots[0]],
            );
        }
        for ((p, w), o) in params.into_iter().zip(fresh).zip(outputs.chunks_exact(3)) {
            let [_, _, m, v] = p;
            handles.register_float_tensor::<B<R, BT>>(&o[0].id, w);
            handles.register_float_tensor::<B<R, BT>>(&o[1].id, m);
            handles.register_float_tensor::<B<R, BT>>(&o[2].id, v);
        }
    }
}

/// Launches [`kernel::adamw_kernel`] over one chunk of parameters: cube row
/// `y` updates parameter `chunk.slots[y]`, its cubes striding over it.
fn launch<R: CubeRuntime>(
    params: &[[CubeTensor<R>; 4]],
    fresh: &[CubeTensor<R>],
    packed: &CubeTensor<R>,
    chunk: &Chunk,
    k: &AdamWF32,
) {
    let client = packed.client.clone();
    let mut seqs: [SequenceArg<R, _>; 5] = Default::default();
    for &i in &chunk.slots {
        for (seq, t) in seqs.iter_mut().zip(params[i].iter().chain([&fresh[i]])) {
            seq.push(t.clone().into_tensor_arg());
        }
    }
    let [ws, gs, ms, vs, wo] = seqs;
    kernel::adamw_kernel::launch::<R>(
        &client,
        CubeCount::Static(chunk.cubes_x, chunk.slots.len() as u32, 1),
        CubeDim::new_1d(super::multi::CUBE),
        ws,
        gs,
        ms,
        vs,
        wo,
        packed.clone().into_tensor_arg(),
        k.beta1,
        k.one_minus_beta1,
        k.beta2,
        k.one_minus_beta2,
        k.eps,
        k.step_size,
        k.keep,
        chunk.slots.len(),
        DType::F32.into(),
    );
}

mod kernel {
    use cubecl::prelude::*;

    /// One AdamW update per element of each of `count` parameters,
    /// operation for operation as [`adamw_composed`]: cube row `y` takes
    /// parameter `y`, its cubes striding over its elements; the new weights
    /// go to `wos`, the moments are updated in place; `packed` is
    /// `[grad scale, apply]`: a step not applied copies the weights and
    /// leaves the moments.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw_kernel<F: Float>(
        ws: &Sequence<Tensor<F>>,
        gs: &Sequence<Tensor<F>>,
        ms: &mut Sequence<Tensor<F>>,
        vs: &mut Sequence<Tensor<F>>,
        wos: &mut Sequence<Tensor<F>>,
        packed: &Tensor<F>,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        eps: f32,
        step_size: f32,
        keep: f32,
        #[comptime] count: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let apply = packed[1] > F::new(0.5);
        let scale = packed[0];
        let slot = CUBE_POS_Y as usize;
        let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
        #[unroll]
        for t in 0..count {
            if slot == t {
                let w = ws.index(t);
                let m = ms.index_mut(t);
                let v = vs.index_mut(t);
                let g = gs.index(t);
                let wo = wos.index_mut(t);
                let mut i = ABSOLUTE_POS_X as usize;
                while i < w.len() {
                    if apply {
                        let gi = g[i] * scale;
                        let mi = m[i] * F::cast_from(beta1) + gi * F::cast_from(one_minus_beta1);
                        let vi =
                            v[i] * F::cast_from(beta2) + gi * gi * F::cast_from(one_minus_beta2);
                        m[i] = mi;
                        v[i] = vi;
                        wo[i] = w[i] * F::cast_from(keep)
                            - mi / (F::sqrt(vi) + F::cast_from(eps)) * F::cast_from(step_size);
                    } else {
                        wo[i] = w[i];
                    }
                    i += stride;
                }
            }
        }
    }
}
