//! Learning an instruction (Visual Instruction Inversion): optimise the conditional text-encoder
//! output `c` [1, 77, hidden] so that InstructPix2Pix turns *before* into *after*.
//!
//! Per step (algorithm.md): `z_t = z_y + sigma_t n`, UNet input `z_t / sqrt(sigma_t^2 + 1)`; rows B
//! (empty text + image) and C (empty text, no image) run without autodiff, row A (c + image) with
//! autodiff on `c` only (same gradient as the reference, a third of the activations); guided
//! `e = e_C + g (e_A - e_B) + g_img (e_B - e_C)`; loss `4 mse(e, n) - 0.1 clamp(cos(d, p), -1, 0.5)`
//! with `p = text_projection(mean of c's rows)`; gradient clipped by value; AdamW; positions outside
//! `1..eos` reset to their initial values.

use burn::nn::Linear;
use burn::tensor::{Bool, Tensor, TensorData};

use crate::apply::Ip2p;
use crate::error::Result;
use visii_models::unet::ProjectedText;
use visii_models::UNet2DConditionModel;

/// AdamW hyper-parameters (torch defaults except the learning rate).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// What stays fixed while learning from one before/after pair.
pub struct PairLatents {
    /// `scaling_factor * mode(VAE(after))`: the target latent.
    pub z_after: Tensor<4>,
    /// `mode(VAE(before))`, unscaled: the image conditioning.
    pub z_before: Tensor<4>,
}

/// The optimiser state and the instruction being learned.
pub struct Inversion {
    pub c: Tensor<3>,
    pub c0: Tensor<3>,
    pub uncond: Tensor<3>,
    /// Normalised CLIP image-embedding direction, [proj].
    pub direction: Tensor<1>,
    pub eos: usize,
    pub clip_value: f32,
    pub adam: AdamWConfig,
    pub guidance: f32,
    pub image_guidance: f32,
    m: Tensor<3>,
    v: Tensor<3>,
    /// True on the learned span (positions 1..eos), [1, positions, hidden]; made once.
    span: Tensor<3, Bool>,
    step: i32,
    /// Rows B and C's text (`uncond` twice) projected by the UNet at this address: it does not
    /// change while learning (full size, 8 x 8 latents on lavapipe: ~8% of a step).
    uncond_text: std::sync::Mutex<Option<(usize, ProjectedText)>>,
}

/// Values of one step, measured before the update.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepStats {
    /// Step index (0-based) in the learning loop.
    pub step: usize,
    pub t: usize,
    pub mse: f32,
    pub cos: f32,
    pub loss: f32,
}

impl Inversion {
    pub fn new(c0: Tensor<3>, uncond: Tensor<3>, direction: Tensor<1>, eos: usize, adam: AdamWConfig) -> Result<Self> {
        crate::block_on(Self::new_async(c0, uncond, direction, eos, adam))
    }

    /// `new` without a blocking readback (the browser).
    pub async fn new_async(c0: Tensor<3>, uncond: Tensor<3>, direction: Tensor<1>, eos: usize, adam: AdamWConfig) -> Result<Self> {
        let clip_value = crate::read_f32(c0.clone().max()).await?.first().copied().unwrap_or(f32::INFINITY);
        let [_, rows, hidden] = c0.dims();
        let keep: Vec<bool> = (0..rows).map(|k| (1..eos).contains(&k)).collect();
        let span = Tensor::<3, Bool>::from_data(TensorData::new(keep, [1, rows, 1]), &c0.device()).expand([1, rows, hidden]);
        Ok(Self {
            span,
            c: c0.clone(),
            m: c0.zeros_like(),
            v: c0.zeros_like(),
            c0,
            uncond,
            direction,
            eos,
            clip_value,
            adam,
            guidance: 7.5,
            image_guidance: 1.5,
            step: 0,
            uncond_text: std::sync::Mutex::new(None),
        })
    }

    /// One optimisation step at training timestep `t` with noise `n` [1, 4, h, w] and that
    /// timestep's `sigma`; the values are those of the instruction before the update.
    pub fn step(
        &mut self,
        unet: &UNet2DConditionModel,
        text_projection: &Linear,
        pair: &PairLatents,
        t: usize,
        sigma: f32,
        n: Tensor<4>,
    ) -> Result<StepStats> {
        crate::block_on(self.step_async(unet, text_projection, pair, t, sigma, n))
    }

