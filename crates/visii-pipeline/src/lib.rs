//! visii-pipeline: what visii computes, generic over the burn device: the seeded noise, the
//! schedulers, and (in progress) the sampler ("apply"), the inverter ("learn") and instruction files.

pub mod apply;
pub mod caption;
pub mod error;
pub mod identity;
pub mod image;
pub mod instruction;
pub mod learn;
pub mod preview;
pub mod probe;
pub mod repro;
pub mod rng;
pub mod scheduler;
pub mod words;

pub use apply::{hybrid, ApplyOptions, Ip2p, Noise};
pub use error::{PipelineError, Result};

/// Hand the device allocator's free pages back after a browser engine has loaded a model and
/// after every learning or sampling step (see [`visii_models::memory`]); nothing natively.
pub fn release_free_memory(device: &burn::tensor::Device) {
    visii_models::memory::release(device);
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
