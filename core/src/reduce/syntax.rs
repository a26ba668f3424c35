//! The part-of-speech lexicon and word splitter behind syntax masking (CLIPA
//! §3.2 "syntax masking"; OpenCLIP `tokenizer.py::syntax_mask_tokenize`;
//! CLIPA JAX `transforms/bert_ops.py::_create_noun_tokenizer`).
//!
//! CLIPA ranks words by their Penn Treebank tag from NLTK's perceptron
//! tagger: `NN*` first, then `JJ*`, then `VB*`, then everything else. clipa
//! replaces the tagger with a context-free lookup table, as CLIPA's JAX code
//! does (it tags every vocabulary entry alone, once). The shipped table,
//! `core/data/lexicon.tsv.gz`, is derived from WordNet 3.0 by
//! `core/data/build_lexicon.py`: a word takes the class of its most frequent
//! tagged sense, inflected forms (dogs, runs, sitting) are baked in, and
//! closed-class words (a, the, in, two, can) are listed as other. The script's
//! header documents every rule; `WORDNET-LICENSE` beside it is the licence.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use crate::{Error, Result};

/// The shipped lexicon, gzip'd `word<TAB>class` lines.
const SHIPPED: &[u8] = include_bytes!("../../data/lexicon.tsv.gz");

/// A word's class for syntax masking. The derived order is the keep order:
/// nouns first, then adjectives, verbs, and everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PartOfSpeech {
    /// Penn `NN*` (CLIPA priority 1).
    Noun,
    /// Penn `JJ*`, WordNet adjectives and satellite adjectives (priority 2).
    Adjective,
    /// Penn `VB*` (priority 3).
    Verb,
    /// Everything else: adverbs, function words, numbers, punctuation,
    /// unknown words (priority 4).
    Other,
}

impl PartOfSpeech {
    /// The lexicon-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Noun => "noun",
            Self::Adjective => "adjective",
            Self::Verb => "verb",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for PartOfSpeech {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PartOfSpeech {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "noun" => Ok(Self::Noun),
            "adjective" => Ok(Self::Adjective),
            "verb" => Ok(Self::Verb),
            "other" => Ok(Self::Other),
            _ => Err(Error::Config(format!(
                "part of speech `{s}`: expected noun | adjective | verb | other"
            ))),
        }
    }
}

/// A context-free word → [`PartOfSpeech`] table. Lookups are
/// case-insensitive; a word that is not listed is [`PartOfSpeech::Other`].
#[derive(Clone, Default)]
pub struct Lexicon {
    words: HashMap<String, PartOfSpeech>,
}

impl fmt::Debug for Lexicon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lexicon({} words)", self.words.len())
    }
}

impl Lexicon {
    /// The lexicon shipped with clipa (WordNet 3.0, about 168k words),
    /// decoded once per process and shared.
    pub fn shipped() -> Arc<Lexicon> {
        static SHARED: OnceLock<Arc<Lexicon>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let path = Path::new("<shipped lexicon.tsv.gz>");
                let lexicon = gunzip(SHIPPED, path).and_then(|text| Self::parse(&text, path));
                Arc::new(
                    lexicon.expect("the shipped lexicon is valid (checked by the lexicon tests)"),
                )
            })
            .clone()
    }

    /// Reads a lexicon in the shipped format: UTF-8 `word<TAB>class` lines
    /// (class `noun`, `adjective`, `verb` or `other`), blank lines and `#`
    /// comments ignored, gzip'd or plain (detected from the content). A
    /// later line for the same word wins.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = if bytes.starts_with(&[0x1f, 0x8b]) {
            gunzip(&bytes, path)?
        } else {
            String::from_utf8(bytes).map_err(|_| format_error(path, "not UTF-8 text".into()))?
        };
        Self::parse(&text, path)
    }

    /// Parses lexicon text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let mut words = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(word), Some(class), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(format_error(
                    origin,
                    format!("line {}: expected `word<TAB>class`", n + 1),
                ));
            };
            let class = class
                .parse()
                .map_err(|e: Error| format_error(origin, format!("line {}: {e}", n + 1)))?;
            words.insert(word.to_lowercase(), class);
        }
        Ok(Self { words })
    }

    /// The class of `word`, ignoring case; [`PartOfSpeech::Other`] when
    /// the word is not listed.
    pub fn get(&self, word: &str) -> PartOfSpeech {
        let found = if word.chars().any(char::is_uppercase) {
            self.words.get(&word.to_lowercase())
        } else {
            self.words.get(word)
        };
        found.copied().unwrap_or(PartOfSpeech::Other)
    }

    /// Number of listed words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether no word is listed.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

fn format_error(path: &Path, reason: String) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason,
    }
}

fn gunzip(bytes: &[u8], path: &Path) -> Result<String> {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_string(&mut text)
        .map_err(|e| format_error(path, format!("bad gzip or not UTF-8 text: {e}")))?;
    Ok(text)
}

/// Splits a caption into words the way `nltk.word_tokenize` does for
/// ordinary captions: on whitespace; punctuation at a word's edges and
/// inside it becomes its own token (`"field."` → `field`, `.`), except
/// hyphens, apostrophes, periods, slashes and digit-group commas inside a
/// word (`t-shirt`, `U.S.`, `and/or`, `1,000`); clitics split off as NLTK's
/// Treebank rules do (`dog's` → `dog`, `'s`; `don't` → `do`, `n't`). Runs of
/// periods stay one token (`...`). NLTK's quote rewriting (`"` → ``` `` ```)
/// is not copied: the words are re-joined and re-encoded, and the BPE sees
/// the caption's own characters.
pub fn split_words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for chunk in text.split_whitespace() {
        split_chunk(chunk, &mut out);
    }
    out
}

