//! BERT uncased WordPiece, as HuggingFace `BertTokenizer(do_lower_case=True)`
//! (`models/bert/tokenization_bert.py`: `BasicTokenizer`, then
//! `WordpieceTokenizer`). Like big_vision's `bert_ops.py`, which fed CLIPA-v2
//! through tensorflow_text, a caption becomes `[CLS]` + ids with no `[SEP]`,
//! and a literal `[CLS]` in a caption is plain text. (tensorflow_text
//! lower-cases by NFKC case folding, so rare characters such as `ß` or `½`
//! may split differently there.)

use std::collections::HashMap;
use std::path::Path;

use unicode_categories::UnicodeCategories;
use unicode_normalization::UnicodeNormalization;

use super::pad_to;
use crate::error::{Error, Result};

/// Words longer than this many characters become `[UNK]` (HF
/// `max_input_chars_per_word`).
const MAX_WORD_CHARS: usize = 100;

/// WordPiece over a `vocab.txt` (one token per line, id = line number).
#[derive(Clone)]
pub struct WordPieceTokenizer {
    vocab: HashMap<String, u32>,
    size: usize,
    cls: u32,
    unk: u32,
}

impl std::fmt::Debug for WordPieceTokenizer {
    // The vocabulary itself (30k entries for BERT) would flood any log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordPieceTokenizer")
            .field("vocab_size", &self.size)
            .field("cls", &self.cls)
            .field("unk", &self.unk)
            .finish()
    }
}

impl WordPieceTokenizer {
    /// Reads a BERT `vocab.txt`. It must contain `[CLS]` and `[UNK]`.
    pub fn from_vocab_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let tokens = text.lines().map(str::to_string).collect();
        Self::from_tokens(tokens).map_err(|e| match e {
            Error::Config(reason) => Error::Format {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// Builds the tokenizer from tokens in id order. A token listed twice
    /// keeps its last id, as HF `load_vocab` does.
    pub fn from_tokens(tokens: Vec<String>) -> Result<Self> {
        let size = tokens.len();
        if u32::try_from(size).is_err() {
            return Err(Error::Config(format!(
                "vocabulary of {size} tokens is too large"
            )));
        }
        let vocab: HashMap<String, u32> = tokens.into_iter().zip(0u32..).collect();
        let special = |name: &str| {
            vocab
                .get(name)
                .copied()
                .ok_or_else(|| Error::Config(format!("WordPiece vocabulary has no {name} token")))
        };
        let (cls, unk) = (special("[CLS]")?, special("[UNK]")?);
        Ok(Self {
            vocab,
            size,
            cls,
            unk,
        })
    }

    /// Number of ids (lines of `vocab.txt`).
    pub fn vocab_size(&self) -> usize {
        self.size
    }

    /// Content ids of `text` (no `[CLS]`), untruncated.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut piece = String::new();
        for word in basic_tokenize(text) {
            self.wordpiece(&word, &mut piece, &mut ids);
        }
        ids
    }

    /// `[CLS] + content`, cut to `context` and padded with 0.
    pub fn wrap(&self, content: &[u32], context: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(context);
        ids.push(self.cls);
        ids.extend(content.iter().take(context.saturating_sub(1)));
        ids.truncate(context);
        pad_to(ids, context)
    }

    /// Greedy longest-match-first split of one word, `##` marking pieces
    /// that continue a word; the whole word is `[UNK]` if any part fails.
    fn wordpiece(&self, word: &str, piece: &mut String, out: &mut Vec<u32>) {
        // Byte offsets of char boundaries, so every slice is a whole char.
        let bounds: Vec<usize> = word
            .char_indices()
            .map(|(i, _)| i)
            .chain([word.len()])
            .collect();
        if bounds.len() - 1 > MAX_WORD_CHARS {
            out.push(self.unk);
            return;
        }
        let first = out.len();
        let mut start = 0;
        while start + 1 < bounds.len() {
            let found = (start + 1..bounds.len()).rev().find_map(|end| {
                piece.clear();
                if start > 0 {
                    piece.push_str("##");
                }
                piece.push_str(&word[bounds[start]..bounds[end]]);
                self.vocab.get(piece.as_str()).map(|&id| (end, id))
            });
            let Some((end, id)) = found else {
                out.truncate(first);
                out.push(self.unk);
                return;
            };
            out.push(id);
            start = end;
        }
    }
}

/// HF `BasicTokenizer.tokenize` with `do_lower_case=True`: words and single
/// punctuation / CJK characters, lower-cased and without accents.
fn basic_tokenize(text: &str) -> Vec<String> {
    // _clean_text + _tokenize_chinese_chars in one pass.
    let mut spaced = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\0' || c == '\u{FFFD}' || is_control(c) {
            continue;
        }
        if is_whitespace(c) {
            spaced.push(' ');
        } else if is_cjk(c) {
            spaced.extend([' ', c, ' ']);
        } else {
            spaced.push(c);
        }
    }
    // ASCII is its own NFC/NFD and has no accents: skip the tables.
    if !spaced.is_ascii() {
        spaced = spaced.nfc().collect();
    }
    let mut words = Vec::new();
    // Python's `str.split` also breaks at U+2028/U+2029, which survive
    // cleaning: Rust's whitespace is the same set.
    for token in spaced.split(char::is_whitespace).filter(|t| !t.is_empty()) {
        // Lower-case, then strip accents: NFD and drop non-spacing marks.
        let plain: String = if token.is_ascii() {
            token.to_ascii_lowercase()
        } else {
            token
                .to_lowercase()
                .nfd()
                .filter(|c| !c.is_mark_nonspacing())
                .collect()
        };
        let mut word = String::new();
        for c in plain.chars() {
            if is_punctuation(c) {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                words.push(c.to_string());
            } else if c.is_whitespace() {
                // NFD never makes whitespace, but the final whitespace split
                // of HF would drop it: do the same.
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            } else {
                word.push(c);
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
    }
    words
}

/// HF `_is_whitespace`: space, tab, newline, return, or category Zs.
fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || (!c.is_ascii() && c.is_separator_space())
}

/// HF `_is_control`: category C* except tab, newline and return.
fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && (c.is_control() || (!c.is_ascii() && c.is_other()))
}

