//! `clipa bench`: training and inference step times of a model on a
//! backend, as a table or one JSON object (`{"cases": [...]}`).

use anyhow::ensure;
use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, Devices, PeakMemory};
use clipa_core::bench::{self, BenchCase, BenchHooks, BenchResult, BenchSteps};
use clipa_core::data::tokenizer::Tokenizer;
use clipa_core::model::ClipConfig;
use clipa_core::train::config::{MAX_BATCH, MAX_IMAGE_SIZE, MAX_TEXT_LENGTH};
use clipa_core::train::lit::{LockConfig, TowerLock};
use serde::Serialize;

use crate::args::BenchArgs;

/// [`BenchHooks`] over the backend's memory reader and, on wgpu and cuda,
/// CubeCL's launch log.
struct Hooks {
    memory: PeakMemory,
    launches: Option<Launches>,
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
type Launches = clipa_backends::LaunchLog;
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
type Launches = std::convert::Infallible;

/// CubeCL's launch log where `kind` runs CubeCL kernels; started before
/// the backend makes its first device.
fn launch_log(kind: BackendKind) -> Option<Launches> {
    match kind {
        BackendKind::Cpu => None,
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        BackendKind::Wgpu | BackendKind::Cuda => clipa_backends::LaunchLog::start(),
        #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
        BackendKind::Wgpu | BackendKind::Cuda => None,
    }
}

impl BenchHooks for Hooks {
    fn reset_peak_memory(&mut self) {
        self.memory.reset();
    }
    fn peak_memory(&mut self) -> Option<u64> {
        self.memory.peak()
    }
    fn kernel_launches(&mut self) -> Option<u64> {
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        return self.launches.as_mut().map(|log| log.launches());
        #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
        return None;
    }
}

struct Bench {
    cases: Vec<BenchCase>,
    steps: BenchSteps,
    quiet: bool,
    launches: Option<Launches>,
}

impl BackendJob for Bench {
    type Output = Vec<BenchResult>;

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<Self::Output> {
        let (device, info) = on.one();
        let mut hooks = Hooks {
            memory: PeakMemory::new(info),
            launches: self.launches,
        };
        let mut out = Vec::with_capacity(self.cases.len());
        for case in &self.cases {
            if !self.quiet {
                eprintln!("timing {} on {info}", case.name);
            }
            out.push(bench::run_case::<B>(case, self.steps, &device, &mut hooks)?);
        }
        Ok(out)
    }
}

/// What `clipa bench --json` prints.
#[derive(Serialize)]
struct Report<'a> {
    device: String,
    threads: usize,
    steps: usize,
    warmup: usize,
    cases: &'a [BenchResult],
}

/// `bench-tiny_b64_img32_pd0.75_txt8`: the model and batch, then the peer
/// benchmark's naming of the token counts.
fn case_name(model: &str, case: &BenchCase) -> String {
    let mut name = format!("{model}_b{}_img{}", case.batch, case.pixels());
    if let Some(mask) = case.image_reduction.mask() {
        let g = case.pixels() / case.model.vision.patch_size;
        let dropped = 1.0 - mask.kept((g, g)) as f64 / (g * g) as f64;
        name += &format!("_pd{dropped:.2}");
    }
    if case.text_length != case.model.text.context_length {
        name += &format!("_txt{}", case.text_length);
    }
    if case.lock.image.is_some() {
        name += "_lockimg";
    }
    if case.lock.text.is_some() {
        name += "_locktxt";
    }
    name
}

/// `clipa bench`.
pub fn run(kind: BackendKind, device: Option<usize>, args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(args.steps > 0, "--steps must be positive");
    let precision = args.precision;
    let whole = |on: bool| on.then(TowerLock::default);
    let lock = LockConfig {
        image: whole(args.lock_image),
        text: whole(args.lock_text),
    };
    let cases = if args.sweep {
        let mut cases = bench::peer_sweep()?;
        for c in &mut cases {
            c.precision = precision;
            c.grad_checkpointing = args.grad_checkpointing;
            c.accum_steps = args.accum_steps;
            c.lock = lock;
        }
        cases
    } else {
        let model = ClipConfig::preset(&args.model)?;
        let tokenizer = Tokenizer::for_text(&model.text, args.vocab.as_deref())?;
        let mut case = BenchCase {
            name: String::new(),
            tokenizer,
            image_size: args.image_size.unwrap_or(model.vision.image_size as u32),
            text_length: args.text_length.unwrap_or(model.text.context_length),
            model,
            batch: args.batch_size,
            image_reduction: args.image_reduction,
            text_reduction: args.text_reduction,
            accum_steps: args.accum_steps,
            precision,
            grad_checkpointing: args.grad_checkpointing,
            lock,
        };
        case.name = case_name(&args.model, &case);
        // A typo's size would be an allocation failure, not an error.
        for (flag, v, max) in [
            ("--batch-size", case.batch, MAX_BATCH),
            ("--image-size", case.image_size as usize, MAX_IMAGE_SIZE),
            ("--text-length", case.text_length, MAX_TEXT_LENGTH),
        ] {
            ensure!(
                (1..=max).contains(&v),
                "{flag} {v} is out of range (1 to {max})"
            );
        }
        vec![case]
    };
    let launches = launch_log(kind);
    let info = clipa_backends::probe(kind, device)?;
    let steps = BenchSteps {
        warmup: args.warmup,
        steps: args.steps,
    };
    let results = clipa_backends::run(
        kind,
        device,
        Bench {
            cases,
            steps,
            quiet: args.json,
            launches,
        },
    )?;
    // The CPU backend's compute threads (rayon's pool), which
    // `RAYON_NUM_THREADS` sets, as the peer's `--threads` does.
    let threads = clipa_backends::cpu_threads();
    if args.json {
        let report = Report {
            device: info.to_string(),
            threads,
            steps: args.steps,
            warmup: args.warmup,
            cases: &results,
        };
        outln!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    outln!(
        "{info}, {threads} threads; median of {} steps after {} warm-up",
        args.steps,
        args.warmup
    );
    outln!(
        "{:<28} {:>5} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>6}",
        "case",
        "batch",
        "tokens",
        "median ms",
        "grads ms",
        "AdamW ms",
        "min ms",
        "max ms",
        "img/s",
        "GFLOP",
        "TFLOP/s",
        "infer ms",
        "peak MB",
        "kernels",
        "reads"
    );
    for r in &results {
        outln!(
            "{:<28} {:>5} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>9.3} {:>10.1} {:>9} {:>8} {:>6.1}",
            r.name,
            r.batch,
            format!("{}+{}", r.image_tokens, r.text_tokens),
            r.median_ms,
            r.grads_median_ms,
            r.optim_median_ms,
            r.min_ms,
            r.max_ms,
            r.images_per_s,
            r.train_gflop,
            r.tflops,
            r.infer_median_ms,
            r.peak_mem_mb.map_or("-".into(), |m| format!("{m:.0}")),
            r.kernels_per_step.map_or("-".into(), |k| format!("{k:.0}")),
            r.host_syncs_per_step,
        );
    }
    Ok(())
}
