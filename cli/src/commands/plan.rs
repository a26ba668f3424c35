//! `clipa plan`: prints core `plan`'s recommendation for a GPU budget, the
//! assumptions behind it, and every published recipe costed on the budget.

use anyhow::Context;
use clipa_core::model::{ClipConfig, TokenizerConfig};
use clipa_core::plan::{self, Budget, Candidate, POINTS_PER_DECADE, Plan, a100_calibration};
use clipa_core::train::{StageConfig, TrainConfig};

use crate::args::PlanArgs;

/// GPUs in one machine (DGX/HGX A100 and H100 nodes): past this a budget
/// needs training across machines.
const GPUS_PER_MACHINE: usize = 8;

/// `clipa plan`.
pub fn run(args: &PlanArgs) -> anyhow::Result<()> {
    let budget = Budget {
        gpus: args.gpus,
        gpu: args.gpu,
        hours: args.hours,
        samples: args.samples,
        data: args.data,
        tflops: args.tflops,
    };
    let p = plan::plan(budget)?;
    print_assumptions(&budget, &p)?;
    let (rec, shortened) = match (p.choice, &p.shortened) {
        (Some(i), _) => (&p.candidates[i], false),
        (None, Some(s)) => (s, true),
        (None, None) => unreachable!("plan() errs when nothing can be recommended"),
    };
    print_recommendation(&budget, &p, rec, shortened)?;
    print_run_command(args, &budget, rec, shortened)?;
    print_candidates(&p)?;
    Ok(())
}

/// The budget and what the estimate assumes.
fn print_assumptions(budget: &Budget, p: &Plan) -> anyhow::Result<()> {
    let cal = a100_calibration();
    let gpu = budget.gpu.as_str().to_uppercase();
    outln!(
        "budget: {} × {gpu} for {} h = {:.0} GPU-hours",
        budget.gpus,
        budget.hours,
        budget.gpus as f64 * budget.hours
    );
    outln!("assumptions:");
    match budget.tflops {
        Some(t) => outln!("  throughput: {t:.1} TFLOP/s per GPU (--tflops)"),
        None => outln!(
            "  throughput: {:.1} TFLOP/s per {gpu}: {:.0} % of its {:.0} TFLOP/s bf16 peak, the median share that the \
             paper's {} runs with published A100 hours achieved ({:.0}–{:.0} TFLOP/s per A100). clipa's own CUDA path \
             is not there yet (docs/BENCHMARKS.md); pass --tflops with a measured figure",
            p.tflops,
            100.0 * cal.mfu(),
            budget.gpu.peak_bf16_tflops(),
            cal.runs,
            cal.min,
            cal.max
        ),
    }
    outln!(
        "  FLOPs: clipa's counter (matrix products, training = 3 × forward; OpenCLIP's model profile within 5 %)"
    );
    match budget.samples {
        Some(n) => outln!(
            "  pre-training samples: {} for every recipe; accuracy moved by {POINTS_PER_DECADE:.1} points per tenfold \
             samples (CLIPA-v2 Table 1, H/14 on LAION-2B) — an extrapolation",
            count(n)
        ),
        None => outln!("  pre-training samples: each recipe's published count"),
    }
    outln!(
        "  accuracy: published ImageNet-1k zero-shot of the recipe on its dataset; yours depends on your data"
    );
    Ok(())
}

/// The recommended recipe, its stages and the accuracy it expects.
fn print_recommendation(
    budget: &Budget,
    p: &Plan,
    rec: &Candidate,
    shortened: bool,
) -> anyhow::Result<()> {
    outln!();
    if shortened {
        outln!(
            "no published recipe fits; the cheapest one, with its pre-training shortened to fit ({} samples):",
            count(rec.config.stages[0].samples() as f64)
        );
    } else {
        let about = clipa_core::train::presets::find(rec.run.preset).map_or("", |p| p.about);
        outln!("recommendation: {} ({about})", rec.run.preset);
    }
    describe(rec)?;
    let bracket = |i: Option<usize>| {
        i.map(|i| {
            let c = &p.candidates[i];
            format!("{:.1} % ({}, {:.0} h)", c.expected, c.run.preset, c.hours)
        })
    };
    let kind = if shortened || budget.samples.is_some() {
        "extrapolated"
    } else {
        "published"
    };
    outln!(
        "  expected ImageNet-1k zero-shot: {:.1} % ({kind}, {}; {})",
        rec.expected,
        rec.run.data.as_str(),
        rec.run.source
    );
    if let Some(pre) = rec.run.pretrain_top1 {
        outln!("    {pre:.1} % before fine-tuning, as published");
    }
    match (bracket(p.below), bracket(p.above)) {
        (None, None) => {}
        (lo, hi) => outln!(
            "  range it is based on: {} … {}",
            lo.unwrap_or_else(|| "nothing cheaper".into()),
            hi.map(|h| format!("{h}, over budget"))
                .unwrap_or_else(|| "nothing better is published".into())
        ),
    }
    Ok(())
}

