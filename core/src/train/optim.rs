//! AdamW with decoupled weight decay (Loshchilov & Hutter), as CLIPA trains:
//! β = (0.9, 0.95), decay on weight matrices only — biases, norms,
//! embeddings (token, position, CLS) and the temperature are not decayed
//! (CLIPA `optim` mask; OpenCLIP `exclude` in `main.py`).
//!
//! We keep our own optimiser rather than Burn's so that its state is keyed
//! by parameter path: checkpoints then store it as plain safetensors next to
//! the weights, and a resumed run continues bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::kernels::{
    AdamWKernel, AdamWScalars, AdamWSlot, Kernels, SumSquaresKernel, UpdateGuard, adamw_composed,
    sum_squares_composed,
};
use crate::state::StateDict;
use crate::{Error, Result};

/// AdamW hyper-parameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied as `w -= lr·wd·w`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// CLIPA's settings: β = (0.9, 0.95), ε = 1e-8, weight decay 0.2.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.2,
        }
    }
}

/// Whether the parameter at `path` with `rank` dimensions is decayed:
/// weight matrices and conv kernels yes; vectors (biases, LayerNorm, CLS,
/// temperature) and embedding tables no.
pub fn decays(path: &str, rank: usize) -> bool {
    rank >= 2 && !path.contains("embedding")
}

/// The installed backend's AdamW kernel, if it has one.
fn installed_kernel<B: Backend>() -> Option<Arc<dyn AdamWKernel<B>>> {
    Kernels::<B>::installed().and_then(|k| k.adamw.clone())
}

/// The installed backend's sum of squares, if it has one.
fn installed_sum_squares<B: Backend>() -> Option<Arc<dyn SumSquaresKernel<B>>> {
    Kernels::<B>::installed().and_then(|k| k.sum_squares.clone())
}

/// The optimiser: moments keyed by parameter path, on the device.
pub struct AdamW<B: Backend> {
    config: AdamWConfig,
    /// Completed updates, for bias correction.
    step: u64,
    /// path → (m, v), flattened to `[numel]`.
    moments: BTreeMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
    /// The backend's fused update, or `None` for [`adamw_composed`].
    kernel: Option<Arc<dyn AdamWKernel<B>>>,
    /// The backend's sum of squares for [`AdamW::grad_norm`], or `None`
    /// for [`sum_squares_composed`].
    sum_squares: Option<Arc<dyn SumSquaresKernel<B>>>,
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimiser (zero moments), its update and gradient norm
    /// resolved once, here: the installed backend's AdamW and sum-of-squares
    /// kernels ([`Kernels`]) or [`adamw_composed`] and
    /// [`sum_squares_composed`].
    pub fn new(config: AdamWConfig) -> Self {
        Self::with_kernel(config, installed_kernel())
    }

    /// A fresh optimiser that runs `kernel` (or [`adamw_composed`] for
    /// `None`) whatever is installed, and the installed gradient norm.
    pub fn with_kernel(config: AdamWConfig, kernel: Option<Arc<dyn AdamWKernel<B>>>) -> Self {
        Self {
            config,
            step: 0,
            moments: BTreeMap::new(),
            kernel,
            sum_squares: installed_sum_squares(),
        }
    }

    /// Whether the updates run in a backend's kernel rather than
    /// [`adamw_composed`].
    pub fn is_fused(&self) -> bool {
        self.kernel.is_some()
    }

