//! WebDataset tar shards, as img2dataset writes them and OpenCLIP reads them.
//!
//! A sample is a run of consecutive tar members sharing a key: the member
//! path up to the first `.` of its basename (webdataset's `base_plus_ext`).
//! The image comes from `jpg|jpeg|png|webp`, the caption from `txt`; other
//! members (`json`, `cls`, ...) are skipped without being buffered. Shards may
//! be gzip-compressed (`.tar.gz`, `.tgz`; detected from the magic bytes).
//! Classification shards ([`SampleTarget::Label`], clip_benchmark's `wds_*`
//! sets) label each image with a `cls` member instead: a decimal class index.
//!
//! The tar stream is walked block by block with `tar::Header` doing the
//! header parsing, because `tar::Archive::entries` borrows the archive and so
//! cannot back an owned, streaming iterator. Resampling follows OpenCLIP's
//! `expand_urls` + `ResampledShards2`: every shard carries its source's
//! upsampling factor as its weight.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::brace::{SourceSpec, parse_sources};
use super::{DataStats, ImagePayload, RawSample, ShardSource};
use crate::rng::Rng;
use crate::{Error, Result};

const BLOCK: usize = 512;
/// Largest member we buffer; a larger size means a corrupt header.
const MAX_MEMBER: u64 = 1 << 30;

/// What a sample needs besides its image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SampleTarget {
    /// A non-empty `txt` caption: image–text data.
    #[default]
    Caption,
    /// A `cls` class index in decimal text (webdataset's `cls` decoder);
    /// a `txt` member, if any, is kept as the caption.
    Label,
}

/// WebDataset shards of one or more weighted sources.
#[derive(Debug, Clone)]
pub struct WebDataset {
    sources: Vec<SourceSpec>,
    target: SampleTarget,
    files: Vec<PathBuf>,
    /// Shard index where each source starts, plus the total at the end.
    bounds: Vec<usize>,
    /// Running sum of `weight × shards` per source, for [`Self::draw_shard`].
    cumulative: Vec<f64>,
}

impl WebDataset {
    /// The shards of `sources`, in order.
    pub fn new(sources: Vec<SourceSpec>) -> Result<Self> {
        let mut bounds = vec![0];
        let mut cumulative = Vec::with_capacity(sources.len());
        let mut files = Vec::new();
        let mut total = 0.0;
        for s in &sources {
            if !s.weight.is_finite() || s.weight < 0.0 {
                return Err(Error::Config(format!(
                    "weight {} of `{}` must be >= 0",
                    s.weight, s.pattern
                )));
            }
            files.extend(s.files.iter().cloned());
            bounds.push(files.len());
            total += s.weight * s.files.len() as f64;
            cumulative.push(total);
        }
        if files.is_empty() || !(total > 0.0 && total.is_finite()) {
            return Err(Error::Config("no shards with a positive weight".into()));
        }
        Ok(Self {
            sources,
            target: SampleTarget::Caption,
            files,
            bounds,
            cumulative,
        })
    }

    /// The same shards, read for `target`: captions (the default) or
    /// class labels.
    pub fn with_target(mut self, target: SampleTarget) -> Self {
        self.target = target;
        self
    }

    /// Parses an OpenCLIP `--train-data` spec and optional
    /// `--train-data-upsampling-factors` (see [`parse_sources`]).
    pub fn from_spec(spec: &str, weights: Option<&str>) -> Result<Self> {
        Self::new(parse_sources(spec, weights)?)
    }

    /// The sources, in order.
    pub fn sources(&self) -> &[SourceSpec] {
        &self.sources
    }

    /// Shard index where each source starts, plus the shard count at the
    /// end: source `s` owns shards `bounds[s]..bounds[s + 1]`.
    pub fn source_bounds(&self) -> &[usize] {
        &self.bounds
    }

    /// The resampling weight of every shard: its source's upsampling factor.
    pub fn shard_weights(&self) -> Vec<f64> {
        let mut w = Vec::with_capacity(self.files.len());
        for s in &self.sources {
            w.extend(std::iter::repeat_n(s.weight, s.files.len()));
        }
        w
    }

