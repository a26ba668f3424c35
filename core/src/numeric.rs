//! Numeric helpers: relative error between tensors and deterministic host
//! noise. Used by tests, the integration tests and the `check` self-test.

use burn::tensor::TensorData;

/// The backend unit tests of `clipa-core` run on: Burn's pure-Rust CPU
/// backend, with autodiff. `core` itself stays backend-generic; this alias
/// exists only for tests.
#[cfg(test)]
pub type TestBackend = burn::backend::Autodiff<burn::backend::NdArray>;

/// Relative L2 error `‖a − b‖ / max(‖b‖, tiny)` between two tensors of the
/// same shape, computed in f64 on the host.
pub fn relative_error(a: &TensorData, b: &TensorData) -> f64 {
    assert_eq!(a.shape, b.shape, "shapes differ");
    let a = a.clone().convert::<f64>();
    let b = b.clone().convert::<f64>();
    let (a, b) = (
        a.as_slice::<f64>().expect("converted to f64"),
        b.as_slice::<f64>().expect("converted to f64"),
    );
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    diff.sqrt() / norm.sqrt().max(1e-30)
}

/// Panics with the tensor name and error when `a` and `b` differ by more
/// than `tol` relative L2 error.
pub fn assert_close(a: &TensorData, b: &TensorData, tol: f64, what: &str) {
    let err = relative_error(a, b);
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.1e}");
}

/// Deterministic N(0, std²) host data from a seed, identical on every
/// platform (splitmix64 + Box–Muller), so that backends can be compared on
/// bit-identical inputs.
pub fn normal_data(shape: impl Into<Vec<usize>>, seed: u64, std: f32) -> TensorData {
    let shape: Vec<usize> = shape.into();
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits → (0, 1]
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (next(), next());
            let r = (-2.0 * u1.ln()).sqrt();
            (r * (std::f64::consts::TAU * u2).cos()) as f32 * std
        })
        .collect();
    TensorData::new(values, shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_data_has_unit_moments() {
        let d = normal_data([100_000], 7, 1.0);
        let v = d.as_slice::<f32>().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert_eq!(normal_data([4], 1, 1.0), normal_data([4], 1, 1.0));
        assert_ne!(normal_data([4], 1, 1.0), normal_data([4], 2, 1.0));
    }

    #[test]
    fn relative_error_is_relative() {
        let a = TensorData::from([1.0f32, 2.0]);
        let b = TensorData::from([1.0f32, 2.0 + 1e-3]);
        let e = relative_error(&b, &a);
        assert!((e - 1e-3 / 5f64.sqrt()).abs() < 1e-9, "{e}");
    }
}
