//! Maps clipa's `--backend cpu|wgpu|cuda [--device N]` to a concrete Burn
//! backend at run time.
//!
//! `clipa-core` is generic over `B: AutodiffBackend`; this crate is the only
//! place (with the CLI) that names concrete backends. A command is written
//! once as a [`BackendJob`] and [`run`] monomorphises it for the backend the
//! user picked. A backend that was not compiled in, or has no usable device,
//! is an error: nothing ever falls back silently to another backend.

use std::fmt;
use std::sync::Arc;

use burn::tensor::backend::AutodiffBackend;
use clipa_core::dist::LocalSum;

#[cfg(feature = "cpu")]
mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod launches;
mod memory;
#[cfg(feature = "cuda-nccl")]
mod nccl;
#[cfg(feature = "wgpu")]
mod wgpu_backend;

#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub use launches::LaunchLog;

pub use memory::{PeakMemory, free_memory};

/// The compute backends clipa knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum BackendKind {
    /// Pure-Rust CPU backend, always the embedded default.
    Cpu,
    /// WGPU (Vulkan/Metal/DX12): laptop GPUs, CI on a software adapter.
    Wgpu,
    /// NVIDIA CUDA: the training fast path.
    Cuda,
}

impl BackendKind {
    /// All kinds, in the order `clipa backends` lists them.
    pub const ALL: [BackendKind; 3] = [Self::Cpu, Self::Wgpu, Self::Cuda];

    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend's cargo feature.
    pub fn is_compiled(self) -> bool {
        match self {
            Self::Cpu => cfg!(feature = "cpu"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A device the user selected, resolved and known to exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The backend it belongs to.
    pub kind: BackendKind,
    /// Index among that backend's devices (`--device N`).
    pub index: usize,
    /// A human-readable name: adapter or GPU name.
    pub name: String,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.kind, self.index, self.name)
    }
}

/// Why a backend cannot run.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend's cargo feature was not enabled in this build.
    #[error(
        "backend '{0}' is not compiled into this clipa; rebuild with `cargo build --release -p clipa-cli --features {0}`"
    )]
    NotCompiled(BackendKind),
    /// The backend is compiled in but no usable device was found.
    #[error("backend '{kind}' has no usable device: {reason}")]
    NoDevice {
        /// The backend asked for.
        kind: BackendKind,
        /// What is missing and how to get it.
        reason: String,
    },
    /// The job itself failed.
    #[error(transparent)]
    Core(#[from] clipa_core::Error),
}

/// The devices a job runs on, with their descriptions: one for [`run`] and
/// [`run_here`], the `--devices` set for [`run_on`] (never empty).
pub struct Devices<B: AutodiffBackend> {
    devices: Vec<B::Device>,
    info: Vec<DeviceInfo>,
    /// The backend's own all-reduce among these devices, where it has one
    /// that replaces burn-collective's (NCCL in a `cuda-nccl` build).
    local_sum: Option<Arc<dyn LocalSum<B::InnerBackend>>>,
}

impl<B: AutodiffBackend> Devices<B> {
    fn single(device: B::Device, info: DeviceInfo) -> Self {
        Self::new(vec![device], vec![info])
    }

    fn new(devices: Vec<B::Device>, info: Vec<DeviceInfo>) -> Self {
        Self {
            devices,
            info,
            local_sum: None,
        }
    }

    /// These devices, their replicas summed by `local_sum` where it is
    /// `Some` rather than by burn-collective.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn with_local_sum(self, local_sum: Option<Arc<dyn LocalSum<B::InnerBackend>>>) -> Self {
        Self { local_sum, ..self }
    }

    /// The backend's own all-reduce among [`Devices::devices`], for
    /// `clipa_core::dist::Layout::local_sum`; `None` where burn-collective's
    /// serves.
    pub fn local_sum(&self) -> Option<Arc<dyn LocalSum<B::InnerBackend>>> {
        self.local_sum.clone()
    }

    /// The first device and its description: a one-device job's device.
    pub fn one(&self) -> (B::Device, &DeviceInfo) {
        (self.devices[0].clone(), &self.info[0])
    }

    /// Every device, one replica each in data-parallel training.
    pub fn devices(&self) -> &[B::Device] {
        &self.devices
    }

    /// Each device's description, in the order of [`Devices::devices`].
    pub fn info(&self) -> &[DeviceInfo] {
        &self.info
    }
}

/// A computation that can run on any autodiff backend, on one device or
/// several. The CLI writes each command as one of these; [`run`] (one
/// device) and [`run_on`] (a `--devices` set) pick the concrete type.
pub trait BackendJob {
    /// What the job returns.
    type Output;

    /// Runs the job on backend `B`.
    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<Self::Output>;
}

