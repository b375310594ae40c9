//! Weights kept as int8 on the device ("resident q8"): each large Linear / Conv2d weight is stored
//! quantised (symmetric int8, one f32 scale per block of 32 values along its last axis, packed
//! four to a u32) and dequantised when a layer runs, so the device holds about 1.1 bytes per
//! weight instead of 4 plus one layer's f32 weight at a time (the full-size UNet: 0.97 GB instead
//! of 3.44). Layers run through [`Layer::run`]: under autodiff on wgpu / WebGPU the backward pass
//! dequantises each weight again instead of keeping the f32 copy (`frozen.rs`), so learning gets
//! smaller too.
//!
//! Built on burn's parameter reparameterisation: the stored base of a conv weight
//! `[out, in, kh, kw]` is the quantised `[out, 1, 1, in * kh * kw]` (burn packs int8 along the
//! innermost axis, which must be a multiple of 4 — `kh * kw` alone is not), and `Param::val()`
//! returns the dequantised, reshaped weight. burn 0.22's own quantised conv2d needs that packing
//! too; packing along an outer axis gave wrong values (measured), hence the reshape.

use burn::module::{Module, Param, Reparameterization, Reparameterizer};
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::tensor::quantization::{compute_q_params, compute_range, Calibration, QuantScheme, QuantValue, ScaleDtype};
use burn::tensor::{DType, FloatDType, Shape, Tensor};
use std::cell::Cell;
use std::rc::Rc;

/// Weights with fewer values stay f32 (norms, biases, embeddings of small models).
const MIN_VALUES: usize = 4096;

/// The effective weight of a quantised base: dequantised and given its real shape.
#[derive(Module, Debug)]
pub struct Dequantized {
    pub shape: Vec<usize>,
}

impl Reparameterization for Dequantized {
    const NAME: &'static str = "dequantized";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        let w = if crate::memory::in_browser() {
            // Into a buffer of exactly its size (reused by the next layer of the same shape, handed
            // back by `memory::tidy`) rather than onto whatever larger free page the bucketed
            // allocator would pick (see `crate::weights::persistent`).
            crate::weights::persistent(&base.device(), base, |b, _| b.dequantize())
        } else {
            base.dequantize()
        };
        w.reshape(Shape::from(self.shape.clone()))
    }
}

/// Quantises every rank-2 (Linear, `[in, out]`) and rank-4 (Conv2d) weight of at least
/// [`MIN_VALUES`] values whose last axis (per output channel for convs) splits into blocks;
/// counts the values it quantised.
struct ResidentQ8(Rc<Cell<usize>>);

/// Block length along the last axis: the longest of 32, 16, 8, 4 that divides it.
fn block_for(n: usize) -> Option<usize> {
    [32, 16, 8, 4].into_iter().find(|b| n % b == 0)
}

impl Reparameterizer for ResidentQ8 {
    type Reparam = Dequantized;

    fn reparameterize<const D: usize>(&mut self, _path: &str, param: Param<Tensor<D>>) -> (Param<Tensor<D>>, Option<Dequantized>) {
        let dims = param.val().dims();
        let n: usize = dims.iter().product();
        if !(D == 2 || D == 4) || n < MIN_VALUES {
            return (param, None);
        }
        // Stored as [rows, 1, .., last] with all of one output channel's values on the last axis.
        let (rows, last) = (dims[0], n / dims[0]);
        let Some(block) = block_for(last) else { return (param, None) };
        self.0.set(self.0.get() + n);
        let scheme = QuantScheme::default().with_value(QuantValue::Q8S).per_block([block as u8], ScaleDtype::F32);
        let mut flat = vec![1usize; D];
        flat[0] = rows;
        flat[D - 1] = last;
        let base = param.map(move |t| {
            let t = t.reshape(Shape::from(flat));
            let range = compute_range(&scheme, &t, &Calibration::MinMax);
            let q = compute_q_params(&scheme, range);
            crate::weights::persistent(&t.device(), (t, q), |(t, q), _| t.quantize(&scheme, q))
        });
        (base, Some(Dequantized { shape: dims.to_vec() }))
    }
}

/// `module` with its large weights kept int8 on the device, and how many values were quantised.
pub fn resident_q8<M: Module>(module: M) -> (M, usize) {
    let values = Rc::new(Cell::new(0));
    let m = module.apply_reparameterization(ResidentQ8(values.clone()));
    (m, values.get())
}

