//! Text tokenizers: OpenCLIP's byte-level BPE (`open_clip/tokenizer.py`,
//! `SimpleTokenizer` over `bpe_simple_vocab_16e6.txt`), which CLIPA-v1's
//! PyTorch models read, and the BERT-uncased WordPiece of CLIPA-v2's
//! models, as OpenCLIP's `HFTokenizer` runs it (`strip_sep_token`).
//!
//! The tokenizer belongs to the model: [`TokenizerConfig`] sits in the
//! model's text config, and [`Tokenizer::for_text`] builds it and checks that
//! every id it can emit has a row in the token embedding.
//!
//! [`Tokenizer`] is the closed choice the rest of clipa codes against: it
//! splits tokenizing into [`Tokenizer::encode`] (content ids, untruncated)
//! and [`Tokenizer::wrap`] (special tokens, truncation, padding), so text
//! reduction can pick content ids in between.
//!
//! Speed (release build, one core of the shared 2-core dev machine, random
//! captions of 10–30 words): CLIP about 230k captions/s for ASCII captions
//! and 70k/s for captions with non-ASCII text or entities (they take the
//! full ftfy path); WordPiece about 90k/s. A training step's 32k captions
//! thus cost well under a core-second, spread over the loader threads.

mod clean;
mod clip;
mod html;
mod wordpiece;

use std::path::Path;

use crate::model::TextConfig;
pub use crate::model::TokenizerConfig;
use crate::{Error, Result};
pub use clip::ClipTokenizer;
pub use wordpiece::WordPieceTokenizer;

/// OpenCLIP's `<start_of_text>` id.
pub const SOT: u32 = 49406;
/// OpenCLIP's `<end_of_text>` id.
pub const EOT: u32 = 49407;
/// Size of OpenCLIP's BPE vocabulary: 256 bytes × 2 (plain and end-of-word),
/// 48 894 merges, `<start_of_text>` and `<end_of_text>`.
pub const CLIP_VOCAB_SIZE: usize = 49408;

/// The text tokenizer of a model: a closed choice between the two the
/// CLIPA checkpoints use.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// OpenCLIP / OpenAI CLIP byte-level BPE, `[SOT] … [EOT]`.
    Clip(ClipTokenizer),
    /// BERT uncased WordPiece over a user's `vocab.txt`, `[CLS] …`.
    WordPiece(WordPieceTokenizer),
}

impl Tokenizer {
    /// The CLIP tokenizer. Cheap: every call shares one vocabulary that is
    /// built on first use.
    pub fn clip() -> Self {
        Self::Clip(ClipTokenizer::new())
    }

    /// The tokenizer `config` describes. WordPiece reads its vocabulary from
    /// `vocab` (a `vocab.txt` or `tokenizer.json`), which it needs; CLIP BPE
    /// is built in and takes none.
    pub fn load(config: &TokenizerConfig, vocab: Option<&Path>) -> Result<Self> {
        match (config, vocab) {
            (TokenizerConfig::ClipBpe, None) => Ok(Self::clip()),
            (TokenizerConfig::ClipBpe, Some(path)) => Err(Error::Config(format!(
                "the model tokenizes with the built-in CLIP BPE, so a vocabulary ({}) is not used",
                path.display()
            ))),
            (TokenizerConfig::WordPiece { .. }, None) => Err(Error::Config(
                "the model tokenizes with BERT uncased WordPiece and needs its vocabulary: \
                 pass --vocab FILE, a vocab.txt or tokenizer.json (from the bert-base-uncased \
                 tokenizer files, or from any CLIPA hub folder)"
                    .into(),
            )),
            (
                &TokenizerConfig::WordPiece {
                    lowercase,
                    strip_accents,
                    strip_sep_token,
                },
                Some(path),
            ) => Ok(Self::WordPiece(
                WordPieceTokenizer::from_vocab_file(path)?.with_options(
                    lowercase,
                    strip_accents,
                    strip_sep_token,
                ),
            )),
        }
    }

    /// The tokenizer of a text tower, checked against its token table:
    /// [`Tokenizer::load`], then [`Tokenizer::check_fits`].
    pub fn for_text(text: &TextConfig, vocab: Option<&Path>) -> Result<Self> {
        let tokenizer = Self::load(&text.tokenizer, vocab)?;
        tokenizer.check_fits(text.vocab_size)?;
        Ok(tokenizer)
    }

    /// Every id this tokenizer can emit must index one of the `rows` rows
    /// of the token embedding: no backend may ever look up an id outside
    /// the table (flex panics, CUDA reads out of bounds).
    pub fn check_fits(&self, rows: usize) -> Result<()> {
        if self.vocab_size() <= rows {
            return Ok(());
        }
        Err(Error::Config(format!(
            "tokenizer and model do not match: the {} emits ids up to {}, \
             but the text tower's token embedding has {rows} rows",
            self.describe(),
            self.vocab_size() - 1
        )))
    }