    /// Updates completed so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of every parameter of `module` that has a gradient in
    /// `grads` (multiplied by `guard.scale`, the clipping factor), at
    /// learning rate `lr`; where `guard.apply` is false on the device,
    /// nothing changes. The update count (for the bias corrections)
    /// advances either way: the host does not know.
    pub fn step<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        mut grads: GradientsParams,
        guard: &UpdateGuard<B>,
    ) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.step += 1;
        // Two passes: gather every parameter's slot, update them all at
        // once (a kernel may take many parameters per launch), then put
        // the new values back by parameter id.
        let mut gather = Gather::<AB> {
            opt: self,
            lr,
            grads: &mut grads,
            path: Vec::new(),
            slots: Vec::new(),
            owners: Vec::new(),
        };
        module.visit(&mut gather);
        let (slots, owners) = (gather.slots, gather.owners);
        let updated = match &self.kernel {
            Some(kernel) => kernel.update(slots, guard),
            None => slots
                .into_iter()
                .map(|slot| adamw_composed(slot, guard))
                .collect(),
        };
        let mut values = HashMap::with_capacity(owners.len());
        for ((path, id), [w, m, v]) in owners.into_iter().zip(updated) {
            self.moments.insert(path, (m, v));
            values.insert(id, w);
        }
        module.map(&mut Assign::<AB> { values })
    }

    /// The state as host tensors: `m.<path>`, `v.<path>` and `step` (a
    /// one-element i64 tensor holding the update count).
    pub fn state_dict(&self) -> StateDict {
        let mut out = StateDict::new();
        for (path, (m, v)) in &self.moments {
            out.insert(format!("m.{path}"), m.to_data());
            out.insert(format!("v.{path}"), v.to_data());
        }
        out.insert("step".into(), TensorData::new(vec![self.step as i64], [1]));
        out
    }

    /// Restores [`AdamW::state_dict`] output onto `device`.
    pub fn load_state_dict(
        config: AdamWConfig,
        state: &StateDict,
        device: &B::Device,
    ) -> Result<Self> {
        let bad = |m: &str| Error::StateDict(format!("optimizer state: {m}"));
        let step = state
            .get("step")
            .and_then(|d| d.to_vec::<i64>().ok())
            .and_then(|v| v.first().copied())
            .ok_or_else(|| bad("missing `step`"))? as u64;
        let mut moments = BTreeMap::new();
        for (key, m) in state {
            let Some(path) = key.strip_prefix("m.") else {
                continue;
            };
            let v = state
                .get(&format!("v.{path}"))
                .ok_or_else(|| bad(&format!("missing v.{path}")))?;
            moments.insert(
                path.to_string(),
                (
                    Tensor::from_data(m.clone(), device),
                    Tensor::from_data(v.clone(), device),
                ),
            );
        }
        Ok(Self {
            config,
            step,
            moments,
            kernel: installed_kernel(),
            sum_squares: installed_sum_squares(),
        })
    }
}

/// Gathers the update of every parameter that has a gradient: its slot,
/// and its path and id to put the result back.
struct Gather<'a, AB: AutodiffBackend> {
    opt: &'a mut AdamW<AB::InnerBackend>,
    lr: f64,
    grads: &'a mut GradientsParams,
    path: Vec<String>,
    slots: Vec<AdamWSlot<AB::InnerBackend>>,
    owners: Vec<(String, ParamId)>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Gather<'_, AB> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(param.id) else {
            return;
        };
        let path = self.path.join(".");
        let c = self.opt.config;
        let tensor = param.val().inner();
        let numel = tensor.shape().num_elements();
        let w = tensor.reshape([numel]); // [numel]
        let g = grad.reshape([numel]); // [numel]
        let (m, v) = match self.opt.moments.remove(&path) {
            Some(mv) => mv,
            None => (w.zeros_like(), w.zeros_like()),
        };
        let t = self.opt.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let decay = if decays(&path, D) {
            self.lr * c.weight_decay
        } else {
            0.0
        };
        let s = AdamWScalars {
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps * bc2.sqrt(),
            step_size: self.lr * bc2.sqrt() / bc1,
            keep: 1.0 - decay,
        };
        self.slots.push(AdamWSlot { w, g, m, v, s });
        self.owners.push((path, param.id));
    }
}

