//! Backward through int8-resident weights (`visii_models::resident::Layer::run`): on wgpu the input
//! gradient of a Linear / Conv2d whose weight is int8 on the device equals the one burn's own path
//! computes (which keeps the dequantised f32 weight for the backward pass), for strided and padded
//! convolutions with sizes a stride does not divide; and the autodiff graph holds no f32 weight:
//! after the forward pass of a stack of layers the device holds only the activations.
//! One test function: device memory readings are process-wide.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{Device, DeviceKind, Distribution, Tensor};
use visii_models::resident::{resident_q8, Layer};

fn max_diff(a: Tensor<4>, b: Tensor<4>) -> (f32, f32) {
    let scale = b.clone().abs().max().into_scalar::<f32>();
    ((a - b).abs().max().into_scalar::<f32>(), scale)
}

fn conv(dev: &Device, c_in: usize, c_out: usize, k: usize, stride: usize, pad: usize) -> Conv2d {
    let w = Tensor::<4>::random([c_out, c_in, k, k], Distribution::Normal(0.0, 0.05), dev);
    let b = Tensor::<1>::random([c_out], Distribution::Normal(0.0, 0.1), dev);
    Conv2d {
        weight: Param::from_tensor(w),
        bias: Some(Param::from_tensor(b)),
        stride: [stride, stride],
        kernel_size: [k, k],
        dilation: [1, 1],
        groups: 1,
        padding: PaddingConfig2d::Explicit(pad, pad, pad, pad),
    }
}

fn linear(dev: &Device, d_in: usize, d_out: usize) -> Linear {
    let w = Tensor::<2>::random([d_in, d_out], Distribution::Normal(0.0, 0.05), dev);
    let b = Tensor::<1>::random([d_out], Distribution::Normal(0.0, 0.1), dev);
    Linear { weight: Param::from_tensor(w), bias: Some(Param::from_tensor(b)) }
}

/// Input gradient and output of `f` at `x` for the loss sum(f(x) * r).
fn grad<const D: usize>(x: &Tensor<D>, r: &Tensor<D>, f: impl Fn(Tensor<D>) -> Tensor<D>) -> (Tensor<D>, Tensor<D>) {
    let xa = x.clone().autodiff().require_grad();
    let y = f(xa.clone());
    let grads = (y.clone() * r.clone().autodiff()).sum().backward();
    (xa.grad(&grads).expect("x has a gradient"), y.inner())
}

#[test]
fn frozen_int8_layers_backpropagate_like_burn_and_keep_no_f32_weights() {
    let dev = Device::wgpu(DeviceKind::DefaultDevice);

    // Convolutions: 3x3 stride 1 (UNet resnets), 3x3 stride 2 on even and odd sizes (downsamplers;
    // odd sizes drop a row the backward pass must give back), 1x1 (shortcuts, proj_in).
    for (c_in, c_out, k, stride, pad, hw) in [(32, 64, 3, 1, 1, 12), (64, 64, 3, 2, 1, 12), (32, 32, 3, 2, 1, 9), (128, 64, 1, 1, 0, 7)] {
        let (layer, values) = resident_q8(conv(&dev, c_in, c_out, k, stride, pad));
        assert_eq!(values, c_in * c_out * k * k, "the conv weight is int8");
        let x = Tensor::<4>::random([2, c_in, hw, hw], Distribution::Normal(0.0, 1.0), &dev);
        let out = (hw + 2 * pad - k) / stride + 1;
        let r = Tensor::<4>::random([2, c_out, out, out], Distribution::Normal(0.0, 1.0), &dev);
        let (g_ref, y_ref) = grad(&x, &r, |x| layer.forward(x));
        let (g, y) = grad(&x, &r, |x| layer.run(x));
        assert_eq!(g.dims(), [2, c_in, hw, hw]);
        let (dy, sy) = max_diff(y, y_ref);
        let (dg, sg) = max_diff(g, g_ref);
        println!("conv {c_in}->{c_out} k{k} s{stride} {hw}x{hw}: output {dy:.2e} of {sy:.2}, input grad {dg:.2e} of {sg:.2}");
        assert!(dy <= 1e-5 * sy.max(1.0) && dg <= 1e-5 * sg.max(1.0), "conv {c_in}->{c_out} k{k} s{stride}: {dy} {dg}");
        assert!(sg > 0.1, "the gradient is not empty");
    }

    // Linear on [batch, tokens, features] (attention projections, feed-forward).
    let (lin, values) = resident_q8(linear(&dev, 64, 96));
    assert_eq!(values, 64 * 96);
    let x = Tensor::<3>::random([2, 10, 64], Distribution::Normal(0.0, 1.0), &dev);
    let r = Tensor::<3>::random([2, 10, 96], Distribution::Normal(0.0, 1.0), &dev);
    let (g_ref, y_ref) = grad(&x, &r, |x| lin.forward(x));
    let (g, y) = grad(&x, &r, |x| lin.run(x));
    let (dy, sy) = max_diff(y.unsqueeze(), y_ref.unsqueeze());
    let (dg, sg) = max_diff(g.unsqueeze(), g_ref.unsqueeze());
    println!("linear 64->96: output {dy:.2e} of {sy:.2}, input grad {dg:.2e} of {sg:.2}");
    assert!(dy <= 1e-5 * sy.max(1.0) && dg <= 1e-5 * sg.max(1.0), "linear: {dy} {dg}");

    // Memory: 8 layers of 512 x 512 (1 MiB each as f32), activations [1, 8, 512] (16 KiB). After
    // the forward pass, burn's path holds every dequantised weight for the backward pass; ours none.
    let in_use = || dev.memory_pool_usage().expect("wgpu reports its memory").bytes_in_use;
    let stack: Vec<Linear> = (0..8).map(|_| resident_q8(linear(&dev, 512, 512)).0).collect();
    let x = Tensor::<3>::random([1, 8, 512], Distribution::Normal(0.0, 1.0), &dev);
    let held = |f: &dyn Fn(&Linear, Tensor<3>) -> Tensor<3>| {
        let xa = x.clone().autodiff().require_grad();
        let _ = in_use();
        let base = in_use();
        let y = stack.iter().fold(xa.clone(), |h, l| f(l, h).tanh());
        let _ = y.clone().inner().into_data(); // the forward pass has run
        let bytes = in_use() as i64 - base as i64;
        let g = xa.grad(&y.sum().backward()).unwrap().into_data();
        (bytes, g.try_to_vec::<f32>().unwrap())
    };
    let (burn_bytes, g_ref) = held(&|l, h| l.forward(h));
    let (our_bytes, g) = held(&|l, h| l.run(h));
    let diff = g.iter().zip(&g_ref).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!(
        "8 x Linear 512: held after forward {:.2} MiB (burn) vs {:.2} MiB (frozen); gradient max diff {diff:.2e}",
        burn_bytes as f64 / 1048576.0,
        our_bytes as f64 / 1048576.0
    );
    assert!(diff < 1e-4, "stacked gradients differ by {diff}");
    assert!(burn_bytes >= 7 << 20, "burn's path holds the f32 weights ({burn_bytes} bytes): the comparison means something");
    assert!(our_bytes < 2 << 20, "the frozen path holds no f32 weight ({our_bytes} bytes)");
}
