//! Evaluation-time image preprocessing: image files through the model's own
//! evaluation transform, and u8 batches normalised on the device.

use std::path::PathBuf;

use crate::data::ImagePayload;
use crate::data::augment::Augmenter;
use crate::model::{ClipConfig, Normalization};
use crate::rng::Rng;
use crate::{Error, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

/// Reads image files and preprocesses them the model's own evaluation way
/// (`cfg.eval_resize`, then `cfg.normalization`): `[n, 3, size, size]`.
///
/// This is the path `clipa eval` takes for shard and folder data, so that
/// `classify` and `embed` see the very pixels an evaluation would.
pub fn eval_images<B: Backend>(
    paths: &[PathBuf],
    cfg: &ClipConfig,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let size = cfg.vision.image_size;
    let mut aug = Augmenter::new(cfg.eval_resize.transform(), size as u32);
    let mut bytes = vec![0u8; paths.len() * aug.output_len()];
    // The eval transforms draw nothing; the generator is only a parameter.
    let mut rng = Rng::new(0);
    for (path, out) in paths.iter().zip(bytes.chunks_mut(aug.output_len())) {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let key = path.display().to_string();
        aug.apply_payload(ImagePayload::Encoded(data), &key, &mut rng, out)?;
    }
    Ok(u8_batch_to_tensor(
        &bytes,
        paths.len(),
        size,
        &cfg.normalization,
        device,
    ))
}

/// Uploads a batch of u8 HWC images and normalises it on the device.
///
/// The bytes cross to the device one byte per value, a quarter of the f32
/// traffic (it matters at 32k-image batches): four bytes are packed into
/// each 32-bit integer, because WGSL has no 8-bit type and a u8 tensor on
/// the WGPU backend reads back wrong. The unpacking (shift and mask), the
/// cast, scaling, channel move and normalisation run on the device.
///
/// # Shapes
/// `bytes`: `[batch, size, size, 3]` → `[batch, 3, size, size]`
pub fn u8_batch_to_tensor<B: Backend>(
    bytes: &[u8],
    batch: usize,
    size: usize,
    norm: &Normalization,
    device: &B::Device,
) -> Tensor<B, 4> {
    let n = bytes.len();
    assert_eq!(
        n,
        batch * size * size * 3,
        "bytes hold [batch, size, size, 3]"
    );
    // Little-endian words: byte k of a word is value 4·i + k.
    let words: Vec<i32> = bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            i32::from_le_bytes(w)
        })
        .collect();
    let m = words.len();
    let packed = Tensor::<B, 2, Int>::from_data(TensorData::new(words, [m, 1]), device); // [m, 1]
    // Byte k of each word by one broadcast shift and one mask (two
    // launches on a GPU, where a shift and a mask per byte and a stack
    // took twelve).
    let shifts =
        Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i32, 8, 16, 24], [1, 4]), device);
    let x = packed
        .bitwise_right_shift(shifts)
        .bitwise_and_scalar(255.elem()) // [m, 4]
        .reshape([4 * m])
        .narrow(0, 0, n)
        .reshape([batch, size, size, 3])
        .float(); // [batch, h, w, 3]
    let x = x.permute([0, 3, 1, 2]) / 255.0; // [batch, 3, h, w]
    let mean = Tensor::<B, 1>::from_floats(norm.mean, device).reshape([1, 3, 1, 1]);
    let std = Tensor::<B, 1>::from_floats(norm.std, device).reshape([1, 3, 1, 1]);
    (x - mean) / std
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EvalResize;

    #[test]
    fn eval_images_use_the_models_own_resize() {
        // 40×20: red in x < 5, blue elsewhere. The centre 20×20 square is
        // x ∈ [10, 30), so a centre crop never sees red (the bicubic taps of
        // output column 0 reach x ≥ 7); a squash does.
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path();
        let img = image::RgbImage::from_fn(40, 20, |x, _| {
            image::Rgb(if x < 5 { [255, 0, 0] } else { [0, 0, 255] })
        });
        let png = dir.join("a.png");
        img.save(&png).unwrap();
        let mut cfg = ClipConfig::tiny();
        cfg.vision.image_size = 10;
        cfg.normalization = Normalization {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let device = Default::default();
        let red = |cfg: &ClipConfig| -> Vec<f32> {
            let x = eval_images::<crate::numeric::TestBackend>(
                std::slice::from_ref(&png),
                cfg,
                &device,
            )
            .unwrap(); // [1, 3, 10, 10]
            assert_eq!(x.dims(), [1, 3, 10, 10]);
            x.slice([0..1, 0..1]).into_data().to_vec().unwrap()
        };
        cfg.eval_resize = EvalResize::CenterCrop;
        assert!(
            red(&cfg).iter().all(|&r| r < 1e-6),
            "no red inside the crop"
        );
        cfg.eval_resize = EvalResize::Squash;
        let squashed = red(&cfg);
        // Output column 0 covers source x ∈ [0, 4): red.
        assert!(squashed[0] > 0.9, "{}", squashed[0]);
        assert!(squashed[9] < 1e-6, "the right edge is blue");

        let bad = dir.join("bad.jpg");
        std::fs::write(&bad, b"not an image").unwrap();
        let err = eval_images::<crate::numeric::TestBackend>(&[png, bad], &cfg, &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.jpg"), "{err}");
    }

    #[test]
    fn device_normalisation_matches_the_host_formula() {
        let device = Default::default();
        // Two 1×1 images: (255, 0, 128) and (10, 20, 30).
        let bytes = [255u8, 0, 128, 10, 20, 30];
        let norm = Normalization::IMAGENET;
        let x = u8_batch_to_tensor::<crate::numeric::TestBackend>(&bytes, 2, 1, &norm, &device);
        assert_eq!(x.dims(), [2, 3, 1, 1]);
        let got = x.into_data().to_vec::<f32>().unwrap();
        for (i, (&g, &b)) in got.iter().zip(&bytes).enumerate() {
            let c = i % 3;
            let want = (b as f32 / 255.0 - norm.mean[c]) / norm.std[c];
            assert!((g - want).abs() < 1e-6, "{i}: {g} vs {want}");
        }
    }
}
