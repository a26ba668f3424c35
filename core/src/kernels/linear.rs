//! `x·W + b` (+ a residual): the op, its kernel trait and its composition.

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

use super::Resolved;

/// A backend's own `x·W + b`, used by [`linear`] and [`linear_add`] for a
/// layer with a bias.
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

    /// Whether [`Self::linear`] also takes `w` and `b` as the float32
    /// master weights of mixed precision with `x` narrower (bf16): the
    /// product in `x`'s dtype, the weights cast inside the kernel's own
    /// launches and their gradients returned in float32. Where not,
    /// [`linear`] casts them first (a cast and its backward per call).
    fn takes_master_weights(&self) -> bool {
        false
    }
}

/// `x·W + b` computed in `x`'s dtype. Under mixed precision the block hands
/// its sub-layers bf16 activations while the parameters stay the float32
/// master copy: the weights are cast for the product, and the cast's
/// backward returns their gradient in float32 (`torch.autocast`'s linear).
///
/// # Shapes
/// `x`: `[..., d_in]` → `[..., d_out]`
pub fn linear<B: Backend, const D: usize>(
    kernels: &Resolved<B>,
    lin: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    linear_onto(kernels, lin, x, None)
}

/// `residual + x·W + b`: a residual block's last projection. A kernel adds
/// the residual where it writes the bias rows, so the sum costs no pass of
/// its own.
///
/// # Shapes
/// `x`: `[..., d_in]`, `residual`: `[..., d_out]` → `[..., d_out]`
pub fn linear_add<B: Backend, const D: usize>(
    kernels: &Resolved<B>,
    lin: &Linear<B>,
    x: Tensor<B, D>,
    residual: Tensor<B, D>,
) -> Tensor<B, D> {
    linear_onto(kernels, lin, x, Some(residual))
}

/// [`linear`] with the residual of [`linear_add`] where given.
fn linear_onto<B: Backend, const D: usize>(
    kernels: &Resolved<B>,
    lin: &Linear<B>,
    x: Tensor<B, D>,
    residual: Option<Tensor<B, D>>,
) -> Tensor<B, D> {
    let w = lin.weight.val(); // [d_in, d_out]
    let b = lin.bias.as_ref().map(|b| b.val()); // [d_out]
    let kernel = kernels.linear();
    let cast_inside = kernel.is_some_and(|k| k.takes_master_weights()) && b.is_some();
    let (w, b) = if w.dtype() == x.dtype() || cast_inside {
        (w, b)
    } else {
        let dt = FloatDType::from(x.dtype());
        (w.cast(dt), b.map(|b| b.cast(dt)))
    };
    match (kernel, b) {
        (Some(kernel), Some(b)) => with_kernel(kernel, x, w, b, residual),
        (_, b) => {
            let y = linear_composed(x, w, b);
            match residual {
                Some(r) => r + y,
                None => y,
            }
        }
    }
}

/// The kernel's product on any rank, through its `[batch, tokens, d_in]`.
fn with_kernel<B: Backend, const D: usize>(
    kernel: &dyn LinearKernel<B>,
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    b: Tensor<B, 1>,
    residual: Option<Tensor<B, D>>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let d_out = w.dims()[1];
    let rows: usize = dims[..D - 1].iter().product();
    dims[D - 1] = d_out;
    // A 3-D tensor goes as it is, graph node included: a reshape would put
    // a node of its own between the input and the kernel, whose backward
    // could then not add into the input's earlier gradient (the query, key
    // and value projections share one input). `from_primitive` only
    // restates the rank, which `D == 3` already fixes.
    let three = |t: Tensor<B, D>, width: usize| -> Tensor<B, 3> {
        if D == 3 {
            Tensor::from_primitive(t.into_primitive())
        } else {
            t.reshape([1, rows, width])
        }
    };
    let y = kernel.linear(three(x, d_in), w, b, residual.map(|r| three(r, d_out))); // [batch, tokens, d_out]
    if D == 3 {
        Tensor::from_primitive(y.into_primitive())
    } else {
        y.reshape(dims)
    }
}

