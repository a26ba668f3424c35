//! Multi-head attention as our own CubeCL kernels (wgpu, cuda), forward
//! and backward, for training: three launches a layer where Burn 0.21's
//! autodiff decomposes attention into about a dozen differentiated ops.

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
use clipa_core::kernels::{AttentionKernel, attention_composed};
use cubecl::{CubeCount, CubeDim};

use super::common::{Fr, empty, empty_as, execute, register_as, register_typed, tracked};

/// The inner (non-autodiff) CubeCL backend with Burn's fusion, float32.
type Inner<R, BT> = Fusion<CubeBackend<R, f32, i32, BT>>;

/// Rows (queries or keys) per cube, one a unit; also the rows of a tile of
/// the other side staged in shared memory.
const ROWS: u32 = 16;

/// The largest head dimension the kernels take (each unit holds a row of
/// that many floats in registers); wider heads take the composed path.
pub const MAX_HEAD_DIM: usize = 128;

/// softmax(q·kᵀ/√d)·v in our kernels, with its backward, on the autodiff
/// backend that trains.
///
/// - Forward, one launch: a cube per (batch, head, 16 queries), one unit
///   a query; key and value tiles of 16 rows staged in shared memory; an
///   online softmax (running max and sum), so the scores never reach
///   global memory; the output and each query's logsumexp are written.
/// - Backward, two launches and no atomics: per query, Δ = dO·O and
///   dQ = Σ_j P·(dO·v_j − Δ)·k_j/√d, recomputing each score from the saved
///   logsumexp; per key, dV = Σ_i P·dO_i and dK = Σ_i P·(dO_i·v − Δ_i)·q_i/√d.
/// - q, k and v are read packed, where the projection ([`super::CubeQkv`])
///   writes them: `[batch, tokens, 3·heads, head_dim]`, q's heads then
///   k's then v's, through the strides, so the heads are never transposed
///   or split into copies; the backward writes dq, dk and dv into one
///   gradient of that layout, which the projection's backward reads.
/// - Under mixed precision q, k, v, O and dO are bf16 (f16) in global
///   memory, as PyTorch's SDPA keeps them; every score, softmax statistic,
///   accumulator and staged tile is float32, and the logsumexp and Δ are
///   kept in float32.
///
/// Arithmetic and reads: per (batch, head), 2·N²·d multiply-adds forward
/// (scores, output) and 7·N²·d backward (the scores and dO·v recomputed in
/// both passes, then dQ; dK and dV), against a read of k, v (forward, query
/// pass) or q, dO (key pass) from global memory once per 16-row tile.
pub struct CubeAttention;

impl CubeAttention {
    /// Whether packed q, k and v of `dims` (`[batch, tokens, 3·heads,
    /// head_dim]`) and `dtype` run in the kernels: float32, and bf16 or
    /// f16 (mixed precision; read and written in that dtype, computed in
    /// float32). The composed attention otherwise (other dtypes, heads
    /// wider than [`MAX_HEAD_DIM`]).
    pub fn takes(dims: [usize; 4], dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && dims[2].is_multiple_of(3)
            && dims[3] <= MAX_HEAD_DIM
    }
}

impl<R: CubeRuntime, BT: BoolElement> AttentionKernel<Autodiff<Inner<R, BT>>> for CubeAttention {
    /// Packs q, k and v side by side (a copy) for the kernels: the
    /// training step reaches them packed by the projection
    /// ([`super::CubeQkv`]) through [`Self::attention_packed`] instead.
    fn attention(
        &self,
        q: Tensor<Autodiff<Inner<R, BT>>, 4>,
        k: Tensor<Autodiff<Inner<R, BT>>, 4>,
        v: Tensor<Autodiff<Inner<R, BT>>, 4>,
        causal: bool,
    ) -> Tensor<Autodiff<Inner<R, BT>>, 4> {
        let same = q.dims() == k.dims() && k.dims() == v.dims();
        let same = same && q.dtype() == k.dtype() && k.dtype() == v.dtype();
        if !same {
            return attention_composed(q, k, v, causal);
        }
        self.attention_packed(Tensor::cat(vec![q, k, v], 2), causal)
    }

