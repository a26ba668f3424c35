//! Tests of `sweep`.

use super::*;
use crate::numeric::TestBackend;
use crate::train::StepMetrics;

/// Counts points and can stop the sweep at a given log line.
#[derive(Default)]
struct Watch {
    started: Vec<(usize, bool)>,
    logs: u64,
    stop_at_log: Option<u64>,
    flag: Arc<AtomicBool>,
}

impl Observer for Watch {
    fn stage_start(&mut self, _: usize, _: &StageConfig, _: u64) {}
    fn log(&mut self, _: &StepMetrics, _: u64) {
        self.logs += 1;
        if Some(self.logs) == self.stop_at_log {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
    fn message(&mut self, _: &str) {}
}

impl SweepObserver for Watch {
    fn point_start(&mut self, index: usize, _: usize, _: &SweepPoint, done: bool) {
        self.started.push((index, done));
    }
    fn point_done(&mut self, _: &[PointResult]) {}
}

fn tiny() -> SweepConfig {
    let mut cfg = SweepConfig::preset("tiny").unwrap();
    cfg.pretrain.steps = 4;
    cfg
}

#[test]
fn tiny_sweep_records_flops_and_accuracy_and_resumes_after_a_stop() {
    let out_tmp = tempfile::tempdir().unwrap();

    let out = out_tmp.path().join("run");
    let device = Default::default();
    let cfg = tiny();
    let flag = Arc::new(AtomicBool::new(false));
    let opts = SweepOptions {
        output: out.to_path_buf(),
        interrupt: flag.clone(),
        lexicon: None,
    };
    // Stop inside the second point's pre-training (log lines come every
    // 10 steps and at each stage end: 2 per point).
    let mut watch = Watch {
        stop_at_log: Some(3),
        flag: flag.clone(),
        ..Watch::default()
    };
    let first = run::<TestBackend>(&cfg, &opts, &device, &mut watch).unwrap();
    assert!(first.interrupted);
    assert_eq!((first.results.len(), first.total), (1, 2));
    flag.store(false, Ordering::SeqCst);
    let mut watch = Watch::default();
    let done = run::<TestBackend>(&cfg, &opts, &device, &mut watch).unwrap();
    assert!(!done.interrupted);
    assert_eq!(watch.started, [(0, true), (1, false)]);
    assert_eq!(done.results.len(), 2);
    assert_eq!(done.results[0], first.results[0]);
    let (full, low) = (&done.results[0], &done.results[1]);
    assert_eq!(full.point.id(), "scale-w32_i64-full_t16-full");
    assert_eq!(low.point.image_tokens, 16);
    // Same samples; the 16-token pre-train costs less than the 64-token
    // one, and both fine-tunes cost the same.
    assert_eq!(full.pretrain.samples, 32);
    assert!(low.pretrain.flops < 0.6 * full.pretrain.flops);
    assert_eq!(low.finetune.flops, full.finetune.flops);
    for r in &done.results {
        for p in [&r.pretrain, &r.finetune] {
            assert!((0.0..=1.0).contains(&p.top1) && p.top5 >= p.top1, "{p:?}");
        }
    }
    let csv = std::fs::read_to_string(&done.csv).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with("point,model,params,"));
    // The pre-training checkpoints are gone; the fine-tuned weights stay.
    let dir = out.join("points").join(low.point.id());
    assert!(!runstate::checkpoints_dir(&dir.join("pretrain")).exists());
    let ft = runstate::latest(&dir.join("finetune")).unwrap().unwrap();
    assert!(ft.join(crate::checkpoint::WEIGHTS_FILE).is_file());
    assert!(!ft.join(runstate::OPTIMIZER_FILE).exists());

    // A different recipe in the same folder is refused by name.
    let mut other = cfg.clone();
    other.pretrain.base_lr = 5e-4;
    let err = run::<TestBackend>(&other, &opts, &device, &mut Watch::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pretrain/finetune"), "{err}");
}

#[test]
fn csv_gets_one_column_pair_per_extra_metric() {
    let phase = |top1: f64, m: &[(&str, f64)]| PhaseResult {
        samples: 10,
        flops: 2e9,
        seconds: 1.0,
        top1,
        top5: 1.0,
        metrics: m.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    };
    let r = PointResult {
        point: SweepPoint {
            model: "scale-w32".into(),
            image: Some(ImageStrategy::Grid),
            image_tokens: 16,
            text: None,
            text_tokens: 16,
        },
        params: 5,
        pretrain: phase(0.25, &[]),
        finetune: phase(0.5, &[("coco/i2t_r1", 0.125)]),
    };
    let csv = to_csv(&[r]);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].ends_with(",pretrain_coco/i2t_r1,finetune_coco/i2t_r1"));
    assert!(
        lines[1].starts_with(
            "scale-w32_i16-grid_t16-full,scale-w32,5,grid,16,none,16,10,10,2.0,2.0,4.0,"
        )
    );
    assert!(
        lines[1].ends_with(",0.2500,1.0000,0.5000,1.0000,,0.1250"),
        "{}",
        lines[1]
    );
}
