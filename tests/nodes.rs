//! Training across machines through the binary: two `clipa train`
//! processes, each with two CPU replicas, joined over loopback as nodes 0
//! and 1 (burn-collective's global mode, patched, and clipa's watchdog).
//! They train as one process on four devices does; killing either ends
//! the other within a minute; both restarted with `--resume latest` end on
//! the uninterrupted run's weights.
//!
//! Every process runs with one rayon thread: flex's multi-threaded
//! reductions sum in an order that depends on work stealing, and this
//! file compares runs to 1e-5 and better.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::common::{
    clipa_with_env, convert_fashion_mnist, curve, fashion_mnist_installed, s, scratch, text,
};
use clipa_core::io::read_safetensors;

/// One thread per process, so that runs repeat to the last bit.
const ENV: [(&str, &str); 1] = [("RAYON_NUM_THREADS", "1")];

/// A master port `P` with `P..P+4` free (orchestrator, watchdog and two
/// nodes' tensor services), below Linux's ephemeral range (32768 up by
/// default) as a launcher's `MASTER_PORT` is: a port drawn from that range
/// could be handed to some outgoing connection (burn-collective opens one
/// per barrier) before its node binds it.
fn free_ports() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id().rotate_left(16);
    for attempt in 0..200u32 {
        // A different place per test and per attempt, in 20000..32000.
        let base = 20_000 + (seed.wrapping_add(attempt.wrapping_mul(7_919)) % 12_000) as u16;
        let all: Vec<_> = (base..base + 4)
            .map(|p| TcpListener::bind(("0.0.0.0", p)))
            .collect();
        if all.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no four free ports in a row below 32000");
}

/// A node's process. Its output goes to files, not pipes: a pipe that no
/// one reads while the process runs stalls it once full (a `RUST_LOG` set
/// in CI's environment fills one within a step).
struct Node {
    child: Child,
    logs: tempfile::TempDir,
}

impl Node {
    /// Waits for the end; the output as `wait_with_output` gives it.
    fn wait(mut self) -> Output {
        let status = self.child.wait().unwrap();
        let read = |name: &str| std::fs::read(self.logs.path().join(name)).unwrap_or_default();
        Output {
            status,
            stdout: read("stdout"),
            stderr: read("stderr"),
        }
    }

    /// SIGKILL: no goodbye on the wire.
    fn kill(mut self) -> Output {
        self.child.kill().ok();
        self.wait()
    }
}

