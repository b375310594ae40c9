//! Live previews: what a sampling or learning step predicts as the clean latent (x0), shown as
//! a small RGB image without running the VAE decoder. A linear map from the latent channels to RGB
//! (`rgb = W z + b`, one row per colour) is fitted to the loaded VAE once, when the model loads: a
//! few random latents are decoded, each decoded 8 x 8 block averaged, and the map found by least
//! squares. A preview is one value per latent pixel (64 x 64 for a 512 px edit), upscaled by the
//! page for display.
//!
//! The decoder normalises what its first convolution makes of a latent (GroupNorm), so it decodes
//! `s z` much as it decodes `z`: latents are brought to the spread the map was fitted at (their
//! root mean square) before the map is applied. Stable Diffusion's latents are near that spread
//! already; a random model's (the committed tiny one: values to +-50) are not, and a map applied
//! to them as they are would only show saturated colours.

use burn::tensor::{Tensor, TensorData};

use crate::apply::Ip2p;
use crate::error::{PipelineError, Result};
use crate::image::RgbImage;
use crate::rng::NoiseRng;

/// Latents read back for a preview: `channels` x `height` x `width`, row-major, scaled as the
/// sampler holds them (`scaling_factor * VAE latent`).
#[derive(Clone, Debug)]
pub struct Latents {
    pub values: Vec<f32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Latents {
    /// The first image of a [n, c, h, w] tensor, read back.
    pub async fn read(t: Tensor<4>) -> Result<Self> {
        let [_, channels, height, width] = t.dims();
        let values = crate::read_f32(t.slice([0..1, 0..channels, 0..height, 0..width])).await?;
        Ok(Self { values, channels, height, width })
    }
}

/// How a step's preview is asked for: every `every` steps (and always the last), handed to `sink`
/// with the step's index.
pub struct PreviewSink<'a> {
    pub every: usize,
    pub sink: &'a mut dyn FnMut(usize, &Latents),
}

impl PreviewSink<'_> {
    /// Whether step `i` of `steps` gets a preview.
    pub fn wants(&self, i: usize, steps: usize) -> bool {
        self.every > 0 && (i % self.every == 0 || i + 1 == steps)
    }
}

/// The linear latent -> RGB map of one VAE.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentPreview {
    /// 3 rows of `channels + 1` values (the weights, then the bias), mapping scaled latents to RGB
    /// in [0, 1].
    pub map: Vec<f32>,
    pub channels: usize,
    /// The fit's root-mean-square error on the latents it was fitted to, in [0, 1] units.
    pub fit_rmse: f32,
    /// The root mean square of the latents it was fitted to (latents are scaled to it).
    pub fit_rms: f32,
}

/// Latents decoded for the fit: this many, of this many latent pixels a side.
const FIT_LATENTS: usize = 2;
const FIT_SIDE: usize = 16;
/// Stream of our RNG the fit's latents come from (any fixed one: the fit is the same every load).
const FIT_STREAM: u64 = 9 << 32;

impl LatentPreview {
    /// Fit the map to `model`'s VAE (decodes `FIT_LATENTS` latents of `FIT_SIDE`^2).
    pub fn fit(model: &Ip2p) -> Result<Self> {
        crate::block_on(Self::fit_async(model))
    }

