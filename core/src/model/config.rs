//! Model configuration: the vision and text tower configs, the presets as
//! named constructors over one size table (big_vision `decode_variant`), and
//! validation.

use burn::config::Config;
use serde::{Deserialize, Serialize};

use crate::nn::Activation;
use crate::{Error, Result};

/// How the vision tower encodes patch positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PosEmbed {
    /// A learned table `[1 + patches, width]` (OpenAI CLIP, OpenCLIP default).
    Learnable,
    /// Fixed 2-D sin-cos, MAE layout with a zero CLS row (OpenCLIP
    /// `sin_cos_2d`, CLIPA pre-training). Recomputed when the grid changes.
    SinCos2d,
}

/// How the vision tower turns tokens into one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionPool {
    /// The CLS token (OpenAI CLIP, OpenCLIP `tok`).
    Cls,
    /// Mean over patch tokens, CLS excluded (CLIPA-v2 `gap`, OpenCLIP `avg`).
    AvgPatches,
    /// Mean over CLS and patch tokens (CLIPA-v1 torch `global_average_pool`).
    AvgAll,
}

/// How the text tower picks the token that represents the caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextPool {
    /// The position of the largest token id: EOT in CLIP BPE (OpenCLIP `argmax`).
    Argmax,
    /// The last position, often a pad slot (CLIPA JAX, OpenCLIP `last`).
    Last,
    /// The first position (OpenCLIP `first`).
    First,
}

/// The tokenizer a model reads its captions with. It is part of the model's
/// config, and so of every checkpoint's `config.json`: ids from another
/// tokenizer index the wrong rows of the token embedding, or none at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenizerConfig {
    /// OpenAI CLIP's byte-level BPE, 49,408 ids, `[SOT] … [EOT]` (OpenCLIP's
    /// default tokenizer, CLIPA-v1's PyTorch models).
    #[default]
    ClipBpe,
    /// BERT WordPiece over a `vocab.txt` kept beside the weights (CLIPA-v2:
    /// `bert-base-uncased`), run as OpenCLIP's `HFTokenizer` runs it:
    /// `[CLS] … [SEP]` cut to the context length and padded with 0.
    WordPiece {
        /// Lower-case before splitting (`do_lower_case`).
        lowercase: bool,
        /// Strip accents: NFD, then drop the combining marks.
        strip_accents: bool,
        /// Write the pad id 0 where `[SEP]` was (OpenCLIP's
        /// `strip_sep_token`, set by every CLIPA-v2 model).
        strip_sep_token: bool,
    },
}

impl TokenizerConfig {
    /// BERT uncased WordPiece as CLIPA-v2's OpenCLIP configs run it
    /// (`hf_tokenizer_name: bert-base-uncased`, `strip_sep_token`).
    pub const BERT_UNCASED: Self = Self::WordPiece {
        lowercase: true,
        strip_accents: true,
        strip_sep_token: true,
    };
}

/// How an evaluation image becomes the model's input square: the model's
/// own preprocessing, carried in its config so that `clipa eval`,
/// `classify`, `embed` and the trainer's evaluators all agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalResize {
    /// Resize the shorter side, then the centre square (OpenCLIP's default,
    /// `resize_mode = "shortest"`).
    #[default]
    CenterCrop,
    /// Resize the whole image to a square (CLIPA's evaluation after
    /// fine-tuning, "directly resize works better"; OpenCLIP `squash`).
    Squash,
}

impl std::str::FromStr for EvalResize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "center-crop" => Ok(Self::CenterCrop),
            "squash" => Ok(Self::Squash),
            other => Err(Error::Config(format!(
                "resize {other:?}: expected center-crop or squash"
            ))),
        }
    }
}

/// Per-channel image normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Channel means (RGB), on the 0–1 scale.
    pub mean: [f32; 3],
    /// Channel standard deviations (RGB).
    pub std: [f32; 3],
}

