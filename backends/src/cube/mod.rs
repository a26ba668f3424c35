//! Our own CubeCL kernels, one source for wgpu and cuda: each a kernel on
//! `CubeBackend<R>` registered as a custom operation on Burn's fusion
//! stream (docs/CUBECL-KERNELS.md), and installed through core's kernel
//! seam. AdamW and the gradients' sum of squares take every parameter of a
//! step in one operation and a few launches ([`multi`]); attention and
//! LayerNorm train in a few launches each, forward and backward
//! ([`CubeAttention`], [`CubeLayerNorm`]).

mod adamw;
mod attention;
mod common;
mod layer_norm;
mod linear;
mod multi;
mod qkv;
mod sum_squares;

pub use adamw::CubeAdamW;
pub use attention::{CubeAttention, MAX_HEAD_DIM};
pub use layer_norm::CubeLayerNorm;
pub use linear::CubeLinear;
pub use qkv::CubeQkv;
pub use sum_squares::CubeSumSquares;
