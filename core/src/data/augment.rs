//! Decoding and augmentation of one image, ending as `u8` HWC pixels in a
//! slot of a batch buffer (normalisation happens on the device).
//!
//! Training follows torchvision on PIL images, which is what OpenCLIP and
//! the CLIPA torch code run (CLIPA-FACTS §1.6): `RandomResizedCrop(size,
//! scale=(0.4, 1), interpolation=BILINEAR)` with PIL's antialiased filter and
//! no flip, then optionally `RandomApply([ColorJitter(.32, .32, .32, .08)],
//! p=0.8)` and `RandomGrayscale(0.2)`. Crop sampling is
//! `RandomResizedCrop.get_params` draw for draw; the colour ops are
//! `torchvision/transforms/_functional_pil.py` over `PIL.ImageEnhance`.
//! Evaluation is the model's own (`ClipConfig::eval_resize`): OpenCLIP's
//! default bicubic resize of the shorter side and a centre crop, or CLIPA's
//! bilinear, antialiased square resize.

use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::data::ImagePayload;

mod color;
mod jpeg;
mod pil;
use crate::model::EvalResize;
use crate::rng::Rng;
use crate::{Error, Result};
pub use color::{ColorJitter, to_grayscale};
use jpeg::{JpegPlan, Outcome};
use pil::PilFilter;

/// torchvision's `Resize(size)` then `CenterCrop(size)` on a `w`×`h` image:
/// the resized size (shorter side `size`, the longer one floored) and the
/// crop's top-left corner (Python's `round`, ties to even).
fn center_crop(w: usize, h: usize, size: usize) -> ((usize, usize), usize, usize) {
    let (short, long) = (w.min(h), w.max(h));
    let new_long = (size * long / short).max(1);
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    let offset = |n: usize| ((n - size) as f64 / 2.0).round_ties_even() as usize;
    ((nw, nh), offset(nw), offset(nh))
}

/// Decodes encoded bytes (JPEG, PNG, WebP; the format is sniffed) to RGB;
/// grey and RGBA become RGB. `key` names the sample in the error.
pub fn decode_rgb(bytes: &[u8], key: &str) -> Result<RgbImage> {
    let bad = |reason: String| Error::Format {
        path: key.into(),
        reason,
    };
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read image: {e}")))?
        .decode()
        .map_err(|e| bad(format!("cannot decode image: {e}")))?;
    let rgb = img.into_rgb8();
    if rgb.width() == 0 || rgb.height() == 0 {
        return Err(bad("empty image".into()));
    }
    Ok(rgb)
}

/// The RGB pixels of a payload: decodes encoded bytes, passes pixels on.
pub fn payload_rgb(payload: ImagePayload, key: &str) -> Result<RgbImage> {
    match payload {
        ImagePayload::Encoded(bytes) => decode_rgb(&bytes, key),
        ImagePayload::Decoded(img) if img.width() == 0 || img.height() == 0 => Err(Error::Format {
            path: key.into(),
            reason: "empty image".into(),
        }),
        ImagePayload::Decoded(img) => Ok(img),
    }
}

/// An integer crop of the source image, as torchvision's `(i, j, h, w)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First column.
    pub left: u32,
    /// First row.
    pub top: u32,
    /// Columns kept.
    pub width: u32,
    /// Rows kept.
    pub height: u32,
}

/// Training augmentation: random resized crop and optional SimCLR colour
/// ops. The default is CLIPA's (crop only); see [`TrainAugment::clipa_strong`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainAugment {
    /// Range of the crop's share of the image area (CLIPA: 0.4..1.0).
    pub scale: (f32, f32),
    /// Range of the crop's width/height, sampled log-uniformly (3/4..4/3).
    pub ratio: (f32, f32),
    /// Colour-jitter strength `s`: brightness, contrast and saturation
    /// factors in `1 ± 0.8s`, hue shift in `±0.2s`, applied with p = 0.8.
    pub color_jitter: Option<f32>,
    /// Probability of turning the image grey (0.2 when enabled).
    pub grayscale_p: f32,
}

