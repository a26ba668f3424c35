//! `clipa check`: verifies a backend set-up by running the attention layer
//! and residual block forward and backward on it and on the CPU, from the
//! same weights and inputs, and comparing every output and gradient.

use anyhow::{Context, ensure};
use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, Devices};
use clipa_core::numeric::{compare_sets, relative_error};
use clipa_core::selftest::{self, PartResult, SelfTestShape};

use crate::args::CheckArgs;

struct SelfTest(SelfTestShape);

/// The block under bf16 mixed precision, where the device has bf16.
struct SelfTestBf16(SelfTestShape);

impl BackendJob for SelfTestBf16 {
    type Output = Option<PartResult>;

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<Self::Output> {
        let (device, _info) = on.one();
        selftest::run_bf16::<B>(&device, self.0)
    }
}

/// Relative error allowed for the bf16 block against the float32 cpu one:
/// bf16 keeps 8 significant bits (2⁻⁸ ≈ 4e-3 per rounding), and the
/// branch sums hundreds of products.
const BF16_TOLERANCE: f64 = 5e-2;

/// The float32 tolerance against the cpu when `--tolerance` is not given.
///
/// On CUDA, Burn's matmul (cubek-matmul) stages float32 operands as TF32
/// whenever the device has TF32 tensor cores (Ampere and later), as
/// PyTorch does with `allow_tf32`. TF32 keeps 11 significant bits
/// (2⁻¹¹ ≈ 4.9e-4 per rounding); on an H200 the default shape gave 5.6e-4
/// and a ViT-B/16 block at batch 32 gave 4.2e-3, against 1e-5 or less on
/// the float32 backends.
fn default_tolerance(kind: BackendKind) -> f64 {
    match kind {
        BackendKind::Cuda => 1e-2,
        BackendKind::Cpu | BackendKind::Wgpu => 1e-4,
    }
}

impl BackendJob for SelfTest {
    type Output = Vec<PartResult>;

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<Self::Output> {
        let (device, info) = on.one();
        tracing::debug!("running the self-test on {info}");
        selftest::run::<B>(&device, self.0)
    }
}

/// A part's forward error against the reference, and its worst gradient
/// (name, relative error).
fn part_errors<'a>(
    got: &PartResult,
    reference: &'a PartResult,
    kind: BackendKind,
) -> anyhow::Result<(f64, &'a str, f64)> {
    let out_err = relative_error(&got.output, &reference.output);
    let errs = compare_sets(&got.grads, &reference.grads)
        .map_err(|name| anyhow::anyhow!("{}: no gradient for {name} on {kind}", got.name))?;
    let (worst_name, grad_err) =
        errs.into_iter().fold(
            ("", 0.0f64),
            |acc, (n, e)| if e > acc.1 { (n, e) } else { acc },
        );
    Ok((out_err, worst_name, grad_err))
}

/// Runs the self-test on `kind` and the CPU reference and compares.
pub fn run(kind: BackendKind, device: Option<usize>, args: &CheckArgs) -> anyhow::Result<()> {
    ensure!(
        args.width > 0 && args.heads > 0 && args.width.is_multiple_of(args.heads),
        "--width {} is not a multiple of --heads {}",
        args.width,
        args.heads
    );
    ensure!(
        args.batch > 0 && args.tokens > 0,
        "--batch and --tokens must be positive"
    );
    let shape = SelfTestShape {
        batch: args.batch,
        tokens: args.tokens,
        width: args.width,
        heads: args.heads,
    };
    let tolerance = args.tolerance.unwrap_or_else(|| default_tolerance(kind));
    ensure!(
        tolerance.is_finite() && tolerance > 0.0,
        "--tolerance must be a positive number"
    );
    let info = clipa_backends::probe(kind, device)?;
    outln!("clipa check: {info} against the cpu reference");
    // The first run on a GPU compiles kernels; time the second.
    clipa_backends::run(kind, device, SelfTest(shape))?;
    let got = clipa_backends::run(kind, device, SelfTest(shape))?;
    let reference = clipa_backends::run(BackendKind::Cpu, None, SelfTest(shape))
        .context("the cpu reference run failed")?;
    let mut worst: f64 = 0.0;
    for (g, r) in got.iter().zip(&reference) {
        let (out_err, worst_name, grad_err) = part_errors(g, r, kind)?;
        worst = worst.max(out_err).max(grad_err);
        outln!(
            "  {:<9} forward err {:.2e}  grads ({}) max err {:.2e} [{}]  {kind} {:.2}+{:.2} ms  cpu {:.2}+{:.2} ms",
            g.name,
            out_err,
            r.grads.len(),
            grad_err,
            worst_name,
            g.forward_ms,
            g.backward_ms,
            r.forward_ms,
            r.backward_ms,
        );
    }
    let why = match kind {
        BackendKind::Cuda if args.tolerance.is_none() => ", float32 products in TF32",
        _ => "",
    };
    ensure!(
        worst <= tolerance,
        "{kind} differs from the cpu by {worst:.2e} relative error (tolerance {tolerance:.0e}{why})"
    );
    outln!("ok: {kind} matches the cpu within {tolerance:.0e}{why} (worst {worst:.2e})");
    // Mixed precision: the same block with bf16 branches, against float32.
    // Warmed up like the float32 parts: the bf16 kernels compile on the
    // first run, and the second is the one timed.
    clipa_backends::run(kind, device, SelfTestBf16(shape))?;
    let Some(g) = clipa_backends::run(kind, device, SelfTestBf16(shape))? else {
        outln!("bf16 block: skipped, {kind} has no bf16 arithmetic (training runs in float32)");
        return Ok(());
    };
    let r = reference
        .iter()
        .find(|r| r.name == "block")
        .context("the cpu reference has no block part")?;
    let (out_err, worst_name, grad_err) = part_errors(&g, r, kind)?;
    outln!(
        "  {:<10} forward err {out_err:.2e}  grads max err {grad_err:.2e} [{worst_name}]  {kind} {:.2}+{:.2} ms (f32 {:.2}+{:.2} ms)",
        g.name,
        g.forward_ms,
        g.backward_ms,
        got.iter()
            .find(|p| p.name == "block")
            .map_or(0.0, |p| p.forward_ms),
        got.iter()
            .find(|p| p.name == "block")
            .map_or(0.0, |p| p.backward_ms),
    );
    let worst = out_err.max(grad_err);
    ensure!(
        worst <= BF16_TOLERANCE,
        "{kind} bf16 block differs from float32 by {worst:.2e} (tolerance {BF16_TOLERANCE:.0e})"
    );
    outln!("ok: bf16 mixed precision within {BF16_TOLERANCE:.0e} of float32 (worst {worst:.2e})");
    Ok(())
}
