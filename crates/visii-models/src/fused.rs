//! Attention inside learning's autodiff: the fused forward (`kernels::attention_cube`, no score
//! tensor) as one autodiff step whose backward recomputes the attention weights slice by slice.
//!
//! burn's chain (`q kᵀ`, scale, softmax, `· v`) records four steps and keeps the scores and the
//! weights (`[b, heads, n, m]` each) of every attention layer until the backward pass; this step
//! keeps only `q`, `k` and `v` (`[b, n, heads · d]`, which the backward needs anyway) and, per
//! slice of query rows (`nn::attention_rows`, within the buffer budget), recomputes
//! `P = softmax(s q kᵀ)` and takes
//!
//! ```text
//! dV += Pᵀ dO      dP = dO vᵀ      dS = P ∘ (dP - rowsum(P ∘ dP))
//! dQ  = s dS k     dK += s dSᵀ q
//! ```
//!
//! (`rowsum(P ∘ dP)` equals `rowsum(dO ∘ O)`, so the output need not be kept either). Masked
//! (causal) positions have `P = 0` and get no gradient. Runs where the fused forward applies (f32
//! on a cubecl device, head dims the kernel takes); anything else hands its inputs back for burn's
//! chain.

use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_backend::{BackendTypes, TensorMetadata};
use burn_dispatch::backends::{Autodiff, Cube};
use burn_dispatch::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind, GradientCheckpointingStrategy};
use std::sync::atomic::{AtomicU8, Ordering};

type Float = <Cube as BackendTypes>::FloatTensorPrimitive;
type AutodiffTensor = <Autodiff<Cube> as BackendTypes>::FloatTensorPrimitive;

/// 0: not yet read from the environment, 1: on, 2: off.
static FUSED_GRAD: AtomicU8 = AtomicU8::new(0);

/// Whether attention inside autodiff (learning) runs as this fused step: off by default for now
/// (`VISII_FLASH_GRAD=on`, the page's `?flashGrad=on`: on). On the CPU adapters it measured slower
/// than burn's chain (tiny model, learning step: lavapipe at 16 x 16 latents 5.67 s against 5.30,
/// SwiftShader at 8 x 8 3.08 against 2.21; BENCHMARKS.md); what it saves is memory, the scores
/// and weights of every attention layer, which on a GPU at full size is the larger part of a
/// learning step's activations. Needs the fused forward on ([`crate::kernels::flash_enabled`]).
pub fn enabled() -> bool {
    crate::kernels::switch_with(&FUSED_GRAD, "VISII_FLASH_GRAD", |v| v == Some("on"), false)
        && crate::kernels::flash_enabled()
        && crate::kernels::enabled()
}

/// Turns the fused attention step of learning on or off for this process.
pub fn set_enabled(on: bool) {
    FUSED_GRAD.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// The attention step; its state: `q`, `k`, `v` and (heads, causal).
#[derive(Debug)]
struct FusedAttention;

impl Backward<Cube, 3> for FusedAttention {
    type State = (Float, Float, Float, Float, Float, usize, bool);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, k, v, o, lse, heads, causal) = ops.state;
        let grad = grads.consume::<Cube>(&ops.node);
        let [pq, pk, pv] = ops.parents;
        if pq.is_none() && pk.is_none() && pv.is_none() {
            return;
        }
        let fused = if recompute() {
            Err(())
        } else {
            crate::kernels::attention_grads_cube(q.clone(), k.clone(), v.clone(), o, lse, grad.clone(), heads, causal)
        };
        let (dq, dk, dv) = match fused {
            Ok(g) => g,
            Err(()) => {
                let w = crate::kernels::wrap::<3>;
                let (dq, dk, dv) = attention_grads(w(q), w(k), w(v), w(grad), heads, causal);
                let p = |t: Tensor<3>| crate::kernels::primitive(&t).expect("the gradient is a cubecl tensor outside autodiff");
                (p(dq), p(dk), p(dv))
            }
        };
        for (parent, g) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<Cube>(node.id, g);
            }
        }
    }
}

/// 0: not yet read, 1: recompute the weights with burn's ops in the backward, 2: the fused
/// backward kernels.
static RECOMPUTE: AtomicU8 = AtomicU8::new(0);

/// Whether the backward recomputes the weights per slice with burn's ops
/// (`VISII_FLASH_GRAD_KERNEL=off`, for comparisons) instead of the fused backward kernels.
fn recompute() -> bool {
    crate::kernels::switch_with(&RECOMPUTE, "VISII_FLASH_GRAD_KERNEL", |v| v == Some("off"), false)
}

