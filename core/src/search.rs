//! Exact top-k cosine search over an `embed` output file (`clipa search`).
//!
//! `clipa embed` writes L2-normalised rows, so the dot product is the
//! cosine and exact search is one pass over the matrix, as FAISS's
//! `IndexFlatIP` does it: memory bandwidth bounds it (a million 512-d rows
//! are 2 GB a query). The pass runs in chunks of rows; one thread per core
//! claims the next chunk and keeps its k best in a bounded heap, so the
//! working memory is O(threads × (chunk + k)), and a file is streamed from
//! disk chunk by chunk instead of being loaded whole. Ties rank the lower
//! row first, so the results do not depend on the threads' schedule.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{self, AtomicUsize};

use safetensors::Dtype;
use safetensors::tensor::Metadata;
use serde::Serialize;

use crate::{Error, Result};

/// Rows per chunk of an in-memory search: 16 MiB of 512-d rows, large
/// enough that claiming a chunk costs nothing, small next to the matrix.
pub const CHUNK_ROWS: usize = 8192;

/// Bytes per chunk of a file search (rounded down to whole rows): one read
/// call, converted to f32 a row at a time while it is in cache.
const FILE_CHUNK_BYTES: usize = 4 << 20;

/// Which matrix of an `embed` file to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Against {
    /// `image_features`, named by `image_names`.
    #[default]
    Images,
    /// `text_features`, named by the captions in `texts`.
    Texts,
}

impl Against {
    /// The tensor that holds this matrix.
    pub fn tensor(self) -> &'static str {
        match self {
            Self::Images => "image_features",
            Self::Texts => "text_features",
        }
    }

    /// The metadata key of the rows' names (a JSON list of strings).
    fn names_key(self) -> &'static str {
        match self {
            Self::Images => "image_names",
            Self::Texts => "texts",
        }
    }

    /// The `clipa embed` flag that writes this matrix.
    fn embed_flag(self) -> &'static str {
        match self {
            Self::Images => "--images",
            Self::Texts => "--texts",
        }
    }
}

impl std::fmt::Display for Against {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Images => "images",
            Self::Texts => "texts",
        })
    }
}

/// One result: a row of the matrix and its cosine with the query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Hit {
    /// The row (the image's or caption's position in the file).
    pub index: usize,
    /// Dot product with the query: the cosine, for unit rows.
    pub score: f32,
}

impl Hit {
    /// Rank order, `Less` for the hit that ranks first: the higher score,
    /// NaN below every number, and on a tie the lower index.
    pub fn rank_cmp(&self, other: &Self) -> Ordering {
        let by_score = match (self.score.is_nan(), other.score.is_nan()) {
            (false, false) => other
                .score
                .partial_cmp(&self.score)
                .expect("neither score is NaN"),
            (a, b) => a.cmp(&b),
        };
        by_score.then(self.index.cmp(&other.index))
    }
}

/// A [`Hit`] ordered by [`Hit::rank_cmp`], for the heap.
struct Ranked(Hit);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.rank_cmp(&other.0)
    }
}

/// The `k` best hits offered so far: a max-heap in rank order, so its top
/// is the worst hit kept and the one a better hit replaces.
struct TopK {
    k: usize,
    heap: BinaryHeap<Ranked>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k),
        }
    }

    #[inline]
    fn offer(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(Ranked(hit));
        } else if self
            .heap
            .peek()
            .is_some_and(|worst| hit.rank_cmp(&worst.0) == Ordering::Less)
        {
            *self.heap.peek_mut().expect("k > 0 hits are kept") = Ranked(hit);
        }
    }

    fn merge(mut self, other: Self) -> Self {
        for Ranked(hit) in other.heap {
            self.offer(hit);
        }
        self
    }

    /// The hits, best first.
    fn into_sorted(self) -> Vec<Hit> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.0)
            .collect()
    }
}

