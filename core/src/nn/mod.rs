//! Transformer building blocks shared by the vision and text towers.
//!
//! Layouts follow OpenCLIP's `transformer.py` (`ResidualAttentionBlock`), so
//! OpenCLIP weights map one to one: pre-LN, `x + attn(ln_1(x))`,
//! `x + mlp(ln_2(x))`.

mod attention;
mod block;
mod embedding;
mod norm;

pub use attention::{Attention, AttentionConfig, AttentionKernel, attention_composed};
pub use block::{Activation, GeluKernel, Mlp, ResidualBlock, ResidualBlockConfig, gelu_composed};
pub use embedding::{EmbeddingKernel, embedding_in};
pub use norm::{LayerNormKernel, layer_norm_in};

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

/// `x·W + b` computed in `x`'s dtype. Under mixed precision the block hands
/// its sub-layers bf16 activations while the parameters stay the float32
/// master copy: the weights are cast for the product, and the cast's
/// backward returns their gradient in float32 (`torch.autocast`'s linear).
///
/// The leading dimensions are refolded into `[chunks, rows / chunks,
/// d_in]` before the product, with about [`ROWS_PER_CHUNK`] rows (tokens)
/// per chunk. The weight gradient is then a batch of `chunks` GEMMs of
/// depth ≈ 1024 summed over a small `[chunks, d_in, d_out]` temporary — a
/// split-K product. Given `[batch, seq, d_in]` as is, Burn 0.21's default
/// `linear_weight_backward` runs one product of depth `seq` per sample and
/// sums a `[batch, d_in, d_out]` temporary: on the CPU that was most of the
/// backward pass (67 MB per MLP layer at batch 64). Folding everything into
/// one GEMM instead fixed the CPU but halved ViT-B/16's speed on an H200,
/// most likely because one deep product of a 768 × 768 weight is one grid
/// of output tiles, too few thread blocks for 132 multiprocessors, and
/// cubek-matmul 0.2 has no split-K of its own. The chunks were the fastest
/// of the three on the GPU and keep most of the one-GEMM gain on the CPU.
/// See docs/BENCHMARKS.md. A backend with a registered [`LinearKernel`]
/// (the CPU's) takes a layer with a bias whole instead, as
/// `[batch, tokens, d_in]`.
pub fn linear_in<B: Backend, const D: usize>(lin: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    linear_onto(lin, x, None)
}

/// `residual + x·W + b`, as [`linear_in`] then an add: a residual block's
/// last projection. A backend with a [`LinearKernel`] adds the residual
/// where it writes the bias rows, so the sum costs no pass of its own (on
/// flex, an element-wise add on one thread while the others wait).
///
/// # Shapes
/// `x`: `[..., d_in]`, `residual`: `[..., d_out]` → `[..., d_out]`
pub fn linear_add_in<B: Backend, const D: usize>(
    lin: &Linear<B>,
    x: Tensor<B, D>,
    residual: Tensor<B, D>,
) -> Tensor<B, D> {
    linear_onto(lin, x, Some(residual))
}

/// [`linear_in`] with the residual of [`linear_add_in`] where given.
fn linear_onto<B: Backend, const D: usize>(
    lin: &Linear<B>,
    x: Tensor<B, D>,
    residual: Option<Tensor<B, D>>,
) -> Tensor<B, D> {
    let w = lin.weight.val(); // [d_in, d_out]
    let b = lin.bias.as_ref().map(|b| b.val()); // [d_out]
    let (w, b) = if w.dtype() == x.dtype() {
        (w, b)
    } else {
        let dt = FloatDType::from(x.dtype());
        (w.cast(dt), b.map(|b| b.cast(dt)))
    };
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let d_out = w.dims()[1];
    let rows: usize = dims[..D - 1].iter().product();
    if let (Some(kernel), Some(b)) = (crate::kernels::lookup::<dyn LinearKernel<B>>(), b.as_ref()) {
        dims[D - 1] = d_out;
        // A 3-D tensor goes as it is, graph node included: a reshape would
        // put a node of its own between the input and the kernel, whose
        // backward could then not add into the input's earlier gradient
        // (the query, key and value projections share one input).
        let three = |t: Tensor<B, D>, width: usize| -> Tensor<B, 3> {
            if D == 3 {
                Tensor::from_primitive(t.into_primitive())
            } else {
                t.reshape([1, rows, width])
            }
        };
        let y = kernel.linear(
            three(x, d_in),
            w,
            b.clone(),
            residual.map(|r| three(r, d_out)),
        ); // [batch, tokens, d_out]
        return if D == 3 {
            Tensor::from_primitive(y.into_primitive())
        } else {
            y.reshape(dims)
        };
    }
    let y = if D <= 2 {
        burn::tensor::module::linear(x, w, b)
    } else {
        let chunks = split_k_chunks(rows);
        let x = x.reshape([chunks, rows / chunks, d_in]); // [chunks, rows/chunks, d_in]
        dims[D - 1] = d_out;
        burn::tensor::module::linear(x, w, b).reshape(dims) // [..., d_out]
    };
    match residual {
        Some(r) => r + y,
        None => y,
    }
}

