//! Parity with OpenCLIP on the reference fixtures in
//! `tests/fixtures/openclip/` (made by `tests/fixtures/make_fixtures.py`,
//! OpenCLIP 3.3.0, float32 CPU): both tiny models go through the import path and must
//! match OpenCLIP's features, logits, every per-block activation, the loss
//! and every parameter gradient.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use clipa_core::io::read_safetensors;
use clipa_core::loss::{clip_loss, logits};
use clipa_core::model::{ClipModel, Trace};
use clipa_core::numeric::{compare_sets, relative_error};
use clipa_core::openclip::{export_state, import_state, parse_config};
use clipa_core::state::{StateDict, grads_dict, load_state_dict};

use crate::common::{fixture_dir, skip_or_fail};

struct Fixture {
    name: &'static str,
    config_json: String,
    weights: StateDict,
    io: StateDict,
}

fn load(name: &'static str) -> Fixture {
    let dir = fixture_dir(name);
    Fixture {
        name,
        config_json: std::fs::read_to_string(dir.join("model_cfg/CLIPA-tiny-ref.json"))
            .expect("config"),
        weights: read_safetensors(&dir.join("openclip_tiny_weights.safetensors"))
            .expect("weights")
            .tensors,
        io: read_safetensors(&dir.join("openclip_tiny_io.safetensors"))
            .expect("io")
            .tensors,
    }
}

/// Runs one fixture on backend `B` and checks every reference tensor.
/// `tol_out`: features and logits; activations get 10× that (they are
/// un-normalised and larger); gradients `tol_grad`.
fn check<B: AutodiffBackend>(fx: &Fixture, device: &B::Device, tol_out: f64, tol_grad: f64) {
    let cfg = parse_config(&fx.config_json).expect("fixture config parses");
    let state = import_state(&fx.weights, &cfg.clip, cfg.custom_text).expect("fixture imports");
    let model: ClipModel<B> = load_state_dict(cfg.clip.init(device), &state).expect("weights load");

    let image = Tensor::<B, 4>::from_data(fx.io["input.image"].clone(), device);
    let text = Tensor::<B, 2, Int>::from_data(fx.io["input.text"].clone().convert::<i64>(), device);
    let mut trace = Trace::on();
    let raw_image = model.visual.forward_traced(image.clone(), None, &mut trace);
    let raw_text = model.text.forward_traced(text.clone(), &mut Trace::off());
    let (image_features, text_features) = model.features(image, None, text, &mut Trace::off());
    let logits_per_image = logits(
        image_features.clone(),
        text_features.clone(),
        model.logit_scale.val(),
    );
    let loss = clip_loss(logits_per_image.clone());

    let mut checked = 0;
    let mut expect = |key: &str, got: TensorData, tol: f64| {
        let want = &fx.io[key];
        let got = got.convert::<f32>();
        let err = relative_error(&got, want);
        if err > tol / 100.0 {
            eprintln!("{}: {key} relative error {err:.2e}", fx.name);
        }
        assert!(
            err <= tol,
            "{}: {key} relative error {err:.2e} > {tol:.0e}",
            fx.name
        );
        checked += 1;
    };
    expect("out.image_features_raw", raw_image.into_data(), tol_out);
    expect("out.text_features_raw", raw_text.into_data(), tol_out);
    expect("out.image_features", image_features.into_data(), tol_out);
    expect("out.text_features", text_features.into_data(), tol_out);
    expect(
        "out.logits_per_image",
        logits_per_image.clone().into_data(),
        tol_out,
    );
    expect(
        "out.logits_per_text",
        logits_per_image.transpose().into_data(),
        tol_out,
    );
    expect(
        "out.logit_scale_exp",
        model.temperature().into_data(),
        tol_out,
    );
    expect("out.clip_loss", loss.clone().into_data(), tol_out);
    // Text activations come from the full forward's text pass.
    let mut text_trace = Trace::on();
    model.text.forward_traced(
        Tensor::from_data(fx.io["input.text"].clone().convert::<i64>(), device),
        &mut text_trace,
    );
    for (key, got) in trace.acts.into_iter().chain(text_trace.acts) {
        expect(&format!("act.{key}"), got, 10.0 * tol_out);
    }
    let n_acts = fx.io.keys().filter(|k| k.starts_with("act.")).count();
    assert_eq!(
        checked,
        8 + n_acts,
        "{}: every activation compared",
        fx.name
    );

    let grads = loss.backward();
    let ours = export_state(&grads_dict(&model, &grads), &cfg.clip, cfg.custom_text);
    let want: StateDict = fx
        .io
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("grad.").map(|k| (k.to_string(), v.clone())))
        .collect();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{}: the same parameters receive gradients",
        fx.name
    );
    let errs = compare_sets(&ours, &want).expect("same names");
    let mut worst = errs.clone();
    worst.sort_by(|a, b| b.1.total_cmp(&a.1));
    eprintln!("{}: largest gradient errors {:?}", fx.name, &worst[..3]);
    for (name, e) in &errs {
        assert!(
            *e <= tol_grad,
            "{}: grad {name} error {e:.2e} > {tol_grad:.0e}; worst rows {}",
            fx.name,
            worst_rows(&ours[*name], &want[*name])
        );
    }
    eprintln!(
        "{}: {} outputs/activations and {} gradients match OpenCLIP",
        fx.name,
        checked,
        errs.len()
    );
}

