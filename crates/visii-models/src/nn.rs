//! Layer loaders (weights by state-dict name -> burn modules) and the attention shared by every
//! network. PyTorch stores Linear weights as [out, in]; burn wants [in, out]: transposed on load.

use burn::module::Module;
use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use std::sync::atomic::{AtomicU64, Ordering};

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
    let weight = Param::from_tensor(crate::weights::persistent(vb.device(), TensorData::new(t, [d_in, d_out]), |d, dev| Tensor::from_data(d, dev)));
    let bias = if bias { Some(Param::from_tensor(vb.get("bias", [d_out])?)) } else { None };
    Ok(Linear { weight, bias })
}

/// `torch.nn.Conv2d(c_in, c_out, k, stride, padding)` with bias, at `vb`.
pub fn conv2d(vb: &Vb, c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    conv2d_padded(vb, c_in, c_out, k, stride, PaddingConfig2d::Explicit(padding, padding, padding, padding), true)
}

/// Conv2d with an explicit (possibly asymmetric) padding and optional bias.
pub fn conv2d_padded(vb: &Vb, c_in: usize, c_out: usize, k: usize, stride: usize, padding: PaddingConfig2d, bias: bool) -> Result<Conv2d> {
    let weight = Param::from_tensor(vb.get("weight", [c_out, c_in, k, k])?);
    let bias = if bias { Some(Param::from_tensor(vb.get("bias", [c_out])?)) } else { None };
    Ok(Conv2d { weight, bias, stride: [stride, stride], kernel_size: [k, k], dilation: [1, 1], groups: 1, padding })
}

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)` at `vb`.
pub fn group_norm(vb: &Vb, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    if groups == 0 || channels % groups != 0 {
        return Err(crate::ModelError::Unsupported(format!("group norm {}: {channels} channels cannot be split into {groups} groups", vb.prefix())));
    }
    Ok(GroupNorm {
        gamma: Param::from_tensor(vb.get("weight", [channels])?),
        beta: Param::from_tensor(vb.get("bias", [channels])?),
        num_groups: groups,
        epsilon: eps,
    })
}

/// Longest axis one `mean_dim` call reduces here. burn 0.22's wgpu `sum_dim` / `mean_dim` / `mean`
/// only take the first 262144 elements of a longer axis into account (measured on lavapipe; see the
/// `long_reductions` test), and a VAE group at 512 px holds 4 x 512 x 512 values.
pub const REDUCE_CHUNK: usize = 1 << 16;

/// Mean over the last axis of [a, b, n], reduced in slices of at most `REDUCE_CHUNK` values.
pub fn mean_last(x: Tensor<3>) -> Tensor<3> {
    let [a, b, n] = x.dims();
    if n <= REDUCE_CHUNK {
        return x.mean_dim(2);
    }
    // The smallest number of equal slices that are short enough.
    let mut k = n.div_ceil(REDUCE_CHUNK);
    while n % k != 0 {
        k += 1;
    }
    let partial = x.reshape([a * b, k, n / k]).mean_dim(2).reshape([a, b, k]);
    mean_last(partial)
}

/// `f(x)` computed in f32 when `x` is in a narrower float type (f16 activations), the result
/// given `x`'s type back: for statistics (norms) and softmax, whose sums lose too much in f16.
pub fn in_f32<const D: usize>(x: Tensor<D>, f: impl FnOnce(Tensor<D>) -> Tensor<D>) -> Tensor<D> {
    match x.dtype() {
        DType::F32 => f(x),
        dt => f(x.cast(FloatDType::F32)).cast(FloatDType::from(dt)),
    }
}

/// `norm.forward(x)` (statistics in f32, see [`in_f32`]).
pub fn layer_norm_run<const D: usize>(norm: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    norm.forward(x)
}

/// diffusers' GEGLU activation of the projection's output `h` `[b, n, 2F]`: `hidden * gelu(gate)`
/// (the exact GELU) with `hidden, gate = h.chunk(2, -1)`, `[b, n, F]`. One kernel on a cubecl device
/// (a fused step inside autodiff), burn's ops elsewhere.
pub fn geglu(h: Tensor<3>) -> Tensor<3> {
    #[cfg(feature = "frozen")]
    let h = match crate::kernels::geglu(h) {
        Ok(y) => return y,
        Err(h) => match crate::fused::geglu(h) {
            Ok(y) => return y,
            Err(h) => h,
        },
    };
    let [b, n, two_f] = h.dims();
    let half = two_f / 2;
    let hidden = h.clone().slice([0..b, 0..n, 0..half]);
    let gate = h.slice([0..b, 0..n, half..half * 2]);
    hidden * gelu(gate)
}

/// The exact GELU, `x Φ(x) = x (1 + erf(x / √2)) / 2` (PyTorch's default), written with `erf` so that
/// autodiff differentiates it exactly: burn's `gelu` computes the same values, but its backward is the
/// derivative of the tanh approximation (up to ~1e-3 off), where PyTorch's autograd is exact. Inside
/// autodiff it keeps three tensors of `x`'s size where burn's kept one; the UNet's GEGLU takes the
/// fused step instead ([`geglu`]), so this costs only CLIP models with `hidden_act = "gelu"` (not
/// InstructPix2Pix's, whose CLIP uses quick_gelu) and backends without our kernels.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * x.div_scalar(std::f64::consts::SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5)
}

/// `torch.nn.LayerNorm(dim, eps)` over the last axis (burn's, with its epsilon readable: our
/// kernel needs it).
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    pub epsilon: f64,
}

impl LayerNorm {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        #[cfg(feature = "frozen")]
        let x = match crate::kernels::layer_norm(x, &self.gamma.val(), &self.beta.val(), self.epsilon) {
            Ok(y) => return y,
            Err(x) => match crate::fused::group_norm(x, &self.gamma.val(), &self.beta.val(), 1, self.epsilon, false, true) {
                Ok(y) => return y,
                Err(x) => x,
            },
        };
        in_f32(x, |x| burn::tensor::module::layer_norm(x, self.gamma.val(), Some(self.beta.val()), self.epsilon))
    }
}

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)`, with long-axis-safe statistics (in
/// f32 for f16 activations).
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    pub num_groups: usize,
    pub epsilon: f64,
}

