//! A small counter-based random number generator.
//!
//! Every random draw in clipa (masks, augmentation, shuffling, synthetic
//! data) comes from a [`Rng`] keyed by integers such as `(seed, step,
//! sample)`. The stream is a pure function of that key, so a resumed run
//! draws exactly what the uninterrupted run drew, independent of thread
//! scheduling, and the numbers are the same on every platform.

/// SplitMix64: 64 bits of state, passes BigCrush, and any key is a valid
/// starting point, which is what keyed streams need.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

/// One SplitMix64 output step on `z`.
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator seeded with one number.
    pub fn new(seed: u64) -> Self {
        Self {
            state: mix(seed ^ 0x6A09_E667_F3BC_C908),
        }
    }

    /// A generator whose stream is a pure function of `keys`, e.g.
    /// `Rng::keyed(&[seed, step, sample, PURPOSE])`. Different keys give
    /// independent-looking streams.
    pub fn keyed(keys: &[u64]) -> Self {
        let mut state = 0x243F_6A88_85A3_08D3u64;
        for &k in keys {
            state = mix(state ^ mix(k.wrapping_add(0x9E37_79B9_7F4A_7C15)));
        }
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// A uniform integer in `0..n` (`n > 0`), without modulo bias
    /// (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        let n = n as u64;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as usize;
            }
        }
    }

    /// A uniform float in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform float in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// `true` with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// `k` distinct indices from `0..n`, sorted ascending (partial
    /// Fisher–Yates: O(n) memory, O(k) swaps).
    pub fn choose_sorted(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "cannot choose {k} of {n}");
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        let mut picked = all[..k].to_vec();
        picked.sort_unstable();
        picked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::keyed(&[1, 2, 3]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::keyed(&[1, 2, 3]).next_u64(),
            Rng::keyed(&[1, 2, 4]).next_u64()
        );
        assert_ne!(
            Rng::keyed(&[1, 2]).next_u64(),
            Rng::keyed(&[2, 1]).next_u64()
        );
    }

    #[test]
    fn below_is_uniform() {
        let mut rng = Rng::new(9);
        let mut counts = [0usize; 6];
        let n = 60_000;
        for _ in 0..n {
            counts[rng.below(6)] += 1;
        }
        // Each bin expects 10 000 with sd ≈ 91; 5 sd bounds.
        for c in counts {
            assert!((c as i64 - 10_000).abs() < 460, "{counts:?}");
        }
    }

    #[test]
    fn choose_sorted_is_distinct_sorted_and_uniform() {
        let mut rng = Rng::new(3);
        let mut hits = [0usize; 10];
        for _ in 0..20_000 {
            let k = rng.choose_sorted(10, 3);
            assert_eq!(k.len(), 3);
            assert!(k.windows(2).all(|w| w[0] < w[1]));
            for i in k {
                hits[i] += 1;
            }
        }
        // Each index expects 6 000 hits (p = 0.3), sd ≈ 65.
        for h in hits {
            assert!((h as i64 - 6_000).abs() < 330, "{hits:?}");
        }
    }

    #[test]
    fn uniform_is_in_unit_interval() {
        let mut rng = Rng::new(1);
        let mean = (0..10_000)
            .map(|_| rng.uniform())
            .inspect(|u| assert!((0.0..1.0).contains(u)))
            .sum::<f64>()
            / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
