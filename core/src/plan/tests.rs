//! Tests of `plan`.

use super::*;

fn a100s(gpus: usize, hours: f64) -> Budget {
    Budget {
        gpus,
        gpu: Gpu::A100,
        hours,
        samples: None,
        data: None,
        tflops: None,
    }
}

fn chosen(p: &Plan) -> &Candidate {
    &p.candidates[p.choice.expect("a recipe fits")]
}

#[test]
fn the_papers_own_budgets_give_the_papers_own_choices() {
    // CLIPA-v1: 63.2 / 67.8 / 69.3 % in about 2 / 3 / 4 days on 8 A100s.
    for (days, preset) in [
        (2.0, "clipa-b16-i112-t16"),
        (3.0, "clipa-l16-i64-t16"),
        (4.0, "clipa-l16-i96-t8"),
    ] {
        let p = plan(a100s(8, 24.0 * days)).unwrap();
        let c = chosen(&p);
        assert_eq!(c.run.preset, preset, "{days} days");
        assert!(c.hours <= 24.0 * days);
    }
    // Four days: an L/16-class model at short image and text sequences.
    let p = plan(a100s(8, 96.0)).unwrap();
    let c = chosen(&p);
    let model = ClipConfig::preset(&c.config.model).unwrap();
    assert_eq!(model.vision.width, 1024);
    let pre = &c.config.stages[0];
    assert!(pre.image_tokens(model.vision.patch_size) <= 64 && pre.text_length <= 16);
    // The bracket: the best cheaper recipe and the next better one.
    assert_eq!(
        p.candidates[p.below.unwrap()].run.preset,
        "clipa-l16-i64-t16"
    );
    assert_eq!(
        p.candidates[p.above.unwrap()].run.preset,
        "clipa-h14-i84-t8"
    );
    // CLIPA-v2's H/14 at 81.1 % took 5,920 A100-hours.
    let p = plan(Budget {
        data: Some(Dataset::Datacomp1b),
        ..a100s(64, 5920.0 / 64.0 * 1.2)
    })
    .unwrap();
    assert_eq!(chosen(&p).run.preset, "clipa-v2-h14-70-224");
}

#[test]
fn calibration_is_the_published_runs_own_throughput() {
    let c = a100_calibration();
    assert_eq!(c.runs, 10);
    // 20–30 % of the A100's bf16 peak, the range large CLIP runs report.
    assert!(c.min > 55.0 && c.max < 100.0 && c.median > 75.0, "{c:?}");
    // L/16 (I37, T8): 2.4B samples at 36 patches and 8 tokens plus
    // 131M at 196 patches and 32 tokens.
    let cfg = TrainConfig::preset("clipa-l16-i96-t8").unwrap();
    let (pre, rest) = run_flops(&cfg).unwrap();
    let l16 = ClipConfig::clipa_l16();
    let want_pre = l16.flops(36, 8).train() as f64 * cfg.stages[0].samples() as f64;
    let want_rest = l16.flops(196, 32).train() as f64 * cfg.stages[1].samples() as f64;
    assert!((pre / want_pre - 1.0).abs() < 1e-12);
    assert!((rest / want_rest - 1.0).abs() < 1e-12);
    // About 4 days on 8 A100s at the calibrated speed.
    let hours = (pre + rest) / (8.0 * c.median * 1e12) / 3600.0;
    assert!((80.0..96.0).contains(&hours), "{hours}");
}

#[test]
fn fewer_samples_cost_less_and_are_expected_to_score_less() {
    let base = plan(a100s(8, 96.0)).unwrap();
    let short = plan(Budget {
        samples: Some(0.5e9),
        ..a100s(8, 96.0)
    })
    .unwrap();
    let find = |p: &Plan, name: &str| {
        p.candidates
            .iter()
            .find(|c| c.run.preset == name && c.run.data == Dataset::Laion400m)
            .unwrap()
            .clone()
    };
    let (a, b) = (
        find(&base, "clipa-l16-i96-t8"),
        find(&short, "clipa-l16-i96-t8"),
    );
    assert!(b.pretrain_flops < 0.25 * a.pretrain_flops);
    assert_eq!(a.finetune_flops, b.finetune_flops);
    assert_eq!(a.expected, 69.3);
    // log10(0.5B / 2.4B) × 5.4 ≈ −3.7 points.
    assert!((b.expected - (69.3 - 3.69)).abs() < 0.05, "{}", b.expected);
    // At 0.5B samples the same 4 days buy a costlier recipe than L/16
    // (I37, T8), expected to beat it at that sample count.
    let c = chosen(&short);
    assert!(c.hours <= 96.0 && c.expected > b.expected, "{c:?}");
    assert!(c.pretrain_flops + c.finetune_flops > b.pretrain_flops + b.finetune_flops);
}

#[test]
fn a_tiny_budget_shortens_the_cheapest_recipe_or_says_why_not() {
    let p = plan(a100s(8, 12.0)).unwrap();
    assert!(p.choice.is_none());
    let s = p.shortened.as_ref().unwrap();
    assert_eq!(s.run.preset, "clipa-b16-i112-t16");
    assert!(s.hours <= 12.0 * 1.0001 && s.hours > 11.5, "{}", s.hours);
    assert!(s.expected < 63.2);
    let err = plan(a100s(1, 1.0)).unwrap_err().to_string();
    assert!(err.contains("does not cover even the fine-tuning"), "{err}");
    assert!("a100".parse::<Gpu>().is_ok() && "H100".parse::<Gpu>().is_ok());
    assert!(
        "tpu"
            .parse::<Gpu>()
            .unwrap_err()
            .to_string()
            .contains("a100, h100")
    );
    assert!(plan(a100s(0, 1.0)).is_err());
}

#[test]
fn every_published_run_names_a_valid_preset() {
    for r in PUBLISHED {
        let cfg = TrainConfig::preset(r.preset).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.stages.len() >= 2, "{}", r.preset);
    }
}