impl GroupNorm {
    /// [b, c, ...] -> [b, c, ...].
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.run(x, false)
    }

    /// `silu(self.forward(x))`, fused into the normalisation on our kernels.
    pub fn forward_silu<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.run(x, true)
    }

    fn run<const D: usize>(&self, x: Tensor<D>, silu: bool) -> Tensor<D> {
        #[cfg(feature = "frozen")]
        let x = match crate::kernels::group_norm(x, &self.gamma.val(), &self.beta.val(), self.num_groups, self.epsilon, silu) {
            Ok(y) => return y,
            Err(x) => match crate::fused::group_norm(x, &self.gamma.val(), &self.beta.val(), self.num_groups, self.epsilon, silu, false) {
                Ok(y) => return y,
                Err(x) => x,
            },
        };
        let y = in_f32(x, |x| self.forward_f32(x));
        if silu {
            burn::tensor::activation::silu(y)
        } else {
            y
        }
    }

    fn forward_f32<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let g = self.num_groups;
        let xg = x.reshape([b, g, c / g * spatial]);
        let centered = xg.clone() - mean_last(xg);
        let var = mean_last(centered.clone().powi_scalar(2));
        let normed = centered.div(var.add_scalar(self.epsilon).sqrt()).reshape([b, c, spatial]);
        let y = normed * self.gamma.val().reshape([1, c, 1]) + self.beta.val().reshape([1, c, 1]);
        y.reshape(dims)
    }

    /// The same normalisation for channels `r` alone (`r` must hold whole groups).
    pub fn channels(&self, r: std::ops::Range<usize>) -> GroupNorm {
        let c = self.gamma.dims()[0];
        let cpg = c / self.num_groups;
        assert!(r.start % cpg == 0 && r.end % cpg == 0 && r.end <= c, "group norm slice {r:?} does not hold whole groups of {cpg}");
        GroupNorm {
            gamma: Param::from_tensor(self.gamma.val().slice([r.clone()])),
            beta: Param::from_tensor(self.beta.val().slice([r.clone()])),
            num_groups: (r.end - r.start) / cpg,
            epsilon: self.epsilon,
        }
    }
}

