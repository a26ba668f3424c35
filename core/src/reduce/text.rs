//! Text token reduction (CLIPA §3.2, Fig. 2 "text" strategies), following
//! OpenCLIP `src/open_clip/tokenizer.py` (`tokenize`, `random_mask_tokenize`,
//! `simple_mask_tokenize`, `syntax_mask_tokenize`), which CLIPA's PyTorch
//! code calls.
//!
//! Every strategy returns exactly `context` ids built by
//! [`Tokenizer::wrap`], so the special tokens (`[SOT]…[EOT]` for CLIP BPE,
//! `[CLS]…[SEP]` for WordPiece) are always there and the content budget is
//! `keep = context - num_special()`. A caption whose content already fits is
//! never reduced: every strategy then equals truncation.
//!
//! Each strategy's tests sit right below it, hence the file's length.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::syntax::{Lexicon, split_words};
use crate::data::tokenizer::Tokenizer;
use crate::rng::Rng;
use crate::{Error, Result};

/// Stream tag of the text masks in `Rng::keyed(&[seed, step, sample, tag])`,
/// so the text and image draws of one sample are independent.
pub const TEXT_STREAM: u64 = 0x7E27;

/// One text-reduction strategy: `context` ids for one caption.
pub trait TextMask {
    /// Exactly `context` ids for `caption`; `rng` is the sample's own stream.
    fn reduce(
        &self,
        tokenizer: &Tokenizer,
        caption: &str,
        context: usize,
        rng: &mut Rng,
    ) -> Vec<u32>;
}

/// Content ids that fit next to the special tokens.
fn budget(tokenizer: &Tokenizer, context: usize) -> usize {
    context.saturating_sub(tokenizer.num_special())
}

/// Shared fixtures of the strategy tests below.
#[cfg(test)]
mod test_support {
    pub use crate::data::tokenizer::{EOT, SOT, Tokenizer, WordPieceTokenizer};

    /// Twenty words, one distinct CLIP BPE token each except "nineteen"
    /// (two), 21 content ids in all.
    pub const LONG: &str = "one two three four five six seven eight nine ten eleven twelve thirteen \
                            fourteen fifteen sixteen seventeen eighteen nineteen twenty";
    /// The caption of the syntax-masking example.
    pub const DOG: &str = "a small brown dog runs across the green field";

    pub fn clip() -> Tokenizer {
        Tokenizer::clip()
    }

    /// Content ids of a CLIP row: between SOT and EOT, pads dropped.
    pub fn content(row: &[u32]) -> Vec<u32> {
        assert_eq!(row[0], SOT, "{row:?}");
        let end = row.iter().position(|&t| t == EOT).expect("EOT present");
        assert!(
            row[end + 1..].iter().all(|&t| t == 0),
            "only pads after EOT: {row:?}"
        );
        row[1..end].to_vec()
    }

    /// Positions of `kept` in `all` (whose ids are distinct), asserting
    /// each is found and they ascend.
    pub fn positions(kept: &[u32], all: &[u32]) -> Vec<usize> {
        assert!(
            all.iter().enumerate().all(|(i, a)| !all[..i].contains(a)),
            "distinct ids: {all:?}"
        );
        let pos: Vec<usize> = kept
            .iter()
            .map(|k| {
                all.iter()
                    .position(|a| a == k)
                    .expect("kept id is from the caption")
            })
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "order kept: {pos:?}");
        pos
    }

    /// Pearson's chi-square of `counts` against equal expected counts.
    pub fn chi_square(counts: &[usize]) -> f64 {
        let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
        counts
            .iter()
            .map(|&c| (c as f64 - mean).powi(2) / mean)
            .sum()
    }

    /// A WordPiece tokenizer over `[PAD] [UNK] [CLS] [SEP] a b c d e f g h`.
    pub fn wordpiece() -> Tokenizer {
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c", "d", "e", "f", "g", "h",
        ];
        Tokenizer::WordPiece(
            WordPieceTokenizer::from_tokens(vocab.map(String::from).to_vec()).expect("valid vocab"),
        )
    }
}

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
    use super::test_support::*;
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
    use super::test_support::*;
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
    use super::test_support::*;
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
    use super::test_support::*;
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

