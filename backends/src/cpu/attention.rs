//! Multi-head attention on flex in the projections' own token-major layout
//! (`[batch, tokens, heads, head_dim]`), with its own backward pass.
//!
//! [`attention_composed`] moves the heads to the front and back: 3 strided
//! copies forward and 4 more backward (flex copies a 4-D permute element by
//! element), plus a softmax of about 12 element-wise passes over the
//! `[batch, heads, tokens, tokens]` scores under autodiff. Here each
//! (batch row, head) pair is one rayon task: two `gemm` calls read q, k and
//! v where they lie (a head is a column block with row stride
//! `heads·head_dim`, which `gemm` takes as is), the softmax runs in place
//! on the task's `[tokens, tokens]` tile, and the output is written into
//! the layout the output projection reads. Backward is four `gemm` calls
//! and one pass over the tile per pair, from the saved probabilities.
//!
//! Uses `unsafe` to call the shared `gemm` product (`super::gemm`) and
//! because the tasks write disjoint column blocks of one output buffer
//! through a shared pointer. Each block says why it holds.
#![allow(unsafe_code)]

use super::gemm::{Parallelism, Unset, product};
use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use clipa_core::kernels::{AttentionKernel, attention_composed};
use rayon::prelude::*;

use super::tensor::{Backend, dense_flex};
use super::vmath::{self, vectorised};

/// The attention kernel of the CPU backend, for training (`Autodiff<Flex>`)
/// and inference (`Flex`).
pub struct FlexAttention;

impl AttentionKernel<Flex> for FlexAttention {
    fn attention(
        &self,
        q: Tensor<Flex, 4>,
        k: Tensor<Flex, 4>,
        v: Tensor<Flex, 4>,
        causal: bool,
    ) -> Tensor<Flex, 4> {
        if [&q, &k, &v].iter().any(|t| t.dtype() != DType::F32) {
            return attention_composed(q, k, v, causal);
        }
        same_shapes(&q, &k, &v);
        let [q, k, v] = [q, k, v].map(|t| dense_flex(t.into_primitive().tensor()));
        let (out, _) = forward(&q, &k, &v, causal);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

impl AttentionKernel<Backend> for FlexAttention {
    fn attention(
        &self,
        q: Tensor<Backend, 4>,
        k: Tensor<Backend, 4>,
        v: Tensor<Backend, 4>,
        causal: bool,
    ) -> Tensor<Backend, 4> {
        if [&q, &k, &v].iter().any(|t| t.dtype() != DType::F32) {
            return attention_composed(q, k, v, causal);
        }
        same_shapes(&q, &k, &v);
        let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let [qd, kd, vd] = [q, k, v].map(|t| dense_flex(t.primitive));
        let out = match AttentionBackward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, probs) = forward(&qd, &kd, &vd, causal);
                let saved = Saved {
                    q: qd,
                    k: kd,
                    v: vd,
                    probs,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(&qd, &kd, &vd, causal).0),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// Self-attention only: the `gemm` calls read k and v with q's sizes, so
/// anything else (cross-attention's other token count) must stop here
/// rather than read out of bounds.
fn same_shapes<B: burn::tensor::backend::Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
) {
    assert!(
        q.dims() == k.dims() && q.dims() == v.dims(),
        "attention kernel: q, k and v must have one shape, got {:?}, {:?}, {:?}",
        q.dims(),
        k.dims(),
        v.dims()
    );
}

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    tokens: usize,
    heads: usize,
    head_dim: usize,
    /// Batch rows × heads: the rayon tasks.
    pairs: usize,
}

impl Dims {
    fn of(t: &FlexTensor) -> Self {
        let dims = t.layout().shape().dims::<4>();
        let [batch, tokens, heads, head_dim] = dims;
        Self {
            tokens,
            heads,
            head_dim,
            pairs: batch * heads,
        }
    }

    /// Distance between two tokens' rows of one head: `heads·head_dim`.
    fn row_stride(&self) -> isize {
        (self.heads * self.head_dim) as isize
    }

    /// Offset of pair `pair`'s first element in a `[batch, tokens, heads,
    /// head_dim]` buffer.
    fn offset(&self, pair: usize) -> usize {
        let (b, h) = (pair / self.heads, pair % self.heads);
        (b * self.tokens * self.heads + h) * self.head_dim
    }

