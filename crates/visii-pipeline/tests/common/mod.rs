//! Helpers shared by the pipeline's integration tests (each test file uses some of them).
#![allow(dead_code)]

use std::path::PathBuf;

use visii_pipeline::RgbImage;

/// The committed test models, images and goldens (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fixture image by file name.
pub fn image(name: &str) -> RgbImage {
    RgbImage::decode(&std::fs::read(fixtures().join("images").join(name)).unwrap()).unwrap()
}

/// Peak signal-to-noise ratio of two images with values in [0, 1], in dB.
pub fn psnr(a: &[f32], b: &[f32]) -> f32 {
    let mse = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64;
    (10.0 * (1.0 / mse.max(1e-20)).log10()) as f32
}
