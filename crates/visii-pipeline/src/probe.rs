//! One UNet forward, one learning step or one sampling step on random inputs: how long a device
//! takes for the work every step of `learn` / `apply` does (`visii bench`, the page's "Measure
//! this GPU"). Shapes come from the UNet itself; the caller times each call (each reads one
//! value back, so the queued GPU work has finished when it returns).

use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use visii_models::unet::ProjectedText;
use visii_models::UNet2DConditionModel;

use crate::learn::{AdamWConfig, Inversion, PairLatents};
use crate::scheduler::{EulerAncestral, SchedulerConfig};
use crate::Result;

/// Random inputs for `latent` x `latent` latents and `hidden`-wide text states (77 positions).
pub struct UnetProbe {
    latent: usize,
    in_channels: usize,
    out_channels: usize,
    device: Device,
    context: Tensor<3>,
    /// `context` projected for the sampling step, as `apply` does once before its steps (on the
    /// first sampling step: the other measures do not use it).
    text: std::sync::OnceLock<ProjectedText>,
    inversion: Inversion,
    projection: Linear,
    pair: PairLatents,
    scheduler: EulerAncestral,
}

impl UnetProbe {
    pub async fn new(unet: &UNet2DConditionModel, hidden: usize, latent: usize, device: &Device) -> Result<Self> {
        // conv_in / conv_out stay f32 with int8-resident weights: their shapes are the model's.
        let [_, in_channels, _, _] = unet.conv_in.weight.val().dims();
        let [out_channels, _, _, _] = unet.conv_out.weight.val().dims();
        let ctx = || Tensor::<3>::random([1, 77, hidden], Distribution::Normal(0.0, 1.0), device);
        let direction = Tensor::<1>::random([hidden], Distribution::Normal(0.0, 1.0), device);
        let normal = |c: usize| Tensor::<4>::random([1, c, latent, latent], Distribution::Normal(0.0, 1.0), device);
        Ok(Self {
            text: std::sync::OnceLock::new(),
            latent,
            in_channels,
            out_channels,
            device: device.clone(),
            context: Tensor::cat(vec![ctx(), ctx(), ctx()], 0),
            inversion: Inversion::new_async(ctx(), ctx(), direction, 8, AdamWConfig::default()).await?,
            projection: LinearConfig::new(hidden, hidden).init(device),
            pair: PairLatents { z_after: normal(out_channels), z_before: normal(in_channels - out_channels) },
            scheduler: EulerAncestral::new(&SchedulerConfig::default(), 20)?,
        })
    }

    fn normal(&self, rows: usize, channels: usize) -> Tensor<4> {
        Tensor::random([rows, channels, self.latent, self.latent], Distribution::Normal(0.0, 1.0), &self.device)
    }

    /// One UNet forward, batch 1.
    pub async fn forward(&self, unet: &UNet2DConditionModel) -> Result<()> {
        let ctx = self.context.clone().slice([0..1]);
        let e = unet.forward(self.normal(1, self.in_channels), &[500.0], ctx);
        let r = crate::read_f32(e.slice([0..1, 0..1, 0..1, 0..1])).await.map(drop);
        crate::release_free_memory(&self.device);
        r
    }

    /// One step of the inverter (`learn`): the three UNet rows, the backward pass, the update.
    pub async fn learn_step(&mut self, unet: &UNet2DConditionModel) -> Result<()> {
        let n = self.normal(1, self.out_channels);
        let r = self.inversion.step_async(unet, &self.projection, &self.pair, 500, 1.0, n).await.map(drop);
        crate::release_free_memory(&self.device);
        r
    }

    /// One sampling step of `apply`: the three guidance rows and the scheduler update.
    pub async fn sample_step(&self, unet: &UNet2DConditionModel) -> Result<()> {
        let (lc, ic) = (self.out_channels, self.in_channels - self.out_channels);
        let x = self.normal(1, lc);
        let rows = Tensor::cat(vec![x.clone(), x.clone(), x.clone()], 0);
        let input = Tensor::cat(vec![self.scheduler.scale_model_input(rows, 0), self.normal(3, ic)], 1);
        let text = self.text.get_or_init(|| unet.project_text(self.context.clone()));
        let e = unet.forward_projected(input, &[500.0; 3], text);
        let l = self.latent;
        let row = |r: usize| e.clone().slice([r..r + 1, 0..lc, 0..l, 0..l]);
        let g = row(2) + (row(0) - row(1)).mul_scalar(7.5) + (row(1) - row(2)).mul_scalar(1.5);
        let next = self.scheduler.step(g, 0, x, self.normal(1, lc));
        let r = crate::read_f32(next.slice([0..1, 0..1, 0..1, 0..1])).await.map(drop);
        crate::release_free_memory(&self.device);
        r
    }
}
