//! `clipa sweep`: runs a scaling grid (core `sweep`), then draws the
//! paper's figures from `sweep.csv`'s records into `OUT/figures/`:
//! accuracy against image tokens and against text tokens (one line per
//! model size), against training compute, and the strategies side by side
//! at equal token counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, Devices};
use clipa_core::reduce::TextReduction;
use clipa_core::sweep::{
    self, ImageStrategy, PointResult, SweepConfig, SweepObserver, SweepOptions, SweepPoint,
    SweepSummary,
};
use clipa_core::train::{Observer, StageConfig, StepMetrics};
use indicatif::ProgressBar;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::plot::{SIZE, padded, register_font_once};
use super::train::{Progress, interrupt_flag};
use crate::args::SweepArgs;

/// `clipa sweep`.
pub fn run(kind: BackendKind, device: Option<usize>, args: &SweepArgs) -> anyhow::Result<()> {
    let mut cfg = match (&args.config, &args.preset) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            SweepConfig::from_toml(&text, path)?
        }
        (None, name) => SweepConfig::preset(name.as_deref().unwrap_or("cpu"))?,
    };
    if args.vocab.is_some() {
        cfg.vocab = args.vocab.clone();
    }
    cfg.validate()?;
    if args.dry_run {
        out!("{}", cfg.to_toml());
        return Ok(());
    }
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("sweeps").join(&cfg.name));
    let opts = SweepOptions {
        output: output.clone(),
        interrupt: interrupt_flag(),
        lexicon: args.lexicon.clone(),
    };
    let summary = clipa_backends::run(kind, device, SweepJob { cfg, opts })?;
    let figures = draw_figures(&summary.results, &output.join("figures"))?;
    print_report(&summary, &figures)?;
    Ok(())
}

struct SweepJob {
    cfg: SweepConfig,
    opts: SweepOptions,
}

impl BackendJob for SweepJob {
    type Output = SweepSummary;

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<SweepSummary> {
        let (device, info) = on.one();
        eprintln!(
            "sweep '{}' on {info}; folder {} (rerun the same command to continue it)",
            self.cfg.name,
            self.opts.output.display()
        );
        let mut watch = Watch {
            progress: Progress {
                bar: ProgressBar::hidden(),
                stages: 1,
            },
        };
        let summary = sweep::run::<B>(&self.cfg, &self.opts, &device, &mut watch);
        watch.progress.bar.finish_and_clear();
        summary
    }
}

/// The training progress bar, plus one line per point.
struct Watch {
    progress: Progress,
}

impl Observer for Watch {
    fn stage_start(&mut self, index: usize, stage: &StageConfig, first_step: u64) {
        self.progress.stage_start(index, stage, first_step);
    }
    fn log(&mut self, m: &StepMetrics, stage_step: u64) {
        self.progress.log(m, stage_step);
    }
    fn message(&mut self, text: &str) {
        self.progress.message(text);
    }
}

impl SweepObserver for Watch {
    fn point_start(&mut self, index: usize, total: usize, point: &SweepPoint, done: bool) {
        let state = if done { " (done)" } else { "" };
        self.progress.message(&format!(
            "point {}/{total} {}{state}",
            index + 1,
            point.id()
        ));
    }
    fn point_done(&mut self, results: &[PointResult]) {
        // Figures after every point, so a long sweep shows its curves early.
        if let Some(last) = results.last() {
            self.progress.message(&format!(
                "  {}: {:.1}% after pre-training, {:.1}% after fine-tuning, {:.1} GFLOP, {:.0} s",
                last.point.id(),
                100.0 * last.pretrain.top1,
                100.0 * last.finetune.top1,
                last.flops() / 1e9,
                last.pretrain.seconds + last.finetune.seconds
            ));
        }
    }
}

