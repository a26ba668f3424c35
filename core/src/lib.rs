//! clipa-core: CLIP training the CLIPA way, generic over Burn backends.
//!
//! Everything here is written against Burn's `Backend` / `AutodiffBackend`
//! traits; concrete backends live in `clipa-backends`. The method follows
//! "An Inverse Scaling Law for CLIP Training" (Li, Wang, Xie, NeurIPS 2023).

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod host;
pub mod io;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod nn;
pub mod nodes;
pub mod numeric;
pub mod openclip;
pub mod plan;
pub mod preprocess;
pub mod reduce;
pub mod rng;
pub mod search;
pub mod selftest;
pub mod state;
pub mod sweep;
pub mod torchfile;
pub mod train;

pub use error::{Error, Result};