    /// Draws a shard with probability proportional to its weight, as
    /// OpenCLIP's `--dataset-resampled`: a source with probability
    /// ∝ `weight × shards`, then a shard uniformly inside it.
    pub fn draw_shard(&self, rng: &mut Rng) -> usize {
        let total = *self.cumulative.last().expect("new() rejects zero sources");
        let x = rng.uniform() * total;
        let s = match self.cumulative.partition_point(|&c| c <= x) {
            s if s < self.cumulative.len() => s,
            // `x` rounded up to `total`: the last source with weight.
            _ => self.cumulative.partition_point(|&c| c < total),
        };
        self.bounds[s] + rng.below(self.bounds[s + 1] - self.bounds[s])
    }
}

impl ShardSource for WebDataset {
    fn num_shards(&self) -> usize {
        self.files.len()
    }

    fn draw_shard(&self, rng: &mut Rng) -> usize {
        WebDataset::draw_shard(self, rng)
    }

    fn shard_name(&self, i: usize) -> String {
        self.files
            .get(i)
            .map_or_else(|| format!("<shard {i}>"), |p| p.display().to_string())
    }

    fn open<'a>(
        &'a self,
        i: usize,
        stats: &'a DataStats,
    ) -> Result<Box<dyn Iterator<Item = RawSample> + Send + 'a>> {
        let path = self.files.get(i).ok_or_else(|| {
            Error::Config(format!(
                "shard {i} out of range ({} shards)",
                self.files.len()
            ))
        })?;
        let mut file =
            BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| Error::io(path, e))?);
        let gzip = file
            .fill_buf()
            .map_err(|e| Error::io(path, e))?
            .starts_with(&[0x1f, 0x8b]);
        let reader: Box<dyn Read + Send> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        Ok(Box::new(Samples {
            members: TarMembers { reader },
            target: self.target,
            shard: name,
            path,
            pending: None,
            stats,
            done: false,
        }))
    }
}

/// One tar member; `data` is `None` for members the caller did not want.
struct Member {
    path: String,
    data: Option<Vec<u8>>,
}

/// Regular-file members of a tar stream, one at a time.
struct TarMembers<R> {
    reader: R,
}

impl<R: Read> TarMembers<R> {
    /// The next regular file, or `None` at the end of the archive.
    fn next(&mut self, wanted: impl Fn(&str) -> bool) -> io::Result<Option<Member>> {
        let mut long_name: Option<String> = None;
        loop {
            let mut block = [0u8; BLOCK];
            match read_full(&mut self.reader, &mut block)? {
                // A missing end marker is tolerated, as Python's tarfile does.
                0 => return Ok(None),
                BLOCK => {}
                _ => return Err(corrupt("truncated header")),
            }
            if block.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            let header = tar::Header::from_byte_slice(&block);
            let sum: u32 = block
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    if (148..156).contains(&i) {
                        32
                    } else {
                        b as u32
                    }
                })
                .sum();
            if header.cksum()? != sum {
                return Err(corrupt("header checksum mismatch"));
            }
            let size = header.entry_size()?;
            if size > MAX_MEMBER {
                return Err(corrupt("member larger than 1 GiB"));
            }
            let kind = header.entry_type();
            let path = long_name
                .take()
                .unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
            if kind.is_gnu_longname() || kind.is_pax_local_extensions() {
                let data = self.read_data(size, true)?.unwrap_or_default();
                long_name = if kind.is_gnu_longname() {
                    Some(
                        String::from_utf8_lossy(data.split(|&b| b == 0).next().unwrap_or(&[]))
                            .into_owned(),
                    )
                } else {
                    pax_path(&data)
                };
                continue;
            }
            let is_file = kind.is_file() || kind.is_contiguous();
            let data = self.read_data(size, is_file && wanted(&path))?;
            if is_file {
                return Ok(Some(Member { path, data }));
            }
        }
    }

    /// Reads (or skips) `size` bytes of data and the padding after them.
    fn read_data(&mut self, size: u64, keep: bool) -> io::Result<Option<Vec<u8>>> {
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let mut body = (&mut self.reader).take(padded);
        let data = if keep {
            let mut buf = Vec::with_capacity(size as usize);
            (&mut body).take(size).read_to_end(&mut buf)?;
            Some(buf)
        } else {
            None
        };
        let skipped = io::copy(&mut body, &mut io::sink())?;
        let read = data.as_ref().map_or(0, |d| d.len() as u64) + skipped;
        if read != padded {
            return Err(corrupt("truncated member"));
        }
        Ok(data)
    }
}