/// A character that stays inside a word when letters or digits surround it.
fn joins(c: char, before: char, after: char) -> bool {
    match c {
        '-' | '\'' | '’' | '.' | '/' => true,
        ',' | ':' => before.is_ascii_digit() && after.is_ascii_digit(),
        _ => false,
    }
}

fn split_chunk<'a>(chunk: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = chunk.char_indices().collect();
    let end_of = |i: usize| chars.get(i + 1).map_or(chunk.len(), |&(b, _)| b);
    let mut i = 0;
    while i < chars.len() {
        let (start, c) = chars[i];
        if c.is_alphanumeric() {
            // A word: alphanumerics, plus joiners that sit between two of them.
            let mut j = i;
            while j + 1 < chars.len() {
                let next = chars[j + 1].1;
                if next.is_alphanumeric() {
                    j += 1;
                } else if j + 2 < chars.len()
                    && chars[j + 2].1.is_alphanumeric()
                    && joins(next, chars[j].1, chars[j + 2].1)
                {
                    j += 2;
                } else {
                    break;
                }
            }
            // A trailing period after a lone letter keeps abbreviations such
            // as "U.S." whole.
            if chars.get(j + 1).is_some_and(|&(_, p)| p == '.')
                && j >= 1
                && chars[j].1.is_alphabetic()
                && chars[j - 1].1 == '.'
                && chars.get(j + 2).is_none_or(|&(_, p)| p != '.')
            {
                j += 1;
            }
            push_word(&chunk[start..end_of(j)], out);
            i = j + 1;
        } else {
            // Punctuation: one token per character, except runs of periods.
            let mut j = i;
            while c == '.' && chars.get(j + 1).is_some_and(|&(_, p)| p == '.') {
                j += 1;
            }
            out.push(&chunk[start..end_of(j)]);
            i = j + 1;
        }
    }
}

/// English clitics that NLTK's Treebank rules split off a word's end.
const CLITICS: [&str; 14] = [
    "n't", "n’t", "'s", "’s", "'m", "’m", "'d", "’d", "'re", "’re", "'ve", "’ve", "'ll", "’ll",
];

/// Pushes a word, splitting an English clitic off its end.
fn push_word<'a>(word: &'a str, out: &mut Vec<&'a str>) {
    // ASCII lowercasing keeps byte offsets, so a cut in `lower` is a cut in `word`.
    let lower = word.to_ascii_lowercase();
    match CLITICS
        .iter()
        .find(|c| lower.len() > c.len() && lower.ends_with(*c))
    {
        Some(clitic) => {
            let cut = word.len() - clitic.len();
            out.extend([&word[..cut], &word[cut..]]);
        }
        None => out.push(word),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PartOfSpeech::*;

    #[test]
    fn shipped_lexicon_has_sane_size_and_classes() {
        let lex = Lexicon::shipped();
        assert!((150_000..200_000).contains(&lex.len()), "{}", lex.len());
        let cases = [
            ("dog", Noun),
            ("dogs", Noun),
            ("field", Noun),
            ("children", Noun),
            ("building", Noun),
            ("runs", Verb),
            ("sitting", Verb),
            ("is", Verb),
            ("brown", Adjective),
            ("green", Adjective),
            ("small", Adjective),
            ("bigger", Adjective),
            ("a", Other),
            ("the", Other),
            ("across", Other),
            ("two", Other),
            ("quickly", Other),
            ("Dog", Noun),
            ("xyzzyq", Other),
        ];
        for (word, class) in cases {
            assert_eq!(lex.get(word), class, "{word}");
        }
    }

    #[test]
    fn lexicon_files_load_plain_and_gzip() {
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path();
        let text = "# mine\ncat\tnoun\n\nPurr\tverb\ncat adjective\n";
        let plain = dir.join("lex.tsv");
        std::fs::write(&plain, text).expect("write");
        let gz = dir.join("lex.tsv.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, text.as_bytes()).expect("gzip");
        std::fs::write(&gz, enc.finish().expect("gzip")).expect("write");
        for path in [&plain, &gz] {
            let lex = Lexicon::from_file(path).expect("valid lexicon");
            assert_eq!(lex.len(), 2);
            assert_eq!(lex.get("cat"), Adjective, "later lines win");
            assert_eq!(lex.get("purr"), Verb);
            assert_eq!(lex.get("dog"), Other);
        }
        std::fs::write(&plain, "cat\tnoun\ndog\tanimal\n").expect("write");
        let err = Lexicon::from_file(&plain)
            .expect_err("bad class")
            .to_string();
        assert!(err.contains("line 2") && err.contains("animal"), "{err}");
        std::fs::write(&plain, "cat\n").expect("write");
        assert!(Lexicon::from_file(&plain).is_err());
        assert!(matches!(
            Lexicon::from_file(dir.join("missing")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn splits_like_nltk_word_tokenize() {
        let cases: [(&str, &[&str]); 7] = [
            (
                "a small brown dog runs across the green field.",
                &[
                    "a", "small", "brown", "dog", "runs", "across", "the", "green", "field", ".",
                ],
            ),
            (
                "A dog's t-shirt, (red)!",
                &["A", "dog", "'s", "t-shirt", ",", "(", "red", ")", "!"],
            ),
            ("I don't know...", &["I", "do", "n't", "know", "..."]),
            (
                "U.S. flag: 1,000 stars, 3.5.",
                &["U.S.", "flag", ":", "1,000", "stars", ",", "3.5", "."],
            ),
            ("they're here", &["they", "'re", "here"]),
            ("  ", &[]),
            (
                "\"quoted\" AT&T—done",
                &["\"", "quoted", "\"", "AT", "&", "T", "—", "done"],
            ),
        ];
        for (text, words) in cases {
            assert_eq!(split_words(text), words, "{text}");
        }
    }
}
