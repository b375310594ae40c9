//! diffusers `Attention` (`attention_processor.py`), `BasicTransformerBlock` (`attention.py`) and
//! `Transformer2DModel` for continuous inputs (`transformer_2d.py`).

use crate::nn::GroupNorm;
use crate::nn::LayerNorm;
use crate::resident::Layer;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::tensor::Tensor;

use crate::error::{ModelError, Result};
use crate::nn::{attention, conv2d, group_norm, layer_norm, layer_norm_run, linear};
use crate::weights::Vb;

/// `Attention`: q from the query states, k/v from the context (itself for self-attention).
#[derive(Module, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out.0` (the `.1` is dropout).
    pub to_out: Vec<Linear>,
    pub heads: usize,
}

impl Attention {
    /// `bias` applies to q/k/v (the UNet has none, the VAE has them); `to_out.0` always has one.
    pub fn load(vb: &Vb, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize, bias: bool) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear(&vb.pp("to_q"), query_dim, inner, bias)?,
            to_k: linear(&vb.pp("to_k"), context_dim, inner, bias)?,
            to_v: linear(&vb.pp("to_v"), context_dim, inner, bias)?,
            to_out: vec![linear(&vb.pp("to_out").pp(0), inner, query_dim, true)?],
            heads,
        })
    }

    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let ctx = context.unwrap_or_else(|| x.clone());
        let kv = self.project(ctx);
        self.forward_projected(x, &kv)
    }

    /// The keys and values of `context`, as [`Self::forward`] computes them.
    pub fn project(&self, context: Tensor<3>) -> Kv {
        Kv { k: self.to_k.run(context.clone()), v: self.to_v.run(context) }
    }

    /// [`Self::forward`] with the context's keys and values already projected ([`Self::project`]):
    /// the same values.
    pub fn forward_projected(&self, x: Tensor<3>, kv: &Kv) -> Tensor<3> {
        self.to_out[0].run(self.attend(x, kv))
    }

    /// `residual + self.forward_projected(x, kv)`, the residual added in `to_out`'s kernel.
    pub fn forward_projected_add(&self, x: Tensor<3>, kv: &Kv, residual: Tensor<3>) -> Tensor<3> {
        self.to_out[0].run_add(self.attend(x, kv), residual)
    }

    /// `residual + self.forward(x, context)`, the residual added in `to_out`'s kernel.
    pub fn forward_add(&self, x: Tensor<3>, context: Option<Tensor<3>>, residual: Tensor<3>) -> Tensor<3> {
        let ctx = context.unwrap_or_else(|| x.clone());
        let kv = self.project(ctx);
        self.forward_projected_add(x, &kv, residual)
    }

    /// The attention's output before `to_out`.
    fn attend(&self, x: Tensor<3>, kv: &Kv) -> Tensor<3> {
        attention(self.to_q.run(x), kv.k.clone(), kv.v.clone(), self.heads, false)
    }
}

/// A context's keys and values for one attention layer ([`Attention::project`]).
#[derive(Clone, Debug)]
pub struct Kv {
    pub k: Tensor<3>,
    pub v: Tensor<3>,
}

/// What the cross-attentions of a UNet read: the text states, or the keys and values every
/// cross-attention layer projects from them, in the order the forward pass visits the layers
/// (projected once per apply: the text does not change between sampling steps).
pub enum TextContext<'a> {
    States(&'a Tensor<3>),
    Projected(std::slice::Iter<'a, Kv>),
}

impl TextContext<'_> {
    /// `residual + cross-attention(x)` (the residual added in `to_out`'s kernel).
    fn cross_attention_add(&mut self, attn: &Attention, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        match self {
            TextContext::States(c) => attn.forward_add(x, Some((*c).clone()), residual),
            TextContext::Projected(kv) => {
                attn.forward_projected_add(x, kv.next().expect("projected text states for every cross-attention layer"), residual)
            }
        }
    }
}

/// The VAE mid-block attention: group norm, single-head attention over pixels, residual.
#[derive(Module, Debug)]
pub struct SpatialAttention {
    pub group_norm: GroupNorm,
    pub attn: Attention,
}

