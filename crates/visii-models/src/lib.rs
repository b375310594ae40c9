//! visii-models: the four frozen networks of visii (InstructPix2Pix UNet and VAE, CLIP text and
//! vision encoders) in burn, mirroring diffusers / transformers, shapes read from each checkpoint's
//! own `config.json`, weights loaded by the checkpoints' tensor names.

pub mod attention;
pub mod chunked;
pub mod clip;
pub mod error;
#[cfg(feature = "frozen")]
mod frozen;
#[cfg(feature = "frozen")]
pub mod fused;
#[cfg(any(feature = "wgpu", feature = "webgpu"))]
pub mod gpu;
#[cfg(feature = "frozen")]
pub mod kernels;
pub mod loader;
pub mod memory;
pub mod nn;
pub mod pack;
pub mod presets;
pub mod resident;
pub mod resnet;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

// The readers of untrusted bytes live in visii-formats (no burn, fuzzed); re-exported where they were.
pub use visii_formats::text::printable;
pub use visii_formats::{preprocess, source, torch};

pub use clip::{ClipConfig, ClipTextConfig, ClipTextTransformer, ClipVision, ClipVisionConfig};
pub use error::{ModelError, Result};
pub use loader::{ClipFolder, Files, Ip2pFolder, Loaded};
pub use preprocess::ClipPreprocessConfig;
pub use source::{ByteSource, READ_STATS};
pub use tokenizer::ClipTokenizer;
pub use unet::{UNet2DConditionModel, UNetConfig};
pub use vae::{AutoencoderKL, VaeConfig};
pub use weights::{WeightFile, Weights};

/// The crate version (also what the wasm module reports).
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
