//! JPEG decoding through libjpeg-turbo's decoder (the `mozjpeg` build, the
//! same code Pillow links), with two savings the training crop allows:
//!
//! - DCT-domain downscaling: when the crop is at least twice the output
//!   size, the IDCT produces 1/2, 1/4 or 1/8 of the pixels directly. The
//!   crop at the reduced scale still has at least `size` pixels per side,
//!   so the antialiased resize that follows still only shrinks.
//! - An early stop: rows below the crop are never entropy-decoded.
//!
//! Entropy (Huffman) decoding of the rows above the crop's bottom cannot be
//! skipped, and at 512 px it is most of the decode time; see the loader
//! section of `docs/BENCHMARKS.md` for what that floor means for speed.

use std::os::raw::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use image::RgbImage;
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};

/// Whether `bytes` start with a JPEG start-of-image marker.
pub(crate) fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// What to decode of a JPEG once its size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JpegPlan {
    /// Output scale in eighths: 8 (full), 4, 2 or 1.
    pub eighths: u8,
    /// Full-resolution rows needed from the top; decoding stops there.
    pub rows: u32,
}

impl JpegPlan {
    /// The coarsest scale at which a `width`×`height` region of the full
    /// image still covers `size` output pixels per side.
    pub(crate) fn for_region(width: f64, height: f64, size: u32, rows: u32) -> Self {
        let side = width.min(height);
        let eighths = [1u8, 2, 4]
            .into_iter()
            .find(|&e| side * f64::from(e) / 8.0 >= f64::from(size))
            .unwrap_or(8);
        Self { eighths, rows }
    }
}

/// A decoded (possibly downscaled, possibly partial) JPEG.
pub(crate) struct Decoded {
    /// RGB pixels: `ceil(width · eighths / 8)` wide, as many rows as the
    /// plan asked for at that scale.
    pub image: RgbImage,
    /// The scale the pixels are at: `eighths / 8`.
    pub scale: f64,
}

/// What came of [`decode`].
pub(crate) enum Outcome {
    /// The planned pixels.
    Decoded(Decoded),
    /// libjpeg warned about corrupt data and the file has no end marker:
    /// a truncated file, which Pillow refuses too. A bad sample.
    Truncated,
    /// libjpeg cannot or will not read it (a broken header, CMYK, a
    /// warning on an otherwise complete file...): try another decoder.
    Refused,
}

/// Reads the header, asks `plan` what to decode given the full `(width,
/// height)`, and decodes that. Returns the plan's other output alongside
/// (when the header was readable), so that a caller falling back to
/// another decoder reuses the plan and draws no randomness twice.
pub(crate) fn decode<T>(
    bytes: &[u8],
    plan: impl FnOnce(u32, u32) -> (JpegPlan, T),
) -> (Outcome, Option<T>) {
    let mut chosen = None;
    // libjpeg reports failures by unwinding (see [`strict_errors`]), so a
    // corrupt image costs a caught unwind and prints nothing.
    let decoded = catch_unwind(AssertUnwindSafe(|| {
        let mut d = mozjpeg::Decompress::with_err(strict_errors())
            .from_mem(bytes)
            .ok()?;
        let (w, h) = d.size();
        let (p, extra) = plan(u32::try_from(w).ok()?, u32::try_from(h).ok()?);
        chosen = Some(extra);
        d.scale(p.eighths);
        let mut started = d.rgb().ok()?;
        let (ow, oh) = (started.width(), started.height());
        let rows = (p.rows as usize * usize::from(p.eighths))
            .div_ceil(8)
            .clamp(1, oh);
        let mut pixels = vec![0u8; ow * rows * 3];
        started.read_scanlines_into(&mut pixels).ok()?;
        // Dropping without `finish` aborts the decode: the rows below are
        // never read, which is the point.
        drop(started);
        let image = RgbImage::from_raw(u32::try_from(ow).ok()?, u32::try_from(rows).ok()?, pixels)?;
        Some(Decoded {
            image,
            scale: f64::from(p.eighths) / 8.0,
        })
    }));
    let outcome = match decoded {
        Ok(Some(d)) => Outcome::Decoded(d),
        Err(payload)
            if payload.downcast_ref::<&str>() == Some(&WARNING) && !has_end_marker(bytes) =>
        {
            Outcome::Truncated
        }
        _ => Outcome::Refused,
    };
    (outcome, chosen)
}

/// Whether the file ends with an EOI marker (ignoring zero or blank
/// padding that some writers append).
fn has_end_marker(bytes: &[u8]) -> bool {
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    bytes[..end].ends_with(&[0xFF, 0xD9])
}

/// The unwind payload of a libjpeg warning.
const WARNING: &str = "libjpeg warning";