/// The text token reduction of a training stage (closed choice). Config
/// and CLI spelling: `truncate`, `random`, `block`, `syntax`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextReduction {
    /// [`Truncate`].
    #[default]
    Truncate,
    /// [`RandomKeep`].
    Random,
    /// [`BlockKeep`].
    Block,
    /// [`SyntaxKeep`].
    Syntax,
}

impl TextReduction {
    /// Every choice, in CLI order.
    pub const ALL: [Self; 4] = [Self::Truncate, Self::Random, Self::Block, Self::Syntax];

    /// The config and CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncate => "truncate",
            Self::Random => "random",
            Self::Block => "block",
            Self::Syntax => "syntax",
        }
    }
}

impl fmt::Display for TextReduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TextReduction {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| {
                Error::Config(format!(
                    "text reduction `{s}`: expected truncate | random | block | syntax"
                ))
            })
    }
}

/// A configured text reduction: the strategy, the text context length of
/// the stage, and the lexicon syntax masking ranks words with.
#[derive(Debug, Clone)]
pub struct TextReducer {
    kind: TextReduction,
    context: usize,
    lexicon: Arc<Lexicon>,
}

impl TextReducer {
    /// A reducer to `context` ids per caption. Syntax masking uses the
    /// shipped lexicon ([`Lexicon::shipped`], decoded on first use); the
    /// other strategies never load it.
    pub fn new(kind: TextReduction, context: usize) -> Self {
        let lexicon = match kind {
            TextReduction::Syntax => Lexicon::shipped(),
            _ => Arc::new(Lexicon::default()),
        };
        Self {
            kind,
            context,
            lexicon,
        }
    }

    /// The same reducer with the user's lexicon (see [`Lexicon::from_file`]).
    pub fn with_lexicon(self, lexicon: Arc<Lexicon>) -> Self {
        Self { lexicon, ..self }
    }

    /// The strategy.
    pub fn kind(&self) -> TextReduction {
        self.kind
    }

    /// Ids per caption, special tokens and padding included.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The lexicon syntax masking uses.
    pub fn lexicon(&self) -> &Arc<Lexicon> {
        &self.lexicon
    }

    /// Exactly `context` ids for one caption. `rng` is already keyed by
    /// `(seed, step, sample)` by the caller; syntax masking and truncation
    /// draw nothing from it.
    pub fn apply(&self, tokenizer: &Tokenizer, caption: &str, rng: &mut Rng) -> Vec<u32> {
        let c = self.context;
        match self.kind {
            TextReduction::Truncate => Truncate.reduce(tokenizer, caption, c, rng),
            TextReduction::Random => RandomKeep.reduce(tokenizer, caption, c, rng),
            TextReduction::Block => BlockKeep.reduce(tokenizer, caption, c, rng),
            TextReduction::Syntax => SyntaxKeep {
                lexicon: &self.lexicon,
            }
            .reduce(tokenizer, caption, c, rng),
        }
    }

    /// A batch of captions, flattened row-major `[batch, context]`; sample
    /// `i` draws from `Rng::keyed(&[seed, step, first_index + i, TEXT_STREAM])`,
    /// so a resumed run draws the same masks.
    pub fn apply_batch(
        &self,
        tokenizer: &Tokenizer,
        captions: &[String],
        seed: u64,
        step: u64,
        first_index: u64,
    ) -> Vec<u32> {
        let mut out = Vec::with_capacity(captions.len() * self.context);
        for (i, caption) in captions.iter().enumerate() {
            let mut rng = Rng::keyed(&[seed, step, first_index + i as u64, TEXT_STREAM]);
            out.extend(self.apply(tokenizer, caption, &mut rng));
        }
        out
    }
}

