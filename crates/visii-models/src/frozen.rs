//! Backpropagation through int8-resident weights without keeping them as f32.
//!
//! burn's autodiff treats a dequantised weight as a new leaf: `x · W` stores `W` (f32) for the
//! backward pass of every layer, so learning through int8-resident weights held the whole f32
//! UNet (3.44 GB at full size) until the gradient was computed. Here a Linear's matmul and a
//! Conv2d are one autodiff step each whose saved state is the *quantised* weight (about 1.1 bytes
//! per value, shared with the model): the backward pass dequantises it again, layer by layer, to
//! compute the input gradient. The weights are frozen, so no weight gradient is ever needed, and
//! neither is the layer's input (burn's conv2d keeps it; this step does not).
//!
//! The same step serves f32 weights (frozen too): its forward and input gradient run on our own
//! kernels (`crate::kernels`: the implicit-GEMM conv, and for a stride-1 conv's gradient the same
//! GEMM reading the weight flipped in place) instead of burn's direct conv and conv_transpose2d.
//!
//! The layer's bias and a residual (`resident::Layer::run_add`: a skip, a transformer's residual, a
//! resnet's time embedding) go into the GEMM's epilogue, the whole `layer(x) + bias + r` one step
//! ([`FrozenAdd`]: `x`'s gradient as above, `r`'s the output's, summed over the pixels where `r` is
//! one value per image and channel), where burn would record a step and run a kernel for each add.
//!
//! Runs on burn's cubecl backend (wgpu / WebGPU); any other tensor takes the ordinary path
//! ([`linear`] / [`conv2d`] hand the input back).

use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{binary, unary, Backward, Ops, OpsKind};
use burn_backend::ops::{FloatTensorOps, ModuleOps, QTensorOps};
use burn_backend::{Backend, BackendTypes, FloatDType, Shape, TensorMetadata};
use burn_dispatch::backends::{Autodiff, Cube};
use burn_dispatch::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind, GradientCheckpointingStrategy};

use crate::kernels::Weight;

type Float = <Cube as BackendTypes>::FloatTensorPrimitive;
type Quant = <Cube as BackendTypes>::QuantizedTensorPrimitive;
/// burn-autodiff's tensor (a cubecl primitive and its graph node).
type AutodiffTensor = <Autodiff<Cube> as BackendTypes>::FloatTensorPrimitive;

/// A frozen weight as the layer keeps it: int8 on the device, or f32.
#[derive(Debug, Clone)]
enum Frozen {
    Quant(Quant),
    Float(Float),
}

impl Frozen {
    fn device(&self) -> &burn_cubecl::CubeDevice {
        match self {
            Frozen::Quant(q) => &q.device,
            Frozen::Float(f) => &f.device,
        }
    }
}

/// Hands the allocator's free pages back every [`crate::memory::tidy_backward_every`] layers of the
/// backward pass (in the browser; by default never, see [`crate::memory::TIDY_BACKWARD_EVERY`]).
fn tidy(w: &Frozen) {
    let device = w.device();
    crate::memory::tidy_backward_with(
        || Cube::memory_pool_usage(device).map(|u| (u.bytes_reserved, u.bytes_in_use)),
        || Cube::memory_cleanup(device),
    );
}

/// The weight for activations of `dtype` (f32, or f16), in its real shape: a quantised base
/// dequantised into `dtype`, an f32 one as it is (our kernels read f32 weights under f16
/// activations; [`float_weight`] casts it for burn's ops).
fn weight(w: &Frozen, shape: &Shape, dtype: FloatDType) -> Float {
    let w = match w {
        Frozen::Quant(q) if crate::memory::in_browser() => Cube::memory_persistent_allocations(&q.device, q.clone(), |q| Cube::dequantize(q, dtype)),
        Frozen::Quant(q) => Cube::dequantize(q.clone(), dtype),
        Frozen::Float(f) => f.clone(),
    };
    Cube::float_reshape(w, shape.clone())
}

/// `f` in `dtype` (burn's ops want one type; a no-op where it already is).
fn in_type(f: Float, dtype: FloatDType) -> Float {
    if FloatDType::from(f.dtype) == dtype {
        f
    } else {
        Cube::float_cast(f, dtype)
    }
}

