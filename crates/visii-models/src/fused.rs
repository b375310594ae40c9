//! Attention, the norms and GEGLU inside learning's autodiff, as fused steps.
//!
//! Attention: the fused forward (`kernels::attention_cube_lse`, no score
//! tensor) as one autodiff step whose backward is the fused backward (`kernels::attention_grads_cube`,
//! FlashAttention-2's: the weights recomputed block by block from each row's log-sum-exp, never
//! stored; see `kernels/flash.rs`).
//!
//! burn's chain (`q kᵀ`, scale, softmax, `· v`) records four steps and keeps the scores and the
//! weights (`[b, heads, n, m]` each) of every attention layer until the backward pass; this step
//! keeps `q`, `k`, `v`, the output (`[b, n, heads · d]` each) and the log-sum-exp (`[b, heads, n]`).
//! Masked (causal) positions get no gradient. Runs where the fused kernels apply (f32 or f16 on a
//! cubecl device, head dims the kernels take); anything else hands its inputs back for burn's chain.
//!
//! GroupNorm (+ SiLU) and LayerNorm: our forward kernels as one autodiff step that keeps the input and
//! each row's statistics, whose backward is two kernels (`kernels/norm.rs`: the row sums, then the
//! input gradient). burn's chain records about a dozen steps per norm, runs about 30 kernels forward
//! and backward, and keeps several full-size temporaries. `gamma` and `beta` are frozen (tensors
//! outside autodiff): where they are not, burn's chain runs.
//!
//! GEGLU: our forward kernel as one step that keeps its input `h`, whose backward is one kernel
//! (`kernels/geglu.rs`; with GELU's exact derivative, as PyTorch's autograd, where burn's is that of
//! the tanh approximation).

use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_backend::ops::FloatTensorOps;
use burn_backend::{BackendTypes, FloatDType, TensorMetadata};
use burn_dispatch::backends::{Autodiff, Cube};
use burn_dispatch::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind, GradientCheckpointingStrategy};
use std::sync::atomic::{AtomicU8, Ordering};

type Float = <Cube as BackendTypes>::FloatTensorPrimitive;
type AutodiffTensor = <Autodiff<Cube> as BackendTypes>::FloatTensorPrimitive;

/// 0: not yet read from the environment, 1: on, 2: off.
static FUSED_GRAD: AtomicU8 = AtomicU8::new(0);

/// Whether attention inside autodiff (learning) runs as this fused step: on by default
/// (`VISII_FLASH_GRAD=off`, the page's `?flashGrad=off`: burn's chain, for comparisons). On the CPU
/// adapters it measured faster on the tiny model's learning step and as fast on the full UNet's
/// (BENCHMARKS.md), and it holds no score tensors. Needs the fused forward on
/// ([`crate::kernels::flash_enabled`]).
pub fn enabled() -> bool {
    crate::kernels::switch(&FUSED_GRAD, "VISII_FLASH_GRAD", "off", true) && crate::kernels::flash_enabled() && crate::kernels::enabled()
}

/// Turns the fused attention step of learning on or off for this process.
pub fn set_enabled(on: bool) {
    FUSED_GRAD.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// The attention step; its state: `q`, `k`, `v`, the output, the log-sum-exp and (heads, causal).
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
        let grad = in_type_of(grad, &q);
        let (dq, dk, dv) = crate::kernels::attention_grads_cube(q, k, v, o, lse, grad, heads, causal)
            .unwrap_or_else(|()| unreachable!("checked by kernels::attention_grads_apply when recorded"));
        for (parent, g) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<Cube>(node.id, g);
            }
        }
    }
}

/// 0: not yet read from the environment, 1: on, 2: off.
static STEPS: AtomicU8 = AtomicU8::new(0);

/// Whether GroupNorm, LayerNorm and GEGLU inside autodiff run as this module's fused steps: on by
/// default (`VISII_FUSED_STEPS=off`: burn's chains, for comparisons).
pub fn steps_enabled() -> bool {
    crate::kernels::switch(&STEPS, "VISII_FUSED_STEPS", "off", true) && crate::kernels::enabled()
}

/// Turns the fused norm and GEGLU steps of learning on or off for this process.
pub fn set_steps_enabled(on: bool) {
    STEPS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// The norm step; its state: the contiguous input, its rows' `(mean, 1 / std)`, `gamma`, `beta`,
/// groups, SiLU, LayerNorm.
#[derive(Debug)]
struct FusedNorm;

impl Backward<Cube, 1> for FusedNorm {
    type State = (Float, Float, Float, Float, usize, bool, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, stats, gamma, beta, groups, silu, layer) = ops.state;
        let grad = grads.consume::<Cube>(&ops.node);
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let grad = in_type_of(grad, &x);
        let dx = crate::kernels::group_norm_grad_cube(&x, &stats, &gamma, &beta, grad, groups, silu, layer)
            .unwrap_or_else(|_| unreachable!("checked by kernels::group_norm_cube_stats when recorded"));
        grads.register::<Cube>(node.id, dx);
    }
}

