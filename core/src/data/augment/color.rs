//! SimCLR colour augmentation on 8-bit RGB, as torchvision runs it on PIL
//! images: `ColorJitter` (`transforms.py`, `_functional_pil.py` over
//! `PIL.ImageEnhance`) and `RandomGrayscale`, with Pillow's own integer
//! luma and 8-bit HSV (`libImaging/Convert.c`, `Blend.c`).

use crate::rng::Rng;

/// torchvision `ColorJitter` factors: brightness, contrast and saturation
/// are drawn from `1 ± x`, hue from `±hue`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColorJitter {
    /// Brightness range half-width.
    pub brightness: f32,
    /// Contrast range half-width.
    pub contrast: f32,
    /// Saturation range half-width.
    pub saturation: f32,
    /// Hue shift bound, a fraction of the hue circle (≤ 0.5).
    pub hue: f32,
}

impl ColorJitter {
    /// SimCLR's jitter of strength `s`: `(0.8s, 0.8s, 0.8s, 0.2s)`.
    pub fn simclr(s: f32) -> Self {
        Self {
            brightness: 0.8 * s,
            contrast: 0.8 * s,
            saturation: 0.8 * s,
            hue: 0.2 * s,
        }
    }

    /// `ColorJitter.forward`: a random order of the four ops (drawn first,
    /// like `torch.randperm(4)`), then the four factors, then the ops.
    pub fn apply(&self, px: &mut [u8], rng: &mut Rng) {
        let mut order = [0usize, 1, 2, 3];
        rng.shuffle(&mut order);
        // A zero range is `None` in torchvision: no draw and no op.
        let mut factor = |x: f32| {
            (x > 0.0).then(|| rng.range(f64::from(1.0 - x).max(0.0), f64::from(1.0 + x)) as f32)
        };
        let (b, c, s) = (
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
        );
        let h = (self.hue > 0.0).then(|| rng.range(-f64::from(self.hue), f64::from(self.hue)));
        for op in order {
            match (op, b, c, s, h) {
                (0, Some(b), ..) => px.iter_mut().for_each(|v| *v = blend(0.0, *v, b)),
                (1, _, Some(c), ..) => {
                    // PIL ImageEnhance.Contrast: the rounded mean luma.
                    let n = (px.len() / 3).max(1) as f64;
                    let sum: f64 = px.chunks_exact(3).map(|p| f64::from(luma(p))).sum();
                    let mean = (sum / n + 0.5).floor() as f32;
                    px.iter_mut().for_each(|v| *v = blend(mean, *v, c));
                }
                (2, _, _, Some(s), _) => px.chunks_exact_mut(3).for_each(|p| {
                    let l = f32::from(luma(p));
                    p.iter_mut().for_each(|v| *v = blend(l, *v, s));
                }),
                (3, .., Some(h)) => shift_hue(px, h),
                _ => {}
            }
        }
    }
}

/// PIL `Image.blend(degenerate, img, alpha)` on one 8-bit value: computed
/// in float, clipped, truncated.
fn blend(degenerate: f32, v: u8, alpha: f32) -> u8 {
    (degenerate + alpha * (f32::from(v) - degenerate)).clamp(0.0, 255.0) as u8
}

/// PIL's `convert("L")`: ITU-R 601-2 luma in 16-bit fixed point.
fn luma(p: &[u8]) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16)
        as u8
}

/// `RandomGrayscale` with 3 output channels: R = G = B = luma.
pub fn to_grayscale(px: &mut [u8]) {
    px.chunks_exact_mut(3).for_each(|p| p.fill(luma(p)));
}

/// torchvision `adjust_hue` on PIL: to PIL's 8-bit HSV, add the shift to H
/// with wrap-around, and back (`libImaging/Convert.c` rgb2hsv / hsv2rgb).
/// The shift is truncated in double precision, as numpy's cast is.
fn shift_hue(px: &mut [u8], hue: f64) {
    let delta = (hue * 255.0) as i32 as u8;
    for p in px.chunks_exact_mut(3) {
        let [h, s, v] = rgb_to_hsv(p[0], p[1], p[2]);
        p.copy_from_slice(&hsv_to_rgb(h.wrapping_add(delta), s, v));
    }
}

fn rgb_to_hsv(r: u8, g: u8, b: u8) -> [u8; 3] {
    let (maxc, minc) = (r.max(g).max(b), r.min(g).min(b));
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = f32::from(maxc - minc);
    let s = cr / f32::from(maxc);
    let (rc, gc, bc) = (
        f32::from(maxc - r) / cr,
        f32::from(maxc - g) / cr,
        f32::from(maxc - b) / cr,
    );
    let h = if r == maxc {
        bc - gc
    } else if g == maxc {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    let h = (h / 6.0 + 1.0) % 1.0;
    [
        (h * 255.0).clamp(0.0, 255.0) as u8,
        (s * 255.0).clamp(0.0, 255.0) as u8,
        maxc,
    ]
}

fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v; 3];
    }
    let hf = f32::from(h) * 6.0 / 255.0;
    let i = hf.floor();
    let (f, fs, vf) = (hf - i, f32::from(s) / 255.0, f32::from(v));
    let p = (vf * (1.0 - fs)).round().clamp(0.0, 255.0) as u8;
    let q = (vf * (1.0 - fs * f)).round().clamp(0.0, 255.0) as u8;
    let t = (vf * (1.0 - fs * (1.0 - f))).round().clamp(0.0, 255.0) as u8;
    match i as u32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::augment::tests::noise;
    use crate::data::augment::{ImageTransform, TrainAugment};

    #[test]
    fn grayscale_sets_equal_channels_to_pil_luma() {
        let mut px = vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 200, 30];
        to_grayscale(&mut px);
        assert_eq!(px, [76, 76, 76, 150, 150, 150, 29, 29, 29, 124, 124, 124]);
        let aug = TrainAugment {
            grayscale_p: 1.0,
            ..TrainAugment::default()
        };
        let out = ImageTransform::Train(aug)
            .apply(&noise(30, 30, 6), 12, &mut Rng::new(7))
            .expect("transform");
        assert!(out.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    }

    #[test]
    fn colour_ops_follow_pil() {
        // Brightness alone scales every value by one factor in 1 ± 0.5.
        let jitter = ColorJitter {
            brightness: 0.5,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
        };
        let mut px = vec![100u8; 30];
        jitter.apply(&mut px, &mut Rng::new(8));
        assert!(
            px.iter().all(|&v| v == px[0]) && (50..=150).contains(&px[0]) && px[0] != 100,
            "{px:?}"
        );
        // Saturation 0 gives the luma; factors above 1 clip.
        assert_eq!(blend(f32::from(luma(&[255, 0, 0])), 255, 0.0), 76);
        assert_eq!(blend(0.0, 200, 1.5), 255);
        // PIL HSV round trip is exact on primaries. Hue 0.33 shifts H by
        // int(84.15) = 84: Pillow's `merge('HSV', (h + 84, s, v))
        // .convert('RGB')` of pure red is (6, 255, 0).
        assert_eq!(rgb_to_hsv(255, 0, 0), [0, 255, 255]);
        assert_eq!(hsv_to_rgb(0, 255, 255), [255, 0, 0]);
        let mut red = vec![255u8, 0, 0];
        shift_hue(&mut red, 0.33);
        assert_eq!(red, [6, 255, 0]);
    }
}
