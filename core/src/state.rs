//! Named parameter snapshots of any Burn module ("state dicts").
//!
//! A [`StateDict`] maps dotted parameter paths (`blocks.0.attn.query.weight`)
//! to host tensors. It is how weights move between backends (the `check`
//! self-test, cross-backend tests), into checkpoints and to and from OpenCLIP.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

use crate::{Error, Result};

/// Parameter path → host tensor, ordered by path.
pub type StateDict = BTreeMap<String, TensorData>;

/// Copies every float parameter of `module` to the host, keyed by path.
pub fn state_dict<B: Backend, M: Module<B>>(module: &M) -> StateDict {
    let mut collector = Collector {
        path: Vec::new(),
        out: StateDict::new(),
    };
    module.visit(&mut collector);
    collector.out
}

/// Replaces every float parameter of `module` with the tensor of the same
/// path in `state`. Missing, unused or mis-shaped tensors are errors that
/// name the path. Autodiff settings of the parameters are kept.
pub fn load_state_dict<B: Backend, M: Module<B>>(module: M, state: &StateDict) -> Result<M> {
    let mut loader = Loader {
        path: Vec::new(),
        state,
        used: Vec::new(),
        errors: Vec::new(),
    };
    let module = module.map(&mut loader);
    let mut errors = loader.errors;
    let unused: Vec<&String> = state
        .keys()
        .filter(|k| !loader.used.iter().any(|u| u == *k))
        .collect();
    if !unused.is_empty() {
        errors.push(format!(
            "unexpected tensor(s) {}",
            unused
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if errors.is_empty() {
        Ok(module)
    } else {
        Err(Error::StateDict(errors.join("; ")))
    }
}

/// The gradient of every float parameter of `module` that received one,
/// keyed by path.
pub fn grads_dict<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &B::Gradients,
) -> StateDict {
    let mut collector = GradCollector::<B> {
        path: Vec::new(),
        grads,
        out: StateDict::new(),
    };
    module.visit(&mut collector);
    collector.out
}

struct GradCollector<'a, B: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a B::Gradients,
    out: StateDict,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = param.grad(self.grads) {
            self.out.insert(self.path.join("."), g.into_data());
        }
    }
}

struct Collector {
    path: Vec<String>,
    out: StateDict,
}

impl<B: Backend> ModuleVisitor<B> for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.out
            .insert(self.path.join("."), param.val().into_data());
    }
}

struct Loader<'a> {
    path: Vec<String>,
    state: &'a StateDict,
    used: Vec<String>,
    errors: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let key = self.path.join(".");
        let Some(data) = self.state.get(&key) else {
            self.errors.push(format!("missing tensor {key}"));
            return param;
        };
        self.used.push(key.clone());
        let want = param.lazy_shape();
        if data.shape.as_slice() != want.as_slice() {
            self.errors.push(format!(
                "tensor {key} has shape {:?}, the model expects {:?}",
                data.shape.as_slice(),
                want.as_slice()
            ));
            return param;
        }
        let device = param.lazy_device();
        let id = param.id;
        let tensor = Tensor::<B, D>::from_data(data.clone().convert::<f32>(), &device);
        param.transform_for_load(tensor, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ResidualBlockConfig;
    use crate::numeric::TestBackend;

    #[test]
    fn round_trip_names_every_parameter() {
        let device = Default::default();
        let cfg = ResidualBlockConfig::new(8, 2, 16);
        let a = cfg.init::<TestBackend>(&device);
        let sd = state_dict(&a);
        assert!(sd.contains_key("attn.query.weight"), "{:?}", sd.keys());
        assert!(sd.contains_key("mlp.c_fc.bias"));
        assert!(sd.contains_key("ln_1.gamma"));
        // 4 linears × (w, b) + 2 norms × (γ, β) + 2 mlp linears × (w, b)
        assert_eq!(sd.len(), 8 + 4 + 4);
        let b = load_state_dict(cfg.init::<TestBackend>(&device), &sd).unwrap();
        assert_eq!(state_dict(&b), sd);
    }

    #[test]
    fn mismatches_are_named() {
        let device = Default::default();
        let block = ResidualBlockConfig::new(8, 2, 16).init::<TestBackend>(&device);
        let mut sd = state_dict(&block);
        sd.remove("attn.key.bias");
        sd.insert("extra".into(), TensorData::from([1.0f32]));
        let w = sd.get_mut("mlp.c_fc.weight").unwrap();
        *w = TensorData::new(vec![0.0f32; 8], [2, 4]);
        let err = load_state_dict(block, &sd).unwrap_err().to_string();
        assert!(err.contains("missing tensor attn.key.bias"), "{err}");
        assert!(err.contains("unexpected tensor(s) extra"), "{err}");
        assert!(err.contains("mlp.c_fc.weight has shape [2, 4]"), "{err}");
    }
}
