//! The CPU backend's types and the flex-tensor helpers its kernels share.

use std::sync::Arc;

use burn::backend::Flex;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Ops;
use burn::tensor::{DType, Shape, Tensor};
use burn_flex::FlexTensor;

/// The concrete CPU backend with autodiff.
pub type Backend = burn::backend::Autodiff<Flex>;

/// Elements per rayon task in the element-wise kernels: 64 KiB of each
/// float32 array.
pub const CHUNK: usize = 1 << 14;

/// `t`'s storage as a contiguous buffer holding exactly its elements
/// (a view is copied out first).
pub fn dense(t: Tensor<Flex, 1>) -> FlexTensor {
    dense_flex(t.into_primitive().tensor())
}

/// The gradient registered so far for parent `i` of `ops`, taken out of
/// `grads` for the step to add its own into and register again: `Some`
/// only where it is float32 and of `shape` (and then dense). A gradient of
/// another kind is left registered, for autodiff's `register` to add to as
/// before.
///
/// A kernel's backward that writes a gradient in a pass of its own can add
/// the earlier one in that same pass (or let `gemm` accumulate onto it),
/// where `register` would add the two with flex's element-wise add on the
/// thread that drives the step while the rayon workers wait: 32 such sums
/// of `[batch, tokens, width]` per bench-tiny step (the residual stream,
/// and the input the query, key and value projections share).
/// `Gradients::remove` takes a tensor, so a probe carries the node.
pub fn take_earlier_grad<S, const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<S, N>,
    i: usize,
    shape: &Shape,
) -> Option<FlexTensor> {
    let node = ops.parents[i].as_ref()?;
    let mut probe = Tensor::<Backend, 1>::empty([0], &Default::default())
        .into_primitive()
        .tensor();
    probe.node = node.clone();
    probe.rc = Arc::new(node.id);
    let g = grads.remove::<Flex>(&probe)?;
    if g.dtype() == DType::F32 && g.layout().shape() == shape {
        Some(dense_flex(g))
    } else {
        grads.register::<Flex>(node.id, g);
        None
    }
}

/// `t` (float32: the byte count assumes it) as a contiguous buffer holding
/// exactly its elements, in row-major order from offset 0 (a view is
/// copied out first).
pub fn dense_flex(t: FlexTensor) -> FlexTensor {
    debug_assert_eq!(t.dtype(), DType::F32, "the kernels take float32 only");
    let exact = t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == t.layout().num_elements() * size_of::<f32>();
    if exact { t } else { t.to_contiguous() }
}
