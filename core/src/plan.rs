//! `clipa plan`: which CLIPA recipe fits a GPU budget, and what it is
//! expected to reach.
//!
//! The planner knows the paper's published runs (CLIPA-FACTS §1.7): each
//! is a training preset (its stages give the samples, image tokens and
//! text lengths), the dataset it was trained on, its ImageNet-1k zero-shot
//! accuracy and, where published, its A100 hours. A run's cost is its
//! training FLOPs by clipa's counter over the cluster's throughput. The
//! throughput is never hidden:
//!
//! - by default it is the A100 throughput that the published runs imply
//!   (their FLOPs over their A100 hours; the median of the runs), and for
//!   other GPU kinds the same share of their dense bf16 peak;
//! - `--tflops` gives it directly, for example from
//!   `clipa --backend cuda bench --json` (its `train_gflop / median_ms`).
//!
//! With `--samples`, the pre-training length changes, and the accuracy is
//! moved along the one sample-scaling slope the papers publish: CLIPA-v2
//! H/14 on LAION-2B went from 74.1 % at 2.56B samples to 77.9 % at 12.8B
//! (v2 report Table 1), 5.4 points per tenfold.

use crate::model::ClipConfig;
use crate::train::TrainConfig;
use crate::{Error, Result};

/// A GPU kind with a published dense bf16 tensor-core peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpu {
    /// NVIDIA A100 (SXM or PCIe, 312 TFLOP/s).
    A100,
    /// NVIDIA H100 SXM (989 TFLOP/s).
    H100,
    /// NVIDIA H200 (989 TFLOP/s: H100's tensor cores, more memory).
    H200,
    /// NVIDIA L40S (362 TFLOP/s).
    L40s,
    /// NVIDIA A10 (125 TFLOP/s).
    A10,
    /// NVIDIA GeForce RTX 4090 (165 TFLOP/s with float32 accumulation).
    Rtx4090,
}

impl Gpu {
    /// Every kind, in `--gpu` order.
    pub const ALL: [Self; 6] = [
        Self::A100,
        Self::H100,
        Self::H200,
        Self::L40s,
        Self::A10,
        Self::Rtx4090,
    ];

    /// The `--gpu` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A100 => "a100",
            Self::H100 => "h100",
            Self::H200 => "h200",
            Self::L40s => "l40s",
            Self::A10 => "a10",
            Self::Rtx4090 => "rtx4090",
        }
    }

    /// Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets).
    pub fn peak_bf16_tflops(self) -> f64 {
        match self {
            Self::A100 => 312.0,
            Self::H100 | Self::H200 => 989.4,
            Self::L40s => 362.1,
            Self::A10 => 125.0,
            Self::Rtx4090 => 165.2,
        }
    }
}

impl std::str::FromStr for Gpu {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let want = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|g| g.as_str() == want)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|g| g.as_str()).collect();
                Error::Config(format!("--gpu {s}: expected one of {}", names.join(", ")))
            })
    }
}

/// The datasets of the published runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    /// LAION-400M (CLIPA-v1).
    Laion400m,
    /// LAION-2B.
    Laion2b,
    /// DataComp-1B.
    Datacomp1b,
}

impl Dataset {
    /// Every dataset, in `--data` order.
    pub const ALL: [Self; 3] = [Self::Laion400m, Self::Laion2b, Self::Datacomp1b];

    /// The `--data` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Laion400m => "laion-400m",
            Self::Laion2b => "laion-2b",
            Self::Datacomp1b => "datacomp-1b",
        }
    }
}

impl std::str::FromStr for Dataset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "--data {s}: expected laion-400m, laion-2b or datacomp-1b"
                ))
            })
    }
}