    /// `step` without a blocking readback (the browser): the update is queued before the three
    /// values are read back, so the GPU keeps working meanwhile.
    pub async fn step_async(
        &mut self,
        unet: &UNet2DConditionModel,
        text_projection: &Linear,
        pair: &PairLatents,
        t: usize,
        sigma: f32,
        n: Tensor<4>,
    ) -> Result<StepStats> {
        Ok(self.step_previewed_async(unet, text_projection, pair, t, sigma, n).await?.0)
    }

    /// `step_async`, also giving the clean *after* latent this step predicts, `z_t - sigma e`
    /// ([1, 4, h, w], scaled; what the instruction makes of the *before* image at this timestep:
    /// the learning preview), left on the device.
    pub async fn step_previewed_async(
        &mut self,
        unet: &UNet2DConditionModel,
        text_projection: &Linear,
        pair: &PairLatents,
        t: usize,
        sigma: f32,
        n: Tensor<4>,
    ) -> Result<(StepStats, Tensor<4>)> {
        let step = self.step as usize;
        let (vals, g, x0) = self.graph(unet, text_projection, pair, t, sigma, n);
        self.adamw(g.clamp(-self.clip_value, self.clip_value));
        self.reset_outside_span();
        self.step += 1;
        Ok((Self::stats(step, t, crate::read_f32(vals).await?), x0))
    }

    fn stats(step: usize, t: usize, v: Vec<f32>) -> StepStats {
        let at = |i: usize| v.get(i).copied().unwrap_or(f32::NAN);
        StepStats { step, t, mse: at(0), cos: at(1), loss: at(2) }
    }

    /// The step's values and the gradient of the loss w.r.t. the conditional row (before
    /// clipping), [1, positions, hidden]. Does not change the state.
    pub fn loss_and_gradient(
        &self,
        unet: &UNet2DConditionModel,
        text_projection: &Linear,
        pair: &PairLatents,
        t: usize,
        sigma: f32,
        n: Tensor<4>,
    ) -> Result<(StepStats, Tensor<3>)> {
        let (vals, g, _) = self.graph(unet, text_projection, pair, t, sigma, n);
        Ok((Self::stats(self.step as usize, t, crate::block_on(crate::read_f32(vals))?), g))
    }

    /// Forward and backward: ([mse, cos, loss], d loss / d c, the predicted clean latent), in
    /// buffers of their exact size in the browser (`visii_models::memory::exact_fit`).
    fn graph(
        &self,
        unet: &UNet2DConditionModel,
        text_projection: &Linear,
        pair: &PairLatents,
        t: usize,
        sigma: f32,
        n: Tensor<4>,
    ) -> (Tensor<1>, Tensor<3>, Tensor<4>) {
        visii_models::memory::exact_fit(&n.device(), n, |n| {
            let [_, lc, h, w] = n.dims();
            let inp = (pair.z_after.clone() + n.clone().mul_scalar(sigma)).div_scalar((sigma * sigma + 1.0).sqrt());
            let tf = t as f32;
            // Rows B and C: no graph.
            let rows = Tensor::cat(
                vec![Tensor::cat(vec![inp.clone(), pair.z_before.clone()], 1), Tensor::cat(vec![inp.clone(), pair.z_before.zeros_like()], 1)],
                0,
            );
            let rows_bc = {
                let mut cache = self.uncond_text.lock().unwrap_or_else(|e| e.into_inner());
                let id = unet as *const UNet2DConditionModel as usize;
                if cache.as_ref().is_none_or(|(at, _)| *at != id) {
                    *cache = Some((id, unet.project_text(Tensor::cat(vec![self.uncond.clone(), self.uncond.clone()], 0))));
                }
                let (_, text) = cache.as_ref().expect("projected just above");
                unet.forward_projected(rows, &[tf, tf], text)
            };
            let e_b = rows_bc.clone().slice([0..1, 0..lc, 0..h, 0..w]).autodiff();
            let e_c = rows_bc.slice([1..2, 0..lc, 0..h, 0..w]).autodiff();
            // Row A: autodiff through c only.
            let c = self.c.clone().autodiff().require_grad();
            let e_a = unet.forward(Tensor::cat(vec![inp, pair.z_before.clone()], 1).autodiff(), &[tf], c.clone());
            let e = e_c.clone() + (e_a - e_b.clone()).mul_scalar(self.guidance) + (e_b - e_c).mul_scalar(self.image_guidance);
            // x0 = z_t - sigma e with z_t = z_after + sigma n.
            let x0 = pair.z_after.clone() + (n.clone() - e.clone().inner()).mul_scalar(sigma);
            let mse = (e - n.autodiff()).powi_scalar(2).mean();
            let [_, _, hidden] = c.dims();
            let p = text_projection.forward(c.clone().mean_dim(1).reshape([1, hidden]));
            let p = p.clone().div(p.powi_scalar(2).sum().sqrt().reshape([1, 1]));
            let cos = (p.reshape([self.direction.dims()[0]]) * self.direction.clone().autodiff()).sum();
            let loss = mse.clone().mul_scalar(4.0) - cos.clone().clamp(-1.0, 0.5).mul_scalar(0.1);
            // One readback for the three values (not three), by the caller.
            let vals = Tensor::cat(vec![mse.inner(), cos.clone().inner(), loss.clone().inner()], 0);
            let grads = loss.backward();
            (vals, c.grad(&grads).expect("gradient w.r.t. the instruction"), x0)
        })
    }

