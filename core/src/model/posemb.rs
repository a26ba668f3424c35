//! Position embeddings: 2-D sin-cos tables and the resizes used when the
//! image resolution or text length changes between training stages. All
//! host-side in f64, written to match the PyTorch reference bit-for-bit in
//! f32 where possible:
//! - sin-cos: OpenCLIP `pos_embed.py::get_2d_sincos_pos_embed` (MAE layout);
//! - images: OpenCLIP `resize_pos_embed`, bicubic (A = −0.75),
//!   `align_corners=False`, without antialias. OpenCLIP passes
//!   `antialias=True`, which PyTorch applies only when shrinking: growing the
//!   grid (fine-tuning at a higher resolution) is identical, shrinking a
//!   learned table differs slightly;
//! - text: OpenCLIP `resize_text_pos_embed`, linear, `align_corners=False`.

/// The 2-D sin-cos table `[1 + gh·gw, width]` with a zero CLS row.
///
/// Row `1 + h·gw + w` holds, for `d = width/4` frequencies
/// `ω_i = 10000^(−i/d)`: `[sin(w·ω), cos(w·ω), sin(h·ω), cos(h·ω)]`. (MAE's
/// code names the first half "h", but `np.meshgrid(grid_w, grid_h)` feeds it
/// the column index.)
pub fn sincos_2d(width: usize, gh: usize, gw: usize) -> Vec<f32> {
    assert!(
        width.is_multiple_of(4),
        "sin-cos width must be a multiple of 4"
    );
    let quarter = width / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut out = vec![0f32; (1 + gh * gw) * width];
    for h in 0..gh {
        for w in 0..gw {
            let row = &mut out[(1 + h * gw + w) * width..][..width];
            for (i, &om) in omega.iter().enumerate() {
                let (a, b) = (w as f64 * om, h as f64 * om);
                row[i] = a.sin() as f32;
                row[quarter + i] = a.cos() as f32;
                row[2 * quarter + i] = b.sin() as f32;
                row[3 * quarter + i] = b.cos() as f32;
            }
        }
    }
    out
}

/// PyTorch's cubic convolution weights for offset `t ∈ [0, 1)`, A = −0.75.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Bicubic resize of a `[h, w, c]` grid to `[oh, ow, c]`
/// (`F.interpolate(mode="bicubic", align_corners=False)`).
pub fn resize_bicubic(src: &[f32], h: usize, w: usize, c: usize, oh: usize, ow: usize) -> Vec<f32> {
    assert_eq!(src.len(), h * w * c);
    let taps = |out: usize, inp: usize| -> Vec<([usize; 4], [f64; 4])> {
        let scale = inp as f64 / out as f64;
        (0..out)
            .map(|o| {
                let s = (o as f64 + 0.5) * scale - 0.5;
                let f = s.floor();
                let idx =
                    [-1i64, 0, 1, 2].map(|k| (f as i64 + k).clamp(0, inp as i64 - 1) as usize);
                (idx, cubic_weights(s - f))
            })
            .collect()
    };
    let (ty, tx) = (taps(oh, h), taps(ow, w));
    let mut out = vec![0f32; oh * ow * c];
    for (oy, (iy, wy)) in ty.iter().enumerate() {
        for (ox, (ix, wx)) in tx.iter().enumerate() {
            for ch in 0..c {
                let acc: f64 = iy
                    .iter()
                    .zip(wy)
                    .map(|(&y, &wy)| {
                        let row: f64 = ix
                            .iter()
                            .zip(wx)
                            .map(|(&x, &wx)| wx * src[(y * w + x) * c + ch] as f64)
                            .sum();
                        wy * row
                    })
                    .sum();
                out[(oy * ow + ox) * c + ch] = acc as f32;
            }
        }
    }
    out
}

/// Linear resize of a `[len, c]` sequence to `[out, c]`
/// (`F.interpolate(mode="linear", align_corners=False)`).
pub fn resize_linear(src: &[f32], len: usize, c: usize, out: usize) -> Vec<f32> {
    assert_eq!(src.len(), len * c);
    let scale = len as f64 / out as f64;
    let mut res = vec![0f32; out * c];
    for o in 0..out {
        let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(len - 1);
        let i1 = (i0 + 1).min(len - 1);
        let l = s - i0 as f64;
        for ch in 0..c {
            let v = (1.0 - l) * src[i0 * c + ch] as f64 + l * src[i1 * c + ch] as f64;
            res[o * c + ch] = v as f32;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_layout() {
        let t = sincos_2d(8, 2, 3);
        assert_eq!(t.len(), 7 * 8);
        assert!(t[..8].iter().all(|&x| x == 0.0), "CLS row is zero");
        // token (h=1, w=2): first quarter sin(2·ω), third quarter sin(1·ω); ω_0 = 1.
        let row = &t[(1 + 3 + 2) * 8..][..8];
        assert!((row[0] - 2f32.sin()).abs() < 1e-7);
        assert!((row[2] - 2f32.cos()).abs() < 1e-7);
        assert!((row[4] - 1f32.sin()).abs() < 1e-7);
        assert!((row[6] - 1f32.cos()).abs() < 1e-7);
        // ω_1 = 10000^(−1/2) = 0.01
        assert!((row[1] - 0.02f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn resizes_are_identity_at_same_size() {
        let src: Vec<f32> = (0..3 * 4 * 2).map(|i| i as f32 * 0.37 - 2.0).collect();
        let same = resize_bicubic(&src, 3, 4, 2, 3, 4);
        for (a, b) in same.iter().zip(&src) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(resize_linear(&src, 12, 2, 12), src);
    }

    #[test]
    fn linear_resize_matches_torch() {
        // torch.nn.functional.interpolate(torch.tensor([[[0., 1., 2., 3.]]]),
        //     size=8, mode="linear", align_corners=False)
        let got = resize_linear(&[0.0, 1.0, 2.0, 3.0], 4, 1, 8);
        let want = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn bicubic_resize_matches_torch() {
        // PyTorch's `upsample_bicubic2d` kernel (cubic_convolution1/2, A = −0.75,
        // source index scale·(dst + 0.5) − 0.5, border taps clamped), evaluated
        // in Python for torch.arange(4.).reshape(1, 1, 2, 2) → size (3, 3):
        let got = resize_bicubic(&[0.0, 1.0, 2.0, 3.0], 2, 2, 1, 3, 3);
        let want = [
            -0.2604, 0.3264, 0.9132, 0.9132, 1.5, 2.0868, 2.0868, 2.6736, 3.2604,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-3, "{got:?}");
        }
    }
}
