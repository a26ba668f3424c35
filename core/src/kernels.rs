//! Backend kernels registered at run time.
//!
//! Core is generic over the backend and names none. Where a backend can do
//! a step better than the composition of Burn's generic ops (one fused pass
//! on its own threads instead of a dozen element-wise kernels), the
//! backends crate registers a kernel for that backend type when it selects
//! a device, and core looks it up where the step runs. A kernel is a trait
//! object for one backend type, such as `dyn AdamWKernel<Flex>`
//! ([`crate::train::optim::AdamWKernel`]) or `dyn GeluKernel<B>`
//! ([`crate::nn::GeluKernel`]); each such type has at most one
//! implementation. A backend without one runs the generic composition, so
//! every kernel must compute what that composition computes.

use std::any::Any;
use std::sync::{Arc, PoisonError, RwLock};

/// The registered kernels, each an `Arc<K>` behind `Any`. A read-write
/// lock: lookups run in every forward pass, on every replica thread, and
/// must not queue behind each other (registration happens once, at
/// device selection).
static REGISTRY: RwLock<Vec<Box<dyn Any + Send + Sync>>> = RwLock::new(Vec::new());

/// Makes `kernel` the implementation of `K` in this process from now on,
/// replacing an earlier one.
pub fn register<K: ?Sized + Send + Sync + 'static>(kernel: Arc<K>) {
    let mut registry = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
    registry.retain(|k| !k.is::<Arc<K>>());
    registry.push(Box::new(kernel));
}

/// The registered implementation of `K`, if any.
pub fn lookup<K: ?Sized + Send + Sync + 'static>() -> Option<Arc<K>> {
    let registry = REGISTRY.read().unwrap_or_else(PoisonError::into_inner);
    registry
        .iter()
        .find_map(|k| k.downcast_ref::<Arc<K>>())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Answer: Send + Sync {
        fn answer(&self) -> u32;
    }
    struct Fixed(u32);
    impl Answer for Fixed {
        fn answer(&self) -> u32 {
            self.0
        }
    }
    trait Other: Send + Sync {}

    /// A registration is found under its own trait object type only, and a
    /// later one replaces it.
    #[test]
    fn lookup_finds_the_latest_registration_of_its_type() {
        assert!(lookup::<dyn Answer>().is_none());
        register::<dyn Answer>(Arc::new(Fixed(1)));
        register::<dyn Answer>(Arc::new(Fixed(42)));
        assert_eq!(lookup::<dyn Answer>().map(|k| k.answer()), Some(42));
        assert!(lookup::<dyn Other>().is_none());
    }
}
