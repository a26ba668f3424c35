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
//! Each strategy is one small type in its own file (`text/`), its tests
//! below it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::syntax::Lexicon;
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

mod block;
mod random;
mod syntax;
mod truncate;

pub use block::BlockKeep;
pub use random::RandomKeep;
pub use syntax::SyntaxKeep;
pub use truncate::Truncate;

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
