//! Weights kept as int8 on the device ("resident q8"): each large Linear / Conv2d weight is stored
//! quantised (symmetric int8, one f32 scale per block of 32 values along its last axis, packed
//! four to a u32) and dequantised when a layer runs, so the device holds about 1.1 bytes per
//! weight instead of 4 plus one layer's f32 weight at a time. For applying edits on GPUs with
//! little memory (the full-size UNet: 3.44 GB as f32). Learning also runs on such weights, but does
//! not get smaller: autodiff keeps each layer's dequantised weight until the backward pass.
//!
//! Built on burn's parameter reparameterisation: the stored base of a conv weight
//! `[out, in, kh, kw]` is the quantised `[out, 1, 1, in * kh * kw]` (burn packs int8 along the
//! innermost axis, which must be a multiple of 4 — `kh * kw` alone is not), and `Param::val()`
//! returns the dequantised, reshaped weight. burn 0.22's own quantised conv2d needs that packing
//! too; packing along an outer axis gave wrong values (measured), hence the reshape.

use burn::module::{Module, Param, Reparameterization, Reparameterizer};
use burn::tensor::quantization::{compute_q_params, compute_range, Calibration, QuantScheme, QuantValue, ScaleDtype};
use burn::tensor::{Shape, Tensor};
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
        base.dequantize().reshape(Shape::from(self.shape.clone()))
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
            t.quantize(&scheme, q)
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
