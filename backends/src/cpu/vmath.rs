//! Float32 math that vectorises, for the CPU kernels' element-wise loops.
//!
//! - [`vectorised`] defines a function compiled for each vector unit and
//!   runs the widest the CPU has (AVX-512 or AVX2 with FMA on x86-64; the
//!   baseline elsewhere). Release builds target baseline x86-64, SSE2, so
//!   without it every loop here runs 4 lanes wide at most.
//! - [`exp`] and [`normal_cdf`] are plain arithmetic, shifts and selects,
//!   which LLVM vectorises; libm's `expf` and `erff` are calls, one element
//!   at a time. They took 10–11 % of a bench-tiny img32 training step.
//! - [`sum`], [`dot`] and [`max`] keep 16 partial results, so that a
//!   reduction is 16 independent chains rather than one, and gives the same
//!   bits at every vector width.
//!
//! No fused multiply-add is written: a baseline build would make each one a
//! call to libm's `fmaf`, and Rust never contracts `a * b + c` on its own,
//! so the results do not depend on the vector unit either.
#![allow(unsafe_code)]

/// Defines a function whose body is compiled once for each vector unit
/// (AVX-512, AVX2 with FMA, the baseline) and picks the widest this CPU has
/// at each call.
///
/// The body becomes an `#[inline(always)]` function that each
/// `#[target_feature]` instance calls directly, so it is always inlined and
/// its loops vectorise to that width. A closure passed to such an instance
/// is not: once its own loop is inlined into it, LLVM judged it too big to
/// inline at three call sites, and it stayed one function compiled for
/// SSE2 (the first try, seen in the profile as `xmm` code).
macro_rules! vectorised {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        // The one `unsafe` is the call of an instance for the features
        // `unit` found; it is written here, not where the macro is used.
        #[allow(unsafe_code)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::cpu::vmath::unit() {
                    // SAFETY: the CPU has every feature the instance is
                    // compiled for.
                    $crate::cpu::vmath::Unit::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::vmath::Unit::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::cpu::vmath::Unit::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(super) use vectorised;

/// The widest vector unit of this CPU that [`vectorised`] compiles for.
// Only x86-64 has instances to pick between; elsewhere `vectorised` never
// asks.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unit {
    /// AVX-512 (with AVX2 and FMA): 16 float32 lanes.
    Avx512,
    /// AVX2 with FMA: 8 lanes.
    Avx2,
    /// The build's baseline: SSE2 on x86-64, NEON on aarch64.
    Baseline,
}

/// This CPU's [`Unit`] (std caches the feature detection).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline]
pub(super) fn unit() -> Unit {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx2") && has!("fma") {
            return Unit::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Unit::Avx2;
        }
    }
    Unit::Baseline
}

/// e^x, within 2 ulp of the exact value for −87.3 ≤ x ≤ 88; below, the
/// result stays at e^−87.3 ≈ 1.2e−38 (a normal float, so a softmax or
/// GELU that multiplies it by a finite number gets a negligible value, not
/// a NaN), and above at e^88. NaN stays NaN.
///
/// Cody–Waite: x = n·ln 2 + r with |r| ≤ ½ ln 2, e^r by its Taylor
/// polynomial to r⁷ (truncation 5e−9 relative), and 2ⁿ built in the
/// exponent bits.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds a float below 2²² to an integer, which then
    // sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2⁸.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Written as selects, not `clamp`, so that NaN passes through.
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let k = x * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n = k's bits minus ROUND's; 2ⁿ has the biased exponent n + 127.
    let n = k.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// Φ(x) = P(N(0, 1) ≤ x) = ½·erfc(−x/√2), to a relative error below
/// 1.5e−7·(4 + x²/2) (6e−7 for |x| ≤ 1, 1.8e−6 at x = −4, 1.3e−5 at
/// x = −13), the left tail included: its growth is the rounding of x² in
/// float32, which any float32 e^(−x²/2) shares.
///
/// erfc(a) for a ≥ 0 is `t·exp(−a² + q(t))`, t = 1/(1 + a/2), with q the
/// degree-9 Chebyshev fit of Numerical Recipes' `erfcc` (fractional error
/// below 1.2e−7 for every a; its coefficients rounded to float32). Φ of a
/// negative x is that tail itself; of a positive x, 1 minus it.
/// `½(1 + erf(x/√2))` from libm's `erff` instead cancels for x ≪ 0: at
/// x = −4.5, 1 + erf is 6.8e−6, and one float32 ulp of erf near −1 (6e−8)
/// is already 0.9 % of it.
#[inline(always)]
pub(super) fn normal_cdf(x: f32) -> f32 {
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    // a² as x²/2, one rounding (squaring the rounded a would add a's).
    let a2 = 0.5 * x * x;
    let t = 1.0 / (1.0 + 0.5 * a);
    let q = 0.170_872_77;
    let q = q * t - 0.822_152_23;
    let q = q * t + 1.488_515_9;
    let q = q * t - 1.135_204;
    let q = q * t + 0.278_868_07;
    let q = q * t - 0.186_288_06;
    let q = q * t + 0.096_784_18;
    let q = q * t + 0.374_091_96;
    let q = q * t + 1.000_023_7;
    let q = q * t - 1.265_512_2;
    let tail = 0.5 * t * exp(q - a2); // ½·erfc(|x|/√2) = Φ(−|x|)
    if x < 0.0 { tail } else { 1.0 - tail }
}

