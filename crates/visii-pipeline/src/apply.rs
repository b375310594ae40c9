//! Applying an instruction: InstructPix2Pix sampling with Euler-ancestral steps and three-row
//! classifier-free guidance (`e_C + g (e_A - e_B) + g_img (e_B - e_C)`), as diffusers'
//! `StableDiffusionInstructPix2PixPipeline` does. Noise comes from our seeded RNG or is injected.

use burn::tensor::{Device, Int, Tensor, TensorData};
use visii_models::{AutoencoderKL, ClipTextTransformer, ClipTokenizer, Ip2pFolder, UNet2DConditionModel};

use crate::error::{PipelineError, Result};
use crate::image::{vae_output_to_unit, RgbImage};
use crate::rng::NoiseRng;
use crate::scheduler::{EulerAncestral, SchedulerConfig};

/// The InstructPix2Pix networks and tokenizer, loaded once.
pub struct Ip2p {
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text: ClipTextTransformer,
    pub tokenizer: ClipTokenizer,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    /// The checkpoint's name (`_name_or_path` of model_index.json, else the folder name).
    pub name: String,
    /// Hash of the UNet and text-encoder configs (see `identity`).
    pub arch: String,
    /// Parameters read for the UNet, the VAE and the text encoder.
    pub params: [usize; 3],
    /// Weight values of the UNet, the VAE and the text encoder kept int8 on the device (`Ip2pFolder::resident_q8`).
    pub resident_values: usize,
}

/// Sampling controls.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ApplyOptions {
    pub steps: usize,
    pub guidance: f32,
    pub image_guidance: f32,
    pub seed: u64,
}

/// Bounds on what an apply may be asked (the page and the CLI pass options from users).
pub const MAX_APPLY_STEPS: usize = 1000;
pub const MAX_GUIDANCE: f32 = 1000.0;
/// Longest side of the working size: 2048 px is 16x the pixels of the 512 px InstructPix2Pix was trained at.
pub const MAX_SIDE: usize = 2048;

impl ApplyOptions {
    /// Refuse options no sampling can use, naming the option.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_APPLY_STEPS).contains(&self.steps) {
            return Err(PipelineError::Config(format!("steps is {}, expected 1..={MAX_APPLY_STEPS}", self.steps)));
        }
        for (name, g) in [("guidance", self.guidance), ("image guidance", self.image_guidance)] {
            if !g.is_finite() || g.abs() > MAX_GUIDANCE {
                return Err(PipelineError::Config(format!("{name} is {g}, expected a finite number within ±{MAX_GUIDANCE}")));
            }
        }
        Ok(())
    }
}

/// Refuse a working size outside what can be computed, naming it.
pub fn check_working_size(w: usize, h: usize) -> Result<()> {
    if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 || w.max(h) > MAX_SIDE {
        return Err(PipelineError::Config(format!("size {w}x{h}: both sides must be positive multiples of 8, at most {MAX_SIDE}")));
    }
    Ok(())
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self { steps: 20, guidance: 7.5, image_guidance: 1.5, seed: 0 }
    }
}

/// Where the sampler's noise comes from.
pub enum Noise {
    /// Our RNG: the initial latent from stream `INIT_STREAM`, step `i` from `STEP_STREAM + i`.
    Seeded(u64),
    /// Explicit tensors (parity tests): the initial noise and one per step, each [1, 4, h, w].
    Given { init: Vec<f32>, steps: Vec<Vec<f32>> },
    /// The noises an instruction was learned with (the paper's noise-reuse option): the initial
    /// latent takes the learning noise whose timestep is nearest the first sampling timestep, and
    /// step i's ancestral noise the one nearest the timestep it steps to. At the learning size the
    /// values are exactly the learning noises; at another size, the same streams drawn longer.
    Reuse(crate::instruction::NoiseReuse),
}

impl crate::instruction::NoiseReuse {
    /// The learning step whose timestep is nearest `t`.
    pub fn nearest_step(&self, t: f32) -> Option<usize> {
        (0..self.timesteps.len())
            .min_by(|&a, &b| (self.timesteps[a] as f32 - t).abs().total_cmp(&(self.timesteps[b] as f32 - t).abs()).then(a.cmp(&b)))
    }

    fn noise(&self, t: f32, n: usize) -> Result<Vec<f32>> {
        let k = self.nearest_step(t).ok_or_else(|| PipelineError::Config("the instruction records no learning steps to reuse noise from".into()))?;
        Ok(NoiseRng::new(self.seed, crate::learn::LEARN_NOISE_STREAM + k as u64).normal(n))
    }
}