impl Normalization {
    /// OpenAI CLIP's statistics, OpenCLIP's default.
    pub const OPENAI: Self = Self {
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    };
    /// ImageNet statistics, used by CLIPA.
    pub const IMAGENET: Self = Self {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
}

/// The vision transformer.
#[derive(Config, Debug, PartialEq)]
pub struct VisionConfig {
    /// Default (and position-embedding) image side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Token width.
    pub width: usize,
    /// Number of residual blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp_width: usize,
    /// Position embedding kind.
    #[config(default = "PosEmbed::Learnable")]
    pub pos_embed: PosEmbed,
    /// Whether a LayerNorm follows the embeddings (`ln_pre`).
    #[config(default = true)]
    pub ln_pre: bool,
    /// Pooling.
    #[config(default = "VisionPool::Cls")]
    pub pool: VisionPool,
    /// For average pools: apply `ln_post` after pooling (CLIPA-v2) instead
    /// of to every token before it.
    #[config(default = false)]
    pub final_ln_after_pool: bool,
    /// MLP activation.
    #[config(default = "Activation::Gelu")]
    pub activation: Activation,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub ln_eps: f64,
}

/// The text transformer.
#[derive(Config, Debug, PartialEq)]
pub struct TextConfig {
    /// Maximum (and position-embedding) sequence length.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Token width.
    pub width: usize,
    /// Number of residual blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp_width: usize,
    /// Causal attention mask (CLIP) or bidirectional (CLIPA JAX).
    #[config(default = true)]
    pub causal: bool,
    /// Pooling.
    #[config(default = "TextPool::Argmax")]
    pub pool: TextPool,
    /// The tokenizer whose ids index `vocab_size` rows.
    #[config(default = "TokenizerConfig::ClipBpe")]
    pub tokenizer: TokenizerConfig,
    /// MLP activation.
    #[config(default = "Activation::Gelu")]
    pub activation: Activation,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub ln_eps: f64,
}

/// A two-tower CLIP model.
#[derive(Config, Debug, PartialEq)]
pub struct ClipConfig {
    /// Shared embedding size of both towers' outputs.
    pub embed_dim: usize,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Text tower.
    pub text: TextConfig,
    /// Initial value of the learned log temperature, ln(1/0.07).
    #[config(default = 2.659_260_036_932_778)]
    pub init_logit_scale: f64,
    /// Initial logit bias of the sigmoid (SigLIP) loss, −10; `None` for
    /// models trained with the softmax loss, which have no bias.
    #[config(default = "None")]
    pub init_logit_bias: Option<f64>,
    /// Image normalisation the model was trained with.
    #[config(default = "Normalization::OPENAI")]
    pub normalization: Normalization,
    /// Evaluation preprocessing the model expects.
    #[config(default = "EvalResize::CenterCrop")]
    pub eval_resize: EvalResize,
}

/// One row of the size table: a transformer's width, depth, MLP width and
/// heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    /// Token width.
    pub width: usize,
    /// Residual blocks.
    pub layers: usize,
    /// MLP hidden width.
    pub mlp: usize,
    /// Attention heads.
    pub heads: usize,
}

const fn size(width: usize, layers: usize, mlp: usize, heads: usize) -> Size {
    Size {
        width,
        layers,
        mlp,
        heads,
    }
}

/// The size table. Vision rows from CLIPA `vit.py`, text rows from CLIPA
/// `text_transformer.py` (G text from the t5x branch), OpenAI rows from the
/// CLIP paper; `bench-tiny` from `shared/bench/README.md`.
pub mod sizes {
    use super::{Size, size};
    /// ViT-S vision / CLIPA S text.
    pub const S: Size = size(384, 12, 1536, 6);
    /// ViT-B vision.
    pub const B: Size = size(768, 12, 3072, 12);
    /// ViT-L vision.
    pub const L: Size = size(1024, 24, 4096, 16);
    /// ViT-H vision.
    pub const H: Size = size(1280, 32, 5120, 16);
    /// ViT-bigG vision.
    pub const G: Size = size(1664, 48, 8192, 16);
    /// Text tower of B models (CLIP and CLIPA).
    pub const TEXT_B: Size = size(512, 12, 2048, 8);
    /// Text tower of L models (CLIP and CLIPA).
    pub const TEXT_L: Size = size(768, 12, 3072, 12);
    /// Text tower of CLIPA H.
    pub const TEXT_H: Size = size(1024, 24, 4096, 16);
    /// Text tower of CLIPA bigG.
    pub const TEXT_G: Size = size(1280, 32, 5120, 20);
    /// The benchmark model's towers.
    pub const BENCH_TINY: Size = size(256, 4, 1024, 4);
    /// The demo model's towers (`clipa train` on a 2-core CPU in minutes).
    pub const DEMO: Size = size(64, 2, 256, 2);
    /// The unit-test model's towers.
    pub const TINY: Size = size(64, 2, 256, 2);
    /// The CPU scaling sweep's three sizes (`clipa sweep --preset cpu`):
    /// width doubles, depth stays 2 and heads stay 32 wide, so each step up
    /// costs about 4× the FLOPs per token.
    pub const SCALE_W32: Size = size(32, 2, 128, 1);
    /// The sweep's middle size.
    pub const SCALE_W64: Size = size(64, 2, 256, 2);
    /// The sweep's largest size.
    pub const SCALE_W128: Size = size(128, 2, 512, 4);
}