/// `row: |diff| / |want|` for the three rows of a 2-D tensor that differ
/// most, to tell roundoff in a cancelled sum from a wrong row.
fn worst_rows(got: &TensorData, want: &TensorData) -> String {
    let cols = *want.shape.last().unwrap_or(&1);
    let (g, w) = (got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
    let mut rows: Vec<(usize, f64, f64)> = g
        .chunks(cols)
        .zip(w.chunks(cols))
        .enumerate()
        .map(|(i, (a, b))| {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let n = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
            (i, d, n)
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows.iter()
        .take(3)
        .map(|(i, d, n)| format!("{i}: {d:.2e}/{n:.2e}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn on_cpu(name: &'static str) {
    let fx = load(name);
    // With the CPU's kernels installed, as every command runs it.
    let _kernels = clipa_backends::install_kernels(clipa_backends::BackendKind::Cpu);
    check::<clipa_backends::CpuBackend>(&fx, &Default::default(), 1e-5, 1e-4);
}

#[cfg(feature = "wgpu")]
fn on_wgpu(name: &'static str) {
    let fx = load(name);
    match clipa_backends::wgpu_device(None) {
        Ok((device, info)) => {
            eprintln!("{name} on {info}");
            check::<clipa_backends::WgpuBackend>(&fx, &device, 1e-4, 1e-4);
        }
        Err(err) => skip_or_fail(name, &err.to_string()),
    }
}

/// On CUDA, Burn's matmul stages float32 operands as TF32 on any GPU with
/// TF32 tensor cores (11 significant bits, 2⁻¹¹ ≈ 4.9e-4 per product), so
/// the tolerances are those of `clipa --backend cuda check`: 1e-2. A wrong
/// weight, bias or layout still misses by O(1). With no CUDA device the test
/// prints why and skips, under CI too: CI machines have no GPU, and
/// `ci/gpu.sh` runs these on a lent one.
#[cfg(feature = "cuda")]
fn on_cuda(name: &'static str) {
    let fx = load(name);
    match clipa_backends::cuda_device(None) {
        Ok((device, info)) => {
            eprintln!("{name} on {info}");
            check::<clipa_backends::CudaBackend>(&fx, &device, 1e-2, 1e-2);
        }
        Err(err) => eprintln!("SKIPPED {name} on cuda: {err}"),
    }
}

#[test]
fn openai_style_matches_openclip_on_cpu() {
    on_cpu("openai_style");
}

#[test]
fn clipa_style_matches_openclip_on_cpu() {
    on_cpu("clipa_style");
}

#[cfg(feature = "wgpu")]
#[test]
fn openai_style_matches_openclip_on_wgpu() {
    on_wgpu("openai_style");
}

#[cfg(feature = "wgpu")]
#[test]
fn clipa_style_matches_openclip_on_wgpu() {
    on_wgpu("clipa_style");
}

#[cfg(feature = "cuda")]
#[test]
fn openai_style_matches_openclip_on_cuda() {
    on_cuda("openai_style");
}

#[cfg(feature = "cuda")]
#[test]
fn clipa_style_matches_openclip_on_cuda() {
    on_cuda("clipa_style");
}

/// The fixture's frozen sin-cos table is what clipa computes itself.
#[test]
fn sincos_table_matches_openclip() {
    let fx = load("clipa_style");
    let table = clipa_core::model::posemb::sincos_2d(64, 8, 8);
    let got = TensorData::new(table, [65, 64]);
    let err = relative_error(&got, &fx.weights["visual.positional_embedding"]);
    assert!(err < 1e-6, "sin-cos table differs: {err:.2e}");
}
