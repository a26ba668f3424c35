//! Numeric helpers: relative error between tensors and deterministic host
//! noise. Used by tests, the integration tests and the `check` self-test.

use std::collections::BTreeMap;

use burn::tensor::TensorData;

/// The backend unit tests of `clipa-core` run on: Burn's pure-Rust CPU
/// backend, with autodiff. `core` itself stays backend-generic; this alias
/// exists only for tests.
#[cfg(test)]
pub type TestBackend = burn::backend::Autodiff<burn::backend::Flex>;

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

/// L2 norm of a tensor, in f64.
pub fn l2_norm(a: &TensorData) -> f64 {
    a.clone()
        .convert::<f64>()
        .as_slice::<f64>()
        .expect("converted to f64")
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
}

/// Compares two sets of named tensors (e.g. all gradients of a model).
///
/// Each tensor's error is `‖a − b‖ / max(‖b‖, rms·√n)`, where `rms` is the
/// root-mean-square element of the whole reference set and `n` the tensor's
/// size: a tensor far smaller than its peers is judged against the typical
/// magnitude. Without that floor, gradients that are analytically zero —
/// the attention key bias (softmax ignores a constant shift of a query's
/// scores) — are pure roundoff on both sides and their "relative" error is
/// noise over noise. Returns `(name, error)` per reference tensor, or
/// `Err(name)` for the first one missing from `got`.
pub fn compare_sets<'a>(
    got: &BTreeMap<String, TensorData>,
    want: &'a BTreeMap<String, TensorData>,
) -> Result<Vec<(&'a str, f64)>, &'a str> {
    let (sq, n): (f64, usize) = want
        .values()
        .map(|t| (l2_norm(t).powi(2), t.num_elements()))
        .fold((0.0, 0), |(s, c), (x, m)| (s + x, c + m));
    let rms = (sq / n.max(1) as f64).sqrt();
    want.iter()
        .map(|(name, w)| {
            let g = got.get(name).ok_or(name.as_str())?;
            let diff = l2_norm(&sub(g, w));
            let floor = rms * (w.num_elements() as f64).sqrt();
            Ok((name.as_str(), diff / l2_norm(w).max(floor).max(1e-30)))
        })
        .collect()
}

fn sub(a: &TensorData, b: &TensorData) -> TensorData {
    assert_eq!(a.shape, b.shape, "shapes differ");
    let a = a.clone().convert::<f64>();
    let b = b.clone().convert::<f64>();
    let d: Vec<f64> = a
        .as_slice::<f64>()
        .expect("f64")
        .iter()
        .zip(b.as_slice::<f64>().expect("f64"))
        .map(|(x, y)| x - y)
        .collect();
    TensorData::new(d, a.shape.clone())
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
    fn compare_sets_floors_tiny_tensors() {
        let mut want = BTreeMap::new();
        want.insert(
            "big".to_string(),
            TensorData::from([1.0f32, -1.0, 1.0, -1.0]),
        );
        want.insert(
            "zero".to_string(),
            TensorData::from([1e-7f32, -1e-7, 0.0, 0.0]),
        );
        let mut got = want.clone();
        got.insert(
            "zero".to_string(),
            TensorData::from([-1e-7f32, 1e-7, 0.0, 0.0]),
        );
        let errs = compare_sets(&got, &want).unwrap();
        let zero = errs.iter().find(|(n, _)| *n == "zero").unwrap().1;
        assert!(zero < 1e-6, "roundoff on an analytic zero passes: {zero}");
        got.insert(
            "big".to_string(),
            TensorData::from([1.0f32, -1.0, 1.0, -0.9]),
        );
        let errs = compare_sets(&got, &want).unwrap();
        assert!((errs[0].1 - 0.05).abs() < 1e-6, "{errs:?}");
        got.remove("big");
        assert_eq!(compare_sets(&got, &want).unwrap_err(), "big");
    }

    #[test]
    fn relative_error_is_relative() {
        let a = TensorData::from([1.0f32, 2.0]);
        let b = TensorData::from([1.0f32, 2.0 + 1e-3]);
        let e = relative_error(&b, &a);
        assert!((e - 1e-3 / 5f64.sqrt()).abs() < 1e-7, "{e}");
    }
}
