//! CSV/TSV caption files, as OpenCLIP's `CsvDataset` reads them
//! (`src/open_clip_train/data.py`: `--csv-img-key filepath
//! --csv-caption-key title --csv-separator`).
//!
//! OpenCLIP loads the whole table with pandas; here one indexing pass
//! records the byte offset of every `rows_per_shard`-th record, and a shard
//! is opened by seeking there, so a file of any size streams in constant
//! memory. Quoting (separators and newlines inside quotes) is the `csv`
//! crate's. Image paths are relative to the CSV's folder unless absolute.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{DataStats, ImagePayload, RawSample, ShardSource};
use crate::{Error, Result};

/// How to read a caption table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    /// Column holding image paths (OpenCLIP `--csv-img-key`).
    pub img_key: String,
    /// Column holding captions (OpenCLIP `--csv-caption-key`).
    pub caption_key: String,
    /// Field separator; `None` picks tab for `.tsv`/`.tab` files and comma
    /// otherwise.
    pub separator: Option<u8>,
    /// Rows per shard: the unit loader workers open independently.
    pub rows_per_shard: usize,
}

impl Default for CsvOptions {
    /// OpenCLIP's column names, 4096 rows per shard.
    fn default() -> Self {
        Self {
            img_key: "filepath".into(),
            caption_key: "title".into(),
            separator: None,
            rows_per_shard: 4096,
        }
    }
}

/// An indexed CSV/TSV caption file.
#[derive(Debug, Clone)]
pub struct CsvDataset {
    path: PathBuf,
    /// The folder relative image paths are resolved against.
    root: PathBuf,
    separator: u8,
    img_col: usize,
    caption_col: usize,
    /// Byte offset of the first record of each shard.
    offsets: Vec<u64>,
    rows: usize,
    rows_per_shard: usize,
}

impl CsvDataset {
    /// Reads the header and indexes the file in one streaming pass.
    pub fn open(path: &Path, opts: &CsvOptions) -> Result<Self> {
        if opts.rows_per_shard == 0 {
            return Err(Error::Config("rows_per_shard must be positive".into()));
        }
        let separator = opts.separator.unwrap_or_else(|| {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext.eq_ignore_ascii_case("tsv") || ext.eq_ignore_ascii_case("tab") {
                b'\t'
            } else {
                b','
            }
        });
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = reader(BufReader::new(file), separator, true);
        let header = reader.headers().map_err(|e| csv_error(path, e))?.clone();
        let column = |name: &str| {
            header.iter().position(|h| h == name).ok_or_else(|| {
                let names: Vec<&str> = header.iter().collect();
                Error::Config(format!(
                    "column `{name}` not in {} (columns: {})",
                    path.display(),
                    names.join(", ")
                ))
            })
        };
        let (img_col, caption_col) = (column(&opts.img_key)?, column(&opts.caption_key)?);
        let mut offsets = Vec::new();
        let mut record = ::csv::ByteRecord::new();
        let mut rows = 0usize;
        while reader
            .read_byte_record(&mut record)
            .map_err(|e| csv_error(path, e))?
        {
            if rows.is_multiple_of(opts.rows_per_shard) {
                offsets.push(record.position().map_or(0, ::csv::Position::byte));
            }
            rows += 1;
        }
        if rows == 0 {
            return Err(Error::Format {
                path: path.into(),
                reason: "no rows after the header".into(),
            });
        }
        let root = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self {
            path: path.into(),
            root,
            separator,
            img_col,
            caption_col,
            offsets,
            rows,
            rows_per_shard: opts.rows_per_shard,
        })
    }

    /// Number of data rows (header excluded).
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// The field separator in use.
    pub fn separator(&self) -> u8 {
        self.separator
    }
}

fn reader<R: std::io::Read>(r: R, separator: u8, headers: bool) -> ::csv::Reader<R> {
    // Flexible: a short row is one bad sample, not a failed file.
    ::csv::ReaderBuilder::new()
        .delimiter(separator)
        .has_headers(headers)
        .flexible(true)
        .from_reader(r)
}

fn csv_error(path: &Path, e: ::csv::Error) -> Error {
    match e.into_kind() {
        ::csv::ErrorKind::Io(io) => Error::io(path, io),
        other => Error::Format {
            path: path.into(),
            reason: format!("{other:?}"),
        },
    }
}

impl ShardSource for CsvDataset {
    fn num_shards(&self) -> usize {
        self.offsets.len()
    }

    fn shard_name(&self, i: usize) -> String {
        format!("{} rows {}..", self.path.display(), i * self.rows_per_shard)
    }

