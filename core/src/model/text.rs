//! The text transformer (OpenCLIP `transformer.py::TextTransformer`, CLIPA
//! `text_transformer.py`): token + position embedding → pre-LN blocks
//! (causal or bidirectional) → `ln_final` → pool → projection.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use super::config::{TextConfig, TextPool};
use super::posemb::resize_linear;
use super::trace::Trace;
use crate::kernels::{self, Resolved, layer_norm};
use crate::nn::{ResidualBlock, ResidualBlockConfig};

/// The text tower.
#[derive(Module, Debug)]
pub struct TextTransformer<B: Backend> {
    /// Token table `[vocab, width]`.
    pub token_embedding: Embedding<B>,
    /// Position table `[context_length, width]`.
    pub positional_embedding: Param<Tensor<B, 2>>,
    /// Residual blocks.
    pub blocks: Vec<ResidualBlock<B>>,
    /// Final LayerNorm over every token.
    pub ln_final: LayerNorm<B>,
    /// Output projection `[width, embed_dim]`, applied as `x @ proj`.
    pub text_projection: Param<Tensor<B, 2>>,
    /// The architecture, at the length of `positional_embedding`.
    #[module(skip)]
    pub config: TextConfig,
    /// The kernels of its embedding and LayerNorm, resolved when it was
    /// built.
    #[module(skip)]
    pub kernels: Resolved<B>,
}

impl TextConfig {
    /// Builds the tower with OpenCLIP's text init (`CLIP.init_parameters`):
    /// tokens N(0, 0.02²), positions N(0, 0.01²), projection N(0, 1/width).
    pub fn init<B: Backend>(&self, embed_dim: usize, device: &B::Device) -> TextTransformer<B> {
        let w = self.width;
        let block = ResidualBlockConfig::new(w, self.heads, self.mlp_width)
            .with_activation(self.activation)
            .with_ln_eps(self.ln_eps);
        TextTransformer {
            token_embedding: EmbeddingConfig::new(self.vocab_size, w)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            positional_embedding: Param::from_tensor(Tensor::random(
                [self.context_length, w],
                Distribution::Normal(0.0, 0.01),
                device,
            )),
            blocks: (0..self.layers).map(|_| block.init(device)).collect(),
            ln_final: LayerNormConfig::new(w)
                .with_epsilon(self.ln_eps)
                .init(device),
            text_projection: Param::from_tensor(Tensor::random(
                [w, embed_dim],
                Distribution::Normal(0.0, (w as f64).powf(-0.5)),
                device,
            )),
            config: self.clone(),
            kernels: Resolved::installed(),
        }
    }
}