    fn adamw(&mut self, g: Tensor<3>) {
        let a = &self.adam;
        let k = self.step + 1;
        let c = self.c.clone().mul_scalar(1.0 - a.lr * a.weight_decay);
        self.m = self.m.clone().mul_scalar(a.beta1) + g.clone().mul_scalar(1.0 - a.beta1);
        self.v = self.v.clone().mul_scalar(a.beta2) + g.powi_scalar(2).mul_scalar(1.0 - a.beta2);
        let bc1 = 1.0 - a.beta1.powi(k);
        let bc2 = 1.0 - a.beta2.powi(k);
        let denom = self.v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(a.eps);
        self.c = c - self.m.clone().div(denom).mul_scalar(a.lr / bc1);
    }

    /// Positions 0 (BOS) and eos.. (EOS and padding) return to their initial values.
    fn reset_outside_span(&mut self) {
        self.c = self.c0.clone().mask_where(self.span.clone(), self.c.clone());
    }
}

// ------------------------------------------------------------------ the learning loop

use crate::error::PipelineError;
use crate::image::RgbImage;
use crate::rng::NoiseRng;
use visii_models::loader::ClipVisionParts;
use visii_models::ClipPreprocessConfig;

/// Knobs of the shortened in-browser inversion (defaults: 256 px, 300 steps, stop after 100 steps
/// without a new best MSE).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LearnOptions {
    pub steps: usize,
    /// Longer side of the working size (multiple of 8).
    pub size: usize,
    /// An exact working size (W, H) instead of `size`.
    pub exact_size: Option<(usize, usize)>,
    pub seed: u64,
    pub patience: usize,
    pub adam: AdamWConfig,
}

/// Bounds on what a learning run may be asked.
pub const MAX_STEPS: usize = 100_000;
pub const MAX_LEARN_SIDE: usize = 1024;

impl LearnOptions {
    /// Refuse options no learning run can use, naming the option.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(PipelineError::Config(format!("steps is {}, expected 1..={MAX_STEPS}", self.steps)));
        }
        if !(8..=MAX_LEARN_SIDE).contains(&self.size) {
            return Err(PipelineError::Config(format!("size is {}, expected 8..={MAX_LEARN_SIDE}", self.size)));
        }
        if let Some((w, h)) = self.exact_size {
            crate::apply::check_working_size(w, h)?;
            if w.max(h) > MAX_LEARN_SIDE {
                return Err(PipelineError::Config(format!("size {w}x{h}: at most {MAX_LEARN_SIDE} per side for learning")));
            }
        }
        let a = &self.adam;
        if !(a.lr.is_finite() && (0.0..=10.0).contains(&a.lr)) {
            return Err(PipelineError::Config(format!("learning rate is {}, expected a finite number in 0..=10", a.lr)));
        }
        if ![a.beta1, a.beta2, a.eps, a.weight_decay].iter().all(|v| v.is_finite()) {
            return Err(PipelineError::Config("the optimiser's settings must be finite".into()));
        }
        Ok(())
    }
}

impl Default for LearnOptions {
    fn default() -> Self {
        Self { steps: 300, size: 256, exact_size: None, seed: 0, patience: 100, adam: AdamWConfig::default() }
    }
}

