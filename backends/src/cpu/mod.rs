//! The embedded CPU backend: Burn's `flex` (pure Rust, the `gemm` crate's
//! kernels with AVX-512 where the CPU has it, rayon threads). Chosen over
//! `ndarray` by the measurement in `docs/BENCHMARKS.md`: 1.8–2.2× faster on
//! transformer forward+backward.

use std::sync::Arc;

use burn::backend::Flex;
use clipa_core::kernels::{self, Installed, Kernels};

use crate::{BackendError, BackendKind, DeviceInfo};

mod adamw;
mod alloc;
mod attention;
mod embedding;
mod gelu;
mod gemm;
mod layer_norm;
mod linear;
mod sum_squares;
mod tensor;
mod threads;
mod vmath;

pub use adamw::FlexAdamW;
pub use attention::FlexAttention;
pub use embedding::FlexEmbedding;
pub use gelu::FlexGelu;
pub use layer_norm::FlexLayerNorm;
pub use linear::FlexLinear;
pub use sum_squares::FlexSumSquares;
pub use tensor::Backend;
pub(crate) use threads::on_worker;

/// CPU replicas one process may run (`--devices 0,1,…`).
pub const MAX_REPLICAS: usize = 256;

/// The CPU has one device, index 0.
pub fn select(
    index: Option<usize>,
) -> Result<(burn::tensor::Device<Backend>, DeviceInfo), BackendError> {
    match index.unwrap_or(0) {
        0 => replica(0),
        n => Err(BackendError::NoDevice {
            kind: BackendKind::Cpu,
            reason: format!("the CPU backend has only device 0, not {n}"),
        }),
    }
}

/// Replica `i` of a data-parallel run on the CPU (`--devices 0,1`): every
/// index names the one CPU, so further replicas share its cores. They add
/// no compute, but they run a multi-device run's arithmetic (each replica
/// on its rows, features gathered, gradients summed) anywhere, as the
/// tests of training across machines do.
pub fn replica(i: usize) -> Result<(burn::tensor::Device<Backend>, DeviceInfo), BackendError> {
    if i >= MAX_REPLICAS {
        return Err(BackendError::NoDevice {
            kind: BackendKind::Cpu,
            reason: format!(
                "the CPU backend runs at most {MAX_REPLICAS} replicas (--devices 0..{}), not device {i}",
                MAX_REPLICAS - 1
            ),
        });
    }
    Ok((
        Default::default(),
        DeviceInfo {
            kind: BackendKind::Cpu,
            index: i,
            name: match crate::cpu_threads() {
                1 => "flex, 1 thread".into(),
                n => format!("flex, {n} threads"),
            },
        },
    ))
}

/// The CPU backend's kernels for training (autodiff flex): the fused
/// linear layers, LayerNorm, GELU, attention and embedding lookup.
/// (AdamW updates on the inner backend.)
pub fn training_kernels() -> Kernels<Backend> {
    Kernels {
        linear: Some(Arc::new(FlexLinear)),
        layer_norm: Some(Arc::new(FlexLayerNorm)),
        gelu: Some(Arc::new(FlexGelu)),
        attention: Some(Arc::new(FlexAttention)),
        qkv: None,
        embedding: Some(Arc::new(FlexEmbedding)),
        adamw: None,
        sum_squares: None,
    }
}

/// The CPU backend's kernels for the inner backend (flex): AdamW and the
/// gradient norm's sum of squares, and the
/// linear layers, GELU and attention at inference. Flex's own LayerNorm and
/// lookup are one op each there already.
pub fn inference_kernels() -> Kernels<Flex> {
    Kernels {
        linear: Some(Arc::new(FlexLinear)),
        layer_norm: None,
        gelu: Some(Arc::new(FlexGelu)),
        attention: Some(Arc::new(FlexAttention)),
        qkv: None,
        embedding: None,
        adamw: Some(Arc::new(FlexAdamW)),
        sum_squares: Some(Arc::new(FlexSumSquares)),
    }
}

/// Installs both bundles for as long as the guard lives, with the
/// allocator settings of [`alloc`] (on glibc; once per process).
pub fn install_kernels() -> Installed {
    alloc::keep_freed_memory();
    kernels::install(training_kernels()).and(kernels::install(inference_kernels()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The installed bundles serve both backend types, and an optimiser
    /// built while they are installed takes the fused update.
    #[test]
    fn installing_serves_the_fused_kernels_to_both_types() {
        let _installed = install_kernels();
        let train = Kernels::<Backend>::installed().expect("autodiff flex");
        assert_eq!(
            train.names(),
            ["linear", "layer_norm", "gelu", "attention", "embedding"]
        );
        let infer = Kernels::<Flex>::installed().expect("flex");
        assert_eq!(
            infer.names(),
            ["linear", "gelu", "attention", "adamw", "sum_squares"]
        );
        let opt = clipa_core::train::optim::AdamW::<Flex>::new(Default::default());
        assert!(opt.is_fused());
    }

    /// A model resolves the installed kernels once, when it is built, and
    /// keeps them; `valid()` resolves the inference bundle for the inner
    /// type.
    #[test]
    fn a_model_resolves_its_kernels_when_it_is_built() {
        use burn::module::AutodiffModule;
        let installed = install_kernels();
        let model = clipa_core::model::ClipConfig::tiny().init::<Backend>(&Default::default());
        let block = &model.visual.blocks[0];
        let training = ["linear", "layer_norm", "gelu", "attention", "embedding"];
        for held in [&block.kernels, &block.attn.kernels, &block.mlp.kernels] {
            assert_eq!(held.names(), training);
        }
        assert_eq!(model.text.kernels.names(), training);
        let valid = model.valid();
        assert_eq!(
            valid.visual.blocks[0].attn.kernels.names(),
            ["linear", "gelu", "attention", "adamw", "sum_squares"]
        );
        drop(installed);
        // The model holds what it resolved, whatever is installed later.
        assert_eq!(model.visual.blocks[0].mlp.kernels.names(), training);
    }
}
