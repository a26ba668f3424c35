//! BERT WordPiece as OpenCLIP's `HFTokenizer` runs it for CLIPA-v2 models
//! (`open_clip/tokenizer.py`): OpenCLIP's caption cleaning (`ftfy`, HTML
//! unescaping, whitespace), then HuggingFace's `BertTokenizer`
//! (`models/bert/tokenization_bert.py`: `BasicTokenizer`, then
//! `WordpieceTokenizer`), then `[CLS] … [SEP]` truncated to the context
//! length, padded with 0, and with `strip_sep_token` the `[SEP]` replaced by
//! 0. A literal `[CLS]` in a caption is plain text.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use unicode_categories::UnicodeCategories;
use unicode_normalization::UnicodeNormalization;

use super::{clean, pad_to};
use crate::error::{Error, Result};

/// Words longer than this many characters become `[UNK]` (HF
/// `max_input_chars_per_word`).
const MAX_WORD_CHARS: usize = 100;

/// WordPiece over a `vocab.txt` (one token per line, id = line number).
///
/// Cheap to clone: the vocabulary is shared.
#[derive(Clone)]
pub struct WordPieceTokenizer {
    /// The tokens in id order, as read (written back into checkpoints).
    tokens: Arc<Vec<String>>,
    vocab: Arc<HashMap<String, u32>>,
    cls: u32,
    sep: u32,
    unk: u32,
    lowercase: bool,
    strip_accents: bool,
    strip_sep: bool,
}

impl std::fmt::Debug for WordPieceTokenizer {
    // The vocabulary itself (30k entries for BERT) would flood any log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordPieceTokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("cls", &self.cls)
            .field("sep", &self.sep)
            .field("unk", &self.unk)
            .field("lowercase", &self.lowercase)
            .field("strip_accents", &self.strip_accents)
            .field("strip_sep", &self.strip_sep)
            .finish()
    }
}

