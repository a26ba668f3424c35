//! Syntax keep: nouns first, then adjectives, then the rest.

use super::{TextMask, budget};
use crate::data::tokenizer::Tokenizer;
use crate::reduce::syntax::{Lexicon, split_words};
use crate::rng::Rng;

/// Syntax masking (CLIPA §3.2, the text reduction CLIPA trains with;
/// OpenCLIP `syntax_mask_tokenize`): split the caption into words, rank
/// them noun < adjective < verb < other by the [`Lexicon`], keep the first
/// `keep` words in caption order, join them with spaces, encode and wrap
/// (which truncates, EOT last, when a kept word became several tokens).
///
/// Ties keep caption order (a stable sort), so the draw is deterministic
/// and needs no rng; OpenCLIP's `np.argsort` is a quicksort that leaves ties
/// in no guaranteed order. As in CLIPA's JAX `noun_tokenize`, a caption of
/// at most `keep` words is passed through unchanged.
#[derive(Debug, Clone, Copy)]
pub struct SyntaxKeep<'a> {
    /// Word classes.
    pub lexicon: &'a Lexicon,
}

impl SyntaxKeep<'_> {
    /// Indices of the `keep` highest-priority words, ascending.
    pub fn keep_indices(&self, words: &[&str], keep: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..words.len()).collect();
        order.sort_by_key(|&i| self.lexicon.get(words[i])); // stable: ties by position
        order.truncate(keep);
        order.sort_unstable();
        order
    }
}

impl TextMask for SyntaxKeep<'_> {
    fn reduce(
        &self,
        tokenizer: &Tokenizer,
        caption: &str,
        context: usize,
        _rng: &mut Rng,
    ) -> Vec<u32> {
        let words = split_words(caption);
        let keep = budget(tokenizer, context);
        if words.len() <= keep {
            return tokenizer.tokenize(caption, context);
        }
        let kept: Vec<&str> = self
            .keep_indices(&words, keep)
            .into_iter()
            .map(|i| words[i])
            .collect();
        tokenizer.tokenize(&kept.join(" "), context)
    }
}

#[cfg(test)]
mod syntax_tests {
    use super::super::test_support::*;
    use super::*;
    use crate::reduce::syntax::PartOfSpeech;
    use crate::rng::Rng;

    #[test]
    fn example_caption_keeps_nouns_first() {
        let t = clip();
        let lexicon = Lexicon::shipped();
        let syntax = SyntaxKeep { lexicon: &lexicon };
        // Three words fit in 5 ids: dog and field (nouns), then "small", the
        // first adjective; caption order is restored.
        let row = syntax.reduce(&t, DOG, 5, &mut Rng::new(0));
        assert_eq!(row, t.tokenize("small dog field", 5));
        assert_eq!(row, [SOT, 2442, 1929, 1570, EOT]);
        // Five words: + brown, green (adjectives) before runs (verb).
        let row = syntax.reduce(&t, DOG, 7, &mut Rng::new(0));
        assert_eq!(row, t.tokenize("small brown dog green field", 7));
        // No rng is drawn: any stream gives the same row.
        assert_eq!(row, syntax.reduce(&t, DOG, 7, &mut Rng::new(99)));
    }

    #[test]
    fn no_word_is_dropped_while_a_lower_class_is_kept() {
        let lexicon = Lexicon::shipped();
        let syntax = SyntaxKeep { lexicon: &lexicon };
        let pool = [
            "dog", "field", "small", "green", "runs", "sits", "the", "on", "cat", "red", "quickly",
        ];
        let mut rng = Rng::new(11);
        for _ in 0..300 {
            let n = 1 + rng.below(12);
            let words: Vec<&str> = (0..n).map(|_| pool[rng.below(pool.len())]).collect();
            let keep = rng.below(n + 1);
            let kept = syntax.keep_indices(&words, keep);
            assert_eq!(kept.len(), keep);
            assert!(kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");
            let class = |i: usize| lexicon.get(words[i]);
            let worst_kept = kept
                .iter()
                .map(|&i| class(i))
                .max()
                .unwrap_or(PartOfSpeech::Noun);
            for i in (0..n).filter(|i| !kept.contains(i)) {
                assert!(
                    class(i) >= worst_kept,
                    "{words:?} kept {kept:?}: dropped {} before a {worst_kept}",
                    words[i]
                );
                // Ties keep the earlier word.
                if class(i) == worst_kept {
                    assert!(
                        kept.iter()
                            .filter(|&&k| class(k) == worst_kept)
                            .all(|&k| k < i),
                        "{words:?} {kept:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn words_of_several_tokens_are_truncated_with_eot_last() {
        let t = clip();
        let lexicon = Lexicon::shipped();
        let caption = "a rhinoceros on the xylophone near the chrysanthemums today";
        // Nouns rhinoceros, xylophone, chrysanthemums are kept: 3 + 3 + 4 BPE
        // tokens, so wrap truncates after rhinoceros and two pieces of xylophone.
        let row = SyntaxKeep { lexicon: &lexicon }.reduce(&t, caption, 5, &mut Rng::new(0));
        assert_eq!(row, t.tokenize("rhinoceros xylophone chrysanthemums", 5));
        assert_eq!(row, [SOT, 41744, 1364, 1299, EOT]);
        // Four words (today is a noun too): 11 tokens for 4 content slots.
        let row = SyntaxKeep { lexicon: &lexicon }.reduce(&t, caption, 6, &mut Rng::new(0));
        assert_eq!(
            row,
            t.tokenize("rhinoceros xylophone chrysanthemums today", 6)
        );
        assert_eq!(row, [SOT, 41744, 1364, 1299, 20023, EOT]);
    }
}