/// One published CLIPA run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PublishedRun {
    /// The training preset that runs it (`clipa train --preset`).
    pub preset: &'static str,
    /// Its training data.
    pub data: Dataset,
    /// ImageNet-1k zero-shot top-1 (%) after fine-tuning.
    pub top1: f64,
    /// The same before fine-tuning, where published.
    pub pretrain_top1: Option<f64>,
    /// A100 hours, where published.
    pub a100_hours: Option<f64>,
    /// Where the numbers come from.
    pub source: &'static str,
}

const fn run(
    preset: &'static str,
    data: Dataset,
    top1: f64,
    pretrain_top1: Option<f64>,
    a100_hours: Option<f64>,
    source: &'static str,
) -> PublishedRun {
    PublishedRun {
        preset,
        data,
        top1,
        pretrain_top1,
        a100_hours,
        source,
    }
}

/// "About 2/3/4 days on 8 A100s" (the CLIPA-v1 abstract) in A100 hours.
const fn days_on_8(days: f64) -> Option<f64> {
    Some(days * 24.0 * 8.0)
}

/// The published runs (CLIPA-FACTS §1.7).
pub const PUBLISHED: [PublishedRun; 12] = [
    run(
        "clipa-b16-i112-t16",
        Dataset::Laion400m,
        63.2,
        Some(59.7),
        days_on_8(2.0),
        "CLIPA-v1: B/16 (I50, T16), ~2 days on 8 A100",
    ),
    run(
        "clipa-l16-i64-t16",
        Dataset::Laion400m,
        67.8,
        Some(60.3),
        days_on_8(3.0),
        "CLIPA-v1: L/16 (I17, T16), ~3 days on 8 A100",
    ),
    run(
        "clipa-l16-i96-t8",
        Dataset::Laion400m,
        69.3,
        Some(57.9),
        days_on_8(4.0),
        "CLIPA-v1: L/16 (I37, T8), ~4 days on 8 A100",
    ),
    run(
        "clipa-h14-i84-t8",
        Dataset::Laion400m,
        72.8,
        None,
        None,
        "CLIPA-v2 report, Table 1",
    ),
    run(
        "clipa-h14-i84-t8",
        Dataset::Laion2b,
        74.1,
        None,
        None,
        "CLIPA-v2 report, Table 1",
    ),
    run(
        "clipa-v2-l14-84-224",
        Dataset::Datacomp1b,
        79.7,
        None,
        Some(4008.0),
        "CLIPA-v2 report, Table 4",
    ),
    run(
        "clipa-v2-h14-70-224",
        Dataset::Datacomp1b,
        81.1,
        None,
        Some(5920.0),
        "CLIPA-v2 report, Table 4",
    ),
    run(
        "clipa-v2-h14-84-224",
        Dataset::Datacomp1b,
        81.5,
        Some(75.6),
        Some(7776.0),
        "CLIPA-v2 report, Table 4",
    ),
    run(
        "clipa-v2-h14-84-224-336",
        Dataset::Laion2b,
        79.1,
        Some(72.1),
        Some(8640.0),
        "CLIPA-v2 report, Table 4",
    ),
    run(
        "clipa-v2-h14-84-224-336",
        Dataset::Datacomp1b,
        81.8,
        Some(75.6),
        Some(8640.0),
        "CLIPA-v2 report, Table 4",
    ),
    run(
        "clipa-v2-g14-84-224",
        Dataset::Datacomp1b,
        82.7,
        Some(78.5),
        Some(21_998.0),
        "CLIPA-v2 README (torch)",
    ),
    run(
        "clipa-v2-g14-84-224-336",
        Dataset::Datacomp1b,
        83.0,
        Some(78.5),
        Some(23_742.0),
        "CLIPA-v2 README",
    ),
];

/// Accuracy points per tenfold pre-training samples (v2 report Table 1:
/// H/14, LAION-2B, 74.1 % at 2.56B → 77.9 % at 12.8B samples).
pub const POINTS_PER_DECADE: f64 = (77.9 - 74.1) / 0.698_970_004_336_018_8; // log10(12.8 / 2.56) = log10 5

