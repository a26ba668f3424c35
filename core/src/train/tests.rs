//! Tests of the training run: stages, resume, replicas, non-finite steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::*;
use crate::data::tokenizer::Tokenizer;
use crate::numeric::TestBackend;
use crate::reduce::{ImageReduction, TextReduction};

struct Stopper {
    at: Option<u64>,
    flag: Arc<AtomicBool>,
    stages: Vec<usize>,
}

impl Observer for Stopper {
    fn stage_start(&mut self, index: usize, _stage: &StageConfig, _first: u64) {
        self.stages.push(index);
    }
    fn log(&mut self, m: &StepMetrics, _stage_step: u64) {
        if Some(m.step) == self.at {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
    fn message(&mut self, _text: &str) {}
}

fn two_stage() -> TrainConfig {
    let mut cfg = TrainConfig::preset("tiny").unwrap();
    let first = StageConfig {
        name: "pre".into(),
        image_reduction: ImageReduction::Resize { size: 16 },
        text_length: 8,
        text_reduction: TextReduction::Syntax,
        steps: 3,
        batch_size: 8,
        ..cfg.stages[0].clone()
    };
    let second = StageConfig {
        name: "tune".into(),
        image_reduction: "random:0.5".parse().unwrap(),
        text_length: 16,
        steps: 3,
        batch_size: 8,
        ..cfg.stages[0].clone()
    };
    cfg.stages = vec![first, second];
    cfg.checkpoint_every = 2;
    cfg.keep_checkpoints = 10;
    cfg.data.workers = 2;
    cfg
}

/// A run folder path with nothing there yet (training creates it), and
/// the guard that deletes it when dropped: bind both for the whole test.
fn run_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    (tmp, run)
}

/// `cfg`'s model initialised once and saved as a checkpoint, so that the
/// runs a test compares start from the same weights whatever else draws
/// from the backend's global RNG while tests run in parallel.
fn saved_init(cfg: &TrainConfig) -> (tempfile::TempDir, PathBuf) {
    let (tmp, init) = run_dir();
    let mut model_cfg = cfg.model_config().unwrap();
    model_cfg.text.context_length = 16;
    crate::checkpoint::save_model(
        &init,
        &model_cfg.init::<TestBackend>(&Default::default()),
        &Tokenizer::clip(),
    )
    .unwrap();
    (tmp, init)
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let m: StepMetrics = serde_json::from_str(l).unwrap();
            (m.step, m.loss)
        })
        .collect()
}