    fn open<'a>(
        &'a self,
        i: usize,
        stats: &'a DataStats,
    ) -> Result<Box<dyn Iterator<Item = RawSample> + Send + 'a>> {
        let offset = *self.offsets.get(i).ok_or_else(|| {
            Error::Config(format!(
                "shard {i} out of range ({} shards)",
                self.offsets.len()
            ))
        })?;
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&self.path, e))?;
        let mut reader = reader(BufReader::new(file), self.separator, false);
        let count = self.rows_per_shard.min(self.rows - i * self.rows_per_shard);
        let mut record = ::csv::ByteRecord::new();
        let mut left = count;
        Ok(Box::new(std::iter::from_fn(move || {
            while left > 0 {
                left -= 1;
                match reader.read_byte_record(&mut record) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        // The file changed or broke after indexing.
                        DataStats::bump(&stats.bad_shards);
                        left = 0;
                        return None;
                    }
                }
                if let Some(sample) = self.sample(&record, stats) {
                    return Some(sample);
                }
            }
            None
        })))
    }
}

impl CsvDataset {
    /// The row's sample, or `None` (counted) for a bad caption or image.
    fn sample(&self, record: &::csv::ByteRecord, stats: &DataStats) -> Option<RawSample> {
        let caption = record
            .get(self.caption_col)
            .and_then(|c| std::str::from_utf8(c).ok())
            .map(str::trim)
            .filter(|c| !c.is_empty());
        let (Some(caption), Some(img)) = (caption, record.get(self.img_col)) else {
            DataStats::bump(&stats.bad_captions);
            return None;
        };
        let image_path = self.root.join(String::from_utf8_lossy(img).as_ref());
        match std::fs::read(&image_path) {
            Ok(bytes) => Some(RawSample {
                key: image_path.display().to_string(),
                image: ImagePayload::Encoded(bytes),
                caption: caption.to_string(),
                label: None,
            }),
            Err(_) => {
                DataStats::bump(&stats.bad_images);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn dir() -> tempfile::TempDir {
        let d_tmp = tempfile::tempdir().unwrap();

        let d = d_tmp.path();
        std::fs::create_dir_all(d.join("img")).unwrap();
        for f in ["a", "b", "c"] {
            std::fs::write(d.join("img").join(format!("{f}.jpg")), f.as_bytes()).unwrap();
        }
        d_tmp
    }

    fn all(ds: &CsvDataset, stats: &DataStats) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for i in 0..ds.num_shards() {
            out.extend(ds.open(i, stats).unwrap().map(|s| match s.image {
                ImagePayload::Encoded(b) => (s.caption, b),
                ImagePayload::Decoded(_) => panic!("csv yields encoded images"),
            }));
        }
        out
    }

    #[test]
    fn csv_with_quotes_in_small_shards() {
        let d_tmp = dir();
        let d = d_tmp.path();
        let abs = d.join("img/c.jpg");
        let text = format!(
            "filepath,title\nimg/a.jpg,\"a cat, sitting\"\nimg/b.jpg,\"two\nlines \"\"quoted\"\"\"\n\
             {},absolute\nimg/missing.jpg,gone\nimg/a.jpg,\"  \"\nimg/b.jpg\n",
            abs.display()
        );
        std::fs::write(d.join("caps.csv"), text).unwrap();
        let opts = CsvOptions {
            rows_per_shard: 2,
            ..Default::default()
        };
        let ds = CsvDataset::open(&d.join("caps.csv"), &opts).unwrap();
        assert_eq!(
            (ds.num_rows(), ds.num_shards(), ds.separator()),
            (6, 3, b',')
        );
        let stats = DataStats::default();
        let got = all(&ds, &stats);
        let captions: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(
            captions,
            ["a cat, sitting", "two\nlines \"quoted\"", "absolute"]
        );
        assert_eq!(got[2].1, b"c");
        assert_eq!(stats.bad_images.load(Relaxed), 1);
        assert_eq!(stats.bad_captions.load(Relaxed), 2);
        // Re-opening a shard yields the same samples.
        let once: Vec<String> = ds.open(1, &stats).unwrap().map(|s| s.key).collect();
        let twice: Vec<String> = ds.open(1, &stats).unwrap().map(|s| s.key).collect();
        assert_eq!((once.len(), &once), (1, &twice));
    }

    #[test]
    fn tsv_by_extension_and_missing_column() {
        let d_tmp = dir();
        let d = d_tmp.path();
        let text = "id\ttitle\textra\tfilepath\n1\ta, b\tx\timg/b.jpg\n2\t\"q\tq\"\ty\timg/a.jpg\n";
        std::fs::write(d.join("caps.tsv"), text).unwrap();
        let ds = CsvDataset::open(&d.join("caps.tsv"), &CsvOptions::default()).unwrap();
        let stats = DataStats::default();
        assert_eq!(
            all(&ds, &stats),
            [
                ("a, b".to_string(), b"b".to_vec()),
                ("q\tq".to_string(), b"a".to_vec())
            ]
        );
        let opts = CsvOptions {
            caption_key: "caption".into(),
            ..Default::default()
        };
        let e = CsvDataset::open(&d.join("caps.tsv"), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`caption`") && e.contains("columns: id, title, extra, filepath"),
            "{e}"
        );
        // A comma separator on the TSV finds no `title` column.
        let comma = CsvOptions {
            separator: Some(b','),
            ..Default::default()
        };
        assert!(CsvDataset::open(&d.join("caps.tsv"), &comma).is_err());
    }
}
