//! Random keep: a random subset of the caption's tokens, in order.

use super::{TextMask, budget};
use crate::data::tokenizer::Tokenizer;
use crate::rng::Rng;

/// Random masking (OpenCLIP `random_mask_tokenize`): when the caption has
/// more than `keep` content ids, keep a uniformly random subset of `keep`
/// of them in their original order (the `msort()` there), then wrap.
/// CLIPA's JAX variant does not restore the order; OpenCLIP's does.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomKeep;

impl TextMask for RandomKeep {
    fn reduce(
        &self,
        tokenizer: &Tokenizer,
        caption: &str,
        context: usize,
        rng: &mut Rng,
    ) -> Vec<u32> {
        let ids = tokenizer.encode(caption);
        let keep = budget(tokenizer, context);
        if ids.len() <= keep {
            return tokenizer.wrap(&ids, context);
        }
        let kept: Vec<u32> = rng
            .choose_sorted(ids.len(), keep)
            .into_iter()
            .map(|i| ids[i])
            .collect();
        tokenizer.wrap(&kept, context)
    }
}

#[cfg(test)]
mod random_tests {
    use super::super::test_support::*;
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn keeps_a_uniform_ordered_subset_between_the_specials() {
        let t = clip();
        let ids = t.encode(LONG);
        let mut hits = vec![0usize; ids.len()];
        let draws = 4_000;
        for d in 0..draws {
            let row = RandomKeep.reduce(&t, LONG, 8, &mut Rng::keyed(&[d, 1]));
            assert_eq!(row.len(), 8);
            assert_eq!((row[0], row[7]), (SOT, EOT));
            let kept = content(&row);
            assert_eq!(kept.len(), 6);
            for p in positions(&kept, &ids) {
                hits[p] += 1;
            }
        }
        // Each of 21 positions is kept with p = 6/21: 1143 expected, sd ≈ 29.
        for &h in &hits {
            assert!((h as i64 - 1143).abs() < 150, "{hits:?}");
        }
        // 20 degrees of freedom: P(chi² > 50) < 3e-4 (the per-position hits of
        // a fixed-size subset are slightly anti-correlated, which lowers chi²).
        assert!(chi_square(&hits) < 50.0, "{hits:?}");
    }

    #[test]
    fn same_key_same_draw_and_wordpiece_keeps_its_specials() {
        let t = clip();
        let a = RandomKeep.reduce(&t, LONG, 8, &mut Rng::keyed(&[5, 6]));
        assert_eq!(a, RandomKeep.reduce(&t, LONG, 8, &mut Rng::keyed(&[5, 6])));
        let differ = (0..20)
            .filter(|&k| RandomKeep.reduce(&t, LONG, 8, &mut Rng::keyed(&[k, 7])) != a)
            .count();
        assert!(differ >= 19, "{differ}");
        let wp = wordpiece();
        let row = RandomKeep.reduce(&wp, "a b c d e f g h", 5, &mut Rng::new(3));
        assert_eq!(row.len(), 5);
        assert_eq!(row[0], 2, "[CLS] first");
        assert_eq!(row[4], 0, "the stripped [SEP] last");
        assert!(
            row[1..4].windows(2).all(|w| w[0] < w[1])
                && row[1..4].iter().all(|id| (4..12).contains(id)),
            "{row:?}"
        );
    }
}