/// `torch.nn.LayerNorm(dim, eps)` at `vb`.
pub fn layer_norm(vb: &Vb, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm { gamma: Param::from_tensor(vb.get("weight", [dim])?), beta: Param::from_tensor(vb.get("bias", [dim])?), epsilon: eps })
}

/// The largest GPU buffer the models create on purpose (attention scores, embedding-table chunks),
/// in bytes. WebGPU guarantees 128 MiB storage bindings (`maxStorageBufferBindingSize`); an app that
/// got larger limits from its adapter may raise it, tests lower it.
static MAX_BUFFER_BYTES: AtomicU64 = AtomicU64::new(128 << 20);

pub fn set_max_buffer_bytes(bytes: u64) {
    MAX_BUFFER_BYTES.store(bytes.max(1 << 16), Ordering::Relaxed);
}

pub fn max_buffer_bytes() -> u64 {
    MAX_BUFFER_BYTES.load(Ordering::Relaxed)
}

/// How many query rows of attention to compute at once so the scores `[b, heads, rows, m]` stay
/// within half the buffer budget (diffusers' "attention slicing", by query rows: exact, since
/// softmax is per row).
pub fn attention_rows(b: usize, heads: usize, n: usize, m: usize) -> usize {
    let row_bytes = (b * heads * m * 4).max(1) as u64;
    ((max_buffer_bytes() / 2 / row_bytes) as usize).clamp(1, n.max(1))
}

/// Softmax over the last axis of `[b, heads, rows, m]`: on our kernel where it applies (f32 or
/// f16 scores, summed in f32), else burn's in f32 (see [`in_f32`]).
fn softmax_last(s: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "frozen")]
    let s = match crate::kernels::softmax(s) {
        Ok(y) => return y,
        Err(s) => s,
    };
    in_f32(s, |s| softmax(s, 3))
}

/// Scaled dot-product attention over `[b, n, heads * d]` inputs; `causal` masks future positions.
/// Long sequences are computed in slices of query rows ([`attention_rows`]).
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, causal: bool) -> Tensor<3> {
    // Our fused kernel where it applies (cubecl, f32 or f16, head dim <= 160): outside autodiff, and in
    // learning as one autodiff step whose backward recomputes the weights (`fused.rs`).
    #[cfg(feature = "frozen")]
    let (q, k, v) = match crate::kernels::attention(q, k, v, heads, causal) {
        Ok(o) => return o,
        Err((q, k, v)) => match crate::fused::attention(q, k, v, heads, causal) {
            Ok(o) => return o,
            Err(t) => t,
        },
    };
    let [b, n, inner] = q.dims();
    let m = k.dims()[1];
    let d = inner / heads;
    let split = |x: Tensor<3>, len: usize| x.reshape([b, len, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, n), split(k, m), split(v, m));
    let kt = k.swap_dims(2, 3);
    let rows = attention_rows(b, heads, n, m);
    let part = |q: Tensor<4>, from: usize| {
        let r = q.dims()[2];
        let mut scores = q.matmul(kt.clone()).mul_scalar((d as f64).powf(-0.5));
        if causal {
            // burn's tril_mask is true *outside* the lower triangle: exactly the future positions.
            let mask = Tensor::<2, burn::tensor::Bool>::tril_mask([n, m], 0, &scores.device()).slice([from..from + r, 0..m]);
            scores = scores.mask_fill(mask.unsqueeze::<4>().expand([b, heads, r, m]), f32::NEG_INFINITY);
        }
        softmax_last(scores).matmul(v.clone())
    };
    let out = if rows >= n {
        part(q, 0)
    } else {
        let parts = (0..n).step_by(rows).map(|a| part(q.clone().slice([0..b, 0..heads, a..(a + rows).min(n), 0..d]), a)).collect();
        Tensor::cat(parts, 2)
    };
    out.swap_dims(1, 2).reshape([b, n, inner])
}