    /// [`fit`](Self::fit) without a blocking readback (the browser).
    pub async fn fit_async(model: &Ip2p) -> Result<Self> {
        let c = model.vae.latent_channels;
        let n = FIT_SIDE * FIT_SIDE;
        let mut xs: Vec<f64> = vec![];
        let mut ys: [Vec<f64>; 3] = [vec![], vec![], vec![]];
        let mut sum_sq = 0f64;
        for k in 0..2 * FIT_LATENTS {
            // Latents of two kinds: those of images of flat colour patches (what the encoder makes
            // of colours: the latents sampling ends near), and smooth random fields of unit
            // spread (a random field at half the resolution, upsampled; white noise decodes to
            // textures a per-pixel map cannot follow).
            let encoded = if k < FIT_LATENTS {
                let side = FIT_SIDE * 8;
                let mut rng = NoiseRng::new(0, FIT_STREAM + 100 + k as u64);
                let colours: Vec<f64> = (0..3 * 16).map(|_| rng.uniform()).collect();
                let mut data = vec![0u8; side * side * 3];
                for (i, px) in data.chunks_exact_mut(3).enumerate() {
                    let (y, x) = (i / side, i % side);
                    let cell = (y * 4 / side) * 4 + x * 4 / side;
                    for c in 0..3 {
                        px[c] = (colours[cell * 3 + c] * 255.0) as u8;
                    }
                }
                let img = RgbImage { width: side, height: side, data };
                let z = model.encode_image(&img).mul_scalar(model.vae.scaling_factor);
                // (A VAE that does not scale by 8 gets random fields only.)
                if z.dims() == [1, c, FIT_SIDE, FIT_SIDE] {
                    Some(crate::read_f32(z).await?)
                } else {
                    None
                }
            } else {
                None
            };
            let z: Vec<f32> = if let Some(z) = encoded {
                z
            } else {
                let coarse = NoiseRng::new(0, FIT_STREAM + k as u64).normal(c * n / 4);
                let half = FIT_SIDE / 2;
                (0..c * n)
                    .map(|i| {
                        let (ch, y, x) = (i / n, (i % n) / FIT_SIDE, i % FIT_SIDE);
                        coarse[ch * half * half + (y / 2) * half + x / 2]
                    })
                    .collect()
            };
            sum_sq += z.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            let t = Tensor::<4>::from_data(TensorData::new(z.clone(), [1, c, FIT_SIDE, FIT_SIDE]), &model.device);
            let decoded = model.decode_async(t).await?;
            // The decoder's upscaling (8 for Stable Diffusion's VAE; from the config's block count).
            let [_, rgb_c, side, side_w] = decoded.dims();
            let f = side / FIT_SIDE;
            if rgb_c != 3 || side != side_w || f == 0 || side % FIT_SIDE != 0 {
                return Err(PipelineError::Config(format!("the VAE decoded [{rgb_c}, {side}, {side_w}] for a {FIT_SIDE} x {FIT_SIDE} latent")));
            }
            let img = crate::read_f32(decoded).await?;
            for p in 0..n {
                let (py, px) = (p / FIT_SIDE, p % FIT_SIDE);
                for ch in 0..c {
                    xs.push(z[ch * n + p] as f64);
                }
                xs.push(1.0);
                for (rgb, y) in ys.iter_mut().enumerate() {
                    let mut acc = 0.0;
                    for dy in 0..f {
                        for dx in 0..f {
                            acc += img[rgb * side * side + (py * f + dy) * side + px * f + dx] as f64;
                        }
                    }
                    y.push(acc / (f * f) as f64);
                }
            }
        }
        let d = c + 1;
        let rows = xs.len() / d;
        // Normal equations (X^T X + ridge) w = X^T y, solved per colour.
        let mut xtx = vec![0f64; d * d];
        for r in 0..rows {
            let x = &xs[r * d..(r + 1) * d];
            for i in 0..d {
                for j in 0..d {
                    xtx[i * d + j] += x[i] * x[j];
                }
            }
        }
        for i in 0..d {
            xtx[i * d + i] += 1e-6 * rows as f64;
        }
        let mut map = vec![0f32; 3 * d];
        let mut sq = 0f64;
        for (rgb, y) in ys.iter().enumerate() {
            let mut xty = vec![0f64; d];
            for r in 0..rows {
                for i in 0..d {
                    xty[i] += xs[r * d + i] * y[r];
                }
            }
            let w = solve(xtx.clone(), xty, d).ok_or_else(|| PipelineError::Config("the preview map's fit is singular".into()))?;
            for r in 0..rows {
                let p: f64 = (0..d).map(|i| w[i] * xs[r * d + i]).sum();
                sq += (p - y[r]).powi(2);
            }
            for i in 0..d {
                map[rgb * d + i] = w[i] as f32;
            }
        }
        let fit_rmse = (sq / (3 * rows) as f64).sqrt() as f32;
        let fit_rms = (sum_sq / (c * rows) as f64).sqrt() as f32;
        if !map.iter().all(|v| v.is_finite()) || !fit_rmse.is_finite() {
            return Err(PipelineError::Config("the preview map's fit is not finite (the VAE decodes non-finite values)".into()));
        }
        Ok(Self { map, channels: c, fit_rmse, fit_rms })
    }