/// Sampling went non-finite (`when`: at which step, or empty): the guidance, or values in the
/// model's weights or the instruction too large for f32 arithmetic.
fn diverged(when: &str) -> PipelineError {
    let when = if when.is_empty() { String::new() } else { format!(" {when}") };
    PipelineError::Config(format!(
        "sampling diverged{when} (non-finite latents): try a lower guidance; if that does not help, the model's weights or the instruction hold values too large to compute with (are they the files you meant?)"
    ))
}

pub const INIT_STREAM: u64 = 1 << 32;
pub const STEP_STREAM: u64 = 2 << 32;

impl Ip2p {
    /// Load every component from a diffusers-layout folder (on disk or in memory: see `Files`).
    pub fn from_folder(folder: &Ip2pFolder, device: &Device) -> Result<Self> {
        let unet = folder.unet(device)?;
        let vae = folder.vae(device)?;
        let text = folder.text_encoder(device)?;
        let uc = serde_json::to_string(&unet.config).map_err(|e| PipelineError::Config(e.to_string()))?;
        let tc = serde_json::to_string(&text.config).map_err(|e| PipelineError::Config(e.to_string()))?;
        Ok(Self {
            params: [unet.params, vae.params, text.params],
            resident_values: unet.resident_values + vae.resident_values + text.resident_values,
            unet: unet.model,
            vae: vae.model,
            text: text.model,
            tokenizer: folder.tokenizer()?,
            scheduler: SchedulerConfig::from_json(&folder.scheduler_config()?)?,
            device: device.clone(),
            name: folder.name(),
            arch: crate::identity::short_hash(&[uc.as_bytes(), tc.as_bytes()]),
        })
    }

