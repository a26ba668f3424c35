//! burn-collective's local all-reduce on the CPU backend: what one sum over
//! 2 replicas (threads of one process) costs per byte, the floor under the
//! data-parallel step's three all-reduces (features, feature gradients,
//! parameter gradients; docs/DISTRIBUTED.md).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use clipa_backends::CpuBackend;
use clipa_core::dist::Replica;
use criterion::{Criterion, Throughput};

type Inner = <CpuBackend as AutodiffBackend>::InnerBackend;

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu/collective");
    for mib in [4usize, 64] {
        let n = mib * (1 << 20) / 4;
        group.throughput(Throughput::Bytes((n * 4) as u64));
        let (tx, rx) = mpsc::channel::<u64>();
        // Replica 1 runs as many sums as the bench thread (replica 0) is
        // about to, then waits for the next batch; 0 ends it.
        let peer = std::thread::spawn(move || {
            let device = Default::default();
            let rep = Replica::<CpuBackend>::join(1, 2, &device).expect("joins");
            let t = Tensor::<Inner, 1>::ones([n], &device);
            while let Ok(iters) = rx.recv() {
                if iters == 0 {
                    break;
                }
                for _ in 0..iters {
                    rep.sum(t.clone()).expect("sums");
                }
            }
            rep.leave().expect("leaves");
        });
        let device = Default::default();
        let rep = Replica::<CpuBackend>::join(0, 2, &device).expect("joins");
        let t = Tensor::<Inner, 1>::ones([n], &device);
        group.bench_function(format!("all_reduce_2_replicas_{mib}MiB"), |b| {
            b.iter_custom(|iters| {
                tx.send(iters).expect("peer alive");
                let t0 = Instant::now();
                for _ in 0..iters {
                    // Reading one value waits for the sum itself.
                    let s = rep.sum(t.clone()).expect("sums");
                    std::hint::black_box(s.narrow(0, 0, 1).into_data());
                }
                t0.elapsed().max(Duration::from_nanos(1))
            })
        });
        tx.send(0).expect("peer alive");
        rep.leave().expect("leaves");
        peer.join().expect("peer finishes");
    }
}
