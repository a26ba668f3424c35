//! Our own CubeCL kernels, one source for wgpu and cuda: each a kernel on
//! `CubeBackend<R>` registered as a custom operation on Burn's fusion
//! stream (docs/CUBECL-KERNELS.md), and installed through core's kernel
//! seam.

mod adamw;

pub use adamw::CubeAdamW;
