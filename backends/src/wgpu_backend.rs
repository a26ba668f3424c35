//! The WGPU backend. Adapters are enumerated with `wgpu` itself (the same
//! graphics API Burn uses: Vulkan, or Metal on macOS) so that a machine
//! without one gets an error naming what is missing instead of a panic deep
//! in the runtime.

use burn::backend::wgpu::WgpuDevice;

use crate::{BackendError, BackendKind, DeviceInfo};

/// The concrete WGPU backend with autodiff.
pub type Backend = burn::backend::Autodiff<burn::backend::Wgpu>;

#[cfg(target_os = "macos")]
const API: wgpu::Backends = wgpu::Backends::METAL;
#[cfg(not(target_os = "macos"))]
const API: wgpu::Backends = wgpu::Backends::VULKAN;

/// One adapter as clipa lists it.
struct Adapter {
    name: String,
    device_type: wgpu::DeviceType,
    driver: String,
}

fn adapters() -> Vec<Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: API,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    futures_lite::future::block_on(instance.enumerate_adapters(API))
        .into_iter()
        .map(|a| {
            let info = a.get_info();
            Adapter {
                name: info.name,
                device_type: info.device_type,
                driver: info.driver,
            }
        })
        // cubecl sets adapters of type `Other` aside; so do we.
        .filter(|a| a.device_type != wgpu::DeviceType::Other)
        .collect()
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// Picks adapter `index` in enumeration order, or the most capable one
/// (discrete, integrated, virtual, then software) when `None`.
/// How many adapters there are (`--devices all`).
pub fn count() -> usize {
    adapters().len()
}

pub fn select(index: Option<usize>) -> Result<(WgpuDevice, DeviceInfo), BackendError> {
    let all = adapters();
    if all.is_empty() {
        return Err(BackendError::NoDevice {
            kind: BackendKind::Wgpu,
            reason: format!(
                "no {API:?} adapter found; install a GPU driver, or Mesa's software driver \
                 (`apt-get install mesa-vulkan-drivers`)"
            ),
        });
    }
    let index = match index {
        Some(i) if i < all.len() => i,
        Some(i) => {
            return Err(BackendError::NoDevice {
                kind: BackendKind::Wgpu,
                reason: format!(
                    "device {i} asked for, but only {} adapter(s) found",
                    all.len()
                ),
            });
        }
        None => (0..all.len())
            .min_by_key(|&i| rank(all[i].device_type))
            .expect("the list is not empty"),
    };
    let chosen = &all[index];
    // cubecl numbers adapters within their type, in the same enumeration order.
    let nth_of_type = all[..index]
        .iter()
        .filter(|a| a.device_type == chosen.device_type)
        .count();
    let device = match chosen.device_type {
        wgpu::DeviceType::DiscreteGpu => WgpuDevice::DiscreteGpu(nth_of_type),
        wgpu::DeviceType::IntegratedGpu => WgpuDevice::IntegratedGpu(nth_of_type),
        wgpu::DeviceType::VirtualGpu => WgpuDevice::VirtualGpu(nth_of_type),
        wgpu::DeviceType::Cpu if nth_of_type == 0 => WgpuDevice::Cpu,
        _ => {
            return Err(BackendError::NoDevice {
                kind: BackendKind::Wgpu,
                reason: format!(
                    "adapter {index} ({}) cannot be addressed by Burn",
                    chosen.name
                ),
            });
        }
    };
    let info = DeviceInfo {
        kind: BackendKind::Wgpu,
        index,
        name: format!(
            "{} [{:?}, {}]",
            chosen.name, chosen.device_type, chosen.driver
        ),
    };
    Ok((device, info))
}
