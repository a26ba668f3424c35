//! clipa's criterion benches, one module per topic. Each compiled backend
//! gets its own group (`cpu/...`, `wgpu/...`) and every measurement ends
//! with a device sync, so asynchronous GPU work is inside the clock.
//!
//! Run: `cargo bench -p clipa-cli --bench clipa [-- FILTER]`.

// criterion_group! generates undocumented public items.
#![allow(missing_docs)]

use std::marker::PhantomData;

use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, Devices};
use criterion::{Criterion, criterion_group, criterion_main};

mod block;
mod collective;
mod gemm;
mod loader;
mod model;
mod reduce;
mod search;

/// A topic's benches on one backend: one criterion group per backend,
/// named `{label}/...`.
trait PerBackend {
    fn bench<B: AutodiffBackend>(c: &mut Criterion, label: &str, device: B::Device);
}

/// [`PerBackend`] as a job for `clipa_backends::run_here`, which maps each
/// backend kind to its Burn type and device the way the CLI does.
struct Job<'a, P> {
    c: &'a mut Criterion,
    label: String,
    topic: PhantomData<P>,
}

impl<P: PerBackend> BackendJob for Job<'_, P> {
    type Output = ();

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<()> {
        let (device, info) = on.one();
        eprintln!("{} benches on {info}", self.label);
        P::bench::<B>(self.c, &self.label, device);
        Ok(())
    }
}

/// Runs topic `P` on every backend kind that is compiled in and has a
/// device; the others are skipped with the reason printed. The CPU group
/// is named `cpu_label`, the others after their kind.
fn for_each_backend<P: PerBackend>(c: &mut Criterion, cpu_label: &str) {
    for kind in BackendKind::ALL {
        let label = match kind {
            BackendKind::Cpu => cpu_label.to_string(),
            other => other.to_string(),
        };
        let job = Job::<P> {
            c: &mut *c,
            label: label.clone(),
            topic: PhantomData,
        };
        if let Err(err) = clipa_backends::run_here(kind, None, job) {
            eprintln!("skipping {label} benches: {err}");
        }
    }
}

fn config() -> Criterion {
    // Shared 2-core machines: few samples, short windows, medians quoted.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = block::bench, model::bench, loader::benches, reduce::bench, collective::bench, gemm::bench, search::bench
}
criterion_main!(benches);
