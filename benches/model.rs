//! The model's pieces and the whole training step, on every compiled
//! backend (`cpu/...`, `wgpu/...`, `cuda/...`), each measurement ending in
//! a device sync:
//!
//! - `attention_fwd_bwd`: one multi-head attention layer at `bench-tiny`
//!   width (256, 4 heads), forward and backward, at 65 and 17 tokens;
//! - `loss_fwd_bwd`: the CLIP softmax loss and the SigLIP loss on
//!   normalised features `[batch, 256]`, forward and backward;
//! - `train_step`: the peer benchmark's cases (`bench-tiny`, batch 64,
//!   64 and 16 image tokens, text 32 and 8), forward, loss, backward and
//!   AdamW, through the same code as `clipa bench`.
//!
//! FLOPs: attention at b64·t65 is 2·b·(4·t·w² + 2·t²·w) = 2.45 GFLOP
//! forward; the losses are 2·b²·256 (b = 256: 34 MFLOP), dominated by the
//! softmax over b² entries; the train steps are in docs/BENCHMARKS.md.

use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use clipa_core::bench::{BenchRun, NoHooks, peer_sweep};
use clipa_core::loss::{clip_loss, siglip_loss};
use clipa_core::nn::AttentionConfig;
use clipa_core::numeric::normal_data;
use criterion::{BenchmarkId, Criterion};

/// Times `f` per iteration between device syncs.
fn timed<B: AutodiffBackend>(device: &B::Device, iters: u64, mut f: impl FnMut(u64)) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        B::sync(device).expect("device sync");
        let t0 = Instant::now();
        f(i);
        B::sync(device).expect("device sync");
        total += t0.elapsed();
    }
    total
}

fn bench_backend<B: AutodiffBackend>(c: &mut Criterion, name: &str, device: B::Device) {
    let mut group = c.benchmark_group(format!("{name}/attention_fwd_bwd"));
    let attn = AttentionConfig::new(256, 4).init::<B>(&device);
    for tokens in [65usize, 17] {
        let x = Tensor::<B, 3>::from_data(normal_data([64, tokens, 256], 1, 1.0), &device)
            .require_grad();
        group.bench_function(BenchmarkId::new("w256_h4", format!("b64_t{tokens}")), |b| {
            b.iter_custom(|iters| {
                timed::<B>(&device, iters, |_| {
                    let y = attn.forward(x.clone(), false); // [64, tokens, 256]
                    let _grads = (y.clone() * y).mean().backward();
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{name}/loss_fwd_bwd"));
    for batch in [256usize, 1024] {
        let feats = |seed| {
            let f = Tensor::<B, 2>::from_data(normal_data([batch, 256], seed, 1.0), &device);
            let norm = f.clone().powi_scalar(2).sum_dim(1).sqrt(); // [batch, 1]
            (f / norm).require_grad() // [batch, 256]
        };
        let (img, txt) = (feats(1), feats(2));
        group.bench_function(BenchmarkId::new("softmax", format!("b{batch}")), |b| {
            b.iter_custom(|iters| {
                timed::<B>(&device, iters, |_| {
                    let logits = img.clone().matmul(txt.clone().transpose()) * 14.3; // [batch, batch]
                    let _grads = clip_loss(logits).backward();
                })
            })
        });
        group.bench_function(BenchmarkId::new("siglip", format!("b{batch}")), |b| {
            b.iter_custom(|iters| {
                timed::<B>(&device, iters, |_| {
                    let logits = img.clone().matmul(txt.clone().transpose()) * 10.0 - 10.0;
                    let _grads = siglip_loss(logits).backward();
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{name}/train_step"));
    for case in peer_sweep().expect("the peer cases are valid") {
        // The model is built and warmed once; criterion's own warm-up runs
        // further steps before it measures.
        let mut run = BenchRun::<B>::new(&case, &device).expect("the peer cases run");
        run.train_step(0, &mut NoHooks).expect("warm-up step");
        let mut step = 1u64;
        group.bench_function(
            BenchmarkId::new("bench-tiny_b64", case.name.as_str()),
            |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            step += 1;
                            let t = run.train_step(step, &mut NoHooks).expect("train step");
                            Duration::from_secs_f64(t.total())
                        })
                        .sum()
                })
            },
        );
    }
    group.finish();
}

struct Model;

impl crate::PerBackend for Model {
    fn bench<B: AutodiffBackend>(c: &mut Criterion, label: &str, device: B::Device) {
        bench_backend::<B>(c, label, device);
    }
}

/// Registers the model benches for every compiled backend.
pub fn bench(c: &mut Criterion) {
    crate::for_each_backend::<Model>(c, "cpu");
}