impl SpatialAttention {
    pub fn load(vb: &Vb, channels: usize, head_dim: usize, groups: usize, eps: f64) -> Result<Self> {
        if head_dim == 0 || channels % head_dim != 0 {
            return Err(ModelError::Unsupported(format!("VAE attention: {channels} channels, head dim {head_dim}")));
        }
        Ok(Self {
            group_norm: group_norm(&vb.pp("group_norm"), groups, channels, eps)?,
            attn: Attention::load(vb, channels, channels, channels / head_dim, head_dim, true)?,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let y = self.group_norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let y = self.attn.forward(y, None);
        x + y.swap_dims(1, 2).reshape([b, c, h, w])
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` -> (hidden, gate) -> hidden * gelu(gate) -> `net.2`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub geglu_proj: Linear,
    pub out: Linear,
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each pre-norm + residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(vb: &Vb, dim: usize, heads: usize, head_dim: usize, cross_dim: usize) -> Result<Self> {
        let inner_ff = dim * 4;
        Ok(Self {
            norm1: layer_norm(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: layer_norm(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, cross_dim, heads, head_dim, false)?,
            norm3: layer_norm(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward {
                geglu_proj: linear(&vb.pp("ff.net.0.proj"), dim, inner_ff * 2, true)?,
                out: linear(&vb.pp("ff.net.2"), inner_ff, dim, true)?,
            },
        })
    }

    pub fn forward(&self, x: Tensor<3>, context: &Tensor<3>) -> Tensor<3> {
        self.forward_text(x, &mut TextContext::States(context))
    }

    /// [`Self::forward`] with the text as [`TextContext`]. Each residual is added in the kernel of
    /// the layer before it (`to_out`, `ff.net.2`).
    pub fn forward_text(&self, x: Tensor<3>, text: &mut TextContext) -> Tensor<3> {
        let x = self.attn1.forward_add(layer_norm_run(&self.norm1, x.clone()), None, x);
        let x = text.cross_attention_add(&self.attn2, layer_norm_run(&self.norm2, x.clone()), x);
        let h = self.ff.geglu_proj.run(layer_norm_run(&self.norm3, x.clone()));
        self.ff.out.run_add(crate::nn::geglu(h), x)
    }
}

/// `proj_in` / `proj_out`: a 1x1 conv (SD1.x) or a linear layer (`use_linear_projection`, SD2.x).
#[derive(Module, Debug)]
pub struct Projection {
    pub conv: Option<Conv2d>,
    pub linear: Option<Linear>,
}

impl Projection {
    fn load(vb: &Vb, c_in: usize, c_out: usize, use_linear: bool) -> Result<Self> {
        Ok(if use_linear {
            Self { conv: None, linear: Some(linear(vb, c_in, c_out, true)?) }
        } else {
            Self { conv: Some(conv2d(vb, c_in, c_out, 1, 1, 0)?), linear: None }
        })
    }
}

/// `Transformer2DModel` (continuous input): group norm, proj_in, transformer blocks, proj_out, residual.
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2DModel {
    #[allow(clippy::too_many_arguments)]
    pub fn load(vb: &Vb, channels: usize, heads: usize, cross_dim: usize, groups: usize, layers: usize, use_linear: bool) -> Result<Self> {
        if heads == 0 || channels % heads != 0 {
            return Err(ModelError::Unsupported(format!("{}: {channels} channels are not divisible by {heads} attention heads", vb.prefix())));
        }
        let head_dim = channels / heads;
        Ok(Self {
            norm: group_norm(&vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Projection::load(&vb.pp("proj_in"), channels, channels, use_linear)?,
            transformer_blocks: (0..layers)
                .map(|i| BasicTransformerBlock::load(&vb.pp("transformer_blocks").pp(i), channels, heads, head_dim, cross_dim))
                .collect::<Result<_>>()?,
            proj_out: Projection::load(&vb.pp("proj_out"), channels, channels, use_linear)?,
        })
    }

    pub fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        self.forward_text(x, &mut TextContext::States(context))
    }

    /// The keys and values of `context` for each block's cross-attention, in order.
    pub fn project_text(&self, context: &Tensor<3>) -> impl Iterator<Item = Kv> + '_ {
        let context = context.clone();
        self.transformer_blocks.iter().map(move |b| b.attn2.project(context.clone()))
    }

    /// [`Self::forward`] with the text as [`TextContext`].
    pub fn forward_text(&self, x: Tensor<4>, text: &mut TextContext) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let mut y = self.norm.forward(x);
        // The sequence is read by the first block's norm and, as its residual, by `to_out`'s GEMM:
        // made contiguous once, not copied by each.
        let to_seq = |t: Tensor<4>| crate::fused::contiguous(t.reshape([b, c, h * w]).swap_dims(1, 2));
        let mut s = match (&self.proj_in.conv, &self.proj_in.linear) {
            (Some(conv), _) => {
                y = conv.run(y);
                to_seq(y)
            }
            (None, Some(lin)) => lin.run(to_seq(y)),
            _ => unreachable!("projection has a conv or a linear layer"),
        };
        for block in &self.transformer_blocks {
            s = block.forward_text(s, text);
        }
        match (&self.proj_out.conv, &self.proj_out.linear) {
            // The residual added in the conv's kernel; after a linear projection it is in the
            // sequence layout, so added after.
            (Some(conv), _) => conv.run_add(s.swap_dims(1, 2).reshape([b, c, h, w]), residual),
            (None, Some(lin)) => lin.run(s).swap_dims(1, 2).reshape([b, c, h, w]) + residual,
            _ => unreachable!("projection has a conv or a linear layer"),
        }
    }
}