/// 1/√(2π), the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The exact GELU, x·Φ(x).
#[inline(always)]
pub(super) fn gelu(x: f32) -> f32 {
    x * normal_cdf(x)
}

/// The exact GELU and its derivative Φ(x) + x·φ(x), with
/// φ(x) = e^(−x²/2)/√(2π).
#[inline(always)]
pub(super) fn gelu_and_slope(x: f32) -> (f32, f32) {
    let cdf = normal_cdf(x);
    let pdf = exp(-0.5 * x * x) * INV_SQRT_2PI;
    (x * cdf, cdf + x * pdf)
}

/// Σ x, in 16 interleaved partial sums (a single float accumulator is one
/// serial chain of dependent adds, which does not vectorise).
#[inline(always)]
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        acc.iter_mut().zip(c).for_each(|(a, &v)| *a += v);
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a·b, vectorised as [`sum`].
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        acc.iter_mut()
            .zip(x.iter().zip(y))
            .for_each(|(a, (&x, &y))| *a += x * y);
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ (x − c)², vectorised as [`dot`]: the bits of `dot(d, d)` for the
/// rounded differences `d = x − c`, without storing them.
#[inline(always)]
pub(super) fn sum_sq_dev(x: &[f32], c: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&x| (x - c) * (x - c)).sum();
    for x in chunks {
        acc.iter_mut()
            .zip(x)
            .for_each(|(a, &x)| *a += (x - c) * (x - c));
    }
    acc.iter().sum::<f32>() + tail
}

/// `(Σ g, Σ g·h)` for the rounded products `g = a·b`, vectorised as
/// [`sum`] and [`dot`]: the bits of `(sum(g), dot(g, h))`, in one pass and
/// without storing g.
#[inline(always)]
pub(super) fn product_sum_and_dot(a: &[f32], b: &[f32], h: &[f32]) -> (f32, f32) {
    let (mut sums, mut dots) = ([0f32; 16], [0f32; 16]);
    let (ca, cb, ch) = (a.chunks_exact(16), b.chunks_exact(16), h.chunks_exact(16));
    let tail = || {
        ca.remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(&a, &b)| a * b)
    };
    let sum_tail: f32 = tail().sum();
    let dot_tail: f32 = tail().zip(ch.remainder()).map(|(g, &h)| g * h).sum();
    for ((a, b), h) in ca.zip(cb).zip(ch) {
        let lanes = |s: &[f32]| -> [f32; 16] { s.try_into().expect("chunks of 16") };
        let (a, b, h) = (lanes(a), lanes(b), lanes(h));
        for i in 0..16 {
            let g = a[i] * b[i];
            sums[i] += g;
            dots[i] += g * h[i];
        }
    }
    (
        sums.iter().sum::<f32>() + sum_tail,
        dots.iter().sum::<f32>() + dot_tail,
    )
}

/// The largest element (−∞ for none), NaN if any element is NaN, in 16
/// partial maxima as [`sum`].
#[inline(always)]
pub(super) fn max(x: &[f32]) -> f32 {
    // `a < v || v != v` keeps a NaN once seen, as a select that vectorises
    // (`f32::max` ignores NaN).
    let pick = |a: f32, v: f32| if a < v || v.is_nan() { v } else { a };
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| pick(a, v));
    for c in chunks {
        acc.iter_mut().zip(c).for_each(|(a, &v)| *a = pick(*a, v));
    }
    acc.iter().fold(tail, |a, &v| pick(a, v))
}

