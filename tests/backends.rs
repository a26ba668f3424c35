//! Cross-backend parity: the same weights and inputs on `wgpu` and on `cpu`
//! give the same outputs and gradients, to 1e-4 relative L2 error.

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_block_matches_cpu() {
    use clipa_backends::{CpuBackend, WgpuBackend, wgpu_device};
    use clipa_core::numeric::{compare_sets, relative_error};
    use clipa_core::selftest::{self, SelfTestShape};

    use crate::common::skip_or_fail;

    let (device, info) = match wgpu_device(None) {
        Ok(found) => found,
        Err(err) => return skip_or_fail("wgpu_block_matches_cpu", &err.to_string()),
    };
    eprintln!("wgpu adapter: {info}");
    let shape = SelfTestShape::default();
    let got = selftest::run::<WgpuBackend>(&device, shape).expect("wgpu run");
    let want = selftest::run::<CpuBackend>(&Default::default(), shape).expect("cpu run");
    for (g, w) in got.iter().zip(&want) {
        let e = relative_error(&g.output, &w.output);
        assert!(e <= 1e-4, "{} output differs: {e:.2e}", g.name);
        assert_eq!(g.grads.len(), w.grads.len(), "{}", g.name);
        let errs = compare_sets(&g.grads, &w.grads).expect("same gradient names");
        for (name, e) in errs {
            assert!(e <= 1e-4, "{} grad {name} differs: {e:.2e}", g.name);
        }
        eprintln!(
            "{}: wgpu vs cpu within 1e-4 ({} gradients)",
            g.name,
            w.grads.len()
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_check_command_passes() {
    use crate::common::{clipa, skip_or_fail, text};

    if let Err(err) = clipa_backends::probe(clipa_backends::BackendKind::Wgpu, None) {
        return skip_or_fail("wgpu_check_command_passes", &err.to_string());
    }
    let out = clipa(&["--backend", "wgpu", "check"]);
    let (stdout, stderr) = text(&out);
    eprintln!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok: wgpu matches the cpu"), "{stdout}");
}

/// Each MLP activation, forward and backward, on wgpu against cpu. Guards
/// the composed exact GELU: Burn 0.21's fused `gelu` backward on CubeCL
/// backends is off by ~4e-4 relative error.
#[cfg(feature = "wgpu")]
#[test]
fn activations_match_cpu_on_wgpu() {
    use burn::tensor::Tensor;
    use burn::tensor::backend::AutodiffBackend;
    use clipa_backends::{CpuBackend, WgpuBackend, wgpu_device};
    use clipa_core::nn::Activation;
    use clipa_core::numeric::{normal_data, relative_error};

    use crate::common::skip_or_fail;

    fn run<B: AutodiffBackend>(
        act: Activation,
        device: &B::Device,
    ) -> [burn::tensor::TensorData; 2] {
        let x = Tensor::<B, 2>::from_data(normal_data([64, 256], 1, 2.0), device).require_grad();
        let w = Tensor::<B, 2>::from_data(normal_data([64, 256], 2, 1.0), device);
        let y = act.forward(x.clone());
        let grads = (y.clone() * w).sum().backward();
        [
            y.into_data(),
            x.grad(&grads).expect("x has a gradient").into_data(),
        ]
    }

    let (device, _) = match wgpu_device(None) {
        Ok(found) => found,
        Err(err) => return skip_or_fail("activations_match_cpu_on_wgpu", &err.to_string()),
    };
    for act in [
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
    ] {
        let [yc, gc] = run::<CpuBackend>(act, &Default::default());
        let [yw, gw] = run::<WgpuBackend>(act, &device);
        let (ef, eb) = (relative_error(&yw, &yc), relative_error(&gw, &gc));
        assert!(
            ef <= 1e-6 && eb <= 1e-6,
            "{act:?}: forward {ef:.2e}, backward {eb:.2e}"
        );
    }
}
