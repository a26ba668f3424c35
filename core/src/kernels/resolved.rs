//! A module's kernels, resolved once when the module is built: the field
//! that lets `nn/` run the seam's ops without looking anything up per call.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};

use burn::module::{
    AutodiffModule, Content, Devices, EmptyRecord, Module, ModuleDisplay, ModuleDisplayDefault,
    ModuleMapper, ModuleVisitor,
};
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::{
    AttentionKernel, EmbeddingKernel, GeluKernel, Kernels, LayerNormKernel, LinearKernel, QkvKernel,
};

/// A bundle behind `Any`: the other side's kernels, whose backend type
/// `Resolved<B>` cannot name.
type Erased = Option<Arc<dyn Any + Send + Sync>>;

/// The kernels installed for `B` when the module holding this was built
/// ([`Resolved::installed`]), or none (every op composed). A module field
/// (`#[module(skip)]`: no parameters, nothing saved), so it travels with
/// the module through `fork`, `to_device` and loading a record. The ops of
/// the seam take it as their first argument.
///
/// `valid()` moves a module to the inner backend and `from_inner` back
/// (the trainer does both every step, to renew the autodiff leaves): the
/// other side's bundle is looked up the first time and then shared by
/// every clone, so neither looks anything up again.
pub struct Resolved<B: Backend> {
    kernels: Option<Arc<Kernels<B>>>,
    /// The bundle of the backend on the other side of `valid()` /
    /// `from_inner`, once known.
    across: Arc<OnceLock<Erased>>,
}

impl<B: Backend> Resolved<B> {
    /// The bundle installed for `B` now (one lookup), or none.
    pub fn installed() -> Self {
        Self::new(Kernels::<B>::installed(), Arc::default())
    }

    /// No kernels: every op composed from Burn's generic ops.
    pub fn composed() -> Self {
        Self::new(None, Arc::new(OnceLock::from(None)))
    }

    fn new(kernels: Option<Arc<Kernels<B>>>, across: Arc<OnceLock<Erased>>) -> Self {
        Self { kernels, across }
    }

    /// This side's bundle behind `Any`, for the other side's `across`.
    fn erased(&self) -> Arc<OnceLock<Erased>> {
        let this = self
            .kernels
            .clone()
            .map(|k| k as Arc<dyn Any + Send + Sync>);
        Arc::new(OnceLock::from(this))
    }

    /// The other side's bundle, of type `Kernels<O>`: looked up the first
    /// time only.
    fn across<O: Backend>(&self) -> Option<Arc<Kernels<O>>> {
        self.across
            .get_or_init(|| Kernels::<O>::installed().map(|k| k as Arc<dyn Any + Send + Sync>))
            .clone()
            .and_then(|k| k.downcast::<Kernels<O>>().ok())
    }

    /// The names of the ops this resolves to a kernel ([`Kernels::names`]).
    pub fn names(&self) -> Vec<&'static str> {
        self.kernels.as_ref().map(|k| k.names()).unwrap_or_default()
    }

    /// The linear kernel, if any.
    pub fn linear(&self) -> Option<&dyn LinearKernel<B>> {
        self.kernels.as_deref()?.linear.as_deref()
    }

    /// The LayerNorm kernel, if any.
    pub fn layer_norm(&self) -> Option<&dyn LayerNormKernel<B>> {
        self.kernels.as_deref()?.layer_norm.as_deref()
    }

    /// The GELU kernel, if any.
    pub fn gelu(&self) -> Option<&dyn GeluKernel<B>> {
        self.kernels.as_deref()?.gelu.as_deref()
    }

    /// The attention kernel, if any.
    pub fn attention(&self) -> Option<&dyn AttentionKernel<B>> {
        self.kernels.as_deref()?.attention.as_deref()
    }

    /// The packed q/k/v projection kernel, if any.
    pub fn qkv(&self) -> Option<&dyn QkvKernel<B>> {
        self.kernels.as_deref()?.qkv.as_deref()
    }

    /// The embedding kernel, if any.
    pub fn embedding(&self) -> Option<&dyn EmbeddingKernel<B>> {
        self.kernels.as_deref()?.embedding.as_deref()
    }
}

impl<B: Backend> Clone for Resolved<B> {
    fn clone(&self) -> Self {
        Self::new(self.kernels.clone(), Arc::clone(&self.across))
    }
}

impl<B: Backend> fmt::Debug for Resolved<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Resolved({:?})", self.names())
    }
}

impl<B: Backend> Module<B> for Resolved<B> {
    type Record = EmptyRecord;

    fn visit<V: ModuleVisitor<B>>(&self, _visitor: &mut V) {}

    fn map<M: ModuleMapper<B>>(self, _mapper: &mut M) -> Self {
        self
    }

    fn load_record(self, _record: Self::Record) -> Self {
        self
    }

    fn into_record(self) -> Self::Record {
        EmptyRecord::new()
    }

    fn to_device(self, _device: &B::Device) -> Self {
        self
    }

    fn fork(self, _device: &B::Device) -> Self {
        self
    }

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        devices
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for Resolved<B> {
    type InnerModule = Resolved<B::InnerBackend>;

    /// The inner backend's own kernels (inference kernels where the backend
    /// installs them), looked up at the first `valid()` only.
    fn valid(&self) -> Self::InnerModule {
        Resolved::new(self.across::<B::InnerBackend>(), self.erased())
    }

    /// `B`'s kernels: those the module had before `valid()`, or looked up
    /// once for a module that started on the inner backend.
    fn from_inner(module: Self::InnerModule) -> Self {
        Self::new(module.across::<B>(), module.erased())
    }
}

impl<B: Backend> ModuleDisplayDefault for Resolved<B> {
    fn content(&self, content: Content) -> Option<Content> {
        content.add_formatted(&format!("{self:?}")).optional()
    }
}

impl<B: Backend> ModuleDisplay for Resolved<B> {}