fn pax_path(data: &[u8]) -> Option<String> {
    tar::PaxExtensions::new(data)
        .filter_map(|e| e.ok())
        .find(|e| e.key() == Ok("path"))
        .map(|e| String::from_utf8_lossy(e.value_bytes()).into_owned())
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The member's role in a sample, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Image,
    Caption,
    Label,
    Other,
}

/// webdataset's `base_plus_ext`: key up to the first `.` of the basename.
fn split_key(path: &str) -> Option<(&str, Role)> {
    let start = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[start..].find('.').filter(|&d| d > 0)? + start;
    let role = match path[dot + 1..].to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" | "png" | "webp" => Role::Image,
        "txt" => Role::Caption,
        "cls" => Role::Label,
        _ => Role::Other,
    };
    Some((&path[..dot], role))
}

/// The members of one key seen so far.
struct Group {
    key: String,
    image: Option<Vec<u8>>,
    caption: Option<Vec<u8>>,
    label: Option<Vec<u8>>,
}

impl Group {
    fn add(&mut self, role: Role, data: Option<Vec<u8>>) {
        // The first image, caption and label win; webdataset rejects
        // duplicates, but one bad sample should not cost the rest of the
        // shard.
        match role {
            Role::Image if self.image.is_none() => self.image = data,
            Role::Caption if self.caption.is_none() => self.caption = data,
            Role::Label if self.label.is_none() => self.label = data,
            _ => {}
        }
    }
}

/// The samples of one open shard.
struct Samples<'a> {
    members: TarMembers<Box<dyn Read + Send>>,
    target: SampleTarget,
    shard: String,
    path: &'a Path,
    /// The first member of the next sample, read while closing the last.
    pending: Option<Member>,
    stats: &'a DataStats,
    done: bool,
}

impl Samples<'_> {
    /// The group's sample, or `None` (counted in `bad_captions`) if it
    /// lacks the image or what [`SampleTarget`] asks for.
    fn finish(&self, g: Group) -> Option<RawSample> {
        let caption = g
            .caption
            .and_then(|c| String::from_utf8(c).ok())
            .map(|c| c.trim().to_string());
        let label = g
            .label
            .and_then(|l| String::from_utf8(l).ok())
            .and_then(|l| l.trim().parse::<usize>().ok());
        let (caption, label) = match (self.target, caption, label) {
            (SampleTarget::Caption, Some(c), _) if !c.is_empty() => (Some(c), None),
            (SampleTarget::Label, c, Some(l)) => (Some(c.unwrap_or_default()), Some(l)),
            _ => (None, None),
        };
        match (g.image, caption) {
            (Some(image), Some(caption)) => Some(RawSample {
                key: format!("{}/{}", self.shard, g.key),
                image: ImagePayload::Encoded(image),
                caption,
                label,
            }),
            _ => {
                DataStats::bump(&self.stats.bad_captions);
                None
            }
        }
    }
}

