//! Measures one all-reduce "round" between machines on burn-collective
//! 0.21.0 as published, three ways:
//!
//! - `session`: register once, then all-reduce every round (what training
//!   needs; expected to hang at round 2 on the unpatched barrier);
//! - `per-round`: register, all-reduce once, finish, every round (the
//!   public-API workaround issue #29 asked to measure);
//! - `session-wait`: `session`, and each node waits until its own data
//!   server accepts connections before its first all-reduce (tried against
//!   a start-up race; it did not remove it, so clipa does not do this).
//!
//! Usage: `per-round-probe RANK NODES PORT ROUNDS MODE FLOATS`. Node 0 also
//! hosts the orchestrator at PORT; node r serves data at PORT+1+r. Prints
//! the time of every round, or `stuck` when a round takes over 20 s.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective,
    register,
};

type B = Flex;

/// Node `rank`'s data server port, with the orchestrator at `port`.
fn data_port(rank: usize, port: u16) -> u16 {
    port + 1 + rank as u16
}

fn config(rank: usize, nodes: usize, port: u16) -> CollectiveConfig {
    let data = data_port(rank, port);
    CollectiveConfig::default()
        .with_num_devices(1)
        .with_num_nodes(nodes as u32)
        .with_global_address(format!("ws://127.0.0.1:{port}").parse().unwrap())
        .with_node_address(format!("ws://127.0.0.1:{data}").parse().unwrap())
        .with_data_service_port(data)
        .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2))
        .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2))
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (rank, nodes): (usize, usize) = (a[1].parse().unwrap(), a[2].parse().unwrap());
    let (port, rounds): (u16, usize) = (a[3].parse().unwrap(), a[4].parse().unwrap());
    let (mode, floats) = (a[5].clone(), a[6].parse::<usize>().unwrap());
    if rank == 0 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        std::thread::spawn(move || rt.block_on(burn_collective::start_global_orchestrator(port)));
        std::thread::sleep(Duration::from_millis(300));
    }
    let (tx, rx) = mpsc::channel();
    let per_round = mode == "per-round";
    let wait = mode == "session-wait";
    std::thread::spawn(move || {
        let device = Default::default();
        let peer = PeerId::from(rank);
        if !per_round {
            register::<B>(peer, device, config(rank, nodes, port)).unwrap();
        }
        if wait {
            // `register` spawns this node's data server; a peer may ask it
            // for a tensor as soon as this node's all-reduce request is in.
            while std::net::TcpStream::connect(("127.0.0.1", data_port(rank, port))).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for round in 0..rounds {
            let t = Instant::now();
            if per_round {
                register::<B>(peer, device, config(rank, nodes, port)).unwrap();
            }
            let x = Tensor::<B, 1>::ones([floats], &device)
                .into_primitive()
                .tensor();
            let sum = all_reduce::<B>(peer, x, ReduceOperation::Sum).unwrap();
            let sum = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(sum));
            let first: f32 = sum.slice([0..1]).into_scalar();
            assert_eq!(first, nodes as f32, "round {round}");
            if per_round {
                finish_collective::<B>(peer).unwrap();
            }
            tx.send((round, t.elapsed())).unwrap();
        }
    });
    let mut times = Vec::new();
    for round in 0..rounds {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok((r, dt)) => {
                println!("node {rank} round {r}: {:.1} ms", dt.as_secs_f64() * 1e3);
                times.push(dt.as_secs_f64() * 1e3);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                println!("node {rank} round {round}: stuck (no result in 20 s)");
                std::process::exit(3);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                println!("node {rank} round {round}: the all-reduce thread panicked");
                std::process::exit(4);
            }
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "node {rank} {mode}: {rounds} rounds of {floats} floats, median {:.1} ms",
        times[times.len() / 2]
    );
}