    fn attention_packed(
        &self,
        qkv: Tensor<Autodiff<Inner<R, BT>>, 4>,
        causal: bool,
    ) -> Tensor<Autodiff<Inner<R, BT>>, 4> {
        if !Self::takes(qkv.dims(), qkv.dtype()) {
            let heads = qkv.dims()[2] / 3;
            let [q, k, v] = [0, 1, 2].map(|i| qkv.clone().narrow(2, i * heads, heads));
            return attention_composed(q, k, v, causal);
        }
        let qkv = qkv.into_primitive().tensor();
        let [o, lse] = forward::<R, BT>(qkv.primitive.clone(), causal);
        let state = [qkv.primitive.clone(), o.clone(), lse];
        let out = tracked(AttentionBackward::<R, BT>::new(causal), [&qkv], state, o);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// The backward of [`CubeAttention`]; its state is `[q, k, v, o, lse]`.
#[derive(Debug)]
struct AttentionBackward<R, BT> {
    causal: bool,
    _b: PhantomData<(R, BT)>,
}

impl<R, BT> AttentionBackward<R, BT> {
    fn new(causal: bool) -> Self {
        Self {
            causal,
            _b: PhantomData,
        }
    }
}

impl<R: CubeRuntime, BT: BoolElement> Backward<Inner<R, BT>, 1> for AttentionBackward<R, BT> {
    type State = [FusionTensor<Fr<R>>; 3];

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [nqkv] = ops.parents;
        let grad = grads.consume::<Inner<R, BT>>(&ops.node);
        let [qkv, o, lse] = ops.state;
        // The kernels read dO in the forward's dtype.
        let grad = match grad.dtype == qkv.dtype {
            true => grad,
            false => Tensor::<Inner<R, BT>, 4>::from_primitive(TensorPrimitive::Float(grad))
                .cast(FloatDType::from(qkv.dtype))
                .into_primitive()
                .tensor(),
        };
        if let Some(node) = nqkv {
            let dqkv = backward::<R, BT>([qkv, o, lse, grad], self.causal);
            grads.register::<Inner<R, BT>>(node.id, dqkv);
        }
    }
}

/// `[o, lse]` from packed `qkv` `[batch, tokens, 3·heads, head_dim]`: o
/// `[batch, tokens, heads, head_dim]` (contiguous, qkv's dtype), lse
/// `[batch, heads, tokens]` (float32).
fn forward<R: CubeRuntime, BT: BoolElement>(
    qkv: FusionTensor<Fr<R>>,
    causal: bool,
) -> [FusionTensor<Fr<R>>; 2] {
    let [b, n, h3, d] = qkv.shape.dims::<4>();
    let h = h3 / 3;
    let outputs = vec![
        (Shape::new([b, n, h, d]), qkv.dtype),
        (Shape::new([b, h, n]), DType::F32),
    ];
    let out = register_typed::<R, _>("clipa_attention", vec![qkv], outputs, |desc| AttentionOp::<
        CubeBackend<R, f32, i32, BT>,
    > {
        desc,
        causal,
        backward: false,
        _b: PhantomData,
    });
    out.try_into().expect("two outputs")
}

/// dqkv, packed as qkv, from `[qkv, o, lse, do]`.
fn backward<R: CubeRuntime, BT: BoolElement>(
    inputs: [FusionTensor<Fr<R>>; 4],
    causal: bool,
) -> FusionTensor<Fr<R>> {
    let shapes = vec![inputs[0].shape.clone()];
    let dtype = inputs[0].dtype;
    let name = "clipa_attention_backward";
    let mut out = register_as::<R, _>(name, inputs.into(), shapes, dtype, |desc| AttentionOp::<
        CubeBackend<R, f32, i32, BT>,
    > {
        desc,
        causal,
        backward: true,
        _b: PhantomData,
    });
    out.pop().expect("one output")
}

/// The forward or the backward as an operation on the fusion stream.
#[derive(Debug)]
struct AttentionOp<B> {
    desc: CustomOpIr,
    causal: bool,
    backward: bool,
    _b: PhantomData<B>,
}

impl<R: CubeRuntime, BT: BoolElement> Operation<Fr<R>>
    for AttentionOp<CubeBackend<R, f32, i32, BT>>
{
    fn execute(&self, handles: &mut HandleContainer<<Fr<R> as FusionRuntime>::FusionHandle>) {
        execute::<R, BT>(handles, &self.desc, false, |inputs| match self.backward {
            false => launch_forward(&inputs, self.causal),
            true => launch_backward(&inputs, self.causal),
        });
    }
}

/// The launch geometry: a cube per (16 rows, head, batch row).
fn geometry(b: usize, n: usize, h: usize) -> (CubeCount, CubeDim) {
    let tiles = n.div_ceil(ROWS as usize) as u32;
    (
        CubeCount::Static(tiles, h as u32, b as u32),
        CubeDim::new_1d(ROWS),
    )
}

/// `[o, lse]` from `[qkv]`.
fn launch_forward<R: CubeRuntime>(inputs: &[CubeTensor<R>], causal: bool) -> Vec<CubeTensor<R>> {
    let qkv = &inputs[0];
    let [b, n, h3, d] = qkv.meta.shape().dims::<4>();
    let h = h3 / 3;
    let o = empty_as(qkv, Shape::new([b, n, h, d]), qkv.dtype);
    let lse = empty(qkv, Shape::new([b, h, n]));
    let (count, dim) = geometry(b, n, h);
    kernel::forward_kernel::launch::<R>(
        &qkv.client,
        count,
        dim,
        qkv.clone().into_tensor_arg(),
        o.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        h,
        1.0 / (d as f32).sqrt(),
        causal,
        d,
        ROWS as usize,
        qkv.dtype.into(),
    );
    vec![o, lse]
}

/// `[dqkv]` from `[qkv, o, lse, do]`: the query pass writes dq's heads,
/// the key pass dk's and dv's, each into its own columns of one tensor.
fn launch_backward<R: CubeRuntime>(inputs: &[CubeTensor<R>], causal: bool) -> Vec<CubeTensor<R>> {
    let [qkv, o, lse, dout] = [0, 1, 2, 3].map(|i| &inputs[i]);
    let [b, n, h3, d] = qkv.meta.shape().dims::<4>();
    let h = h3 / 3;
    let dqkv = empty_as(qkv, Shape::new([b, n, h3, d]), qkv.dtype);
    // Δ_i = dO_i·O_i, [batch, heads, tokens], written by the query pass.
    let delta = empty(qkv, Shape::new([b, h, n]));
    let scale = 1.0 / (d as f32).sqrt();
    let (count, dim) = geometry(b, n, h);
    let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
    kernel::backward_query_kernel::launch::<R>(
        &qkv.client,
        count.clone(),
        dim,
        arg(qkv),
        arg(o),
        arg(lse),
        arg(dout),
        arg(&dqkv),
        arg(&delta),
        h,
        scale,
        causal,
        d,
        ROWS as usize,
        qkv.dtype.into(),
    );
    kernel::backward_key_kernel::launch::<R>(
        &qkv.client,
        count,
        dim,
        arg(qkv),
        arg(lse),
        arg(&delta),
        arg(dout),
        arg(&dqkv),
        h,
        scale,
        causal,
        d,
        ROWS as usize,
        qkv.dtype.into(),
    );
    vec![dqkv]
}

mod kernel {
    use cubecl::prelude::*;

