//! Shard-list specs as OpenCLIP and img2dataset users write them.
//!
//! Follows Python's `braceexpand` (used by webdataset and by OpenCLIP's
//! `expand_urls` in `src/open_clip_train/data.py`): `{a,b,c}` lists,
//! `{00000..41455}` numeric ranges (zero-padded to the longer bound when a
//! bound has a leading zero), `{a..e}` letter ranges, an optional step
//! `{0..10..2}`, descending ranges, nesting, and several braces in one
//! pattern (left brace varies slowest). Several sources are joined with `::`,
//! and `--train-data-upsampling-factors` gives one weight per source, also
//! `::`-separated. Unlike `braceexpand`, a brace that is neither a list nor a
//! range is an error rather than literal text: in a shard spec it is a typo.

use std::path::PathBuf;

use crate::{Error, Result};

/// Most names one pattern may expand to; beyond this a typo such as
/// `{0..99999999}` would exhaust memory before any file is opened.
pub const MAX_NAMES: usize = 10_000_000;

/// Expands the braces of one source pattern (no `::`) into file names, in
/// `braceexpand` order.
pub fn expand(pattern: &str) -> Result<Vec<String>> {
    expand_inner(pattern)
        .map_err(|reason| Error::Config(format!("shard pattern `{pattern}`: {reason}")))
}

fn expand_inner(s: &str) -> std::result::Result<Vec<String>, String> {
    let Some((open, close)) = first_brace(s)? else {
        return Ok(vec![s.to_string()]);
    };
    let (prefix, body, suffix) = (&s[..open], &s[open + 1..close], &s[close + 1..]);
    let alternatives = match split_top_level(body) {
        Some(items) => {
            let mut all = Vec::new();
            for item in items {
                let expanded = expand_inner(item)?;
                check_size(all.len().saturating_add(expanded.len()))?;
                all.extend(expanded);
            }
            all
        }
        None => range(body)?,
    };
    let tails = expand_inner(suffix)?;
    check_size(alternatives.len().saturating_mul(tails.len()))?;
    let mut out = Vec::with_capacity(alternatives.len() * tails.len());
    for a in &alternatives {
        for t in &tails {
            out.push(format!("{prefix}{a}{t}"));
        }
    }
    Ok(out)
}

fn check_size(n: usize) -> std::result::Result<(), String> {
    if n > MAX_NAMES {
        return Err(format!("expands to more than {MAX_NAMES} names"));
    }
    Ok(())
}

/// Byte offsets of the first top-level `{` and its matching `}`.
fn first_brace(s: &str) -> std::result::Result<Option<(usize, usize)>, String> {
    let mut depth = 0usize;
    let mut open = None;
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                if depth == 0 {
                    open = Some(i);
                }
                depth += 1;
            }
            '}' if depth == 0 => return Err(format!("unmatched `}}` at byte {i}")),
            '}' => {
                depth -= 1;
                if depth == 0 {
                    let start = open.expect("depth > 0 implies an open brace");
                    if i == start + 1 {
                        return Err("empty braces `{}`".into());
                    }
                    return Ok(Some((start, i)));
                }
            }
            _ => {}
        }
    }
    match open {
        Some(i) => Err(format!("unmatched `{{` at byte {i}")),
        None => Ok(None),
    }
}

/// The comma-separated items of a brace body, or `None` if it has no
/// top-level comma (then it must be a range).
fn split_top_level(body: &str) -> Option<Vec<&str>> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if items.is_empty() {
        return None;
    }
    items.push(&body[start..]);
    Some(items)
}

/// `a..b` or `a..b..step`, numeric or single letters.
fn range(body: &str) -> std::result::Result<Vec<String>, String> {
    let parts: Vec<&str> = body.split("..").collect();
    let bad = || format!("`{{{body}}}` is neither a list `{{a,b}}` nor a range `{{0..9}}`");
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let step = match parts.get(2) {
        Some(s) => s.parse::<u64>().map_err(|_| bad())?.max(1),
        None => 1,
    };
    let (lo, hi) = (parts[0], parts[1]);
    if let (Ok(a), Ok(b)) = (lo.parse::<i64>(), hi.parse::<i64>()) {
        let zero_padded = [lo, hi]
            .iter()
            .any(|s| (s.starts_with('0') || s.starts_with("-0")) && *s != "0" && *s != "-0");
        let width = if zero_padded {
            lo.len().max(hi.len())
        } else {
            0
        };
        let values = stepped(a as i128, b as i128, step)?;
        return Ok(values.into_iter().map(|v| format!("{v:0width$}")).collect());
    }
    let letter = |s: &str| {
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if c.is_ascii_alphabetic() => Some(c),
            _ => None,
        }
    };
    match (letter(lo), letter(hi)) {
        (Some(a), Some(b)) => Ok(stepped(a as i128, b as i128, step)?
            .into_iter()
            .filter_map(|v| char::from_u32(v as u32).filter(char::is_ascii_alphabetic))
            .map(String::from)
            .collect()),
        _ => Err(bad()),
    }
}

/// `a, a±step, …` up to and including `b` when it lands on it.
fn stepped(a: i128, b: i128, step: u64) -> std::result::Result<Vec<i128>, String> {
    let step = step as i128;
    let count = (a - b).abs() / step + 1;
    check_size(usize::try_from(count).unwrap_or(usize::MAX))?;
    let sign = if b >= a { 1 } else { -1 };
    Ok((0..count).map(|k| a + sign * k * step).collect())
}