impl Default for TrainAugment {
    fn default() -> Self {
        Self {
            scale: (0.4, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            color_jitter: None,
            grayscale_p: 0.0,
        }
    }
}

/// torchvision `RandomApply` probability of the colour jitter in SimCLR.
const JITTER_P: f64 = 0.8;

impl TrainAugment {
    /// CLIPA's H/G (JAX) and L/16 (torch) recipe: jitter 0.4, grayscale 0.2.
    pub fn clipa_strong() -> Self {
        Self {
            color_jitter: Some(0.4),
            grayscale_p: 0.2,
            ..Self::default()
        }
    }

    /// Checks the ranges a config file may get wrong.
    pub fn validate(&self) -> Result<()> {
        let (s0, s1) = self.scale;
        let (r0, r1) = self.ratio;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return Err(Error::Config(format!(
                "augment scale {s0}..{s1} must satisfy 0 < lo <= hi <= 1"
            )));
        }
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return Err(Error::Config(format!(
                "augment ratio {r0}..{r1} must satisfy 0 < lo <= hi"
            )));
        }
        if let Some(s) = self.color_jitter
            && !(0.0..=1.0).contains(&s)
        {
            return Err(Error::Config(format!(
                "color jitter strength {s} must lie in 0..=1"
            )));
        }
        if !(0.0..=1.0).contains(&self.grayscale_p) {
            return Err(Error::Config(format!(
                "grayscale_p {} must lie in 0..=1",
                self.grayscale_p
            )));
        }
        Ok(())
    }

    /// `RandomResizedCrop.get_params`: ten tries of area × log-uniform
    /// ratio, then the central crop clamped to the ratio range.
    pub fn sample_crop(&self, width: u32, height: u32, rng: &mut Rng) -> CropBox {
        let area = f64::from(width) * f64::from(height);
        let (lr0, lr1) = (f64::from(self.ratio.0).ln(), f64::from(self.ratio.1).ln());
        for _ in 0..10 {
            let target = area * rng.range(f64::from(self.scale.0), f64::from(self.scale.1));
            let aspect = rng.range(lr0, lr1).exp();
            // Python's round() is round-half-even.
            let w = (target * aspect).sqrt().round_ties_even();
            let h = (target / aspect).sqrt().round_ties_even();
            if w > 0.0 && h > 0.0 && w <= f64::from(width) && h <= f64::from(height) {
                let (w, h) = (w as u32, h as u32);
                let top = rng.below((height - h + 1) as usize) as u32;
                let left = rng.below((width - w + 1) as usize) as u32;
                return CropBox {
                    left,
                    top,
                    width: w,
                    height: h,
                };
            }
        }
        let in_ratio = f64::from(width) / f64::from(height);
        let (w, h) = if in_ratio < f64::from(self.ratio.0) {
            (
                width,
                ((f64::from(width) / f64::from(self.ratio.0)).round_ties_even() as u32)
                    .clamp(1, height),
            )
        } else if in_ratio > f64::from(self.ratio.1) {
            (
                ((f64::from(height) * f64::from(self.ratio.1)).round_ties_even() as u32)
                    .clamp(1, width),
                height,
            )
        } else {
            (width, height)
        };
        CropBox {
            left: (width - w) / 2,
            top: (height - h) / 2,
            width: w,
            height: h,
        }
    }
}

/// How a decoded image becomes a `size`² training or evaluation input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ImageTransform {
    /// Random resized crop (bilinear, antialiased) and optional colour ops.
    Train(TrainAugment),
    /// Bicubic resize of the shorter side to `size`, then the centre square
    /// (OpenCLIP's default eval transform).
    EvalCenterCrop,
    /// Bilinear, antialiased resize of the whole image to `size`² (CLIPA's
    /// evaluation: `--square-resize-only --interpolation bilinear`).
    EvalSquash,
}

impl EvalResize {
    /// The evaluation transform it stands for.
    pub fn transform(self) -> ImageTransform {
        match self {
            Self::CenterCrop => ImageTransform::EvalCenterCrop,
            Self::Squash => ImageTransform::EvalSquash,
        }
    }
}