fn print_report(s: &SweepSummary, figures: &[PathBuf]) -> anyhow::Result<()> {
    let state = if s.interrupted {
        " — stopped early; rerun the same command to continue"
    } else {
        ""
    };
    outln!(
        "\nsweep: {} of {} points done{state}",
        s.results.len(),
        s.total
    );
    outln!(
        "{:<34} {:>9} {:>9} {:>10} {:>7}",
        "point",
        "pre top1",
        "ft top1",
        "GFLOP",
        "s"
    );
    for r in &s.results {
        outln!(
            "{:<34} {:>8.1}% {:>8.1}% {:>10.1} {:>7.0}",
            r.point.id(),
            100.0 * r.pretrain.top1,
            100.0 * r.finetune.top1,
            r.flops() / 1e9,
            r.pretrain.seconds + r.finetune.seconds
        );
    }
    outln!("  table: {}", s.csv.display());
    for f in figures {
        outln!("  figure: {}", f.display());
    }
    Ok(())
}

/// One drawn line: a label and (x, fine-tuned y, pre-trained y) points.
struct Line {
    label: String,
    points: Vec<(f64, f64, f64)>,
}

/// The models in first-seen order (the sweep's own order: smallest first
/// in the presets).
fn models(results: &[PointResult]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in results {
        if !out.contains(&r.point.model) {
            out.push(r.point.model.clone());
        }
    }
    out
}

/// The token axis a figure varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    Image,
    Text,
}

impl Axis {
    fn name(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Text => "text",
        }
    }

    /// The strategies in figure order.
    fn order(self) -> Vec<&'static str> {
        match self {
            Self::Image => ImageStrategy::ALL.iter().map(|s| s.as_str()).collect(),
            Self::Text => TextReduction::ALL.iter().map(|s| s.as_str()).collect(),
        }
    }

    /// Where `p` sits on this axis: `(strategy, tokens)`, the strategy
    /// `None` at full length; `None` when the other axis is reduced too.
    fn of(self, p: &SweepPoint) -> Option<(Option<&'static str>, usize)> {
        match self {
            Self::Image => p
                .text
                .is_none()
                .then(|| (p.image.map(ImageStrategy::as_str), p.image_tokens)),
            Self::Text => p
                .image
                .is_none()
                .then(|| (p.text.map(TextReduction::as_str), p.text_tokens)),
        }
    }

    /// The strategy used most on this axis (ties: the first in figure order).
    fn main_strategy(self, results: &[PointResult]) -> Option<&'static str> {
        let mut count: BTreeMap<&'static str, usize> = BTreeMap::new();
        for r in results {
            if let Some((Some(s), _)) = self.of(&r.point) {
                *count.entry(s).or_default() += 1;
            }
        }
        let best = count.values().copied().max()?;
        self.order()
            .into_iter()
            .find(|s| count.get(s) == Some(&best))
    }
}

