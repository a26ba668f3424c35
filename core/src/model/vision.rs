//! The vision transformer (OpenCLIP `transformer.py::VisionTransformer`,
//! CLIPA `vit.py`): patchify → CLS → position embedding → optional patch
//! selection (token reduction) → `ln_pre` → pre-LN blocks → pool → `ln_post`
//! → projection.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use super::config::{PosEmbed, VisionConfig, VisionPool};
use super::posemb::{resize_bicubic, sincos_2d};
use super::trace::Trace;
use crate::kernels::{self, Resolved, layer_norm};
use crate::nn::{ResidualBlock, ResidualBlockConfig};

/// The image tower.
#[derive(Module, Debug)]
pub struct VisionTransformer<B: Backend> {
    /// Patch embedding, a bias-free conv kernel `[width, 3, patch, patch]`.
    pub conv1: Param<Tensor<B, 4>>,
    /// The CLS token `[width]`.
    pub class_embedding: Param<Tensor<B, 1>>,
    /// Position table `[1 + grid², width]`; frozen when sin-cos.
    pub positional_embedding: Param<Tensor<B, 2>>,
    /// Optional LayerNorm after the embeddings.
    pub ln_pre: Option<LayerNorm<B>>,
    /// Residual blocks.
    pub blocks: Vec<ResidualBlock<B>>,
    /// Final LayerNorm (before or after pooling).
    pub ln_post: LayerNorm<B>,
    /// Output projection `[width, embed_dim]`, applied as `x @ proj`.
    pub proj: Param<Tensor<B, 2>>,
    /// The architecture, at the resolution of `positional_embedding`.
    #[module(skip)]
    pub config: VisionConfig,
    /// The kernels of its LayerNorms, resolved when it was built.
    #[module(skip)]
    pub kernels: Resolved<B>,
}

