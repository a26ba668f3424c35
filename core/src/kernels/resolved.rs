//! A module's kernels, resolved once when the module is built: the field
//! that lets `nn/` run the seam's ops without looking anything up per call.

use std::fmt;
use std::sync::Arc;

use burn::module::{
    AutodiffModule, Content, Devices, EmptyRecord, Module, ModuleDisplay, ModuleDisplayDefault,
    ModuleMapper, ModuleVisitor,
};
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::{
    AttentionKernel, EmbeddingKernel, GeluKernel, Kernels, LayerNormKernel, LinearKernel,
};

/// The kernels installed for `B` when the module holding this was built
/// ([`Resolved::installed`]), or none (every op composed). A module field
/// (`#[module(skip)]`: no parameters, nothing saved), so it travels with
/// the module through `fork`, `to_device` and loading a record, and is
/// resolved again for the inner backend when `valid()` moves the module
/// there. The ops of the seam take it as their first argument.
pub struct Resolved<B: Backend>(Option<Arc<Kernels<B>>>);

impl<B: Backend> Resolved<B> {
    /// The bundle installed for `B` now (one lookup), or none.
    pub fn installed() -> Self {
        Self(Kernels::<B>::installed())
    }

    /// No kernels: every op composed from Burn's generic ops.
    pub fn composed() -> Self {
        Self(None)
    }

    /// The names of the ops this resolves to a kernel ([`Kernels::names`]).
    pub fn names(&self) -> Vec<&'static str> {
        self.0.as_ref().map(|k| k.names()).unwrap_or_default()
    }

    /// The linear kernel, if any.
    pub fn linear(&self) -> Option<&dyn LinearKernel<B>> {
        self.0.as_deref()?.linear.as_deref()
    }

    /// The LayerNorm kernel, if any.
    pub fn layer_norm(&self) -> Option<&dyn LayerNormKernel<B>> {
        self.0.as_deref()?.layer_norm.as_deref()
    }

    /// The GELU kernel, if any.
    pub fn gelu(&self) -> Option<&dyn GeluKernel<B>> {
        self.0.as_deref()?.gelu.as_deref()
    }

    /// The attention kernel, if any.
    pub fn attention(&self) -> Option<&dyn AttentionKernel<B>> {
        self.0.as_deref()?.attention.as_deref()
    }

    /// The embedding kernel, if any.
    pub fn embedding(&self) -> Option<&dyn EmbeddingKernel<B>> {
        self.0.as_deref()?.embedding.as_deref()
    }
}

impl<B: Backend> Clone for Resolved<B> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
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
    /// installs them): resolved here, once per `valid()`.
    fn valid(&self) -> Self::InnerModule {
        Resolved::installed()
    }

    fn from_inner(_module: Self::InnerModule) -> Self {
        Self::installed()
    }
}

impl<B: Backend> ModuleDisplayDefault for Resolved<B> {
    fn content(&self, content: Content) -> Option<Content> {
        content.add_formatted(&format!("{self:?}")).optional()
    }
}

impl<B: Backend> ModuleDisplay for Resolved<B> {}