/// The float type of an activation.
fn float<const D: usize>(x: &Tensor<D>) -> FloatDType {
    FloatDType::from(x.dtype())
}

/// Under autodiff on wgpu / WebGPU, the weight a frozen step (`frozen.rs`) saves for the backward
/// pass and its real shape: the int8 base of a resident weight, or an f32 weight itself when our
/// kernels run (f32 activations); `None` where burn's own autodiff op runs.
#[cfg(feature = "frozen")]
fn frozen_weight<const W: usize, const D: usize>(weight: &Param<Tensor<W>>, x: &Tensor<D>) -> Option<(Tensor<W>, Vec<usize>)> {
    if !x.is_autodiff() {
        return None;
    }
    match weight.reparameterization::<Dequantized>() {
        Some(r) => Some((weight.base(), r.shape.clone())),
        // f32 weights stay f32 under f16 activations too: our kernels read them as they are.
        None if matches!(x.dtype(), DType::F32 | DType::F16) && crate::kernels::enabled() => {
            let w = weight.val();
            let dims = w.dims().to_vec();
            Some((w, dims))
        }
        None => None,
    }
}

/// A frozen Linear / Conv2d of the models, int8-resident or not: `forward`, except that an
/// int8-resident weight under autodiff is saved for the backward pass as int8 (wgpu / WebGPU),
/// and that with f16 activations the weights (f32 or int8 on the device) are used as f16. On
/// wgpu / WebGPU with f32 activations the layer runs on our kernels (`crate::kernels`).
pub trait Layer<T> {
    fn run(&self, x: T) -> T;

    /// `self.run(x) + r`: on our kernels `r` is added in the layer's own kernel (its GEMM's
    /// epilogue, a step of its own inside autodiff), saving a pass over the output. `r` has the
    /// output's shape, or for a conv `[n, c_out, 1, 1]` (one value per image and channel, as a
    /// resnet's time embedding); anything else broadcastable takes burn's add.
    fn run_add(&self, x: T, r: T) -> T;
}

impl<const D: usize> Layer<Tensor<D>> for Linear {
    fn run(&self, x: Tensor<D>) -> Tensor<D> {
        self.run_with(x, None)
    }

    fn run_add(&self, x: Tensor<D>, r: Tensor<D>) -> Tensor<D> {
        self.run_with(x, Some(r))
    }
}

/// The shared path of [`Layer::run`] and [`Layer::run_add`] for both layers.
trait RunWith<const D: usize> {
    fn run_with(&self, x: Tensor<D>, r: Option<Tensor<D>>) -> Tensor<D>;
}

/// `y + r` where there is an `r` (what the kernels did not add).
fn plus<const D: usize>(y: Tensor<D>, r: Option<Tensor<D>>) -> Tensor<D> {
    match r {
        Some(r) => y + r,
        None => y,
    }
}

/// `kernel(x, r)`; where the kernel takes the layer but not the residual (another shape or type),
/// `kernel(x, None) + r`: our GEMM still runs. `Err(x)` where it does not take the layer.
#[cfg(feature = "frozen")]
fn with_residual<const D: usize>(
    x: Tensor<D>,
    r: &Option<Tensor<D>>,
    kernel: impl Fn(Tensor<D>, Option<&Tensor<D>>) -> Result<Tensor<D>, Tensor<D>>,
) -> Result<Tensor<D>, Tensor<D>> {
    match (kernel(x, r.as_ref()), r) {
        (Ok(y), _) => Ok(y),
        (Err(x), Some(r)) => kernel(x, None).map(|y| y + r.clone()),
        (Err(x), None) => Err(x),
    }
}

