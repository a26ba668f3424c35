//! The kernel seam: every op a backend may compute its own way, each with
//! the composed fallback that runs everywhere else.
//!
//! Core is generic over the backend and names none. `nn/` and the optimiser
//! call one function per op here ([`linear`], [`linear_add`],
//! [`layer_norm`], [`gelu`], [`attention`], [`attention_packed`], the packed
//! q/k/v projection of [`QkvKernel`], [`embedding`], and
//! [`Kernels::adamw`] and [`Kernels::sum_squares`] through
//! [`crate::train::optim::AdamW`]). Each
//! function runs the op in the backend's kernel where it has one, and
//! otherwise as the composition of Burn's generic ops written beside it
//! (`*_composed`). Every kernel must compute what that composition
//! computes, gradients included; the backends' tests compare the two. Two
//! more ops, [`patch_embed`] and [`add_rows`], are layouts that every
//! backend runs as they are (the tuning that used to shape `nn/`).
//!
//! ```text
//!   backends::run(kind, job)                 cli → backends
//!     └─ install(kernels of kind)  ──►  [Kernels<B>, one per backend type]
//!          job.run::<B>()                          │ looked up by B's type,
//!            model init / load ──► Resolved<B> ◄───┘ once per module build
//!            nn::ResidualBlock … (each holds its Resolved<B>)
//!              ──► kernels::linear / layer_norm / gelu / attention / embedding
//!                    ├─ Some(kernel): the backend's pass
//!                    └─ None: *_composed (Burn ops)
//!            model.valid() ──► Resolved<B::InnerBackend> (looked up again)
//!            train::optim::AdamW ──► Kernels::adamw, sum_squares
//!                                    (resolved once per optimiser)
//! ```
//!
//! A backend installs a whole [`Kernels`] bundle per backend type at the
//! start of a run ([`install`]; `clipa_backends::run` does it for the
//! chosen backend, and benches and tests that drive a backend type
//! directly call `clipa_backends::install_kernels`). The installation
//! lasts as long as its [`Installed`] guard, so a test that installs
//! kernels removes them again when it ends. Nothing is registered as a side
//! effect of selecting a device. Each module that runs an op of the seam
//! resolves the bundle once, when it is built, into a [`Resolved`] field,
//! and hands that to the op: no op looks anything up. A module built with
//! nothing installed runs every op composed.

mod adamw;
mod attention;
mod embedding;
mod gelu;
mod linear;
mod norm;
mod qkv;
mod resolved;
mod sum_squares;

pub use adamw::{AdamWF32, AdamWKernel, AdamWScalars, AdamWSlot, UpdateGuard, adamw_composed};
pub use attention::{AttentionKernel, attention, attention_composed, attention_packed};
pub use embedding::{EmbeddingKernel, embedding};
pub use gelu::{GeluKernel, gelu, gelu_composed};
pub use linear::{
    LinearKernel, ROWS_PER_CHUNK, add_rows, linear, linear_add, linear_composed, patch_embed,
    split_k_chunks,
};
pub use norm::{LayerNormKernel, layer_norm};
pub use qkv::{QkvKernel, qkv_composed};
pub use resolved::Resolved;
pub use sum_squares::{SumSquaresKernel, sum_squares_composed};

use std::any::{Any, TypeId};
use std::sync::{Arc, PoisonError, RwLock};

use burn::tensor::backend::Backend;

/// One backend type's kernels: `None` where it runs the composed op.
pub struct Kernels<B: Backend> {
    /// `x·W + b` (+ a residual), [`linear`] and [`linear_add`].
    pub linear: Option<Arc<dyn LinearKernel<B>>>,
    /// LayerNorm with a bias, [`layer_norm`].
    pub layer_norm: Option<Arc<dyn LayerNormKernel<B>>>,
    /// The exact GELU, [`gelu`].
    pub gelu: Option<Arc<dyn GeluKernel<B>>>,
    /// Multi-head attention, [`attention`] and [`attention_packed`].
    pub attention: Option<Arc<dyn AttentionKernel<B>>>,
    /// The packed q/k/v projection (`nn::Attention` uses it where the
    /// attention kernel is there too).
    pub qkv: Option<Arc<dyn QkvKernel<B>>>,
    /// The token-embedding lookup, [`embedding`].
    pub embedding: Option<Arc<dyn EmbeddingKernel<B>>>,
    /// One AdamW update of one parameter ([`crate::train::optim::AdamW`]).
    pub adamw: Option<Arc<dyn AdamWKernel<B>>>,
    /// The gradients' sum of squares, for the global norm
    /// ([`crate::train::optim::AdamW::grad_norm`]).
    pub sum_squares: Option<Arc<dyn SumSquaresKernel<B>>>,
}

