//! Forward + backward of a small transformer (a stack of pre-LN residual
//! blocks at `bench-tiny` width) on every compiled backend. This is the
//! measurement behind the CPU backend choice in `docs/BENCHMARKS.md`.
//!
//! FLOPs per step (2 × multiply-adds of the matrix products), width
//! w = 256, MLP 4w, 4 blocks, batch b = 16:
//! forward = 2·4·b·(12·t·w² + 2·t²·w); t = 65: 6.82 GFLOP, t = 17:
//! 1.73 GFLOP; forward + backward ≈ 3× that (20.5 and 5.2 GFLOP); batch
//! 64 at t = 65 is 4× the first (82 GFLOP per step).

use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use clipa_core::nn::{ResidualBlock, ResidualBlockConfig};
use clipa_core::numeric::normal_data;
use criterion::{BenchmarkId, Criterion, Throughput};

const WIDTH: usize = 256;
const HEADS: usize = 4;
const DEPTH: usize = 4;

#[derive(Module, Debug)]
struct Stack<B: burn::tensor::backend::Backend> {
    blocks: Vec<ResidualBlock<B>>,
}

fn step<B: AutodiffBackend>(stack: &Stack<B>, x: &Tensor<B, 3>) {
    let mut h = x.clone();
    for b in &stack.blocks {
        h = b.forward(h, false);
    }
    let _grads = (h.clone() * h).mean().backward();
}

fn bench_backend<B: AutodiffBackend>(c: &mut Criterion, name: &str, device: B::Device) {
    let mut group = c.benchmark_group(format!("{name}/transformer_fwd_bwd"));
    let cfg = ResidualBlockConfig::new(WIDTH, HEADS, 4 * WIDTH);
    let stack = Stack {
        blocks: (0..DEPTH).map(|_| cfg.init::<B>(&device)).collect(),
    };
    for (batch, tokens) in [(16usize, 65usize), (16, 17), (64, 65)] {
        let x = Tensor::<B, 3>::from_data(normal_data([batch, tokens, WIDTH], 1, 1.0), &device);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new(format!("d{DEPTH}_w{WIDTH}"), format!("b{batch}_t{tokens}")),
            &x,
            |bencher, x| {
                bencher.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        step(&stack, x);
                        B::sync(&device).expect("device sync");
                        total += t0.elapsed();
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

struct Transformer;

impl crate::PerBackend for Transformer {
    fn bench<B: AutodiffBackend>(c: &mut Criterion, label: &str, device: B::Device) {
        bench_backend::<B>(c, label, device);
    }
}

/// Registers the transformer bench for every compiled backend (`ndarray`,
/// the CPU backend clipa does not ship, only for the backend comparison).
pub fn bench(c: &mut Criterion) {
    crate::for_each_backend::<Transformer>(c, "cpu-flex");
    #[cfg(feature = "ndarray")]
    bench_backend::<clipa_backends::NdArrayBackend>(c, "cpu-ndarray", Default::default());
}