/// The weight in `dtype` for burn's ops.
fn float_weight(w: &Frozen, shape: &Shape, dtype: FloatDType) -> Float {
    in_type(weight(w, shape, dtype), dtype)
}

/// The weight as our kernels take it: an int8 one read in place where they can (dequantised in
/// their tile loads, no float copy: `kernels::q8_enabled`), else [`weight`].
fn kernel_weight(w: &Frozen, shape: &Shape, dtype: FloatDType) -> Weight {
    match w {
        Frozen::Quant(q) if crate::kernels::q8_enabled() => match crate::kernels::Q8::of(q) {
            Some(q8) => Weight::Q8(q8),
            None => Weight::Float(weight(w, shape, dtype)),
        },
        _ => Weight::Float(weight(w, shape, dtype)),
    }
}

/// The weight in `dtype` for burn's ops, from what our kernel handed back (an int8 one it would
/// have read in place is dequantised now).
fn burn_weight(back: Weight, w: &Frozen, shape: &Shape, dtype: FloatDType) -> Float {
    match back {
        Weight::Float(f) => in_type(f, dtype),
        Weight::Q8(_) => float_weight(w, shape, dtype),
    }
}

/// Whether our kernels run this step (f32 or f16 activations; see `crate::kernels`).
fn ours(dtype: FloatDType) -> bool {
    matches!(dtype, FloatDType::F32 | FloatDType::F16) && crate::kernels::enabled()
}

/// A `[in, out]` weight as `[1, .., 1, in, out]` of the given rank (matmul broadcasts it).
fn batched(shape: &Shape, rank: usize) -> Shape {
    let mut dims = vec![1; rank];
    dims[rank - 2..].copy_from_slice(&shape.dims::<2>());
    Shape::from(dims)
}

/// The input gradient of `x · W` for a Linear weight `W` `[in, out]` (frozen): `grad · Wᵀ`.
fn matmul_input_grad(q: &Frozen, shape: &Shape, grad: Float) -> Float {
    let dtype: FloatDType = grad.dtype().into();
    let (grad, w) = if ours(dtype) {
        match crate::kernels::linear_input_grad_weight(grad, kernel_weight(q, shape, dtype), shape.dims::<2>()) {
            Ok(g) => return g,
            Err((grad, back)) => (grad, burn_weight(back, q, shape, dtype)),
        }
    } else {
        (grad, float_weight(q, shape, dtype))
    };
    let w = Cube::float_reshape(w, batched(shape, grad.shape().num_dims()));
    Cube::float_matmul(grad, Cube::float_transpose(w))
}

/// The input gradient of a Conv2d (symmetric padding `o`, frozen weight of `shape`) whose input was
/// `size_in` `[h, w]`: the transposed conv of `grad`.
fn conv_input_grad(q: &Frozen, shape: &Shape, o: &ConvOptions<2>, size_in: [usize; 2], grad: Float) -> Float {
    let [_, _, ho, wo] = grad.shape().dims();
    let [_, _, kh, kw] = shape.dims();
    let pad = o.padding_begin();
    // The rows / columns a strided forward conv dropped at the end: the transposed conv
    // must give them back (zero gradient) to restore the input size.
    let out = |i: usize, k: usize, size_out: usize| {
        let covered = (size_out - 1) * o.stride[i] + o.dilation[i] * (k - 1) + 1;
        (size_in[i] + 2 * pad[i]).saturating_sub(covered)
    };
    let dtype: FloatDType = grad.dtype().into();
    let (grad, w) = if ours(dtype) {
        match crate::kernels::conv2d_input_grad_weight(grad, kernel_weight(q, shape, dtype), shape.dims::<4>(), o, size_in) {
            Ok(g) => return g,
            Err((grad, back)) => (grad, burn_weight(back, q, shape, dtype)),
        }
    } else {
        (grad, float_weight(q, shape, dtype))
    };
    let options = ConvTransposeOptions::new(o.stride, pad, [out(0, kh, ho), out(1, kw, wo)], o.dilation, o.groups);
    Cube::conv_transpose2d(grad, w, None, options)
}

/// `x · W` for a Linear weight `W` `[in, out]` (broadcast over `x`'s leading axes).
#[derive(Debug)]
struct FrozenMatmul;

