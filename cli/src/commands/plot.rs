//! `clipa plot RUN_DIR`: draws the training curves of a run folder from its
//! `metrics.jsonl` (one `clipa_core::train::StepMetrics` per line) into
//! `RUN_DIR/plots/`, one PNG per quantity, with a red vertical line wherever a new
//! stage begins. Text is set in a bundled ASCII subset of DejaVu Sans
//! (`cli/assets/`, Bitstream Vera licence inside the font) through
//! plotters' `ab_glyph` backend, so no system fonts or fontconfig are needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, bail, ensure};
use clipa_core::train::StepMetrics;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Pixel size of every chart.
pub(super) const SIZE: (u32, u32) = (960, 540);

/// DejaVu Sans cut down to printable ASCII with `pyftsubset --unicodes=U+0020-007E`.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-ascii.ttf");

/// Draws the charts of `run_dir` and prints the files written.
pub fn run(run_dir: &Path) -> anyhow::Result<()> {
    for file in plot_run(run_dir)? {
        outln!("{}", file.display());
    }
    Ok(())
}

/// Draws the charts of a run folder; returns the files written.
pub fn plot_run(run_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    ensure!(
        run_dir.is_dir(),
        "run folder {} does not exist",
        run_dir.display()
    );
    let metrics = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let out = run_dir.join("plots");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    register_font_once()?;

    let bounds = stage_starts(&metrics);
    let series = |f: fn(&StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|m| Some((m.step as f64, f(m)?)))
            .collect()
    };
    let mut charts = vec![
        ("loss.png", "training loss", series(|m| Some(m.loss))),
        ("lr.png", "learning rate", series(|m| Some(m.lr))),
    ];
    let zeroshot = series(|m| m.zeroshot_top1.map(|t| 100.0 * t));
    if !zeroshot.is_empty() {
        charts.push(("zeroshot.png", "zero-shot top-1 (%)", zeroshot));
    }
    let mut written = Vec::with_capacity(charts.len());
    for (name, title, points) in charts {
        let path = out.join(name);
        draw(&path, title, &points, &bounds)
            .with_context(|| format!("cannot draw {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Parses every non-blank line of `metrics.jsonl`.
fn read_metrics(path: &Path) -> anyhow::Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read metrics file {}", path.display()))?;
    let mut metrics = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: StepMetrics = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: malformed metrics", path.display(), i + 1))?;
        metrics.push(m);
    }
    if metrics.is_empty() {
        bail!("{} has no metrics lines", path.display());
    }
    Ok(metrics)
}

/// Steps of the first logged line of every stage after the first.
fn stage_starts(metrics: &[StepMetrics]) -> Vec<f64> {
    metrics
        .windows(2)
        .filter(|w| w[0].stage != w[1].stage)
        .map(|w| w[1].step as f64)
        .collect()
}

/// Registers the bundled font as plotters' default family, once per process.
pub(super) fn register_font_once() -> anyhow::Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    ensure!(ok, "the bundled font does not parse");
    Ok(())
}

/// `lo..hi` widened by 5% each side, and to a unit span when flat, so a
/// single point or a constant curve still gets a drawable axis.
pub(super) fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = hi - lo;
    if span <= f64::EPSILON * hi.abs().max(1.0) {
        let pad = (0.5 * lo.abs()).max(0.5);
        return lo - pad..hi + pad;
    }
    lo - 0.05 * span..hi + 0.05 * span
}

