//! HTML character references, decoded the two ways OpenCLIP's cleaning does:
//! Python's `html.unescape` (CPython `Lib/html/__init__.py`) and ftfy's
//! stricter `unescape_html` (`ftfy/fixes.py`, `ftfy/chardata.py`).

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::{Captures, Regex};

/// HTML5 entity names without the leading `&` (`amp;`, `amp`, …) → text.
fn entities() -> &'static HashMap<&'static str, &'static str> {
    static MAP: OnceLock<HashMap<&'static str, &'static str>> = OnceLock::new();
    MAP.get_or_init(|| {
        entities::ENTITIES
            .iter()
            .map(|e| (e.entity.trim_start_matches('&'), e.characters))
            .collect()
    })
}

/// Windows-1252 for bytes 0x80–0x9F, with its five holes kept as the C1
/// control itself ("sloppy-windows-1252" in ftfy, `_invalid_charrefs` in
/// CPython).
pub(super) fn cp1252_c1(c: char) -> Option<char> {
    const TABLE: [u32; 32] = [
        0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
        0x2039, 0x0152, 0x8D, 0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013,
        0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D, 0x017E, 0x0178,
    ];
    let i = (c as u32).checked_sub(0x80).filter(|&i| i < 32)?;
    char::from_u32(TABLE[i as usize])
}

/// CPython `_replace_charref` for a numeric reference.
fn numeric_ref(num: Option<u32>) -> String {
    let Some(num) = num else {
        return '\u{FFFD}'.to_string(); // overflowed: far above 0x10FFFF
    };
    match num {
        0x00 => '\u{FFFD}'.to_string(),
        0x0D => '\r'.to_string(),
        0x80..=0x9F => char::from_u32(num)
            .and_then(cp1252_c1)
            .map_or_else(String::new, String::from),
        0xD800..=0xDFFF | 0x11_0000.. => '\u{FFFD}'.to_string(),
        0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0xFDD0..=0xFDEF => String::new(),
        n if n & 0xFFFE == 0xFFFE => String::new(),
        n => char::from_u32(n).map_or_else(String::new, String::from),
    }
}

/// Python's `html.unescape`: numeric and named references, with or without
/// the `;`, longest-prefix matching for unterminated names.
pub(super) fn unescape(text: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    if !text.contains('&') {
        return text.to_string();
    }
    let re = RE.get_or_init(|| {
        Regex::new(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\x0C <&#;]{1,32};?)")
            .expect("static regex")
    });
    re.replace_all(text, |caps: &Captures<'_>| {
        let s = &caps[1];
        if let Some(num) = s.strip_prefix('#') {
            let (digits, radix) = match num.strip_prefix(['x', 'X']) {
                Some(hex) => (hex, 16),
                None => (num, 10),
            };
            return numeric_ref(u32::from_str_radix(digits.trim_end_matches(';'), radix).ok());
        }
        let map = entities();
        if let Some(v) = map.get(s) {
            return (*v).to_string();
        }
        // Longest known prefix of at least two characters, rest kept.
        let cuts: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(2).collect();
        for &cut in cuts.iter().rev() {
            if let Some(v) = map.get(&s[..cut]) {
                return format!("{v}{}", &s[cut..]);
            }
        }
        format!("&{s}")
    })
    .into_owned()
}

/// ftfy's `unescape_html`: only `;`-terminated references, named ones also
/// when fully upper-cased (`&NTILDE;` → `Ñ`), numeric ones only when they
/// decode cleanly.
pub(super) fn ftfy_unescape(text: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    if !text.contains('&') {
        return text.to_string();
    }
    let re = RE.get_or_init(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("static regex"));
    re.replace_all(text, |caps: &Captures<'_>| {
        let whole = &caps[0];
        let name = &whole[1..];
        if let Some(v) = entities().get(name) {
            return (*v).to_string();
        }
        if whole.starts_with("&#") {
            let decoded = unescape(whole);
            return if decoded.contains(';') {
                whole.to_string()
            } else {
                decoded
            };
        }
        // ftfy adds `&NAME;` for every lower-case `&name;` whose upper-case
        // spelling html.unescape leaves alone.
        let lower = name.to_ascii_lowercase();
        match entities().get(lower.as_str()) {
            Some(v) if name == lower.to_ascii_uppercase() && unescape(whole) == whole => {
                v.to_uppercase()
            }
            _ => whole.to_string(),
        }
    })
    .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values from CPython 3.11: `html.unescape(s)` and
    // `ftfy.fixes.unescape_html(s)` (ftfy 6.3.1).
    #[test]
    fn python_unescape_named_and_numeric() {
        assert_eq!(unescape("fish &amp; chips"), "fish & chips");
        assert_eq!(
            unescape("&lt;b&gt; &quot;hi&quot; &#39;x&#x27;"),
            "<b> \"hi\" 'x'"
        );
        assert_eq!(unescape("caf&eacute; &nbsp;!"), "café \u{a0}!");
        assert_eq!(unescape("&amp;amp;"), "&amp;");
        assert_eq!(unescape(&unescape("&amp;amp;")), "&");
    }

    #[test]
    fn python_unescape_edge_cases() {
        // No `;`: legacy names still decode, longest prefix wins.
        assert_eq!(unescape("&ampx &notit; &copy2"), "&x ¬it; ©2");
        assert_eq!(unescape("&unknown; & &#;"), "&unknown; & &#;");
        assert_eq!(
            unescape("&#150; &#0; &#1; &#x110000; &#99999999999;"),
            "– \u{FFFD}  \u{FFFD} \u{FFFD}"
        );
        assert_eq!(unescape("&#128512;"), "😀");
    }

    #[test]
    fn ftfy_unescape_needs_semicolon() {
        assert_eq!(ftfy_unescape("&amp; &amp &lt;3"), "& &amp <3");
        assert_eq!(ftfy_unescape("&NTILDE; &AMP; &Eacute;"), "Ñ & É");
        assert_eq!(ftfy_unescape("&#39; &#0;"), "' \u{FFFD}");
    }
}