impl Backward<Cube, 1> for FrozenMatmul {
    type State = (Frozen, Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, shape) = ops.state;
        tidy(&q);
        unary::<Cube, _>(ops.parents, ops.node, grads, |grad| matmul_input_grad(&q, &shape, grad));
    }
}

/// A Conv2d with symmetric padding, without bias; the state keeps the input's height and width.
#[derive(Debug)]
struct FrozenConv2d;

impl Backward<Cube, 1> for FrozenConv2d {
    type State = (Frozen, Shape, ConvOptions<2>, [usize; 2]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, shape, o, size_in) = ops.state;
        tidy(&q);
        unary::<Cube, _>(ops.parents, ops.node, grads, |grad| conv_input_grad(&q, &shape, &o, size_in, grad));
    }
}

/// A frozen Linear or Conv2d with its bias and a residual added in the GEMM's epilogue: `layer(x) +
/// bias + r`, two parents (`x`, `r`). The state: the layer's (as [`FrozenMatmul`]'s or
/// [`FrozenConv2d`]'s) and the residual's shape. `r`'s gradient is the output's, summed over the
/// pixels where `r` is one value per image and channel (`[n, c, 1, 1]`).
#[derive(Debug)]
struct FrozenAdd;

#[derive(Debug, Clone)]
enum Layer {
    Matmul(Frozen, Shape),
    Conv(Frozen, Shape, ConvOptions<2>, [usize; 2]),
}

impl Backward<Cube, 2> for FrozenAdd {
    type State = (Layer, Shape);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (layer, r_shape) = ops.state;
        let input_grad = |grad: Float| match &layer {
            Layer::Matmul(q, shape) => {
                tidy(q);
                matmul_input_grad(q, shape, grad)
            }
            Layer::Conv(q, shape, o, size_in) => {
                tidy(q);
                conv_input_grad(q, shape, o, *size_in, grad)
            }
        };
        let residual_grad = |grad: Float| {
            if grad.shape() == r_shape {
                grad
            } else {
                // Per image and channel: summed over the pixels (each axis within burn's reduce limit).
                Cube::float_sum_dim(Cube::float_sum_dim(grad, 3), 2)
            }
        };
        binary::<Cube, _, _>(ops.parents, ops.node, grads, input_grad, residual_grad);
    }
}

#[derive(Clone)]
enum Op {
    Matmul,
    Conv(ConvOptions<2>),
}

