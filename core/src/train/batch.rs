//! The device side of a batch: pixels normalised on the device, token ids,
//! kept-patch indices. Built in one place from the loader's host batch.

use std::ops::Range;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::Normalization;
use crate::preprocess::u8_batch_to_tensor;

/// One prepared batch on the device.
pub struct DeviceBatch<B: AutodiffBackend> {
    /// Normalised images `[batch, 3, px, px]`.
    pub images: Tensor<B, 4>,
    /// Kept-patch indices `[batch, kept]`, `None` when nothing is masked.
    pub keep: Option<Tensor<B, 2, Int>>,
    /// Token ids `[batch, context]`.
    pub ids: Tensor<B, 2, Int>,
}

impl<B: AutodiffBackend> DeviceBatch<B> {
    /// Rows `rows` of a host batch, on `device`: u8 pixels `images`
    /// `[batch, px, px, 3]` (normalised with `norm` on the device), token ids
    /// `ids` `[batch, len]`, and `keep`, the kept patches of those rows
    /// with their indices `[n, kept]`. A replica takes its rows of its
    /// process's batch this way.
    pub fn from_host(
        images: &[u8],
        ids: &[i64],
        keep: Option<(usize, &[i64])>,
        rows: Range<usize>,
        px: usize,
        norm: &Normalization,
        device: &B::Device,
    ) -> Self {
        let pixels = px * px * 3;
        let batch = images.len() / pixels;
        let len = ids.len() / batch.max(1);
        let n = rows.len();
        let take = |data: &[i64], width: usize| {
            data[rows.start * width..rows.end * width].to_vec() // [n, width]
        };
        Self {
            images: u8_batch_to_tensor(
                &images[rows.start * pixels..rows.end * pixels],
                n,
                px,
                norm,
                device,
            ),
            keep: keep.map(|(kept, idx)| {
                Tensor::from_data(TensorData::new(idx.to_vec(), [n, kept]), device)
            }),
            ids: Tensor::from_data(TensorData::new(take(ids, len), [n, len]), device),
        }
    }
}