/// One data source of a `::`-joined spec: its pattern, the files it expands
/// to, and its OpenCLIP upsampling factor.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    /// The pattern as the user wrote it.
    pub pattern: String,
    /// The expanded file names, in expansion order.
    pub files: Vec<PathBuf>,
    /// The upsampling factor: every shard of this source is drawn with
    /// weight `weight` when resampling (OpenCLIP `expand_urls`).
    pub weight: f64,
}

/// Parses `a/{0..9}.tar::b/{0..3}.tar` and optional weights `1::0.5`.
///
/// Errors if a pattern is malformed, matches no existing file, or the
/// weights do not match the sources in number, are negative or all zero.
pub fn parse_sources(spec: &str, weights: Option<&str>) -> Result<Vec<SourceSpec>> {
    let patterns: Vec<&str> = spec.split("::").map(str::trim).collect();
    if patterns.iter().any(|p| p.is_empty()) {
        return Err(Error::Config(format!(
            "data spec `{spec}` has an empty source"
        )));
    }
    let weights = match weights {
        None => vec![1.0; patterns.len()],
        Some(w) => parse_weights(w, patterns.len())?,
    };
    let mut sources = Vec::with_capacity(patterns.len());
    for (pattern, weight) in patterns.into_iter().zip(weights) {
        let files: Vec<PathBuf> = expand(pattern)?.into_iter().map(PathBuf::from).collect();
        // One existing file is enough: later missing shards are counted by
        // the loader, but a pattern with none is surely a wrong path.
        if !files.iter().any(|f| f.is_file()) {
            return Err(Error::Config(format!(
                "shard pattern `{pattern}` matches no existing file ({} names tried)",
                files.len()
            )));
        }
        sources.push(SourceSpec {
            pattern: pattern.to_string(),
            files,
            weight,
        });
    }
    Ok(sources)
}

fn parse_weights(w: &str, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for item in w.split("::").map(str::trim) {
        let v: f64 = item
            .parse()
            .map_err(|_| Error::Config(format!("upsampling factor `{item}` is not a number")))?;
        if !v.is_finite() || v < 0.0 {
            return Err(Error::Config(format!(
                "upsampling factor `{item}` must be finite and >= 0"
            )));
        }
        out.push(v);
    }
    if out.len() != n {
        return Err(Error::Config(format!(
            "{} upsampling factors given for {n} data sources (`{w}`)",
            out.len()
        )));
    }
    if out.iter().all(|&v| v == 0.0) {
        return Err(Error::Config(format!(
            "upsampling factors `{w}` are all zero"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ranges_keep_padding() {
        let v = expand("/data/laion/{00000..41455}.tar").unwrap();
        assert_eq!(v.len(), 41456);
        assert_eq!(v[0], "/data/laion/00000.tar");
        assert_eq!(v[41455], "/data/laion/41455.tar");
        assert_eq!(expand("{8..11}").unwrap(), ["8", "9", "10", "11"]);
        assert_eq!(expand("{08..11}").unwrap(), ["08", "09", "10", "11"]);
        assert_eq!(expand("{0..12..5}").unwrap(), ["0", "5", "10"]);
        assert_eq!(expand("{3..1}").unwrap(), ["3", "2", "1"]);
        assert_eq!(expand("{7..7}").unwrap(), ["7"]);
        assert_eq!(expand("{a..d..2}").unwrap(), ["a", "c"]);
    }

    #[test]
    fn lists_and_several_braces() {
        assert_eq!(
            expand("x{a,b}-{1..2}.tar").unwrap(),
            ["xa-1.tar", "xa-2.tar", "xb-1.tar", "xb-2.tar"]
        );
        assert_eq!(expand("{a,b{1,2}}").unwrap(), ["a", "b1", "b2"]);
        assert_eq!(expand("plain.tar").unwrap(), ["plain.tar"]);
        assert_eq!(expand("{,x}y").unwrap(), ["y", "xy"]);
    }

    #[test]
    fn malformed_braces_are_errors() {
        for bad in [
            "a{1..3",
            "a}b",
            "{}",
            "{abc}",
            "{1..x}",
            "{1..2..3..4}",
            "{0..20000000}",
        ] {
            let e = expand(bad).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    fn temp_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn sources_and_weights() {
        let d_tmp = temp_dir();
        let d = d_tmp.path();
        for f in ["a0.tar", "a1.tar", "b0.tar"] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        let spec = format!("{0}/a{{0..1}}.tar::{0}/b{{0..2}}.tar", d.display());
        let s = parse_sources(&spec, Some("1::0.5")).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].files.len(), 2);
        // Missing b1, b2 are kept: the loader counts them when opened.
        assert_eq!(s[1].files.len(), 3);
        assert_eq!((s[0].weight, s[1].weight), (1.0, 0.5));
        assert_eq!(parse_sources(&spec, None).unwrap()[1].weight, 1.0);

        let count = parse_sources(&spec, Some("1")).unwrap_err().to_string();
        assert!(
            count.contains("1 upsampling factors given for 2"),
            "{count}"
        );
        let neg = parse_sources(&spec, Some("1::-2")).unwrap_err().to_string();
        assert!(neg.contains("-2"), "{neg}");
        assert!(parse_sources(&spec, Some("0::0")).is_err());
        let none = format!("{}/zz{{0..3}}.tar", d.display());
        let e = parse_sources(&none, None).unwrap_err().to_string();
        assert!(e.contains(&none) && e.contains("no existing file"), "{e}");
        assert!(parse_sources(&format!("{spec}::"), None).is_err());
    }
}
