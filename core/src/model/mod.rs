//! The CLIP model family: vision and text transformers, the two-tower
//! model, configs and presets, position-embedding resizes, FLOP counts.

mod clip;
pub mod config;
pub mod flops;
pub mod posemb;
mod text;
mod trace;
mod vision;

pub use clip::{ClipModel, l2_normalize};
pub use config::{
    ClipConfig, EvalResize, Normalization, PosEmbed, TextConfig, TextPool, TokenizerConfig,
    VisionConfig, VisionPool,
};
pub use text::TextTransformer;
pub use trace::Trace;
pub use vision::VisionTransformer;
