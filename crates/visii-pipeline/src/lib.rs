//! visii-pipeline: what visii computes, generic over the burn device: the seeded noise, the
//! schedulers, and (in progress) the sampler ("apply"), the inverter ("learn") and instruction files.

pub mod apply;
pub mod caption;
pub mod error;
pub mod identity;
pub mod image;
pub mod instruction;
pub mod learn;
pub mod repro;
pub mod rng;
pub mod scheduler;

pub use apply::{hybrid, ApplyOptions, Ip2p, Noise};
pub use error::{PipelineError, Result};
pub use identity::ModelIdentity;
pub use image::RgbImage;
pub use rng::NoiseRng;
pub use scheduler::{EulerAncestral, SchedulerConfig};
