//! The token embedding under autodiff on flex, with a parallel backward.
//!
//! Burn's backward of the lookup is flex's `embedding_backward`: a zeroed
//! `[vocab, width]` tensor (allocated, then copied once more to re-align
//! it), copied again by `select_add`, into which the output rows are added,
//! all on the thread that drives the step. At bench-tiny's 49408 × 256
//! table that is three 50 MB passes, about 27 ms of every step while the
//! rayon workers wait. Here the rayon tasks each own a range of table rows:
//! each writes its range once (zeros), then adds the output rows whose ids
//! fall in it, in token order, as `select_add` adds them, so the gradient
//! has the same bits. The forward is flex's own gather.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::ops::ModuleOps;
use burn::tensor::{DType, Int, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use clipa_core::kernels::EmbeddingKernel;
use rayon::prelude::*;

use super::gemm::{Unset, filled};
use super::tensor::{Backend, dense_flex};

/// The embedding kernel of the CPU backend under autodiff (inference runs
/// flex's own lookup, which has no backward to replace).
pub struct FlexEmbedding;

/// Table rows per rayon task: 256 KiB of gradient at width 256.
const ROWS: usize = 256;

impl EmbeddingKernel<Backend> for FlexEmbedding {
    fn embedding(
        &self,
        table: Tensor<Backend, 2>,
        ids: Tensor<Backend, 2, Int>,
    ) -> Tensor<Backend, 3> {
        let ids = ids.into_primitive();
        if table.dtype() != DType::F32 || !matches!(ids.dtype(), DType::I64 | DType::I32) {
            return burn::tensor::module::embedding(table, Tensor::from_primitive(ids));
        }
        let table = table.into_primitive().tensor();
        let [vocab, width] = table.primitive.layout().shape().dims::<2>();
        let out = <Flex as ModuleOps<Flex>>::embedding(table.primitive, ids.clone());
        let out = match EmbeddingBackward
            .prepare::<NoCheckpointing>([table.node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(Saved { ids, vocab, width }, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// What backward needs: the ids and the table's size.
#[derive(Clone, Debug)]
struct Saved {
    /// `[batch, len]`, int64 or int32.
    ids: FlexTensor,
    vocab: usize,
    width: usize,
}

/// The backward step of [`FlexEmbedding`].
#[derive(Debug)]
struct EmbeddingBackward;

impl Backward<Flex, 1> for EmbeddingBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let saved = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            table_grad(
                &ids_of(&saved.ids),
                &dense_flex(dy),
                saved.vocab,
                saved.width,
            )
        });
    }
}

/// The ids as table rows, in token order.
///
/// # Panics
/// On an id outside `usize` (a negative one), as flex's lookup does.
fn ids_of(ids: &FlexTensor) -> Vec<usize> {
    let ids = ids.to_contiguous();
    let row = |v: i64| usize::try_from(v).unwrap_or_else(|_| panic!("token id {v} is negative"));
    match ids.dtype() {
        DType::I64 => ids.storage::<i64>().iter().map(|&v| row(v)).collect(),
        DType::I32 => ids
            .storage::<i32>()
            .iter()
            .map(|&v| row(v.into()))
            .collect(),
        other => unreachable!("the forward took int64 and int32 only, not {other:?}"),
    }
}

/// The table's gradient `[vocab, width]`: row r is the sum of the rows of
/// `dy` (`[ids.len(), width]`, any shape with those elements) whose id is
/// r, added in token order onto zero; rows no id names are zero.
///
/// # Panics
/// On an id ≥ `vocab`.
fn table_grad(ids: &[usize], dy: &FlexTensor, vocab: usize, width: usize) -> FlexTensor {
    let dy = dy.storage::<f32>();
    assert_eq!(dy.len(), ids.len() * width, "one gradient row per id");
    if let Some(&bad) = ids.iter().find(|&&id| id >= vocab) {
        panic!("token id {bad} outside the table's {vocab} rows");
    }
    // Token positions by id, each id's in token order (a stable sort), so a
    // task finds its rows' tokens as one run.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&t| ids[t]);
    let mut grad = Unset::new(Shape::new([vocab, width]));
    grad.slots()
        .par_chunks_mut(ROWS * width)
        .enumerate()
        .for_each(|(task, rows)| {
            let rows = filled(rows, 0.0); // [≤ ROWS, width]
            let first = task * ROWS;
            let last = first + rows.len() / width;
            let start = order.partition_point(|&t| ids[t] < first);
            for &t in order[start..].iter().take_while(|&&t| ids[t] < last) {
                let r = ids[t] - first;
                rows[r * width..(r + 1) * width]
                    .iter_mut()
                    .zip(&dy[t * width..(t + 1) * width])
                    .for_each(|(g, &d)| *g += d);
            }
        });
    // SAFETY: the tasks cover every row, and `filled` writes each slot.
    #[allow(unsafe_code)]
    let grad = unsafe { grad.finish() };
    grad
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use clipa_core::numeric::{normal_data, relative_error};

    /// The kernel against Burn's lookup under autodiff: the value and the
    /// table's gradient through a weighted sum, bit for bit, with repeated
    /// ids (first, last and middle rows among them) spread over several
    /// tasks of a table whose row count is no multiple of the task size;
    /// then without a graph.
    #[test]
    fn flex_embedding_matches_burns() {
        let device = Default::default();
        let (vocab, width, batch, len) = (3 * ROWS + 11, 19, 4, 9);
        let ids: Vec<i64> = (0..batch * len)
            .map(|i| match i % 7 {
                0 => 0,
                1 => (vocab - 1) as i64,
                2 => 5,
                _ => ((i * 131) % vocab) as i64,
            })
            .collect();
        let ids = Tensor::<Backend, 2, Int>::from_data(TensorData::new(ids, [batch, len]), &device);
        let w = Tensor::<Backend, 3>::from_data(normal_data([batch, len, width], 2, 1.0), &device);
        let run = |fused: bool| {
            let table =
                Tensor::<Backend, 2>::from_data(normal_data([vocab, width], 1, 1.0), &device)
                    .require_grad();
            let y = if fused {
                FlexEmbedding.embedding(table.clone(), ids.clone())
            } else {
                burn::tensor::module::embedding(table.clone(), ids.clone())
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            let g = table.grad(&grads).expect("the table has a gradient");
            (y.into_data(), g.into_data())
        };
        let ((yf, gf), (yc, gc)) = (run(true), run(false));
        assert_eq!(yf, yc, "values");
        assert_eq!(gf, gc, "table gradient");
        let g: Vec<f32> = gf.to_vec().expect("float32");
        assert!(
            g[5 * width..6 * width].iter().all(|&v| v != 0.0),
            "row 5 got its tokens"
        );
        assert!(
            g[6 * width..7 * width].iter().all(|&v| v == 0.0),
            "row 6 got none"
        );
        let table = Tensor::<Backend, 2>::from_data(normal_data([vocab, width], 1, 1.0), &device);
        let y = FlexEmbedding
            .embedding(table.clone(), ids.clone())
            .into_data();
        let want = burn::tensor::module::embedding(table, ids).into_data();
        assert_eq!(relative_error(&y, &want), 0.0, "inference value");
    }
}
