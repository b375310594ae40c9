//! Layer loaders (weights by state-dict name -> burn modules) and the attention shared by every
//! network. PyTorch stores Linear weights as [out, in]; burn wants [in, out]: transposed on load.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, LayerNormConfig, Linear, PaddingConfig2d};
use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};

use crate::error::Result;
use crate::weights::Vb;

/// `torch.nn.Linear(d_in, d_out, bias)` at `vb`.
pub fn linear(vb: &Vb, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
    let w = vb.values("weight", &[d_out, d_in])?;
    let mut t = vec![0f32; w.len()];
    for o in 0..d_out {
        for i in 0..d_in {
            t[i * d_out + o] = w[o * d_in + i];
        }
    }
    let weight = Param::from_tensor(Tensor::from_data(TensorData::new(t, [d_in, d_out]), vb.device()));
    let bias = if bias { Some(Param::from_tensor(vb.get("bias", [d_out])?)) } else { None };
    Ok(Linear { weight, bias })
}

/// `torch.nn.Conv2d(c_in, c_out, k, stride, padding)` with bias, at `vb`.
pub fn conv2d(vb: &Vb, c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    conv2d_padded(vb, c_in, c_out, k, stride, PaddingConfig2d::Explicit(padding, padding, padding, padding), true)
}

/// Conv2d with an explicit (possibly asymmetric) padding and optional bias.
pub fn conv2d_padded(
    vb: &Vb,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: PaddingConfig2d,
    bias: bool,
) -> Result<Conv2d> {
    let weight = Param::from_tensor(vb.get("weight", [c_out, c_in, k, k])?);
    let bias = if bias { Some(Param::from_tensor(vb.get("bias", [c_out])?)) } else { None };
    Ok(Conv2d { weight, bias, stride: [stride, stride], kernel_size: [k, k], dilation: [1, 1], groups: 1, padding })
}

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)` at `vb`.
pub fn group_norm(vb: &Vb, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    if groups == 0 || channels % groups != 0 {
        return Err(crate::ModelError::Unsupported(format!(
            "group norm {}: {channels} channels cannot be split into {groups} groups",
            vb.prefix()
        )));
    }
    Ok(GroupNorm {
        gamma: Some(Param::from_tensor(vb.get("weight", [channels])?)),
        beta: Some(Param::from_tensor(vb.get("bias", [channels])?)),
        num_groups: groups,
        num_channels: channels,
        epsilon: eps,
        affine: true,
    })
}

/// `torch.nn.LayerNorm(dim, eps)` at `vb`.
pub fn layer_norm(vb: &Vb, dim: usize, eps: f64) -> Result<LayerNorm> {
    let mut ln = LayerNormConfig::new(dim).with_epsilon(eps).init(vb.device());
    ln.gamma = Param::from_tensor(vb.get("weight", [dim])?);
    ln.beta = Some(Param::from_tensor(vb.get("bias", [dim])?));
    Ok(ln)
}

/// Scaled dot-product attention over heads. q: [b, n, h*d], k/v: [b, m, h*d] -> [b, n, h*d].
/// `causal` masks future positions (CLIP text).
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, causal: bool) -> Tensor<3> {
    let [b, n, inner] = q.dims();
    let m = k.dims()[1];
    let d = inner / heads;
    let split = |x: Tensor<3>, len: usize| x.reshape([b, len, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, n), split(k, m), split(v, m));
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((d as f64).powf(-0.5));
    if causal {
        // burn's tril_mask is true *outside* the lower triangle: exactly the future positions.
        let mask = Tensor::<2, burn::tensor::Bool>::tril_mask([n, m], 0, &scores.device());
        scores = scores.mask_fill(mask.unsqueeze::<4>().expand([b, heads, n, m]), f32::NEG_INFINITY);
    }
    let probs = softmax(scores, 3);
    probs.matmul(v).swap_dims(1, 2).reshape([b, n, inner])
}