impl<B: Backend> Default for Kernels<B> {
    /// No kernels: every op composed from Burn's generic ops.
    fn default() -> Self {
        Self {
            linear: None,
            layer_norm: None,
            gelu: None,
            attention: None,
            qkv: None,
            embedding: None,
            adamw: None,
            sum_squares: None,
        }
    }
}

impl<B: Backend> Kernels<B> {
    /// The bundle installed for `B`, or `None` where the backend runs every
    /// op composed. One read of the installed list, by `B`'s type.
    pub fn installed() -> Option<Arc<Self>> {
        let list = INSTALLED.read().unwrap_or_else(PoisonError::into_inner);
        let entry = list.iter().find(|e| e.backend == TypeId::of::<B>())?;
        Arc::clone(&entry.kernels).downcast::<Self>().ok()
    }

    /// The names of the ops this bundle replaces, in a fixed order (what a
    /// backend installed, as its tests check it).
    pub fn names(&self) -> Vec<&'static str> {
        [
            ("linear", self.linear.is_some()),
            ("layer_norm", self.layer_norm.is_some()),
            ("gelu", self.gelu.is_some()),
            ("attention", self.attention.is_some()),
            ("qkv", self.qkv.is_some()),
            ("embedding", self.embedding.is_some()),
            ("adamw", self.adamw.is_some()),
            ("sum_squares", self.sum_squares.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, some)| some.then_some(name))
        .collect()
    }
}

/// One installed bundle: the backend type it serves, how many
/// [`Installed`] guards hold it, and the `Arc<Kernels<B>>` behind `Any`.
struct Entry {
    backend: TypeId,
    holders: usize,
    kernels: Arc<dyn Any + Send + Sync>,
}

/// The installed bundles. A read-write lock: modules read it when they are
/// built, possibly on several replica threads at once; it is written only
/// when a run (or a test) starts and ends.
static INSTALLED: RwLock<Vec<Entry>> = RwLock::new(Vec::new());

/// Makes `kernels` the ones that ops on backend `B` run, until the returned
/// guard (and every other guard of `B`'s) is dropped. A second
/// installation for the same type replaces the bundle and holds it too.
#[must_use = "the kernels are removed again when the guard drops"]
pub fn install<B: Backend>(kernels: Kernels<B>) -> Installed {
    let backend = TypeId::of::<B>();
    let kernels: Arc<dyn Any + Send + Sync> = Arc::new(kernels);
    let mut list = INSTALLED.write().unwrap_or_else(PoisonError::into_inner);
    match list.iter_mut().find(|e| e.backend == backend) {
        Some(entry) => {
            entry.holders += 1;
            entry.kernels = kernels;
        }
        None => list.push(Entry {
            backend,
            holders: 1,
            kernels,
        }),
    }
    Installed {
        backends: vec![backend],
    }
}

/// Holds installed kernels; dropping it removes them where no other guard
/// holds them.
#[must_use = "the kernels are removed again when the guard drops"]
#[derive(Debug, Default)]
pub struct Installed {
    backends: Vec<TypeId>,
}

impl Installed {
    /// One guard for several installations (a backend's autodiff type and
    /// its inner type).
    pub fn and(mut self, mut other: Installed) -> Installed {
        self.backends.append(&mut other.backends);
        self
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let mut list = INSTALLED.write().unwrap_or_else(PoisonError::into_inner);
        for backend in self.backends.drain(..) {
            if let Some(i) = list.iter().position(|e| e.backend == backend) {
                list[i].holders -= 1;
                if list[i].holders == 0 {
                    list.swap_remove(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;

    type Inner = <TestBackend as burn::tensor::backend::AutodiffBackend>::InnerBackend;

    /// An installation is found for its own backend type only, is held
    /// while any guard is, and is gone when the last guard drops. The
    /// bundles installed here are empty (every op composed), so the other
    /// tests running beside this one compute exactly what they would
    /// without it.
    #[test]
    fn an_installation_serves_its_type_until_its_last_guard_drops() {
        let first = install(Kernels::<Inner>::default());
        let found = Kernels::<Inner>::installed().expect("installed");
        assert!(found.names().is_empty());
        let second = install(Kernels::<Inner>::default());
        let replaced = Kernels::<Inner>::installed().expect("still installed");
        assert!(!Arc::ptr_eq(&found, &replaced), "the later bundle serves");
        drop(first);
        assert!(
            Kernels::<Inner>::installed().is_some(),
            "one guard still holds it"
        );
        drop(second);
        // Other tests may install for their own types, never for `Inner`.
        assert!(Kernels::<Inner>::installed().is_none());
    }
}