/// The command line that trains the recommendation on the whole budget.
fn print_run_command(
    args: &PlanArgs,
    budget: &Budget,
    rec: &Candidate,
    shortened: bool,
) -> anyhow::Result<()> {
    // The whole budget: every GPU of the machine, and the vocabulary a
    // WordPiece (CLIPA-v2) model needs.
    let devices = if budget.gpus > 1 {
        " --devices all"
    } else {
        ""
    };
    let wordpiece =
        ClipConfig::preset(&rec.config.model)?.text.tokenizer != TokenizerConfig::ClipBpe;
    let vocab = if wordpiece { " --vocab vocab.txt" } else { "" };
    let source = match &args.write {
        Some(path) => {
            std::fs::write(path, rec.config.to_toml())
                .with_context(|| format!("cannot write {}", path.display()))?;
            Some(format!("--config {}", path.display()))
        }
        None if budget.samples.is_none() && !shortened => {
            Some(format!("--preset {}", rec.run.preset))
        }
        None => None,
    };
    match source {
        Some(source) => outln!("  run it: clipa --backend cuda train {source}{devices}{vocab}"),
        None => outln!(
            "  run it: add --write plan.toml, then clipa --backend cuda train --config plan.toml{devices}{vocab}"
        ),
    }
    if wordpiece {
        outln!(
            "  vocab.txt: the BERT uncased WordPiece vocabulary CLIPA-v2 models read (the \
             bert-base-uncased tokenizer files, or any CLIPA hub folder's vocab.txt)"
        );
    }
    if budget.gpus > GPUS_PER_MACHINE {
        outln!(
            "  note: training across machines is not available yet: one clipa process trains on \
             the GPUs of one machine (--devices), so {} GPUs need {} machines of {GPUS_PER_MACHINE} \
             that clipa cannot join; on one machine the run takes {:.0} h",
            budget.gpus,
            budget.gpus.div_ceil(GPUS_PER_MACHINE),
            rec.hours * budget.gpus as f64 / GPUS_PER_MACHINE as f64
        );
    }
    Ok(())
}

/// Every published recipe on the budget, cheapest first.
fn print_candidates(p: &Plan) -> anyhow::Result<()> {
    outln!("\nevery published recipe on this budget (cheapest first):");
    outln!(
        "  {:<26} {:<12} {:>10} {:>9} {:>5} {:>7}",
        "preset",
        "data",
        "PFLOP",
        "hours",
        "fits",
        "top-1"
    );
    for c in &p.candidates {
        outln!(
            "  {:<26} {:<12} {:>10.0} {:>9.1} {:>5} {:>6.1}%",
            c.run.preset,
            c.run.data.as_str(),
            (c.pretrain_flops + c.finetune_flops) / 1e15,
            c.hours,
            if c.fits { "yes" } else { "no" },
            c.expected
        );
    }
    Ok(())
}

/// The stages of a recommendation: model, pre-training tokens, fine-tune.
fn describe(c: &Candidate) -> anyhow::Result<()> {
    let cfg: &TrainConfig = &c.config;
    let model = ClipConfig::preset(&cfg.model)?;
    outln!(
        "  model: {} ({:.0} M parameters, patch {})",
        cfg.model,
        model.num_params() as f64 / 1e6,
        model.vision.patch_size
    );
    for (i, s) in cfg.stages.iter().enumerate() {
        let what = if i == 0 { "pre-train" } else { "fine-tune" };
        outln!("  {what}: {}", stage_line(s, &model));
    }
    outln!(
        "  compute: {:.3e} FLOP ({:.0} % pre-training) → {:.1} h",
        c.pretrain_flops + c.finetune_flops,
        100.0 * c.pretrain_flops / (c.pretrain_flops + c.finetune_flops),
        c.hours
    );
    Ok(())
}

fn stage_line(s: &StageConfig, model: &ClipConfig) -> String {
    let px = s.image_reduction.image_size(s.image_size);
    format!(
        "{} samples at {px} px ({} image tokens{}), {} text tokens ({}), batch {}",
        count(s.samples() as f64),
        s.image_tokens(model.vision.patch_size),
        match s.image_reduction.mask() {
            Some(_) => format!(", {}", s.image_reduction),
            None => String::new(),
        },
        s.text_length,
        s.text_reduction,
        s.batch_size
    )
}

/// 2.4e9 → "2.40B", 1.31e8 → "131M".
fn count(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0}M", n / 1e6)
    } else {
        format!("{n:.0}")
    }
}