/// Finds the device `index` (or the best one when `None`) of `kind`,
/// without running anything on it.
pub fn probe(kind: BackendKind, index: Option<usize>) -> Result<DeviceInfo, BackendError> {
    match kind {
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => cpu::select(index).map(|(_, info)| info),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => wgpu_backend::select(index).map(|(_, info)| info),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => cuda::select(index).map(|(_, info)| info),
        #[allow(unreachable_patterns)]
        other => Err(BackendError::NotCompiled(other)),
    }
}

/// The threads the CPU backend computes on: rayon's pool, one per core
/// unless `RAYON_NUM_THREADS` says otherwise.
pub fn cpu_threads() -> usize {
    #[cfg(feature = "cpu")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "cpu"))]
    {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Runs `job` on device `index` (or the best one) of backend `kind`. On the
/// CPU backend it runs on one of rayon's worker threads
/// (`cpu::on_worker`), hence `Send`.
pub fn run<J: BackendJob + Send>(
    kind: BackendKind,
    index: Option<usize>,
    job: J,
) -> Result<J::Output, BackendError>
where
    J::Output: Send,
{
    #[cfg(feature = "cpu")]
    if matches!(kind, BackendKind::Cpu) {
        let (device, info) = cpu::select(index)?;
        let _kernels = install_kernels(kind);
        return Ok(cpu::on_worker(|| {
            job.run::<cpu::Backend>(Devices::single(device, info))
        })?);
    }
    run_here(kind, index, job)
}

/// [`run`] on the calling thread, for a job that cannot move to another
/// (criterion's harness holds thread-bound state). On the CPU backend each
/// parallel op then hands off to rayon's workers and back
/// (`cpu::on_worker` says what that costs).
pub fn run_here<J: BackendJob>(
    kind: BackendKind,
    index: Option<usize>,
    job: J,
) -> Result<J::Output, BackendError> {
    let _kernels = install_kernels(kind);
    match kind {
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => {
            let (device, info) = cpu::select(index)?;
            Ok(job.run::<cpu::Backend>(Devices::single(device, info))?)
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            let (device, info) = wgpu_backend::select(index)?;
            Ok(job.run::<wgpu_backend::Backend>(Devices::single(device, info))?)
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            let (device, info) = cuda::select(index)?;
            Ok(job.run::<cuda::Backend>(Devices::single(device, info))?)
        }
        #[allow(unreachable_patterns)]
        other => {
            drop(job);
            Err(BackendError::NotCompiled(other))
        }
    }
}

/// The devices of a data-parallel run (`--devices 0,1,2,3` or `all`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSet {
    /// Every device the backend has.
    All,
    /// These device indices, in this order (replica `r` on the `r`-th).
    List(Vec<usize>),
}

impl std::str::FromStr for DeviceSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            return Ok(Self::All);
        }
        let mut list = Vec::new();
        for part in s.split(',') {
            let i: usize = part.trim().parse().map_err(|_| {
                format!("'{part}' is not a device index (expected e.g. 0,1,2,3 or all)")
            })?;
            if list.contains(&i) {
                return Err(format!("device {i} is listed twice"));
            }
            list.push(i);
        }
        Ok(Self::List(list))
    }
}

