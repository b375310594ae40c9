//! visii-pipeline: what visii computes, generic over the burn device: the seeded noise, the
//! schedulers, and (in progress) the sampler ("apply"), the inverter ("learn") and instruction files.

pub mod apply;
pub mod caption;
pub mod error;
pub mod identity;
pub mod image;
pub mod instruction;
pub mod learn;
pub mod probe;
pub mod repro;
pub mod rng;
pub mod scheduler;

pub use apply::{hybrid, ApplyOptions, Ip2p, Noise};
pub use error::{PipelineError, Result};

/// Hand the device allocator's free pages back (after a browser engine has loaded a model, after a
/// learning or sampling step; pages still used by queued GPU work stay until the next call). Only
/// in the browser: there burn's allocator keeps one page per allocation in size buckets and reuses
/// a page only within its bucket, so what it holds grows with every new mix of sizes (measured:
/// 10.6 GB held for 1.7 GB in use after one full-size learning step in a tab). Natively its pages
/// are shared across sizes, and giving them back each step would only reallocate them.
pub fn release_free_memory(device: &burn::tensor::Device) {
    if cfg!(target_family = "wasm") {
        device.memory_cleanup();
    }
}

/// Run a future to completion on this thread (native callers of the async pipeline).
pub fn block_on<O>(f: impl std::future::Future<Output = O>) -> O {
    burn_std::future::block_on(f)
}

/// Read a tensor back as f32 values without blocking. A failed read means the device is gone
/// (cubecl marks a lost wgpu device and fails every read after it): [`PipelineError::Gpu`].
pub async fn read_f32<const D: usize>(t: burn::tensor::Tensor<D>) -> Result<Vec<f32>> {
    let d = t.into_data_async().await.map_err(|e| PipelineError::Gpu(format!("{e:?}")))?;
    d.try_to_vec::<f32>().map_err(|e| PipelineError::Gpu(format!("unexpected data from the device: {e:?}")))
}
pub use identity::ModelIdentity;
pub use image::RgbImage;
pub use rng::NoiseRng;
pub use scheduler::{EulerAncestral, SchedulerConfig};
