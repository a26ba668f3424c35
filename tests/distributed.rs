//! Data parallelism through the binary: two `clipa train` processes joined
//! by `clipa orchestrator` over loopback (burn-collective's global mode)
//! train exactly like one process at the same global batch; mistakes in
//! `--devices` and the node settings are one-line errors.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{clipa, s, scratch, text};

/// `(step, loss)` of every line of `metrics.jsonl`.
fn curve(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("metrics lines are JSON");
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn spawn(args: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_clipa"))
        .args(args)
        .env_remove("CLIPA_BACKEND")
        .env_remove("CLIPA_DEVICE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("the clipa binary runs")
}

/// Kills the processes if the test fails or hangs.
struct Reap(Vec<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

fn train_flags(out: &Path) -> Vec<String> {
    [
        "train",
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--workers=1",
        "--output",
        s(out),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

#[test]
fn two_nodes_over_loopback_train_like_one_process() {
    let dir = scratch("dist-nodes");
    let single: PathBuf = dir.join("single");
    let out = clipa(
        &train_flags(&single)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", text(&out).1);
    let want = curve(&single);
    assert_eq!(want.len(), 4);

    // A port per test process, so parallel test runs do not collide.
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let orch = spawn(
        &["orchestrator", "--port", &port.to_string()],
        &dir.join("orch.log"),
    );
    let mut procs = Reap(vec![orch]);
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the orchestrator did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let orchestrator = format!("127.0.0.1:{port}");
    for rank in 0..2 {
        let mut args = train_flags(&dir.join(format!("node{rank}")));
        args.extend(
            [
                "--num-nodes",
                "2",
                "--node-rank",
                &rank.to_string(),
                "--orchestrator",
                &orchestrator,
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        procs
            .0
            .push(spawn(&args, &dir.join(format!("node{rank}.log"))));
    }
    let t0 = Instant::now();
    let mut status = [None, None];
    while status.iter().any(Option::is_none) {
        for (i, st) in status.iter_mut().enumerate() {
            if st.is_none() {
                *st = procs.0[1 + i].try_wait().unwrap();
            }
        }
        if t0.elapsed() > Duration::from_secs(600) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = |rank: usize| {
        std::fs::read_to_string(dir.join(format!("node{rank}.log"))).unwrap_or_default()
    };
    for (rank, st) in status.iter().enumerate() {
        assert!(
            st.is_some_and(|s| s.success()),
            "node {rank}: {st:?}\n{}\nnode 0:\n{}\norchestrator:\n{}",
            log(rank),
            log(0),
            std::fs::read_to_string(dir.join("orch.log")).unwrap_or_default()
        );
    }
    assert!(log(0).contains("node 0 of 2"), "{}", log(0));
    // Node 0 writes the run; node 1 writes no metrics or checkpoints.
    let got = curve(&dir.join("node0"));
    assert!(!dir.join("node1").join("metrics.jsonl").exists());
    assert_eq!(got.len(), 4, "{got:?}");
    for ((step, a), (_, b)) in want.iter().zip(&got) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "step {step}: 2 nodes {b} vs 1 process {a}"
        );
    }
    drop(procs);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn device_and_node_mistakes_are_one_line_errors() {
    let dir = scratch("dist-errors");
    let out_dir = dir.join("run");
    let cases: [(&[&str], &str); 4] = [
        (&["--devices", "1"], "only device 0"),
        (&["--devices", "0,0"], "listed twice"),
        (&["--num-nodes", "2"], "needs --node-rank"),
        (
            &[
                "--num-nodes",
                "2",
                "--node-rank",
                "0",
                "--orchestrator",
                "head",
            ],
            "not HOST:PORT",
        ),
    ];
    for (flags, want) in cases {
        let out = clipa(
            &[
                &[
                    "train",
                    "--preset",
                    "tiny",
                    "--steps",
                    "1",
                    "--output",
                    s(&out_dir),
                ],
                flags,
            ]
            .concat(),
        );
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        // clap's own usage errors add a "try --help" line; ours are one line.
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(want),
            "{flags:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
    }
    std::fs::remove_dir_all(dir).ok();
}
