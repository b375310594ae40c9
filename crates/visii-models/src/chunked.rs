//! Activations kept as channel slices, so no single GPU buffer exceeds the buffer budget
//! ([`max_buffer_bytes`]). The VAE's full-resolution stages are the largest tensors of the whole
//! pipeline: at 512 x 512 the decoder's last upsampler writes 256 channels x 512 x 512 f32 =
//! 256 MiB, twice WebGPU's guaranteed storage binding (128 MiB). Every VAE layer outside the
//! attention is local in channels or sums over them, so it runs exactly on slices:
//! - GroupNorm on slices that hold whole groups (its statistics are per group),
//! - SiLU, nearest upsampling and residual sums per slice,
//! - a convolution as, per output slice, the sum over input slices of the convolution with the
//!   matching block of the kernel (plus the bias once).
//!
//! A slice plan is the smallest number of group-aligned slices whose bytes fit the budget; where a
//! tensor fits, the plan is one slice and the layers run the plain modules on it (the same
//! kernels as without this module).

use std::ops::Range;

use crate::resident::Layer;
use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::Tensor;

use crate::nn::{max_buffer_bytes, GroupNorm};
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

/// Channel ranges for a `[b, channels, h, w]` f32 tensor: slices of whole `align`-channel groups,
/// each within the budget where one group fits it (else one group per slice).
pub fn plan(b: usize, channels: usize, h: usize, w: usize, align: usize) -> Vec<Range<usize>> {
    let align = align.max(1);
    let group_bytes = (b * align * h * w * 4) as u64;
    let per = ((max_buffer_bytes() / group_bytes.max(1)) as usize).max(1) * align;
    (0..channels).step_by(per).map(|c| c..(c + per).min(channels)).collect()
}

/// A `[b, c, h, w]` activation as consecutive channel slices.
#[derive(Debug, Clone)]
pub struct Chunked {
    parts: Vec<Tensor<4>>,
}

impl Chunked {
    pub fn new(x: Tensor<4>) -> Self {
        Self { parts: vec![x] }
    }

    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// [b, c, h, w] of the whole.
    pub fn dims(&self) -> [usize; 4] {
        let [b, _, h, w] = self.parts[0].dims();
        [b, self.parts.iter().map(|p| p.dims()[1]).sum(), h, w]
    }

    fn ranges(&self) -> Vec<Range<usize>> {
        let mut c = 0;
        self.parts
            .iter()
            .map(|p| {
                let n = p.dims()[1];
                c += n;
                c - n..c
            })
            .collect()
    }

    /// The first channel slice (all of it where the tensor fits one buffer).
    pub fn first(&self) -> &Tensor<4> {
        &self.parts[0]
    }

    /// The whole tensor (one buffer).
    pub fn join(self) -> Tensor<4> {
        if self.parts.len() == 1 {
            self.parts.into_iter().next().unwrap()
        } else {
            Tensor::cat(self.parts, 1)
        }
    }

    /// The same values, sliced as `plan` says.
    pub fn resliced(self, plan: &[Range<usize>]) -> Self {
        let have = self.ranges();
        if have == plan {
            return self;
        }
        let [b, _, h, w] = self.dims();
        let parts = plan
            .iter()
            .map(|want| {
                let pieces: Vec<Tensor<4>> = have
                    .iter()
                    .zip(&self.parts)
                    .filter(|(r, _)| r.start < want.end && want.start < r.end)
                    .map(|(r, p)| {
                        let (a, z) = (want.start.max(r.start), want.end.min(r.end));
                        if a == r.start && z == r.end {
                            p.clone()
                        } else {
                            p.clone().slice([0..b, a - r.start..z - r.start, 0..h, 0..w])
                        }
                    })
                    .collect();
                if pieces.len() == 1 {
                    pieces.into_iter().next().unwrap()
                } else {
                    Tensor::cat(pieces, 1)
                }
            })
            .collect();
        Self { parts }
    }

    fn map(self, f: impl Fn(Tensor<4>) -> Tensor<4>) -> Self {
        Self { parts: self.parts.into_iter().map(f).collect() }
    }

    fn add(self, other: Self) -> Self {
        let other = other.resliced(&self.ranges());
        Self { parts: self.parts.into_iter().zip(other.parts).map(|(a, b)| a + b).collect() }
    }

