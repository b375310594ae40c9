//! diffusers `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (`models/resnet.py`, `downsampling.py`,
//! `upsampling.py`), shared by the UNet and the VAE.

use crate::nn::GroupNorm;
use crate::resident::Layer;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::Tensor;

use crate::error::Result;
use crate::nn::{conv2d, conv2d_padded, group_norm, linear};
use crate::weights::Vb;

/// `ResnetBlock2D` with `time_embedding_norm="default"`, `output_scale_factor=1`.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    /// Absent in the VAE (`temb_channels=None`).
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// 1x1 conv when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn load(vb: &Vb, c_in: usize, c_out: usize, temb: Option<usize>, groups: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(&vb.pp("norm1"), groups, c_in, eps)?,
            conv1: conv2d(&vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj: temb.map(|t| linear(&vb.pp("time_emb_proj"), t, c_out, true)).transpose()?,
            norm2: group_norm(&vb.pp("norm2"), groups, c_out, eps)?,
            conv2: conv2d(&vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out { Some(conv2d(&vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?) } else { None },
        })
    }

    /// x: [b, c_in, h, w]; temb_silu: `silu(temb)` [b, temb], the time embedding after the block's
    /// nonlinearity (the same for every block of a UNet: its caller applies it once).
    ///
    /// The projected time embedding is added in conv1's kernel (one value per image and channel)
    /// and the skip in conv2's ([`Layer::run_add`]).
    pub fn forward(&self, x: Tensor<4>, temb_silu: Option<&Tensor<2>>) -> Tensor<4> {
        let h = self.norm1.forward_silu(x.clone());
        let h = match (&self.time_emb_proj, temb_silu) {
            (Some(proj), Some(t)) => {
                let t = proj.run(t.clone());
                let [b, c] = t.dims();
                self.conv1.run_add(h, t.reshape([b, c, 1, 1]))
            }
            _ => self.conv1.run(h),
        };
        let skip = match &self.conv_shortcut {
            Some(c) => c.run(x),
            None => x,
        };
        self.conv2.run_add(self.norm2.forward_silu(h), skip)
    }
}

/// `Downsample2D(use_conv=True)`: a stride-2 3x3 conv. With `padding=0` (VAE) the input is first
/// padded by one on the right and bottom, as diffusers does.
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    pub fn load(vb: &Vb, channels: usize, padding: usize) -> Result<Self> {
        let pad = if padding == 0 { PaddingConfig2d::Explicit(0, 0, 1, 1) } else { PaddingConfig2d::Explicit(padding, padding, padding, padding) };
        Ok(Self { conv: conv2d_padded(&vb.pp("conv"), channels, channels, 3, 2, pad, true)? })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.run(x)
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour upsampling (x2, or to the skip's size) and a 3x3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: &Vb, channels: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(&vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([h * 2, w * 2]);
        let x = interpolate(x, InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size));
        self.conv.run(x)
    }
}