/// The FLOPs of a run: `(pre-training, the fine-tuning stages)`.
pub fn run_flops(cfg: &TrainConfig) -> Result<(f64, f64)> {
    let model = ClipConfig::preset(&cfg.model)?;
    let pre = cfg.stages[0].train_flops(&model);
    let rest = cfg.stages[1..].iter().map(|s| s.train_flops(&model)).sum();
    Ok((pre, rest))
}

/// The effective A100 throughput the published runs imply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Median over the runs with published hours (TFLOP/s per GPU).
    pub median: f64,
    /// Lowest.
    pub min: f64,
    /// Highest.
    pub max: f64,
    /// Runs it comes from.
    pub runs: usize,
}

impl Calibration {
    /// The median as a share of the A100's bf16 peak.
    pub fn mfu(&self) -> f64 {
        self.median / Gpu::A100.peak_bf16_tflops()
    }
}

/// TFLOP/s per A100 implied by each published run with hours: its FLOPs by
/// clipa's counter over its A100 seconds.
pub fn a100_calibration() -> Calibration {
    let mut implied: Vec<f64> = PUBLISHED
        .iter()
        .filter_map(|r| {
            let hours = r.a100_hours?;
            let cfg = TrainConfig::preset(r.preset).expect("published runs name real presets");
            let (pre, rest) = run_flops(&cfg).expect("preset models exist");
            Some((pre + rest) / (hours * 3600.0) / 1e12)
        })
        .collect();
    implied.sort_by(f64::total_cmp);
    let n = implied.len();
    let median = if n % 2 == 1 {
        implied[n / 2]
    } else {
        0.5 * (implied[n / 2 - 1] + implied[n / 2])
    };
    Calibration {
        median,
        min: implied[0],
        max: implied[n - 1],
        runs: n,
    }
}

/// What the user has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// GPUs.
    pub gpus: usize,
    /// Their kind.
    pub gpu: Gpu,
    /// Wall-clock hours.
    pub hours: f64,
    /// Pre-training samples (default: each recipe's own).
    pub samples: Option<f64>,
    /// Only recipes published on this dataset.
    pub data: Option<Dataset>,
    /// Effective training TFLOP/s per GPU (default: the calibration).
    pub tflops: Option<f64>,
}

/// One recipe at the user's sample count, costed.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The published run.
    pub run: PublishedRun,
    /// The run to train (the preset with `--samples` applied).
    pub config: TrainConfig,
    /// Pre-training FLOPs.
    pub pretrain_flops: f64,
    /// Fine-tuning FLOPs.
    pub finetune_flops: f64,
    /// Wall hours on the budget's GPUs.
    pub hours: f64,
    /// Whether it fits the budget.
    pub fits: bool,
    /// Expected ImageNet-1k zero-shot top-1 (%): the published value, moved
    /// along [`POINTS_PER_DECADE`] when the samples differ.
    pub expected: f64,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The budget asked about.
    pub budget: Budget,
    /// TFLOP/s per GPU used.
    pub tflops: f64,
    /// Every recipe, cheapest first.
    pub candidates: Vec<Candidate>,
    /// The recommendation (index into `candidates`), or `None` when none
    /// fits even shortened; then `shortened` holds the cheapest recipe with
    /// its pre-training cut to fit.
    pub choice: Option<usize>,
    /// The cheapest recipe with its pre-training shortened to fit, when no
    /// recipe fits as published.
    pub shortened: Option<Candidate>,
    /// The best fitting recipe below the choice.
    pub below: Option<usize>,
    /// The cheapest recipe above the choice that does not fit.
    pub above: Option<usize>,
}

/// Expected accuracy of `run` pre-trained on `samples` instead of its own
/// `published` samples.
fn moved(run: &PublishedRun, samples: f64, published: f64) -> f64 {
    run.top1 + POINTS_PER_DECADE * (samples / published).log10()
}

