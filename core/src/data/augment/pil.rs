//! PIL's `Image.resize` for 8-bit RGB, bit for bit (Pillow
//! `src/libImaging/Resample.c`: `precompute_coeffs`,
//! `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc`,
//! `ImagingResampleVertical_8bpc`). OpenCLIP's evaluation transforms run on
//! PIL images (`Resize` + `CenterCrop`, or CLIPA's square `Resize`), so the
//! evaluation path reproduces PIL's pixels exactly: the same double-precision
//! filter taps, rounded to 22-bit fixed point, and the same two passes,
//! horizontal first into an 8-bit intermediate, then vertical.
//!
//! Training crops keep `fast_image_resize`, which is faster and whose
//! one-level rounding differences vanish in a random crop.

/// Fixed-point bits of the filter taps: `32 - 8 - 2` in Pillow, so that a
/// sum of taps times 8-bit pixels fits an `i32`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's resampling filters that clipa's evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PilFilter {
    /// `Image.BILINEAR`: the triangle, support 1.
    Bilinear,
    /// `Image.BICUBIC`: Keys' cubic with a = −0.5, support 2.
    Bicubic,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => (1.0 - x).max(0.0),
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The taps of one output pixel: the first input index and the
/// fixed-point weights from there on.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the output indices
/// `outs` of a resize from `in_size` to `out_size` pixels.
fn taps(
    in_size: usize,
    out_size: usize,
    outs: std::ops::Range<usize>,
    filter: PilFilter,
) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    outs.map(|xx| {
        let center = (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates towards zero; the clamp makes the sign moot.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let w: Vec<f64> = (xmin..xmax)
            .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = w.iter().sum();
        let one = f64::from(1u32 << PRECISION_BITS);
        let weights = w
            .into_iter()
            .map(|k| {
                let k = if total != 0.0 { k / total } else { k };
                // Round half away from zero, as Pillow's `(int)(±0.5 + k·2²²)`.
                if k < 0.0 {
                    (-0.5 + k * one) as i32
                } else {
                    (0.5 + k * one) as i32
                }
            })
            .collect();
        Taps {
            start: xmin,
            weights,
        }
    })
    .collect()
}