    /// Token ids of a prompt, padded to 77.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text)?)
    }

    /// Text -> conditioning [1, 77, hidden] (last hidden state).
    pub fn encode_text(&self, text: &str) -> Result<Tensor<3>> {
        Ok(self.encode_text_with_eos(text)?.0)
    }

    /// Text -> (conditioning, position of its EOS), tokenising once.
    pub fn encode_text_with_eos(&self, text: &str) -> Result<(Tensor<3>, usize)> {
        let ids = self.token_ids(text)?;
        let eos = self.tokenizer.eos_position(&ids);
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let n = ids.len();
        Ok((self.text.forward(Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &self.device)), eos))
    }

    /// Token positions of the text conditioning (what the tokenizer pads to: 77 for CLIP).
    pub fn text_positions(&self) -> Result<usize> {
        Ok(self.token_ids("")?.len())
    }

    /// Width of the text encoder's output (what an instruction file's rows must have).
    pub fn hidden_size(&self) -> usize {
        self.text.final_layer_norm.gamma.dims()[0]
    }

    /// The conditioning of an instruction file: validated (the model check first, so a file for a
    /// model of another width reads as foreign, not malformed), optionally with `extra` words
    /// written after the learned span (hybrid). Returns it with the parsed file.
    pub fn instruction_conditioning(
        &self,
        bytes: &[u8],
        identity: &crate::ModelIdentity,
        allow_foreign: bool,
        extra: Option<&str>,
    ) -> Result<(Tensor<3>, crate::instruction::Instruction)> {
        crate::instruction::peek(bytes)?.check_model(identity, allow_foreign)?;
        let ins = crate::instruction::load(bytes, self.hidden_size(), self.text_positions()?)?;
        let cond = Tensor::<3>::from_data(TensorData::new(ins.rows.clone(), [1, ins.positions, ins.hidden]), &self.device);
        let cond = match extra.map(str::trim) {
            Some(extra) if !extra.is_empty() => {
                let (e, e_eos) = self.encode_text_with_eos(extra)?;
                hybrid(cond, ins.eos, e, e_eos)
            }
            _ => cond,
        };
        Ok((cond, ins))
    }

    /// Image -> unscaled latent mode [1, 4, H/8, W/8] (InstructPix2Pix's image conditioning).
    pub fn encode_image(&self, image: &RgbImage) -> Tensor<4> {
        self.vae.encode_mode(image.to_tensor(&self.device))
    }

    /// Scaled latents -> floats in [0, 1], [1, 3, H, W].
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        vae_output_to_unit(self.vae.decode(latents.div_scalar(self.vae.scaling_factor)))
    }

    /// [`decode`](Self::decode) as `apply` runs it: in the browser it waits for the device
    /// between the decoder's stages and hands free buffers back there ([`decode_staged`]).
    pub async fn decode_async(&self, latents: Tensor<4>) -> Result<Tensor<4>> {
        Ok(vae_output_to_unit(decode_staged(&self.vae, latents.div_scalar(self.vae.scaling_factor)).await?))
    }

    /// Sample an edit of `image` (already at its working size, multiples of 8) with conditioning
    /// `cond` [1, 77, hidden]. `progress(step, steps)` returning false cancels.
    pub fn apply(
        &self,
        image: &RgbImage,
        cond: Tensor<3>,
        opts: &ApplyOptions,
        noise: &Noise,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor<4>> {
        self.apply_traced(image, cond, opts, noise, progress, None)
    }

    /// `apply`, also handing the latents after every step to `trace` (parity tests, previews).
    pub fn apply_traced(
        &self,
        image: &RgbImage,
        cond: Tensor<3>,
        opts: &ApplyOptions,
        noise: &Noise,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        trace: Option<&mut dyn FnMut(usize, &Tensor<4>)>,
    ) -> Result<Tensor<4>> {
        crate::block_on(self.sample(image, cond, opts, noise, progress, trace, None, false))
    }

    /// `apply` for the browser: after each step it waits for the GPU (a one-value readback), so
    /// progress is reported as steps finish and a cancel request can arrive between steps.
    pub async fn apply_async(
        &self,
        image: &RgbImage,
        cond: Tensor<3>,
        opts: &ApplyOptions,
        noise: &Noise,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor<4>> {
        self.sample(image, cond, opts, noise, progress, None, None, true).await
    }

    /// `apply_async` handing the predicted clean latent (x0) of the steps `preview` asks for to its
    /// sink (live previews: see [`crate::preview`]).
    pub async fn apply_previewed_async(
        &self,
        image: &RgbImage,
        cond: Tensor<3>,
        opts: &ApplyOptions,
        noise: &Noise,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        preview: Option<&mut crate::preview::PreviewSink<'_>>,
    ) -> Result<Tensor<4>> {
        self.sample(image, cond, opts, noise, progress, None, preview, true).await
    }

    /// [`apply_previewed_async`](Self::apply_previewed_async), blocking (native).
    pub fn apply_previewed(
        &self,
        image: &RgbImage,
        cond: Tensor<3>,
        opts: &ApplyOptions,
        noise: &Noise,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        preview: Option<&mut crate::preview::PreviewSink<'_>>,
    ) -> Result<Tensor<4>> {
        crate::block_on(self.sample(image, cond, opts, noise, progress, None, preview, false))
    }

    #[allow(clippy::too_many_arguments)]
    async fn sample(
        &self,
        image: &RgbImage,
        cond: Tensor<3>,
        opts: &ApplyOptions,
        noise: &Noise,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        mut trace: Option<&mut dyn FnMut(usize, &Tensor<4>)>,
        mut preview: Option<&mut crate::preview::PreviewSink<'_>>,
        wait_each_step: bool,
    ) -> Result<Tensor<4>> {
        opts.validate()?;
        check_working_size(image.width, image.height)?;
        let dev = &self.device;
        let sched = EulerAncestral::new(&self.scheduler, opts.steps)?;
        if let Noise::Reuse(r) = noise {
            let n = self.scheduler.num_train_timesteps;
            if let Some(t) = r.timesteps.iter().find(|&&t| t >= n) {
                return Err(PipelineError::Instruction(format!(
                    "the instruction's noise_reuse lists timestep {t}, but this model's scheduler has timesteps 0..{n}: it was not learned on this model, so its noise cannot be reused"
                )));
            }
        }
        let z_img = self.encode_image(image);
        let [_, c, h, w] = z_img.dims();
        let lat_c = self.unet_out_channels();
        let noise_tensor = |v: Vec<f32>| -> Result<Tensor<4>> {
            if v.len() != lat_c * h * w {
                return Err(PipelineError::Config(format!("noise has {} values, expected {}", v.len(), lat_c * h * w)));
            }
            Ok(Tensor::from_data(TensorData::new(v, [1, lat_c, h, w]), dev))
        };
        let draw = |seed: u64, stream: u64| NoiseRng::new(seed, stream).normal(lat_c * h * w);
        let ts = &sched.timesteps;
        let init = match noise {
            Noise::Seeded(seed) => draw(*seed, INIT_STREAM),
            Noise::Given { init, .. } => init.clone(),
            Noise::Reuse(r) => r.noise(ts[0], lat_c * h * w)?,
        };
        let mut latents = noise_tensor(init)?.mul_scalar(sched.init_noise_sigma(&self.scheduler));
        // Rows: A = instruction + image, B = empty text + image, C = empty text + no image.
        let uncond = self.encode_text("")?;
        // The text's keys and values once for every step (they do not change while sampling).
        let text = self.unet.project_text(Tensor::cat(vec![cond, uncond.clone(), uncond], 0));
        let image_rows = Tensor::cat(vec![z_img.clone(), z_img, Tensor::zeros([1, c, h, w], dev)], 0);
        let steps = sched.timesteps.len();
        for (i, &t) in sched.timesteps.iter().enumerate() {
            if !progress(i, steps) {
                return Err(PipelineError::Cancelled);
            }
            let step_noise = match noise {
                Noise::Seeded(seed) => draw(*seed, STEP_STREAM + i as u64),
                Noise::Given { steps, .. } => steps.get(i).cloned().ok_or_else(|| PipelineError::Config(format!("no noise for step {i}")))?,
                Noise::Reuse(r) => r.noise(*ts.get(i + 1).unwrap_or(&t), lat_c * h * w)?,
            };
            // In the allocator's size buckets, not in exact-size buffers as a learning step
            // (`visii_models::memory::exact_fit`): a forward pass keeps few tensors alive, and
            // freed buffers of sizes not asked for again added up (full size, 64 x 64 latents,
            // browser allocator: held at most 2.10 GiB in buckets, 2.71 GiB in exact sizes).
            let x = sched.scale_model_input(latents.clone(), i);
            let input = Tensor::cat(vec![Tensor::cat(vec![x.clone(), x.clone(), x], 0), image_rows.clone()], 1);
            let e = self.unet.forward_projected(input, &[t, t, t], &text);
            let row = |r: usize| e.clone().slice([r..r + 1, 0..lat_c, 0..h, 0..w]);
            let (ea, eb, ec) = (row(0), row(1), row(2));
            let guided = ec.clone() + (ea - eb.clone()).mul_scalar(opts.guidance) + (eb - ec).mul_scalar(opts.image_guidance);
            if let Some(p) = preview.as_mut().filter(|p| p.wants(i, steps)) {
                let x0 = crate::preview::Latents::read(sched.pred_original(guided.clone(), i, latents.clone())).await?;
                (p.sink)(i, &x0);
            }
            latents = sched.step(guided, i, latents, noise_tensor(step_noise)?);
            crate::release_free_memory(dev);
            if let Some(f) = trace.as_mut() {
                f(i, &latents);
            }
            if wait_each_step {
                let probe = crate::read_f32(latents.clone().slice([0..1, 0..1, 0..1, 0..1])).await?;
                if probe.first().is_none_or(|v| !v.is_finite()) {
                    return Err(diverged(&format!("at step {i}")));
                }
            }
        }
        // Sampling that went non-finite would decode to a black image: stop with an error instead.
        if crate::read_f32(latents.clone()).await?.iter().any(|v| !v.is_finite()) {
            return Err(diverged(""));
        }
        progress(steps, steps);
        let out = self.decode_async(latents).await?;
        Ok(out)
    }

    fn unet_out_channels(&self) -> usize {
        self.unet.conv_out.weight.dims()[0]
    }
}

/// `vae.decode(z)`, in the browser ([`visii_models::memory::in_browser`]) one stage at a time
/// (`AutoencoderKL::decode_stage`), reading one value back after each so the device has run it,
/// then handing the free buffers back: a buffer handed back inside a queued pass keeps its memory
/// until the pass has run (see `visii_models::memory`), so without these waits the whole decode's
/// buffers are alive at once, and the decoder's tensors grow layer after layer (neither exact
/// sizes nor size buckets get reused much: full size at 256 px held at most 0.49 / 0.43 GiB in
/// one pass for 0.21 GiB in use). In the allocator's size buckets.
pub async fn decode_staged(vae: &visii_models::AutoencoderKL, z: Tensor<4>) -> Result<Tensor<4>> {
    let device = z.device();
    let stages = vae.decode_stages();
    let mut x = visii_models::chunked::Chunked::new(z);
    for stage in 0..stages {
        x = vae.decode_stage(stage, x);
        if stage + 1 < stages && visii_models::memory::in_browser() {
            crate::read_f32(x.first().clone().slice([0..1, 0..1, 0..1, 0..1])).await?;
            crate::release_free_memory(&device);
        }
    }
    Ok(x.join())
}

/// Hybrid instruction: the extra text's own token rows (positions `1..extra_eos` of its encoding)
/// written into the learned `cond` starting 2 positions after the learned span's EOS (algorithm.md),
/// cut at the last position. `cond` and `extra` are [1, positions, hidden].
pub fn hybrid(cond: Tensor<3>, eos: usize, extra: Tensor<3>, extra_eos: usize) -> Tensor<3> {
    let [_, positions, hidden] = cond.dims();
    let start = eos + 2;
    if start >= positions || extra_eos <= 1 {
        return cond;
    }
    let n = (extra_eos - 1).min(positions - start);
    let rows = extra.slice([0..1, 1..1 + n, 0..hidden]);
    cond.slice_assign([0..1, start..start + n, 0..hidden], rows)
}