/// `layer(x) + bias + r` as one [`FrozenAdd`] step whose forward is one of our GEMMs (bias and
/// residual in its epilogue); `x` and `r` handed back where that GEMM does not apply.
#[allow(clippy::type_complexity)]
fn record_added<C: CheckpointStrategy>(
    x: AutodiffTensor,
    r: AutodiffTensor,
    q: Frozen,
    shape: Shape,
    op: Op,
    bias: Option<Float>,
) -> Result<AutodiffTensor, (AutodiffTensor, AutodiffTensor)> {
    let dtype: FloatDType = x.dtype().into();
    if !ours(dtype) {
        return Err((x, r));
    }
    let (xp, rp) = (x.clone().into_primitive(), r.clone().into_primitive());
    let r_shape = rp.shape();
    let skinny = crate::kernels::skinny_enabled();
    let (y, layer) = match op {
        Op::Matmul => {
            (crate::kernels::linear_weight(xp, kernel_weight(&q, &shape, dtype), shape.dims::<2>(), bias, Some(rp), skinny), Layer::Matmul(q, shape))
        }
        Op::Conv(options) => {
            let [_, _, h, wd] = x.shape().dims();
            let y = crate::kernels::conv2d_weight(xp, kernel_weight(&q, &shape, dtype), shape.dims::<4>(), bias, Some(rp), &options, skinny);
            (y, Layer::Conv(q, shape, options, [h, wd]))
        }
    };
    let Ok(y) = y else { return Err((x, r)) };
    Ok(match FrozenAdd.prepare::<C>([x.node(), r.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((layer, r_shape), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    })
}

/// `layer(x)` as one [`FrozenMatmul`] / [`FrozenConv2d`] step, with `bias` added in our GEMM's
/// epilogue where it runs (then `true`: burn's op, where it does not, leaves the bias to the caller).
fn record<C: CheckpointStrategy>(x: AutodiffTensor, q: Frozen, shape: Shape, op: Op, bias: Option<Float>) -> (AutodiffTensor, bool) {
    let dtype: FloatDType = x.dtype().into();
    let skinny = crate::kernels::skinny_enabled();
    match op {
        Op::Matmul => {
            let batched_shape = batched(&shape, x.shape().num_dims());
            let y = |x: Float| {
                let (x, w) = if ours(dtype) {
                    match crate::kernels::linear_weight(x, kernel_weight(&q, &shape, dtype), shape.dims::<2>(), bias, None, skinny) {
                        Ok(y) => return (y, true),
                        Err((x, back, ..)) => (x, burn_weight(back, &q, &shape, dtype)),
                    }
                } else {
                    (x, float_weight(&q, &shape, dtype))
                };
                (Cube::float_matmul(x, Cube::float_reshape(w, batched_shape)), false)
            };
            let kind = FrozenMatmul.prepare::<C>([x.node()]).compute_bound().stateful();
            let (out, biased) = y(x.into_primitive());
            let out = match kind {
                OpsKind::Tracked(prep) => prep.finish((q, shape), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            (out, biased)
        }
        Op::Conv(options) => {
            let [_, _, h, wd] = x.shape().dims();
            let y = |x: Float| {
                let (x, w) = if ours(dtype) {
                    match crate::kernels::conv2d_weight(x, kernel_weight(&q, &shape, dtype), shape.dims::<4>(), bias, None, &options, skinny) {
                        Ok(y) => return (y, true),
                        Err((x, back, ..)) => (x, burn_weight(back, &q, &shape, dtype)),
                    }
                } else {
                    (x, float_weight(&q, &shape, dtype))
                };
                (Cube::conv2d(x, w, None, options.clone()), false)
            };
            let kind = FrozenConv2d.prepare::<C>([x.node()]).compute_bound().stateful();
            let (out, biased) = y(x.into_primitive());
            let out = match kind {
                OpsKind::Tracked(prep) => prep.finish((q, shape, options.clone(), [h, wd]), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            (out, biased)
        }
    }
}

/// The autodiff tensor inside `t` where it is one on a cubecl device under `strategy`.
fn autodiff_cube<const D: usize>(t: Tensor<D>, strategy: &GradientCheckpointingStrategy) -> Result<AutodiffTensor, Tensor<D>> {
    match crate::fused::unwrap(t) {
        Ok((a, s)) if s == *strategy => Ok(a),
        Ok((a, s)) => Err(wrap(a, s)),
        Err(t) => Err(t),
    }
}

use crate::fused::rewrap as wrap;

/// Unwraps an autodiff float tensor on a cubecl device and a quantised base on one, runs `op`
/// as a frozen-weight step with `bias` (`[out]`, outside autodiff) and `residual` added, and wraps
/// the result; hands `x` and `residual` back for any other kind of tensor.
///
/// The bias and the residual go into the GEMM's epilogue ([`FrozenAdd`], one kernel) where our
/// kernels run; otherwise they are added after the step as burn's ops.
fn frozen<const D: usize, const W: usize>(
    x: Tensor<D>,
    base: Tensor<W>,
    shape: &[usize],
    op: Op,
    bias: Option<&Tensor<1>>,
    residual: Option<Tensor<D>>,
) -> Result<Tensor<D>, (Tensor<D>, Option<Tensor<D>>)> {
    let xp = x.into_dispatch();
    let fits = matches!(&xp, DispatchTensor { kind: DispatchTensorKind::Autodiff(inner), autodiff: DispatchAutodiffContext::Enabled(_) }
        if matches!(**inner, DispatchTensorKind::Cube(BackendTensor::Autodiff(_))));
    let q = match base.into_dispatch() {
        DispatchTensor { kind: DispatchTensorKind::Cube(BackendTensor::Quantized(q)), .. } if fits => Frozen::Quant(q),
        // An f32 weight outside autodiff (frozen), under f32 or f16 activations.
        DispatchTensor { kind: DispatchTensorKind::Cube(BackendTensor::Float(f)), autodiff: DispatchAutodiffContext::Disabled }
            if fits && f.dtype == burn_backend::DType::F32 && matches!(xp.dtype(), burn_backend::DType::F32 | burn_backend::DType::F16) =>
        {
            Frozen::Float(f)
        }
        _ => return Err((Tensor::from_dispatch(xp), residual)),
    };
    let DispatchTensor { kind: DispatchTensorKind::Autodiff(inner), autodiff: DispatchAutodiffContext::Enabled(strategy) } = xp else {
        unreachable!()
    };
    let DispatchTensorKind::Cube(BackendTensor::Autodiff(t)) = *inner else { unreachable!() };
    // The bias runs along a conv's output channels (weight `[c_out, ..]`), a Linear's output
    // features (weight `[in, out]`).
    let conv = matches!(op, Op::Conv(_));
    let out_channels = if conv { shape[0] } else { shape[1] };
    let shape = Shape::from(shape.to_vec());
    // (With the epilogue switched off, burn adds the bias after the step, as before.)
    let bias_p = bias.filter(|_| crate::kernels::epilogue_enabled()).and_then(crate::kernels::primitive);
    // Bias and residual in the epilogue: a residual on the same device and strategy, the bias a
    // frozen tensor (outside autodiff) on it.
    let (t, residual) = match residual.map(|r| autodiff_cube(r, &strategy)) {
        Some(Ok(r)) if bias.is_none() || bias_p.is_some() => {
            let added = match strategy {
                GradientCheckpointingStrategy::Disabled => {
                    record_added::<NoCheckpointing>(t, r, q.clone(), shape.clone(), op.clone(), bias_p.clone())
                }
                GradientCheckpointingStrategy::Balanced => {
                    record_added::<BalancedCheckpointing>(t, r, q.clone(), shape.clone(), op.clone(), bias_p.clone())
                }
            };
            match added {
                Ok(y) => return Ok(wrap(y, strategy)),
                Err((t, r)) => (t, Some(wrap::<D>(r, strategy))),
            }
        }
        Some(Ok(r)) => (t, Some(wrap::<D>(r, strategy))),
        Some(Err(r)) => (t, Some(r)),
        None => (t, None),
    };
    let bias_in_kernel = bias_p.is_some();
    let (y, biased) = match strategy {
        GradientCheckpointingStrategy::Disabled => record::<NoCheckpointing>(t, q, shape, op, bias_p),
        GradientCheckpointingStrategy::Balanced => record::<BalancedCheckpointing>(t, q, shape, op, bias_p),
    };
    let y: Tensor<D> = wrap(y, strategy);
    let y = match bias {
        Some(b) if !(biased && bias_in_kernel) => {
            let b = b.clone().cast(FloatDType::from(y.dtype()));
            let mut dims = [1; D];
            // Per output channel: axis 1 of a conv's NCHW output, the last axis of a Linear's.
            dims[if conv { 1 } else { D - 1 }] = out_channels;
            y + b.reshape(dims)
        }
        _ => y,
    };
    Ok(match residual {
        Some(r) => y + r,
        None => y,
    })
}

/// `x · W + bias + residual` for a Linear whose frozen weight (int8 base, or f32) is `base`, `[in,
/// out]`; `bias` and `residual` where given.
#[allow(clippy::type_complexity)]
pub fn linear<const D: usize, const W: usize>(
    x: Tensor<D>,
    base: Tensor<W>,
    shape: &[usize],
    bias: Option<&Tensor<1>>,
    residual: Option<Tensor<D>>,
) -> Result<Tensor<D>, (Tensor<D>, Option<Tensor<D>>)> {
    frozen(x, base, shape, Op::Matmul, bias, residual)
}

/// A Conv2d (symmetric padding `options`) whose frozen weight (int8 base, or f32) is `base`, weight
/// `shape`, plus `bias` and `residual` (the output's shape, or `[n, c_out, 1, 1]`) where given.
#[allow(clippy::type_complexity)]
pub fn conv2d<const W: usize>(
    x: Tensor<4>,
    base: Tensor<W>,
    shape: &[usize],
    options: ConvOptions<2>,
    bias: Option<&Tensor<1>>,
    residual: Option<Tensor<4>>,
) -> Result<Tensor<4>, (Tensor<4>, Option<Tensor<4>>)> {
    frozen(x, base, shape, Op::Conv(options), bias, residual)
}