/// Formats a value-axis tick: scientific notation only for axes whose
/// largest magnitude is tiny or huge (learning rates), plain decimals else.
fn tick(v: f64, scale: f64) -> String {
    if !(0.01..1e5).contains(&scale) {
        format!("{v:.1e}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws one line chart of `points` (step, value) with stage starts marked.
fn draw(path: &Path, title: &str, points: &[(f64, f64)], bounds: &[f64]) -> anyhow::Result<()> {
    let (xs, ys) = points.iter().fold(
        ((f64::MAX, f64::MIN), (f64::MAX, f64::MIN)),
        |((xl, xh), (yl, yh)), &(x, y)| ((xl.min(x), xh.max(x)), (yl.min(y), yh.max(y))),
    );
    let (x_range, y_range) = (padded(xs.0, xs.1), padded(ys.0, ys.1));
    // plotters' errors borrow the backend, so they are turned into text here.
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range.clone(), y_range.clone())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_label_formatter(&|v| tick(*v, y_range.end.abs().max(y_range.start.abs())))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    let stage = RED.mix(0.6).stroke_width(1);
    let lines = bounds
        .iter()
        .map(|&b| PathElement::new(vec![(b, y_range.start), (b, y_range.end)], stage));
    chart.draw_series(lines).map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    if points.len() < 50 {
        // Sparse series (zero-shot evaluations) read better with markers.
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty temporary folder, deleted when the returned guard
    /// drops: bind it for the whole test.
    fn temp_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn line(step: u64, stage: usize, zeroshot: Option<f64>) -> String {
        let loss = 5.0 / (1.0 + step as f64);
        let zs = zeroshot
            .map(|z| format!(r#","zeroshot_top1":{z}"#))
            .unwrap_or_default();
        format!(
            r#"{{"step":{step},"stage":{stage},"loss":{loss},"lr":{},"temperature":14.3,"grad_norm":1.5,"images_per_sec":900.0,"data_wait":0.1{zs}}}"#,
            1e-3 * step as f64
        )
    }

    /// Decodes `path`, checks its size and that it is not one flat colour;
    /// returns how many pixels are red (stage lines).
    fn check_png(path: &Path) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), SIZE, "{}", path.display());
        let first = *img.get_pixel(0, 0);
        let differing = img.pixels().filter(|p| **p != first).count();
        assert!(
            differing > 1000,
            "{}: only {differing} non-background pixels",
            path.display()
        );
        let red =
            |p: &&image::Rgb<u8>| p[0] > p[1].saturating_add(60) && p[0] > p[2].saturating_add(60);
        img.pixels().filter(red).count()
    }

    #[test]
    fn draws_loss_lr_and_zeroshot() {
        let dir_tmp = temp_dir();
        let dir = dir_tmp.path();
        let mut text: String = (0..20)
            .map(|s| {
                line(
                    s * 10,
                    (s / 10) as usize,
                    (s % 5 == 4).then_some(0.05 * s as f64),
                ) + "\n"
            })
            .collect();
        text.push('\n'); // a trailing blank line is fine
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        let files = plot_run(dir).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["loss.png", "lr.png", "zeroshot.png"]);
        for f in &files {
            assert_eq!(f.parent().unwrap(), dir.join("plots"));
            // One stage start (step 100): a red line about the plot's height.
            let red = check_png(f);
            assert!(
                (300..2000).contains(&red),
                "{}: {red} red pixels",
                f.display()
            );
        }
    }

    #[test]
    fn no_zeroshot_chart_without_values_and_single_point() {
        let dir_tmp = temp_dir();
        let dir = dir_tmp.path();
        std::fs::write(dir.join("metrics.jsonl"), line(7, 0, None)).unwrap();
        let files = plot_run(dir).unwrap();
        assert_eq!(files.len(), 2);
        assert!(
            files.iter().all(|f| check_png(f) == 0),
            "no stage line expected"
        );
        assert!(!dir.join("plots/zeroshot.png").exists());
    }

    #[test]
    fn stage_starts_are_the_first_step_of_each_new_stage() {
        let m: Vec<StepMetrics> = [(10, 0), (20, 0), (30, 1), (40, 2)]
            .iter()
            .map(|&(s, st)| serde_json::from_str(&line(s, st, None)).unwrap())
            .collect();
        assert_eq!(stage_starts(&m), [30.0, 40.0]);
    }

    #[test]
    fn malformed_line_names_its_number() {
        let dir_tmp = temp_dir();
        let dir = dir_tmp.path();
        let text = format!(
            "{}\n{}\n{{\"step\": 3\n",
            line(1, 0, None),
            line(2, 0, None)
        );
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        let err = format!("{:#}", plot_run(dir).unwrap_err());
        assert!(err.contains("line 3: malformed"), "{err}");
    }

    #[test]
    fn missing_and_empty_inputs_are_errors() {
        let dir_tmp = temp_dir();
        let dir = dir_tmp.path();
        let err = plot_run(&dir.join("nope")).unwrap_err().to_string();
        assert!(
            err.contains("nope") && err.contains("does not exist"),
            "{err}"
        );
        let err = format!("{:#}", plot_run(dir).unwrap_err());
        assert!(err.contains("metrics.jsonl"), "{err}");
        std::fs::write(dir.join("metrics.jsonl"), "\n\n").unwrap();
        let err = plot_run(dir).unwrap_err().to_string();
        assert!(err.contains("no metrics lines"), "{err}");
    }

    #[test]
    fn padded_ranges_and_ticks() {
        assert_eq!(padded(0.0, 10.0), -0.5..10.5);
        assert_eq!(padded(4.0, 4.0), 2.0..6.0);
        assert_eq!(padded(0.0, 0.0), -0.5..0.5);
        // Scientific notation only for tiny or huge axes.
        assert_eq!(tick(2.5, 6.0), "2.50");
        assert_eq!(tick(2.5e-4, 1e-3), "2.5e-4");
        assert_eq!(tick(3e5, 4e5), "3.0e5");
    }
}
