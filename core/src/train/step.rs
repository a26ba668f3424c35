//! One optimiser step: forward, contrastive loss, backward, with OpenCLIP's
//! two-pass cached-feature gradient accumulation (`--accum-freq`) when the
//! batch is split into micro-batches.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};

use super::config::LossKind;
use crate::loss::{clip_loss, siglip_loss};
use crate::model::{ClipModel, l2_normalize};

/// One prepared batch on the device.
pub struct DeviceBatch<B: AutodiffBackend> {
    /// Normalised images `[batch, 3, px, px]`.
    pub images: Tensor<B, 4>,
    /// Kept-patch indices `[batch, kept]`, `None` when nothing is masked.
    pub keep: Option<Tensor<B, 2, Int>>,
    /// Token ids `[batch, context]`.
    pub ids: Tensor<B, 2, Int>,
}

/// The loss on normalised features with the model's temperature (and bias
/// for the sigmoid loss). `scale` is `logit_scale` (log-space).
///
/// # Shapes
/// `image`, `text`: `[batch, dim]` → `[1]`
pub fn contrastive_loss<B: burn::tensor::backend::Backend>(
    kind: LossKind,
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    scale: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let logits = image.matmul(text.transpose()) * scale.exp().unsqueeze::<2>(); // [batch, batch]
    match kind {
        LossKind::Softmax => clip_loss(logits),
        LossKind::Sigmoid => {
            let bias = bias.expect("the sigmoid loss needs a logit bias");
            siglip_loss(logits + bias.unsqueeze::<2>())
        }
    }
}

/// Loss and gradients of one batch, split into `micro` micro-batches.
///
/// With `micro = 1` this is a plain forward/backward. Otherwise (OpenCLIP
/// `train.py`, `accum_freq > 1`): a no-grad pass computes every
/// micro-batch's features; then each micro-batch is recomputed with
/// gradients and its fresh features replace its cached ones in the full
/// `[batch, dim]` matrices, so every loss sees all negatives, and the
/// gradients add up to those of the full batch. The temperature (and bias)
/// take their gradient from the first micro-batch only — they enter the
/// loss directly, and counting them `micro` times (as OpenCLIP does) would
/// scale their gradient by `micro`.
pub fn loss_and_grads<B: AutodiffBackend>(
    model: &ClipModel<B>,
    batch: &DeviceBatch<B>,
    kind: LossKind,
    micro: usize,
) -> (f64, GradientsParams) {
    if micro == 1 {
        let img = l2_normalize(model.encode_image(batch.images.clone(), batch.keep.clone()));
        let txt = l2_normalize(model.encode_text(batch.ids.clone()));
        let loss = contrastive_loss(kind, img, txt, model.logit_scale.val(), model.bias());
        let value = loss.clone().into_scalar().elem::<f64>();
        return (value, GradientsParams::from_grads(loss.backward(), model));
    }
    let n = batch.ids.dims()[0];
    let size = n / micro;
    let slice4 = |t: &Tensor<B, 4>, j: usize| t.clone().narrow(0, j * size, size);
    let slice2 = |t: &Tensor<B, 2, Int>, j: usize| t.clone().narrow(0, j * size, size);
    let inner = model.valid();
    // Per micro-batch: (image features, text features), no graph.
    type Features<IB> = (Tensor<IB, 2>, Tensor<IB, 2>);
    let cached: Vec<Features<B::InnerBackend>> = (0..micro)
        .map(|j| {
            let img = inner.encode_image(
                slice4(&batch.images, j).inner(),
                batch.keep.as_ref().map(|k| slice2(k, j).inner()),
            );
            let txt = inner.encode_text(slice2(&batch.ids, j).inner());
            (l2_normalize(img), l2_normalize(txt))
        })
        .collect();
    let mut acc = GradientsAccumulator::<ClipModel<B>>::new();
    let mut value = 0.0;
    for j in 0..micro {
        let fresh_img = l2_normalize(model.encode_image(
            slice4(&batch.images, j),
            batch.keep.as_ref().map(|k| slice2(k, j)),
        ));
        let fresh_txt = l2_normalize(model.encode_text(slice2(&batch.ids, j)));
        let (mut imgs, mut txts) = (Vec::with_capacity(micro), Vec::with_capacity(micro));
        for (i, (ci, ct)) in cached.iter().enumerate() {
            if i == j {
                imgs.push(fresh_img.clone());
                txts.push(fresh_txt.clone());
            } else {
                imgs.push(Tensor::from_inner(ci.clone()));
                txts.push(Tensor::from_inner(ct.clone()));
            }
        }
        let (scale, bias) = if j == 0 {
            (model.logit_scale.val(), model.bias())
        } else {
            (
                model.logit_scale.val().detach(),
                model.bias().map(|b| b.detach()),
            )
        };
        let loss = contrastive_loss(
            kind,
            Tensor::cat(imgs, 0),
            Tensor::cat(txts, 0),
            scale,
            bias,
        ); // [1]
        value = loss.clone().into_scalar().elem::<f64>();
        acc.accumulate(model, GradientsParams::from_grads(loss.backward(), model));
    }
    (value, acc.grads())
}

