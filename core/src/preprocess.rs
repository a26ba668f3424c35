//! Evaluation-time image preprocessing, as OpenCLIP's default transform
//! for a model: resize the shorter side (bicubic), centre-crop to a square,
//! scale to 0–1 and normalise per channel.

use std::path::Path;

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
pub fn center_crop_normalized(img: &RgbImage, size: usize, norm: &Normalization) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let scale = size as f64 / w.min(h) as f64;
    // Round as torchvision's Resize does (int(short·scale) on the long side).
    let (nw, nh) = (
        ((w as f64 * scale) as u32).max(size as u32),
        ((h as f64 * scale) as u32).max(size as u32),
    );
    let resized = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let mut out = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel(x0 + x as u32, y0 + y as u32);
            for (c, ((&v, mean), std)) in p.0.iter().zip(norm.mean).zip(norm.std).enumerate() {
                out[c * size * size + y * size + x] = (v as f32 / 255.0 - mean) / std;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
