//! OpenCLIP's `SimpleTokenizer` (`open_clip/tokenizer.py`): cleaning, then
//! byte-level BPE over OpenAI's `bpe_simple_vocab_16e6.txt`, which the
//! `instant-clip-tokenizer` crate bundles and applies with the same merge
//! order and `<start_of_text>`/`<end_of_text>` literals. Like OpenCLIP's
//! `self.cache`, each thread keeps the BPE of the words it has seen.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use instant_clip_tokenizer::Token;
use regex::Regex;

use super::{EOT, SOT, clean, pad_to};

/// Words a thread's BPE cache holds before it starts over; caption
/// vocabularies repeat heavily, so a small cache catches most words.
const CACHE_WORDS: usize = 1 << 16;

thread_local! {
    static CACHE: RefCell<HashMap<String, Vec<u32>>> = RefCell::new(HashMap::new());
}

/// The words of lower-cased `text`, as [`word_split`] finds them; ASCII
/// text (most captions) takes a hand-written scanner four times as fast.
fn split_words(text: &str) -> Vec<&str> {
    if !text.is_ascii() {
        return word_split().find_iter(text).map(|m| m.as_str()).collect();
    }
    const LITERALS: [&str; 9] = [
        "<start_of_text>",
        "<end_of_text>",
        "'s",
        "'t",
        "'re",
        "'ve",
        "'m",
        "'ll",
        "'d",
    ];
    let bytes = text.as_bytes();
    let run = |from: usize, keep: fn(u8) -> bool| {
        from + bytes[from..].iter().take_while(|&&b| keep(b)).count()
    };
    let mut words = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let end = if is_space(b) {
            i += 1;
            continue;
        } else if let Some(lit) = LITERALS.iter().find(|l| text[i..].starts_with(*l)) {
            i + lit.len()
        } else if b.is_ascii_alphabetic() {
            run(i, |b| b.is_ascii_alphabetic())
        } else if b.is_ascii_digit() {
            i + 1
        } else {
            run(i, |b| !(is_space(b) || b.is_ascii_alphanumeric()))
        };
        words.push(&text[i..end]);
        i = end;
    }
    words
}

/// ASCII `\s` of the word split regex.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// OpenCLIP's word split (`SimpleTokenizer.pat`): the two special literals,
/// English contractions, letter runs, single digits, other symbol runs.
fn word_split() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .expect("static regex")
    })
}

/// OpenCLIP's byte-level BPE tokenizer (49 408 ids, pad 0).
///
/// Cheap to create and clone: all instances share one vocabulary, built on
/// first use (about 0.1 s).
#[derive(Clone, Copy)]
pub struct ClipTokenizer {
    bpe: &'static instant_clip_tokenizer::Tokenizer,
}

impl ClipTokenizer {
    /// The tokenizer over the bundled OpenAI vocabulary.
    pub fn new() -> Self {
        static BPE: OnceLock<instant_clip_tokenizer::Tokenizer> = OnceLock::new();
        Self {
            bpe: BPE.get_or_init(instant_clip_tokenizer::Tokenizer::new),
        }
    }

    /// Content ids of `text` (no SOT/EOT), like `SimpleTokenizer.encode`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean::clean(text).to_lowercase();
        let mut ids = Vec::with_capacity(cleaned.len() / 3 + 1);
        let mut tokens = Vec::new();
        CACHE.with_borrow_mut(|cache| {
            for word in split_words(&cleaned) {
                if let Some(hit) = cache.get(word) {
                    ids.extend_from_slice(hit);
                    continue;
                }
                // A lone word splits into itself again inside the engine.
                tokens.clear();
                self.bpe.encode(word, &mut tokens);
                let word_ids: Vec<u32> = tokens
                    .iter()
                    .map(|t: &Token| u32::from(t.to_u16()))
                    .collect();
                ids.extend_from_slice(&word_ids);
                if cache.len() >= CACHE_WORDS {
                    cache.clear();
                }
                cache.insert(word.to_string(), word_ids);
            }
        });
        ids
    }

    /// `[SOT] + content + [EOT]` in exactly `context` slots: when too long it
    /// is cut and the last slot overwritten with EOT, as `open_clip.tokenize`
    /// does; when short it is padded with 0.
    pub fn wrap(&self, content: &[u32], context: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(context.max(content.len() + 2));
        ids.push(SOT);
        ids.extend_from_slice(content);
        ids.push(EOT);
        if ids.len() > context {
            ids.truncate(context);
            if let Some(last) = ids.last_mut() {
                *last = EOT;
            }
        }
        pad_to(ids, context)
    }
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClipTokenizer(bpe_simple_vocab_16e6)")
    }
}

