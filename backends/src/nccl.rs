//! The all-reduce among one process's GPUs on NCCL, in place of
//! burn-collective's local mode (`clipa_core::dist::LocalSum`).
//!
//! Burn's `distributed` feature gives the CUDA backend an all-reduce that
//! runs on NCCL (`DistributedBackend::all_reduce`, burn-backend 0.21.0
//! `backend/distributed/ops.rs`): cubecl-cuda opens one communicator per set
//! of devices, ranked by sorted device id, and runs the reduction on each
//! GPU's communication stream, so the sum never leaves the GPUs. That
//! communicator spans one process only: cubecl-cuda 0.10.0 makes the NCCL
//! unique id inside the process (`compute/communication.rs`) and has no way
//! to hand it to another. Across machines clipa therefore still joins its
//! processes with burn-collective's global mode: core sums locally on NCCL,
//! local replica 0 all-reduces that sum with the other machines, and a
//! second local sum (the other replicas contribute zeros) hands the result
//! to every replica of the process (`clipa_core::dist`).

// Said once here rather than as trait errors in every CPU arm of lib.rs.
#[cfg(any(feature = "cpu", feature = "ndarray"))]
compile_error!(
    "`cuda-nccl` leaves out the CPU backends (with Burn's `distributed` feature they have no \
     autodiff): build with `--no-default-features --features cuda-nccl`"
);

use std::sync::Arc;

use burn::tensor::backend::distributed::{DistributedBackend, ReduceOperation};
use burn::tensor::backend::{AutodiffBackend, DeviceId, DeviceOps};
use burn::tensor::ops::{Device, FloatTensor, FloatTensorOps};
use clipa_core::dist::LocalSum;

/// The backend NCCL reduces on: the CUDA backend without autodiff, the one
/// core makes its collective calls on.
type Inner = <crate::cuda::Backend as AutodiffBackend>::InnerBackend;

/// [`LocalSum`] over one process's CUDA devices on NCCL. Every replica
/// calls [`LocalSum::sum`] with its own device's tensor, in the same order;
/// the first call opens the communicator, which waits until every device of
/// the set has called.
pub(crate) struct NcclSum {
    /// The devices of the process, one replica each; the communicator's key.
    device_ids: Vec<DeviceId>,
}

impl NcclSum {
    /// The sum for a run on `devices` (a `--devices` set): `None` for one
    /// device, which has nothing to sum with.
    pub(crate) fn for_devices(devices: &[Device<Inner>]) -> Option<Arc<dyn LocalSum<Inner>>> {
        (devices.len() > 1).then(|| {
            Arc::new(Self {
                device_ids: devices.iter().map(DeviceOps::id).collect(),
            }) as Arc<dyn LocalSum<Inner>>
        })
    }
}

impl LocalSum<Inner> for NcclSum {
    fn sum(&self, tensor: FloatTensor<Inner>) -> Result<FloatTensor<Inner>, String> {
        // A device outside the set would fail inside CUDA's server thread
        // (no rank for it), where the caller could not see the error.
        let id = Inner::float_device(&tensor).id();
        if !self.device_ids.contains(&id) {
            return Err(format!(
                "NCCL sum: the tensor is on device {id:?}, not one of the run's devices {:?}",
                self.device_ids
            ));
        }
        // Queued on the device's communication stream; `resolve` drains
        // the fusion queue and makes the compute stream wait for NCCL, so
        // the host does not wait for the reduction itself.
        Ok(Inner::all_reduce(tensor, ReduceOperation::Sum, self.device_ids.clone()).resolve())
    }
}