/// The dot product of two rows of equal length. Sixteen independent
/// partial sums over fixed-size blocks (`as_chunks`, so no bounds checks)
/// let the compiler keep several SIMD accumulators in flight.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    debug_assert_eq!(a.len(), b.len());
    let (a_blocks, a_tail) = a.as_chunks::<LANES>();
    let (b_blocks, b_tail) = b.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, y) in a_blocks.iter().zip(b_blocks) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Offers every row of `rows` (row-major, `query.len()` wide, the first
/// being row `first` of the matrix) to `best`.
fn scan(rows: &[f32], query: &[f32], first: usize, best: &mut TopK) {
    for (i, row) in rows.chunks_exact(query.len()).enumerate() {
        best.offer(Hit {
            index: first + i,
            score: dot(row, query),
        });
    }
}

/// The worker threads: one per core the process may use.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `chunks` chunks of work on up to `threads` threads, each thread
/// made by `worker` (its buffers, its file handle) and claiming chunks in
/// turn, and merges their top-k. The first error stops the other threads.
fn in_chunks<M, W>(chunks: usize, k: usize, threads: usize, worker: M) -> Result<Vec<Hit>>
where
    M: Fn() -> Result<W> + Sync,
    W: FnMut(usize, &mut TopK) -> Result<()>,
{
    let next = AtomicUsize::new(0);
    let run = || -> Result<TopK> {
        let mut work = worker()?;
        let mut best = TopK::new(k);
        loop {
            let chunk = next.fetch_add(1, atomic::Ordering::Relaxed);
            if chunk >= chunks {
                return Ok(best);
            }
            if let Err(err) = work(chunk, &mut best) {
                next.store(chunks, atomic::Ordering::Relaxed);
                return Err(err);
            }
        }
    };
    let threads = threads.clamp(1, chunks.max(1));
    let tops: Vec<Result<TopK>> = if threads == 1 {
        vec![run()]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(run)).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a search thread does not panic"))
                .collect()
        })
    };
    let mut merged = TopK::new(k);
    for top in tops {
        merged = merged.merge(top?);
    }
    Ok(merged.into_sorted())
}

/// The `k` rows of `matrix` (row-major, `query.len()` wide) with the
/// largest dot product with `query`, best first, ties by lower row; fewer
/// when the matrix has fewer rows. Chunks of [`CHUNK_ROWS`] rows on every
/// core.
///
/// # Panics
/// If `query` is empty or `matrix` is not a whole number of rows.
pub fn top_k(matrix: &[f32], query: &[f32], k: usize) -> Vec<Hit> {
    top_k_chunked(matrix, query, k, CHUNK_ROWS, threads())
}

/// [`top_k`] with the chunk size and thread count chosen; the result does
/// not depend on either.
///
/// # Panics
/// As [`top_k`], and if `chunk_rows` is zero.
pub fn top_k_chunked(
    matrix: &[f32],
    query: &[f32],
    k: usize,
    chunk_rows: usize,
    threads: usize,
) -> Vec<Hit> {
    let dim = query.len();
    assert!(dim > 0, "an empty query");
    assert!(chunk_rows > 0, "chunks of no rows");
    assert_eq!(matrix.len() % dim, 0, "the matrix is not whole rows");
    let chunk_len = chunk_rows * dim;
    let chunks = matrix.len().div_ceil(chunk_len);
    let worker = || {
        Ok(|chunk: usize, best: &mut TopK| {
            let start = chunk * chunk_len;
            let rows = &matrix[start..(start + chunk_len).min(matrix.len())];
            scan(rows, query, chunk * chunk_rows, best);
            Ok(())
        })
    };
    in_chunks(chunks, k, threads, worker).expect("an in-memory search cannot fail")
}

/// The shape of one matrix of an `embed` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatrixShape {
    /// Images or captions.
    pub rows: usize,
    /// Embedding width.
    pub dim: usize,
}

/// An `embed` output file opened for search: its header is read and
/// checked, its matrices stay on disk until searched.
#[derive(Debug)]
pub struct EmbedFile {
    path: PathBuf,
    header: Metadata,
    /// Where the tensor data begins: after the length and the header.
    data_start: u64,
}