/// Puts each updated parameter (flattened, by id) back in its place.
struct Assign<AB: AutodiffBackend> {
    values: HashMap<ParamId, Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Assign<AB> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(w) = self.values.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let mut out = Tensor::<AB, 1>::from_inner(w).reshape(tensor.shape());
        if tensor.is_require_grad() {
            out = out.require_grad();
        }
        Param::from_mapped_value(id, out, mapper)
    }
}

impl<B: Backend> AdamW<B> {
    /// The global L2 norm of all gradients of `module` in `grads`, `[1]` on
    /// the device, its sum of squares in the backend's kernel where it has
    /// one.
    pub fn grad_norm<AB, M>(&self, module: &M, grads: &GradientsParams) -> Tensor<B, 1>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut collect = GradList::<AB> {
            grads,
            list: Vec::new(),
        };
        module.visit(&mut collect);
        let Some(device) = collect.list.first().map(|g| g.device()) else {
            return Tensor::zeros([1], &Default::default());
        };
        let sum = match &self.sum_squares {
            Some(kernel) => kernel.sum_squares(collect.list),
            None => sum_squares_composed(collect.list, &device),
        };
        sum.sqrt() // [1]
    }
}

/// The factor that scales gradients of norm `norm` `[1]` down to
/// `max_norm`: `min(1, max_norm / (norm + 1e-6))`, PyTorch's
/// `clip_grad_norm_` (which OpenCLIP calls), computed on the device `[1]`
/// in element-wise ops that fuse into one launch on a GPU.
pub fn clip_factor<B: Backend>(norm: Tensor<B, 1>, max_norm: f64) -> Tensor<B, 1> {
    ((norm + 1e-6).recip() * max_norm).clamp_max(1.0)
}

