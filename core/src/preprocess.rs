//! Evaluation-time image preprocessing, as OpenCLIP's default transform
//! for a model: resize the shorter side (bicubic), centre-crop to a square,
//! scale to 0–1 and normalise per channel.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

use crate::model::Normalization;
use crate::{Error, Result};

/// Decodes an image file (PNG, JPEG) to RGB; grey and RGBA become RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: format!("cannot decode image: {e}"),
        })?;
    Ok(DynamicImage::into_rgb8(img))
}

/// Resize-shorter-side + centre crop to `size`², then normalised CHW
/// floats `[3, size, size]`.
///
/// The centre square is cut from the source first and then resized, which
/// is the same region as torchvision's resize-then-crop; it differs only in
/// how the bicubic filter treats the crop border, and it never allocates a
/// resized copy of the whole image (a 1×60000 strip stays cheap).
pub fn center_crop_normalized(img: &RgbImage, size: usize, norm: &Normalization) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let side = w.min(h);
    let (cx, cy) = ((w - side) / 2, (h - side) / 2);
    let square = image::imageops::crop_imm(img, cx, cy, side, side).to_image();
    let resized =
        image::imageops::resize(&square, size as u32, size as u32, FilterType::CatmullRom);
    let mut out = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel(x as u32, y as u32);
            for (c, ((&v, mean), std)) in p.0.iter().zip(norm.mean).zip(norm.std).enumerate() {
                out[c * size * size + y * size + x] = (v as f32 / 255.0 - mean) / std;
            }
        }
    }
    out
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
    let packed = Tensor::<B, 1, Int>::from_data(TensorData::new(words, [m]), device); // [m]
    let lanes: Vec<Tensor<B, 1, Int>> = (0..4)
        .map(|k| {
            packed
                .clone()
                .bitwise_right_shift_scalar((8 * k).elem())
                .bitwise_and_scalar(255.elem())
        })
        .collect();
    let x = Tensor::stack::<2>(lanes, 1) // [m, 4]
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

    #[test]
    fn downscales_the_centre_square() {
        // 30×20: the centre 20×20 square is x ∈ [5, 25); paint x < 5 red so
        // a correct crop never sees it, and check a 10×10 output.
        let img = RgbImage::from_fn(30, 20, |x, _| {
            if x < 5 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let norm = Normalization {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let out = center_crop_normalized(&img, 10, &norm);
        assert_eq!(out.len(), 3 * 100);
        assert!(
            out[..100].iter().all(|&r| r < 1e-6),
            "no red inside the crop"
        );
        assert!(
            out[200..].iter().all(|&b| (b - 1.0).abs() < 1e-6),
            "all blue"
        );
        let tall = RgbImage::new(1, 5000);
        assert_eq!(center_crop_normalized(&tall, 4, &norm).len(), 48);
    }

    #[test]
    fn crops_the_centre_and_normalises() {
        // 8×4 image: left half black, right half white; the centre crop of
        // the 4×… resize keeps both halves.
        let img = RgbImage::from_fn(8, 4, |x, _| {
            if x < 4 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let norm = Normalization {
            mean: [0.5; 3],
            std: [0.5; 3],
        };
        let out = center_crop_normalized(&img, 4, &norm);
        assert_eq!(out.len(), 3 * 16);
        assert!(
            (out[0] + 1.0).abs() < 1e-6,
            "left edge black → -1, got {}",
            out[0]
        );
        assert!(
            (out[3] - 1.0).abs() < 1e-6,
            "right edge white → +1, got {}",
            out[3]
        );
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