/// The element-wise sum of `partials` (each `len` long), added in their
/// order: the rayon tasks' partial sums of a parameter gradient, whose
/// result must not depend on which thread finished first.
pub(super) fn add_in_order(partials: &[Vec<f32>], len: usize) -> Vec<f32> {
    vectorised! {
        fn add(total: &mut [f32], partials: &[Vec<f32>]) {
            for p in partials {
                total.iter_mut().zip(p).for_each(|(t, p)| *t += p);
            }
        }
    }
    let mut total = vec![0f32; len];
    add(&mut total, partials);
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evenly spaced points of [lo, hi].
    fn grid(lo: f64, hi: f64, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| (lo + (hi - lo) * i as f64 / n as f64) as f32)
    }

    vectorised! {
        /// e^x of each element, at the widest unit.
        fn exp_all(xs: &[f32]) -> Vec<f32> {
            xs.iter().map(|&x| exp(x)).collect()
        }
    }

    /// The one-pass sums give the bits of the stored-intermediate ones
    /// (LayerNorm's results do not move when its scratch rows go), at
    /// lengths below, at and past a multiple of the 16 lanes.
    #[test]
    fn one_pass_sums_equal_the_stored_ones() {
        let seq = |n: usize, k: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * k).sin() * 3.0) + 0.25)
                .collect()
        };
        for n in [5, 16, 37, 256, 300] {
            let (x, b, h) = (seq(n, 0.37), seq(n, 1.13), seq(n, 0.71));
            let mean = sum(&x) / n as f32;
            let d: Vec<f32> = x.iter().map(|&x| x - mean).collect();
            assert_eq!(
                sum_sq_dev(&x, mean).to_bits(),
                dot(&d, &d).to_bits(),
                "n {n}"
            );
            let g: Vec<f32> = x.iter().zip(&b).map(|(&a, &b)| a * b).collect();
            let (s, t) = product_sum_and_dot(&x, &b, &h);
            assert_eq!(s.to_bits(), sum(&g).to_bits(), "n {n}");
            assert_eq!(t.to_bits(), dot(&g, &h).to_bits(), "n {n}");
            assert!(t.abs() > 0.1, "a sum that is not trivially zero");
        }
    }

    /// Within 2 ulp of the double-precision e^x from −87.3 to 88, and the
    /// stated values outside and at NaN, at the widest vector unit and at
    /// the baseline.
    #[test]
    fn exp_is_within_two_ulp() {
        let xs: Vec<f32> = grid(-87.3, 88.0, 400_000).collect();
        for wide in [true, false] {
            let got = if wide {
                exp_all(&xs)
            } else {
                xs.iter().map(|&x| exp(x)).collect()
            };
            let mut worst = 0f64;
            for (&x, &y) in xs.iter().zip(&got) {
                let want = (x as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                worst = worst.max((y as f64 - want).abs() / ulp as f64);
            }
            assert!(worst <= 2.0, "wide {wide}: {worst} ulp");
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1.3e-38);
        assert!(exp(f32::NEG_INFINITY) < 1.3e-38);
        assert!(exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    /// Φ and GELU to 1.5e−7·(4 + x²/2) relative error against double
    /// precision over the range where Φ is a normal float32 (x ≥ −13),
    /// tails included, and GELU's slope to 3e−7 absolute (it crosses zero
    /// near x = −0.75, where relative error means nothing).
    #[test]
    fn normal_cdf_and_gelu_slope_match_double_precision() {
        let xs: Vec<f32> = grid(-13.0, 13.0, 520_000).collect();
        vectorised! {
            fn all(xs: &[f32]) -> Vec<(f32, f32, f32)> {
                xs.iter()
                    .map(|&x| {
                        let (y, s) = gelu_and_slope(x);
                        (normal_cdf(x), y, s)
                    })
                    .collect()
            }
        }
        let got = all(&xs);
        let (mut cdf_err, mut slope_err, mut gelu_err) = (0f64, 0f64, 0f64);
        for (&x, &(c, y, s)) in xs.iter().zip(&got) {
            let x = x as f64;
            let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            // The relative error over its bound's shape.
            let scale = 4.0 + x * x / 2.0;
            cdf_err = cdf_err.max((c as f64 - cdf).abs() / cdf / scale);
            slope_err = slope_err.max((s as f64 - (cdf + x * pdf)).abs());
            let g = x * cdf;
            gelu_err = gelu_err.max((y as f64 - g).abs() / g.abs().max(1e-30) / scale);
            assert_eq!(gelu(x as f32), y, "the value alone is the same value");
        }
        assert!(cdf_err < 1.5e-7, "Φ: {cdf_err:.2e}·(4 + x²/2) relative");
        assert!(
            gelu_err < 1.5e-7,
            "GELU: {gelu_err:.2e}·(4 + x²/2) relative"
        );
        assert!(slope_err < 3e-7, "slope: {slope_err:.2e} absolute");
        assert!(gelu(f32::NAN).is_nan() && gelu_and_slope(f32::NAN).1.is_nan());
        assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
        assert!(gelu(-30.0) <= 0.0 && gelu(-30.0) > -1e-37);
    }

    /// The reductions against plain loops, on lengths around the 16 lanes.
    #[test]
    fn reductions_match_plain_loops() {
        for n in [0usize, 1, 15, 16, 17, 100, 1027] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32) / 3.0).collect();
            let close = |x: f32, y: f64| (x as f64 - y).abs() <= 1e-5 * y.abs().max(1.0);
            let s: f64 = a.iter().map(|&v| v as f64).sum();
            assert!(close(sum(&a), s), "{n}: sum");
            let d: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!(close(dot(&a, &b), d), "{n}: dot");
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a), m, "{n}: max");
        }
        let mut a = vec![1.0f32; 40];
        a[33] = f32::NAN;
        assert!(max(&a).is_nan(), "a NaN in the tail lanes");
        a[33] = 1.0;
        a[38] = f32::NAN;
        assert!(max(&a).is_nan(), "a NaN in the remainder");
    }
}