/// `grad` in the type of `like` (gradients arrive in their tensor's type; a cast would only guard a
/// mixed-precision caller).
fn in_type_of(grad: Float, like: &Float) -> Float {
    if grad.dtype == like.dtype {
        return grad;
    }
    let dtype = if like.dtype == burn_backend::DType::F16 { FloatDType::F16 } else { FloatDType::F32 };
    Cube::float_cast(grad, dtype)
}

fn record_norm<C: CheckpointStrategy>(
    x: AutodiffTensor,
    y: Float,
    kept: (Float, Float, Float, Float),
    groups: usize,
    silu: bool,
    layer: bool,
) -> AutodiffTensor {
    let (xc, stats, gamma, beta) = kept;
    match FusedNorm.prepare::<C>([x.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((xc, stats, gamma, beta, groups, silu, layer), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// GroupNorm of the autodiff tensor `x` `[b, c, ..]` over `groups` groups (LayerNorm over the last
/// axis where `layer`, with `groups = 1`), then SiLU where asked, as one fused step (see the module's
/// text); `Err(x)` where it does not apply (not enabled, `x` not an f32 / f16 autodiff tensor on a
/// cubecl device, `gamma` or `beta` inside autodiff, or shapes the kernels do not take).
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
    layer: bool,
) -> Result<Tensor<D>, Tensor<D>> {
    if !steps_enabled() {
        return Err(x);
    }
    let (Some(g), Some(b)) = (crate::kernels::primitive(gamma), crate::kernels::primitive(beta)) else { return Err(x) };
    let (x, strategy) = unwrap(x)?;
    let inner = x.clone().into_primitive();
    let (y, xc, stats) = match crate::kernels::group_norm_cube_stats(inner, &g, &b, groups, eps, silu, layer) {
        Ok(r) => r,
        Err(_) => return Err(rewrap(x, strategy)),
    };
    let kept = (xc, stats, g, b);
    let y = match strategy {
        GradientCheckpointingStrategy::Disabled => record_norm::<NoCheckpointing>(x, y, kept, groups, silu, layer),
        GradientCheckpointingStrategy::Balanced => record_norm::<BalancedCheckpointing>(x, y, kept, groups, silu, layer),
    };
    Ok(rewrap(y, strategy))
}

/// The GEGLU step; its state: the input `h` (contiguous).
#[derive(Debug)]
struct FusedGeglu;

impl Backward<Cube, 1> for FusedGeglu {
    type State = Float;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let h = ops.state;
        let grad = grads.consume::<Cube>(&ops.node);
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let grad = in_type_of(grad, &h);
        let dh = crate::kernels::geglu_grad_cube(&h, grad).unwrap_or_else(|_| unreachable!("checked by kernels::geglu_cube when recorded"));
        grads.register::<Cube>(node.id, dh);
    }
}

fn record_geglu<C: CheckpointStrategy>(h: AutodiffTensor, y: Float, kept: Float) -> AutodiffTensor {
    match FusedGeglu.prepare::<C>([h.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(kept, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// GEGLU of the autodiff tensor `h` `[.., 2F]` as one fused step (see the module's text); `Err(h)`
/// where it does not apply (not enabled, not an f32 / f16 autodiff tensor on a cubecl device, an odd
/// last axis).
pub fn geglu<const D: usize>(h: Tensor<D>) -> Result<Tensor<D>, Tensor<D>> {
    if !steps_enabled() {
        return Err(h);
    }
    let (h, strategy) = unwrap(h)?;
    // The step keeps the contiguous input the forward read (no second copy of a view backward).
    let (y, kept) = match crate::kernels::geglu_cube_kept(h.clone().into_primitive()) {
        Ok(r) => r,
        Err(_) => return Err(rewrap(h, strategy)),
    };
    let y = match strategy {
        GradientCheckpointingStrategy::Disabled => record_geglu::<NoCheckpointing>(h, y, kept),
        GradientCheckpointingStrategy::Balanced => record_geglu::<BalancedCheckpointing>(h, y, kept),
    };
    Ok(rewrap(y, strategy))
}

fn record<C: CheckpointStrategy>(q: AutodiffTensor, k: AutodiffTensor, v: AutodiffTensor, heads: usize, causal: bool) -> AutodiffTensor {
    let nodes = [q.node(), k.node(), v.node()];
    let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
    let (out, lse) = crate::kernels::attention_cube_lse(q.clone(), k.clone(), v.clone(), heads, causal, true)
        .unwrap_or_else(|_| unreachable!("checked by kernels::attention_applies when recorded"));
    let lse = lse.expect("asked for the log-sum-exp");
    match FusedAttention.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((q, k, v, out.clone(), lse, heads, causal), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Makes a view contiguous inside autodiff; the gradient passes through unchanged.
#[derive(Debug)]
struct Contiguous;

impl Backward<Cube, 1> for Contiguous {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        burn_autodiff::ops::unary::<Cube, _>(ops.parents, ops.node, grads, |grad| grad);
    }
}

fn record_contiguous<C: CheckpointStrategy>(t: AutodiffTensor) -> AutodiffTensor {
    let y = crate::kernels::contiguous(t.clone().into_primitive());
    Contiguous.prepare::<C>([t.node()]).compute_bound().stateless(y)
}

/// `t` laid out contiguously (the same values; a copy where `t` is a view, e.g. after
/// `swap_dims`), inside autodiff or not, on a cubecl device; any other tensor as it is. For a tensor
/// several of our kernels read (each would copy a view again), or that one of them takes as a
/// residual (which it reads contiguous only).
pub fn contiguous<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if let Some(p) = crate::kernels::primitive(&t) {
        return if p.is_contiguous() { t } else { crate::kernels::wrap(crate::kernels::contiguous(p)) };
    }
    match unwrap(t) {
        Ok((a, strategy)) => {
            if a.primitive().is_contiguous() {
                return rewrap(a, strategy);
            }
            let y = match strategy {
                GradientCheckpointingStrategy::Disabled => record_contiguous::<NoCheckpointing>(a),
                GradientCheckpointingStrategy::Balanced => record_contiguous::<BalancedCheckpointing>(a),
            };
            rewrap(y, strategy)
        }
        Err(t) => t,
    }
}

pub(crate) type Unwrapped<const D: usize> = Result<(AutodiffTensor, GradientCheckpointingStrategy), Tensor<D>>;

/// The autodiff tensor inside `t` and its checkpointing strategy, if `t` is an autodiff tensor on a
/// cubecl device; `Err` with `t` otherwise.
pub(crate) fn unwrap<const D: usize>(t: Tensor<D>) -> Unwrapped<D> {
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

pub(crate) fn rewrap<const D: usize>(a: AutodiffTensor, strategy: GradientCheckpointingStrategy) -> Tensor<D> {
    let kind = DispatchTensorKind::Autodiff(Box::new(DispatchTensorKind::Cube(BackendTensor::Autodiff(a))));
    Tensor::from_dispatch(DispatchTensor { kind, autodiff: DispatchAutodiffContext::Enabled(strategy) })
}

fn back<const D: usize>(r: Unwrapped<D>) -> Tensor<D> {
    match r {
        Ok((a, s)) => rewrap(a, s),
        Err(t) => t,
    }
}

/// Scaled dot-product attention of autodiff tensors `q` `[b, n, heads · d]`, `k`, `v` `[b, m,
/// heads · d]` as one fused step (see the module's text); `Err` with the inputs where it does not
/// apply (not enabled, not f32 / f16 autodiff tensors on a cubecl device, or shapes the fused
/// kernels do not take).
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
    // f32, or f16 activations (the kernels read f16 into f32 sums).
    let dtype = q.dtype();
    let floats = matches!(dtype, burn_backend::DType::F32 | burn_backend::DType::F16) && k.dtype() == dtype && v.dtype() == dtype;
    let (qd, kd, vd) = (q.shape().to_vec(), k.shape().to_vec(), v.shape().to_vec());
    let shapes = crate::kernels::attention_applies(&qd, &kd, &vd, heads) && crate::kernels::attention_grads_apply(&qd, &kd, heads);
    let applies = floats && strategy == ks && ks == vs && shapes;
    if !applies {
        return Err((rewrap(q, strategy), rewrap(k, ks), rewrap(v, vs)));
    }
    let y = match strategy {
        GradientCheckpointingStrategy::Disabled => record::<NoCheckpointing>(q, k, v, heads, causal),
        GradientCheckpointingStrategy::Balanced => record::<BalancedCheckpointing>(q, k, v, heads, causal),
    };
    Ok(rewrap(y, strategy))
}