#[cfg(test)]
mod tests {

    use serde::Deserialize;

    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/tokenizer/clip_bpe_ids.json"
    );

    #[derive(Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
    }

    /// Every caption of the fixture, made with open_clip 3.3.0:
    /// `open_clip.tokenize(texts, context_length=77)` (see `open_clip` in the
    /// file), including entities, curly quotes, CJK, emoji, Greek/Cyrillic,
    /// a 400-letter word and the `<start_of_text>` literal.
    #[test]
    fn matches_open_clip_on_every_fixture_caption() {
        let json = std::fs::read_to_string(FIXTURE).expect("tokenizer fixture readable");
        let fixture: Fixture = serde_json::from_str(&json).expect("tokenizer fixture parses");
        assert_eq!(fixture.cases.len(), 297);
        let tok = ClipTokenizer::new();
        let bad: Vec<&str> = fixture
            .cases
            .iter()
            .filter(|c| tok.wrap(&tok.encode(&c.text), 77) != c.ids)
            .map(|c| c.text.as_str())
            .collect();
        assert!(
            bad.is_empty(),
            "{} of 297 captions differ: {bad:?}",
            bad.len()
        );
    }

    #[test]
    fn ascii_scanner_splits_like_the_regex() {
        let alphabet: Vec<char> = "ab's'tredlvm<>_!.,19 \t-/start_of_text<end_of_text>"
            .chars()
            .collect();
        let mut rng = crate::rng::Rng::new(7);
        for _ in 0..2000 {
            let len = rng.below(24);
            let text: String = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let by_regex: Vec<&str> = word_split().find_iter(&text).map(|m| m.as_str()).collect();
            assert_eq!(split_words(&text), by_regex, "{text:?}");
        }
        assert_eq!(
            split_words("x<start_of_text>!'s'sa"),
            ["x", "<start_of_text>", "!'", "s", "'s", "a"]
        );
    }

    #[test]
    fn truncation_puts_eot_in_the_last_slot() {
        let tok = ClipTokenizer::new();
        let content = tok.encode(&"dog ".repeat(100));
        assert_eq!(content, vec![1929; 100]);
        let ids = tok.wrap(&content, 77);
        assert_eq!(ids.len(), 77);
        assert_eq!((ids[0], ids[1], ids[75], ids[76]), (SOT, 1929, 1929, EOT));
        // Exactly full: nothing cut.
        assert_eq!(tok.wrap(&[5, 6], 4), [SOT, 5, 6, EOT]);
        assert_eq!(tok.wrap(&[5, 6, 7], 4), [SOT, 5, 6, EOT]);
        // Degenerate contexts behave as Python's slicing does.
        assert_eq!(tok.wrap(&[5], 1), [EOT]);
        assert!(tok.wrap(&[5], 0).is_empty());
    }

    #[test]
    fn short_text_is_zero_padded() {
        let tok = ClipTokenizer::new();
        assert_eq!(
            tok.wrap(&tok.encode("Hi there"), 6),
            [SOT, 1883, 997, EOT, 0, 0]
        );
        assert_eq!(tok.wrap(&tok.encode(" \t\n "), 4), [SOT, EOT, 0, 0]);
    }

    #[test]
    fn cleaning_reaches_the_ids() {
        let tok = ClipTokenizer::new();
        // `&amp;amp;` decodes to `&` (id 261), `&#39;` to `'` as in `'s`.
        assert_eq!(
            tok.encode("fish &amp;amp; chips"),
            tok.encode("fish & chips")
        );
        assert_eq!(tok.encode("dog&#39;s  BALL"), tok.encode("dog's ball"));
        assert_eq!(tok.encode("‘curly’"), tok.encode("'curly'"));
        assert_eq!(tok.encode("fish & chips")[1], 261);
    }
}