/// Costs `run` at `samples` (or its own) on the budget.
fn candidate(
    run: &PublishedRun,
    samples: Option<f64>,
    budget_flops: f64,
    cluster: f64,
) -> Result<Candidate> {
    let mut config = TrainConfig::preset(run.preset)?;
    let published = config.stages[0].samples() as f64;
    if let Some(n) = samples {
        let s = &mut config.stages[0];
        s.steps = ((n / s.batch_size as f64).ceil() as u64).max(1);
        s.warmup_steps = s.warmup_steps.min(s.steps);
    }
    let (pre, rest) = run_flops(&config)?;
    let total = pre + rest;
    let actual = config.stages[0].samples() as f64;
    Ok(Candidate {
        run: *run,
        pretrain_flops: pre,
        finetune_flops: rest,
        hours: total / cluster / 3600.0,
        fits: total <= budget_flops,
        expected: moved(run, actual, published),
        config,
    })
}

/// Picks the recipe with the highest expected accuracy that fits `budget`.
pub fn plan(budget: Budget) -> Result<Plan> {
    if budget.gpus == 0 || !(budget.hours.is_finite() && budget.hours > 0.0) {
        return Err(Error::Config("--gpus and --hours must be positive".into()));
    }
    if let Some(n) = budget.samples
        && !(n.is_finite() && n >= 1.0)
    {
        return Err(Error::Config(format!("--samples {n} must be at least 1")));
    }
    let tflops = match budget.tflops {
        Some(t) if t.is_finite() && t > 0.0 => t,
        Some(t) => return Err(Error::Config(format!("--tflops {t} must be positive"))),
        None => a100_calibration().mfu() * budget.gpu.peak_bf16_tflops(),
    };
    let cluster = budget.gpus as f64 * tflops * 1e12;
    let budget_flops = cluster * budget.hours * 3600.0;
    let mut candidates = PUBLISHED
        .iter()
        .filter(|r| budget.data.is_none_or(|d| d == r.data))
        .map(|r| candidate(r, budget.samples, budget_flops, cluster))
        .collect::<Result<Vec<_>>>()?;
    candidates.sort_by(|a, b| {
        a.hours
            .total_cmp(&b.hours)
            .then(a.expected.total_cmp(&b.expected))
    });
    let best = |pred: &dyn Fn(&Candidate) -> bool| {
        candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| pred(c))
            .max_by(|(_, a), (_, b)| {
                a.expected
                    .total_cmp(&b.expected)
                    .then(b.hours.total_cmp(&a.hours))
            })
            .map(|(i, _)| i)
    };
    let choice = best(&|c| c.fits);
    let (below, above, shortened) = match choice {
        Some(i) => {
            let e = candidates[i].expected;
            let below = best(&|c| c.fits && c.expected < e);
            let above = candidates.iter().position(|c| !c.fits && c.expected > e);
            (below, above, None)
        }
        None => {
            // Nothing fits: shorten the cheapest recipe's pre-training.
            let c = candidates
                .first()
                .ok_or_else(|| Error::Config("no published run matches --data".into()))?;
            let per_sample = c.pretrain_flops / c.config.stages[0].samples() as f64;
            let left = budget_flops - c.finetune_flops;
            if left < per_sample * c.config.stages[0].batch_size as f64 {
                return Err(Error::Config(format!(
                    "the budget ({:.0} GPU-hours at {tflops:.0} TFLOP/s) does not cover even the fine-tuning of the cheapest recipe, {} ({:.0} GPU-hours)",
                    budget.gpus as f64 * budget.hours,
                    c.run.preset,
                    c.finetune_flops / (tflops * 1e12) / 3600.0
                )));
            }
            let short = candidate(
                &c.run,
                Some(left / per_sample),
                budget_flops * (1.0 + 1e-9),
                cluster,
            )?;
            (None, Some(0), Some(short))
        }
    };
    Ok(Plan {
        budget,
        tflops,
        candidates,
        choice,
        shortened,
        below,
        above,
    })
}

#[cfg(test)]
mod tests;