/// The names `--model` accepts, in the order `clipa models` lists them.
pub const PRESETS: [&str; 18] = [
    "clipa-v1-b16",
    "clipa-v1-l16",
    "clipa-v1-h14",
    "clipa-s16",
    "clipa-b16",
    "clipa-l14",
    "clipa-l16",
    "clipa-h14",
    "clipa-g14",
    "vit-b32",
    "vit-b16",
    "vit-l14",
    "bench-tiny",
    "demo",
    "tiny",
    "scale-w32",
    "scale-w64",
    "scale-w128",
];

impl VisionConfig {
    fn from_size(s: Size, patch_size: usize, image_size: usize) -> Self {
        Self::new(image_size, patch_size, s.width, s.layers, s.heads, s.mlp)
    }

    /// Patches along one side at the default image size.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

impl TextConfig {
    fn from_size(s: Size, context_length: usize, vocab_size: usize) -> Self {
        Self::new(
            context_length,
            vocab_size,
            s.width,
            s.layers,
            s.heads,
            s.mlp,
        )
    }
}

/// CLIP BPE vocabulary size.
pub const CLIP_VOCAB: usize = 49_408;
/// Text vocabulary of CLIPA's JAX towers: BERT uncased WordPiece (30,522
/// entries) padded to 32,000 rows, as OpenCLIP's `*-CLIPA.json` declare.
pub const BERT_VOCAB: usize = 32_000;

impl ClipConfig {
    /// A CLIPA-v2 model as the JAX code trains it and OpenCLIP's
    /// `*-CLIPA.json` express it: no `ln_pre`, sin-cos positions, mean over
    /// patches with the LayerNorm after the pool, bidirectional text pooled at
    /// the last position, tanh GELU, LayerNorm eps 1e-6, ImageNet statistics,
    /// and evaluation by a direct square resize (CLIPA's test scripts,
    /// `--square-resize-only`).
    fn clipa(embed_dim: usize, vision: Size, patch: usize, text: Size) -> Self {
        let vision = VisionConfig::from_size(vision, patch, 224)
            .with_pos_embed(PosEmbed::SinCos2d)
            .with_ln_pre(false)
            .with_pool(VisionPool::AvgPatches)
            .with_final_ln_after_pool(true)
            .with_activation(Activation::GeluTanh)
            .with_ln_eps(1e-6);
        let text = TextConfig::from_size(text, 32, BERT_VOCAB)
            .with_causal(false)
            .with_pool(TextPool::Last)
            .with_activation(Activation::GeluTanh)
            .with_ln_eps(1e-6)
            .with_tokenizer(TokenizerConfig::BERT_UNCASED);
        Self::new(embed_dim, vision, text)
            .with_normalization(Normalization::IMAGENET)
            .with_eval_resize(EvalResize::Squash)
    }

    /// A CLIPA-v1 model as the PyTorch code (`clipa_torch`) trained the 8×A100
    /// runs: OpenCLIP's ViT with `ln_pre`, exact GELU and LayerNorm eps 1e-5,
    /// sin-cos image positions (`--pos-embed sin_cos_2d`), `pool` over the
    /// image tokens, and a causal CLIP-BPE text tower pooled at EOT. ImageNet
    /// statistics and a square bilinear resize, as its test scripts
    /// (`--square-resize-only --interpolation bilinear`).
    fn clipa_v1(
        embed_dim: usize,
        vision: Size,
        patch: usize,
        pool: VisionPool,
        text: Size,
        ctx: usize,
    ) -> Self {
        let vision = VisionConfig::from_size(vision, patch, 224)
            .with_pos_embed(PosEmbed::SinCos2d)
            .with_pool(pool)
            // OpenCLIP's `global_average_pool`: the mean, then `ln_post`.
            .with_final_ln_after_pool(pool != VisionPool::Cls);
        Self::new(
            embed_dim,
            vision,
            TextConfig::from_size(text, ctx, CLIP_VOCAB),
        )
        .with_normalization(Normalization::IMAGENET)
        .with_eval_resize(EvalResize::Squash)
    }

