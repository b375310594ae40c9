//! The wasm-bindgen facade of visii: the only Rust that knows about JS. For now it reports its
//! version and proves burn's WebGPU backend runs in the page's worker (an async device init and a
//! small matmul read back asynchronously).

use burn::tensor::{Device, Tensor, TensorData};
use wasm_bindgen::prelude::*;

/// Install the panic hook so a Rust panic reaches JS as a readable error.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

/// The app version (the same as the CLI's).
#[wasm_bindgen]
pub fn version() -> String {
    visii_models::version().to_string()
}

/// Initialise burn's WebGPU device and run a 2x2 matmul on it; returns the product's four values
/// as JSON text (`[19, 22, 43, 50]` when the GPU path works).
#[wasm_bindgen]
pub async fn gpu_selftest() -> Result<String, JsError> {
    let device: Device = Device::wgpu_options().init_async().await.map_err(|e| JsError::new(&format!("WebGPU initialisation failed: {e}")))?;
    let a = Tensor::<2>::from_data(TensorData::new(vec![1f32, 2., 3., 4.], [2, 2]), &device);
    let b = Tensor::<2>::from_data(TensorData::new(vec![5f32, 6., 7., 8.], [2, 2]), &device);
    let data = a.matmul(b).into_data_async().await.map_err(|e| JsError::new(&format!("GPU readback failed: {e:?}")))?;
    let v: Vec<f32> = data.try_to_vec::<f32>().map_err(|e| JsError::new(&format!("{e:?}")))?;
    Ok(serde_json::to_string(&v)?)
}
