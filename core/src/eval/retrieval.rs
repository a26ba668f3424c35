//! Image–text retrieval metrics (CLIP §3.1.4 Flickr30k/COCO, OpenCLIP
//! `zero_shot`-free retrieval as in `clip_benchmark`): recall@1/5/10 both
//! ways, plus the mean and median rank of the first correct match.
//!
//! An image may have several captions (COCO has five). Image → text counts
//! an image as found at rank r when the best-scoring of its captions is the
//! r-th text; text → image ranks each caption's single image. Scores are
//! computed in chunks of rows, so that a 5k × 25k similarity matrix never
//! exists at once; only the rank of each row's correct entry is kept.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

/// Recall@K and rank statistics for one direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RecallAtK {
    /// Share of queries whose first correct match is ranked first.
    pub r1: f64,
    /// … within the top five.
    pub r5: f64,
    /// … within the top ten.
    pub r10: f64,
    /// Mean rank (1-based) of the first correct match.
    pub mean_rank: f64,
    /// Median rank (1-based; the mean of the two middle ranks when even).
    pub median_rank: f64,
}

impl RecallAtK {
    /// Statistics of 1-based `ranks`.
    pub fn from_ranks(ranks: &[usize]) -> Self {
        let n = ranks.len().max(1) as f64;
        let within = |k: usize| ranks.iter().filter(|&&r| r <= k).count() as f64 / n;
        let mut sorted = ranks.to_vec();
        sorted.sort_unstable();
        let median = match sorted.len() {
            0 => 0.0,
            l if l % 2 == 1 => sorted[l / 2] as f64,
            l => (sorted[l / 2 - 1] + sorted[l / 2]) as f64 / 2.0,
        };
        Self {
            r1: within(1),
            r5: within(5),
            r10: within(10),
            mean_rank: ranks.iter().sum::<usize>() as f64 / n,
            median_rank: median,
        }
    }
}

/// Both directions, with the set's size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetrievalResult {
    /// Image → text.
    pub image_to_text: RecallAtK,
    /// Text → image.
    pub text_to_image: RecallAtK,
    /// Images in the set.
    pub images: usize,
    /// Captions in the set.
    pub texts: usize,
}

/// Cosine scores this close count as tied. Backends differ in float
/// summation order by about 1e-6; with a tolerance, identical captions (an
/// exact tie on one backend, a 1e-7 gap on another) rank the same on all.
pub const TIE_TOLERANCE: f32 = 1e-5;

/// Rows of the similarity matrix scored per chunk: 256 × 25k floats is
/// 25 MB, whatever the set's size.
pub const DEFAULT_CHUNK: usize = 256;

/// Retrieval metrics of unit image features `[images, dim]` against unit
/// caption features `[texts, dim]`, where caption `t` belongs to image
/// `text_image[t]`. Scores `chunk` rows at a time on the features' device.
/// Ties count against the query: a wrong candidate scoring within
/// [`TIE_TOLERANCE`] of the best correct one ranks before it.
pub fn retrieval<B: Backend>(
    image_features: Tensor<B, 2>,
    text_features: Tensor<B, 2>,
    text_image: &[usize],
    chunk: usize,
) -> RetrievalResult {
    let [images, _] = image_features.dims();
    let [texts, _] = text_features.dims();
    assert_eq!(texts, text_image.len(), "one image index per caption");
    let chunk = chunk.max(1);
    // Captions of each image, for image → text.
    let mut captions_of = vec![Vec::new(); images];
    for (t, &i) in text_image.iter().enumerate() {
        captions_of[i].push(t);
    }
    let mut i2t = Vec::with_capacity(images);
    let text_t = text_features.clone().transpose(); // [dim, texts]
    for start in (0..images).step_by(chunk) {
        let rows = chunk.min(images - start);
        let scores = image_features
            .clone()
            .narrow(0, start, rows)
            .matmul(text_t.clone()); // [rows, texts]
        let scores: Vec<f32> = scores.into_data().convert::<f32>().to_vec().expect("f32");
        for (r, row) in scores.chunks(texts).enumerate() {
            let caps = &captions_of[start + r];
            i2t.push(rank_of_best(row, caps));
        }
    }
    let mut t2i = Vec::with_capacity(texts);
    let image_t = image_features.transpose(); // [dim, images]
    for start in (0..texts).step_by(chunk) {
        let rows = chunk.min(texts - start);
        let scores = text_features
            .clone()
            .narrow(0, start, rows)
            .matmul(image_t.clone()); // [rows, images]
        let scores: Vec<f32> = scores.into_data().convert::<f32>().to_vec().expect("f32");
        for (r, row) in scores.chunks(images).enumerate() {
            t2i.push(rank_of_best(row, &[text_image[start + r]]));
        }
    }
    RetrievalResult {
        image_to_text: RecallAtK::from_ranks(&i2t),
        text_to_image: RecallAtK::from_ranks(&t2i),
        images,
        texts,
    }
}

