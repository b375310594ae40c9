//! diffusers `AutoencoderKL` (`autoencoder_kl.py`, `vae.py`): encoder -> latent distribution
//! (mean, logvar; `mode` = mean), decoder. The 2023 checkpoints name the mid-block attention
//! `query/key/value/proj_attn`; today's diffusers writes `to_q/to_k/to_v/to_out.0`: both load.

use crate::nn::GroupNorm;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use crate::attention::SpatialAttention;
use crate::chunked::Chunked;
use crate::error::{ModelError, Result};
use crate::nn::{conv2d, group_norm};
use crate::resident::Layer;
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::weights::{Vb, Weights};

pub use visii_formats::config::VaeConfig;

const EPS: f64 = 1e-6;

/// `UNetMidBlock2D` with one attention: resnet, attention, resnet.
#[derive(Module, Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<SpatialAttention>,
}

impl VaeMidBlock {
    fn load(vb: &Vb, c: usize, groups: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            resnets: (0..2).map(|j| ResnetBlock2D::load(&vb.pp("resnets").pp(j), c, c, None, groups, EPS)).collect::<Result<_>>()?,
            // diffusers: attention_head_dim = channels, i.e. one head.
            attentions: if attention { vec![SpatialAttention::load(&vb.pp("attentions").pp(0), c, c, groups, EPS)?] } else { vec![] },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        if let Some(a) = self.attentions.first() {
            x = a.forward(x);
        }
        self.resnets[1].forward(x, None)
    }
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets and an optional resampler.
#[derive(Module, Debug)]
pub struct VaeBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
    pub upsamplers: Vec<Upsample2D>,
}

/// The encoder plus `quant_conv`.
#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<VaeBlock>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub quant_conv: Option<Conv2d>,
}

/// `post_quant_conv` plus the decoder.
#[derive(Module, Debug)]
pub struct Decoder {
    pub post_quant_conv: Option<Conv2d>,
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<VaeBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// `AutoencoderKL`.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub scaling_factor: f64,
    pub latent_channels: usize,
}