impl WordPieceTokenizer {
    /// Reads a vocabulary: a BERT `vocab.txt`, or a HuggingFace
    /// `tokenizer.json` whose model is WordPiece. It must contain `[CLS]`,
    /// `[SEP]` and `[UNK]`. The options start as BERT uncased with
    /// `strip_sep_token` (CLIPA-v2's); see [`Self::with_options`].
    pub fn from_vocab_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let as_format = |reason: String| Error::Format {
            path: path.to_path_buf(),
            reason,
        };
        let tokens = if text.trim_start().starts_with('{') {
            tokens_from_json(&text).map_err(as_format)?
        } else {
            text.lines().map(str::to_string).collect()
        };
        Self::from_tokens(tokens).map_err(|e| match e {
            Error::Config(reason) => as_format(reason),
            other => other,
        })
    }

    /// Builds the tokenizer from tokens in id order. A token listed twice
    /// keeps its last id, as HF `load_vocab` does.
    pub fn from_tokens(tokens: Vec<String>) -> Result<Self> {
        if u32::try_from(tokens.len()).is_err() {
            return Err(Error::Config(format!(
                "vocabulary of {} tokens is too large",
                tokens.len()
            )));
        }
        let vocab: HashMap<String, u32> = tokens.iter().cloned().zip(0u32..).collect();
        let special = |name: &str| {
            vocab
                .get(name)
                .copied()
                .ok_or_else(|| Error::Config(format!("WordPiece vocabulary has no {name} token")))
        };
        let (cls, sep, unk) = (special("[CLS]")?, special("[SEP]")?, special("[UNK]")?);
        Ok(Self {
            tokens: Arc::new(tokens),
            vocab: Arc::new(vocab),
            cls,
            sep,
            unk,
            lowercase: true,
            strip_accents: true,
            strip_sep: true,
        })
    }

    /// Sets lower-casing, accent stripping and `strip_sep_token`.
    pub fn with_options(mut self, lowercase: bool, strip_accents: bool, strip_sep: bool) -> Self {
        self.lowercase = lowercase;
        self.strip_accents = strip_accents;
        self.strip_sep = strip_sep;
        self
    }

    /// `(lowercase, strip_accents, strip_sep_token)`.
    pub fn options(&self) -> (bool, bool, bool) {
        (self.lowercase, self.strip_accents, self.strip_sep)
    }

    /// The vocabulary as a `vocab.txt`: one token a line, in id order.
    pub fn vocab_txt(&self) -> String {
        let mut out = String::with_capacity(self.tokens.len() * 8);
        for t in self.tokens.iter() {
            out.push_str(t);
            out.push('\n');
        }
        out
    }

    /// Number of ids (lines of `vocab.txt`).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Content ids of `text` (no `[CLS]`/`[SEP]`), untruncated: OpenCLIP's
    /// cleaning, then BERT's basic split and WordPiece.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut piece = String::new();
        let cleaned = clean::clean(text);
        for word in basic_tokenize(&cleaned, self.lowercase, self.strip_accents) {
            self.wordpiece(&word, &mut piece, &mut ids);
        }
        ids
    }

    /// `[CLS] + content + [SEP]` in exactly `context` slots, as HF's
    /// `truncation=True, padding="max_length"`: the content is cut to
    /// `context - 2` ids so that `[SEP]` stays, then padded with 0. With
    /// `strip_sep_token` the `[SEP]` slot holds 0.
    pub fn wrap(&self, content: &[u32], context: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(context.max(2));
        ids.push(self.cls);
        ids.extend(content.iter().take(context.saturating_sub(2)));
        ids.push(if self.strip_sep { 0 } else { self.sep });
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

/// The `model.vocab` map of a HuggingFace `tokenizer.json` as tokens in id
/// order; the ids must be exactly `0..n`.
fn tokens_from_json(text: &str) -> std::result::Result<Vec<String>, String> {
    let root: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not a tokenizer.json: {e}"))?;
    let model = &root["model"];
    match model["type"].as_str() {
        Some("WordPiece") => {}
        other => {
            return Err(format!(
                "tokenizer model {} is not supported: clipa reads CLIP BPE and WordPiece",
                other.unwrap_or("(none)")
            ));
        }
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or("tokenizer.json has no model.vocab map")?;
    let mut tokens = vec![None; vocab.len()];
    for (token, id) in vocab {
        let slot = id
            .as_u64()
            .and_then(|i| tokens.get_mut(usize::try_from(i).ok()?))
            .ok_or_else(|| format!("token {token:?} has id {id}, outside 0..{}", vocab.len()))?;
        if slot.replace(token.clone()).is_some() {
            return Err(format!("id {id} is given to two tokens"));
        }
    }
    // n distinct ids below n: every slot is filled.
    Ok(tokens.into_iter().flatten().collect())
}

/// HF `BasicTokenizer.tokenize`: words and single punctuation / CJK
/// characters, optionally lower-cased and without accents.
fn basic_tokenize(text: &str, lowercase: bool, strip_accents: bool) -> Vec<String> {
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
        let plain: String = match (token.is_ascii(), lowercase) {
            (true, true) => token.to_ascii_lowercase(),
            (true, false) => token.to_string(),
            (false, _) => {
                let cased = if lowercase {
                    token.to_lowercase()
                } else {
                    token.to_string()
                };
                if strip_accents {
                    cased.nfd().filter(|c| !c.is_mark_nonspacing()).collect()
                } else {
                    cased
                }
            }
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

    // HF `tok(text, max_length=n, padding="max_length", truncation=True)`,
    // then OpenCLIP's `strip_sep_token` (the [SEP] id 3 becomes 0).
    #[test]
    fn wraps_like_hf_and_strips_sep() {
        let keep = tokenizer().with_options(true, true, false);
        let content = keep.encode("the cafe the cafe");
        assert_eq!(keep.wrap(&content, 7), [2, 4, 5, 4, 5, 3, 0]);
        assert_eq!(keep.wrap(&content, 4), [2, 4, 5, 3]);
        let strip = tokenizer();
        assert_eq!(strip.options(), (true, true, true));
        assert_eq!(strip.wrap(&content, 7), [2, 4, 5, 4, 5, 0, 0]);
        assert_eq!(strip.wrap(&content, 4), [2, 4, 5, 0]);
        assert_eq!(strip.wrap(&content, 1), [2]);
        assert!(strip.wrap(&content, 0).is_empty());
    }

    #[test]
    fn cleans_like_openclip_and_honours_case_options() {
        let t = tokenizer();
        // OpenCLIP's `basic_clean` unescapes HTML before BERT sees it.
        assert_eq!(t.encode("the &amp; cafe"), t.encode("the & cafe"));
        assert_eq!(t.encode("  the\n\ncafe  "), [4, 5]);
        let cased = tokenizer().with_options(false, false, true);
        assert_eq!(cased.encode("The cafe"), [1, 5]);
        assert_eq!(cased.encode("the café"), [4, 1]);
        let no_accents = tokenizer().with_options(false, true, true);
        assert_eq!(no_accents.encode("the café"), [4, 5]);
    }

    #[test]
    fn reads_vocab_file_and_rejects_bad_ones() {
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path();
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
        assert_eq!(t.vocab_txt(), VOCAB.join("\n") + "\n");
    }

    #[test]
    fn reads_the_vocabulary_of_a_tokenizer_json() {
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path();
        let vocab: serde_json::Map<String, serde_json::Value> = VOCAB
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({"model": {"type": "WordPiece", "vocab": vocab}});
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).expect("write tokenizer.json");
        let t = WordPieceTokenizer::from_vocab_file(&path).expect("valid tokenizer.json");
        assert_eq!(t.vocab_txt(), tokenizer().vocab_txt());
        let bpe = serde_json::json!({"model": {"type": "BPE", "vocab": {}}});
        std::fs::write(&path, bpe.to_string()).expect("write tokenizer.json");
        let err = WordPieceTokenizer::from_vocab_file(&path).expect_err("BPE");
        assert!(err.to_string().contains("tokenizer model BPE"), "{err}");
        let gap =
            serde_json::json!({"model": {"type": "WordPiece", "vocab": {"[CLS]": 0, "[SEP]": 5}}});
        std::fs::write(&path, gap.to_string()).expect("write tokenizer.json");
        let err = WordPieceTokenizer::from_vocab_file(&path).expect_err("gap");
        assert!(err.to_string().contains("outside 0..2"), "{err}");
    }
}