/// Pillow's `clip8`: the rounded fixed-point sum back to a byte.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes the RGB image `src` (`w`×`h`, rows of `3w` bytes) to
/// `out_w`×`out_h` as `Image.resize((out_w, out_h), filter)` does, and
/// writes the `crop` window `(left, top, width, height)` of the result into
/// `out` (`[height, width, 3]`), as a later `Image.crop` would.
///
/// # Panics
/// If `src` or `out` has the wrong length or `crop` leaves the output.
pub(crate) fn resize_crop(
    src: &[u8],
    (w, h): (usize, usize),
    (out_w, out_h): (usize, usize),
    (left, top, cw, ch): (usize, usize, usize, usize),
    filter: PilFilter,
    out: &mut [u8],
) {
    assert_eq!(src.len(), w * h * 3, "source is w·h·3 bytes");
    assert_eq!(out.len(), cw * ch * 3, "output is the crop's w·h·3 bytes");
    assert!(
        left + cw <= out_w && top + ch <= out_h,
        "crop inside the resize"
    );
    let half = 1i32 << (PRECISION_BITS - 1);
    // Pillow skips a pass whose size does not change.
    let horizontal = (out_w != w).then(|| taps(w, out_w, left..left + cw, filter));
    let vertical = (out_h != h).then(|| taps(h, out_h, top..top + ch, filter));
    // Input rows the vertical pass reads.
    let (r0, r1) = match &vertical {
        Some(v) => (
            v[0].start,
            v.iter()
                .map(|t| t.start + t.weights.len())
                .max()
                .unwrap_or(0),
        ),
        None => (top, top + ch),
    };
    // Horizontal pass into an 8-bit intermediate: rows r0..r1, the crop's
    // columns. [r1 - r0, cw, 3]
    let mut mid = vec![0u8; (r1 - r0) * cw * 3];
    for (y, row) in mid.chunks_exact_mut(cw * 3).enumerate() {
        let line = &src[(r0 + y) * w * 3..(r0 + y + 1) * w * 3];
        match &horizontal {
            None => row.copy_from_slice(&line[left * 3..(left + cw) * 3]),
            Some(hz) => {
                for (t, px) in hz.iter().zip(row.chunks_exact_mut(3)) {
                    let mut acc = [half; 3];
                    for (i, &k) in t.weights.iter().enumerate() {
                        let p = &line[(t.start + i) * 3..(t.start + i) * 3 + 3];
                        for c in 0..3 {
                            acc[c] += i32::from(p[c]) * k;
                        }
                    }
                    for c in 0..3 {
                        px[c] = clip8(acc[c]);
                    }
                }
            }
        }
    }
    // Vertical pass from the intermediate.
    let row_len = cw * 3;
    for (y, dst) in out.chunks_exact_mut(row_len).enumerate() {
        match &vertical {
            None => {
                dst.copy_from_slice(&mid[(top + y - r0) * row_len..(top + y - r0 + 1) * row_len])
            }
            Some(vt) => {
                let t = &vt[y];
                for (x, d) in dst.iter_mut().enumerate() {
                    let mut acc = half;
                    for (i, &k) in t.weights.iter().enumerate() {
                        acc += i32::from(mid[(t.start - r0 + i) * row_len + x]) * k;
                    }
                    *d = clip8(acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic noise image, `w`×`h` RGB.
    fn noise(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3)
            .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect()
    }

    fn resize(src: &[u8], wh: (usize, usize), out: (usize, usize), f: PilFilter) -> Vec<u8> {
        let mut px = vec![0u8; out.0 * out.1 * 3];
        resize_crop(src, wh, out, (0, 0, out.0, out.1), f, &mut px);
        px
    }

    // Pillow 13.0.0 (`python3 -c`):
    //   im = Image.frombytes("RGB", (5, 3), bytes(range(45)))
    //   list(im.resize((3, 2), Image.BILINEAR).tobytes())
    //   list(im.resize((7, 4), Image.BICUBIC).tobytes())
    #[test]
    fn matches_pillow_on_a_small_gradient() {
        let src: Vec<u8> = (0..45).collect();
        assert_eq!(
            resize(&src, (5, 3), (3, 2), PilFilter::Bilinear),
            [
                7, 8, 9, 12, 13, 14, 17, 18, 19, 25, 26, 27, 30, 31, 32, 35, 36, 37
            ]
        );
        assert_eq!(
            resize(&src, (5, 3), (7, 4), PilFilter::Bicubic),
            [
                0, 0, 1, 0, 1, 2, 3, 4, 5, 5, 6, 7, 7, 8, 9, 10, 11, 12, 11, 12, 13, 8, 9, 10, 9,
                10, 11, 12, 13, 14, 14, 15, 16, 16, 17, 18, 19, 20, 21, 20, 21, 22, 22, 23, 24, 23,
                24, 25, 26, 27, 28, 28, 29, 30, 30, 31, 32, 33, 34, 35, 34, 35, 36, 31, 32, 33, 32,
                33, 34, 35, 36, 37, 37, 38, 39, 39, 40, 41, 42, 43, 44, 43, 44, 45
            ]
        );
    }

    #[test]
    fn a_crop_is_the_window_of_the_whole_resize() {
        let src = noise(41, 29);
        for f in [PilFilter::Bilinear, PilFilter::Bicubic] {
            let whole = resize(&src, (41, 29), (23, 17), f);
            let mut crop = vec![0u8; 9 * 5 * 3];
            resize_crop(&src, (41, 29), (23, 17), (7, 4, 9, 5), f, &mut crop);
            for y in 0..5 {
                let row = &whole[((4 + y) * 23 + 7) * 3..((4 + y) * 23 + 16) * 3];
                assert_eq!(&crop[y * 27..(y + 1) * 27], row, "{f:?} row {y}");
            }
        }
    }

    #[test]
    fn an_unchanged_size_copies() {
        let src = noise(12, 9);
        assert_eq!(resize(&src, (12, 9), (12, 9), PilFilter::Bicubic), src);
        // Only the width changes: rows are not filtered.
        let narrow = resize(&src, (12, 9), (6, 9), PilFilter::Bilinear);
        assert_eq!(narrow.len(), 6 * 9 * 3);
    }
}