/// libjpeg's error manager, unwinding on errors and on warnings. libjpeg
/// pads a truncated file with grey and only warns ("premature end of JPEG
/// file"), where Pillow raises; stopping lets [`decode`] tell truncation
/// from the harmless warnings that a lenient decoder may accept.
// One of clipa's unsafe spots (the others are the CPU backend's `gemm`
// calls): initialising libjpeg's C struct.
#[allow(unsafe_code)]
fn strict_errors() -> jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills every field of a zeroed manager (a
    // plain C struct of integers and nullable function pointers).
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(fatal);
    err.emit_message = Some(warning_is_fatal);
    err
}

/// Unwinds out of libjpeg (built with unwinding support) to the
/// `catch_unwind` in [`decode`]; `resume_unwind` skips the panic hook.
extern "C-unwind" fn fatal(_cinfo: &mut jpeg_common_struct) {
    resume_unwind(Box::new("libjpeg error"));
}

/// Level −1 is a warning (corrupt or truncated data); higher levels are
/// trace messages, ignored.
extern "C-unwind" fn warning_is_fatal(_cinfo: &mut jpeg_common_struct, level: c_int) {
    if level < 0 {
        resume_unwind(Box::new(WARNING));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use image::codecs::jpeg::JpegEncoder;
    use image::{Rgb, RgbImage};

    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
        let mut bytes = Cursor::new(Vec::new());
        JpegEncoder::new_with_quality(&mut bytes, 95)
            .encode_image(&img)
            .expect("encode test image");
        bytes.into_inner()
    }

    #[test]
    fn plan_picks_the_coarsest_scale_that_still_covers_the_output() {
        assert_eq!(JpegPlan::for_region(512.0, 448.0, 112, 9).eighths, 2);
        assert_eq!(JpegPlan::for_region(512.0, 400.0, 112, 9).eighths, 4);
        assert_eq!(JpegPlan::for_region(300.0, 400.0, 112, 9).eighths, 4);
        assert_eq!(JpegPlan::for_region(223.0, 400.0, 112, 9).eighths, 8);
        assert_eq!(JpegPlan::for_region(1000.0, 1000.0, 112, 9).eighths, 1);
        assert_eq!(JpegPlan::for_region(10.0, 10.0, 112, 9).eighths, 8);
    }

    #[test]
    fn decodes_downscaled_and_stops_at_the_planned_row() {
        let bytes = jpeg(200, 120);
        let (d, extra) = decode(&bytes, |w, h| {
            assert_eq!((w, h), (200, 120));
            (
                JpegPlan {
                    eighths: 4,
                    rows: 61,
                },
                "seen",
            )
        });
        let Outcome::Decoded(d) = d else {
            panic!("a valid JPEG decodes")
        };
        assert_eq!(extra, Some("seen"));
        assert_eq!(d.scale, 0.5);
        // ceil(61 / 2) rows of the 100-pixel-wide half-scale image.
        assert_eq!(d.image.dimensions(), (100, 31));
        // Half scale averages 2×2: the red ramp (x) reads about 2·x + 0.5.
        let r = f64::from(d.image.get_pixel(40, 10)[0]);
        assert!((r - 80.5).abs() < 4.0, "red at x=40 is {r}");
        let g = f64::from(d.image.get_pixel(40, 10)[1]);
        assert!((g - 20.5).abs() < 4.0, "green at y=10 is {g}");
    }

    #[test]
    fn full_scale_matches_the_image_crate_decoder() {
        let bytes = jpeg(64, 48);
        let (d, _) = decode(&bytes, |_, h| {
            (
                JpegPlan {
                    eighths: 8,
                    rows: h,
                },
                (),
            )
        });
        let Outcome::Decoded(d) = d else {
            panic!("a valid JPEG decodes")
        };
        let ours = d.image;
        let theirs = image::load_from_memory(&bytes)
            .expect("decodes")
            .into_rgb8();
        assert_eq!(ours.dimensions(), theirs.dimensions());
        // Two IDCT/upsampling implementations: equal to a few levels.
        let worst = ours
            .as_raw()
            .iter()
            .zip(theirs.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(worst <= Some(3), "largest difference {worst:?}");
    }

    #[test]
    fn truncation_and_garbage_are_told_apart_without_panicking() {
        // Textured, so that half the file lies well past the headers.
        let img = RgbImage::from_fn(128, 96, |x, y| {
            let v = ((x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663)) % 256) as u8;
            Rgb([v, v.wrapping_mul(3), v.wrapping_add(x as u8)])
        });
        let mut bytes = Cursor::new(Vec::new());
        JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode_image(&img)
            .expect("encode test image");
        let mut bytes = bytes.into_inner();
        bytes.truncate(bytes.len() / 2);
        let (d, extra) = decode(&bytes, |_, h| {
            (
                JpegPlan {
                    eighths: 8,
                    rows: h,
                },
                (),
            )
        });
        assert!(matches!(d, Outcome::Truncated) && extra.is_some());
        let (d, extra) = decode::<()>(b"\xFF\xD8\xFFnot a jpeg", |_, _| unreachable!());
        assert!(matches!(d, Outcome::Refused) && extra.is_none());
        assert!(has_end_marker(b"..\xFF\xD9\0\0\n") && !has_end_marker(b"..\xFF\xD9x"));
    }
}