    /// The offset of element `(batch, token, head, 0)` of a
    /// `[batch, tokens, heads, head_dim]` tensor, through its strides.
    #[cube]
    fn row<F: Float>(t: &Tensor<F>, batch: usize, token: usize, head: usize) -> usize {
        batch * t.stride(0) + token * t.stride(1) + head * t.stride(2)
    }

    /// The offset of entry `(batch, head, token)` of a per-query
    /// `[batch, heads, tokens]` tensor (the logsumexp, Δ).
    #[cube]
    fn stat(t: &Tensor<f32>, batch: usize, head: usize, token: usize) -> usize {
        batch * t.stride(0) + head * t.stride(1) + token * t.stride(2)
    }

    /// The end of the keys a cube of queries reads: all `n`, or under the
    /// causal mask none past the cube's last query.
    #[cube]
    fn key_end(n: usize, #[comptime] causal: bool, #[comptime] rows: usize) -> usize {
        let mut end = n;
        if causal {
            let last = (CUBE_POS_X as usize + 1) * rows;
            if last < n {
                end = last;
            }
        }
        end
    }

    /// Stages rows `start..start + rows` of `t` (head `head` of batch row
    /// `batch`) into `tile` `[rows, d]` in float32, zeros past the end;
    /// every unit of the cube takes part.
    #[cube]
    fn stage<F: Float>(
        t: &Tensor<F>,
        tile: &mut SharedMemory<f32>,
        batch: usize,
        head: usize,
        start: usize,
        n: usize,
        #[comptime] d: usize,
        #[comptime] rows: usize,
    ) {
        let s3 = t.stride(3);
        let mut e = UNIT_POS_X as usize;
        while e < rows * d {
            let r = e / d;
            let c = e % d;
            let token = start + r;
            let mut x = f32::new(0.0);
            if token < n {
                x = f32::cast_from(t[row::<F>(t, batch, token, head) + c * s3]);
            }
            tile[e] = x;
            e += rows;
        }
    }

