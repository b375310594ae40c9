//! Images in and out: decode (PNG / JPEG), safe resizing to a multiple of 8 (PIL-exact Lanczos),
//! conversion to and from the VAE's [-1, 1] tensors, PNG encoding.

use burn::tensor::{Device, Tensor, TensorData};
use visii_models::preprocess::{decode_rgb, pil_resize, Filter};

use crate::error::{PipelineError, Result};

/// An 8-bit RGB image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Decode PNG or JPEG bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (data, width, height) = decode_rgb(bytes)?;
        Ok(Self { width, height, data })
    }

    /// The size an edit runs at: at most `max_side` on the longer side (aspect kept), each side
    /// rounded down to a multiple of 8, at least 8.
    pub fn working_size(&self, max_side: usize) -> (usize, usize) {
        let scale = (max_side as f64 / self.width.max(self.height) as f64).min(1.0);
        let r8 = |v: f64| ((v as usize) / 8 * 8).max(8);
        (r8(self.width as f64 * scale), r8(self.height as f64 * scale))
    }

    /// Resize with PIL's Lanczos filter (no-op when the size already matches).
    pub fn resized(&self, width: usize, height: usize) -> Self {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        Self { width, height, data: pil_resize(&self.data, self.width, self.height, width, height, Filter::Lanczos3) }
    }

    /// Images side by side, each fitted (aspect kept, Lanczos) into a `side` x `side` box, on white,
    /// 4 px apart: the small preview of a before/after pair stored in instruction files.
    pub fn strip(images: &[&RgbImage], side: usize) -> RgbImage {
        let gap = 4;
        let fitted: Vec<RgbImage> = images
            .iter()
            .map(|im| {
                let scale = side as f64 / im.width.max(im.height) as f64;
                let (w, h) =
                    (((im.width as f64 * scale).round() as usize).clamp(1, side), ((im.height as f64 * scale).round() as usize).clamp(1, side));
                im.resized(w, h)
            })
            .collect();
        let width = fitted.len() * side + fitted.len().saturating_sub(1) * gap;
        let mut data = vec![255u8; width.max(1) * side * 3];
        for (k, im) in fitted.iter().enumerate() {
            let (x0, y0) = (k * (side + gap) + (side - im.width) / 2, (side - im.height) / 2);
            for y in 0..im.height {
                let src = &im.data[y * im.width * 3..(y + 1) * im.width * 3];
                let at = ((y0 + y) * width + x0) * 3;
                data[at..at + src.len()].copy_from_slice(src);
            }
        }
        RgbImage { width: width.max(1), height: side, data }
    }

    /// [1, 3, H, W] in [-1, 1] (diffusers' `VaeImageProcessor` normalisation).
    pub fn to_tensor(&self, device: &Device) -> Tensor<4> {
        let (w, h) = (self.width, self.height);
        let mut v = vec![0f32; 3 * w * h];
        for c in 0..3 {
            for i in 0..w * h {
                v[c * w * h + i] = self.data[i * 3 + c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        Tensor::from_data(TensorData::new(v, [1, 3, h, w]), device)
    }

    /// From channel-major floats in [0, 1] ([3, H, W]), rounded as diffusers' `numpy_to_pil` does.
    pub fn from_unit_floats(v: &[f32], width: usize, height: usize) -> Self {
        let mut data = vec![0u8; 3 * width * height];
        for c in 0..3 {
            for i in 0..width * height {
                data[i * 3 + c] = (v[c * width * height + i].clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        Self { width, height, data }
    }

    /// Channel-major floats in [0, 1] ([3, H, W]).
    pub fn to_unit_floats(&self) -> Vec<f32> {
        let n = self.width * self.height;
        let mut v = vec![0f32; 3 * n];
        for c in 0..3 {
            for i in 0..n {
                v[c * n + i] = self.data[i * 3 + c] as f32 / 255.0;
            }
        }
        v
    }

    /// PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::write_buffer_with_format(&mut out, &self.data, self.width as u32, self.height as u32, image::ColorType::Rgb8, image::ImageFormat::Png)
            .map_err(|e| PipelineError::Config(format!("PNG encoding failed: {e}")))?;
        Ok(out.into_inner())
    }
}

/// VAE output [1, 3, H, W] (about [-1, 1]) -> floats in [0, 1], channel-major.
pub fn vae_output_to_unit(x: Tensor<4>) -> Tensor<4> {
    x.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0)
}