impl ImageTransform {
    /// One-off convenience around [`Augmenter`]; loaders keep an
    /// [`Augmenter`] per worker so that the resizer's buffers are reused.
    pub fn apply(&self, img: &RgbImage, size: u32, rng: &mut Rng) -> Result<RgbImage> {
        let mut out = vec![0u8; (size as usize).pow(2) * 3];
        Augmenter::new(*self, size).apply_into(img, rng, &mut out)?;
        RgbImage::from_raw(size, size, out)
            .ok_or_else(|| Error::Config("output buffer size".into()))
    }
}

/// A transform bound to an output size, with the resizer's scratch
/// buffers it reuses from image to image.
#[derive(Debug, Clone)]
pub struct Augmenter {
    transform: ImageTransform,
    size: u32,
    resizer: Resizer,
}

impl Augmenter {
    /// An augmenter producing `size`² RGB images.
    pub fn new(transform: ImageTransform, size: u32) -> Self {
        Self {
            transform,
            size,
            resizer: Resizer::new(),
        }
    }

    /// Bytes of one output image: `size · size · 3`.
    pub fn output_len(&self) -> usize {
        (self.size as usize).pow(2) * 3
    }

    /// Transforms `img` into `out`, `[size, size, 3]` u8, drawing from
    /// `rng`. Errs on an empty image or a wrong `out` length.
    pub fn apply_into(&mut self, img: &RgbImage, rng: &mut Rng, out: &mut [u8]) -> Result<()> {
        let (w, h) = img.dimensions();
        self.check(w, h, out.len())?;
        let region = self.region(w, h, rng);
        self.render(img, region, rng, out)
    }

    /// Decodes `payload` and transforms it into `out`, drawing from `rng`
    /// exactly as [`Augmenter::apply_into`] on the decoded image would.
    /// JPEG bytes are decoded only as far down and as finely as the
    /// output needs (see `augment/jpeg.rs`); other formats, and JPEGs that
    /// libjpeg refuses, take the `image` crate's full decode. `key` names
    /// the sample in the error.
    pub fn apply_payload(
        &mut self,
        payload: ImagePayload,
        key: &str,
        rng: &mut Rng,
        out: &mut [u8],
    ) -> Result<()> {
        if let ImagePayload::Encoded(bytes) = &payload
            && jpeg::is_jpeg(bytes)
            && self.size > 0
            && out.len() == self.output_len()
        {
            let size = self.size;
            let (decoded, region) = jpeg::decode(bytes, |w, h| {
                let region = self.region(w, h, rng);
                // Training crops are drawn with a border that stops at the
                // crop; the eval filters may read a few rows below it.
                let rows = match self.transform {
                    ImageTransform::Train(_) => (region.top + region.height).ceil() as u32,
                    _ => h,
                };
                let plan = JpegPlan::for_region(region.width, region.height, size, rows);
                (plan, region)
            });
            match (decoded, region) {
                (Outcome::Decoded(d), Some(region)) => {
                    return self.render(&d.image, region.scaled(d.scale), rng, out);
                }
                (Outcome::Truncated, _) => {
                    return Err(Error::Format {
                        path: key.into(),
                        reason: "truncated JPEG".into(),
                    });
                }
                // Same region, so the draws from `rng` are not repeated.
                (Outcome::Refused, Some(region)) => {
                    let img = decode_rgb(bytes, key)?;
                    self.check(img.width(), img.height(), out.len())?;
                    return self.render(&img, region, rng, out);
                }
                _ => {}
            }
        }
        let img = payload_rgb(payload, key)?;
        self.apply_into(&img, rng, out)
    }

    /// Errs unless a `w`×`h` image can become this augmenter's output in
    /// `out_len` bytes.
    fn check(&self, w: u32, h: u32, out_len: usize) -> Result<()> {
        if w == 0 || h == 0 || self.size == 0 || out_len != self.output_len() {
            return Err(Error::Format {
                path: "image".into(),
                reason: format!(
                    "cannot map a {w}x{h} image to {}² in {out_len} bytes",
                    self.size
                ),
            });
        }
        Ok(())
    }

