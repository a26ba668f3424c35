//! The two-tower CLIP model: encoders, normalised features, the learned
//! temperature and the image–text logits (OpenCLIP `model.py::CLIP`).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor};

use super::config::ClipConfig;
use super::text::TextTransformer;
use super::trace::Trace;
use super::vision::VisionTransformer;

/// A CLIP model.
#[derive(Module, Debug)]
pub struct ClipModel<B: Backend> {
    /// Image tower.
    pub visual: VisionTransformer<B>,
    /// Text tower.
    pub text: TextTransformer<B>,
    /// Log temperature `[1]`; logits are scaled by its exponential.
    pub logit_scale: Param<Tensor<B, 1>>,
    /// Logit bias `[1]` of the sigmoid loss; absent for softmax models.
    pub logit_bias: Option<Param<Tensor<B, 1>>>,
    /// The architecture.
    #[module(skip)]
    pub config: ClipConfig,
}

impl ClipConfig {
    /// Builds the model. Call [`ClipConfig::validate`] first.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipModel<B> {
        ClipModel {
            visual: self.vision.init(self.embed_dim, device),
            text: self.text.init(self.embed_dim, device),
            logit_scale: Param::from_tensor(Tensor::from_floats(
                [self.init_logit_scale as f32],
                device,
            )),
            logit_bias: self
                .init_logit_bias
                .map(|b| Param::from_tensor(Tensor::from_floats([b as f32], device))),
            config: self.clone(),
        }
    }
}

/// L2-normalises rows as `F.normalize` does: `x / max(‖x‖, 1e-12)`.
///
/// # Shapes
/// `[batch, dim]` → `[batch, dim]`
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12); // [batch, 1]
    x / norm
}

impl<B: Backend> ClipModel<B> {
    /// Raw image embeddings `[batch, embed_dim]`; see
    /// [`VisionTransformer::forward`] for `keep`.
    pub fn encode_image(
        &self,
        images: Tensor<B, 4>,
        keep: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 2> {
        self.visual.forward(images, keep)
    }

    /// Raw text embeddings `[batch, embed_dim]`.
    pub fn encode_text(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.text.forward(ids)
    }

    /// The sigmoid loss's logit bias `[1]`, if the model has one.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        self.logit_bias.as_ref().map(|b| b.val())
    }

    /// `exp(logit_scale)` as a `[1]` tensor.
    pub fn temperature(&self) -> Tensor<B, 1> {
        self.logit_scale.val().exp()
    }

    /// Unit image and text features, the input of every contrastive loss
    /// ([`crate::loss`]); training's plain forward pass is this.
    ///
    /// # Shapes
    /// `images` `[batch, 3, px, px]`, `keep` `[batch, kept]`, `ids`
    /// `[batch, len]` → `([batch, embed_dim], [batch, embed_dim])`
    pub fn features(
        &self,
        images: Tensor<B, 4>,
        keep: Option<Tensor<B, 2, Int>>,
        ids: Tensor<B, 2, Int>,
        trace: &mut Trace,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let image = l2_normalize(self.visual.forward_traced(images, keep, trace));
        let text = l2_normalize(self.text.forward_traced(ids, trace));
        (image, text)
    }

    /// Sets the compute dtype of every transformer block of both towers
    /// (mixed precision: bf16 branches over float32 master weights and
    /// residual stream); `None` computes in float32. Embeddings, pooling,
    /// projections and the loss stay float32.
    pub fn set_compute_dtype(&mut self, dtype: Option<FloatDType>) {
        for block in self
            .visual
            .blocks
            .iter_mut()
            .chain(self.text.blocks.iter_mut())
        {
            block.compute = dtype;
        }
    }

    /// The blocks' compute dtype (`None`: float32).
    pub fn compute_dtype(&self) -> Option<FloatDType> {
        self.visual.blocks.first().and_then(|b| b.compute)
    }

    /// Returns the model re-based at a new image size and context length
    /// (between training stages).
    pub fn resize(mut self, image_size: usize, context_length: usize) -> Self {
        self.visual = self.visual.resize_image(image_size);
        self.text = self.text.resize_context(context_length);
        self.config.vision.image_size = image_size;
        self.config.text.context_length = context_length;
        self
    }
}