    /// The softmax scale, 1/√head_dim (Burn's and PyTorch's default).
    fn scale(&self) -> f32 {
        (self.head_dim as f32).sqrt().recip()
    }
}

/// The output `[batch, tokens, heads, head_dim]` and the probabilities
/// `[batch, heads, tokens, tokens]` (masked entries exactly zero).
fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    causal: bool,
) -> (FlexTensor, FlexTensor) {
    let d = Dims::of(q);
    let (t, hd, rs) = (d.tokens, d.head_dim, d.row_stride());
    let mut out = Unset::new(q.layout().shape().clone());
    let mut probs = Unset::new(Shape::new([d.pairs / d.heads, d.heads, t, t]));
    let (q, k, v) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
    let (o, pr) = (out.ptr(), probs.ptr());
    (0..d.pairs).into_par_iter().for_each(|pair| {
        let at = d.offset(pair);
        // SAFETY: q, k, v and out hold `pairs` column blocks of `tokens`
        // rows, row stride `rs`, starting at `at`; the pair's `[t, t]`
        // tile of probs and its output block are this task's alone. The
        // scores product writes the whole tile before the softmax reads
        // it (as a slice), and the output product its whole block.
        unsafe {
            let p = pr.at(pair * t * t);
            // scores = q·kᵀ/√d: kᵀ read in place (columns are k's rows).
            product(
                [t, t, hd],
                (p, 1, t as isize),
                (q[at..].as_ptr(), 1, rs),
                (k[at..].as_ptr(), rs, 1),
                0.0,
                d.scale(),
                Parallelism::None,
            );
            let p = std::slice::from_raw_parts_mut(p, t * t);
            softmax_rows(p, t, causal);
            product(
                [t, hd, t],
                (o.at(at), 1, rs),
                (p.as_ptr(), 1, t as isize),
                (v[at..].as_ptr(), 1, rs),
                0.0,
                1.0,
                Parallelism::None,
            );
        }
    });
    // SAFETY: the pairs' tiles cover probs, and their column blocks out.
    unsafe { (out.finish(), probs.finish()) }
}

vectorised! {
    /// Row-wise softmax of a `[t, t]` tile in place, each row's later columns
    /// set to zero where `causal` (as the −∞ mask gives). The maximum, the
    /// exponentials and the sum each vectorise ([`vmath`]).
    fn softmax_rows(p: &mut [f32], t: usize, causal: bool) {
        for (i, row) in p.chunks_exact_mut(t).enumerate() {
            let seen = if causal { i + 1 } else { t };
            let (row, future) = row.split_at_mut(seen);
            future.fill(0.0);
            let max = vmath::max(row);
            row.iter_mut().for_each(|s| *s = vmath::exp(*s - max));
            let sum = vmath::sum(row);
            row.iter_mut().for_each(|s| *s /= sum);
        }
    }
}

vectorised! {
    /// The softmax's backward over a `[t, t]` tile in place: `dP` becomes
    /// `dS = P ⊙ (dP − rowsum(dP ⊙ P))`.
    fn softmax_backward_rows(ds: &mut [f32], p: &[f32], t: usize) {
        for (ds, p) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
            let dot = vmath::dot(ds, p);
            ds.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
        }
    }
}

/// What backward needs: the inputs and the probabilities.
#[derive(Clone, Debug)]
struct Saved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    /// `[batch, heads, tokens, tokens]`.
    probs: FlexTensor,
}

/// The backward step of [`FlexAttention`] under autodiff.
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense_flex(grads.consume::<Flex>(&ops.node));
        let input_grads = backward(&ops.state, &grad);
        for (parent, g) in ops.parents.into_iter().zip(input_grads) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// The gradients of q, k and v from the output's gradient `dout`, all