use burn::tensor::ElementConversion;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClipConfig;
    use crate::numeric::{TestBackend, normal_data};
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::TensorData;

    type B = TestBackend;

    /// Every parameter's gradient, flattened, in visiting order.
    struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);

    impl ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.get::<<B as AutodiffBackend>::InnerBackend, D>(p.id) {
                self.1.push(g.into_data().to_vec().unwrap());
            }
        }
    }

    fn grads_of(model: &ClipModel<B>, g: &GradientsParams) -> Vec<Vec<f32>> {
        let mut c = Collect(g, Vec::new());
        model.visit(&mut c);
        c.1
    }

    fn batch(device: &burn::tensor::Device<B>, n: usize, masked: bool) -> DeviceBatch<B> {
        let images = Tensor::from_data(normal_data([n, 3, 32, 32], 5, 1.0), device);
        let ids: Vec<i64> = (0..n as i64)
            .flat_map(|i| [49406, 100 + i, 200 + 2 * i, 49407, 0, 0, 0, 0])
            .collect();
        let keep = masked.then(|| {
            let idx: Vec<i64> = (0..n as i64)
                .flat_map(|i| (0..16).map(move |k| (k * 4 + i) % 64))
                .collect();
            Tensor::from_data(TensorData::new(idx, [n, 16]), device)
        });
        DeviceBatch {
            images,
            keep,
            ids: Tensor::from_data(TensorData::new(ids, [n, 8]), device),
        }
    }

    #[test]
    fn micro_batches_give_the_loss_and_gradients_of_the_full_batch() {
        let device = Default::default();
        let mut cfg = ClipConfig::tiny();
        cfg.text.context_length = 8;
        let model: ClipModel<B> = cfg.init(&device);
        for (kind, masked) in [(LossKind::Softmax, false), (LossKind::Softmax, true)] {
            let b = batch(&device, 8, masked);
            let (l1, g1) = loss_and_grads(&model, &b, kind, 1);
            let (l4, g4) = loss_and_grads(&model, &b, kind, 4);
            assert!(
                (l1 - l4).abs() < 1e-5 * l1.abs().max(1.0),
                "loss {l1} vs {l4}"
            );
            let (a, c) = (grads_of(&model, &g1), grads_of(&model, &g4));
            assert_eq!(a.len(), c.len());
            assert!(a.len() > 20, "every parameter has a gradient");
            // Some gradients are zero in exact arithmetic (attention key
            // biases: softmax ignores a shift shared by all keys) and only
            // float noise here, so errors are relative to the larger of the
            // tensor's norm and 1e-4 of the largest gradient norm.
            let norm = |v: &[f32]| v.iter().map(|p| p * p).sum::<f32>().sqrt();
            let floor = a.iter().map(|x| norm(x)).fold(0.0f32, f32::max) * 1e-4;
            for (i, (x, y)) in a.iter().zip(&c).enumerate() {
                let diff: Vec<f32> = x.iter().zip(y).map(|(p, q)| p - q).collect();
                let err = norm(&diff) / norm(x).max(floor);
                assert!(err < 1e-4, "parameter #{i}: relative gradient error {err}");
            }
        }
    }

    #[test]
    fn sigmoid_loss_trains_the_bias() {
        let device = Default::default();
        let mut cfg = ClipConfig::tiny();
        cfg.text.context_length = 8;
        cfg.init_logit_scale = 10f64.ln();
        cfg.init_logit_bias = Some(-10.0);
        let model: ClipModel<B> = cfg.init(&device);
        let b = batch(&device, 4, false);
        let (loss, g) = loss_and_grads(&model, &b, LossKind::Sigmoid, 2);
        // With b = −10 every pair looks negative: the loss is about the 4
        // positives' −log σ(t·s − 10) ≈ 10 − t·s each, divided by 4.
        assert!(loss > 5.0 && loss < 25.0, "{loss}");
        let bias_grad =
            g.get::<<B as AutodiffBackend>::InnerBackend, 1>(model.logit_bias.as_ref().unwrap().id);
        assert!(bias_grad.is_some(), "the bias learns");
    }
}