/// 1-based rank of the best-scoring of `correct` in `row`: one plus the
/// wrong candidates scoring at least as high, within [`TIE_TOLERANCE`]. An
/// image without captions ranks last.
fn rank_of_best(row: &[f32], correct: &[usize]) -> usize {
    let Some(best) = correct.iter().map(|&c| row[c]).reduce(f32::max) else {
        return row.len() + 1;
    };
    let above = row
        .iter()
        .enumerate()
        .filter(|&(j, &s)| s >= best - TIE_TOLERANCE && !correct.contains(&j))
        .count();
    above + 1
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    use super::*;
    use crate::model::l2_normalize;
    use crate::rng::Rng;

    type B = Flex;

    fn features(rows: usize, dim: usize, seed: u64) -> (Tensor<B, 2>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let v: Vec<f32> = (0..rows * dim)
            .map(|_| rng.uniform() as f32 - 0.5)
            .collect();
        let t = l2_normalize(Tensor::<B, 2>::from_data(
            TensorData::new(v, [rows, dim]),
            &Default::default(),
        ));
        let host = t.to_data().to_vec().expect("f32");
        (t, host)
    }

    /// The textbook computation: sort each row, find the first correct.
    fn brute(
        query: &[f32],
        keys: &[f32],
        dim: usize,
        correct: &dyn Fn(usize, usize) -> bool,
    ) -> Vec<usize> {
        query
            .chunks(dim)
            .enumerate()
            .map(|(q, qv)| {
                let mut scored: Vec<(f32, usize)> = keys
                    .chunks(dim)
                    .enumerate()
                    .map(|(k, kv)| (qv.iter().zip(kv).map(|(a, b)| a * b).sum(), k))
                    .collect();
                scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                scored
                    .iter()
                    .position(|&(_, k)| correct(q, k))
                    .expect("a match")
                    + 1
            })
            .collect()
    }

    #[test]
    fn matches_a_brute_force_sort_with_several_captions_per_image() {
        let (images, dim) = (23, 8);
        // 1 to 5 captions per image, in shuffled order.
        let mut text_image: Vec<usize> = (0..images).flat_map(|i| vec![i; 1 + i % 5]).collect();
        Rng::new(3).shuffle(&mut text_image);
        let (img, img_host) = features(images, dim, 1);
        // Captions near their image, so that ranks spread over 1..many.
        let mut rng = Rng::new(2);
        let txt_host: Vec<f32> = text_image
            .iter()
            .flat_map(|&i| {
                img_host[i * dim..(i + 1) * dim]
                    .iter()
                    .map(|x| x + 2.5 * (rng.uniform() as f32 - 0.5))
                    .collect::<Vec<_>>()
            })
            .collect();
        let txt = l2_normalize(Tensor::<B, 2>::from_data(
            TensorData::new(txt_host, [text_image.len(), dim]),
            &Default::default(),
        ));
        let txt_host: Vec<f32> = txt.to_data().to_vec().expect("f32");
        let got = retrieval(img.clone(), txt.clone(), &text_image, 4);
        let i2t = brute(&img_host, &txt_host, dim, &|q, k| text_image[k] == q);
        let t2i = brute(&txt_host, &img_host, dim, &|q, k| text_image[q] == k);
        assert_eq!(got.image_to_text, RecallAtK::from_ranks(&i2t));
        assert_eq!(got.text_to_image, RecallAtK::from_ranks(&t2i));
        assert_eq!((got.images, got.texts), (images, text_image.len()));
        // The case is neither trivial nor hopeless.
        assert!(
            got.text_to_image.r1 > 0.1 && got.text_to_image.r1 < 0.9,
            "{got:?}"
        );
        // Chunked equals full: one chunk holding every row.
        for chunk in [1, 7, images.max(text_image.len())] {
            assert_eq!(retrieval(img.clone(), txt.clone(), &text_image, chunk), got);
        }
    }

    #[test]
    fn rank_statistics_by_hand() {
        let r = RecallAtK::from_ranks(&[1, 2, 6, 11]);
        assert_eq!((r.r1, r.r5, r.r10), (0.25, 0.5, 0.75));
        assert_eq!(r.mean_rank, 5.0);
        assert_eq!(r.median_rank, 4.0);
        assert_eq!(RecallAtK::from_ranks(&[3, 1, 2]).median_rank, 2.0);
        // Ties count against the query; the best of several correct wins.
        assert_eq!(rank_of_best(&[0.5, 0.9, 0.5, 0.1], &[0]), 3);
        assert_eq!(rank_of_best(&[0.5, 0.9, 0.5, 0.1], &[0, 1]), 1);
        assert_eq!(rank_of_best(&[0.5, 0.9], &[]), 3);
        // Float noise below the tolerance is a tie, above it an order.
        assert_eq!(rank_of_best(&[0.5, 0.500_001, 0.1], &[1]), 2);
        assert_eq!(rank_of_best(&[0.5, 0.5001, 0.1], &[1]), 1);
    }
}
