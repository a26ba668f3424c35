//! Optional recording of intermediate activations, for parity tests against
//! OpenCLIP's per-block outputs. Off by default: recording forces a
//! device-to-host copy.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Named host copies of activations (OpenCLIP hook names, e.g.
/// `visual.block0`).
#[derive(Debug, Default)]
pub struct Trace {
    enabled: bool,
    /// The recorded activations.
    pub acts: BTreeMap<String, TensorData>,
}

impl Trace {
    /// A trace that records nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// A trace that records.
    pub fn on() -> Self {
        Self {
            enabled: true,
            acts: BTreeMap::new(),
        }
    }

    /// Records `make()` under `name` if enabled; `make` is not called
    /// otherwise.
    pub fn record<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        make: impl FnOnce() -> Tensor<B, D>,
    ) {
        if self.enabled {
            self.acts.insert(name.to_string(), make().into_data());
        }
    }
}