impl AutoencoderKL {
    /// Load, accepting both attention spellings (see the module doc).
    pub fn load(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
            return Err(ModelError::Unsupported("VAE config: block types and block_out_channels differ in length".into()));
        }
        if cfg.down_block_types.iter().any(|t| t != "DownEncoderBlock2D") || cfg.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") {
            return Err(ModelError::Unsupported("VAE config: only DownEncoderBlock2D / UpDecoderBlock2D blocks".into()));
        }
        let (g, lat) = (cfg.norm_num_groups, cfg.latent_channels);
        let vb = w.root();

        // Encoder: conv_in, down blocks (last without downsampler), mid, norm, conv_out -> 2 * latent.
        let e = vb.pp("encoder");
        let mut down_blocks = vec![];
        let mut c_out = ch[0];
        for i in 0..n {
            let b = e.pp("down_blocks").pp(i);
            let c_in = c_out;
            c_out = ch[i];
            down_blocks.push(VaeBlock {
                resnets: (0..cfg.layers_per_block)
                    .map(|j| ResnetBlock2D::load(&b.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out, None, g, EPS))
                    .collect::<Result<_>>()?,
                downsamplers: if i + 1 < n { vec![Downsample2D::load(&b.pp("downsamplers").pp(0), c_out, 0)?] } else { vec![] },
                upsamplers: vec![],
            });
        }
        // The VAE is small: int8 residency (when asked) per half.
        let encoder = w.block(Encoder {
            conv_in: conv2d(&e.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::load(&e.pp("mid_block"), ch[n - 1], g, cfg.mid_block_add_attention)?,
            conv_norm_out: group_norm(&e.pp("conv_norm_out"), g, ch[n - 1], EPS)?,
            conv_out: conv2d(&e.pp("conv_out"), ch[n - 1], 2 * lat, 3, 1, 1)?,
            quant_conv: if cfg.use_quant_conv { Some(conv2d(&vb.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?) } else { None },
        });

        // Decoder: conv_in, mid, up blocks over reversed channels (layers + 1 resnets), norm, conv_out.
        let d = vb.pp("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = vec![];
        let mut c_out = rev[0];
        for i in 0..n {
            let b = d.pp("up_blocks").pp(i);
            let c_prev = c_out;
            c_out = rev[i];
            up_blocks.push(VaeBlock {
                resnets: (0..cfg.layers_per_block + 1)
                    .map(|j| ResnetBlock2D::load(&b.pp("resnets").pp(j), if j == 0 { c_prev } else { c_out }, c_out, None, g, EPS))
                    .collect::<Result<_>>()?,
                downsamplers: vec![],
                upsamplers: if i + 1 < n { vec![Upsample2D::load(&b.pp("upsamplers").pp(0), c_out)?] } else { vec![] },
            });
        }
        let decoder = w.block(Decoder {
            post_quant_conv: if cfg.use_post_quant_conv { Some(conv2d(&vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?) } else { None },
            conv_in: conv2d(&d.pp("conv_in"), lat, rev[0], 3, 1, 1)?,
            mid_block: VaeMidBlock::load(&d.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: group_norm(&d.pp("conv_norm_out"), g, ch[0], EPS)?,
            conv_out: conv2d(&d.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        });
        Ok(Self { encoder, decoder, scaling_factor: cfg.scaling_factor, latent_channels: lat })
    }

    /// Image in [-1, 1], [b, 3, H, W] -> (mean, logvar) of the latent distribution, [b, latent, H/8, W/8].
    pub fn encode(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let e = &self.encoder;
        let g = e.conv_norm_out.num_groups;
        let mut x = Chunked::new(x).conv(&e.conv_in, align(&e.conv_in, g));
        for block in &e.down_blocks {
            for r in &block.resnets {
                x = r.forward_chunked(x);
            }
            for dsm in &block.downsamplers {
                x = dsm.forward_chunked(x, align(&dsm.conv, g));
            }
        }
        let x = e.mid_block.forward(x.join());
        let mut x = e.conv_out.run(e.conv_norm_out.forward_silu(x));
        if let Some(q) = &e.quant_conv {
            x = q.run(x);
        }
        let [b, c, h, w] = x.dims();
        let half = c / 2;
        let mean = x.clone().slice([0..b, 0..half, 0..h, 0..w]);
        let logvar = x.slice([0..b, half..c, 0..h, 0..w]).clamp(-30.0, 20.0);
        (mean, logvar)
    }

    /// The distribution's mode (= mean): what InstructPix2Pix uses.
    pub fn encode_mode(&self, x: Tensor<4>) -> Tensor<4> {
        self.encode(x).0
    }

    /// Latent (unscaled) [b, latent, h, w] -> image in about [-1, 1], [b, 3, 8h, 8w].
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = Chunked::new(z);
        for stage in 0..self.decode_stages() {
            x = self.decode_stage(stage, x);
        }
        x.join()
    }

    /// [`decode`](Self::decode) runs in this many stages: the mid block (with `post_quant_conv`
    /// and `conv_in`), each up block, the output layers. A caller can wait for the device and hand
    /// free buffers back between them (the browser cannot inside one queued pass, see
    /// [`crate::memory`]).
    pub fn decode_stages(&self) -> usize {
        self.decoder.up_blocks.len() + 2
    }

    /// Stage `stage` of [`decode`](Self::decode); stage 0 takes the latent (`Chunked::new(z)`),
    /// the last returns the image.
    pub fn decode_stage(&self, stage: usize, x: Chunked) -> Chunked {
        let d = &self.decoder;
        let g = d.conv_norm_out.num_groups;
        match stage {
            0 => {
                let z = x.join();
                let z = match &d.post_quant_conv {
                    Some(c) => c.run(z),
                    None => z,
                };
                Chunked::new(d.mid_block.forward(d.conv_in.run(z)))
            }
            s if s <= d.up_blocks.len() => {
                let block = &d.up_blocks[s - 1];
                let mut x = x;
                for r in &block.resnets {
                    x = r.forward_chunked(x);
                }
                for u in &block.upsamplers {
                    x = u.forward_chunked(x, align(&u.conv, g));
                }
                x
            }
            _ => x.group_norm_silu(&d.conv_norm_out).conv(&d.conv_out, 1),
        }
    }
}

/// Channels per group of the GroupNorm (of `groups` groups) that reads `conv`'s output.
fn align(conv: &Conv2d, groups: usize) -> usize {
    (conv.weight.dims()[0] / groups).max(1)
}