/// How many devices backend `kind` has.
pub fn device_count(kind: BackendKind) -> Result<usize, BackendError> {
    match kind {
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => Ok(1),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => Ok(wgpu_backend::count()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => cuda::count(),
        #[allow(unreachable_patterns)]
        other => Err(BackendError::NotCompiled(other)),
    }
}

fn resolve<D>(
    kind: BackendKind,
    set: &DeviceSet,
    select: impl Fn(Option<usize>) -> Result<(D, DeviceInfo), BackendError>,
) -> Result<(Vec<D>, Vec<DeviceInfo>), BackendError> {
    let indices = match set {
        DeviceSet::All => (0..device_count(kind)?).collect(),
        DeviceSet::List(list) => list.clone(),
    };
    if indices.is_empty() {
        return Err(BackendError::NoDevice {
            kind,
            reason: "no device found for --devices all".into(),
        });
    }
    let mut devices = Vec::with_capacity(indices.len());
    let mut infos = Vec::with_capacity(indices.len());
    for i in indices {
        let (d, info) = select(Some(i))?;
        devices.push(d);
        infos.push(info);
    }
    Ok((devices, infos))
}

/// Runs `job` on the devices `set` of backend `kind`; every device must
/// exist (none is skipped silently).
pub fn run_on<J: BackendJob>(
    kind: BackendKind,
    set: &DeviceSet,
    job: J,
) -> Result<J::Output, BackendError> {
    let _kernels = install_kernels(kind);
    match kind {
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => {
            let (devices, infos) = resolve(kind, set, |i| cpu::replica(i.unwrap_or(0)))?;
            Ok(job.run::<cpu::Backend>(Devices::new(devices, infos))?)
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            let (devices, infos) = resolve(kind, set, wgpu_backend::select)?;
            Ok(job.run::<wgpu_backend::Backend>(Devices::new(devices, infos))?)
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            let (devices, infos) = resolve(kind, set, cuda::select)?;
            // The replicas of a multi-GPU run sum on NCCL (nccl.rs).
            #[cfg(feature = "cuda-nccl")]
            let local_sum = nccl::NcclSum::for_devices(&devices);
            #[cfg(not(feature = "cuda-nccl"))]
            let local_sum = None;
            Ok(job.run::<cuda::Backend>(Devices::new(devices, infos).with_local_sum(local_sum))?)
        }
        #[allow(unreachable_patterns)]
        other => {
            drop(job);
            Err(BackendError::NotCompiled(other))
        }
    }
}

/// Installs `kind`'s kernels in core's kernel seam
/// ([`clipa_core::kernels`]) until the returned guard drops: the CPU's
/// fused kernels; for WGPU and CUDA, our CubeCL AdamW and sum of squares
/// ([`cube`]), the other
/// ops composed (their fusion compiles them). [`run`], [`run_here`] and
/// [`run_on`] call it for the chosen backend; benches and tests that drive
/// a backend type directly call it themselves.
pub fn install_kernels(kind: BackendKind) -> clipa_core::kernels::Installed {
    match kind {
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => cpu::install_kernels(),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => cube_kernels::<burn::backend::Wgpu>(),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => cube_kernels::<burn::backend::Cuda>(),
        #[allow(unreachable_patterns)]
        _ => clipa_core::kernels::Installed::default(),
    }
}

/// The CubeCL kernels: AdamW and the gradients' sum of squares on the
/// inner backend `B` (the optimiser's), attention and LayerNorm on the
/// autodiff backend that trains (at inference Burn's own flash attention
/// and fused LayerNorm run them already).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn cube_kernels<B>() -> clipa_core::kernels::Installed
where
    B: burn::tensor::backend::Backend,
    cube::CubeAdamW: clipa_core::kernels::AdamWKernel<B>,
    cube::CubeSumSquares: clipa_core::kernels::SumSquaresKernel<B>,
    cube::CubeAttention: clipa_core::kernels::AttentionKernel<burn::backend::Autodiff<B>>,
    cube::CubeLayerNorm: clipa_core::kernels::LayerNormKernel<burn::backend::Autodiff<B>>,
    cube::CubeLinear: clipa_core::kernels::LinearKernel<burn::backend::Autodiff<B>>,
    cube::CubeQkv: clipa_core::kernels::QkvKernel<burn::backend::Autodiff<B>>,
{
    use clipa_core::kernels::{Kernels, install};
    use std::sync::Arc;
    install(Kernels::<B> {
        adamw: Some(Arc::new(cube::CubeAdamW)),
        sum_squares: Some(Arc::new(cube::CubeSumSquares)),
        ..Default::default()
    })
    .and(install(Kernels::<burn::backend::Autodiff<B>> {
        attention: Some(Arc::new(cube::CubeAttention)),
        layer_norm: Some(Arc::new(cube::CubeLayerNorm)),
        linear: Some(Arc::new(cube::CubeLinear)),
        qkv: Some(Arc::new(cube::CubeQkv)),
        ..Default::default()
    }))
}

/// The CPU backend type, for benches that compare backends directly.
#[cfg(feature = "cpu")]
pub type CpuBackend = cpu::Backend;

/// Burn's ndarray backend with autodiff, compiled only for the CPU backend
/// comparison bench (`--features ndarray`).
#[cfg(feature = "ndarray")]
pub type NdArrayBackend = burn::backend::Autodiff<burn::backend::NdArray>;

/// The WGPU backend type.
#[cfg(feature = "wgpu")]
pub type WgpuBackend = wgpu_backend::Backend;

/// Resolves the WGPU device, for benches and tests that drive the backend
/// directly.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(
    index: Option<usize>,
) -> Result<(burn::backend::wgpu::WgpuDevice, DeviceInfo), BackendError> {
    wgpu_backend::select(index)
}

/// The CUDA backend type.
#[cfg(feature = "cuda")]
pub type CudaBackend = cuda::Backend;

/// Resolves the CUDA device, for benches that drive the backend directly.
#[cfg(feature = "cuda")]
pub fn cuda_device(
    index: Option<usize>,
) -> Result<(burn::backend::cuda::CudaDevice, DeviceInfo), BackendError> {
    cuda::select(index)
}
