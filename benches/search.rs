//! `clipa search`'s inner loop in memory: exact top-10 cosine search of
//! one query over a million 512-d unit rows, on every core and on one.
//! Each query reads the whole 2 GB matrix, so memory bandwidth is the
//! floor; criterion's throughput is that matrix's bytes per second. With
//! `CLIPA_SEARCH_INDEX=FILE` the streamed search of an `embed` file too.

use std::hint::black_box;
use std::sync::OnceLock;

use clipa_core::rng::Rng;
use clipa_core::search::{Against, CHUNK_ROWS, EmbedFile, MatrixShape, top_k, top_k_chunked};
use criterion::{Criterion, Throughput};

const ROWS: usize = 1_000_000;
const DIM: usize = 512;
const TOP: usize = 10;

/// The matrix, `[ROWS, DIM]` random unit rows, and a query; drawn once, on
/// the first bench that runs (a filtered-out run allocates nothing).
fn data() -> &'static (Vec<f32>, Vec<f32>) {
    static DATA: OnceLock<(Vec<f32>, Vec<f32>)> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut rng = Rng::new(0);
        let mut unit = |n: usize| {
            let mut v: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
            for row in v.chunks_exact_mut(DIM) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                row.iter_mut().for_each(|x| *x /= norm);
            }
            v
        };
        (unit(ROWS * DIM), unit(DIM))
    })
}

/// Registers `cpu/search/1Mx512_top10{,_1thread}` and, with
/// `CLIPA_SEARCH_INDEX`, `cpu/search/file_{rows}x{dim}_top10`.
pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu/search");
    group.throughput(Throughput::Bytes((ROWS * DIM * size_of::<f32>()) as u64));
    group.bench_function("1Mx512_top10", |b| {
        let (matrix, query) = data();
        b.iter(|| black_box(top_k(black_box(matrix), black_box(query), TOP)))
    });
    group.bench_function("1Mx512_top10_1thread", |b| {
        let (matrix, query) = data();
        b.iter(|| {
            black_box(top_k_chunked(
                black_box(matrix),
                black_box(query),
                TOP,
                CHUNK_ROWS,
                1,
            ))
        })
    });
    // The streamed file search of `clipa search`, on a file given by
    // `CLIPA_SEARCH_INDEX` (an `embed` output with `image_features`; read
    // from the page cache after the first pass).
    if let Some(path) = std::env::var_os("CLIPA_SEARCH_INDEX") {
        let file = EmbedFile::open(path.as_ref()).expect("CLIPA_SEARCH_INDEX is an embed file");
        let MatrixShape { rows, dim } = file.shape(Against::Images).expect("image_features");
        let query = &data().1[..dim];
        group.throughput(Throughput::Bytes((rows * dim * size_of::<f32>()) as u64));
        group.bench_function(format!("file_{rows}x{dim}_top10"), |b| {
            b.iter(|| black_box(file.search(Against::Images, query, TOP).expect("search")))
        });
    }
    group.finish();
}