/// Draws the figures that the finished points allow; returns the files.
pub fn draw_figures(results: &[PointResult], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if results.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    register_font_once()?;
    let models = models(results);
    let mut written = Vec::new();
    let pct = |v: f64| 100.0 * v;

    // Accuracy against image tokens (text at full length) and against text
    // tokens (image at full length), one line per model, by the axis's main
    // strategy; the full-length point anchors each line.
    for axis in [Axis::Image, Axis::Text] {
        let Some(s) = axis.main_strategy(results) else {
            continue;
        };
        let lines: Vec<Line> = models
            .iter()
            .map(|m| Line {
                label: m.clone(),
                points: axis_points(results, m, |p| match axis.of(p) {
                    Some((None, t)) => Some(t),
                    Some((Some(x), t)) if x == s => Some(t),
                    _ => None,
                }),
            })
            .filter(|l| l.points.len() >= 2)
            .collect();
        if !lines.is_empty() {
            let what = axis.name();
            let path = dir.join(format!("{what}_tokens.png"));
            let title = format!("zero-shot top-1 vs {what} tokens in pre-training ({s})");
            chart(
                &path,
                &title,
                &format!("{what} tokens (log scale)"),
                &lines,
                true,
            )?;
            written.push(path);
        }
    }
    // Accuracy against compute: every point, one colour per model.
    let lines: Vec<Line> = models
        .iter()
        .map(|m| {
            let mut points: Vec<(f64, f64, f64)> = results
                .iter()
                .filter(|r| &r.point.model == m)
                .map(|r| (r.flops() / 1e9, pct(r.finetune.top1), pct(r.pretrain.top1)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Line {
                label: m.clone(),
                points,
            }
        })
        .collect();
    let path = dir.join("compute.png");
    scatter(
        &path,
        "zero-shot top-1 vs training compute (pre-train + fine-tune)",
        &lines,
    )?;
    written.push(path);
    if let Some(path) = strategies(results, &models, dir)? {
        written.push(path);
    }
    Ok(written)
}

/// (tokens, fine-tuned %, pre-trained %) of one model's points that `x`
/// places on the axis, sorted by tokens.
fn axis_points(
    results: &[PointResult],
    model: &str,
    x: impl Fn(&SweepPoint) -> Option<usize>,
) -> Vec<(f64, f64, f64)> {
    let mut pts: Vec<(f64, f64, f64)> = results
        .iter()
        .filter(|r| r.point.model == model)
        .filter_map(|r| {
            x(&r.point).map(|t| (t as f64, 100.0 * r.finetune.top1, 100.0 * r.pretrain.top1))
        })
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

const COLOURS: [RGBColor; 6] = [BLUE, RED, RGBColor(0, 150, 0), MAGENTA, CYAN, BLACK];

fn err(e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn y_range(lines: &[Line]) -> std::ops::Range<f64> {
    let ys = lines
        .iter()
        .flat_map(|l| l.points.iter().flat_map(|p| [p.1, p.2]));
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(l, h), y| (l.min(y), h.max(y)));
    padded(lo, hi)
}

/// Each model's curve on `c`, in its colour: the pre-trained accuracies
/// faint (with triangles when `pre_markers`), the fine-tuned ones solid
/// with circles and named in the legend by `label`; then the legend.
fn draw_lines<'a, 'b: 'a>(
    c: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    lines: &[Line],
    fx: impl Fn(f64) -> f64,
    label: impl Fn(&Line) -> String,
    pre_markers: bool,
) -> anyhow::Result<()> {
    for (i, l) in lines.iter().enumerate() {
        let col = COLOURS[i % COLOURS.len()];
        let pre: Vec<(f64, f64)> = l.points.iter().map(|p| (fx(p.0), p.2)).collect();
        let ft: Vec<(f64, f64)> = l.points.iter().map(|p| (fx(p.0), p.1)).collect();
        c.draw_series(LineSeries::new(
            pre.iter().copied(),
            col.mix(0.3).stroke_width(1),
        ))
        .map_err(|e| err(&e))?;
        if pre_markers {
            c.draw_series(
                pre.iter()
                    .map(|&p| TriangleMarker::new(p, 4, col.mix(0.3).filled())),
            )
            .map_err(|e| err(&e))?;
        }
        c.draw_series(LineSeries::new(ft.iter().copied(), col.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label(l))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
        c.draw_series(ft.iter().map(|&p| Circle::new(p, 4, col.filled())))
            .map_err(|e| err(&e))?;
    }
    draw_legend(c)
}

/// The legend of every labelled series, boxed in the lower right.
fn draw_legend<'a, 'b: 'a>(
    c: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> anyhow::Result<()> {
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

/// A line chart over a log2 token axis: solid lines fine-tuned, faint
/// lines pre-trained only.
fn chart(path: &Path, title: &str, x_desc: &str, lines: &[Line], log2: bool) -> anyhow::Result<()> {
    let fx = |x: f64| if log2 { x.log2() } else { x };
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| fx(p.0)));
    let (lo, hi) = xs.fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(x), h.max(x)));
    let yr = y_range(lines);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(padded(lo, hi), yr)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc("zero-shot top-1 (%)")
        .x_labels(((hi - lo).round() as usize + 1).max(2))
        .x_label_formatter(&|v| {
            if log2 {
                format!("{:.0}", 2f64.powf(*v))
            } else {
                format!("{v:.0}")
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    let label = |l: &Line| format!("{} (faint: before fine-tuning)", l.label);
    draw_lines(&mut c, lines, fx, label, true)?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Fine-tuned accuracy against log10 GFLOP, one marker colour per model.
fn scatter(path: &Path, title: &str, lines: &[Line]) -> anyhow::Result<()> {
    let xs = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0.log10()));
    let (lo, hi) = xs.fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(x), h.max(x)));
    let yr = {
        let ys = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
        let (l, h) = ys.fold((f64::MAX, f64::MIN), |(l, h), y| (l.min(y), h.max(y)));
        padded(l, h)
    };
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(padded(lo, hi), yr)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("training GFLOP (log scale)")
        .y_desc("zero-shot top-1 after fine-tuning (%)")
        .x_label_formatter(&|v| format!("{:.0}", 10f64.powf(*v)))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, l) in lines.iter().enumerate() {
        let col = COLOURS[i % COLOURS.len()];
        c.draw_series(
            l.points
                .iter()
                .map(|p| Circle::new((p.0.log10(), p.1), 5, col.filled())),
        )
        .map_err(|e| err(&e))?
        .label(l.label.clone())
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, col.filled()));
    }
    draw_legend(&mut c)?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The strategies at equal token counts: the image panel at the reduced