impl<const D: usize> RunWith<D> for Linear {
    fn run_with(&self, x: Tensor<D>, r: Option<Tensor<D>>) -> Tensor<D> {
        if r.is_some() && !crate::kernels::epilogue_enabled() {
            return plus(self.run_with(x, None), r);
        }
        crate::memory::tidy(&x.device());
        let bias = self.bias.as_ref().map(|b| b.val());
        #[cfg(feature = "frozen")]
        let (x, r) = match frozen_weight(&self.weight, &x) {
            Some((w, shape)) => match crate::frozen::linear(x, w, &shape, bias.as_ref(), r) {
                Ok(y) => return y,
                Err(back) => back,
            },
            None => (x, r),
        };
        // An int8-resident weight read in place by our GEMM (no float copy of it).
        #[cfg(feature = "frozen")]
        let x = match self.weight.reparameterization::<Dequantized>() {
            Some(q) if q.shape.len() == 2 && !x.is_autodiff() => {
                let base = self.weight.base();
                match with_residual(x, &r, |x, r| crate::kernels::linear_q8(x, &base, [q.shape[0], q.shape[1]], bias.as_ref(), r)) {
                    Ok(y) => return y,
                    Err(x) => x,
                }
            }
            _ => x,
        };
        #[cfg(feature = "frozen")]
        let x = if matches!(x.dtype(), DType::F32 | DType::F16) && !x.is_autodiff() {
            let weight = self.weight.val();
            match with_residual(x, &r, |x, r| crate::kernels::linear(x, &weight, bias.as_ref(), r)) {
                Ok(y) => return y,
                Err(x) => x,
            }
        } else {
            x
        };
        if x.dtype() != DType::F32 {
            let dt = float(&x);
            return plus(burn::tensor::module::linear(x, self.weight.val().cast(dt), bias.map(|b| b.cast(dt))), r);
        }
        plus(self.forward(x), r)
    }
}

impl Layer<Tensor<4>> for Conv2d {
    fn run(&self, x: Tensor<4>) -> Tensor<4> {
        self.run_with(x, None)
    }

    fn run_add(&self, x: Tensor<4>, r: Tensor<4>) -> Tensor<4> {
        self.run_with(x, Some(r))
    }
}

impl RunWith<4> for Conv2d {
    fn run_with(&self, x: Tensor<4>, r: Option<Tensor<4>>) -> Tensor<4> {
        if r.is_some() && !crate::kernels::epilogue_enabled() {
            return plus(self.run_with(x, None), r);
        }
        crate::memory::tidy(&x.device());
        let bias = self.bias.as_ref().map(|b| b.val());
        #[cfg(feature = "frozen")]
        let (x, r) = match (frozen_weight(&self.weight, &x), &self.padding) {
            (Some((w, shape)), &burn::nn::PaddingConfig2d::Explicit(t, l, b, rr)) if t == b && l == rr => {
                let options = burn::tensor::ops::ConvOptions::new(self.stride, [t, l], self.dilation, self.groups);
                match crate::frozen::conv2d(x, w, &shape, options, bias.as_ref(), r) {
                    Ok(y) => return y,
                    Err(back) => back,
                }
            }
            _ => (x, r),
        };
        #[cfg(feature = "frozen")]
        let x = match &self.padding {
            &burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) if matches!(x.dtype(), DType::F32 | DType::F16) && !x.is_autodiff() => {
                let options =
                    burn::tensor::ops::ConvOptions::new_with_padding(self.stride, [(top, bottom), (left, right)], self.dilation, self.groups);
                // An int8-resident weight read in place by our GEMM (no float copy of it).
                let x = match self.weight.reparameterization::<Dequantized>() {
                    Some(q) if q.shape.len() == 4 => {
                        let (wdims, base) = ([q.shape[0], q.shape[1], q.shape[2], q.shape[3]], self.weight.base());
                        match with_residual(x, &r, |x, r| crate::kernels::conv2d_q8(x, &base, wdims, bias.as_ref(), r, &options)) {
                            Ok(y) => return y,
                            Err(x) => x,
                        }
                    }
                    _ => x,
                };
                let weight = self.weight.val();
                match with_residual(x, &r, |x, r| crate::kernels::conv2d(x, &weight, bias.as_ref(), r, &options)) {
                    Ok(y) => return y,
                    Err(x) => x,
                }
            }
            _ => x,
        };
        if x.dtype() != DType::F32 {
            // burn's Conv2d::forward, with the weight and bias in the activations' type.
            let dt = float(&x);
            let pairs = match &self.padding {
                &burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
                burn::nn::PaddingConfig2d::Valid => [(0, 0), (0, 0)],
                // Not loaded by the models ("same" padding): in f32.
                _ => return plus(crate::nn::in_f32(x, |x| self.forward(x)), r),
            };
            let options = burn::tensor::ops::ConvOptions::new_with_padding(self.stride, pairs, self.dilation, self.groups);
            return plus(burn::tensor::module::conv2d(x, self.weight.val().cast(dt), bias.map(|b| b.cast(dt)), options), r);
        }
        plus(self.forward(x), r)
    }
}
