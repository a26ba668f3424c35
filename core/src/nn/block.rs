//! The pre-LN transformer residual block (OpenCLIP `ResidualAttentionBlock`,
//! nanoGPT `Block`): `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu_approximate, sigmoid};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use burn::tensor::{FloatDType, Tensor};

use super::{Attention, AttentionConfig};
use crate::kernels::{self, Resolved, layer_norm, linear, linear_add};

/// The MLP non-linearity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` (OpenAI CLIP, OpenCLIP default, CLIPA torch).
    #[default]
    Gelu,
    /// tanh-approximated GELU (CLIPA JAX / flax `nn.gelu`).
    GeluTanh,
    /// `x·σ(1.702x)`, the activation of OpenAI's released CLIP weights
    /// (OpenCLIP `quick_gelu`).
    QuickGelu,
}

impl Activation {
    /// Applies the activation element-wise (the exact GELU through the
    /// kernel seam, [`kernels::gelu`], with `kernels`).
    pub fn forward<B: Backend, const D: usize>(
        self,
        kernels: &Resolved<B>,
        x: Tensor<B, D>,
    ) -> Tensor<B, D> {
        match self {
            Self::Gelu => kernels::gelu(kernels, x),
            Self::GeluTanh => gelu_approximate(x),
            Self::QuickGelu => x.clone() * sigmoid(x * 1.702),
        }
    }
}

/// Configuration of [`ResidualBlock`].
#[derive(Config, Debug)]
pub struct ResidualBlockConfig {
    /// Model width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Hidden width of the MLP.
    pub mlp_width: usize,
    /// MLP activation.
    #[config(default = "Activation::Gelu")]
    pub activation: Activation,
    /// LayerNorm epsilon (1e-5 in PyTorch, 1e-6 in flax).
    #[config(default = 1e-5)]
    pub ln_eps: f64,
}

/// The two-layer MLP of a block: `c_proj(act(c_fc(x)))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Expansion, `[width, mlp_width]`.
    pub c_fc: Linear<B>,
    /// Contraction, `[mlp_width, width]`.
    pub c_proj: Linear<B>,
    /// Non-linearity between them.
    #[module(skip)]
    pub activation: Activation,
    /// The kernels its ops run, resolved when it was built.
    #[module(skip)]
    pub kernels: Resolved<B>,
}

impl<B: Backend> Mlp<B> {
    /// Expands, applies the activation, contracts.
    ///
    /// # Shapes
    /// `[batch, tokens, width]` → `[batch, tokens, width]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let k = &self.kernels;
        let h = linear(k, &self.c_fc, x); // [batch, tokens, mlp_width]
        linear(k, &self.c_proj, self.activation.forward(k, h))
    }

    /// `residual + self.forward(x)`, the residual added by the
    /// contraction ([`kernels::linear_add`]).
    ///
    /// # Shapes
    /// `x`, `residual` and the output: `[batch, tokens, width]`
    pub fn forward_onto(&self, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        let k = &self.kernels;
        let h = linear(k, &self.c_fc, x); // [batch, tokens, mlp_width]
        linear_add(k, &self.c_proj, self.activation.forward(k, h), residual)
    }
}

/// A pre-LN transformer block.
#[derive(Module, Debug)]
pub struct ResidualBlock<B: Backend> {
    /// Norm before attention.
    pub ln_1: LayerNorm<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// Norm before the MLP.
    pub ln_2: LayerNorm<B>,
    /// The MLP.
    pub mlp: Mlp<B>,
    /// The LayerNorms' epsilon, for [`kernels::layer_norm`] (Burn's `LayerNorm`
    /// keeps its own private).
    #[module(skip)]
    pub ln_eps: f64,
    /// Compute dtype of the attention and MLP branches (bf16 under mixed
    /// precision); `None` computes in the parameters' dtype (float32).
    #[module(skip)]
    pub compute: Option<FloatDType>,
    /// The kernels of its LayerNorms, resolved when it was built.
    #[module(skip)]
    pub kernels: Resolved<B>,
}

impl ResidualBlockConfig {
    /// Builds the block.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResidualBlock<B> {
        let ln = || {
            LayerNormConfig::new(self.width)
                .with_epsilon(self.ln_eps)
                .init(device)
        };
        ResidualBlock {
            ln_1: ln(),
            attn: AttentionConfig::new(self.width, self.heads).init(device),
            ln_2: ln(),
            mlp: Mlp {
                c_fc: LinearConfig::new(self.width, self.mlp_width).init(device),
                c_proj: LinearConfig::new(self.mlp_width, self.width).init(device),
                activation: self.activation,
                kernels: Resolved::installed(),
            },
            ln_eps: self.ln_eps,
            compute: None,
            kernels: Resolved::installed(),
        }
    }
}

