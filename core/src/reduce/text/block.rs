//! Block keep: one random run of consecutive tokens.

use super::{TextMask, budget};
use crate::data::tokenizer::Tokenizer;
use crate::rng::Rng;

/// Block masking (OpenCLIP `simple_mask_tokenize`; CLIPA JAX
/// `mask_type='block'`): one contiguous window of `keep` content ids whose
/// start is uniform in `0..=n-keep` (Python's inclusive `randint`).
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockKeep;

impl TextMask for BlockKeep {
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
        let start = rng.below(ids.len() - keep + 1);
        tokenizer.wrap(&ids[start..start + keep], context)
    }
}

#[cfg(test)]
mod block_tests {
    use super::super::test_support::*;
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn keeps_one_window_with_a_uniform_start() {
        let t = clip();
        let ids = t.encode(LONG);
        let mut starts = vec![0usize; ids.len() - 6 + 1];
        for d in 0..4_000 {
            let row = BlockKeep.reduce(&t, LONG, 8, &mut Rng::keyed(&[d, 2]));
            assert_eq!(row.len(), 8);
            assert_eq!((row[0], row[7]), (SOT, EOT));
            let kept = content(&row);
            let pos = positions(&kept, &ids);
            assert_eq!(pos.len(), 6);
            assert_eq!(pos[5] - pos[0], 5, "contiguous: {pos:?}");
            starts[pos[0]] += 1;
        }
        // 16 starts, 250 expected each, sd ≈ 15.
        for &s in &starts {
            assert!((s as i64 - 250).abs() < 80, "{starts:?}");
        }
        // 15 degrees of freedom: P(chi² > 40) < 5e-4.
        assert!(chi_square(&starts) < 40.0, "{starts:?}");
        assert!(
            starts[0] > 0 && starts[15] > 0,
            "both ends reachable: {starts:?}"
        );
    }

    #[test]
    fn same_key_same_window() {
        let t = clip();
        let a = BlockKeep.reduce(&t, LONG, 6, &mut Rng::keyed(&[1, 2, 3]));
        assert_eq!(
            a,
            BlockKeep.reduce(&t, LONG, 6, &mut Rng::keyed(&[1, 2, 3]))
        );
        assert_eq!(content(&a).len(), 4);
    }
}