/// Data parallelism changes nothing but the speed: 2 and 4 replicas at
/// the global batch of one device take the same steps, with both token
/// reductions (16 px with syntax-masked text, then half the patches
/// masked) and with gradient accumulation (2 micro-batches per replica
/// in the second stage). Were two replicas ever given the same sample,
/// the global batch would differ and so would the weights. Long: one
/// scenario end to end, both runs and every comparison in one place.
#[test]
fn replicas_train_exactly_like_one_device_at_the_global_batch() {
    let _turn = crate::dist::tests::exclusive();
    let device: burn::tensor::Device<TestBackend> = Default::default();
    let mut cfg = two_stage();
    cfg.stages[1].accum_steps = 2;
    cfg.log_every = 1;
    let (_init_tmp, init) = saved_init(&cfg);
    let run = |world: usize| {
        // Dropped when this closure returns: a run folder with its
        // checkpoints is large (155 MB for 4 replicas), and only the
        // losses and weights read here are compared afterwards.
        let (_output_tmp, output) = run_dir();
        let opts = RunOptions {
            output: output.to_path_buf(),
            resume: None,
            interrupt: Arc::new(AtomicBool::new(false)),
            lexicon: None,
            init_from: Some(init.to_path_buf()),
        };
        let mut obs = Stopper {
            at: None,
            flag: opts.interrupt.clone(),
            stages: vec![],
        };
        let devices = vec![device; world];
        let s = train_parallel::<TestBackend>(cfg.clone(), &opts, &devices, &mut obs).unwrap();
        assert_eq!(s.steps, 6);
        let (_, saved, _) = runstate::load(s.checkpoint.as_ref().unwrap()).unwrap();
        (losses(&opts.output), saved.state)
    };
    let (want_losses, want) = run(1);
    for world in [2, 4] {
        let (got_losses, got) = run(world);
        assert_eq!(got_losses.len(), 6);
        // The losses within 2e-4 relative and the matrices (below)
        // within 1e-4: flex's reductions sum in an order that depends
        // on work stealing, and six AdamW steps, whose normalised
        // update gives a float-noise gradient a full step, carry that
        // noise into the weights. Measured misses of the earlier 1e-5
        // bounds: step losses 1.5e-5, 5e-5 (2 replicas, in CI) and
        // 9.8e-5 apart; conv1 2.6e-5.
        for ((step, a), (_, b)) in want_losses.iter().zip(&got_losses) {
            assert!(
                (a - b).abs() <= 2e-4 * a.abs().max(1.0),
                "{world} replicas, step {step}: loss {b} vs {a}"
            );
        }
        // Relative L2 error per tensor (single elements whose gradient
        // is float noise get AdamW's full normalised step either way).
        // The attention key biases are left out: their gradient is zero
        // in exact arithmetic (softmax ignores a shift shared by all
        // keys), so AdamW's normalised step moves them by float noise
        // alone, differently for any other summation order (micro-batches
        // on one device too); the function they compute is unchanged.
        //
        // Vectors (LayerNorm gains and shifts, biases) get 5e-3: with a
        // few dozen elements, one element whose gradient is near float
        // noise, and whose normalised step therefore flips, is a large
        // share of the tensor's norm. flex's rayon reductions sum in an
        // order that depends on work stealing, so this noise differs
        // from run to run: a LayerNorm shift differed by 1.1e-4 and
        // 4.3e-4 in two runs on a busy machine and by under 1e-4 on an
        // idle one, while every matrix stayed under 1e-6. A wrong
        // gradient share moves every element, far past either bound.
        assert_eq!(want.len(), got.len());
        for (name, w) in want.iter().filter(|(n, _)| !n.ends_with("attn.key.bias")) {
            let err = crate::numeric::relative_error(&got[name], w);
            let tol = if w.shape.len() == 1 { 5e-3 } else { 1e-4 };
            if err > tol / 10.0 {
                eprintln!("{world} replicas: {name} relative error {err:.2e}");
            }
            assert!(err < tol, "{world} replicas: {name} differs by {err}");
        }
    }
    // A batch that does not split evenly is refused before any work.
    let (_output_tmp, output) = run_dir();
    let opts = RunOptions {
        output: output.to_path_buf(),
        resume: None,
        interrupt: Arc::new(AtomicBool::new(false)),
        lexicon: None,
        init_from: Some(init.to_path_buf()),
    };
    let err = train_parallel::<TestBackend>(cfg, &opts, &[device; 3], &mut Silent).unwrap_err();
    assert!(
        err.to_string().contains("split evenly over 3 replicas"),
        "{err}"
    );
}

/// Two stages on the synthetic set (16 px with 8 syntax-masked tokens,
/// then 32 px with half the patches and 16 tokens): the stage switch
/// resizes the position tables, and a run interrupted at step 4 and
/// resumed reproduces the uninterrupted loss curve exactly. Long: one
/// scenario end to end, the three runs and their comparisons together.
#[test]
fn stages_resize_and_an_interrupted_run_resumes_exactly() {
    let device = Default::default();
    let cfg = two_stage();
    let (_init_tmp, init) = saved_init(&cfg);
    let opts = |output: &Path, resume| RunOptions {
        output: output.to_path_buf(),
        resume,
        interrupt: Arc::new(AtomicBool::new(false)),
        lexicon: None,
        init_from: Some(init.to_path_buf()),
    };
    let (_full_dir_tmp, full_dir) = run_dir();
    let full = opts(&full_dir, None);
    let mut obs = Stopper {
        at: None,
        flag: full.interrupt.clone(),
        stages: vec![],
    };
    let summary = train::<TestBackend>(cfg.clone(), &full, &device, &mut obs).unwrap();
    assert_eq!(summary.steps, 6);
    assert_eq!(obs.stages, [0, 1]);
    let (_, saved, _) = runstate::load(summary.checkpoint.as_ref().unwrap()).unwrap();
    let (last_cfg, weights) = (saved.config, saved.state);
    assert_eq!(
        (last_cfg.vision.image_size, last_cfg.text.context_length),
        (32, 16)
    );
    assert_eq!(
        weights["visual.positional_embedding"].shape.to_vec(),
        [1 + 64, 64]
    );
    assert_eq!(
        weights["text.positional_embedding"].shape.to_vec(),
        [16, 64]
    );

    let (_cut_dir_tmp, cut_dir) = run_dir();
    let cut = opts(&cut_dir, None);
    let mut obs = Stopper {
        at: Some(4),
        flag: cut.interrupt.clone(),
        stages: vec![],
    };
    let partial = train::<TestBackend>(cfg.clone(), &cut, &device, &mut obs).unwrap();
    assert!(partial.interrupted);
    assert_eq!(partial.steps, 4);
    let resumed = RunOptions {
        resume: Some(Resume::Latest),
        interrupt: Arc::new(AtomicBool::new(false)),
        ..cut
    };
    let mut obs = Stopper {
        at: None,
        flag: resumed.interrupt.clone(),
        stages: vec![],
    };
    let done = train::<TestBackend>(cfg.clone(), &resumed, &device, &mut obs).unwrap();
    assert_eq!(done.steps, 6);
    assert_eq!(obs.stages, [1], "resumes inside the second stage");
    let (a, b) = (losses(&full.output), losses(&resumed.output));
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        b.iter().map(|x| x.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6],
        "no step repeated or lost"
    );
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6, "step {s}: {x} vs {y}");
    }

    // A different config is refused, naming the setting.
    let mut other = cfg.clone();
    other.stages[1].batch_size = 4;
    let err = train::<TestBackend>(
        other,
        &RunOptions {
            resume: Some(Resume::Latest),
            ..resumed.clone()
        },
        &device,
        &mut obs,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("stages[1].batch_size"), "{err}");
}

