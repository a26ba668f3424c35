//! clipa's criterion benches, one module per topic. Each compiled backend
//! gets its own group (`cpu/...`, `wgpu/...`) and every measurement ends
//! with a device sync, so asynchronous GPU work is inside the clock.
//!
//! Run: `cargo bench -p clipa-cli --bench clipa [-- FILTER]`.

// criterion_group! generates undocumented public items.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};

mod block;
mod loader;
mod model;
mod reduce;

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
    targets = block::bench, model::bench, loader::benches, reduce::bench
}
criterion_main!(benches);