    /// The config that rebuilds this tokenizer (given its vocabulary).
    pub fn config(&self) -> TokenizerConfig {
        match self {
            Self::Clip(_) => TokenizerConfig::ClipBpe,
            Self::WordPiece(t) => {
                let (lowercase, strip_accents, strip_sep_token) = t.options();
                TokenizerConfig::WordPiece {
                    lowercase,
                    strip_accents,
                    strip_sep_token,
                }
            }
        }
    }

    /// One line for logs: `CLIP BPE` or `WordPiece (30522 tokens)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Clip(_) => "CLIP BPE tokenizer".into(),
            Self::WordPiece(t) => format!("WordPiece tokenizer ({} tokens)", t.vocab_size()),
        }
    }

    /// Content ids of `text` after cleaning, without start/end/pad tokens,
    /// untruncated.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Self::Clip(t) => t.encode(text),
            Self::WordPiece(t) => t.encode(text),
        }
    }

    /// Wraps content ids into exactly `context` ids. CLIP: `[SOT] + content +
    /// [EOT]`, truncated so that EOT sits in the last slot, padded with 0.
    /// WordPiece: `[CLS] + content + [SEP]`, the content cut to
    /// `context - 2`, padded with 0 (`[SEP]` itself 0 with `strip_sep_token`).
    pub fn wrap(&self, content: &[u32], context: usize) -> Vec<u32> {
        match self {
            Self::Clip(t) => t.wrap(content, context),
            Self::WordPiece(t) => t.wrap(content, context),
        }
    }

    /// `wrap(encode(text), context)`.
    pub fn tokenize(&self, text: &str, context: usize) -> Vec<u32> {
        self.wrap(&self.encode(text), context)
    }

    /// How many slots [`Tokenizer::wrap`] keeps for special tokens (2:
    /// `[SOT]`/`[EOT]`, or `[CLS]`/`[SEP]`): text reduction keeps
    /// `context - num_special()` content ids.
    pub fn num_special(&self) -> usize {
        2
    }

    /// Number of ids, i.e. the rows of the token embedding.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Clip(_) => CLIP_VOCAB_SIZE,
            Self::WordPiece(t) => t.vocab_size(),
        }
    }

    /// The padding id: 0 for both tokenizers.
    pub fn pad_id(&self) -> u32 {
        0
    }
}

/// Pads `ids` with 0 up to `context` (callers have already truncated).
fn pad_to(mut ids: Vec<u32>, context: usize) -> Vec<u32> {
    ids.resize(context, 0);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tokenizer_is_send_and_sync() {
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn clip_wraps_with_two_specials() {
        let t = Tokenizer::clip();
        assert_eq!(t.num_special(), 2);
        assert_eq!(t.vocab_size(), 49408);
        assert_eq!(t.pad_id(), 0);
        // `open_clip.tokenize("a photo of a cat.", 8)`.
        assert_eq!(
            t.encode("a photo of a cat."),
            [320, 1125, 539, 320, 2368, 269]
        );
        assert_eq!(
            t.tokenize("a photo of a cat.", 10),
            [SOT, 320, 1125, 539, 320, 2368, 269, EOT, 0, 0]
        );
        assert_eq!(t.wrap(&[1, 2, 3, 4], 4), [SOT, 1, 2, EOT]);
    }

    #[test]
    fn wordpiece_wraps_cls_and_a_stripped_sep() {
        let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat"];
        let wp = WordPieceTokenizer::from_tokens(vocab.map(String::from).to_vec())
            .expect("valid vocabulary");
        let t = Tokenizer::WordPiece(wp);
        assert_eq!(t.num_special(), 2);
        assert_eq!(t.vocab_size(), 6);
        assert_eq!(t.encode("A cat"), [4, 5]);
        assert_eq!(t.tokenize("A cat", 5), [2, 4, 5, 0, 0]);
        assert_eq!(t.tokenize("a cat cat a", 4), [2, 4, 5, 0]);
        assert_eq!(t.config(), TokenizerConfig::BERT_UNCASED);
    }

    #[test]
    fn a_tokenizer_must_fit_the_token_table() {
        let clip = Tokenizer::clip();
        clip.check_fits(49_408).expect("CLIP BPE fits 49,408 rows");
        let err = clip.check_fits(32_000).expect_err("BPE ids past 32,000");
        assert!(err.to_string().contains("ids up to 49407"), "{err}");
        assert!(err.to_string().contains("32000 rows"), "{err}");
        let err = Tokenizer::load(&TokenizerConfig::BERT_UNCASED, None).expect_err("no vocab");
        assert!(err.to_string().contains("--vocab FILE"), "{err}");
        let err = Tokenizer::load(&TokenizerConfig::ClipBpe, Some(Path::new("v.txt")))
            .expect_err("vocab for BPE");
        assert!(err.to_string().contains("built-in CLIP BPE"), "{err}");
    }
}
