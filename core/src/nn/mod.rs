//! Transformer building blocks shared by the vision and text towers.
//!
//! Layouts follow OpenCLIP's `transformer.py` (`ResidualAttentionBlock`), so
//! OpenCLIP weights map one to one: pre-LN, `x + attn(ln_1(x))`,
//! `x + mlp(ln_2(x))`.
//!
//! Every op with a backend kernel (linear layers, LayerNorm, GELU, the
//! attention core, the embedding lookup) is called through the kernel seam,
//! [`crate::kernels`], one function per op.

mod attention;
mod block;

pub use attention::{Attention, AttentionConfig};
pub use block::{Activation, Mlp, ResidualBlock, ResidualBlockConfig};