    /// `GroupNorm` then SiLU on group-aligned slices (one pass each on our kernels).
    pub fn group_norm_silu(self, gn: &GroupNorm) -> Self {
        let [b, c, h, w] = self.dims();
        let cpg = c / gn.num_groups;
        let x = self.resliced(&plan(b, c, h, w, cpg));
        if x.parts.len() == 1 {
            return x.map(|t| gn.forward_silu(t));
        }
        let parts = x.ranges().into_iter().zip(x.parts).map(|(r, t)| gn.channels(r).forward_silu(t)).collect();
        Self { parts }
    }

    /// A convolution, output sliced for a following GroupNorm of `align` channels per group.
    pub fn conv(self, conv: &Conv2d, align: usize) -> Self {
        // As every other Conv2d / Linear does (`crate::resident::Layer`): in the browser, hand
        // back free buffers and note what the allocator holds before each layer.
        crate::memory::tidy(&self.parts[0].device());
        let [b, _, h, w] = self.dims();
        let c_out = conv.weight.dims()[0];
        let (ho, wo) = conv_out_hw(conv, h, w);
        let out = plan(b, c_out, ho, wo, align);
        if out.len() == 1 && self.parts.len() == 1 {
            return self.map(|t| conv.run(t));
        }
        let ins = self.ranges();
        // Once: with int8-resident weights (`crate::resident`) `val()` dequantises.
        let weight = conv.weight.val();
        let [_, _, kh, kw] = weight.dims();
        let parts = out
            .iter()
            .map(|o| {
                let mut acc: Option<Tensor<4>> = None;
                for (k, (i, x)) in ins.iter().zip(&self.parts).enumerate() {
                    let mut part = conv.clone();
                    part.weight = Param::from_tensor(weight.clone().slice([o.clone(), i.clone(), 0..kh, 0..kw]));
                    part.bias = if k == 0 { conv.bias.as_ref().map(|bias| Param::from_tensor(bias.val().slice([o.clone()]))) } else { None };
                    let y = part.run(x.clone());
                    acc = Some(match acc {
                        Some(a) => a + y,
                        None => y,
                    });
                }
                acc.expect("at least one input slice")
            })
            .collect();
        Self { parts }
    }

    /// Nearest-neighbour upsampling x2, slices sized for the output.
    pub fn upsample2(self, align: usize) -> Self {
        let [b, c, h, w] = self.dims();
        let opts = InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]);
        self.resliced(&plan(b, c, 2 * h, 2 * w, align)).map(|t| interpolate(t, opts.clone()))
    }
}

/// Output height and width of `conv` on an `h` x `w` input.
fn conv_out_hw(conv: &Conv2d, h: usize, w: usize) -> (usize, usize) {
    let ([kh, kw], [sh, sw], [dh, dw]) = (conv.kernel_size, conv.stride, conv.dilation);
    let (pt, pl, pb, pr) = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) => (t, l, b, r),
        PaddingConfig2d::Valid => (0, 0, 0, 0),
        PaddingConfig2d::Same => return (h.div_ceil(sh), w.div_ceil(sw)),
    };
    ((h + pt + pb - dh * (kh - 1) - 1) / sh + 1, (w + pl + pr - dw * (kw - 1) - 1) / sw + 1)
}

impl ResnetBlock2D {
    /// `forward` without a time embedding, on channel slices (the VAE's blocks).
    pub fn forward_chunked(&self, x: Chunked) -> Chunked {
        let c_out = self.conv2.weight.dims()[0];
        let align = c_out / self.norm2.num_groups;
        let h = x.clone().group_norm_silu(&self.norm1).conv(&self.conv1, align);
        let h = h.group_norm_silu(&self.norm2).conv(&self.conv2, align);
        let skip = match &self.conv_shortcut {
            Some(c) => x.conv(c, align),
            None => x,
        };
        skip.add(h)
    }
}

impl Upsample2D {
    /// `forward` (x2) on channel slices; `align`: channels per group of the next GroupNorm.
    pub fn forward_chunked(&self, x: Chunked, align: usize) -> Chunked {
        x.upsample2(align).conv(&self.conv, align)
    }
}

impl Downsample2D {
    pub fn forward_chunked(&self, x: Chunked, align: usize) -> Chunked {
        x.conv(&self.conv, align)
    }
}
