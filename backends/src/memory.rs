//! Peak memory of a job, as far as each backend can tell, for `clipa bench`.

use crate::{BackendKind, DeviceInfo};

/// Reads a backend's memory high-water mark.
#[derive(Debug, Clone)]
pub struct PeakMemory {
    kind: BackendKind,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    index: usize,
}

impl PeakMemory {
    /// For the device `info` names.
    pub fn new(info: &DeviceInfo) -> Self {
        Self {
            kind: info.kind,
            index: info.index,
        }
    }

    /// Starts a new window. On the CPU this resets the process's peak
    /// resident set (Linux `/proc/self/clear_refs`, value 5); elsewhere it
    /// does nothing.
    pub fn reset(&mut self) {
        if self.kind == BackendKind::Cpu {
            // Best effort: without it the peak covers the whole process.
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
    }

    /// Bytes: on the CPU, the peak resident set since [`Self::reset`]
    /// (`VmHWM`); on CUDA, the device memory in use now (total − free),
    /// which holds Burn's memory pool and so its high-water mark, plus the
    /// CUDA context; on WGPU, `None` (wgpu does not report it).
    pub fn peak(&mut self) -> Option<u64> {
        match self.kind {
            BackendKind::Cpu => proc_kb("/proc/self/status", "VmHWM:"),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => crate::cuda::memory_in_use(self.index),
            _ => None,
        }
    }
}

/// Bytes free for a job on the device `info` names: on the CPU, the
/// system's available memory (`MemAvailable`, Linux); on CUDA, the
/// device's free memory; on WGPU, `None` (wgpu does not report it).
pub fn free_memory(info: &DeviceInfo) -> Option<u64> {
    match info.kind {
        BackendKind::Cpu => proc_kb("/proc/meminfo", "MemAvailable:"),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => crate::cuda::memory_free(info.index),
        _ => None,
    }
}

/// Bytes from the `KEY  N kB` line of a Linux `/proc` file.
fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