    /// The preview of `z`: one RGB pixel per latent pixel.
    pub fn render(&self, z: &Latents) -> Result<RgbImage> {
        if z.channels != self.channels || z.values.len() != z.channels * z.height * z.width {
            return Err(PipelineError::Config(format!(
                "a preview of {} latent channels ({} values for {}x{}) with a map for {}",
                z.channels,
                z.values.len(),
                z.width,
                z.height,
                self.channels
            )));
        }
        let n = z.height * z.width;
        let d = self.channels + 1;
        let rms = (z.values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / z.values.len().max(1) as f64).sqrt() as f32;
        let scale = if rms.is_finite() && rms > 0.0 { self.fit_rms / rms } else { 1.0 };
        let mut data = vec![0u8; n * 3];
        for p in 0..n {
            for rgb in 0..3 {
                let w = &self.map[rgb * d..(rgb + 1) * d];
                let mut v = w[self.channels];
                for ch in 0..self.channels {
                    v += w[ch] * z.values[ch * n + p] * scale;
                }
                data[p * 3 + rgb] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        Ok(RgbImage { width: z.width, height: z.height, data })
    }
}

/// Gaussian elimination with partial pivoting on a `d` x `d` system.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, d: usize) -> Option<Vec<f64>> {
    for col in 0..d {
        let piv = (col..d).max_by(|&i, &j| a[i * d + col].abs().total_cmp(&a[j * d + col].abs()))?;
        if a[piv * d + col].abs() < 1e-12 {
            return None;
        }
        for k in 0..d {
            a.swap(col * d + k, piv * d + k);
        }
        b.swap(col, piv);
        for row in col + 1..d {
            let f = a[row * d + col] / a[col * d + col];
            for k in col..d {
                a[row * d + k] -= f * a[col * d + k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0f64; d];
    for row in (0..d).rev() {
        let s: f64 = (row + 1..d).map(|k| a[row * d + k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row * d + row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_recovers_a_known_system() {
        // x = [1, -2, 3]
        let a = vec![2.0, 1.0, -1.0, -3.0, -1.0, 2.0, -2.0, 1.0, 2.0];
        let b = vec![2.0 * 1.0 + 1.0 * -2.0 - 3.0, -3.0 * 1.0 + 2.0 + 6.0, -2.0 - 2.0 + 6.0];
        let x = solve(a, b, 3).unwrap();
        for (v, e) in x.iter().zip([1.0, -2.0, 3.0]) {
            assert!((v - e).abs() < 1e-9, "{x:?}");
        }
        assert!(solve(vec![1.0, 2.0, 2.0, 4.0], vec![1.0, 2.0], 2).is_none(), "a singular system is refused");
    }

    #[test]
    fn render_applies_the_map_and_clamps() {
        // Two channels: r = z0, g = 0.5 + z1, b = 2 (clamped to 1).
        // The latents' root mean square is 0.5766: fit_rms set to it leaves them as they are.
        let z = Latents { values: vec![0.5, -1.0, 0.25, 0.1], channels: 2, height: 1, width: 2 };
        let rms = (z.values.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        let p = LatentPreview { map: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 2.0], channels: 2, fit_rmse: 0.0, fit_rms: rms };
        let img = p.render(&z).unwrap();
        assert_eq!((img.width, img.height), (2, 1));
        assert_eq!(img.data, vec![128, 191, 255, 0, 153, 255]);
        // Latents 10x larger preview the same (the decoder normalises them).
        let big = Latents { values: z.values.iter().map(|v| v * 10.0).collect(), ..z.clone() };
        assert_eq!(p.render(&big).unwrap().data, img.data);
        let bad = Latents { values: vec![0.0; 3], channels: 3, height: 1, width: 1 };
        assert!(p.render(&bad).is_err());
    }
}