impl VisionConfig {
    /// Builds the tower; `embed_dim` is the projection's output size.
    pub fn init<B: Backend>(&self, embed_dim: usize, device: &B::Device) -> VisionTransformer<B> {
        let w = self.width;
        let scale = (w as f64).powf(-0.5);
        let normal = |shape: [usize; 2], std: f64| {
            Param::from_tensor(Tensor::<B, 2>::random(
                shape,
                Distribution::Normal(0.0, std),
                device,
            ))
        };
        let ln = || {
            LayerNormConfig::new(w)
                .with_epsilon(self.ln_eps)
                .init(device)
        };
        let grid = self.grid();
        let positional_embedding = match self.pos_embed {
            PosEmbed::Learnable => normal([1 + grid * grid, w], scale),
            PosEmbed::SinCos2d => sincos_param(w, grid, grid, device),
        };
        // PyTorch's Conv2d default init: U(±1/√fan_in).
        let fan_in = 3 * self.patch_size * self.patch_size;
        let bound = (fan_in as f64).powf(-0.5);
        let block = ResidualBlockConfig::new(w, self.heads, self.mlp_width)
            .with_activation(self.activation)
            .with_ln_eps(self.ln_eps);
        VisionTransformer {
            conv1: Param::from_tensor(Tensor::random(
                [w, 3, self.patch_size, self.patch_size],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            class_embedding: Param::from_tensor(Tensor::random(
                [w],
                Distribution::Normal(0.0, scale),
                device,
            )),
            positional_embedding,
            ln_pre: self.ln_pre.then(ln),
            blocks: (0..self.layers).map(|_| block.init(device)).collect(),
            ln_post: ln(),
            proj: normal([w, embed_dim], scale),
            config: self.clone(),
            kernels: Resolved::installed(),
        }
    }
}

/// A frozen sin-cos table as a parameter that receives no gradient.
fn sincos_param<B: Backend>(
    width: usize,
    gh: usize,
    gw: usize,
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    let data = TensorData::new(sincos_2d(width, gh, gw), [1 + gh * gw, width]);
    Param::from_tensor(Tensor::from_data(data, device)).set_require_grad(false)
}

impl<B: Backend> VisionTransformer<B> {
    /// Encodes images into (unnormalised) embeddings.
    ///
    /// `keep` selects, per sample, which patch tokens enter the transformer
    /// (token reduction by masking); CLS is always kept. Indices are patch
    /// numbers in row-major grid order, `0..grid²`.
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, height, width]`, both sides multiples of the patch
    /// - `keep`: `[batch, kept]`
    /// - output: `[batch, embed_dim]`
    pub fn forward(&self, images: Tensor<B, 4>, keep: Option<Tensor<B, 2, Int>>) -> Tensor<B, 2> {
        self.forward_traced(images, keep, &mut Trace::off())
    }

    /// [`Self::forward`], recording named activations into `trace`.
    pub fn forward_traced(
        &self,
        images: Tensor<B, 4>,
        keep: Option<Tensor<B, 2, Int>>,
        trace: &mut Trace,
    ) -> Tensor<B, 2> {
        let mut x = self.embed_traced(images, keep, trace);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, false);
            trace.record(&format!("visual.block{i}"), || x.clone());
        }
        self.pool_traced(x, trace)
    }

    /// The tokens the blocks take: patches (kept ones only, when `keep` is
    /// given) with positions, the class token, `ln_pre`. With
    /// [`Self::pool`] and the blocks, the forward pass in the pieces that
    /// per-block gradient checkpointing recomputes one at a time.
    ///
    /// # Shapes
    /// `images` `[batch, 3, H, W]` → `[batch, 1 + kept, width]`
    pub fn embed(&self, images: Tensor<B, 4>, keep: Option<Tensor<B, 2, Int>>) -> Tensor<B, 3> {
        self.embed_traced(images, keep, &mut Trace::off())
    }

    /// The embedding after the last block: pool, `ln_post`, projection.
    ///
    /// # Shapes
    /// `[batch, tokens, width]` → `[batch, embed_dim]`
    pub fn pool(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        self.pool_traced(x, &mut Trace::off())
    }

    fn embed_traced(
        &self,
        images: Tensor<B, 4>,
        keep: Option<Tensor<B, 2, Int>>,
        trace: &mut Trace,
    ) -> Tensor<B, 3> {
        let [batch, channels, height, width_px] = images.dims();
        let p = self.config.patch_size;
        let w = self.config.width;
        assert!(
            channels == 3 && height % p == 0 && width_px % p == 0,
            "images must be [batch, 3, H, W] with H, W multiples of {p}; got {:?}",
            images.dims()
        );
        let (gh, gw) = (height / p, width_px / p);
        let n = gh * gw;
        let x = kernels::patch_embed(images, self.conv1.val()); // [batch, patches, width]
        trace.record("visual.conv1", || {
            x.clone().swap_dims(1, 2).reshape([batch, w, gh, gw]) // NCHW, as torch
        });
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, w])
            .expand([batch, 1, w]); // [batch, 1, width]
        let x = Tensor::cat(vec![cls, x], 1); // [batch, 1 + patches, width]
        let x = kernels::add_rows(x, self.position_table(gh, gw));
        let x = match keep {
            None => x,
            Some(keep) => {
                let [kb, kept] = keep.dims();
                assert_eq!(kb, batch, "keep indices must have one row per image");
                let cls = x.clone().narrow(1, 0, 1); // [batch, 1, width]
                let idx = keep.reshape([batch, kept, 1]).expand([batch, kept, w]);
                let patches = x.narrow(1, 1, n).gather(1, idx); // [batch, kept, width]
                Tensor::cat(vec![cls, patches], 1) // [batch, 1 + kept, width]
            }
        };
        let x = match &self.ln_pre {
            Some(ln) => layer_norm(&self.kernels, ln, self.config.ln_eps, x),
            None => x,
        };
        trace.record("visual.ln_pre", || x.clone());
        x
    }

    fn pool_traced(&self, x: Tensor<B, 3>, trace: &mut Trace) -> Tensor<B, 2> {
        let [batch, tokens, w] = x.dims();
        let pooled = match (self.config.pool, self.config.final_ln_after_pool) {
            (VisionPool::Cls, _) => {
                let x = layer_norm(&self.kernels, &self.ln_post, self.config.ln_eps, x);
                trace.record("visual.ln_post", || x.clone());
                x.narrow(1, 0, 1).reshape([batch, w])
            }
            (pool, true) => {
                let pooled = mean_tokens(x, pool, tokens, batch, w);
                let pooled = layer_norm(&self.kernels, &self.ln_post, self.config.ln_eps, pooled);
                trace.record("visual.ln_post", || pooled.clone());
                pooled
            }
            (pool, false) => {
                let x = layer_norm(&self.kernels, &self.ln_post, self.config.ln_eps, x);
                trace.record("visual.ln_post", || x.clone());
                mean_tokens(x, pool, tokens, batch, w)
            }
        };
        pooled.matmul(self.proj.val()) // [batch, embed_dim]
    }

    /// The position table for a `gh × gw` grid `[1 + gh·gw, width]`: the
    /// stored one, recomputed sin-cos, or the learned one resized bicubically.
    fn position_table(&self, gh: usize, gw: usize) -> Tensor<B, 2> {
        let g = self.config.grid();
        let table = self.positional_embedding.val();
        if gh == g && gw == g {
            return table;
        }
        let w = self.config.width;
        let device = table.device();
        match self.config.pos_embed {
            PosEmbed::SinCos2d => Tensor::from_data(
                TensorData::new(sincos_2d(w, gh, gw), [1 + gh * gw, w]),
                &device,
            ),
            PosEmbed::Learnable => {
                // An off-resolution forward (evaluation at another size).
                // Training stages resize the stored table with `resize_image`.
                let host = table.into_data().convert::<f32>();
                let host = host.as_slice::<f32>().expect("f32 table");
                let resized = resize_bicubic(&host[w..], g, g, w, gh, gw);
                let mut all = host[..w].to_vec();
                all.extend(resized);
                Tensor::from_data(TensorData::new(all, [1 + gh * gw, w]), &device)
            }
        }
    }

    /// Returns the tower re-based at a new default `image_size`: sin-cos
    /// tables are recomputed, learned ones resized bicubically
    /// (OpenCLIP `resize_pos_embed`). Used between training stages.
    pub fn resize_image(mut self, image_size: usize) -> Self {
        let p = self.config.patch_size;
        assert!(
            image_size.is_multiple_of(p),
            "image size {image_size} is not a multiple of patch {p}"
        );
        let g = image_size / p;
        if g != self.config.grid() {
            let table = self.position_table(g, g);
            let trainable = self.config.pos_embed == PosEmbed::Learnable;
            self.positional_embedding =
                Param::from_tensor(table.detach()).set_require_grad(trainable);
        }
        self.config.image_size = image_size;
        self
    }
}

fn mean_tokens<B: Backend>(
    x: Tensor<B, 3>,
    pool: VisionPool,
    tokens: usize,
    batch: usize,
    w: usize,
) -> Tensor<B, 2> {
    let x = match pool {
        VisionPool::AvgPatches => x.narrow(1, 1, tokens - 1),
        _ => x,
    };
    x.mean_dim(1).reshape([batch, w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClipConfig;
    use crate::numeric::{TestBackend, assert_close, normal_data};

    fn images(batch: usize, size: usize) -> Tensor<TestBackend, 4> {
        Tensor::from_data(
            normal_data([batch, 3, size, size], 9, 1.0),
            &Default::default(),
        )
    }

    /// Keeping every patch, in any order, changes nothing: positions are
    /// added before selection and attention is permutation-equivariant.
    #[test]
    fn keeping_all_patches_in_any_order_is_the_identity() {
        let device = Default::default();
        for cfg in [ClipConfig::tiny(), ClipConfig::clipa_s16()] {
            let mut v = cfg.vision.clone();
            v.layers = 1;
            v.image_size = 32;
            v.patch_size = 8;
            let tower = v.init::<TestBackend>(16, &device);
            let x = images(2, 32);
            let full = tower.forward(x.clone(), None);
            let order: Vec<i64> = (0..16).rev().chain(0..16).take(16).collect();
            let keep = Tensor::<TestBackend, 1, Int>::from_ints(order.as_slice(), &device)
                .reshape([1, 16])
                .repeat_dim(0, 2);
            let kept = tower.forward(x, Some(keep));
            assert_close(&kept.into_data(), &full.into_data(), 1e-5, "permuted keep");
        }
    }

    /// Dropping patches changes the output, and only the kept ones matter:
    /// two images that differ only in a dropped patch encode the same.
    #[test]
    fn dropped_patches_do_not_influence_the_output() {
        let device = Default::default();
        let tower = ClipConfig::tiny().vision.init::<TestBackend>(16, &device);
        let a = images(1, 32);
        // Patch 0 covers pixels [0, 4)²; change only those.
        let bump = Tensor::<TestBackend, 4>::ones([1, 3, 4, 4], &device);
        let b = a.clone().slice_assign([0..1, 0..3, 0..4, 0..4], bump);
        let keep =
            Tensor::<TestBackend, 1, Int>::from_ints([5, 9, 20, 63], &device).reshape([1, 4]);
        let ya = tower.forward(a.clone(), Some(keep.clone()));
        let yb = tower.forward(b.clone(), Some(keep));
        assert_close(
            &ya.clone().into_data(),
            &yb.into_data(),
            1e-6,
            "dropped patch ignored",
        );
        let full = tower.forward(a, None);
        assert!(
            (full - ya).abs().max().into_scalar() > 1e-4,
            "masking changes the output"
        );
    }

    #[test]
    fn resizing_recomputes_or_interpolates_positions() {
        let device = Default::default();
        let mut sincos = ClipConfig::clipa_s16().vision;
        sincos.layers = 1;
        sincos.image_size = 32;
        let tower = sincos.init::<TestBackend>(16, &device).resize_image(64);
        assert_eq!(tower.config.image_size, 64);
        let want = TensorData::new(sincos_2d(384, 4, 4), [17, 384]);
        assert_close(
            &tower.positional_embedding.val().into_data(),
            &want,
            1e-7,
            "sin-cos at 64 px",
        );
        assert!(!tower.positional_embedding.val().is_require_grad());

        let learned = ClipConfig::tiny().vision.init::<TestBackend>(16, &device);
        let y32 = learned.forward(images(1, 48), None); // off-resolution forward
        let resized = learned.resize_image(48);
        assert_eq!(resized.positional_embedding.dims(), [1 + 12 * 12, 64]);
        let y48 = resized.forward(images(1, 48), None);
        assert_close(
            &y48.into_data(),
            &y32.into_data(),
            1e-6,
            "resize = on-the-fly interpolation",
        );
    }
}