/// `x·w + b` from Burn's `linear`, the rows refolded into split-K chunks of
/// about [`ROWS_PER_CHUNK`]: the weight gradient becomes a batch of deep
/// GEMMs summed over a small `[chunks, d_in, d_out]`, where Burn's
/// per-sample products were most of the backward pass and one deep GEMM
/// starves a GPU of thread blocks (docs/BENCHMARKS.md, "GPU").
///
/// # Shapes
/// `x`: `[..., d_in]`, `w`: `[d_in, d_out]`, `b`: `[d_out]` → `[..., d_out]`
pub fn linear_composed<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    if D <= 2 {
        return burn::tensor::module::linear(x, w, b);
    }
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    dims[D - 1] = w.dims()[1];
    let rows: usize = dims[..D - 1].iter().product();
    let chunks = split_k_chunks(rows);
    let x = x.reshape([chunks, rows / chunks, d_in]); // [chunks, rows/chunks, d_in]
    burn::tensor::module::linear(x, w, b).reshape(dims) // [..., d_out]
}

/// The patch embedding, a stride-`p` convolution without bias, as one
/// product over the images' `p×p×3` blocks: the same sums as `conv2d`,
/// through [`linear_composed`]'s split-K chunks, so the kernel's gradient
/// is a few deep GEMMs rather than one per image.
///
/// # Shapes
/// - `images`: `[batch, 3, H, W]`, `H` and `W` multiples of `p`
/// - `conv1`: `[width, 3, p, p]` (PyTorch's layout)
/// - output: `[batch, (H/p)·(W/p), width]`, patches in row-major order
pub fn patch_embed<B: Backend>(images: Tensor<B, 4>, conv1: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, _, height, width_px] = images.dims();
    let [width, _, p, _] = conv1.dims();
    let (gh, gw) = (height / p, width_px / p);
    let patches = images
        .reshape([batch, 3, gh, p, gw, p])
        .permute([0, 2, 4, 1, 3, 5]) // [batch, gh, gw, 3, p, p]
        .reshape([batch, gh * gw, 3 * p * p]); // [batch, patches, 3·p²]
    let kernel = conv1.reshape([width, 3 * p * p]).transpose(); // [3·p², width]
    linear_composed(patches, kernel, None)
}

/// Target depth of each chunk's weight-gradient GEMM in [`linear_composed`].
pub const ROWS_PER_CHUNK: usize = 1024;

/// The number of chunks [`linear_composed`] splits `rows` into: the largest
/// divisor of `rows` that is at most `rows / ROWS_PER_CHUNK` (at least 1).
pub fn split_k_chunks(rows: usize) -> usize {
    let target = (rows / ROWS_PER_CHUNK).max(1);
    (1..=target)
        .rev()
        .find(|c| rows.is_multiple_of(*c))
        .unwrap_or(1)
}

/// `x + table` for every batch row: a position table added to each
/// sequence. The sums of broadcasting `[1, tokens, width]` in 3-D, written
/// as one broadcast row over `[batch, tokens·width]`, a layout every
/// backend adds in one pass (flex's 3-D broadcast took a scalar strided
/// path; docs/BENCHMARKS.md, "CPU serial work").
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

    /// The chunked product and its gradients equal Burn's own linear layer,
    /// and the residual form adds the residual.
    #[test]
    fn linear_matches_burns_linear_with_gradients() {
        let device = Default::default();
        let lin = LinearConfig::new(8, 5).init::<TestBackend>(&device);
        let x = || {
            Tensor::<TestBackend, 3>::from_data(normal_data([3, 700, 8], 3, 1.0), &device)
                .require_grad()
        };
        let (xa, xb) = (x(), x());
        let composed = Resolved::composed();
        let ya = linear(&composed, &lin, xa.clone()); // 2100 rows: 2 chunks
        let yb = lin.forward(xb.clone());
        ya.clone()
            .into_data()
            .assert_approx_eq::<f32>(&yb.clone().into_data(), Default::default());
        let ga = (ya.clone() * ya).sum().backward();
        let gb = (yb.clone() * yb.clone()).sum().backward();
        let w = |g: &<TestBackend as burn::tensor::backend::AutodiffBackend>::Gradients| {
            lin.weight.grad(g).unwrap().into_data()
        };
        w(&ga).assert_approx_eq::<f32>(&w(&gb), burn::tensor::Tolerance::rel_abs(1e-4, 1e-4));
        xa.grad(&ga)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&xb.grad(&gb).unwrap().into_data(), Default::default());
        let r = Tensor::<TestBackend, 3>::from_data(normal_data([3, 700, 5], 4, 1.0), &device);
        linear_add(&composed, &lin, x(), r.clone())
            .into_data()
            .assert_approx_eq::<f32>(&(yb + r).into_data(), Default::default());
    }
}