/// A learned instruction: the conditional rows and how it was made.
#[derive(Clone, Debug)]
pub struct Learned {
    /// [77, hidden], row-major.
    pub rows: Vec<f32>,
    pub positions: usize,
    pub hidden: usize,
    pub eos: usize,
    pub init_caption: String,
    pub seed: u64,
    pub steps_run: usize,
    pub best_mse: f32,
    pub final_loss: f32,
    pub history: Vec<StepStats>,
    /// The noises came from our RNG (`seed`), so applying can regenerate them; false when a
    /// schedule file supplied them.
    pub seeded_noise: bool,
}

pub const TIMESTEP_STREAM: u64 = 3 << 32;
pub const LEARN_NOISE_STREAM: u64 = 4 << 32;

/// Timesteps for `steps` steps: one uniform draw from each of `steps` equal strata of 0..T, in a
/// shuffled order, so the whole range is covered whatever the step count.
pub fn stratified_timesteps(steps: usize, train_timesteps: usize, seed: u64) -> Vec<usize> {
    let mut rng = NoiseRng::new(seed, TIMESTEP_STREAM);
    let mut ts: Vec<usize> = (0..steps)
        .map(|k| {
            let lo = k * train_timesteps / steps;
            let hi = ((k + 1) * train_timesteps / steps).max(lo + 1);
            lo + rng.below((hi - lo) as u64) as usize
        })
        .collect();
    for i in (1..ts.len()).rev() {
        ts.swap(i, rng.below(i as u64 + 1) as usize);
    }
    ts
}

/// CLIP image embedding (`get_image_features`) of an image, [1, proj].
pub fn clip_image_embed(clip: &ClipVisionParts, clip_pre: &ClipPreprocessConfig, img: &RgbImage, dev: &burn::tensor::Device) -> Result<Tensor<2>> {
    let (px, [c, h, w]) = clip_pre.apply(&img.data, img.width, img.height)?;
    Ok(clip.vision.image_embeds(Tensor::from_data(TensorData::new(px, [1, c, h, w]), dev)))
}

/// The prompt-search target for several pairs: the mean of the normalised *after* embeddings, [proj].
pub fn after_target(
    clip: &ClipVisionParts,
    clip_pre: &ClipPreprocessConfig,
    pairs: &[(RgbImage, RgbImage)],
    dev: &burn::tensor::Device,
) -> Result<Tensor<1>> {
    let mut acc: Option<Tensor<2>> = None;
    for (_, after) in pairs {
        let e = clip_image_embed(clip, clip_pre, after, dev)?;
        let e = e.clone().div(e.powi_scalar(2).sum().sqrt().clamp_min(1e-12).reshape([1, 1]));
        acc = Some(match acc {
            Some(a) => a + e,
            None => e,
        });
    }
    let acc = acc.ok_or_else(|| PipelineError::Config("at least one before/after pair is needed".into()))?;
    let proj = acc.dims()[1];
    Ok(acc.reshape([proj]))
}

/// Learn an instruction from before/after pairs (cycled per step). `progress(stats, best_mse)`
/// returning false stops early (the best instruction so far is kept).
#[allow(clippy::too_many_arguments)]
pub fn learn(
    model: &Ip2p,
    clip: &ClipVisionParts,
    clip_pre: &ClipPreprocessConfig,
    pairs: &[(RgbImage, RgbImage)],
    init_caption: &str,
    opts: &LearnOptions,
    schedule: Option<&crate::repro::Schedule>,
    progress: &mut dyn FnMut(&StepStats, f32) -> bool,
) -> Result<Learned> {
    crate::block_on(learn_async(model, clip, clip_pre, pairs, init_caption, opts, schedule, progress, None))
}

