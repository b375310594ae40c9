//! diffusers `UNet2DConditionModel` (`unet_2d_condition.py`, `unet_2d_blocks.py`) for SD1.x/2.x-shaped
//! configs such as InstructPix2Pix's (`in_channels = 8`). Every shape comes from `config.json`.

use crate::nn::GroupNorm;
use crate::resident::Layer;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::{FloatDType, Tensor, TensorData};

use crate::attention::{Kv, TextContext, Transformer2DModel};
use crate::error::{ModelError, Result};
use crate::nn::{conv2d, group_norm, linear};
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::weights::{Vb, Weights};

pub use visii_formats::config::{PerBlock, UNetConfig};

/// Text states projected once for many UNet passes ([`UNet2DConditionModel::project_text`]).
pub struct ProjectedText {
    kv: Vec<Kv>,
    f16: bool,
    context: Tensor<3>,
}

/// A down block: `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Vec<Downsample2D>,
}

/// An up block: `CrossAttnUpBlock2D` or `UpBlock2D`; each resnet consumes one skip connection.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Vec<Upsample2D>,
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per layer.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

/// The UNet.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub time_linear_1: Linear,
    pub time_linear_2: Linear,
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub time_proj_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Activations in f16 (weights used as f16; norms and softmax in f32): half the activation
    /// memory, and faster on GPUs with `shader-f16`. Set with [`Self::set_f16_activations`].
    pub f16_activations: bool,
}

fn transformer(vb: &Vb, cfg: &UNetConfig, ch: usize, i: usize) -> Result<Transformer2DModel> {
    Transformer2DModel::load(
        vb,
        ch,
        cfg.heads(i),
        cfg.cross_attention_dim.get(i),
        cfg.norm_num_groups,
        cfg.transformer_layers_per_block.get(i),
        cfg.use_linear_projection,
    )
}

/// Whether `device` can run f16 activations, where they are asked for (`on`).
pub fn check_f16(on: bool, device: &burn::tensor::Device) -> Result<()> {
    if on && !device.supports_dtype(burn::tensor::DType::F16) {
        return Err(ModelError::DeviceLacks(
            "run f16 activations: it has no f16 arithmetic (a WebGPU adapter without `shader-f16`, or burn's ndarray backend); f32 works everywhere"
                .into(),
        ));
    }
    Ok(())
}

impl UNet2DConditionModel {
    pub fn load(w: &Weights, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate().map_err(|message| crate::ModelError::Config { path: "unet/config.json".into(), message })?;
        let vb = w.root();
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (groups, eps, temb) = (cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim());

        // 1. time
        let te = vb.pp("time_embedding");
        // (Each part is handed to `w.block` as soon as it is built: int8 on the device if asked;
        // not time_linear_1, conv_in and conv_out, whose exact values are the model's identity and
        // which are small.)
        let time_linear_1 = linear(&te.pp("linear_1"), ch[0], temb, true)?;
        let time_linear_2 = w.block(linear(&te.pp("linear_2"), temb, temb, true)?);
        // 2. stem
        let conv_in = conv2d(&vb.pp("conv_in"), cfg.in_channels, ch[0], cfg.conv_in_kernel, 1, cfg.conv_in_kernel / 2)?;

        // 3. down
        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let b = vb.pp("down_blocks").pp(i);
            let c_in = c_out;
            c_out = ch[i];
            let layers = cfg.layers_per_block.get(i);
            let resnets = (0..layers)
                .map(|j| ResnetBlock2D::load(&b.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out, Some(temb), groups, eps))
                .collect::<Result<Vec<_>>>()?;
            let attentions = if kind == "CrossAttnDownBlock2D" {
                (0..layers).map(|j| transformer(&b.pp("attentions").pp(j), cfg, c_out, i)).collect::<Result<Vec<_>>>()?
            } else {
                vec![]
            };
            let downsamplers = if i + 1 < n { vec![Downsample2D::load(&b.pp("downsamplers").pp(0), c_out, cfg.downsample_padding)?] } else { vec![] };
            down_blocks.push(w.block(DownBlock { resnets, attentions, downsamplers }));
        }

        // 4. mid
        let mid_block = match cfg.mid_block_type {
            Some(_) => {
                let b = vb.pp("mid_block");
                let c = ch[n - 1];
                Some(w.block(MidBlock {
                    resnets: (0..2).map(|j| ResnetBlock2D::load(&b.pp("resnets").pp(j), c, c, Some(temb), groups, eps)).collect::<Result<_>>()?,
                    attentions: vec![transformer(&b.pp("attentions").pp(0), cfg, c, n - 1)?],
                }))
            }
            None => None,
        };