    /// The part of a `w`×`h` source the output shows; draws the random
    /// crop for training.
    fn region(&self, w: u32, h: u32, rng: &mut Rng) -> Region {
        match self.transform {
            ImageTransform::Train(aug) => {
                let c = aug.sample_crop(w, h, rng);
                Region {
                    left: f64::from(c.left),
                    top: f64::from(c.top),
                    width: f64::from(c.width),
                    height: f64::from(c.height),
                }
            }
            ImageTransform::EvalCenterCrop => {
                // The source region that Resize(size) + CenterCrop(size)
                // shows (it plans a JPEG's decode scale).
                let ((nw, nh), left, top) = center_crop(w as usize, h as usize, self.size as usize);
                let (sx, sy) = (f64::from(w) / nw as f64, f64::from(h) / nh as f64);
                let s = f64::from(self.size);
                Region {
                    left: left as f64 * sx,
                    top: top as f64 * sy,
                    width: s * sx,
                    height: s * sy,
                }
            }
            ImageTransform::EvalSquash => Region {
                left: 0.0,
                top: 0.0,
                width: f64::from(w),
                height: f64::from(h),
            },
        }
    }

    /// Resizes `region` of `img` into `out`, then applies the colour ops.
    fn render(
        &mut self,
        img: &RgbImage,
        region: Region,
        rng: &mut Rng,
        out: &mut [u8],
    ) -> Result<()> {
        let bad = |reason: String| Error::Format {
            path: "image".into(),
            reason,
        };
        let (w, h) = img.dimensions();
        let size = self.size as usize;
        match self.transform {
            ImageTransform::Train(_) => {
                let src = ImageRef::new(w, h, img.as_raw(), PixelType::U8x3)
                    .map_err(|e| bad(e.to_string()))?;
                let mut dst = Image::from_slice_u8(self.size, self.size, out, PixelType::U8x3)
                    .map_err(|e| bad(e.to_string()))?;
                // Crop first so the filter stops at the crop border, as
                // torchvision's `img.crop(box).resize(...)` does. The box
                // is whole pixels at full scale; on a DCT-downscaled decode
                // it is rounded outwards (under one reduced pixel).
                let x0 = (region.left.floor() as u32).min(w - 1);
                let y0 = (region.top.floor() as u32).min(h - 1);
                let x1 = ((region.left + region.width).ceil() as u32).clamp(x0 + 1, w);
                let y1 = ((region.top + region.height).ceil() as u32).clamp(y0 + 1, h);
                let view = CroppedImage::new(&src, x0, y0, x1 - x0, y1 - y0)
                    .map_err(|e| bad(e.to_string()))?;
                let opts =
                    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
                self.resizer
                    .resize(&view, &mut dst, &opts)
                    .map_err(|e| bad(format!("resize failed: {e}")))?;
            }
            // Evaluation reproduces PIL's pixels (OpenCLIP's transforms run on
            // PIL images), from the pixels as decoded.
            ImageTransform::EvalSquash => pil::resize_crop(
                img.as_raw(),
                (w as usize, h as usize),
                (size, size),
                (0, 0, size, size),
                PilFilter::Bilinear,
                out,
            ),
            ImageTransform::EvalCenterCrop => {
                let (resized, left, top) = center_crop(w as usize, h as usize, size);
                pil::resize_crop(
                    img.as_raw(),
                    (w as usize, h as usize),
                    resized,
                    (left, top, size, size),
                    PilFilter::Bicubic,
                    out,
                );
            }
        }
        if let ImageTransform::Train(aug) = self.transform {
            if let Some(s) = aug.color_jitter
                && rng.bernoulli(JITTER_P)
            {
                ColorJitter::simclr(s).apply(out, rng);
            }
            if aug.grayscale_p > 0.0 && rng.bernoulli(f64::from(aug.grayscale_p)) {
                to_grayscale(out);
            }
        }
        Ok(())
    }
}

/// A box of the source image in (possibly fractional) pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Region {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

impl Region {
    /// The same box on an image scaled by `s`.
    fn scaled(self, s: f64) -> Self {
        Self {
            left: self.left * s,
            top: self.top * s,
            width: self.width * s,
            height: self.height * s,
        }
    }
}

#[cfg(test)]
mod tests;