/// A backend's own `x·W + b`, registered per backend type
/// ([`crate::kernels`]) and used by [`linear_in`] and [`linear_add_in`].
pub trait LinearKernel<B: Backend>: Send + Sync {
    /// `x·w + b`, plus `residual` where given: the value of Burn's
    /// `linear` (and the add) and, on an autodiff backend, the gradients
    /// of `x`, `w`, `b` and `residual`, each within float rounding.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, d_in]`; `w`: `[d_in, d_out]`; `b`: `[d_out]`
    /// - `residual` and the output: `[batch, tokens, d_out]`
    fn linear(
        &self,
        x: Tensor<B, 3>,
        w: Tensor<B, 2>,
        b: Tensor<B, 1>,
        residual: Option<Tensor<B, 3>>,
    ) -> Tensor<B, 3>;
}

/// Target depth of each chunk's weight-gradient GEMM in [`linear_in`].
pub const ROWS_PER_CHUNK: usize = 1024;

/// The number of chunks [`linear_in`] splits `rows` into: the largest
/// divisor of `rows` that is at most `rows / ROWS_PER_CHUNK` (at least 1).
pub fn split_k_chunks(rows: usize) -> usize {
    let target = (rows / ROWS_PER_CHUNK).max(1);
    (1..=target)
        .rev()
        .find(|c| rows.is_multiple_of(*c))
        .unwrap_or(1)
}

/// `x + table` for every batch row: a position table added to each
/// sequence, as rows of `[batch, tokens·width]` plus one broadcast row.
/// The same sums as broadcasting `[1, tokens, width]` in 3-D, but a whole
/// shared row is a broadcast the CPU backend (flex) adds with SIMD in
/// place, while the 3-D one took its scalar strided path, on one thread:
/// 1.7 % of a bench-tiny training step.
///
/// # Shapes
/// `x`: `[batch, tokens, width]`, `table`: `[tokens, width]` → `[batch, tokens, width]`
pub fn add_rows<B: Backend>(x: Tensor<B, 3>, table: Tensor<B, 2>) -> Tensor<B, 3> {
    let [batch, tokens, width] = x.dims();
    (x.reshape([batch, tokens * width]) + table.reshape([1, tokens * width]))
        .reshape([batch, tokens, width])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::{TestBackend, normal_data};
    use burn::nn::LinearConfig;

    /// `add_rows` is the 3-D broadcast add, values and the table's
    /// gradient (the sum over the batch).
    #[test]
    fn add_rows_is_the_broadcast_add() {
        let device = Default::default();
        let x = Tensor::<TestBackend, 3>::from_data(normal_data([3, 5, 4], 1, 1.0), &device);
        let table = || {
            Tensor::<TestBackend, 2>::from_data(normal_data([5, 4], 2, 1.0), &device).require_grad()
        };
        let (ta, tb) = (table(), table());
        let ya = add_rows(x.clone(), ta.clone());
        let yb = x + tb.clone().unsqueeze::<3>();
        ya.clone()
            .into_data()
            .assert_approx_eq::<f32>(&yb.clone().into_data(), Default::default());
        let w = Tensor::<TestBackend, 3>::from_data(normal_data([3, 5, 4], 3, 1.0), &device);
        let ga = (ya * w.clone()).sum().backward();
        let gb = (yb * w).sum().backward();
        ta.grad(&ga)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&tb.grad(&gb).unwrap().into_data(), Default::default());
    }

    #[test]
    fn split_k_chunks_divide_rows_near_the_target_depth() {
        assert_eq!(split_k_chunks(1), 1);
        assert_eq!(split_k_chunks(1023), 1);
        assert_eq!(split_k_chunks(64 * 65), 4); // bench-tiny img32: depth 1040
        assert_eq!(split_k_chunks(64 * 8), 1);
        assert_eq!(split_k_chunks(256 * 197), 32); // B/16 at 224 px: 2⁸·197 rows, depth 1576
        assert_eq!(split_k_chunks(4099), 1); // a prime: one chunk
        for rows in [5000usize, 12800, 50432] {
            let c = split_k_chunks(rows);
            assert!(
                rows.is_multiple_of(c) && rows / c >= ROWS_PER_CHUNK,
                "{rows}: {c}"
            );
        }
    }

    /// The chunked product and its gradients equal Burn's own linear layer.
    #[test]
    fn linear_in_matches_burns_linear_with_gradients() {
        let device = Default::default();
        let lin = LinearConfig::new(8, 5).init::<TestBackend>(&device);
        let x = || {
            Tensor::<TestBackend, 3>::from_data(normal_data([3, 700, 8], 3, 1.0), &device)
                .require_grad()
        };
        let (xa, xb) = (x(), x());
        let ya = linear_in(&lin, xa.clone()); // 2100 rows: 2 chunks
        let yb = lin.forward(xb.clone());
        ya.clone()
            .into_data()
            .assert_approx_eq::<f32>(&yb.clone().into_data(), Default::default());
        let ga = (ya.clone() * ya).sum().backward();
        let gb = (yb.clone() * yb).sum().backward();
        let w = |g: &<TestBackend as burn::tensor::backend::AutodiffBackend>::Gradients| {
            lin.weight.grad(g).unwrap().into_data()
        };
        w(&ga).assert_approx_eq::<f32>(&w(&gb), burn::tensor::Tolerance::rel_abs(1e-4, 1e-4));
        xa.grad(&ga)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&xb.grad(&gb).unwrap().into_data(), Default::default());
    }
}