/// `learn` without blocking readbacks (the browser): it yields to the event loop once per step.
/// `preview` gets the clean latent the steps it asks for predict (see
/// [`Inversion::step_previewed_async`]), before `progress` hears of that step.
#[allow(clippy::too_many_arguments)]
pub async fn learn_async(
    model: &Ip2p,
    clip: &ClipVisionParts,
    clip_pre: &ClipPreprocessConfig,
    pairs: &[(RgbImage, RgbImage)],
    init_caption: &str,
    opts: &LearnOptions,
    schedule: Option<&crate::repro::Schedule>,
    progress: &mut dyn FnMut(&StepStats, f32) -> bool,
    mut preview: Option<&mut crate::preview::PreviewSink<'_>>,
) -> Result<Learned> {
    if pairs.is_empty() {
        return Err(PipelineError::Config("at least one before/after pair is needed".into()));
    }
    opts.validate()?;
    let dev = &model.device;
    // CLIP direction: mean over pairs of (after - before) image embeddings, normalised.
    let embed = |img: &RgbImage| clip_image_embed(clip, clip_pre, img, dev);
    let mut diff: Option<Tensor<2>> = None;
    let mut latents = vec![];
    for (before, after) in pairs {
        let d = embed(after)? - embed(before)?;
        diff = Some(match diff {
            Some(acc) => acc + d,
            None => d,
        });
        let (w, h) = match opts.exact_size {
            Some((w, h)) => (w, h),
            None => before.working_size(opts.size),
        };
        latents.push(PairLatents {
            z_after: model.encode_image(&after.resized(w, h)).mul_scalar(model.vae.scaling_factor),
            z_before: model.encode_image(&before.resized(w, h)),
        });
    }
    let d = diff.expect("one pair at least");
    let proj = d.dims()[1];
    let d = d.reshape([proj]);
    let direction = d.clone().div(d.powi_scalar(2).sum().sqrt().clamp_min(1e-12));

    let (c0, eos) = model.encode_text_with_eos(init_caption)?;
    let [_, positions, hidden] = c0.dims();
    let mut inv = Inversion::new_async(c0, model.encode_text("")?, direction, eos, opts.adam.clone()).await?;
    let sigmas = model.scheduler.train_sigmas()?;
    let ts = match schedule {
        Some(s) => {
            if let Some(t) = s.timesteps.iter().find(|&&t| t >= sigmas.len()) {
                return Err(PipelineError::Config(format!("schedule timestep {t} is outside 0..{}", sigmas.len())));
            }
            s.timesteps.clone()
        }
        None => stratified_timesteps(opts.steps, sigmas.len(), opts.seed),
    };
    let (mut best, mut best_c, mut since_best) = (f32::INFINITY, inv.c.clone(), 0usize);
    let mut history = vec![];
    for (k, &t) in ts.iter().enumerate() {
        let pair = &latents[k % latents.len()];
        let [_, lc, h, w] = pair.z_after.dims();
        let values = match schedule {
            Some(s) => {
                let v = s.noises[k].clone();
                if v.len() != lc * h * w {
                    return Err(PipelineError::Config(format!("schedule noise {k} has {} values; the latents need {lc}x{h}x{w}", v.len())));
                }
                v
            }
            None => NoiseRng::new(opts.seed, LEARN_NOISE_STREAM + k as u64).normal(lc * h * w),
        };
        let noise = Tensor::from_data(TensorData::new(values, [1, lc, h, w]), dev);
        let before_update = inv.c.clone();
        let (s, x0) = inv.step_previewed_async(&model.unet, &clip.text_projection, pair, t, sigmas[t], noise).await?;
        if let Some(p) = preview.as_mut().filter(|p| p.wants(k, ts.len())) {
            let x0 = crate::preview::Latents::read(x0).await?;
            (p.sink)(k, &x0);
        }
        crate::release_free_memory(dev);
        // The MSE is measured for the instruction before this update.
        if s.mse < best {
            best = s.mse;
            best_c = before_update;
            since_best = 0;
        } else {
            since_best += 1;
        }
        if !(s.loss.is_finite() && s.mse.is_finite() && s.cos.is_finite()) {
            return Err(PipelineError::Config(format!("learning diverged at step {} (non-finite loss): try a smaller learning rate", k + 1)));
        }
        history.push(s.clone());
        if !progress(&s, best) || (opts.patience > 0 && since_best >= opts.patience) {
            break;
        }
    }
    if history.is_empty() {
        return Err(PipelineError::Config("no learning step ran".into()));
    }
    let rows = crate::read_f32(best_c).await?;
    if rows.iter().any(|v| !v.is_finite() || v.abs() > visii_formats::instruction::MAX_ABS_VALUE) {
        return Err(PipelineError::Config("learning produced non-finite or runaway values: try a smaller learning rate".into()));
    }
    Ok(Learned {
        rows,
        positions,
        hidden,
        eos,
        init_caption: init_caption.into(),
        seed: opts.seed,
        steps_run: history.len(),
        best_mse: best,
        final_loss: history.last().map(|s| s.loss).unwrap_or(f32::NAN),
        history,
        seeded_noise: schedule.is_none(),
    })
}
