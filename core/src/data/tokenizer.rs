//! Text tokenizers: OpenCLIP's byte-level BPE (`open_clip/tokenizer.py`,
//! `SimpleTokenizer` over `bpe_simple_vocab_16e6.txt`) and the BERT-uncased
//! WordPiece that CLIPA-v2's JAX checkpoints were trained with (big_vision
//! `pp/proj/flaxformer/bert_ops.py`: `[CLS]` + WordPiece ids, no `[SEP]`).
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
    /// WordPiece: `[CLS] + content`, truncated to `context`, padded with 0.
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

    /// How many special tokens [`Tokenizer::wrap`] adds (2 for CLIP, 1 for
    /// WordPiece): text reduction keeps `context - num_special()` content ids.
    pub fn num_special(&self) -> usize {
        match self {
            Self::Clip(_) => 2,
            Self::WordPiece(_) => 1,
        }
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
    fn wordpiece_wraps_with_cls_only() {
        let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat"];
        let wp = WordPieceTokenizer::from_tokens(vocab.map(String::from).to_vec())
            .expect("valid vocabulary");
        let t = Tokenizer::WordPiece(wp);
        assert_eq!(t.num_special(), 1);
        assert_eq!(t.vocab_size(), 6);
        assert_eq!(t.encode("A cat"), [4, 5]);
        assert_eq!(t.tokenize("A cat", 5), [2, 4, 5, 0, 0]);
        assert_eq!(t.tokenize("a cat cat a", 3), [2, 4, 5]);
    }
}