    /// One query per unit: o = softmax(q·kᵀ·scale)·v by an online softmax
    /// over key tiles, and lse = the log of the softmax's denominator
    /// (with its max).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_kernel<F: Float>(
        qkv: &Tensor<F>,
        o: &mut Tensor<F>,
        lse: &mut Tensor<f32>,
        heads: usize,
        scale: f32,
        #[comptime] causal: bool,
        #[comptime] d: usize,
        #[comptime] rows: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let n = qkv.shape(1);
        let batch = CUBE_POS_Z as usize;
        let head = CUBE_POS_Y as usize;
        let i = CUBE_POS_X as usize * rows + UNIT_POS_X as usize;
        let live = i < n;
        let mut qi = Array::<f32>::new(d);
        let mut acc = Array::<f32>::new(d);
        let qs = qkv.stride(3);
        for c in 0..d {
            let mut x = f32::new(0.0);
            if live {
                x = f32::cast_from(qkv[row::<F>(qkv, batch, i, head) + c * qs]) * scale;
            }
            qi[c] = x;
            acc[c] = f32::new(0.0);
        }
        let mut m = f32::new(-1e30);
        let mut l = f32::new(0.0);
        let mut kt = SharedMemory::<f32>::new(rows * d);
        let mut vt = SharedMemory::<f32>::new(rows * d);
        // Causal: keys past the cube's last query are never needed.
        let end = key_end(n, causal, rows);
        let mut start = 0;
        while start < end {
            sync_cube();
            stage::<F>(qkv, &mut kt, batch, heads + head, start, n, d, rows);
            stage::<F>(qkv, &mut vt, batch, 2 * heads + head, start, n, d, rows);
            sync_cube();
            for r in 0..rows {
                let j = start + r;
                if live && j < n && !(causal && j > i) {
                    let mut s = f32::new(0.0);
                    for c in 0..d {
                        s += qi[c] * kt[r * d + c];
                    }
                    let m1 = f32::max(m, s);
                    let keep = f32::exp(m - m1);
                    let p = f32::exp(s - m1);
                    l = l * keep + p;
                    for c in 0..d {
                        acc[c] = acc[c] * keep + p * vt[r * d + c];
                    }
                    m = m1;
                }
            }
            start += rows;
        }
        if live {
            let base = row::<F>(o, batch, i, head);
            for c in 0..d {
                o[base + c * o.stride(3)] = F::cast_from(acc[c] / l);
            }
            lse[stat(lse, batch, head, i)] = m + f32::ln(l);
        }
    }