/// The gradients of `q`, `k`, `v` (`[b, n | m, heads · d]`) for the output gradient `grad`
/// `[b, n, heads · d]`, the weights recomputed per slice of query rows (see the module's text).
pub fn attention_grads(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, grad: Tensor<3>, heads: usize, causal: bool) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
    let [b, n, inner] = q.dims();
    let m = k.dims()[1];
    let d = inner / heads;
    let scale = (d as f64).powf(-0.5);
    let split = |x: Tensor<3>, len: usize| x.reshape([b, len, heads, d]).swap_dims(1, 2);
    let (q, k, v, g) = (split(q, n), split(k, m), split(v, m), split(grad, n));
    let (kt, vt) = (k.clone().swap_dims(2, 3), v.swap_dims(2, 3));
    // The weights and their gradient, [b, heads, rows, m] each, live at once: both within half the
    // buffer budget (as the forward's slices, `nn::attention_rows`).
    let row_bytes = (b * heads * m * 4).max(1) as u64;
    let rows = ((crate::nn::max_buffer_bytes() / 4 / row_bytes) as usize).clamp(1, n.max(1));
    // burn's tril_mask is true outside the lower triangle: the future positions.
    let mask = causal.then(|| Tensor::<2, burn::tensor::Bool>::tril_mask([n, m], 0, &q.device()));
    let mut dq = vec![];
    let mut dk: Option<Tensor<4>> = None;
    let mut dv: Option<Tensor<4>> = None;
    for from in (0..n).step_by(rows) {
        let to = (from + rows).min(n);
        let qr = q.clone().slice([0..b, 0..heads, from..to, 0..d]);
        let gr = g.clone().slice([0..b, 0..heads, from..to, 0..d]);
        let mut scores = qr.clone().matmul(kt.clone()).mul_scalar(scale);
        if let Some(mask) = &mask {
            let mask = mask.clone().slice([from..to, 0..m]);
            scores = scores.mask_fill(mask.unsqueeze::<4>().expand([b, heads, to - from, m]), f32::NEG_INFINITY);
        }
        let p = match crate::kernels::softmax(scores) {
            Ok(p) => p,
            Err(s) => burn::tensor::activation::softmax(s, 3),
        };
        let part_dv = p.clone().swap_dims(2, 3).matmul(gr.clone());
        dv = Some(match dv {
            Some(acc) => acc + part_dv,
            None => part_dv,
        });
        let dp = gr.matmul(vt.clone());
        let ds = p.clone() * (dp.clone() - (p * dp).sum_dim(3));
        let ds = ds.mul_scalar(scale);
        dq.push(ds.clone().matmul(k.clone()));
        let part_dk = ds.swap_dims(2, 3).matmul(qr);
        dk = Some(match dk {
            Some(acc) => acc + part_dk,
            None => part_dk,
        });
    }
    let merge = |x: Tensor<4>, len: usize| x.swap_dims(1, 2).reshape([b, len, inner]);
    let dq = if dq.len() == 1 { dq.pop().unwrap() } else { Tensor::cat(dq, 2) };
    (merge(dq, n), merge(dk.expect("n > 0"), m), merge(dv.expect("n > 0"), m))
}

fn record<C: CheckpointStrategy>(q: AutodiffTensor, k: AutodiffTensor, v: AutodiffTensor, heads: usize, causal: bool) -> AutodiffTensor {
    let nodes = [q.node(), k.node(), v.node()];
    let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
    let (out, lse) = crate::kernels::attention_cube_lse(q.clone(), k.clone(), v.clone(), heads, causal, true)
        .unwrap_or_else(|_| unreachable!("checked by kernels::attention_applies"));
    let lse = lse.expect("asked for the log-sum-exp");
    match FusedAttention.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((q, k, v, out.clone(), lse, heads, causal), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

type Unwrapped = Result<(AutodiffTensor, GradientCheckpointingStrategy), Tensor<3>>;

/// The autodiff tensor inside `t` and its checkpointing strategy, if `t` is an autodiff tensor on a
/// cubecl device; `Err` with `t` otherwise.
fn unwrap(t: Tensor<3>) -> Unwrapped {
    match t.into_dispatch() {
        DispatchTensor { kind: DispatchTensorKind::Autodiff(inner), autodiff: DispatchAutodiffContext::Enabled(strategy) }
            if matches!(&*inner, DispatchTensorKind::Cube(BackendTensor::Autodiff(_))) =>
        {
            let DispatchTensorKind::Cube(BackendTensor::Autodiff(a)) = *inner else { unreachable!() };
            Ok((a, strategy))
        }
        other => Err(Tensor::from_dispatch(other)),
    }
}

fn rewrap(a: AutodiffTensor, strategy: GradientCheckpointingStrategy) -> Tensor<3> {
    let kind = DispatchTensorKind::Autodiff(Box::new(DispatchTensorKind::Cube(BackendTensor::Autodiff(a))));
    Tensor::from_dispatch(DispatchTensor { kind, autodiff: DispatchAutodiffContext::Enabled(strategy) })
}

fn back(r: Unwrapped) -> Tensor<3> {
    match r {
        Ok((a, s)) => rewrap(a, s),
        Err(t) => t,
    }
}

/// Scaled dot-product attention of autodiff tensors `q` `[b, n, heads · d]`, `k`, `v` `[b, m,
/// heads · d]` as one fused step (see the module's text); `Err` with the inputs where it does not
/// apply (not enabled, not f32 autodiff tensors on a cubecl device, or shapes the fused kernel
/// does not take).
#[allow(clippy::type_complexity)]
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, causal: bool) -> Result<Tensor<3>, (Tensor<3>, Tensor<3>, Tensor<3>)> {
    if !enabled() {
        return Err((q, k, v));
    }
    let (q, k, v) = (unwrap(q), unwrap(k), unwrap(v));
    let ((q, strategy), (k, ks), (v, vs)) = match (q, k, v) {
        (Ok(q), Ok(k), Ok(v)) => (q, k, v),
        (q, k, v) => return Err((back(q), back(k), back(v))),
    };
    let f32s = [&q, &k, &v].iter().all(|t| t.dtype() == burn_backend::DType::F32);
    let applies = f32s && strategy == ks && ks == vs && crate::kernels::attention_applies(&q.shape().to_vec(), &k.shape().to_vec(), &v.shape().to_vec(), heads);
    if !applies {
        return Err((rewrap(q, strategy), rewrap(k, ks), rewrap(v, vs)));
    }
    let y = match strategy {
        GradientCheckpointingStrategy::Disabled => record::<NoCheckpointing>(q, k, v, heads, causal),
        GradientCheckpointingStrategy::Balanced => record::<BalancedCheckpointing>(q, k, v, heads, causal),
    };
    Ok(rewrap(y, strategy))
}