/// image count with the most strategies (text full), the text panel
/// likewise; x is the strategy, one line per model. `None` when no count
/// has two strategies.
fn strategies(
    results: &[PointResult],
    models: &[String],
    dir: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    // (axis title, strategy names, per model: per strategy: fine-tuned %)
    type Panel = (String, Vec<&'static str>, Vec<Line>);
    let panel = |axis: Axis| -> Option<Panel> {
        let mut by_count: BTreeMap<usize, Vec<&'static str>> = BTreeMap::new();
        for r in results {
            if let Some((Some(n), count)) = axis.of(&r.point) {
                let v = by_count.entry(count).or_default();
                if !v.contains(&n) {
                    v.push(n);
                }
            }
        }
        let (&count, names) = by_count.iter().max_by_key(|(_, v)| v.len())?;
        if names.len() < 2 {
            return None;
        }
        let order = axis.order();
        let mut names = names.clone();
        names.sort_by_key(|n| order.iter().position(|o| o == n));
        let lines = models
            .iter()
            .map(|m| Line {
                label: m.clone(),
                points: names
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| {
                        results
                            .iter()
                            .find(|r| {
                                &r.point.model == m && axis.of(&r.point) == Some((Some(*n), count))
                            })
                            .map(|r| (i as f64, 100.0 * r.finetune.top1, 100.0 * r.pretrain.top1))
                    })
                    .collect(),
            })
            .filter(|l: &Line| l.points.len() >= 2)
            .collect::<Vec<_>>();
        Some((format!("{count} {} tokens", axis.name()), names, lines))
    };
    let panels: Vec<Panel> = [panel(Axis::Image), panel(Axis::Text)]
        .into_iter()
        .flatten()
        .collect();
    if panels.is_empty() {
        return Ok(None);
    }
    let path = dir.join("strategies.png");
    draw_panels(&path, &panels)?;
    Ok(Some(path))
}

/// Draws the strategy panels side by side into `path`.
fn draw_panels(
    path: &Path,
    panels: &[(String, Vec<&'static str>, Vec<Line>)],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            "strategies at equal token counts (solid: fine-tuned, faint: pre-trained)",
            ("sans-serif", 20),
        )
        .map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (title, names, lines)) in areas.iter().zip(panels) {
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5..names.len() as f64 - 0.5, y_range(lines))
            .map_err(|e| err(&e))?;
        let names = names.clone();
        c.configure_mesh()
            .x_labels(names.len() * 2 + 1)
            .x_label_formatter(&move |v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 {
                    names
                        .get(i as usize)
                        .map_or(String::new(), |s| s.to_string())
                } else {
                    String::new()
                }
            })
            .y_desc("zero-shot top-1 (%)")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        draw_lines(&mut c, lines, |x| x, |l| l.label.clone(), false)?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
