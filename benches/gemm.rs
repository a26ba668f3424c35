//! The matrix products of a ViT-B/16 training step at 112 px / text 16,
//! batch 256, alone: are Burn's GEMMs themselves the limit of a CUDA step?
//! `ci/gpu.sh` runs the `cuda/gemm_b16` group beside `ci/gemm_peer.py`,
//! which times `torch.matmul` on the same shapes, both in bf16.
//!
//! Rows are the batch's tokens: 256 × 50 = 12,800 image tokens (width
//! 768, MLP 3072), 256 × 16 = 4,096 text tokens (width 512, MLP 2048). A
//! product `[m, k]·[k, n]` is 2·m·k·n FLOP (the throughput criterion
//! reports, as elements per second); at the H100's 989 TFLOP/s of dense
//! bf16 the largest, 60.4 GFLOP, takes 61 µs.

use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, FloatDType, Tensor};
use criterion::{Criterion, Throughput};

/// The six products `(name, m, k, n)`: each tower's attention projection
/// (q, k, v and out share it), MLP expansion and MLP contraction.
pub const SHAPES: [(&str, usize, usize, usize); 6] = [
    ("image_proj", 12_800, 768, 768),
    ("image_fc", 12_800, 768, 3072),
    ("image_fc_out", 12_800, 3072, 768),
    ("text_proj", 4096, 512, 512),
    ("text_fc", 4096, 512, 2048),
    ("text_fc_out", 4096, 2048, 512),
];

struct Gemm;

impl crate::PerBackend for Gemm {
    fn bench<B: AutodiffBackend>(c: &mut Criterion, label: &str, device: B::Device) {
        // bf16 where the step runs it (cuda); float32 elsewhere (WGSL has
        // no bf16, and the CPU backend trains in float32).
        let (dtype, tag) = match label {
            "cuda" => (FloatDType::BF16, "bf16"),
            _ => (FloatDType::F32, "f32"),
        };
        let mut group = c.benchmark_group(format!("{label}/gemm_b16"));
        for (name, m, k, n) in SHAPES {
            group.throughput(Throughput::Elements((2 * m * k * n) as u64));
            group.bench_function(format!("{name}_{m}x{k}x{n}_{tag}"), |bencher| {
                // Made here, so a filtered-out shape allocates nothing.
                let normal = Distribution::Normal(0.0, 1.0);
                let a = Tensor::<B::InnerBackend, 2>::random([m, k], normal, &device).cast(dtype);
                let b = Tensor::<B::InnerBackend, 2>::random([k, n], normal, &device).cast(dtype);
                bencher.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        let _ = a.clone().matmul(b.clone());
                    }
                    B::sync(&device).expect("device sync");
                    let total: Duration = t0.elapsed();
                    total
                })
            });
        }
        group.finish();
    }
}

/// Registers the GEMM group for every compiled backend.
pub fn bench(c: &mut Criterion) {
    crate::for_each_backend::<Gemm>(c, "cpu");
}