    /// One query per unit: Δ_i = dO_i·O_i, and
    /// dQ_i = scale·Σ_j P_ij·(dO_i·v_j − Δ_i)·k_j, each P_ij recomputed
    /// from the saved logsumexp.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_query_kernel<F: Float>(
        qkv: &Tensor<F>,
        o: &Tensor<F>,
        lse: &Tensor<f32>,
        dout: &Tensor<F>,
        dqkv: &mut Tensor<F>,
        delta: &mut Tensor<f32>,
        heads: usize,
        scale: f32,
        #[comptime] causal: bool,
        #[comptime] d: usize,
        #[comptime] rows: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let n = qkv.shape(1);
        let batch = CUBE_POS_Z as usize;
        let head = CUBE_POS_Y as usize;
        let i = CUBE_POS_X as usize * rows + UNIT_POS_X as usize;
        let live = i < n;
        let mut qi = Array::<f32>::new(d);
        let mut gi = Array::<f32>::new(d);
        let mut acc = Array::<f32>::new(d);
        let mut di = f32::new(0.0);
        let mut li = f32::new(0.0);
        for c in 0..d {
            let mut x = f32::new(0.0);
            let mut g = f32::new(0.0);
            if live {
                x = f32::cast_from(qkv[row::<F>(qkv, batch, i, head) + c * qkv.stride(3)]) * scale;
                g = f32::cast_from(dout[row::<F>(dout, batch, i, head) + c * dout.stride(3)]);
                di += g * f32::cast_from(o[row::<F>(o, batch, i, head) + c * o.stride(3)]);
            }
            qi[c] = x;
            gi[c] = g;
            acc[c] = f32::new(0.0);
        }
        if live {
            li = lse[stat(lse, batch, head, i)];
        }
        let mut kt = SharedMemory::<f32>::new(rows * d);
        let mut vt = SharedMemory::<f32>::new(rows * d);
        let end = key_end(n, causal, rows);
        let mut start = 0;
        while start < end {
            sync_cube();
            stage::<F>(qkv, &mut kt, batch, heads + head, start, n, d, rows);
            stage::<F>(qkv, &mut vt, batch, 2 * heads + head, start, n, d, rows);
            sync_cube();
            for r in 0..rows {
                let j = start + r;
                if live && j < n && !(causal && j > i) {
                    let mut s = f32::new(0.0);
                    let mut dp = f32::new(0.0);
                    for c in 0..d {
                        s += qi[c] * kt[r * d + c];
                        dp += gi[c] * vt[r * d + c];
                    }
                    let ds = f32::exp(s - li) * (dp - di);
                    for c in 0..d {
                        acc[c] += ds * kt[r * d + c];
                    }
                }
            }
            start += rows;
        }
        if live {
            let base = row::<F>(dqkv, batch, i, head);
            for c in 0..d {
                dqkv[base + c * dqkv.stride(3)] = F::cast_from(acc[c] * scale);
            }
            delta[stat(delta, batch, head, i)] = di;
        }
    }

    /// One key per unit: dV_j = Σ_i P_ij·dO_i and
    /// dK_j = scale·Σ_i P_ij·(dO_i·v_j − Δ_i)·q_i, over query tiles.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_key_kernel<F: Float>(
        qkv: &Tensor<F>,
        lse: &Tensor<f32>,
        delta: &Tensor<f32>,
        dout: &Tensor<F>,
        dqkv: &mut Tensor<F>,
        heads: usize,
        scale: f32,
        #[comptime] causal: bool,
        #[comptime] d: usize,
        #[comptime] rows: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let n = qkv.shape(1);
        let batch = CUBE_POS_Z as usize;
        let head = CUBE_POS_Y as usize;
        let j = CUBE_POS_X as usize * rows + UNIT_POS_X as usize;
        let live = j < n;
        let mut kj = Array::<f32>::new(d);
        let mut vj = Array::<f32>::new(d);
        let mut gk = Array::<f32>::new(d);
        let mut gv = Array::<f32>::new(d);
        for c in 0..d {
            let mut x = f32::new(0.0);
            let mut y = f32::new(0.0);
            if live {
                let s3 = qkv.stride(3);
                x = f32::cast_from(qkv[row::<F>(qkv, batch, j, heads + head) + c * s3]) * scale;
                y = f32::cast_from(qkv[row::<F>(qkv, batch, j, 2 * heads + head) + c * s3]);
            }
            kj[c] = x;
            vj[c] = y;
            gk[c] = f32::new(0.0);
            gv[c] = f32::new(0.0);
        }
        let mut qt = SharedMemory::<f32>::new(rows * d);
        let mut gt = SharedMemory::<f32>::new(rows * d);
        let mut lt = SharedMemory::<f32>::new(rows);
        let mut dt = SharedMemory::<f32>::new(rows);
        // Causal: queries before the cube's first key never see it.
        let mut start = 0;
        if causal {
            start = CUBE_POS_X as usize * rows;
        }
        while start < n {
            sync_cube();
            stage::<F>(qkv, &mut qt, batch, head, start, n, d, rows);
            stage::<F>(dout, &mut gt, batch, head, start, n, d, rows);
            let u = UNIT_POS_X as usize;
            let mut lv = f32::new(0.0);
            let mut dv0 = f32::new(0.0);
            if start + u < n {
                lv = lse[stat(lse, batch, head, start + u)];
                dv0 = delta[stat(delta, batch, head, start + u)];
            }
            lt[u] = lv;
            dt[u] = dv0;
            sync_cube();
            for r in 0..rows {
                let i = start + r;
                if live && i < n && !(causal && j > i) {
                    let mut s = f32::new(0.0);
                    let mut dp = f32::new(0.0);
                    for c in 0..d {
                        s += kj[c] * qt[r * d + c];
                        dp += vj[c] * gt[r * d + c];
                    }
                    let p = f32::exp(s - lt[r]);
                    let ds = p * (dp - dt[r]);
                    for c in 0..d {
                        gv[c] += p * gt[r * d + c];
                        gk[c] += ds * qt[r * d + c];
                    }
                }
            }
            start += rows;
        }
        if live {
            let bk = row::<F>(dqkv, batch, j, heads + head);
            let bv = row::<F>(dqkv, batch, j, 2 * heads + head);
            let s3 = dqkv.stride(3);
            for c in 0..d {
                dqkv[bk + c * s3] = F::cast_from(gk[c] * scale);
                dqkv[bv + c * s3] = F::cast_from(gv[c]);
            }
        }
    }
}