impl<B: Backend> ResidualBlock<B> {
    /// Attention then MLP, each on a LayerNormed copy added back to `x`;
    /// `causal` masks attention to earlier tokens.
    ///
    /// With a compute dtype (mixed precision), as `torch.autocast` runs it:
    /// the residual stream and the LayerNorms stay float32, and each branch
    /// (its matrix products, softmax and activation) runs in the compute
    /// dtype and is cast back before it is added.
    ///
    /// # Shapes
    /// `[batch, tokens, width]` → `[batch, tokens, width]`
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let ln_1 = |x| layer_norm(&self.kernels, &self.ln_1, self.ln_eps, x);
        let ln_2 = |x| layer_norm(&self.kernels, &self.ln_2, self.ln_eps, x);
        let Some(dt) = self.compute else {
            // Each residual add is done by the branch's last projection.
            let x = self.attn.forward_onto(ln_1(x.clone()), causal, Some(x));
            return self.mlp.forward_onto(ln_2(x.clone()), x);
        };
        let home = FloatDType::from(x.dtype());
        let branch = self.attn.forward(ln_1(x.clone()).cast(dt), causal);
        let x = x + branch.cast(home);
        let branch = self.mlp.forward(ln_2(x.clone()).cast(dt));
        x + branch.cast(home)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::{TestBackend, assert_close};
    use burn::tensor::{Distribution, TensorData};

    #[test]
    fn gelu_variants_match_closed_forms() {
        let device = Default::default();
        let xs = [-3.0f32, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0];
        let x = Tensor::<TestBackend, 1>::from_floats(xs, &device);
        let k = Resolved::composed();
        let exact = Activation::Gelu.forward(&k, x.clone()).into_data();
        let fused = burn::tensor::activation::gelu(x.clone()).into_data();
        assert_close(&exact, &fused, 1e-6, "composed vs fused gelu");
        let tanh = Activation::GeluTanh.forward(&k, x).into_data();
        // Reference values from torch.nn.functional.gelu(x, approximate=...)
        let want_exact = [
            -0.004_049_7f32,
            -0.158_655_3,
            -0.154_268_5,
            0.0,
            0.345_731_5,
            0.841_344_7,
            2.995_950_3,
        ];
        let want_tanh = [
            -0.003_637_4f32,
            -0.158_808,
            -0.154_285_9,
            0.0,
            0.345_714_1,
            0.841_192,
            2.996_362_7,
        ];
        assert_close(&exact, &TensorData::from(want_exact), 1e-5, "gelu");
        assert_close(&tanh, &TensorData::from(want_tanh), 1e-5, "gelu_tanh");
    }

    /// A block with zeroed output projections is the identity: the residual
    /// path carries the input through untouched.
    #[test]
    fn zero_projections_give_identity() {
        let device = Default::default();
        let mut block = ResidualBlockConfig::new(8, 2, 32).init::<TestBackend>(&device);
        block.attn.out.weight = block.attn.out.weight.map(|w| w.zeros_like());
        block.attn.out.bias = block.attn.out.bias.map(|b| b.map(|b| b.zeros_like()));
        block.mlp.c_proj.weight = block.mlp.c_proj.weight.map(|w| w.zeros_like());
        block.mlp.c_proj.bias = block.mlp.c_proj.bias.map(|b| b.map(|b| b.zeros_like()));
        let x =
            Tensor::<TestBackend, 3>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
        let y = block.forward(x.clone(), false);
        assert_close(&y.into_data(), &x.into_data(), 1e-7, "identity block");
    }

    /// Mixed precision's plumbing, checked on the CPU with float64 as the
    /// compute dtype (ndarray has no bf16): the output and every gradient
    /// come back in the master dtype, and equal the float32 block's.
    #[test]
    fn a_compute_dtype_keeps_master_dtype_and_values() {
        use crate::state::grads_dict;
        let device = Default::default();
        let block = ResidualBlockConfig::new(8, 2, 32).init::<TestBackend>(&device);
        let x =
            Tensor::<TestBackend, 3>::random([2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        let run = |b: &ResidualBlock<TestBackend>| {
            let x = x.clone().require_grad();
            let y = b.forward(x.clone(), true); // [2, 5, 8]
            let grads = (y.clone() * y.clone()).sum().backward();
            let dx = x.grad(&grads).expect("input gradient");
            (y.into_data(), dx.into_data(), grads_dict(b, &grads))
        };
        let (y32, dx32, g32) = run(&block);
        // Cloned after the first forward: parameters initialise lazily, and
        // a clone taken before would draw its own.
        let mut wide = block.clone();
        wide.compute = Some(FloatDType::F64);
        let (y64, dx64, g64) = run(&wide);
        assert_eq!(
            y64.dtype,
            burn::tensor::DType::F32,
            "output in the master dtype"
        );
        assert_close(&y64, &y32, 1e-5, "output");
        assert_close(&dx64, &dx32, 1e-4, "input gradient");
        assert_eq!(g64.len(), g32.len());
        assert_eq!(g64.len(), 16, "every parameter gets a gradient");
        let max_abs =
            |d: &burn::tensor::TensorData| d.iter::<f32>().fold(0f32, |m, v| m.max(v.abs()));
        for (name, g) in &g64 {
            assert_eq!(g.dtype, burn::tensor::DType::F32, "{name} master gradient");
            if name == "attn.key.bias" {
                // A key bias shifts every score of a row equally, which the
                // softmax ignores: its gradient is zero up to rounding.
                assert!(max_abs(g) < 1e-6 && max_abs(&g32[name]) < 1e-6, "{name}");
            } else {
                assert_close(g, &g32[name], 1e-4, name);
            }
        }
    }
}