/// `clipa train` as node `rank` of 2 with master port `port`.
fn node(rank: u32, port: u16, args: &[&str]) -> Node {
    let master = format!("127.0.0.1:{port}");
    let logs = scratch();
    let file = |name: &str| std::fs::File::create(logs.path().join(name)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_clipa"))
        .args(args)
        .args(["--num-nodes", "2", "--node-rank", &rank.to_string()])
        .args(["--orchestrator", &master])
        .env_remove("CLIPA_BACKEND")
        .env_remove("CLIPA_DEVICE")
        .env_remove("RUST_LOG")
        .envs(ENV)
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .expect("the clipa binary runs");
    Node { child, logs }
}

/// Both nodes, run to the end.
fn two_nodes(args: &[&str]) -> [Output; 2] {
    let port = free_ports();
    let n0 = node(0, port, args);
    let n1 = node(1, port, args);
    [n0.wait(), n1.wait()]
}

/// The weights of a run's checkpoint at `step`.
fn weights(run: &Path, step: u64) -> BTreeMap<String, burn::tensor::TensorData> {
    let file = run
        .join(format!("checkpoints/step-{step:08}"))
        .join("model.safetensors");
    read_safetensors(&file)
        .unwrap_or_else(|e| panic!("{e}"))
        .tensors
        .into_iter()
        .collect()
}

/// Every tensor within `tol` relative L2 error of `want`'s.
fn assert_weights_close(
    got: &BTreeMap<String, burn::tensor::TensorData>,
    want: &BTreeMap<String, burn::tensor::TensorData>,
    tol: f64,
    skip: impl Fn(&str) -> bool,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in want.iter().filter(|(n, _)| !skip(n)) {
        let err = clipa_core::numeric::relative_error(&got[name], w);
        assert!(err <= tol, "{name}: relative error {err:.2e} > {tol:.0e}");
    }
}

/// The tiny preset with both CLIPA reductions (half the patches masked,
/// syntax-masked text) and two micro-batches per replica.
fn tiny(out: &Path, devices: &str) -> Vec<String> {
    [
        "train",
        "--preset",
        "tiny",
        "--steps",
        "6",
        "--batch-size",
        "16",
        "--accum-steps",
        "2",
        "--image-reduction",
        "random:0.5",
        "--text-reduction",
        "syntax",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
        "--workers=1",
        "--devices",
        devices,
        "--output",
        s(out),
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Two machines of two devices train as one machine of four: every logged
/// loss and every weight within 1e-5. The one-machine run reads the data
/// in the two parts a two-machine run reads (`--data-parts 2`), so both see
/// the same batches. The attention key biases are left out of the weight
/// check: their gradient is zero in exact arithmetic (softmax ignores a
/// shift shared by all keys), so AdamW's normalised step moves them by
/// float noise alone, which any other summation order changes.
#[test]
fn two_machines_train_like_one_machine_with_four_devices() {
    let tmp = scratch();
    let one = tmp.path().join("one");
    let two = tmp.path().join("two");
    let mut args = tiny(&one, "0,1,2,3");
    args.extend(["--data-parts".into(), "2".into()]);
    let out = clipa_with_env(&strs(&args), &ENV);
    assert!(out.status.success(), "{}", text(&out).1);

    let [n0, n1] = two_nodes(&strs(&tiny(&two, "0,1")));
    for (rank, out) in [&n0, &n1].into_iter().enumerate() {
        assert!(out.status.success(), "node {rank}: {}", text(out).1);
    }
    let stderr = text(&n0).1;
    assert!(stderr.contains("node 0 of 2"), "{stderr}");
    // The run folder records the split, so that a resume reads the same.
    let run_toml = std::fs::read_to_string(two.join("run.toml")).unwrap();
    assert!(run_toml.contains("parts = 2"), "{run_toml}");

    let (want, got) = (curve(&one), curve(&two));
    assert_eq!(want.len(), 6);
    assert_eq!(
        got.iter().map(|c| c.0).collect::<Vec<_>>(),
        want.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    for ((step, a), (_, b)) in want.iter().zip(&got) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "step {step}: loss {b} on two machines, {a} on one"
        );
    }
    assert_weights_close(&weights(&two, 6), &weights(&one, 6), 1e-5, |n| {
        n.ends_with("attn.key.bias")
    });
}

/// Waits for `node` up to `limit`; `None` if it still runs.
fn wait_for(node: &mut Node, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(status) = node.child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Starts both nodes of a long run and waits until step `after` is logged.
fn start_and_wait(run: &Path, after: usize, args: &[&str]) -> (Node, Node) {
    let port = free_ports();
    let mut nodes = [node(0, port, args), node(1, port, args)];
    let t0 = Instant::now();
    while curve(run).len() < after {
        let ended = nodes
            .iter_mut()
            .position(|n| n.child.try_wait().unwrap().is_some());
        let stuck = t0.elapsed() > Duration::from_secs(300);
        if ended.is_some() || stuck {
            // What each node said is the only clue a CI log keeps.
            let said: Vec<String> = nodes
                .into_iter()
                .enumerate()
                .map(|(rank, n)| format!("node {rank}: {}", text(&n.kill()).1))
                .collect();
            let why = match ended {
                Some(rank) => format!("node {rank} ended early"),
                None => format!("no step {after} within 300 s"),
            };
            panic!("{why}\n{}", said.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let [n0, n1] = nodes;
    (n0, n1)
}

/// Killing either machine ends the other within a minute, with a non-zero
/// exit and a message naming the machine that left.
#[cfg(unix)]
#[test]
fn a_killed_machine_ends_the_other_within_a_minute() {
    let tmp = scratch();
    for killed in [1usize, 0] {
        let run = tmp.path().join(format!("kill-{killed}"));
        let mut args = tiny(&run, "0,1");
        args[4] = "1000".into(); // --steps: long enough to be killed
        let (n0, n1) = start_and_wait(&run, 2, &strs(&args));
        let (victim, mut other) = match killed {
            0 => (n0, n1),
            _ => (n1, n0),
        };
        victim.kill();
        let t0 = Instant::now();
        let status = wait_for(&mut other, Duration::from_secs(60));
        let out = other.kill(); // a no-op for a process that has ended
        let stderr = String::from_utf8_lossy(&out.stderr);
        let Some(status) = status else {
            panic!(
                "node {} still runs 60 s after node {killed} was killed: {stderr}",
                1 - killed
            );
        };
        assert!(!status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("node {killed} left the run")),
            "{stderr}"
        );
        eprintln!(
            "node {killed} killed: node {} ended in {:.1} s",
            1 - killed,
            t0.elapsed().as_secs_f64()
        );
    }
}

/// A machine that stops answering while its process lives on (here
/// SIGSTOP; a hung driver looks the same to the others) leaves the others
/// inside a collective call: after `--collective-timeout` they stop with an
/// error saying so, well before the heartbeat's `--node-timeout`.
#[cfg(unix)]
#[test]
fn a_stalled_collective_ends_the_run_after_the_collective_timeout() {
    let tmp = scratch();
    let run = tmp.path().join("stall");
    let mut args = tiny(&run, "0,1");
    args[4] = "1000".into(); // --steps: long enough to stall
    args.extend(["--collective-timeout", "10"].map(String::from));
    let (mut n0, n1) = start_and_wait(&run, 2, &strs(&args));
    let signal = |sig: &str, node: &Node| {
        let pid = node.child.id().to_string();
        let sent = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(sent.success(), "kill {sig} {pid}");
    };
    signal("-STOP", &n1);
    let t0 = Instant::now();
    let status = wait_for(&mut n0, Duration::from_secs(60));
    signal("-CONT", &n1);
    n1.kill();
    let out = n0.kill();
    let stderr = text(&out).1;
    let status =
        status.unwrap_or_else(|| panic!("node 0 still runs 60 s after node 1 stopped: {stderr}"));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no collective call between the machines finished for 10s")
            && stderr.contains("--resume latest"),
        "{stderr}"
    );
    let took = t0.elapsed();
    // Node 0 may have waited a little before node 1 stopped, not 5 s.
    assert!(took >= Duration::from_secs(5), "ended after {took:?}");
    eprintln!(
        "node 1 stopped: node 0 ended in {:.1} s",
        took.as_secs_f64()
    );
}

/// Fashion-MNIST as 4 WebDataset shards of 64 images, or `None` (skipped
/// with a reason; CI installs the dataset).
fn fashion_mnist(test: &str, dir: &Path) -> Option<String> {
    if !fashion_mnist_installed(test) {
        return None;
    }
    let data: PathBuf = dir.join("data");
    convert_fashion_mnist(&data, 256, 10, &["--samples-per-shard", "64"]);
    Some(format!(
        "{}/train/shard-{{000000..000003}}.tar",
        data.display()
    ))
}

/// Both machines restarted with `--resume latest` after one was killed
/// finish the run on the uninterrupted run's weights: each machine reads
/// its own shards of Fashion-MNIST, and the checkpoint holds both
/// machines' loader positions.
#[cfg(unix)]
#[test]
fn machines_restarted_with_resume_latest_end_on_the_uninterrupted_weights() {
    let tmp = scratch();
    let Some(shards) = fashion_mnist(
        "machines_restarted_with_resume_latest_end_on_the_uninterrupted_weights",
        tmp.path(),
    ) else {
        return;
    };
    let with_data = |run: &Path| {
        let mut args = tiny(run, "0,1");
        args.extend(["--train-data".into(), shards.clone()]);
        args
    };
    let full = tmp.path().join("full");
    let [n0, n1] = two_nodes(&strs(&with_data(&full)));
    for (rank, out) in [&n0, &n1].into_iter().enumerate() {
        assert!(out.status.success(), "node {rank}: {}", text(out).1);
    }

    let cut = tmp.path().join("cut");
    let args = with_data(&cut);
    let (n0, n1) = start_and_wait(&cut, 3, &strs(&args));
    n1.kill();
    let out = n0.wait();
    assert!(!out.status.success(), "{}", text(&out).1);
    let mut resume = args.clone();
    resume.extend(["--resume".into(), "latest".into()]);
    let [n0, n1] = two_nodes(&strs(&resume));
    for (rank, out) in [&n0, &n1].into_iter().enumerate() {
        assert!(out.status.success(), "node {rank}: {}", text(out).1);
    }
    assert!(text(&n0).1.contains("resum"), "{}", text(&n0).1);
    let steps: Vec<u64> = curve(&cut).iter().map(|c| c.0).collect();
    assert_eq!(steps.last(), Some(&6), "{steps:?}");
    assert_weights_close(&weights(&cut, 6), &weights(&full, 6), 1e-6, |_| false);
}