impl EmbedFile {
    /// Opens and checks `path`'s safetensors header (the tensors' data
    /// is not read).
    pub fn open(path: &Path) -> Result<Self> {
        let format = |reason: String| Error::Format {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut n = [0u8; 8];
        let header_len = match file.read_exact(&mut n) {
            Ok(()) => u64::from_le_bytes(n),
            Err(_) => u64::MAX,
        };
        if header_len > len.saturating_sub(8) {
            return Err(format("not a safetensors file: bad header length".into()));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let header: Metadata = serde_json::from_slice(&header)
            .map_err(|e| format(format!("not a safetensors file: {e}")))?;
        let data_end = header
            .tensors()
            .values()
            .map(|t| t.data_offsets.1 as u64)
            .max()
            .unwrap_or(0);
        let data_start = 8 + header_len;
        if data_start + data_end != len {
            return Err(format(format!(
                "the header describes {data_end} bytes of tensors, the file holds {}: truncated?",
                len - data_start
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            header,
            data_start,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn format_err(&self, reason: String) -> Error {
        Error::Format {
            path: self.path.clone(),
            reason,
        }
    }

    /// The shape of the `against` matrix: an error when the file has none,
    /// or one that is not a float32 `[rows, dim]` matrix.
    pub fn shape(&self, against: Against) -> Result<MatrixShape> {
        let name = against.tensor();
        let info = self.header.info(name).ok_or_else(|| {
            self.format_err(format!(
                "has no {name} to search against {against} (`clipa embed {}` writes it)",
                against.embed_flag()
            ))
        })?;
        match (info.dtype, info.shape.as_slice()) {
            (Dtype::F32, &[rows, dim]) if dim > 0 => Ok(MatrixShape { rows, dim }),
            (dtype, shape) => Err(self.format_err(format!(
                "{name} is {dtype:?} {shape:?}, expected a float32 [rows, dim] matrix"
            ))),
        }
    }

    /// The names of the `against` rows (image files, or the captions), in
    /// row order; empty when the file does not record them.
    pub fn names(&self, against: Against) -> Result<Vec<String>> {
        let key = against.names_key();
        let Some(json) = self.header.metadata().as_ref().and_then(|m| m.get(key)) else {
            return Ok(Vec::new());
        };
        let names: Vec<String> = serde_json::from_str(json).map_err(|e| {
            self.format_err(format!("metadata {key} is not a list of strings: {e}"))
        })?;
        let rows = self.shape(against)?.rows;
        if names.len() != rows {
            return Err(self.format_err(format!(
                "metadata {key} names {} rows, {} has {rows}",
                names.len(),
                against.tensor()
            )));
        }
        Ok(names)
    }

    /// The shape of the `against` matrix, as [`Self::shape`], and an
    /// error naming the file when its rows are not `dim` wide (the query's
    /// width: the file was embedded with another checkpoint).
    pub fn shape_for(&self, against: Against, dim: usize) -> Result<MatrixShape> {
        let shape = self.shape(against)?;
        if shape.dim != dim {
            return Err(self.format_err(format!(
                "the query has {dim} values, the rows of {} have {}: \
                 was the file embedded with another checkpoint?",
                against.tensor(),
                shape.dim
            )));
        }
        Ok(shape)
    }

    /// The `k` rows of the `against` matrix nearest `query` (a unit
    /// vector) by cosine, best first, ties by lower row; read from disk in
    /// chunks, on every core. A query of another width is an error.
    pub fn search(&self, against: Against, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let MatrixShape { rows, dim } = self.shape_for(against, query.len())?;
        let info = self
            .header
            .info(against.tensor())
            .expect("shape() found it");
        let offset = self.data_start + info.data_offsets.0 as u64;
        let row_bytes = dim * 4;
        let chunk_rows = (FILE_CHUNK_BYTES / row_bytes).max(1);
        let worker = || {
            // A handle per thread: each seeks on its own.
            let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
            let mut bytes = vec![0u8; chunk_rows * row_bytes];
            let mut row = vec![0f32; dim];
            Ok(move |chunk: usize, best: &mut TopK| {
                let first = chunk * chunk_rows;
                let len = chunk_rows.min(rows - first) * row_bytes;
                let at = offset + (first * row_bytes) as u64;
                file.seek(SeekFrom::Start(at))
                    .and_then(|_| file.read_exact(&mut bytes[..len]))
                    .map_err(|e| Error::io(&self.path, e))?;
                for (i, raw) in bytes[..len].chunks_exact(row_bytes).enumerate() {
                    for (x, b) in row.iter_mut().zip(raw.as_chunks::<4>().0) {
                        *x = f32::from_le_bytes(*b);
                    }
                    best.offer(Hit {
                        index: first + i,
                        score: dot(&row, query),
                    });
                }
                Ok(())
            })
        };
        in_chunks(rows.div_ceil(chunk_rows), k, threads(), worker)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use burn::tensor::TensorData;

    use super::*;
    use crate::rng::Rng;
    use crate::state::StateDict;

    /// `rows` random unit rows of width `dim`, with duplicated rows (exact
    /// ties) every seventh row.
    fn unit_rows(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut m = Vec::with_capacity(rows * dim);
        for r in 0..rows {
            if r % 7 == 6 {
                let copy = m[(r - 3) * dim..(r - 2) * dim].to_vec();
                m.extend(copy);
                continue;
            }
            let row: Vec<f32> = (0..dim).map(|_| rng.range(-1.0, 1.0) as f32).collect();
            let norm = dot(&row, &row).sqrt();
            m.extend(row.iter().map(|x| x / norm));
        }
        m
    }

    /// Every row scored and fully sorted.
    fn brute_force(matrix: &[f32], query: &[f32], k: usize) -> Vec<Hit> {
        let mut all: Vec<Hit> = matrix
            .chunks_exact(query.len())
            .enumerate()
            .map(|(index, row)| Hit {
                index,
                score: dot(row, query),
            })
            .collect();
        all.sort_by(Hit::rank_cmp);
        all.truncate(k);
        all
    }

    #[test]
    fn dot_matches_a_plain_sum_at_every_tail_length() {
        for len in [0, 1, 15, 16, 17, 33, 512] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!((f64::from(dot(&a, &b)) - plain).abs() < 1e-4, "len {len}");
        }
    }

    #[test]
    fn top_k_equals_a_full_sort_with_ties_and_any_chunking() {
        let dim = 24;
        let matrix = unit_rows(301, dim, 1);
        // A query equal to a duplicated row: its two copies tie at the top.
        let query = matrix[3 * dim..4 * dim].to_vec();
        for k in [1, 2, 5, 10, 64] {
            let want = brute_force(&matrix, &query, k);
            assert_eq!(want[0].index, 3);
            for (chunk_rows, threads) in [(1, 1), (3, 2), (7, 3), (64, 2), (1000, 4)] {
                let got = top_k_chunked(&matrix, &query, k, chunk_rows, threads);
                assert_eq!(
                    got, want,
                    "k {k}, chunks of {chunk_rows}, {threads} threads"
                );
            }
        }
        // The tie is broken by the lower row.
        let tied = brute_force(&matrix, &query, 2);
        assert_eq!((tied[0].index, tied[1].index), (3, 6));
        assert_eq!(tied[0].score, tied[1].score);
    }

    #[test]
    fn k_beyond_the_rows_returns_them_all_and_nan_ranks_last() {
        let dim = 8;
        let mut matrix = unit_rows(20, dim, 2);
        matrix[5 * dim] = f32::NAN;
        let query = matrix[..dim].to_vec();
        let got = top_k_chunked(&matrix, &query, 50, 3, 2);
        assert_eq!(got.len(), 20);
        // Bit for bit: NaN is not equal to itself.
        let bits = |hits: &[Hit]| -> Vec<(usize, u32)> {
            hits.iter().map(|h| (h.index, h.score.to_bits())).collect()
        };
        assert_eq!(bits(&got), bits(&brute_force(&matrix, &query, 50)));
        assert_eq!(got[19].index, 5, "the NaN row is last");
        assert!(top_k(&matrix, &query, 0).is_empty());
        assert!(top_k(&[], &query, 3).is_empty());
    }

    fn write_embed(path: &Path, images: &[f32], dim: usize) {
        let rows = images.len() / dim;
        let names: Vec<String> = (0..rows).map(|i| format!("img{i}.png")).collect();
        let mut sd = StateDict::new();
        sd.insert(
            "image_features".into(),
            TensorData::new(images.to_vec(), [rows, dim]),
        );
        let meta = HashMap::from([(
            "image_names".to_string(),
            serde_json::to_string(&names).unwrap(),
        )]);
        crate::io::write_safetensors(path, &sd, meta).unwrap();
    }

    #[test]
    fn a_file_search_streams_the_same_answer() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("e.safetensors");
        // 4 MiB chunks of 512-d rows are 2048 rows: 5000 rows are 3 chunks.
        let dim = 512;
        let matrix = unit_rows(5000, dim, 3);
        write_embed(&path, &matrix, dim);
        let file = EmbedFile::open(&path).unwrap();
        assert_eq!(
            file.shape(Against::Images).unwrap(),
            MatrixShape { rows: 5000, dim }
        );
        let names = file.names(Against::Images).unwrap();
        assert_eq!(names[4999], "img4999.png");
        let query = matrix[2100 * dim..2101 * dim].to_vec();
        let got = file.search(Against::Images, &query, 12).unwrap();
        assert_eq!(got, brute_force(&matrix, &query, 12));
        assert_eq!(got[0].index, 2100);
    }

    #[test]
    fn a_wrong_query_or_a_missing_matrix_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("e.safetensors");
        write_embed(&path, &unit_rows(4, 8, 4), 8);
        let file = EmbedFile::open(&path).unwrap();
        let err = file
            .search(Against::Images, &[1.0; 9], 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("e.safetensors") && err.contains("has 9 values"),
            "{err}"
        );
        let err = file
            .search(Against::Texts, &[1.0; 8], 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("e.safetensors") && err.contains("no text_features"),
            "{err}"
        );
        // Not a safetensors file, a truncated one, a missing one.
        let bad = tmp.path().join("bad.safetensors");
        std::fs::write(&bad, b"not a tensor file").unwrap();
        let err = EmbedFile::open(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("not a safetensors"),
            "{err}"
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&bad, &bytes[..bytes.len() - 4]).unwrap();
        let err = EmbedFile::open(&bad).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let gone = tmp.path().join("gone.safetensors");
        assert!(matches!(EmbedFile::open(&gone), Err(Error::Io { .. })));
    }
}