        // 5. up (block index i counts in up order; per-block lists are read reversed)
        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut c_out = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let b = vb.pp("up_blocks").pp(i);
            let down_i = n - 1 - i;
            let c_prev = c_out;
            c_out = rev[i];
            let c_skip_in = rev[(i + 1).min(n - 1)];
            let layers = cfg.layers_per_block.get(down_i) + 1;
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { c_skip_in } else { c_out };
                    let res_in = if j == 0 { c_prev } else { c_out };
                    ResnetBlock2D::load(&b.pp("resnets").pp(j), res_in + skip, c_out, Some(temb), groups, eps)
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = if kind == "CrossAttnUpBlock2D" {
                (0..layers).map(|j| transformer(&b.pp("attentions").pp(j), cfg, c_out, down_i)).collect::<Result<Vec<_>>>()?
            } else {
                vec![]
            };
            let upsamplers = if i + 1 < n { vec![Upsample2D::load(&b.pp("upsamplers").pp(0), c_out)?] } else { vec![] };
            up_blocks.push(w.block(UpBlock { resnets, attentions, upsamplers }));
        }

        // 6. head
        Ok(Self {
            time_linear_1,
            time_linear_2,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&vb.pp("conv_norm_out"), groups, ch[0], eps)?,
            conv_out: conv2d(&vb.pp("conv_out"), ch[0], cfg.out_channels, cfg.conv_out_kernel, 1, cfg.conv_out_kernel / 2)?,
            time_proj_dim: ch[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            f16_activations: false,
        })
    }

    /// Run the activations in f16 (see the field); errors where the device has no f16 (a WebGPU
    /// adapter without `shader-f16`, burn's ndarray backend).
    pub fn set_f16_activations(&mut self, on: bool, device: &burn::tensor::Device) -> Result<()> {
        check_f16(on, device)?;
        self.f16_activations = on;
        Ok(())
    }

    /// Sinusoidal timestep features [b, dim] (`get_timestep_embedding`), fractional timesteps allowed.
    pub fn time_proj(&self, timesteps: &[f32], device: &burn::tensor::Device) -> Tensor<2> {
        let dim = self.time_proj_dim;
        let half = dim / 2;
        let mut out = Vec::with_capacity(timesteps.len() * dim);
        // f32 throughout, in the order torch computes it, so fractional timesteps match closely.
        let freqs: Vec<f32> = (0..half).map(|k| (-(10000f32).ln() * k as f32 / (half as f32 - self.freq_shift as f32)).exp()).collect();
        for &t in timesteps {
            let (sin, cos): (Vec<f32>, Vec<f32>) = freqs.iter().map(|f| ((t * f).sin(), (t * f).cos())).unzip();
            if self.flip_sin_to_cos {
                out.extend(cos);
                out.extend(sin);
            } else {
                out.extend(sin);
                out.extend(cos);
            }
            if dim % 2 == 1 {
                out.push(0.0);
            }
        }
        Tensor::from_data(TensorData::new(out, [timesteps.len(), dim]), device)
    }

    fn activations(&self) -> FloatDType {
        if self.f16_activations {
            FloatDType::F16
        } else {
            FloatDType::F32
        }
    }

    /// Noise prediction. sample [b, in, h, w], one timestep per row, context [b, seq, cross_dim].
    pub fn forward(&self, sample: Tensor<4>, timesteps: &[f32], context: Tensor<3>) -> Tensor<4> {
        let context = context.cast(self.activations());
        self.forward_text(sample, timesteps, &mut TextContext::States(&context))
    }

    /// The keys and values every cross-attention layer computes from `context` [b, seq, cross_dim]
    /// (in the activations' type), for [`Self::forward_projected`]: sampling runs the UNet many
    /// times on the same text (full size, 8 x 8 latents on lavapipe, these projections were 12% of
    /// a sampling step; 23 MB kept for three rows of 77 states).
    pub fn project_text(&self, context: Tensor<3>) -> ProjectedText {
        let f16 = self.f16_activations;
        let states = context.clone().cast(self.activations());
        let down = self.down_blocks.iter().flat_map(|b| &b.attentions);
        let mid = self.mid_block.iter().flat_map(|b| &b.attentions);
        let up = self.up_blocks.iter().flat_map(|b| &b.attentions);
        let kv = down.chain(mid).chain(up).flat_map(|t| t.project_text(&states).collect::<Vec<_>>()).collect();
        ProjectedText { kv, f16, context }
    }

    /// [`Self::forward`] on text projected by [`Self::project_text`]: the same values, without
    /// projecting the text again.
    pub fn forward_projected(&self, sample: Tensor<4>, timesteps: &[f32], text: &ProjectedText) -> Tensor<4> {
        if text.f16 != self.f16_activations {
            // Projected before the activations' type changed: project again.
            return self.forward(sample, timesteps, text.context.clone());
        }
        self.forward_text(sample, timesteps, &mut TextContext::Projected(text.kv.iter()))
    }

    fn forward_text(&self, sample: Tensor<4>, timesteps: &[f32], text: &mut TextContext) -> Tensor<4> {
        let device = sample.device();
        let dt = self.activations();
        let sample = sample.cast(dt);
        // 1. time
        let t = self.time_proj(timesteps, &device).cast(dt);
        let temb = self.time_linear_2.run(silu(self.time_linear_1.run(t)));
        // Every resnet block applies SiLU to the same embedding first (diffusers' `nonlinearity(temb)`):
        // once here (two kernels) instead of in each of the UNet's 22 blocks.
        let temb_silu = silu(temb);
        let temb = Some(&temb_silu);
        // 2. stem
        let mut x = self.conv_in.run(sample);
        let mut skips = vec![x.clone()];
        // 3. down
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(x, temb);
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward_text(x, text);
                }
                skips.push(x.clone());
            }
            for down in &block.downsamplers {
                x = down.forward(x);
                skips.push(x.clone());
            }
        }
        // 4. mid
        if let Some(mid) = &self.mid_block {
            x = mid.resnets[0].forward(x, temb);
            for (attn, resnet) in mid.attentions.iter().zip(&mid.resnets[1..]) {
                x = resnet.forward(attn.forward_text(x, text), temb);
            }
        }
        // 5. up
        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip connection per up resnet");
                x = resnet.forward(Tensor::cat(vec![x, skip], 1), temb);
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward_text(x, text);
                }
            }
            for up in &block.upsamplers {
                let [_, _, h, w] = skips.last().expect("skip for the next block").dims();
                x = up.forward(x, Some([h, w]));
            }
        }
        // 6. head
        self.conv_out.run(self.conv_norm_out.forward_silu(x)).cast(FloatDType::F32)
    }
}
