//! The embedded CPU backend: Burn's `flex` (pure Rust, the `gemm` crate's
//! kernels with AVX-512 where the CPU has it, rayon threads). Chosen over
//! `ndarray` by the measurement in `docs/BENCHMARKS.md`: 1.8–2.2× faster on
//! transformer forward+backward.

use crate::{BackendError, BackendKind, DeviceInfo};

/// The concrete CPU backend with autodiff.
pub type Backend = burn::backend::Autodiff<burn::backend::Flex>;

/// The CPU has one device, index 0.
pub fn select(
    index: Option<usize>,
) -> Result<(burn::tensor::Device<Backend>, DeviceInfo), BackendError> {
    match index.unwrap_or(0) {
        0 => Ok((
            Default::default(),
            DeviceInfo {
                kind: BackendKind::Cpu,
                index: 0,
                name: format!(
                    "flex, {} threads",
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                ),
            },
        )),
        n => Err(BackendError::NoDevice {
            kind: BackendKind::Cpu,
            reason: format!("the CPU backend has only device 0, not {n}"),
        }),
    }
}