#[test]
fn a_non_finite_loss_stops_the_run_and_names_the_step() {
    let device = Default::default();
    let mut cfg = TrainConfig::preset("tiny").unwrap();
    cfg.stages[0].steps = 4;
    cfg.stages[0].batch_size = 4;
    cfg.stages[0].warmup_steps = 0;
    cfg.stages[0].base_lr = 1e35; // the first update overflows the weights
    cfg.data.workers = 1;
    let (_nan_dir_tmp, nan_dir) = run_dir();
    let opts = RunOptions {
        output: nan_dir.to_path_buf(),
        resume: None,
        interrupt: Arc::new(AtomicBool::new(false)),
        lexicon: None,
        init_from: None,
    };
    let mut obs = Stopper {
        at: None,
        flag: opts.interrupt.clone(),
        stages: vec![],
    };
    let err = train::<TestBackend>(cfg.clone(), &opts, &device, &mut obs)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("non-finite") && err.contains("at step 2"),
        "{err}"
    );
    // With --skip-nonfinite the run goes on and counts the skipped steps.
    cfg.skip_nonfinite = 10;
    let (_skip_dir_tmp, skip_dir) = run_dir();
    let opts = RunOptions {
        output: skip_dir.to_path_buf(),
        ..opts
    };
    let s = train::<TestBackend>(cfg, &opts, &device, &mut obs).unwrap();
    assert_eq!(s.nonfinite_skipped, 3);
}

/// A training step reads nothing back to the host, with clipping and
/// without, and on a step whose loss is not finite; its stats are read in
/// one, and the bad step changed no weight.
#[test]
fn a_step_reads_nothing_back_and_a_bad_step_changes_nothing() {
    use crate::dist::Replica;
    use crate::model::ClipConfig;
    use crate::train::batch::DeviceBatch;
    use crate::train::optim::{AdamW, AdamWConfig};
    use crate::train::step::{StepConfig, train_step};

    let device = Default::default();
    let cfg = ClipConfig::tiny();
    let mut model = cfg.init::<TestBackend>(&device);
    let mut opt = AdamW::new(AdamWConfig::default());
    let (n, px) = (4, cfg.vision.image_size);
    let pixels: Vec<u8> = (0..n * px * px * 3).map(|i| (i * 37 % 251) as u8).collect();
    let ids: Vec<i64> = (0..n * 8).map(|i| 1 + (i as i64 * 7) % 50).collect();
    let batch = DeviceBatch::<TestBackend>::from_host(
        &pixels,
        &ids,
        None,
        0..n,
        px,
        &cfg.normalization,
        &device,
    );
    for clip in [None, Some(1e-3)] {
        let step = StepConfig {
            grad_clip: clip,
            ..StepConfig::plain(LossKind::Softmax)
        };
        let before = crate::host::reads();
        let stats;
        (model, stats) =
            train_step(model, &mut opt, &batch, 1e-3, &step, &Replica::single()).unwrap();
        assert_eq!(crate::host::reads(), before, "clip {clip:?}: the step read");
        let v = stats.read();
        assert_eq!(crate::host::reads(), before + 1);
        assert!(
            v.applied && v.loss.is_finite() && v.grad_norm > 0.0,
            "{v:?}"
        );
    }
    // An infinite temperature makes the loss non-finite.
    let weights = crate::state::state_dict(&model);
    model.logit_scale = model
        .logit_scale
        .map(|t| burn::tensor::Tensor::from_inner(t.inner() * f32::INFINITY).require_grad());
    let step = StepConfig::plain(LossKind::Softmax);
    let (after, stats) =
        train_step(model, &mut opt, &batch, 1e-3, &step, &Replica::single()).unwrap();
    let v = stats.read();
    assert!(!v.applied && !v.loss.is_finite(), "{v:?}");
    let after = crate::state::state_dict(&after);
    for (name, w) in &weights {
        if name != "logit_scale" {
            assert_eq!(&after[name], w, "{name} changed on a step not applied");
        }
    }
}
