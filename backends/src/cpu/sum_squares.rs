//! The gradients' sum of squares in one parallel pass over all of them.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use clipa_core::kernels::{SumSquaresKernel, sum_squares_composed};
use rayon::prelude::*;

use super::tensor::{CHUNK, dense};
use super::vmath::{self, vectorised};

/// `Σ t²` over every gradient in one pass on rayon's threads.
///
/// The composed sum ([`sum_squares_composed`]) is a square, a sum and an
/// add per parameter: about 450 flex ops for bench-tiny's ~150 tensors,
/// whose element-wise square and sum run on one thread, and it streams
/// the 19.1 M gradients (76 MB) twice. Here each `CHUNK` of each tensor is
/// one task that reads its floats once, and the chunks' partial sums are
/// added in a fixed order in float64, so the norm (and with it the
/// clipping and the weights) does not depend on the thread schedule.
pub struct FlexSumSquares;

impl SumSquaresKernel<Flex> for FlexSumSquares {
    fn sum_squares(&self, tensors: Vec<Tensor<Flex, 1>>) -> Tensor<Flex, 1> {
        let device = tensors.first().map(|t| t.device()).unwrap_or_default();
        if tensors.iter().any(|t| t.dtype() != DType::F32) {
            return sum_squares_composed(tensors, &device);
        }
        let dense: Vec<_> = tensors.into_iter().map(dense).collect();
        let chunks: Vec<&[f32]> = dense
            .iter()
            .flat_map(|t| t.storage::<f32>().chunks(CHUNK))
            .collect();
        let partials: Vec<f64> = chunks.par_iter().map(|c| square_sum(c) as f64).collect();
        let total: f64 = partials.iter().sum();
        Tensor::from_data(TensorData::new(vec![total as f32], [1]), &device)
    }
}

vectorised! {
    /// Σ x² over one chunk, 16 partial sums wide ([`vmath::dot`]).
    fn square_sum(x: &[f32]) -> f32 {
        vmath::dot(x, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clipa_core::numeric::normal_data;

    /// The one pass gives the composed sum over tensors of several sizes,
    /// one of them longer than a chunk and not a multiple of it.
    #[test]
    fn one_pass_matches_the_composed_sum() {
        let device = Default::default();
        let sizes = [1, 17, CHUNK, 3 * CHUNK + 5];
        let tensors: Vec<Tensor<Flex, 1>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Tensor::from_data(normal_data([n], i as u64, 0.3), &device))
            .collect();
        let want: f32 = sum_squares_composed(tensors.clone(), &device).into_scalar();
        let got: f32 = FlexSumSquares.sum_squares(tensors).into_scalar();
        let rel = ((got - want) / want).abs();
        assert!(rel < 1e-5, "got {got}, composed {want}: relative {rel:.2e}");
        assert!(want > 100.0, "the inputs were not all zero: {want}");
    }
}