/// HF `_is_punctuation`: all non-alphanumeric ASCII, or category P*.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || (!c.is_ascii() && c.is_punctuation())
}

/// HF `_is_chinese_char`: the CJK Unified Ideographs blocks.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    const VOCAB: &[&str] = &[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cafe", "un", "##aff", "##able", ",", "!", "a",
        "##a", "東", "京", "hello", "world", "naive", "##s", "-",
    ];

    fn tokenizer() -> WordPieceTokenizer {
        WordPieceTokenizer::from_tokens(VOCAB.iter().map(|t| t.to_string()).collect())
            .expect("valid vocabulary")
    }

    // Expected ids as `BertTokenizer(vocab, do_lower_case=True)` gives them
    // (`tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))`).
    #[test]
    fn lowercases_and_strips_accents() {
        let t = tokenizer();
        assert_eq!(t.encode("The CAFÉ"), [4, 5]);
        assert_eq!(t.encode("NAÏVE cafe\u{301}"), [17, 5]);
    }

    #[test]
    fn splits_punctuation_and_cjk() {
        let t = tokenizer();
        assert_eq!(t.encode("hello,world!"), [15, 9, 16, 10]);
        assert_eq!(t.encode("the東京cafe"), [4, 13, 14, 5]);
        // Tabs and newlines separate; zero-width space (Cf) and NUL vanish.
        assert_eq!(t.encode("the\tcafe\n-\u{200B}-\0"), [4, 5, 19, 19]);
        // U+2028 is no HF whitespace but Python's `str.split` breaks there.
        assert_eq!(t.encode("the\u{2028}cafe\u{3000}the"), [4, 5, 4]);
    }

    #[test]
    fn continues_words_with_hashes() {
        let t = tokenizer();
        assert_eq!(t.encode("unaffable"), [6, 7, 8]);
        assert_eq!(t.encode("Hellos"), [15, 18]);
        assert_eq!(
            t.encode(&"a".repeat(100)),
            [vec![11], vec![12; 99]].concat()
        );
    }

    #[test]
    fn unknown_words_become_one_unk() {
        let t = tokenizer();
        // One unmatchable part makes the whole word [UNK].
        assert_eq!(t.encode("unaffx the"), [1, 4]);
        assert_eq!(t.encode("zzz"), [1]);
        // Over 100 characters: [UNK] without trying.
        assert_eq!(t.encode(&"a".repeat(101)), [1]);
    }

    #[test]
    fn wraps_with_cls_truncates_and_pads() {
        let t = tokenizer();
        let content = t.encode("the cafe the cafe");
        assert_eq!(t.wrap(&content, 7), [2, 4, 5, 4, 5, 0, 0]);
        assert_eq!(t.wrap(&content, 3), [2, 4, 5]);
        assert_eq!(t.wrap(&content, 1), [2]);
        assert!(t.wrap(&content, 0).is_empty());
    }

    #[test]
    fn reads_vocab_file_and_rejects_bad_ones() {
        let dir = Scratch::new("wordpiece");
        let good = dir.join("vocab.txt");
        std::fs::write(&good, VOCAB.join("\n") + "\n").expect("write vocab");
        let t = WordPieceTokenizer::from_vocab_file(&good).expect("valid vocab file");
        assert_eq!(t.vocab_size(), VOCAB.len());
        assert_eq!(t.encode("The cafe"), [4, 5]);

        let bad = dir.join("no_cls.txt");
        std::fs::write(&bad, "[PAD]\n[UNK]\nthe\n").expect("write vocab");
        let err = WordPieceTokenizer::from_vocab_file(&bad).expect_err("no [CLS]");
        assert!(matches!(err, Error::Format { .. }), "{err}");
        let err =
            WordPieceTokenizer::from_vocab_file(&dir.join("missing.txt")).expect_err("missing");
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