#[cfg(test)]
mod reducer_tests {
    use super::test_support::*;
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn parses_and_prints_the_cli_spelling() {
        for r in TextReduction::ALL {
            assert_eq!(
                r.to_string().parse::<TextReduction>().expect("round trip"),
                r
            );
            assert_eq!(serde_json::to_string(&r).expect("json"), format!("\"{r}\""));
        }
        assert_eq!(
            serde_json::from_str::<TextReduction>("\"syntax\"").expect("json"),
            TextReduction::Syntax
        );
        let err = "nouns"
            .parse::<TextReduction>()
            .expect_err("not a choice")
            .to_string();
        assert!(err.contains("truncate | random | block | syntax"), "{err}");
        assert!(serde_json::from_str::<TextReduction>("\"Syntax\"").is_err());
    }

    #[test]
    fn short_captions_are_unchanged_by_every_strategy() {
        let t = clip();
        for caption in [DOG, "a photo of a cat.", "", "Two dogs don't run."] {
            let expect = t.tokenize(caption, 16);
            for kind in TextReduction::ALL {
                let reducer = TextReducer::new(kind, 16);
                assert_eq!(
                    reducer.apply(&t, caption, &mut Rng::new(4)),
                    expect,
                    "{kind} {caption:?}"
                );
            }
        }
        // Exactly at the budget (9 words, 9 tokens, 11 slots) nothing changes either.
        for kind in TextReduction::ALL {
            assert_eq!(
                TextReducer::new(kind, 11).apply(&t, DOG, &mut Rng::new(4)),
                t.tokenize(DOG, 11),
                "{kind}"
            );
        }
    }

    #[test]
    fn batches_are_keyed_per_sample_and_reproducible() {
        let t = clip();
        let captions: Vec<String> = vec![LONG.to_string(); 6];
        for kind in [TextReduction::Random, TextReduction::Block] {
            let reducer = TextReducer::new(kind, 8);
            let batch = reducer.apply_batch(&t, &captions, 7, 3, 100);
            assert_eq!(batch.len(), 6 * 8);
            assert!(
                batch.iter().all(|&id| id != 0),
                "long captions fill every slot"
            );
            assert_eq!(
                batch,
                reducer.apply_batch(&t, &captions, 7, 3, 100),
                "{kind}"
            );
            let rows: Vec<&[u32]> = batch.chunks(8).collect();
            let distinct = rows.iter().filter(|r| **r != rows[0]).count();
            assert!(
                distinct >= 4,
                "{kind}: samples draw different masks: {rows:?}"
            );
            // Sample 101 alone draws what it drew as the second row of the batch.
            let one = reducer.apply_batch(&t, &captions[..1], 7, 3, 101);
            assert_eq!(one, rows[1], "{kind}");
            assert_ne!(
                batch,
                reducer.apply_batch(&t, &captions, 7, 4, 100),
                "{kind}: the step changes the draw"
            );
            assert_eq!(
                one,
                reducer.apply(&t, LONG, &mut Rng::keyed(&[7, 3, 101, TEXT_STREAM]))
            );
        }
        let syntax =
            TextReducer::new(TextReduction::Syntax, 5).apply_batch(&t, &[DOG.to_string()], 1, 2, 3);
        assert_eq!(syntax, t.tokenize("small dog field", 5));
    }

    #[test]
    fn user_lexicon_replaces_the_shipped_one() {
        let t = clip();
        let mine = Lexicon::parse("runs\tnoun\nacross\tnoun\n", std::path::Path::new("mine"))
            .expect("valid");
        let reducer = TextReducer::new(TextReduction::Syntax, 4).with_lexicon(Arc::new(mine));
        assert_eq!(reducer.lexicon().len(), 2);
        assert_eq!(
            reducer.apply(&t, DOG, &mut Rng::new(0)),
            t.tokenize("runs across", 4)
        );
    }
}