    /// An OpenAI-CLIP-architecture model (OpenCLIP defaults, exact GELU).
    fn openai(
        embed_dim: usize,
        vision: Size,
        patch: usize,
        image: usize,
        text: Size,
        ctx: usize,
    ) -> Self {
        Self::new(
            embed_dim,
            VisionConfig::from_size(vision, patch, image),
            TextConfig::from_size(text, ctx, CLIP_VOCAB),
        )
    }

    /// CLIPA-v1 B/16 (`ViT-B-16-CL16.json`: CLS pooling, 16 text tokens).
    pub fn clipa_v1_b16() -> Self {
        Self::clipa_v1(512, sizes::B, 16, VisionPool::Cls, sizes::TEXT_B, 16)
    }
    /// CLIPA-v1 L/16 (`ViT-L-16-CL32-GAP.json`: mean over CLS and patches).
    pub fn clipa_v1_l16() -> Self {
        Self::clipa_v1(768, sizes::L, 16, VisionPool::AvgAll, sizes::TEXT_L, 32)
    }
    /// CLIPA-v1 H/14 (`ViT-H-14-CL32-GAP.json`), the v2 report's Table 1
    /// scaling runs.
    pub fn clipa_v1_h14() -> Self {
        Self::clipa_v1(1024, sizes::H, 14, VisionPool::AvgAll, sizes::TEXT_H, 32)
    }
    /// CLIPA-v2-architecture S/16 (JAX; BERT WordPiece text).
    pub fn clipa_s16() -> Self {
        Self::clipa(384, sizes::S, 16, sizes::S)
    }
    /// CLIPA-v2-architecture B/16 (JAX; BERT WordPiece text).
    pub fn clipa_b16() -> Self {
        Self::clipa(512, sizes::B, 16, sizes::TEXT_B)
    }
    /// CLIPA-v2 L/14 (the DataComp-1B run of the v2 report's Table 4).
    pub fn clipa_l14() -> Self {
        Self::clipa(768, sizes::L, 14, sizes::TEXT_L)
    }
    /// CLIPA-v2-architecture L/16 (JAX; BERT WordPiece text).
    pub fn clipa_l16() -> Self {
        Self::clipa(768, sizes::L, 16, sizes::TEXT_L)
    }
    /// CLIPA-v2 H/14 (BERT WordPiece text).
    pub fn clipa_h14() -> Self {
        Self::clipa(1024, sizes::H, 14, sizes::TEXT_H)
    }
    /// CLIPA-v2 bigG/14 (BERT WordPiece text).
    pub fn clipa_g14() -> Self {
        Self::clipa(1280, sizes::G, 14, sizes::TEXT_G)
    }
    /// OpenAI ViT-B/32.
    pub fn vit_b32() -> Self {
        Self::openai(512, sizes::B, 32, 224, sizes::TEXT_B, 77)
    }
    /// OpenAI ViT-B/16.
    pub fn vit_b16() -> Self {
        Self::openai(512, sizes::B, 16, 224, sizes::TEXT_B, 77)
    }
    /// OpenAI ViT-L/14.
    pub fn vit_l14() -> Self {
        Self::openai(768, sizes::L, 14, 224, sizes::TEXT_L, 77)
    }
    /// The peer-benchmark model (`shared/bench/README.md`): width 256, 4
    /// layers, 4 heads, patch 4 at 32 px, context 32, 19.14 M parameters.
    pub fn bench_tiny() -> Self {
        Self::openai(256, sizes::BENCH_TINY, 4, 32, sizes::BENCH_TINY, 32)
    }
    /// The demo model of `clipa train`: width 64, 2 layers, 2 heads, patch 4
    /// at 32 px, context 16, ImageNet statistics as CLIPA. Sized so that the
    /// demo's 1 250 steps at batch 128 take about 7 minutes on 2 CPU cores.
    pub fn demo() -> Self {
        let mut cfg = Self::openai(64, sizes::DEMO, 4, 32, sizes::DEMO, 16);
        cfg.normalization = Normalization::IMAGENET;
        cfg
    }
    /// The test model: width 64, 2 layers, 2 heads, patch 4 at 32 px.
    pub fn tiny() -> Self {
        Self::openai(64, sizes::TINY, 4, 32, sizes::TINY, 32)
    }