impl Iterator for Samples<'_> {
    type Item = RawSample;

    fn next(&mut self) -> Option<RawSample> {
        let target = self.target;
        let wanted = |p: &str| match split_key(p) {
            Some((_, Role::Image | Role::Caption)) => true,
            Some((_, Role::Label)) => target == SampleTarget::Label,
            _ => false,
        };
        while !self.done {
            let mut group: Option<Group> = None;
            loop {
                let next = match self.pending.take() {
                    Some(m) => Ok(Some(m)),
                    None => self.members.next(wanted),
                };
                let member = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        self.done = true;
                        break;
                    }
                    Err(e) => {
                        self.stats.warn_shard(
                            &self.path.display().to_string(),
                            &format!("{e}; keeping the samples read before it"),
                        );
                        DataStats::bump(&self.stats.bad_shards);
                        self.done = true;
                        break;
                    }
                };
                let Some((key, role)) = split_key(&member.path) else {
                    continue;
                };
                match &mut group {
                    Some(g) if g.key != key => {
                        self.pending = Some(member);
                        break;
                    }
                    Some(g) => g.add(role, member.data),
                    None => {
                        let mut g = Group {
                            key: key.to_string(),
                            image: None,
                            caption: None,
                            label: None,
                        };
                        g.add(role, member.data);
                        group = Some(g);
                    }
                }
            }
            if let Some(sample) = group.and_then(|g| self.finish(g)) {
                return Some(sample);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn tar_bytes(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn one_shard(path: &Path) -> WebDataset {
        WebDataset::new(vec![SourceSpec {
            pattern: String::new(),
            files: vec![path.into()],
            weight: 1.0,
        }])
        .unwrap()
    }

    fn read(ds: &WebDataset, stats: &DataStats) -> Vec<(String, String, Vec<u8>)> {
        let it = ds.open(0, stats).unwrap();
        it.map(|s| match s.image {
            ImagePayload::Encoded(b) => (s.key, s.caption, b),
            ImagePayload::Decoded(_) => panic!("shards yield encoded images"),
        })
        .collect()
    }

    const LONG: &str = "a-very-long-directory-name-that-needs-a-gnu-long-name-header/and-more-of-it-to-pass-one-hundred-bytes/k9";

    fn good_members() -> Vec<(String, Vec<u8>)> {
        let long_jpg = format!("{LONG}.jpg");
        let long_txt = format!("{LONG}.txt");
        [
            ("000.jpg", &b"JPEG0"[..]),
            ("000.txt", b"a cat"),
            ("000.json", b"{}"),
            ("001.PNG", b"PNG1"),
            ("001.txt", b"  a dog \n"),
            ("001.cls", b"3"),
            ("d/002.seg.png", b"MASK"),
            ("d/002.webp", b"WEBP2"),
            ("d/002.txt", b"a bird"),
            (&long_jpg, b"JPEG9"),
            (&long_txt, b"long"),
        ]
        .iter()
        .map(|(n, d)| (n.to_string(), d.to_vec()))
        .collect()
    }

    fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) -> Vec<u8> {
        let refs: Vec<(&str, &[u8])> = members
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        let bytes = tar_bytes(&refs);
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    #[test]
    fn groups_members_by_key_and_ignores_others() {
        let d_tmp = dir();
        let d = d_tmp.path();
        let path = d.join("s.tar");
        write_tar(&path, &good_members());
        let stats = DataStats::default();
        let ds = one_shard(&path);
        let got = read(&ds, &stats);
        let keys: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(keys[..3], ["s.tar/000", "s.tar/001", "s.tar/d/002"]);
        assert_eq!(keys[3], format!("s.tar/{LONG}"));
        assert_eq!(
            (got[0].1.as_str(), got[0].2.as_slice()),
            ("a cat", &b"JPEG0"[..])
        );
        assert_eq!(
            (got[1].1.as_str(), got[1].2.as_slice()),
            ("a dog", &b"PNG1"[..])
        );
        assert_eq!(got[2].2, b"WEBP2");
        assert_eq!(stats.snapshot(), Default::default());
        // Re-opening yields the same samples in the same order.
        assert_eq!(read(&ds, &stats), got);
        // The same shard gzip-compressed.
        let gz = d.join("s.tar.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &std::fs::read(&path).unwrap()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let from_gz: Vec<_> = read(&one_shard(&gz), &stats)
            .into_iter()
            .map(|g| g.2)
            .collect();
        assert_eq!(from_gz, got.iter().map(|g| g.2.clone()).collect::<Vec<_>>());
    }

    #[test]
    fn samples_without_image_or_caption_are_counted() {
        let d_tmp = dir();
        let d = d_tmp.path();
        let path = d.join("s.tar");
        let members: Vec<(String, Vec<u8>)> = [
            ("0.jpg", &b"I"[..]),
            ("1.jpg", b"I"),
            ("1.txt", b"  \n"),
            ("2.txt", b"only text"),
            ("2.json", b"{}"),
            ("3.jpg", b"I"),
            ("3.txt", &[0xff, 0xfe]),
            ("4.png", b"I"),
            ("4.txt", b"ok"),
        ]
        .iter()
        .map(|(n, d)| (n.to_string(), d.to_vec()))
        .collect();
        write_tar(&path, &members);
        let stats = DataStats::default();
        let got = read(&one_shard(&path), &stats);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "s.tar/4");
        assert_eq!(stats.bad_captions.load(Relaxed), 4);
        assert_eq!(stats.bad_shards.load(Relaxed), 0);
    }

    #[test]
    fn label_target_reads_cls_and_counts_bad_labels() {
        let d_tmp = dir();
        let d = d_tmp.path();
        let path = d.join("0.tar");
        let members: Vec<(String, Vec<u8>)> = [
            ("s0000000.png", &b"I0"[..]),
            ("s0000000.cls", b"3\n"),
            ("s0000001.webp", b"I1"),
            ("s0000001.cls", b"x"),
            ("s0000002.cls", b"1"),
            ("s0000003.jpg", b"I3"),
            ("s0000004.jpg", b"I4"),
            ("s0000004.cls", b"12"),
            ("s0000004.txt", b"a caption"),
        ]
        .iter()
        .map(|(n, d)| (n.to_string(), d.to_vec()))
        .collect();
        write_tar(&path, &members);
        let stats = DataStats::default();
        let ds = one_shard(&path).with_target(SampleTarget::Label);
        let got: Vec<(String, Option<usize>, String)> = ds
            .open(0, &stats)
            .unwrap()
            .map(|s| (s.key, s.label, s.caption))
            .collect();
        assert_eq!(
            got,
            [
                ("0.tar/s0000000".to_string(), Some(3), String::new()),
                ("0.tar/s0000004".to_string(), Some(12), "a caption".into()),
            ]
        );
        // A bad label, no image, no label.
        assert_eq!(stats.bad_captions.load(Relaxed), 3);
        // Read for captions, the same shard has one sample.
        let stats = DataStats::default();
        assert_eq!(read(&one_shard(&path), &stats).len(), 1);
    }

    #[test]
    fn truncated_or_corrupt_tar_keeps_what_was_read() {
        let d_tmp = dir();
        let d = d_tmp.path();
        let path = d.join("s.tar");
        let full = write_tar(&path, &good_members());
        // Cut inside the data of `d/002.seg.png` (7th member, after 6 × 1024 bytes
        // of header + padded data).
        std::fs::write(&path, &full[..6 * 1024 + 512 + 3]).unwrap();
        let stats = DataStats::default();
        let got = read(&one_shard(&path), &stats);
        assert_eq!(got.len(), 2);
        assert_eq!(stats.bad_shards.load(Relaxed), 1);
        // A flipped byte in the third header fails its checksum.
        let mut bad = full.clone();
        bad[2 * 1024 + 5] ^= 0x55;
        std::fs::write(&path, &bad).unwrap();
        let stats = DataStats::default();
        let got = read(&one_shard(&path), &stats);
        assert_eq!(
            got.len(),
            1,
            "000's json member was the corrupt one; 000 still complete"
        );
        assert_eq!(stats.bad_shards.load(Relaxed), 1);
        // A missing file is an error at open.
        let missing = one_shard(&d.join("nope.tar"));
        assert!(matches!(missing.open(0, &stats), Err(Error::Io { .. })));
    }

    #[test]
    fn resampling_follows_openclip_weights() {
        let src = |n: usize, weight: f64| SourceSpec {
            pattern: String::new(),
            files: (0..n).map(|i| PathBuf::from(format!("{i}.tar"))).collect(),
            weight,
        };
        let ds = WebDataset::new(vec![src(2, 1.0), src(3, 0.5), src(4, 0.0)]).unwrap();
        assert_eq!(ds.source_bounds(), [0, 2, 5, 9]);
        assert_eq!(
            ds.shard_weights(),
            [1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
        );
        let mut rng = Rng::new(5);
        let n = 70_000;
        let mut counts = [0usize; 9];
        for _ in 0..n {
            counts[ds.draw_shard(&mut rng)] += 1;
        }
        // Shard probabilities 1/3.5 and 0.5/3.5: expected 20 000 (sd ≈ 120)
        // and 10 000 (sd ≈ 93); the weight-0 source is never drawn.
        for (i, &c) in counts.iter().enumerate() {
            let expect = [20_000, 20_000, 10_000, 10_000, 10_000, 0, 0, 0, 0][i];
            assert!((c as i64 - expect).abs() < 600, "{counts:?}");
        }
        assert!(WebDataset::new(vec![src(2, 0.0)]).is_err());
    }
}
