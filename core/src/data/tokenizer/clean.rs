//! OpenCLIP's caption cleaning (`open_clip/tokenizer.py`: `basic_clean`,
//! `whitespace_clean`): `ftfy.fix_text`, `html.unescape` twice, whitespace
//! collapse. The final `.lower()` is left to the caller.
//!
//! Of `ftfy.fix_text` (ftfy 6, `ftfy/__init__.py::fix_and_explain`) this
//! keeps every step that is a fixed character rewrite: HTML entities (off
//! once a line with `<` was seen), C1 controls read as Windows-1252, Latin
//! ligatures, full-width forms, curly quotes, terminal escapes, control
//! characters, NFC — repeated until nothing changes, as ftfy does. It leaves
//! out mojibake repair (`fix_encoding`), a heuristic over whole encodings
//! that fires on garbled captions (and on rare odd mixes such as a C1
//! control after a Latin-1 letter); those few captions tokenize differently.

use std::sync::OnceLock;

use regex::Regex;
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

use super::html;

/// `whitespace_clean(basic_clean(text))` without the final `.lower()`.
pub(super) fn clean(text: &str) -> String {
    // Printable ASCII without `&` passes ftfy and html.unescape untouched.
    let plain = text
        .bytes()
        .all(|b| ((0x20..0x7F).contains(&b) && b != b'&') || matches!(b, b'\t' | b'\n' | b'\r'));
    let unescaped;
    let text = if plain {
        text
    } else {
        unescaped = html::unescape(&html::unescape(&fix_text(text)));
        &unescaped
    };
    // Python's `" ".join(text.split())`. Python also splits at U+001C–U+001F,
    // which ftfy has already removed.
    let mut out = String::with_capacity(text.len());
    for word in text.split(char::is_whitespace).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// `ftfy.fix_text` with its default config, minus mojibake repair.
fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // ftfy turns HTML unescaping off for good once a line contains `<`.
    let mut unescape = true;
    for line in text.split_inclusive('\n') {
        unescape &= !line.contains('<');
        let mut line = line.to_string();
        loop {
            let fixed = fix_once(&line, unescape);
            if fixed == line {
                break;
            }
            line = fixed;
        }
        out.push_str(&line);
    }
    out
}

/// One round of ftfy's fixers, in ftfy's order.
fn fix_once(text: &str, unescape: bool) -> String {
    let unescaped;
    let text = if unescape {
        unescaped = html::ftfy_unescape(text);
        &unescaped
    } else {
        text
    };
    // fix_c1_controls, fix_latin_ligatures, fix_character_width,
    // uncurl_quotes: character maps applied one after the other.
    let mut mapped = String::with_capacity(text.len());
    for c in text.chars().map(|c| html::cp1252_c1(c).unwrap_or(c)) {
        match ligature(c) {
            Some(letters) => letters
                .chars()
                .for_each(|c| push_width_uncurled(c, &mut mapped)),
            None => push_width_uncurled(c, &mut mapped),
        }
    }
    // fix_line_breaks only swaps one whitespace for another; whitespace_clean
    // collapses all of them, so it is skipped.
    if mapped.contains('\u{1B}') {
        mapped = terminal_escape().replace_all(&mapped, "").into_owned();
    }
    if mapped.chars().any(is_ftfy_control) {
        mapped.retain(|c| !is_ftfy_control(c));
    }
    match is_nfc_quick(mapped.chars()) {
        IsNormalized::Yes => mapped,
        _ => mapped.nfc().collect(),
    }
}

/// ftfy `chardata.LIGATURES`.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// ftfy `chardata.WIDTH_MAP` (U+3000 → space, U+FF01–U+FFEF → their NFKC),
/// then `uncurl_quotes`, pushed onto `out`.
fn push_width_uncurled(c: char, out: &mut String) {
    match c {
        '\u{3000}' => out.push(' '),
        '\u{FF01}'..='\u{FFEF}' => out.extend(std::iter::once(c).nfkc().map(uncurl)),
        _ => out.push(uncurl(c)),
    }
}

/// ftfy `uncurl_quotes`.
fn uncurl(c: char) -> char {
    match c {
        '\u{02BC}' | '\u{2018}'..='\u{201B}' => '\'',
        '\u{201C}'..='\u{201F}' => '"',
        _ => c,
    }
}

/// ftfy `ANSI_RE` (`remove_terminal_escapes`).
fn terminal_escape() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\x1B\[(?:\d|;)*[a-zA-Z]").expect("static regex"))
}

/// ftfy `chardata.CONTROL_CHARS` (`remove_control_chars`).
fn is_ftfy_control(c: char) -> bool {
    matches!(c,
        '\u{00}'..='\u{08}' | '\u{0B}' | '\u{0E}'..='\u{1F}' | '\u{7F}'
        | '\u{206A}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFC}')
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values from Python with ftfy 6.3:
    // `whitespace_clean(basic_clean(s))` from open_clip/tokenizer.py.
    #[test]
    fn entities_are_unescaped_repeatedly() {
        assert_eq!(clean("fish &amp; chips"), "fish & chips");
        assert_eq!(clean("a &amp;amp;amp; b"), "a & b");
        assert_eq!(clean("caf&eacute;&nbsp;au&#32;lait"), "café au lait");
        // With `<` ftfy keeps entities; the two html.unescape calls still run.
        assert_eq!(clean("<b> &amp;amp;amp;"), "<b> &amp;");
    }

    #[test]
    fn ftfy_character_fixes() {
        assert_eq!(clean("‘curly’ “quotes”"), "'curly' \"quotes\"");
        assert_eq!(clean("&lsquo;x&rsquo;"), "'x'");
        assert_eq!(clean("ﬁne ﬂower ŉ"), "fine flower 'n");
        assert_eq!(clean("ＦＵＬＬ\u{3000}ｗｉｄｔｈ！"), "FULL width!");
        assert_eq!(clean("\u{93}smart\u{94} \u{85}"), "\"smart\" …");
        assert_eq!(
            clean("a\u{1B}[31mred\u{1B}[0m\u{200B}\u{FEFF}b\u{0B}c"),
            "ared\u{200B}bc"
        );
        assert_eq!(
            clean("&NTILDE; \u{FF76}\u{FF9E} \u{FFE3}"),
            "Ñ \u{30AC} \u{304}"
        );
        // NFC composes e + U+0301 into é.
        assert_eq!(clean("cafe\u{301}"), "caf\u{e9}");
    }

    #[test]
    fn whitespace_is_collapsed_and_stripped() {
        assert_eq!(
            clean("  tabs\tand\nnewlines   and  spaces \r\n"),
            "tabs and newlines and spaces"
        );
        assert_eq!(clean("a\u{a0}\u{2003}b\u{1F}c"), "a bc");
        assert_eq!(
            clean("line1 &amp;\nline2 < &amp;\nline3 &amp;"),
            "line1 & line2 < & line3 &"
        );
        assert_eq!(clean("   "), "");
        assert_eq!(clean(""), "");
    }
}
