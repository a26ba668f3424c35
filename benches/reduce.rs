//! Per-batch cost of every token-reduction strategy next to one `bench-tiny`
//! training step on the CPU (issue: reduction must cost < 2 % of a step).
//!
//! The step is the real one (`train_step`) at batch 64 on the
//! 32 px / patch 4 grid (8×8 = 64 patches), text context 32, so the ratio
//! `reduce/<strategy> ÷ train_step` is the overhead a run pays.

use std::hint::black_box;

use burn::module::AutodiffModule;
use clipa_backends::CpuBackend;
use clipa_core::data::synthetic::{Split, SyntheticCaptions};
use clipa_core::data::tokenizer::Tokenizer;
use clipa_core::dist::Replica;
use clipa_core::model::ClipConfig;
use clipa_core::reduce::{ImageReduction, TextReducer, TextReduction};
use clipa_core::train::LossKind;
use clipa_core::train::batch::DeviceBatch;
use clipa_core::train::optim::{AdamW, AdamWConfig};
use clipa_core::train::step::{StepConfig, train_step};
use criterion::Criterion;

const BATCH: usize = 64;
const CONTEXT: usize = 32;

pub fn bench(c: &mut Criterion) {
    // The step below runs with the CPU's kernels, as `clipa train` does.
    let _kernels = clipa_backends::install_kernels(clipa_backends::BackendKind::Cpu);
    let mut group = c.benchmark_group("cpu/reduce_b64");
    let grid = (8, 8);
    for spec in ["random:0.75", "grid:2", "block:0.75"] {
        let r: ImageReduction = spec.parse().expect("valid");
        let mut step = 0u64;
        group.bench_function(format!("image_{spec}"), |b| {
            b.iter(|| {
                step += 1;
                black_box(r.keep_indices(grid, BATCH, 0, step, step * BATCH as u64))
            })
        });
    }
    let tokenizer = Tokenizer::clip();
    let data = SyntheticCaptions::new(Split::Train, BATCH, 8, 0);
    // Synthetic captions are short; repeat them to LAION-like 20–30 words.
    let captions: Vec<String> = (0..BATCH as u64)
        .map(|i| {
            let c = data.sample(i).caption;
            format!(
                "{c} next to a {} on a sunny day, photographed from above by someone",
                data.sample(i + 1).caption
            )
        })
        .collect();
    for kind in TextReduction::ALL {
        let reducer = TextReducer::new(kind, 8);
        let mut step = 0u64;
        group.bench_function(format!("text_{kind}_t8"), |b| {
            b.iter(|| {
                step += 1;
                black_box(reducer.apply_batch(&tokenizer, &captions, 0, step, 0))
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("cpu/train_step");
    let device = Default::default();
    let mut cfg = ClipConfig::bench_tiny();
    cfg.text.context_length = CONTEXT;
    let mut model = cfg.init::<CpuBackend>(&device);
    let mut opt = AdamW::new(AdamWConfig::default());
    let ids: Vec<i64> = (0..BATCH as i64)
        .flat_map(|i| {
            let mut row = vec![0i64; CONTEXT];
            row[0] = 49406;
            row[1] = 320 + i;
            row[2] = 49407;
            row
        })
        .collect();
    let pixels: Vec<u8> = (0..BATCH * 32 * 32 * 3)
        .map(|i| (i * 37 % 251) as u8)
        .collect();
    let batch = DeviceBatch::<CpuBackend>::from_host(
        &pixels,
        &ids,
        None,
        0..BATCH,
        32,
        &cfg.normalization,
        &device,
    );
    let step = StepConfig::plain(LossKind::Softmax);
    group.bench_function("bench-tiny_b64_i32_t32", |b| {
        b.iter(|| {
            let stats;
            (model, stats) = train_step(
                model.clone(),
                &mut opt,
                &batch,
                1e-4,
                &step,
                &Replica::single(),
            )
            .expect("one replica needs no collective");
            // Read on the host, so each iteration times a finished step.
            black_box(stats.read().loss)
        })
    });
    group.finish();
    let _ = model.valid();
}
