//! Truncation: the first tokens of the caption.

use super::TextMask;
use crate::data::tokenizer::Tokenizer;
use crate::rng::Rng;

/// Truncation (OpenCLIP `tokenize`; CLIPA JAX `bert_tokenize`): the first
/// tokens of the caption, EOT in the last slot for CLIP BPE.
#[derive(Debug, Clone, Copy, Default)]
pub struct Truncate;

impl TextMask for Truncate {
    fn reduce(
        &self,
        tokenizer: &Tokenizer,
        caption: &str,
        context: usize,
        _rng: &mut Rng,
    ) -> Vec<u32> {
        tokenizer.tokenize(caption, context)
    }
}

#[cfg(test)]
mod truncate_tests {
    use super::super::test_support::*;
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn keeps_the_first_tokens_and_ends_with_eot() {
        let t = clip();
        let ids = t.encode(LONG);
        assert_eq!(ids.len(), 21);
        let row = Truncate.reduce(&t, LONG, 8, &mut Rng::new(0));
        assert_eq!(row.len(), 8);
        assert_eq!(row[..7], [&[SOT][..], &ids[..6]].concat()[..]);
        assert_eq!(row[7], EOT);
        // `open_clip.tokenize("a photo of a cat.", 10)`.
        let short = Truncate.reduce(&t, "a photo of a cat.", 10, &mut Rng::new(0));
        assert_eq!(short, [SOT, 320, 1125, 539, 320, 2368, 269, EOT, 0, 0]);
    }
}