    /// A model of the CPU scaling sweep: both towers of size `s`, patch 4
    /// at 32 px (64 patches), context 16, embedding width = tower width.
    /// Sin-cos image positions, as CLIPA pre-trains, so the resolution can
    /// change between pre-training and fine-tuning without interpolation.
    fn scale(s: Size) -> Self {
        let mut cfg = Self::openai(s.width, s, 4, 32, s, 16);
        cfg.vision.pos_embed = PosEmbed::SinCos2d;
        cfg.normalization = Normalization::IMAGENET;
        cfg
    }
    /// The sweep's smallest model (width 32).
    pub fn scale_w32() -> Self {
        Self::scale(sizes::SCALE_W32)
    }
    /// The sweep's middle model (width 64).
    pub fn scale_w64() -> Self {
        Self::scale(sizes::SCALE_W64)
    }
    /// The sweep's largest model (width 128).
    pub fn scale_w128() -> Self {
        Self::scale(sizes::SCALE_W128)
    }

    /// Looks a preset up by its `--model` name.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "clipa-v1-b16" => Self::clipa_v1_b16(),
            "clipa-v1-l16" => Self::clipa_v1_l16(),
            "clipa-v1-h14" => Self::clipa_v1_h14(),
            "clipa-s16" => Self::clipa_s16(),
            "clipa-b16" => Self::clipa_b16(),
            "clipa-l14" => Self::clipa_l14(),
            "clipa-l16" => Self::clipa_l16(),
            "clipa-h14" => Self::clipa_h14(),
            "clipa-g14" => Self::clipa_g14(),
            "vit-b32" => Self::vit_b32(),
            "vit-b16" => Self::vit_b16(),
            "vit-l14" => Self::vit_l14(),
            "bench-tiny" => Self::bench_tiny(),
            "demo" => Self::demo(),
            "tiny" => Self::tiny(),
            "scale-w32" => Self::scale_w32(),
            "scale-w64" => Self::scale_w64(),
            "scale-w128" => Self::scale_w128(),
            other => {
                return Err(Error::Config(format!(
                    "unknown model '{other}'; presets: {}",
                    PRESETS.join(", ")
                )));
            }
        })
    }

    /// Checks every size for consistency; call before `init`.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let t = &self.text;
        let bad = |msg: String| Err(Error::Config(msg));
        if self.embed_dim == 0 {
            return bad("embed_dim must be positive".into());
        }
        for (name, width, heads, layers, mlp) in [
            ("vision", v.width, v.heads, v.layers, v.mlp_width),
            ("text", t.width, t.heads, t.layers, t.mlp_width),
        ] {
            if width == 0 || heads == 0 || width % heads != 0 {
                return bad(format!(
                    "{name}: heads ({heads}) must divide width ({width})"
                ));
            }
            if layers == 0 || mlp == 0 {
                return bad(format!("{name}: layers and mlp width must be positive"));
            }
        }
        if v.patch_size == 0 || v.image_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return bad(format!(
                "vision: image size {} is not a multiple of patch size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.pos_embed == PosEmbed::SinCos2d && !v.width.is_multiple_of(4) {
            return bad(format!(
                "vision: sin-cos positions need width % 4 == 0, got {}",
                v.width
            ));
        }
        for (name, eps) in [("vision", v.ln_eps), ("text", t.ln_eps)] {
            if !(eps.is_finite() && eps > 0.0) {
                return bad(format!(
                    "{name}: LayerNorm epsilon must be positive, got {eps}"
                ));
            }
        }
        let n = &self.normalization;
        if !n.std.iter().all(|s| s.is_finite() && *s > 0.0) || !n.mean.iter().all(|m| m.is_finite())
        {
            return bad(format!(
                "image normalisation must be finite with positive std, got {n:?}"
            ));
        }
        if t.context_length == 0 || t.vocab_size == 0 {
            return bad("text: context length and vocab size must be positive".into());
        }
        if t.tokenizer == TokenizerConfig::ClipBpe && t.vocab_size < CLIP_VOCAB {
            return bad(format!(
                "text: CLIP BPE emits ids up to {} but the token embedding has {} rows",
                CLIP_VOCAB - 1,
                t.vocab_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
