//! The CUDA backend. The driver library is loaded at run time (cudarc's
//! dynamic loading), so a build with `--features cuda` runs on machines
//! without CUDA and reports that no GPU is usable.

use burn::backend::cuda::CudaDevice;
use cudarc::driver::CudaContext;

use crate::{BackendError, BackendKind, DeviceInfo};

/// The concrete CUDA backend with autodiff.
pub type Backend = burn::backend::Autodiff<burn::backend::Cuda>;

fn no_device(reason: String) -> BackendError {
    BackendError::NoDevice {
        kind: BackendKind::Cuda,
        reason,
    }
}

/// Whether libcuda can be loaded on this machine.
#[allow(unsafe_code)]
fn driver_present() -> bool {
    // SAFETY: loading the driver library has no preconditions; cudarc marks
    // it unsafe only because dlopen runs the library's initialisers.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// How many GPUs the driver sees (`--devices all`).
pub fn count() -> Result<usize, BackendError> {
    if !driver_present() {
        return Err(no_device(
            "the NVIDIA driver library (libcuda.so) was not found; install the NVIDIA driver"
                .into(),
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| no_device(format!("the CUDA driver reports an error: {e}")))?;
    Ok(count.max(0) as usize)
}

/// Picks CUDA device `index` (0 when `None`).
pub fn select(index: Option<usize>) -> Result<(CudaDevice, DeviceInfo), BackendError> {
    let count = count()?;
    let index = index.unwrap_or(0);
    if count == 0 {
        return Err(no_device("the CUDA driver sees no GPU".into()));
    }
    if index >= count {
        return Err(no_device(format!(
            "device {index} asked for, but only {count} GPU(s) found"
        )));
    }
    let name = CudaContext::new(index)
        .and_then(|ctx| ctx.name())
        .map_err(|e| no_device(format!("cannot open GPU {index}: {e}")))?;
    Ok((
        CudaDevice::new(index),
        DeviceInfo {
            kind: BackendKind::Cuda,
            index,
            name,
        },
    ))
}

/// Device memory free on GPU `index`, in bytes.
pub fn memory_free(index: usize) -> Option<u64> {
    let ctx = CudaContext::new(index).ok()?;
    let (free, _) = ctx.mem_get_info().ok()?;
    Some(free as u64)
}

/// Device memory in use on GPU `index` (total − free), in bytes.
pub fn memory_in_use(index: usize) -> Option<u64> {
    let ctx = CudaContext::new(index).ok()?;
    let (free, total) = ctx.mem_get_info().ok()?;
    Some((total - free) as u64)
}