/// `[batch, tokens, heads, head_dim]`. Per pair, with P the probabilities
/// and s = 1/√head_dim:
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`,
/// `dQ = s·dS·K`, `dK = s·dSᵀ·Q`. Masked entries have P = 0, so dS = 0.
fn backward(saved: &Saved, dout: &FlexTensor) -> [FlexTensor; 3] {
    let d = Dims::of(&saved.q);
    let (t, hd, rs) = (d.tokens, d.head_dim, d.row_stride());
    let shape = saved.q.layout().shape().clone();
    let mut grads = [(); 3].map(|_| Unset::new(shape.clone()));
    let [dq, dk, dv] = grads.each_mut().map(|g| g.ptr());
    let (q, k, v) = (
        saved.q.storage::<f32>(),
        saved.k.storage::<f32>(),
        saved.v.storage::<f32>(),
    );
    let (probs, dout) = (saved.probs.storage::<f32>(), dout.storage::<f32>());
    let ts = t as isize;
    probs.par_chunks(t * t).enumerate().for_each_init(
        || vec![0f32; t * t],
        |ds, (pair, p)| {
            let at = d.offset(pair);
            let (dq, dk, dv) = (dq, dk, dv);
            // SAFETY: as in `forward`: every block is this pair's,
            // within its buffer; `ds` is this thread's scratch tile.
            unsafe {
                // dV = Pᵀ·dO: Pᵀ read in place.
                product(
                    [t, hd, t],
                    (dv.at(at), 1, rs),
                    (p.as_ptr(), ts, 1),
                    (dout[at..].as_ptr(), 1, rs),
                    0.0,
                    1.0,
                    Parallelism::None,
                );
                // dP = dO·Vᵀ.
                product(
                    [t, t, hd],
                    (ds.as_mut_ptr(), 1, ts),
                    (dout[at..].as_ptr(), 1, rs),
                    (v[at..].as_ptr(), rs, 1),
                    0.0,
                    1.0,
                    Parallelism::None,
                );
            }
            softmax_backward_rows(ds, p, t);
            // SAFETY: as above.
            unsafe {
                // dQ = s·dS·K.
                product(
                    [t, hd, t],
                    (dq.at(at), 1, rs),
                    (ds.as_ptr(), 1, ts),
                    (k[at..].as_ptr(), 1, rs),
                    0.0,
                    d.scale(),
                    Parallelism::None,
                );
                // dK = s·dSᵀ·Q.
                product(
                    [t, hd, t],
                    (dk.at(at), 1, rs),
                    (ds.as_ptr(), ts, 1),
                    (q[at..].as_ptr(), 1, rs),
                    0.0,
                    d.scale(),
                    Parallelism::None,
                );
            }
        },
    );
    // SAFETY: every pair wrote its column block of each, and the blocks
    // cover them.
    grads.map(|g| unsafe { g.finish() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clipa_core::numeric::{normal_data, relative_error};

    /// The kernel against the composed attention: the output and the
    /// gradients of q, k and v through a weighted sum, bidirectional and
    /// causal, at a token count that is no multiple of a SIMD width, with
    /// q, k and v intermediates (as the projections' outputs are).
    #[test]
    fn flex_attention_matches_the_composed_one() {
        let device = Default::default();
        let shape = [3, 13, 4, 8]; // [batch, tokens, heads, head_dim]
        let w = Tensor::<Backend, 4>::from_data(normal_data(shape, 9, 1.0), &device);
        for causal in [false, true] {
            let run = |fused: bool| {
                let leaves = [1u64, 2, 3].map(|seed| {
                    Tensor::<Backend, 4>::from_data(normal_data(shape, seed, 1.0), &device)
                        .require_grad()
                });
                let [q, k, v] = leaves.clone().map(|t| t * 1.5);
                let y = if fused {
                    AttentionKernel::<Backend>::attention(&FlexAttention, q, k, v, causal)
                } else {
                    attention_composed(q, k, v, causal)
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                let input_grads = leaves.map(|t| t.grad(&grads).expect("a gradient").into_data());
                (y.into_data(), input_grads)
            };
            let ((yf, gf), (yc, gc)) = (run(true), run(false));
            let err = relative_error(&yf, &yc);
            assert!(
                err <= 1e-6,
                "causal {causal}: value relative error {err:.2e}"
            );
            for (name, (gf, gc)) in ["q", "k", "v"].iter().zip(gf.iter().zip(&gc)) {
                let err = relative_error(gf, gc);
                assert!(
                    err <= 1e-5,
                    "causal {causal}: d{name} relative error {err:.2e}"
                );
            }
            // Inference, no autodiff.
            let [q, k, v] = [1u64, 2, 3]
                .map(|seed| Tensor::<Flex, 4>::from_data(normal_data(shape, seed, 1.5), &device));
            let got = AttentionKernel::<Flex>::attention(
                &FlexAttention,
                q.clone(),
                k.clone(),
                v.clone(),
                causal,
            );
            let err = relative_error(
                &got.into_data(),
                &attention_composed(q, k, v, causal).into_data(),
            );
            assert!(
                err <= 1e-6,
                "causal {causal}: inference relative error {err:.2e}"
            );
        }
    }

    /// Causal attention's first token sees only itself: its output is its
    /// own value row.
    #[test]
    fn causal_first_token_is_its_own_value() {
        let device = Default::default();
        let shape = [2, 5, 2, 4];
        let [q, k, v] = [4u64, 5, 6]
            .map(|seed| Tensor::<Flex, 4>::from_data(normal_data(shape, seed, 1.0), &device));
        let y = AttentionKernel::<Flex>::attention(&FlexAttention, q, k, v.clone(), true);
        let err = relative_error(
            &y.narrow(1, 0, 1).into_data(),
            &v.narrow(1, 0, 1).into_data(),
        );
        assert!(err <= 1e-7, "first token relative error {err:.2e}");
    }
}
