//! A burn wgpu device whose buffer limits are capped: how the app runs on WebGPU's default limits
//! (what the least capable adapter grants) and how the tests run on limits smaller than the
//! tensors a naive implementation creates.

use burn::tensor::wgpu::{wgpu, MemoryConfiguration, WgpuSetup};
use burn::tensor::Device;

/// WebGPU's default `maxStorageBufferBindingSize`, which every adapter grants.
pub const SPEC_STORAGE_BINDING: u64 = 128 << 20;
/// WebGPU's default `maxBufferSize`.
pub const SPEC_BUFFER: u64 = 256 << 20;

/// A device on the first (high-performance) adapter of `backends`, requested with storage bindings
/// of at most `binding` bytes and buffers of at most `buffer` bytes; the other limits (workgroups)
/// stay the adapter's, from which cubecl sizes its kernels. `exclusive_pages`: allocate as a
/// browser does (see [`browser_allocator_device`]).
pub async fn capped_device(backends: wgpu::Backends, binding: u64, buffer: u64, exclusive_pages: bool) -> Result<Device, String> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor { backends, ..wgpu::InstanceDescriptor::new_without_display_handle() });
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() })
        .await
        .map_err(|e| e.to_string())?;
    let mut limits = adapter.limits();
    limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(binding);
    limits.max_buffer_size = limits.max_buffer_size.min(buffer);
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            // As cubecl requests its own devices: every feature but mappable primary buffers
            // (experimental ones too, which need the opt-in below), and allocations sized for
            // memory use rather than speed.
            required_features: adapter.features() - wgpu::Features::MAPPABLE_PRIMARY_BUFFERS,
            required_limits: limits,
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            // SAFETY: as in cubecl-wgpu's own device request (experimental passthrough shaders).
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let backend = adapter.get_info().backend;
    let options = Device::wgpu_options();
    let options = if exclusive_pages { options.memory_config(MemoryConfiguration::ExclusivePages) } else { options };
    options.setup(WgpuSetup { instance, adapter, device, queue, backend }).init().map_err(|e| e.to_string())
}

/// The default wgpu device with the allocator burn uses in a browser: WebGPU cannot bind parts of
/// one buffer read-only and read-write at once, so on wasm cubecl gives every allocation a buffer
/// of its own from 24 size buckets (natively it carves allocations from shared pages). Natively,
/// for measuring what a tab would hold without a browser.
#[cfg(not(target_family = "wasm"))]
pub fn browser_allocator_device() -> Result<Device, String> {
    Device::wgpu_options().memory_config(MemoryConfiguration::ExclusivePages).init().map_err(|e| e.to_string())
}