/// Collects every parameter's gradient, flattened to `[numel]`.
struct GradList<'a, AB: AutodiffBackend> {
    grads: &'a GradientsParams,
    list: Vec<Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for GradList<'_, AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
            let numel = g.shape().num_elements();
            self.list.push(g.reshape([numel])); // [numel]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;
    use burn::module::Module;
    use burn::nn::Linear;

    #[derive(Module, Debug)]
    struct Net<B: Backend> {
        fc: Linear<B>,
        token_embedding: Param<Tensor<B, 2>>,
    }

    /// An optimiser given a kernel runs it for every update, and one
    /// without runs the composed update: an identity kernel leaves the
    /// weights where the composed step moves them.
    #[test]
    fn an_optimiser_runs_the_kernel_it_was_given() {
        type Inner = <TestBackend as AutodiffBackend>::InnerBackend;
        struct Identity;
        impl AdamWKernel<Inner> for Identity {
            fn update(
                &self,
                slots: Vec<AdamWSlot<Inner>>,
                _guard: &UpdateGuard<Inner>,
            ) -> Vec<[Tensor<Inner, 1>; 3]> {
                slots.into_iter().map(|s| [s.w, s.m, s.v]).collect()
            }
        }
        let device = Default::default();
        let weight_after = |mut opt: AdamW<Inner>| {
            let model = net(&device);
            let x = Tensor::<TestBackend, 2>::from_floats([[1.0, 2.0]], &device);
            let loss = model.fc.forward(x).sum() + model.token_embedding.val().sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let model = opt.step(1e-2, model, grads, &UpdateGuard::always(&device));
            model.fc.weight.val().into_data().to_vec::<f32>().unwrap()
        };
        let fused = AdamW::with_kernel(AdamWConfig::default(), Some(Arc::new(Identity)));
        assert!(fused.is_fused());
        assert_eq!(weight_after(fused), vec![0.5, -1.0]);
        let composed = AdamW::with_kernel(AdamWConfig::default(), None);
        assert!(!composed.is_fused());
        assert_ne!(weight_after(composed), vec![0.5, -1.0]);
    }

    fn net(device: &burn::tensor::Device<TestBackend>) -> Net<TestBackend> {
        let fc = Linear {
            weight: Param::from_tensor(Tensor::from_floats([[0.5], [-1.0]], device)),
            bias: Some(Param::from_tensor(Tensor::from_floats([0.25], device))),
        };
        Net {
            fc,
            token_embedding: Param::from_tensor(Tensor::from_floats([[1.0, 2.0]], device)),
        }
    }

    #[test]
    fn decay_mask_follows_clipa() {
        assert!(decays("visual.blocks.0.mlp.c_fc.weight", 2));
        assert!(decays("visual.conv1", 4));
        assert!(decays("text.text_projection", 2));
        assert!(!decays("visual.blocks.0.mlp.c_fc.bias", 1));
        assert!(!decays("visual.ln_post.gamma", 1));
        assert!(!decays("text.token_embedding.weight", 2));
        assert!(!decays("visual.positional_embedding", 2));
        assert!(!decays("logit_scale", 1));
    }

    /// Two steps against the closed form of torch.optim.AdamW on a scalar
    /// loss `sum(fc(x)) + sum(token_embedding)` whose gradients are
    /// constant: g_w = x, g_b = 1, g_e = 1. With a constant gradient the
    /// bias-corrected Adam direction is exactly sign(g), so after two steps
    /// w = (w·(1−lr·wd) − lr)·(1−lr·wd) − lr per element (for g > 0).
    #[test]
    fn matches_adamw_closed_form_and_skips_decay() {
        let device = Default::default();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 0.0,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg);
        let mut model = net(&device);
        let lr = 0.01;
        for _ in 0..2 {
            let x = Tensor::<TestBackend, 2>::from_floats([[3.0, 4.0]], &device);
            let loss = model.fc.forward(x).sum() + model.token_embedding.val().sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let norm: f32 = opt.grad_norm(&model, &grads).into_scalar();
            assert!((norm as f64 - (9.0f64 + 16.0 + 1.0 + 2.0).sqrt()).abs() < 1e-5);
            model = opt.step(lr, model, grads, &UpdateGuard::always(&device));
        }
        let decayed = |w: f64| (w * (1.0 - lr * 0.1) - lr) * (1.0 - lr * 0.1) - lr;
        let w = model.fc.weight.val().into_data().to_vec::<f32>().unwrap();
        assert!((w[0] as f64 - decayed(0.5)).abs() < 1e-6, "{w:?}");
        assert!((w[1] as f64 - decayed(-1.0)).abs() < 1e-6, "{w:?}");
        let b = model.fc.bias.as_ref().unwrap().val().into_scalar() as f64;
        assert!(
            (b - (0.25 - 2.0 * lr)).abs() < 1e-6,
            "bias must not decay: {b}"
        );
        let e = model
            .token_embedding
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(
            (e[0] as f64 - (1.0 - 2.0 * lr)).abs() < 1e-6,
            "embedding must not decay: {e:?}"
        );
        // The state round-trips through host tensors.
        let restored =
            AdamW::<burn::backend::Flex>::load_state_dict(cfg, &opt.state_dict(), &device).unwrap();
        assert_eq!(restored.step_count(), 2);
        assert_eq!(restored.state_dict(), opt.state_dict());
    }

    /// Three steps with changing gradients and ε ≠ 0 against
    /// torch.optim.AdamW's update written out in f64, decay and clipping
    /// factor included.
    #[test]
    fn matches_torch_formula_with_eps_and_changing_gradients() {
        let device = Default::default();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-2,
            weight_decay: 0.1,
        };
        let (lr, scale) = (0.05, 0.5);
        let mut opt = AdamW::new(cfg);
        let mut model = net(&device);
        // Reference for fc.weight[0] (x = 3·c, decayed) and the bias (g = c).
        let (mut w, mut mw, mut vw) = (0.5f64, 0.0, 0.0);
        let (mut b, mut mb, mut vb) = (0.25f64, 0.0, 0.0);
        for (t, c) in [1.0f64, -2.0, 0.25].into_iter().enumerate() {
            let x = Tensor::<TestBackend, 2>::from_floats([[3.0, 4.0]], &device);
            let loss = model.fc.forward(x).sum() * c;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let guard = UpdateGuard::new(
                Some(Tensor::from_floats([scale as f32], &device)),
                Tensor::from_bool([true].into(), &device),
            );
            model = opt.step(lr, model, grads, &guard);
            let t = t as i32 + 1;
            let adam = |p: f64, m: &mut f64, v: &mut f64, g: f64, wd: f64| {
                let g = g * scale;
                *m = 0.9 * *m + 0.1 * g;
                *v = 0.98 * *v + 0.02 * g * g;
                let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.98f64.powi(t));
                p * (1.0 - lr * wd) - lr / bc1 * *m / ((*v).sqrt() / bc2.sqrt() + 1e-2)
            };
            w = adam(w, &mut mw, &mut vw, 3.0 * c, 0.1);
            b = adam(b, &mut mb, &mut vb, c, 0.0);
            let got_w = model.fc.weight.val().into_data().to_vec::<f32>().unwrap()[0] as f64;
            let got_b = model.fc.bias.as_ref().unwrap().val().into_scalar() as f64;
            assert!((got_w - w).abs() < 1e-6, "step {t}: weight {got_w} vs {w}");
            assert!((got_b - b).abs() < 1e-6, "step {t}: bias {got_b} vs {b}");
        }
    }

    #[test]
    fn clipping_scales_down_only_large_norms() {
        let device = Default::default();
        let factor = |norm: f32, max| -> f32 {
            let norm = Tensor::<burn::backend::Flex, 1>::from_floats([norm], &device);
            clip_factor(norm, max).into_scalar()
        };
        assert_eq!(factor(0.5, 1.0), 1.0);
        // At the bound, PyTorch's 1/(1 + 1e-6).
        assert!((factor(1.0, 1.0) - 0.999_999).abs() < 1e-7);
        assert!((factor(4.0, 1.0) - 0.25).abs() < 1e-6);
    }

    /// A step the device marks as not applied (a non-finite loss or norm)
    /// changes no weight and no moment, even with non-finite gradients.
    #[test]
    fn a_step_not_applied_changes_nothing() {
        type Inner = <TestBackend as AutodiffBackend>::InnerBackend;
        let device = Default::default();
        let mut opt = AdamW::<Inner>::new(AdamWConfig::default());
        let mut model = net(&device);
        let x = Tensor::<TestBackend, 2>::from_floats([[3.0, 4.0]], &device);
        let grads =
            GradientsParams::from_grads(model.fc.forward(x.clone()).sum().backward(), &model);
        model = opt.step(1e-2, model, grads, &UpdateGuard::always(&device));
        let (weights, state) = (model.fc.weight.val().into_data(), opt.state_dict());
        let nan = Tensor::<TestBackend, 2>::from_floats([[f32::NAN, 4.0]], &device);
        let grads = GradientsParams::from_grads(model.fc.forward(nan).sum().backward(), &model);
        let skip = UpdateGuard::new(
            Some(Tensor::from_floats([f32::NAN], &device)),
            Tensor::from_bool([false].into(), &device),
        );
        model = opt.step(1e-2, model, grads, &skip);
        assert_eq!(model.fc.weight.val().into_data(), weights);
        for (key, before) in state.iter() {
            if key != "step" {
                assert_eq!(&opt.state_dict()[key], before, "{key}");
            }
        }
        // The same step applied does move the weights.
        let grads = GradientsParams::from_grads(model.fc.forward(x).sum().backward(), &model);
        model = opt.step(1e-2, model, grads, &UpdateGuard::always(&device));
        assert_ne!(model.fc.weight.val().into_data(), weights);
    }
}