impl<B: Backend> TextTransformer<B> {
    /// Encodes token ids into (unnormalised) embeddings. Any length up to
    /// the context length works; positions are the first `len` rows.
    ///
    /// # Shapes
    /// - `ids`: `[batch, len]`
    /// - output: `[batch, embed_dim]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.forward_traced(ids, &mut Trace::off())
    }

    /// [`Self::forward`], recording named activations into `trace`.
    pub fn forward_traced(&self, ids: Tensor<B, 2, Int>, trace: &mut Trace) -> Tensor<B, 2> {
        let mut x = self.embed_traced(ids.clone(), trace);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, self.config.causal);
            trace.record(&format!("text.block{i}"), || x.clone());
        }
        self.pool_traced(x, ids, trace)
    }

    /// The tokens the blocks take: token plus position embeddings. With
    /// [`Self::pool`] and the blocks (causal when the tower is), the forward
    /// pass in the pieces that per-block gradient checkpointing recomputes.
    ///
    /// # Shapes
    /// `ids` `[batch, len]` → `[batch, len, width]`
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.embed_traced(ids, &mut Trace::off())
    }

    /// The embedding after the last block: `ln_final`, the pooled position
    /// (chosen from `ids` for argmax pooling), projection.
    ///
    /// # Shapes
    /// `x` `[batch, len, width]`, `ids` `[batch, len]` → `[batch, embed_dim]`
    pub fn pool(&self, x: Tensor<B, 3>, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.pool_traced(x, ids, &mut Trace::off())
    }

    fn embed_traced(&self, ids: Tensor<B, 2, Int>, trace: &mut Trace) -> Tensor<B, 3> {
        let [_, len] = ids.dims();
        assert!(
            len >= 1 && len <= self.config.context_length,
            "text length {len} outside 1..={}",
            self.config.context_length
        );
        let x = kernels::embedding(&self.kernels, &self.token_embedding, ids); // [batch, len, width]
        trace.record("token_embedding", || x.clone());
        let pos = self.positional_embedding.val().narrow(0, 0, len); // [len, width]
        kernels::add_rows(x, pos)
    }

    fn pool_traced(
        &self,
        x: Tensor<B, 3>,
        ids: Tensor<B, 2, Int>,
        trace: &mut Trace,
    ) -> Tensor<B, 2> {
        let [batch, len, w] = x.dims();
        let x = layer_norm(&self.kernels, &self.ln_final, self.config.ln_eps, x);
        trace.record("ln_final", || x.clone());
        let pooled = match self.config.pool {
            TextPool::Last => x.narrow(1, len - 1, 1),
            TextPool::First => x.narrow(1, 0, 1),
            TextPool::Argmax => {
                let idx = ids.argmax(1); // [batch, 1]
                let idx = idx.reshape([batch, 1, 1]).expand([batch, 1, w]);
                x.gather(1, idx) // [batch, 1, width]
            }
        };
        pooled
            .reshape([batch, w])
            .matmul(self.text_projection.val())
    }

    /// Returns the tower re-based at a new context length, the learned
    /// positions resized linearly (OpenCLIP `resize_text_pos_embed`). Used
    /// between training stages, e.g. 8 → 32 tokens.
    pub fn resize_context(mut self, context_length: usize) -> Self {
        let old = self.config.context_length;
        if context_length != old {
            let w = self.config.width;
            let table = self.positional_embedding.val();
            let device = table.device();
            let host = table.into_data().convert::<f32>();
            let host = host.as_slice::<f32>().expect("f32 table");
            let resized = resize_linear(host, old, w, context_length);
            let data = TensorData::new(resized, [context_length, w]);
            self.positional_embedding = Param::from_tensor(Tensor::from_data(data, &device));
            self.config.context_length = context_length;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClipConfig;
    use crate::numeric::{TestBackend, assert_close};

    fn ids(rows: &[&[i64]]) -> Tensor<TestBackend, 2, Int> {
        let len = rows[0].len();
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::<TestBackend, 1, Int>::from_ints(flat.as_slice(), &Default::default())
            .reshape([rows.len(), len])
    }

    /// Causal + EOT pooling: tokens after EOT cannot change the embedding.
    #[test]
    fn causal_argmax_pooling_ignores_padding() {
        let tower = ClipConfig::tiny()
            .text
            .init::<TestBackend>(16, &Default::default());
        let a = tower.forward(ids(&[&[49406, 320, 1125, 49407, 0, 0]]));
        let b = tower.forward(ids(&[&[49406, 320, 1125, 49407, 77, 99]]));
        assert_close(&a.into_data(), &b.into_data(), 1e-6, "padding after EOT");
    }

    /// Pooled at the first token, a bidirectional tower sees a change in
    /// the last token and a causal one does not: the mask is really applied.
    #[test]
    fn only_bidirectional_attention_sees_later_tokens() {
        let base = ClipConfig::clipa_s16().text;
        for causal in [false, true] {
            let tower = TextConfig {
                layers: 1,
                vocab_size: 100,
                pool: TextPool::First,
                causal,
                ..base.clone()
            }
            .init::<TestBackend>(16, &Default::default());
            let a = tower.forward(ids(&[&[1, 2, 3, 4]]));
            let b = tower.forward(ids(&[&[1, 2, 3, 9]]));
            let diff = (a - b).abs().max().into_scalar();
            assert_eq!(diff > 1e-4, !causal, "causal={causal}: diff {diff}");
        }
    }

    #[test]
    fn resizing_the_context_interpolates_linearly() {
        let tower = ClipConfig::tiny()
            .text
            .init::<TestBackend>(16, &Default::default());
        let before = tower
            .positional_embedding
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let resized = tower.resize_context(8).resize_context(8);
        assert_eq!(resized.positional_embedding.dims(), [8, 64]);
        assert_eq!(resized.config.context_length, 8);
        // 32 → 8: output row o samples source position 4·o + 1.5.
        let after = resized
            .positional_embedding
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for c in [0, 17, 63] {
            let want = 0.5 * (before[64 + c] + before[2 * 64 + c]);
            assert!((after[c] - want).abs() < 1e-6);
        }
        // Shorter inputs use the first rows; the model still runs.
        resized.forward(ids(&[&[49406, 320, 49407]]));
    }
}
