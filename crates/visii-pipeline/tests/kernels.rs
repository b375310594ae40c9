//! Our WGSL kernels (`visii_models::kernels`) against burn's own ops on random inputs of the models'
//! real layer shapes (spatial sizes reduced so lavapipe runs them in seconds): on wgpu, and against
//! ndarray as the reference; convs of every kind the networks use (3x3 stride 1 and 2, the VAE's
//! asymmetric downsampling pad, 1x1 with and without bias, channel counts no tile divides, K not a
//! multiple of the step), Linear layers of rank 2 and 3, and the input gradients of both (the
//! frozen-weight backward step). Tolerances are relative to the largest output: a different
//! summation order moves the last bits, nothing more.
#![allow(deprecated)] // Device::ndarray is deprecated in burn 0.22 but is the reference CPU backend here.

use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, DeviceKind, Distribution, FloatDType, Tensor, TensorData};
use visii_models::kernels;

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// Largest absolute difference relative to the largest reference value.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The rounding a different summation order of `k` products may move an output by, relative to the
/// largest output: 1e-6 up to k = 1024, growing as the square root of `k` (random rounding errors).
fn order_tolerance(k: usize) -> f32 {
    1e-6 * (k as f32 / 1024.0).sqrt().max(1.0)
}

fn on<const D: usize>(t: &Tensor<D>, dev: &Device) -> Tensor<D> {
    Tensor::from_data(t.to_data(), dev)
}

/// The models' GroupNorm (eps 1e-6, the UNet's) with `gamma` and `beta` copied to `dev`.
fn group_norm_on(dev: &Device, gamma: &Tensor<1>, beta: &Tensor<1>, groups: usize) -> visii_models::nn::GroupNorm {
    use burn::module::Param;
    visii_models::nn::GroupNorm {
        gamma: Param::from_tensor(on(gamma, dev)),
        beta: Param::from_tensor(on(beta, dev)),
        num_groups: groups,
        epsilon: 1e-6,
    }
}

/// The models' LayerNorm (eps 1e-5, the transformers') with `gamma` and `beta` copied to `dev`.
fn layer_norm_on(dev: &Device, gamma: &Tensor<1>, beta: &Tensor<1>) -> visii_models::nn::LayerNorm {
    use burn::module::Param;
    visii_models::nn::LayerNorm { gamma: Param::from_tensor(on(gamma, dev)), beta: Param::from_tensor(on(beta, dev)), epsilon: 1e-5 }
}

/// Held by every test that runs the fused attention: one of them forces the rows per invocation
/// (a process-wide setting), which must not reach the others' wide heads (a forced 8 rows of 128
/// would take minutes to compile on lavapipe).
static ATTENTION: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn attention_lock() -> std::sync::MutexGuard<'static, ()> {
    ATTENTION.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn conv2d_matches_burn_and_ndarray() {
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // (batch, c_in, c_out, h, w, k, stride, padding (top, bottom), (left, right), bias)
    let cases: &[(usize, usize, usize, usize, usize, usize, usize, (usize, usize), (usize, usize), bool)] = &[
        (2, 8, 32, 16, 16, 3, 1, (1, 1), (1, 1), true),    // UNet conv_in (8 = latents + image latents), K = 72
        (1, 320, 320, 8, 8, 3, 1, (1, 1), (1, 1), true),   // a resnet conv at the real width
        (3, 64, 96, 9, 11, 3, 2, (1, 1), (1, 1), true),    // UNet downsampler on odd sizes
        (1, 32, 32, 10, 10, 3, 2, (0, 1), (0, 1), true),   // VAE downsampler: pad (0, 1, 0, 1)
        (2, 96, 160, 7, 7, 1, 1, (0, 0), (0, 0), true),    // 1x1 shortcut
        (1, 40, 24, 5, 6, 1, 1, (0, 0), (0, 0), false),    // 1x1 without bias
        (1, 4, 16, 12, 12, 3, 1, (1, 1), (1, 1), true),    // VAE decoder conv_in (4 latent channels)
        (1, 128, 136, 40, 36, 3, 1, (1, 1), (1, 1), true), // several tiles both ways, 136 rows
        (1, 16, 8, 6, 6, 1, 2, (0, 0), (0, 0), true),      // 1x1 with stride: the general path
        // The deepest UNet levels at 8 x 8 latents (1, 2 x 2, 3 x 4, 4 x 5 pixels: the narrow tiles).
        (1, 64, 136, 1, 1, 3, 1, (1, 1), (1, 1), true),
        (1, 32, 40, 2, 2, 3, 1, (1, 1), (1, 1), true),
        (1, 24, 40, 3, 4, 3, 1, (1, 1), (1, 1), false),
        (1, 24, 40, 4, 5, 1, 1, (0, 0), (0, 0), true),
        // The skinny kernel's cases (at most 16 output pixels) at the real widths: the centre tap
        // only (one pixel), a 2 x 2 batch of two (8 columns), 16 pixels, stride 2 down to one pixel
        // (taps 1 and 2), 3 images of one pixel (K 23040: the up blocks' concatenated inputs).
        (1, 1280, 1280, 1, 1, 3, 1, (1, 1), (1, 1), true),
        (2, 640, 64, 2, 2, 3, 1, (1, 1), (1, 1), true),
        (1, 320, 72, 4, 4, 3, 1, (1, 1), (1, 1), false),
        (1, 96, 40, 2, 2, 3, 2, (1, 1), (1, 1), true),
        (3, 2560, 24, 1, 1, 3, 1, (1, 1), (1, 1), true),
        (1, 100, 36, 3, 5, 1, 1, (0, 0), (0, 0), true),
        // Four k per step (`vec4` weight reads: every tap visited, K a multiple of 4) and not: a
        // 2 x 2 conv over 3 channels (K 27), 1x1 over 2 x 1 pixels with K 64 and with K 30.
        (1, 3, 16, 2, 2, 3, 1, (1, 1), (1, 1), true),
        (2, 64, 40, 2, 1, 1, 1, (0, 0), (0, 0), true),
        (1, 30, 20, 2, 1, 1, 1, (0, 0), (0, 0), false),
    ];
    for (&(b, ci, co, h, w, k, s, ph, pw, with_bias), skinny) in cases.iter().flat_map(|c| [(c, true), (c, false)]) {
        let x = Tensor::<4>::random([b, ci, h, w], Distribution::Normal(0.0, 1.0), &gpu);
        let wt = Tensor::<4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = with_bias.then(|| Tensor::<1>::random([co], Distribution::Normal(0.0, 0.5), &gpu));
        let opts = ConvOptions::new_with_padding([s, s], [ph, pw], [1, 1], 1);
        let ours = kernels::conv2d_on(x.clone(), &wt, bias.as_ref(), None, &opts, skinny)
            .unwrap_or_else(|_| panic!("our conv applies to {b}x{ci}x{h}x{w} k{k} s{s}"));
        let burn_gpu = burn::tensor::module::conv2d(x.clone(), wt.clone(), bias.clone(), opts.clone());
        let burn_cpu = burn::tensor::module::conv2d(on(&x, &cpu), on(&wt, &cpu), bias.as_ref().map(|b| on(b, &cpu)), opts.clone());
        assert_eq!(ours.dims(), burn_gpu.dims());
        let (ours, burn_gpu, burn_cpu) = (values(ours), values(burn_gpu), values(burn_cpu));
        let (e_cpu, e_gpu) = (rel(&ours, &burn_cpu), rel(&ours, &burn_gpu));
        let case =
            format!("{b}x{ci}x{h}x{w} -> {co}, k{k} s{s} pad {ph:?} {pw:?} (skinny {skinny}): vs ndarray {e_cpu:.2e}, vs burn wgpu {e_gpu:.2e}");
        println!("{case}");
        // Our tiled GEMM sums each output in k order, as ndarray's im2col GEMM does (measured: equal
        // to the last bit or within 1e-6); burn's direct wgpu conv and our skinny kernel (64 partial
        // sums added as a tree) sum in other orders (measured up to ~2e-6 apart at K = 5760).
        let tol = order_tolerance(ci * k * k);
        assert!(e_cpu < 2.0 * tol && e_gpu < 10.0 * tol, "{case}");
        // The reference itself is sane (not all zeros) for the comparison to mean something.
        assert!(burn_cpu.iter().any(|v| v.abs() > 0.1), "{case}");
    }
}

#[test]
fn linear_matches_burn_and_ndarray() {
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // (leading dims, in, out, bias)
    let cases: &[(&[usize], usize, usize, bool)] = &[
        (&[2, 77], 768, 320, true),  // cross-attention k / v from CLIP states
        (&[3, 64], 320, 2560, true), // GEGLU projection at 8 x 8 latents
        (&[1, 5], 7, 3, false),      // nothing divides anything
        (&[130], 40, 136, true),     // rank 2, several row tiles
        (&[1, 4], 40, 300, true),    // a few tokens: the flat tiles (8, 16 and 32 rows)
        (&[12], 40, 300, true),
        (&[2, 15], 40, 300, false),
        (&[1, 1], 1280, 10240, true), // the mid block's one token (the skinny kernel's cases)
        (&[1, 4], 5120, 1280, true),
        (&[16], 640, 77, false),
    ];
    for (&(lead, k, n, with_bias), skinny) in cases.iter().flat_map(|c| [(c, true), (c, false)]) {
        let w = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = with_bias.then(|| Tensor::<1>::random([n], Distribution::Normal(0.0, 0.5), &gpu));
        let (ours, burn_gpu, burn_cpu) = if lead.len() == 2 {
            let x = Tensor::<3>::random([lead[0], lead[1], k], Distribution::Normal(0.0, 1.0), &gpu);
            let f = |x: Tensor<3>, w: Tensor<2>, b: Option<Tensor<1>>| burn::tensor::module::linear(x, w, b);
            let ours = kernels::linear_on(x.clone(), &w, bias.as_ref(), None, skinny).expect("our linear applies");
            assert_eq!(ours.dims(), [lead[0], lead[1], n]);
            (values(ours), values(f(x.clone(), w.clone(), bias.clone())), values(f(on(&x, &cpu), on(&w, &cpu), bias.as_ref().map(|b| on(b, &cpu)))))
        } else {
            let x = Tensor::<2>::random([lead[0], k], Distribution::Normal(0.0, 1.0), &gpu);
            let f = |x: Tensor<2>, w: Tensor<2>, b: Option<Tensor<1>>| burn::tensor::module::linear(x, w, b);
            let ours = kernels::linear_on(x.clone(), &w, bias.as_ref(), None, skinny).expect("our linear applies");
            (values(ours), values(f(x.clone(), w.clone(), bias.clone())), values(f(on(&x, &cpu), on(&w, &cpu), bias.as_ref().map(|b| on(b, &cpu)))))
        };
        let (e_cpu, e_gpu) = (rel(&ours, &burn_cpu), rel(&ours, &burn_gpu));
        let case = format!("{lead:?}x{k} -> {n} (skinny {skinny}): vs ndarray {e_cpu:.2e}, vs burn wgpu {e_gpu:.2e}");
        println!("{case}");
        // Against ndarray (the reference) within the last bits; burn's wgpu matmul sums in k order like our
        // tiled GEMM (equal to it), the skinny kernel over 64 partial sums (measured up to ~3e-6 from
        // burn's at K = 5120; ndarray's blocked GEMM is ~2e-6 from both there).
        // (4x against ndarray: over one row its blocked GEMM sums in another order; 1 run in 25 measured
        // 2.85e-6 at K = 1280 over 10240 outputs.)
        let tol = order_tolerance(k);
        assert!(e_cpu < 4.0 * tol && e_gpu < 10.0 * tol, "{case}");
    }
}

/// Layers with and without a bias of one shape run one pipeline (the bias is a launch parameter,
/// per row for a conv, per column for a tiled Linear): run in turn, each matches burn's op on
/// ndarray with its own bias or none, never the one launched before.
#[test]
fn a_bias_is_added_only_where_the_launch_has_one() {
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    for skinny in [false, true] {
        // A conv: 3x3 at 8 x 8 (tiled) and over 2 x 2 pixels (skinny where allowed).
        for hw in [8, 2] {
            let x = Tensor::<4>::random([2, 24, hw, hw], Distribution::Normal(0.0, 1.0), &gpu);
            let w = Tensor::<4>::random([40, 24, 3, 3], Distribution::Normal(0.0, 0.1), &gpu);
            let opts = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
            for with_bias in [true, false, true, false] {
                let bias = with_bias.then(|| Tensor::<1>::random([40], Distribution::Normal(0.0, 1.0), &gpu));
                let ours = kernels::conv2d_on(x.clone(), &w, bias.as_ref(), None, &opts, skinny).expect("our conv applies");
                let reference = burn::tensor::module::conv2d(on(&x, &cpu), on(&w, &cpu), bias.as_ref().map(|b| on(b, &cpu)), opts.clone());
                let e = rel(&values(ours), &values(reference));
                assert!(e < 4.0 * order_tolerance(24 * 9), "conv at {hw} x {hw}, bias {with_bias}, skinny {skinny}: {e:.2e}");
            }
        }
        // A Linear over 30 rows (tiled) and over 3 (skinny where allowed).
        for rows in [30, 3] {
            let x = Tensor::<2>::random([rows, 40], Distribution::Normal(0.0, 1.0), &gpu);
            let w = Tensor::<2>::random([40, 300], Distribution::Normal(0.0, 0.1), &gpu);
            for with_bias in [true, false, true, false] {
                let bias = with_bias.then(|| Tensor::<1>::random([300], Distribution::Normal(0.0, 1.0), &gpu));
                let ours = kernels::linear_on(x.clone(), &w, bias.as_ref(), None, skinny).expect("our linear applies");
                let reference = burn::tensor::module::linear(on(&x, &cpu), on(&w, &cpu), bias.as_ref().map(|b| on(b, &cpu)));
                let e = rel(&values(ours), &values(reference));
                assert!(e < 4.0 * order_tolerance(40), "linear over {rows} rows, bias {with_bias}, skinny {skinny}: {e:.2e}");
            }
        }
    }
}

/// Held by the tests that switch the epilogue's residual (a process-wide setting).
static EPILOGUE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn conv_layer(dev: &Device, w: &Tensor<4>, bias: &Tensor<1>, s: usize, p: usize) -> burn::nn::conv::Conv2d {
    let k = w.dims()[2];
    burn::nn::conv::Conv2d {
        weight: burn::module::Param::from_tensor(on(w, dev)),
        bias: Some(burn::module::Param::from_tensor(on(bias, dev))),
        stride: [s, s],
        kernel_size: [k, k],
        dilation: [1, 1],
        groups: 1,
        padding: burn::nn::PaddingConfig2d::Explicit(p, p, p, p),
    }
}

fn linear_layer(dev: &Device, w: &Tensor<2>, bias: &Tensor<1>) -> burn::nn::Linear {
    burn::nn::Linear { weight: burn::module::Param::from_tensor(on(w, dev)), bias: Some(burn::module::Param::from_tensor(on(bias, dev))) }
}

#[test]
fn residuals_added_in_the_epilogue_match_burn() {
    use visii_models::resident::Layer;
    let _lock = EPILOGUE.lock().unwrap_or_else(|e| e.into_inner());
    kernels::set_epilogue(true);
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // (batch, c_in, size, c_out, k, stride, padding): a resnet's 3x3 conv at 8 x 8 (stores in fours),
    // 5 x 5 (one at a time), the deepest levels' 2 x 2 and 1 x 1 (the skinny kernel where allowed),
    // a pointwise conv, a stride-2 one.
    let convs = [
        (2, 16, 8, 64, 3, 1, 1),
        (2, 8, 5, 12, 3, 1, 1),
        (2, 32, 2, 48, 3, 1, 1),
        (3, 40, 1, 24, 3, 1, 1),
        (2, 16, 8, 24, 1, 1, 0),
        (2, 8, 9, 16, 3, 2, 1),
    ];
    for (&(b, ci, hw, co, k, s, p), skinny) in convs.iter().flat_map(|c| [(c, true), (c, false)]) {
        let x = Tensor::<4>::random([b, ci, hw, hw], Distribution::Normal(0.0, 1.0), &gpu);
        let w = Tensor::<4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = Tensor::<1>::random([co], Distribution::Normal(0.0, 0.5), &gpu);
        let opts = ConvOptions::new([s, s], [p, p], [1, 1], 1);
        let out = (hw + 2 * p - k) / s + 1;
        // A skip connection (the output's shape), a time embedding (one value per image and channel),
        // and a skip that is a view (transposed: read as its values).
        let full = Tensor::<4>::random([b, co, out, out], Distribution::Normal(0.0, 2.0), &gpu);
        let per_image = Tensor::<4>::random([b, co, 1, 1], Distribution::Normal(0.0, 2.0), &gpu);
        let view = Tensor::<4>::random([b, co, out, out], Distribution::Normal(0.0, 2.0), &gpu).swap_dims(2, 3);
        for (what, r) in [("skip", full), ("per image", per_image), ("transposed skip", view)] {
            let ours = kernels::conv2d_on(x.clone(), &w, Some(&bias), Some(&r), &opts, skinny)
                .unwrap_or_else(|_| panic!("our conv + {what} applies to {b}x{ci}x{hw}x{hw} k{k} s{s}"));
            let plain = |dev: &Device| burn::tensor::module::conv2d(on(&x, dev), on(&w, dev), Some(on(&bias, dev)), opts.clone()) + on(&r, dev);
            let (ours, reference, burn_gpu) = (values(ours), values(plain(&cpu)), values(plain(&gpu)));
            let (e_cpu, e_gpu) = (rel(&ours, &reference), rel(&ours, &burn_gpu));
            let case =
                format!("conv {b}x{ci}x{hw}x{hw} -> {co} k{k} s{s} + {what} (skinny {skinny}): vs ndarray {e_cpu:.2e}, vs burn wgpu {e_gpu:.2e}");
            println!("{case}");
            let tol = order_tolerance(ci * k * k);
            assert!(e_cpu < 2.0 * tol && e_gpu < 10.0 * tol, "{case}");
            // The layer: the same values as its output plus the residual.
            let layer = conv_layer(&gpu, &w, &bias, s, p);
            assert!(rel(&values(layer.run_add(x.clone(), r.clone())), &reference) < 2.0 * tol, "{case}: Layer::run_add");
        }
        // What the epilogue does not take is handed back: a residual broadcast over the batch, or of
        // another type; the layer adds it after its kernel (our GEMM still runs the layer).
        let shared = Tensor::<4>::random([1, co, out, out], Distribution::Normal(0.0, 2.0), &gpu);
        assert!(kernels::conv2d_on(x.clone(), &w, Some(&bias), Some(&shared), &opts, skinny).is_err());
        let half = shared.clone().expand([b, co, out, out]).cast(FloatDType::F16);
        assert!(kernels::conv2d_on(x.clone(), &w, Some(&bias), Some(&half.reshape([b, co, out, out])), &opts, skinny).is_err());
        let layer = conv_layer(&gpu, &w, &bias, s, p);
        let reference = burn::tensor::module::conv2d(on(&x, &cpu), on(&w, &cpu), Some(on(&bias, &cpu)), opts.clone()) + on(&shared, &cpu);
        assert!(rel(&values(layer.run_add(x.clone(), shared)), &values(reference)) < 2.0 * order_tolerance(ci * k * k));
    }
    // Linear: 66 rows (the tiled GEMM, stores in fours), 130 rows of 136 outputs, 3 and 1 rows (the
    // skinny kernel where allowed; 96 outputs read four at a time, 70 one at a time).
    for (&(lead, k, n), skinny) in
        [([2, 33], 40, 72), ([1, 130], 40, 136), ([1, 3], 64, 96), ([1, 1], 128, 70)].iter().flat_map(|c| [(c, true), (c, false)])
    {
        let x = Tensor::<3>::random([lead[0], lead[1], k], Distribution::Normal(0.0, 1.0), &gpu);
        let w = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = Tensor::<1>::random([n], Distribution::Normal(0.0, 0.5), &gpu);
        let r = Tensor::<3>::random([lead[0], lead[1], n], Distribution::Normal(0.0, 2.0), &gpu);
        let ours = values(kernels::linear_on(x.clone(), &w, Some(&bias), Some(&r), skinny).expect("our linear + residual applies"));
        let reference = values(burn::tensor::module::linear(on(&x, &cpu), on(&w, &cpu), Some(on(&bias, &cpu))) + on(&r, &cpu));
        let e = rel(&ours, &reference);
        let case = format!("linear {lead:?} x {k} -> {n} + residual (skinny {skinny}): vs ndarray {e:.2e}");
        println!("{case}");
        assert!(e < 4.0 * order_tolerance(k), "{case}");
        let layer = linear_layer(&gpu, &w, &bias);
        assert!(rel(&values(layer.run_add(x.clone(), r.clone())), &reference) < 4.0 * order_tolerance(k), "{case}: Layer::run_add");
        // One value per row is not a Linear's residual: handed back, added after by the layer.
        let per_row = Tensor::<3>::random([lead[0], lead[1], 1], Distribution::Normal(0.0, 2.0), &gpu);
        assert!(kernels::linear_on(x.clone(), &w, Some(&bias), Some(&per_row), skinny).is_err());
        let reference = burn::tensor::module::linear(on(&x, &cpu), on(&w, &cpu), Some(on(&bias, &cpu))) + on(&per_row, &cpu);
        assert!(rel(&values(layer.run_add(x, per_row)), &values(reference)) < 4.0 * order_tolerance(k));
    }
}

/// `f(x, r)` and the gradients of `x` and `r` for the loss `sum(f(x, r) * g)`.
fn output_and_grads<const D: usize>(
    f: &dyn Fn(Tensor<D>, Tensor<D>) -> Tensor<D>,
    x: &Tensor<D>,
    r: &Tensor<D>,
    g: &Tensor<D>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (xa, ra) = (x.clone().autodiff().require_grad(), r.clone().autodiff().require_grad());
    let y = f(xa.clone(), ra.clone());
    let grads = (y.clone() * g.clone().autodiff()).sum().backward();
    (values(y.inner()), values(xa.grad(&grads).expect("x has a gradient")), values(ra.grad(&grads).expect("r has a gradient")))
}

#[test]
fn layers_with_a_residual_backpropagate_like_ndarray() {
    use visii_models::resident::Layer;
    let _lock = EPILOGUE.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // `sum((layer(x) + r) * g)`: the gradients of `x` and of `r` (the output's gradient, summed over
    // the pixels for a per-image `r`), with the epilogue's step and with burn's add after the layer.
    let grads = output_and_grads::<4>;
    // A 3x3 conv at 8 x 8 (the transposed-conv GEMM backward), over 2 x 2 (the skinny kernels), a
    // 1x1 conv; each with a skip and with a per-image time embedding.
    for (b, ci, hw, co, k, p) in [(2, 24, 8, 40, 3, 1), (2, 40, 2, 72, 3, 1), (1, 48, 4, 40, 1, 0)] {
        let x = Tensor::<4>::random([b, ci, hw, hw], Distribution::Normal(0.0, 1.0), &gpu);
        let w = Tensor::<4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = Tensor::<1>::random([co], Distribution::Normal(0.0, 0.5), &gpu);
        let g = Tensor::<4>::random([b, co, hw, hw], Distribution::Normal(0.0, 1.0), &gpu);
        let (lg, lc) = (conv_layer(&gpu, &w, &bias, 1, p), conv_layer(&cpu, &w, &bias, 1, p));
        for r in [
            Tensor::<4>::random([b, co, hw, hw], Distribution::Normal(0.0, 2.0), &gpu),
            Tensor::<4>::random([b, co, 1, 1], Distribution::Normal(0.0, 2.0), &gpu),
        ] {
            let what = format!("conv {b}x{ci}x{hw}x{hw} -> {co} k{k} + {:?}", r.dims());
            let reference = grads(&|x, r| lc.forward(x) + r, &on(&x, &cpu), &on(&r, &cpu), &on(&g, &cpu));
            for epilogue in [true, false] {
                kernels::set_epilogue(epilogue);
                let ours = grads(&|x, r| lg.run_add(x, r), &x, &r, &g);
                let e = [rel(&ours.0, &reference.0), rel(&ours.1, &reference.1), rel(&ours.2, &reference.2)];
                println!("{what} (epilogue {epilogue}): output, x and r gradients vs ndarray {:.2e} {:.2e} {:.2e}", e[0], e[1], e[2]);
                assert!(e[0] < 2.0 * order_tolerance(ci * k * k) && e[1] < 5e-6 && e[2] < 1e-6, "{what} (epilogue {epilogue}): {e:?}");
            }
            assert!(reference.1.iter().any(|v| v.abs() > 0.1) && reference.2.iter().any(|v| v.abs() > 0.1));
        }
    }
    // Linear: 66 rows (tiled) and 4 (skinny).
    for lead in [[2, 33], [1, 4]] {
        let x = Tensor::<3>::random([lead[0], lead[1], 96], Distribution::Normal(0.0, 1.0), &gpu);
        let w = Tensor::<2>::random([96, 72], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = Tensor::<1>::random([72], Distribution::Normal(0.0, 0.5), &gpu);
        let r = Tensor::<3>::random([lead[0], lead[1], 72], Distribution::Normal(0.0, 2.0), &gpu);
        let g = Tensor::<3>::random([lead[0], lead[1], 72], Distribution::Normal(0.0, 1.0), &gpu);
        let (lg, lc) = (linear_layer(&gpu, &w, &bias), linear_layer(&cpu, &w, &bias));
        let run = output_and_grads::<3>;
        let reference = run(&|x, r| lc.forward(x) + r, &on(&x, &cpu), &on(&r, &cpu), &on(&g, &cpu));
        for epilogue in [true, false] {
            kernels::set_epilogue(epilogue);
            let ours = run(&|x, r| lg.run_add(x, r), &x, &r, &g);
            let e = [rel(&ours.0, &reference.0), rel(&ours.1, &reference.1), rel(&ours.2, &reference.2)];
            println!(
                "linear {lead:?} x 96 -> 72 + residual (epilogue {epilogue}): output, x and r gradients vs ndarray {:.2e} {:.2e} {:.2e}",
                e[0], e[1], e[2]
            );
            assert!(e[0] < 4.0 * order_tolerance(96) && e[1] < 5e-6 && e[2] < 1e-6, "linear {lead:?} (epilogue {epilogue}): {e:?}");
        }
        // A residual that is a view (a transformer's sequence, `swap_dims` of the NCHW image), made
        // contiguous inside autodiff (`fused::contiguous`): the same values, its gradient passed on.
        let rt = r.clone().swap_dims(1, 2).into_data();
        let rt = Tensor::<3>::from_data(rt, &gpu);
        let view = |t: Tensor<3>| visii_models::fused::contiguous(t.swap_dims(1, 2));
        let ours = run(&|x, r| lg.run_add(x, view(r)), &x, &rt, &g);
        let reference_t = run(&|x, r| lc.forward(x) + r.swap_dims(1, 2), &on(&x, &cpu), &on(&rt, &cpu), &on(&g, &cpu));
        let e = [rel(&ours.0, &reference_t.0), rel(&ours.1, &reference_t.1), rel(&ours.2, &reference_t.2)];
        println!("linear {lead:?} x 96 -> 72 + a transposed residual: output, x and r gradients vs ndarray {:.2e} {:.2e} {:.2e}", e[0], e[1], e[2]);
        assert!(e[0] < 4.0 * order_tolerance(96) && e[1] < 5e-6 && e[2] < 1e-6, "linear {lead:?} + a view: {e:?}");
    }
    kernels::set_epilogue(true);
}

#[test]
fn inputs_that_are_views_are_read_as_their_values() {
    // A transposed (non-contiguous) input and a sliced one: the kernel must see the logical values.
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let x = Tensor::<4>::random([1, 12, 10, 16], Distribution::Normal(0.0, 1.0), &gpu).swap_dims(1, 3); // [1, 16, 10, 12]
    let w = Tensor::<4>::random([8, 16, 3, 3], Distribution::Normal(0.0, 0.1), &gpu);
    let opts = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
    let ours = values(kernels::conv2d(x.clone(), &w, None, None, &opts).expect("applies"));
    let reference = values(burn::tensor::module::conv2d(x, w, None, opts));
    assert!(rel(&ours, &reference) < 2e-6);
    let x = Tensor::<3>::random([2, 9, 24], Distribution::Normal(0.0, 1.0), &gpu).slice([0..2, 0..9, 8..24]);
    let w = Tensor::<2>::from_data(TensorData::new((0..16 * 5).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), [16, 5]), &gpu);
    let ours = values(kernels::linear(x.clone(), &w, None, None).expect("applies"));
    let reference = values(x.matmul(w.unsqueeze()));
    assert!(rel(&ours, &reference) < 2e-6);
}

/// Input gradient of `f` at `x` for the loss `sum(f(x) * r)`, on `x`'s device.
fn input_grad<const D: usize>(x: &Tensor<D>, r: &Tensor<D>, f: impl Fn(Tensor<D>) -> Tensor<D>) -> Vec<f32> {
    let xa = x.clone().autodiff().require_grad();
    let grads = (f(xa.clone()) * r.clone().autodiff()).sum().backward();
    values(xa.grad(&grads).expect("x has a gradient"))
}

#[test]
fn frozen_f32_layers_backpropagate_through_our_kernels_like_ndarray() {
    use visii_models::resident::Layer;
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // 3x3 stride 1 (our transposed-conv GEMM), 1x1 (the pointwise one), 3x3 stride 2 on an odd
    // size (burn's conv_transpose2d behind our forward); the deepest levels' few pixels (the
    // skinny kernel with the flipped weight): one pixel (the centre tap only), two images of
    // 2 x 2 (8 columns, every tap), a 1x1 conv over 4 pixels.
    let cases = [
        (2, 24, 40, 10, 3, 1, 1),
        (1, 64, 48, 7, 1, 1, 0),
        (1, 16, 24, 9, 3, 2, 1),
        (1, 96, 80, 1, 3, 1, 1),
        (2, 40, 72, 2, 3, 1, 1),
        (1, 48, 40, 2, 1, 1, 0),
    ];
    for (b, ci, co, hw, k, s, p) in cases {
        let conv = |dev: &Device, w: &Tensor<4>, bias: &Tensor<1>| conv_layer(dev, w, bias, s, p);
        let w = Tensor::<4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = Tensor::<1>::random([co], Distribution::Normal(0.0, 0.5), &gpu);
        let x = Tensor::<4>::random([b, ci, hw, hw], Distribution::Normal(0.0, 1.0), &gpu);
        let out = (hw + 2 * p - k) / s + 1;
        let r = Tensor::<4>::random([b, co, out, out], Distribution::Normal(0.0, 1.0), &gpu);
        let (layer_gpu, layer_cpu) = (conv(&gpu, &w, &bias), conv(&cpu, &w, &bias));
        let ours = input_grad(&x, &r, |x| layer_gpu.run(x));
        let reference = input_grad(&on(&x, &cpu), &on(&r, &cpu), |x| layer_cpu.forward(x));
        let e = rel(&ours, &reference);
        println!("conv {b}x{ci}x{hw}x{hw} -> {co}, k{k} s{s}: input gradient vs ndarray {e:.2e}");
        assert!(e < 5e-6, "conv k{k} s{s}: {e}");
        assert!(reference.iter().any(|v| v.abs() > 0.1));
    }
    // 66 rows (the tiled GEMM) and 4 (the skinny kernel); 72 outputs (the skinny kernel reads
    // four at a time) and 70 (one at a time).
    for (lead, n) in [([2, 33], 72), ([1, 4], 72), ([1, 4], 70)] {
        let w = Tensor::<2>::random([96, n], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = Tensor::<1>::random([n], Distribution::Normal(0.0, 0.5), &gpu);
        let (lg, lc) = (linear_layer(&gpu, &w, &bias), linear_layer(&cpu, &w, &bias));
        let x = Tensor::<3>::random([lead[0], lead[1], 96], Distribution::Normal(0.0, 1.0), &gpu);
        let r = Tensor::<3>::random([lead[0], lead[1], n], Distribution::Normal(0.0, 1.0), &gpu);
        let ours = input_grad(&x, &r, |x| lg.run(x));
        let reference = input_grad(&on(&x, &cpu), &on(&r, &cpu), |x| lc.forward(x));
        let e = rel(&ours, &reference);
        println!("linear {lead:?} x 96 -> {n}: input gradient vs ndarray {e:.2e}");
        assert!(e < 5e-6, "linear {lead:?} -> {n}: {e}");
    }
}

#[test]
fn group_norm_silu_and_layer_norm_match_ndarray() {
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // (shape, groups): UNet resnet norms (32 groups), the VAE's at a larger size, a batch of
    // three guidance rows, an offset mean (the two-pass variance must not cancel), and short
    // rows: of 1, 2, 6, 12 and 64 values (1, 1, 2, 4 and 16 lanes per row, many rows per
    // workgroup).
    let cases: &[(&[usize], usize, f32)] = &[
        (&[1, 320, 8, 8], 32, 0.0),
        (&[1, 128, 48, 40], 32, 0.0),
        (&[3, 64, 6, 6], 32, 0.0),
        (&[2, 48, 9, 7], 4, 100.0),
        (&[3, 96, 1, 1], 96, 0.0),
        (&[5, 64, 1, 2], 64, 3.0),
        (&[2, 64, 1, 6], 64, 0.0),
        (&[3, 32, 3, 4], 32, 1.0),
        (&[1, 64, 8, 8], 64, 0.0),
    ];
    for &(shape, groups, offset) in cases {
        let c = shape[1];
        let x = Tensor::<4>::random([shape[0], shape[1], shape[2], shape[3]], Distribution::Normal(offset as f64, 2.0), &gpu);
        let gamma = Tensor::<1>::random([c], Distribution::Normal(1.0, 0.3), &gpu);
        let beta = Tensor::<1>::random([c], Distribution::Normal(0.0, 0.3), &gpu);
        for silu in [false, true] {
            let ours = values(kernels::group_norm(x.clone(), &gamma, &beta, groups, 1e-6, silu).expect("our group norm applies"));
            // The reference: the models' own GroupNorm (burn's ops) on ndarray.
            let gn = group_norm_on(&cpu, &gamma, &beta, groups);
            let reference = if silu { gn.forward_silu(on(&x, &cpu)) } else { gn.forward(on(&x, &cpu)) };
            let e = rel(&ours, &values(reference));
            println!("group norm {shape:?} / {groups} (mean {offset}), silu {silu}: vs ndarray {e:.2e}");
            assert!(e < 1e-5, "{shape:?} silu {silu}: {e}");
        }
    }
    // LayerNorm over the last axis of [b, tokens, c]: CLIP's width at 77 tokens; the tiny text
    // encoder's 32 channels over thousands of rows (8 lanes per row, 32 rows per workgroup; 3001
    // rows end in a part-filled workgroup); 1, 3 and 1100 channels (1, 1 and 256 lanes).
    for [b, n, c] in [[2, 77, 320], [1, 3001, 32], [4, 7, 1], [2, 5, 3], [1, 6, 1100]] {
        let x = Tensor::<3>::random([b, n, c], Distribution::Normal(0.5, 1.5), &gpu);
        let gamma = Tensor::<1>::random([c], Distribution::Normal(1.0, 0.3), &gpu);
        let beta = Tensor::<1>::random([c], Distribution::Normal(0.0, 0.3), &gpu);
        let ours = values(kernels::layer_norm(x.clone(), &gamma, &beta, 1e-5).expect("our layer norm applies"));
        let reference = values(burn::tensor::module::layer_norm(on(&x, &cpu), on(&gamma, &cpu), Some(on(&beta, &cpu)), 1e-5));
        let e = rel(&ours, &reference);
        println!("layer norm [{b}, {n}, {c}]: vs ndarray {e:.2e}");
        assert!(e < 1e-5, "layer norm [{b}, {n}, {c}]: {e}");
    }
}

/// The input gradient of a norm (GroupNorm over rows of `len` values, `s` values per channel of `c`;
/// LayerNorm: `s = 1`, `len = c`) + SiLU where asked, for the loss `sum(out * r)`, in f64 on the host:
/// the truth both f32 computations are measured against.
#[allow(clippy::too_many_arguments)]
fn norm_grad_f64(x: &[f32], r: &[f32], gamma: &[f32], beta: &[f32], len: usize, s: usize, eps: f64, silu: bool) -> Vec<f32> {
    let c = gamma.len();
    let mut dx = vec![0f32; x.len()];
    for (row, xs) in x.chunks(len).enumerate() {
        let base = row * len;
        let n = len as f64;
        let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + eps).sqrt();
        let terms: Vec<(f64, f64)> = (0..len)
            .map(|j| {
                let i = base + j;
                let ch = (i / s) % c;
                let xh = (x[i] as f64 - mean) * rstd;
                let (gm, bt) = (gamma[ch] as f64, beta[ch] as f64);
                let y = gm * xh + bt;
                let sg = 1.0 / (1.0 + (-y).exp());
                let d = if silu { r[i] as f64 * sg * (1.0 + y * (1.0 - sg)) } else { r[i] as f64 };
                (d * gm, xh)
            })
            .collect();
        let a = terms.iter().map(|t| t.0).sum::<f64>() / n;
        let b = terms.iter().map(|t| t.0 * t.1).sum::<f64>() / n;
        for (j, (g, xh)) in terms.into_iter().enumerate() {
            dx[base + j] = (rstd * (g - a - xh * b)) as f32;
        }
    }
    dx
}

/// How much the normalisation of rows of `len` values magnifies a relative error of `x`: the largest
/// `max |x| / std` of a row. `x`'s own f32 rounding (relative 6e-8) moves `x̂` by up to 6e-8 times
/// this, and the gradient with it: large where a row's few values lie close around a mean far from 0.
/// (Rows of one value normalise to 0 whatever it is: 0.)
fn norm_condition(x: &[f32], len: usize) -> f32 {
    if len < 2 {
        return 0.0;
    }
    x.chunks(len)
        .map(|xs| {
            let n = len as f64;
            let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
            let std = (xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            (xs.iter().fold(0f64, |m, &v| m.max((v as f64).abs())) / std.max(1e-30)) as f32
        })
        .fold(0f32, f32::max)
}

/// Held by the tests that switch the fused norm and GEGLU steps (a process-wide setting) or rely on them.
static FUSED_STEPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn fused_norm_backward_matches_ndarray() {
    use visii_models::nn::GroupNorm;
    let _lock = FUSED_STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    visii_models::fused::set_steps_enabled(true);
    // (shape, groups, mean): the GroupNorm cases of the forward test (UNet resnets, the VAE's size,
    // three guidance rows, an offset mean, rows of 1 to 64 values), and a row longer than the
    // workgroup's lanes cover many times over. Not rows of two values: they normalise to about -1
    // and 1 whatever the values, and the gradient, `rstd * eps / (var + eps) * (g1 - g2) / 2`, is
    // ill-conditioned (both f32 computations measured 1e-3 to 2e-2 from the f64 truth).
    let cases: &[(&[usize], usize, f32)] = &[
        (&[1, 320, 8, 8], 32, 0.0),
        (&[2, 128, 24, 20], 32, 0.0),
        (&[3, 64, 6, 6], 32, 0.0),
        (&[2, 48, 9, 7], 4, 100.0),
        (&[3, 96, 1, 1], 96, 0.0),
        (&[5, 64, 1, 3], 64, 3.0),
        (&[3, 32, 3, 4], 32, 1.0),
        (&[1, 64, 40, 40], 2, 0.0),
    ];
    for &(shape, groups, offset) in cases {
        let shape4 = [shape[0], shape[1], shape[2], shape[3]];
        let c = shape[1];
        let x = Tensor::<4>::random(shape4, Distribution::Normal(offset as f64, 2.0), &gpu);
        let r = Tensor::<4>::random(shape4, Distribution::Normal(0.0, 1.0), &gpu);
        let gamma = Tensor::<1>::random([c], Distribution::Normal(1.0, 0.3), &gpu);
        let beta = Tensor::<1>::random([c], Distribution::Normal(0.0, 0.3), &gpu);
        let (ng, nc) = (group_norm_on(&gpu, &gamma, &beta, groups), group_norm_on(&cpu, &gamma, &beta, groups));
        for silu in [false, true] {
            let probe = visii_models::fused::group_norm(x.clone().autodiff(), &ng.gamma.val(), &ng.beta.val(), groups, 1e-6, silu, false);
            assert!(probe.is_ok(), "the fused norm step applies to {shape:?} / {groups}");
            let run = |n: &GroupNorm, x: Tensor<4>| if silu { n.forward_silu(x) } else { n.forward(x) };
            let ours = input_grad(&x, &r, |x| run(&ng, x));
            let reference = input_grad(&on(&x, &cpu), &on(&r, &cpu), |x| run(&nc, x));
            let (gv, bv) = (values(gamma.clone()), values(beta.clone()));
            let truth =
                norm_grad_f64(&values(x.clone()), &values(r.clone()), &gv, &bv, c / groups * shape[2] * shape[3], shape[2] * shape[3], 1e-6, silu);
            let (e, e_burn) = (rel(&ours, &truth), rel(&reference, &truth));
            let kappa = norm_condition(&values(x.clone()), c / groups * shape[2] * shape[3]);
            let case = format!(
                "group norm {shape:?} / {groups} (mean {offset}), silu {silu}: input gradient vs f64 {e:.2e}, burn's on ndarray {e_burn:.2e}, condition {kappa:.0}"
            );
            println!("{case}");
            // As close as burn's own chain, or closer; or within what the rounding of `x` alone allows
            // (rows of 3 values with a mean of 3 can lie within 0.01 of it: over 150 runs the error
            // reached 2.8e-4 at a condition of 529, and 6.8e-7 times the condition at most).
            assert!(e < 2e-5_f32.max(2.0 * e_burn).max(4e-6 * kappa), "{case}");
            assert!(truth.iter().any(|v| v.abs() > 0.01) || c / groups * shape[2] * shape[3] == 1, "{case}");
            if c / groups * shape[2] * shape[3] == 1 {
                // Groups of one value normalise to 0 whatever the value: no gradient at all.
                assert!(ours.iter().all(|v| *v == 0.0), "{case}");
            }
        }
    }
    // LayerNorm over the last axis: CLIP's and the transformers' widths, many short rows, 1 channel
    // (its input gradient is zero: check it is, exactly), 3 channels, a row wider than 256 lanes.
    for [b, n, c] in [[2, 77, 320], [1, 301, 32], [4, 7, 1], [2, 5, 3], [1, 6, 1100]] {
        let x = Tensor::<3>::random([b, n, c], Distribution::Normal(0.5, 1.5), &gpu);
        let r = Tensor::<3>::random([b, n, c], Distribution::Normal(0.0, 1.0), &gpu);
        let gamma = Tensor::<1>::random([c], Distribution::Normal(1.0, 0.3), &gpu);
        let beta = Tensor::<1>::random([c], Distribution::Normal(0.0, 0.3), &gpu);
        assert!(visii_models::fused::group_norm(x.clone().autodiff(), &gamma, &beta, 1, 1e-5, false, true).is_ok());
        let (lg, lc) = (layer_norm_on(&gpu, &gamma, &beta), layer_norm_on(&cpu, &gamma, &beta));
        let ours = input_grad(&x, &r, |x| lg.forward(x));
        let reference = input_grad(&on(&x, &cpu), &on(&r, &cpu), |x| lc.forward(x));
        let truth = norm_grad_f64(&values(x.clone()), &values(r.clone()), &values(gamma.clone()), &values(beta.clone()), c, 1, 1e-5, false);
        let (e, e_burn) = (rel(&ours, &truth), rel(&reference, &truth));
        let kappa = norm_condition(&values(x.clone()), c);
        let case = format!("layer norm [{b}, {n}, {c}]: input gradient vs f64 {e:.2e}, burn's on ndarray {e_burn:.2e}, condition {kappa:.0}");
        println!("{case}");
        if c == 1 {
            assert!(ours.iter().all(|v| *v == 0.0), "{case}: {ours:?}");
            continue;
        }
        assert!(e < 2e-5_f32.max(2.0 * e_burn).max(4e-6 * kappa), "{case}");
        assert!(truth.iter().any(|v| v.abs() > 0.01), "{case}");
    }
    // Inputs that are views (a transposed tensor, as attention's reshapes make): the step reads
    // their values and the gradient reaches the view's source.
    {
        let src = Tensor::<4>::random([2, 64, 6, 5], Distribution::Normal(0.0, 1.5), &gpu);
        let r = Tensor::<4>::random([2, 64, 5, 6], Distribution::Normal(0.0, 1.0), &gpu);
        let gamma = Tensor::<1>::random([64], Distribution::Normal(1.0, 0.3), &gpu);
        let beta = Tensor::<1>::random([64], Distribution::Normal(0.0, 0.3), &gpu);
        let (ng, nc) = (group_norm_on(&gpu, &gamma, &beta, 32), group_norm_on(&cpu, &gamma, &beta, 32));
        let grad_of_src = |n: &GroupNorm, src: &Tensor<4>, r: &Tensor<4>| {
            input_grad(src, &r.clone().swap_dims(2, 3), |s| n.forward_silu(s.swap_dims(2, 3)).swap_dims(2, 3))
        };
        let ours = grad_of_src(&ng, &src, &r);
        let reference = grad_of_src(&nc, &on(&src, &cpu), &on(&r, &cpu));
        let e = rel(&ours, &reference);
        println!("group norm + silu of a transposed view: input gradient vs ndarray {e:.2e}");
        assert!(e < 2e-5, "a transposed view: {e:.2e}");
        let h = Tensor::<3>::random([2, 6, 2 * 9], Distribution::Normal(0.0, 2.0), &gpu);
        let r = Tensor::<3>::random([6, 2, 9], Distribution::Normal(0.0, 1.0), &gpu);
        let geglu_of_view =
            |h: &Tensor<3>, r: &Tensor<3>| input_grad(h, &r.clone().swap_dims(0, 1), |h| visii_models::nn::geglu(h.swap_dims(0, 1)).swap_dims(0, 1));
        let e = rel(&geglu_of_view(&h, &r), &geglu_of_view(&on(&h, &cpu), &on(&r, &cpu)));
        println!("geglu of a transposed view: input gradient vs ndarray {e:.2e}");
        assert!(e < 2e-6, "geglu of a transposed view: {e:.2e}");
    }
    // Not for: tensors outside autodiff, a scale inside autodiff, groups that do not divide the
    // channels, ndarray, the step switched off.
    let x = Tensor::<4>::random([1, 8, 3, 3], Distribution::Normal(0.0, 1.0), &gpu);
    let (g, b) = (Tensor::<1>::ones([8], &gpu), Tensor::<1>::zeros([8], &gpu));
    let step = |x: Tensor<4>, g: &Tensor<1>, groups: usize| visii_models::fused::group_norm(x, g, &b, groups, 1e-5, true, false);
    assert!(step(x.clone(), &g, 4).is_err(), "outside autodiff");
    assert!(step(x.clone().autodiff(), &g.clone().autodiff().require_grad(), 4).is_err(), "gamma being learnt");
    assert!(step(x.clone().autodiff(), &g, 3).is_err(), "3 groups of 8 channels");
    assert!(visii_models::fused::group_norm(on(&x, &cpu).autodiff(), &on(&g, &cpu), &on(&b, &cpu), 4, 1e-5, true, false).is_err(), "ndarray");
    visii_models::fused::set_steps_enabled(false);
    assert!(step(x.clone().autodiff(), &g, 4).is_err(), "switched off");
    visii_models::fused::set_steps_enabled(true);
    let back = step(x.clone().autodiff(), &g, 3).expect_err("3 groups");
    assert_eq!(values(back), values(x), "handed back as it came");
}

/// GEGLU of `h` `[rows, 2F]` and the gradient of `h` for the loss `sum(out * r)`, in f64 on the host
/// (exact GELU, [`erf64`]).
fn geglu_f64(h: &[f32], r: &[f32], f: usize) -> (Vec<f32>, Vec<f32>) {
    let (y, dh, _) = geglu_f64_scaled(h, r, f);
    (y, dh)
}

/// [`geglu_f64`], and the scale an error in `Φ(g)` is multiplied by: `|a·g|` for the output,
/// `|d·g|` and `|d·a|` for the two halves of the gradient (the largest of each). An f32 `Φ` is
/// off by an absolute ~1e-7 however small it is (PyTorch's `(1 + erf) / 2` too), so where the
/// gates are strongly negative the outputs are near 0 and that error is measured against this
/// scale: a few random values can all be gated off.
fn geglu_f64_scaled(h: &[f32], r: &[f32], f: usize) -> (Vec<f32>, Vec<f32>, [f32; 2]) {
    let (mut y, mut dh, mut scale) = (vec![0f32; h.len() / 2], vec![0f32; h.len()], [0f32; 2]);
    for (row, hs) in h.chunks(2 * f).enumerate() {
        for j in 0..f {
            let (a, g) = (hs[j] as f64, hs[f + j] as f64);
            let cdf = 0.5 * (1.0 + erf64(g / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * g * g).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let d = r[row * f + j] as f64;
            y[row * f + j] = (a * g * cdf) as f32;
            dh[row * 2 * f + j] = (d * g * cdf) as f32;
            dh[row * 2 * f + f + j] = (d * a * (cdf + g * pdf)) as f32;
            scale = [scale[0].max((a * g).abs() as f32), scale[1].max((d * g).abs().max((d * a).abs()) as f32)];
        }
    }
    (y, dh, scale)
}

/// The largest difference of `a` from `b`, relative to the largest of `|b|` and `scale`.
fn rel_at_least(a: &[f32], b: &[f32], scale: f32) -> f32 {
    let top = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    rel(a, b) * top.max(1e-6) / top.max(scale).max(1e-6)
}

/// erf in f64: its Maclaurin series below 3, the continued fraction of erfc above (both to ~1e-15).
fn erf64(x: f64) -> f64 {
    let a = x.abs();
    let v = if a < 3.0 {
        let (mut term, mut sum, mut k) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            k += 1.0;
            term *= -a * a / k;
            sum += term / (2.0 * k + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc(a) = exp(-a²) / sqrt(π) · 1 / (a + 1/2 / (a + 1 / (a + 3/2 / (a + ...)))).
        let mut frac = a;
        for k in (1..60).rev() {
            frac = a + (k as f64 / 2.0) / frac;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / frac
    };
    v.copysign(x)
}

#[test]
fn geglu_and_its_gradient_match_f64_and_burn() {
    let _lock = FUSED_STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    visii_models::fused::set_steps_enabled(true);
    assert!((erf64(0.5) - 0.520_499_877_813_046_5).abs() < 1e-14 && (erf64(-3.5) + 0.999_999_256_901_628).abs() < 1e-14);
    // The UNet's widths (2 x 1280 at 64 tokens, 2 x 5120 over a few), an odd F, one row; gates
    // spread to +-8 (where the tanh approximation's derivative is furthest off, near +-2, and beyond).
    let mut largest_gradient = 0f32;
    for [b, n, f] in [[1, 64, 1280], [2, 4, 5120], [3, 7, 13], [1, 1, 4]] {
        let h = Tensor::<3>::random([b, n, 2 * f], Distribution::Normal(0.0, 3.0), &gpu);
        let r = Tensor::<3>::random([b, n, f], Distribution::Normal(0.0, 1.0), &gpu);
        let (y_truth, dh_truth, [y_scale, dh_scale]) = geglu_f64_scaled(&values(h.clone()), &values(r.clone()), f);
        let ours = values(kernels::geglu(h.clone()).expect("our GEGLU applies"));
        let burn_cpu = {
            let hc = on(&h, &cpu);
            values(hc.clone().slice([0..b, 0..n, 0..f]) * burn::tensor::activation::gelu(hc.slice([0..b, 0..n, f..2 * f])))
        };
        let (e, e_burn) = (rel_at_least(&ours, &y_truth, y_scale), rel_at_least(&burn_cpu, &y_truth, y_scale));
        println!("geglu [{b}, {n}, 2 x {f}]: vs f64 {e:.2e}, burn's on ndarray {e_burn:.2e}");
        assert!(e < 2e-6, "geglu [{b}, {n}, 2 x {f}]: {e:.2e}");
        assert!(rel_at_least(&ours, &burn_cpu, y_scale) < 2e-6);
        // Inside autodiff: the fused step (its kernel's exact derivative) on wgpu; on ndarray the
        // models' fallback (GELU written with erf, differentiated exactly too); burn's own `gelu`
        // differentiates the tanh approximation.
        assert!(visii_models::fused::geglu(h.clone().autodiff()).is_ok(), "the fused GEGLU step applies");
        let ours = input_grad(&h, &r, visii_models::nn::geglu);
        let fallback = input_grad(&on(&h, &cpu), &on(&r, &cpu), visii_models::nn::geglu);
        let burn_gelu = input_grad(&on(&h, &cpu), &on(&r, &cpu), |h| {
            h.clone().slice([0..b, 0..n, 0..f]) * burn::tensor::activation::gelu(h.slice([0..b, 0..n, f..2 * f]))
        });
        let (e, e_fallback, e_burn) =
            (rel_at_least(&ours, &dh_truth, dh_scale), rel_at_least(&fallback, &dh_truth, dh_scale), rel_at_least(&burn_gelu, &dh_truth, dh_scale));
        println!("geglu [{b}, {n}, 2 x {f}]: input gradient vs f64 {e:.2e}, the fallback on ndarray {e_fallback:.2e}, burn's gelu {e_burn:.2e}");
        assert!(e < 2e-6, "geglu [{b}, {n}, 2 x {f}]: input gradient {e:.2e}");
        assert!(e_fallback < 2e-6, "geglu [{b}, {n}, 2 x {f}] on ndarray: input gradient {e_fallback:.2e}");
        largest_gradient = dh_truth.iter().fold(largest_gradient, |m, v| m.max(v.abs()));
    }
    // (Not per case: the 4 gates of one row can all be strongly negative, the gradient then near 0.)
    assert!(largest_gradient > 0.1, "the gradients are not all near 0: {largest_gradient}");
    // Not for: an odd last axis, ndarray, the step switched off inside autodiff.
    let odd = Tensor::<3>::random([1, 2, 7], Distribution::Normal(0.0, 1.0), &gpu);
    assert!(kernels::geglu(odd.clone()).is_err() && visii_models::fused::geglu(odd.autodiff()).is_err());
    let h = Tensor::<3>::random([1, 2, 8], Distribution::Normal(0.0, 1.0), &gpu);
    assert!(kernels::geglu(on(&h, &cpu)).is_err());
    visii_models::fused::set_steps_enabled(false);
    assert!(visii_models::fused::geglu(h.clone().autodiff()).is_err());
    visii_models::fused::set_steps_enabled(true);
}

#[test]
fn softmax_matches_ndarray_with_masked_positions() {
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // Attention scores: self-attention rows of 64, cross-attention rows of 77, a long row of 1500
    // (several values per invocation), large offsets (the max must be subtracted), and a causal
    // mask's -inf entries; rows of 5 and of 1 (two and one lanes, many rows per workgroup).
    for (shape, scale) in [([2, 8, 64, 64], 1.0), ([1, 8, 40, 77], 30.0), ([1, 2, 3, 1500], 5.0), ([3, 7, 11, 5], 20.0), ([1, 1, 300, 1], 1.0)] {
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, scale), &gpu);
        let x = if shape[3] == 64 {
            let mask = Tensor::<2, burn::tensor::Bool>::tril_mask([64, 64], 0, &gpu).unsqueeze::<4>().expand(shape);
            x.mask_fill(mask, f32::NEG_INFINITY)
        } else {
            x
        };
        let ours = values(kernels::softmax(x.clone()).expect("our softmax applies"));
        let reference = values(burn::tensor::activation::softmax(on(&x, &cpu), 3));
        let e = rel(&ours, &reference);
        println!("softmax {shape:?} (scale {scale}): vs ndarray {e:.2e}");
        assert!(e < 1e-5, "softmax {shape:?}: {e}");
        assert!(ours.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn fused_attention_matches_ndarray() {
    let _lock = attention_lock();
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // (batch, query rows, keys, heads, head dim, causal, spread of q): the UNet's self-attention at
    // the first level (8 heads of 40), cross-attention to 77 text states (heads of 80), CLIP's
    // causal text attention (12 heads of 64) over more rows than one workgroup, a long sequence
    // of 128-wide heads (several key blocks and row blocks), odd sizes, and sharp scores (large q:
    // the running maximum must rescale).
    let cases: &[(usize, usize, usize, usize, usize, bool, f64)] = &[
        (2, 64, 64, 8, 40, false, 1.0),
        (3, 100, 77, 8, 80, false, 1.0),
        (1, 77, 77, 12, 64, true, 1.0),
        (1, 70, 70, 2, 8, true, 1.0),
        (1, 300, 257, 2, 128, false, 1.0),
        // The UNet's 1280-channel levels: 8 heads of 160, self-attention and to the text.
        (1, 64, 64, 8, 160, false, 1.0),
        (2, 16, 77, 8, 160, false, 1.0),
        (2, 5, 3, 3, 4, false, 1.0),
        (1, 129, 50, 4, 40, false, 12.0),
    ];
    for &(b, n, m, heads, d, causal, spread) in cases {
        let inner = heads * d;
        let q = Tensor::<3>::random([b, n, inner], Distribution::Normal(0.0, spread), &gpu);
        let k = Tensor::<3>::random([b, m, inner], Distribution::Normal(0.0, 1.0), &gpu);
        let v = Tensor::<3>::random([b, m, inner], Distribution::Normal(0.0, 1.0), &gpu);
        let ours = kernels::attention(q.clone(), k.clone(), v.clone(), heads, causal)
            .unwrap_or_else(|_| panic!("our attention applies to {b}x{n}x{m}, {heads} heads of {d}"));
        assert_eq!(ours.dims(), [b, n, inner]);
        let reference = visii_models::nn::attention(on(&q, &cpu), on(&k, &cpu), on(&v, &cpu), heads, causal);
        let (ours, reference) = (values(ours), values(reference));
        let e = rel(&ours, &reference);
        let case = format!("attention {b}x{n}x{m}, {heads} heads of {d}, causal {causal}, q spread {spread}: vs ndarray {e:.2e}");
        println!("{case}");
        // A score's rounding (another summation order over d products of size ~spread) reaches the
        // weights through exp as a relative error: measured 1.5e-7 to 1.9e-6 at spread 1, 4.7e-6 at 12.
        let tol = 2e-6 * spread.max(1.0) as f32 * (d as f32 / 32.0).sqrt().max(1.0);
        assert!(e < tol, "{case} (tolerance {tol:.1e})");
        assert!(reference.iter().any(|x| x.abs() > 0.1), "{case}");
    }
    // Heads wider than the kernel takes (the VAE's 512; here 320 and 164), head dims that are not
    // multiples of 4, and f32 only.
    let q = Tensor::<3>::random([1, 4, 320], Distribution::Normal(0.0, 1.0), &gpu);
    assert!(kernels::attention(q.clone(), q.clone(), q.clone(), 1, false).is_err());
    let q164 = Tensor::<3>::random([1, 4, 328], Distribution::Normal(0.0, 1.0), &gpu);
    assert!(kernels::attention(q164.clone(), q164.clone(), q164.clone(), 2, false).is_err());
    let q7 = Tensor::<3>::random([1, 4, 21], Distribution::Normal(0.0, 1.0), &gpu);
    assert!(kernels::attention(q7.clone(), q7.clone(), q7.clone(), 3, false).is_err());
    assert!(kernels::attention(on(&q, &cpu), on(&q, &cpu), on(&q, &cpu), 8, false).is_err());
}

/// The gradients of `q`, `k` and `v` for the loss `sum(attention(q, k, v) * r)` on the device of
/// the inputs (autodiff: on wgpu the fused step, on ndarray burn's chain).
fn attention_input_grads(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, r: &Tensor<3>, heads: usize, causal: bool) -> [Vec<f32>; 3] {
    let (qa, ka, va) = (q.clone().autodiff().require_grad(), k.clone().autodiff().require_grad(), v.clone().autodiff().require_grad());
    let out = visii_models::nn::attention(qa.clone(), ka.clone(), va.clone(), heads, causal);
    let grads = (out * r.clone().autodiff()).sum().backward();
    [qa, ka, va].map(|t| values(t.grad(&grads).expect("an input has a gradient")))
}

#[test]
fn fused_attention_backward_matches_ndarray() {
    let _lock = attention_lock();
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    visii_models::fused::set_enabled(true);
    // (batch, query rows, keys, heads, head dim, causal): self-attention (8 heads of 40),
    // cross-attention to 77 text states (heads of 80), CLIP's causal attention over two workgroups
    // of rows, several workgroups of query and key rows with last ones partly empty, odd sizes.
    // Heads of 160 (the UNet's 1280-channel levels), self-attention and to the text.
    let cases: &[(usize, usize, usize, usize, usize, bool)] = &[
        (2, 64, 64, 8, 40, false),
        (3, 37, 77, 4, 80, false),
        (1, 77, 77, 4, 64, true),
        (1, 300, 290, 2, 40, false),
        (2, 5, 3, 3, 4, false),
        (1, 64, 64, 4, 160, false),
        (2, 16, 77, 8, 160, false),
    ];
    for &(b, n, m, heads, d, causal) in cases {
        let inner = heads * d;
        let q = Tensor::<3>::random([b, n, inner], Distribution::Normal(0.0, 1.0), &gpu);
        let k = Tensor::<3>::random([b, m, inner], Distribution::Normal(0.0, 1.0), &gpu);
        let v = Tensor::<3>::random([b, m, inner], Distribution::Normal(0.0, 1.0), &gpu);
        let r = Tensor::<3>::random([b, n, inner], Distribution::Normal(0.0, 1.0), &gpu);
        // The step is the fused one on wgpu.
        let probe = visii_models::fused::attention(q.clone().autodiff(), k.clone().autodiff(), v.clone().autodiff(), heads, causal);
        assert!(probe.is_ok(), "the fused attention step applies to {b}x{n}x{m}, {heads} heads of {d}");
        let ours = attention_input_grads(&q, &k, &v, &r, heads, causal);
        let reference = attention_input_grads(&on(&q, &cpu), &on(&k, &cpu), &on(&v, &cpu), &on(&r, &cpu), heads, causal);
        for (name, (o, rf)) in ["q", "k", "v"].iter().zip(ours.iter().zip(&reference)) {
            let e = rel(o, rf);
            let case = format!("attention {b}x{n}x{m}, {heads} heads of {d}, causal {causal}: gradient of {name} vs ndarray {e:.2e}");
            println!("{case}");
            assert!(e < 2e-5, "{case}");
            assert!(rf.iter().any(|x| x.abs() > 0.01), "{case}");
        }
    }
    // Outside autodiff, for head dims the kernel does not take, and with the step off, it hands
    // the inputs back.
    let q = Tensor::<3>::random([1, 4, 32], Distribution::Normal(0.0, 1.0), &gpu);
    assert!(visii_models::fused::attention(q.clone(), q.clone(), q.clone(), 4, false).is_err());
    let ad = || q.clone().autodiff();
    assert!(visii_models::fused::attention(ad(), ad(), ad(), 16, false).is_err(), "head dim 2");
    visii_models::fused::set_enabled(false);
    assert!(visii_models::fused::attention(ad(), ad(), ad(), 4, false).is_err());
    visii_models::fused::set_enabled(true);
}

/// The fused attention's forward and backward kernels with 1, 2, 4 (and, the forward, 8) rows per
/// invocation give the same values: each row's sums run in the same order whatever the count (the
/// adapter picks the count: 1 on a GPU, up to 4 on CPU adapters). Shapes with several workgroups
/// of rows, a last one partly empty, causal masks across workgroups, fewer keys than one block.
#[test]
fn fused_attention_rows_per_invocation_agree() {
    let _lock = attention_lock();
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    visii_models::fused::set_enabled(true);
    let cases: &[(usize, usize, usize, usize, usize, bool)] = &[(2, 300, 300, 2, 16, true), (1, 130, 9, 3, 8, false), (2, 7, 600, 2, 12, false)];
    for &(b, n, m, heads, d, causal) in cases {
        let t = |rows: usize| Tensor::<3>::random([b, rows, heads * d], Distribution::Normal(0.0, 1.0), &gpu);
        let (q, k, v, r) = (t(n), t(m), t(m), t(n));
        let mut first: Option<(Vec<f32>, [Vec<f32>; 3])> = None;
        for rows in [1, 2, 4, 8] {
            kernels::set_flash_rows(Some(rows));
            let out = values(kernels::attention(q.clone(), k.clone(), v.clone(), heads, causal).unwrap_or_else(|_| panic!("applies")));
            let grads = attention_input_grads(&q, &k, &v, &r, heads, causal);
            let case = format!("attention {b}x{n}x{m}, {heads} heads of {d}, causal {causal}, {rows} rows per invocation");
            match &first {
                None => first = Some((out, grads)),
                Some((o1, g1)) => {
                    let e = rel(&out, o1);
                    println!("{case}: output vs 1 row {e:.2e}");
                    assert!(e <= 1e-6, "{case}: output {e}");
                    for (name, (g, g1)) in ["q", "k", "v"].iter().zip(grads.iter().zip(g1)) {
                        let e = rel(g, g1);
                        println!("{case}: gradient of {name} vs 1 row {e:.2e}");
                        assert!(e <= 1e-6, "{case}: gradient of {name} {e}");
                    }
                }
            }
        }
    }
    kernels::set_flash_rows(None);
}

#[test]
fn what_the_kernels_do_not_cover_is_handed_back_for_burn() {
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    let x = Tensor::<4>::random([1, 8, 9, 9], Distribution::Normal(0.0, 1.0), &gpu);
    let w = Tensor::<4>::random([8, 8, 3, 3], Distribution::Normal(0.0, 0.1), &gpu);
    // Dilated and grouped convs, a weight whose input channels disagree, an ndarray tensor: `Err`
    // with the input itself, never a launch and never a panic.
    let dilated = ConvOptions::new([1, 1], [2, 2], [2, 2], 1);
    let back = kernels::conv2d(x.clone(), &w, None, None, &dilated).expect_err("dilation is burn's");
    assert_eq!(values(back), values(x.clone()));
    let grouped = Tensor::<4>::random([8, 4, 3, 3], Distribution::Normal(0.0, 0.1), &gpu);
    assert!(kernels::conv2d(x.clone(), &grouped, None, None, &ConvOptions::new([1, 1], [1, 1], [1, 1], 2)).is_err());
    let wrong = Tensor::<4>::random([8, 5, 3, 3], Distribution::Normal(0.0, 0.1), &gpu);
    assert!(kernels::conv2d(x.clone(), &wrong, None, None, &ConvOptions::new([1, 1], [1, 1], [1, 1], 1)).is_err());
    assert!(kernels::conv2d(on(&x, &cpu), &on(&w, &cpu), None, None, &ConvOptions::new([1, 1], [1, 1], [1, 1], 1)).is_err());
    let lin = Tensor::<2>::random([7, 3], Distribution::Normal(0.0, 0.1), &gpu);
    assert!(kernels::linear(Tensor::<2>::random([4, 6], Distribution::Normal(0.0, 1.0), &gpu), &lin, None, None).is_err());
    // A GroupNorm whose groups do not divide the channels.
    let g = Tensor::<1>::ones([8], &gpu);
    assert!(kernels::group_norm(x, &g, &g.clone().zeros_like(), 3, 1e-5, false).is_err());
}

/// `t` rounded to f16 (on its device) and the same values in f32 on `dev` (the reference's input).
fn half<const D: usize>(t: &Tensor<D>, dev: &Device) -> (Tensor<D>, Tensor<D>) {
    let h = t.clone().cast(FloatDType::F16);
    let f = on(&h.clone().cast(FloatDType::F32), dev);
    (h, f)
}

/// The values of an f16 result (checked to be f16: the kernel wrote in the activations' type).
fn values16<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    assert_eq!(t.dtype(), DType::F16, "the result is in f16");
    values(t.cast(FloatDType::F32))
}

/// f16 kernels sum in f32 and round once, on the store: against an f32 reference on the same
/// (f16-rounded) values, an output may differ by half an f16 step (2^-11 of its size, 4.9e-4 of
/// the largest) and a summation order's last bits. Summing in f16 would be off by ~1e-2 at these K.
const F16_TOL: f32 = 5.5e-4;

#[test]
fn f16_kernels_match_f32_on_the_same_values() {
    let _lock = attention_lock();
    use burn::module::Param;
    use burn::nn::conv::Conv2d;
    use burn::nn::{Linear, PaddingConfig2d};
    use visii_models::resident::Layer;
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    if !gpu.supports_dtype(DType::F16) {
        // SwiftShader natively: no `shader-f16`, and the models refuse f16 activations there.
        eprintln!("this wgpu adapter has no f16: nothing to compare");
        return;
    }
    let check = |case: String, ours: Vec<f32>, reference: Vec<f32>| {
        let e = rel(&ours, &reference);
        println!("f16 {case}: vs ndarray f32 {e:.2e}");
        assert!(e < F16_TOL, "f16 {case}: {e:.2e}");
        assert!(reference.iter().any(|v| v.abs() > 0.1), "{case}");
    };
    // Convs: tiled 3x3 at the real width, stride 2 on odd sizes, the VAE's asymmetric pad, 1x1,
    // and one pixel (the skinny kernel); weights in f32 (kept f32 under f16 activations) and f16.
    let convs: &[(usize, usize, usize, usize, usize, usize, usize, (usize, usize), (usize, usize), bool)] = &[
        (1, 320, 320, 8, 8, 3, 1, (1, 1), (1, 1), false),
        (3, 64, 96, 9, 11, 3, 2, (1, 1), (1, 1), false),
        (1, 32, 32, 10, 10, 3, 2, (0, 1), (0, 1), false),
        (2, 96, 160, 7, 7, 1, 1, (0, 0), (0, 0), false),
        (1, 1280, 1280, 1, 1, 3, 1, (1, 1), (1, 1), true),
        (2, 640, 64, 2, 2, 3, 1, (1, 1), (1, 1), true),
    ];
    for &(b, ci, co, h, wd, k, s, ph, pw, skinny) in convs {
        let x = Tensor::<4>::random([b, ci, h, wd], Distribution::Normal(0.0, 1.0), &gpu);
        let wt = Tensor::<4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = Tensor::<1>::random([co], Distribution::Normal(0.0, 0.5), &gpu);
        let opts = ConvOptions::new_with_padding([s, s], [ph, pw], [1, 1], 1);
        let (x16, xf) = half(&x, &cpu);
        for weights16 in [false, true] {
            let (w, wf) = if weights16 { half(&wt, &cpu) } else { (wt.clone(), on(&wt, &cpu)) };
            let (bb, bf) = if weights16 { half(&bias, &cpu) } else { (bias.clone(), on(&bias, &cpu)) };
            let ours = kernels::conv2d_on(x16.clone(), &w, Some(&bb), None, &opts, skinny).unwrap_or_else(|_| panic!("our f16 conv applies"));
            let reference = burn::tensor::module::conv2d(xf.clone(), wf, Some(bf), opts.clone());
            check(format!("conv {b}x{ci}x{h}x{wd} -> {co} k{k} s{s} (f16 weights {weights16}, skinny {skinny})"), values16(ours), values(reference));
        }
        // An f16 skip and an f16 time embedding per image and channel, added in the epilogue.
        let (oh, ow) = ((h + ph.0 + ph.1 - k) / s + 1, (wd + pw.0 + pw.1 - k) / s + 1);
        for rdims in [[b, co, oh, ow], [b, co, 1, 1]] {
            let (r16, rf) = half(&Tensor::<4>::random(rdims, Distribution::Normal(0.0, 1.0), &gpu), &cpu);
            let ours = kernels::conv2d_on(x16.clone(), &wt, Some(&bias), Some(&r16), &opts, skinny)
                .unwrap_or_else(|_| panic!("our f16 conv + residual applies"));
            let reference = burn::tensor::module::conv2d(xf.clone(), on(&wt, &cpu), Some(on(&bias, &cpu)), opts.clone()) + rf;
            check(format!("conv {b}x{ci}x{h}x{wd} -> {co} k{k} s{s} + {rdims:?} (skinny {skinny})"), values16(ours), values(reference));
        }
    }
    // Linear layers: tiled (cross-attention k / v) and over a few tokens (skinny).
    for (lead, k, n, skinny) in [([2, 77], 768, 320, false), ([1, 4], 5120, 1280, true), ([3, 64], 320, 640, true)] {
        let x = Tensor::<3>::random([lead[0], lead[1], k], Distribution::Normal(0.0, 1.0), &gpu);
        let wt = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 0.05), &gpu);
        let bias = Tensor::<1>::random([n], Distribution::Normal(0.0, 0.5), &gpu);
        let (x16, xf) = half(&x, &cpu);
        for weights16 in [false, true] {
            let (w, wf) = if weights16 { half(&wt, &cpu) } else { (wt.clone(), on(&wt, &cpu)) };
            let ours = kernels::linear_on(x16.clone(), &w, Some(&bias), None, skinny).expect("our f16 linear applies");
            let reference = burn::tensor::module::linear(xf.clone(), wf, Some(on(&bias, &cpu)));
            check(format!("linear {lead:?}x{k} -> {n} (f16 weights {weights16}, skinny {skinny})"), values16(ours), values(reference));
        }
        let (r16, rf) = half(&Tensor::<3>::random([lead[0], lead[1], n], Distribution::Normal(0.0, 1.0), &gpu), &cpu);
        let ours = kernels::linear_on(x16.clone(), &wt, Some(&bias), Some(&r16), skinny).expect("our f16 linear + residual applies");
        let reference = burn::tensor::module::linear(xf.clone(), on(&wt, &cpu), Some(on(&bias, &cpu))) + rf;
        check(format!("linear {lead:?}x{k} -> {n} + residual (skinny {skinny})"), values16(ours), values(reference));
    }
    // Input gradients through the frozen layers (f32 weights, f16 activations and gradients).
    for (b, ci, co, hw, k, s, p) in [(2, 24, 40, 10, 3, 1, 1), (1, 64, 48, 7, 1, 1, 0)] {
        let w = Tensor::<4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.1), &gpu);
        let bias = Tensor::<1>::random([co], Distribution::Normal(0.0, 0.5), &gpu);
        let conv = |dev: &Device| Conv2d {
            weight: Param::from_tensor(on(&w, dev)),
            bias: Some(Param::from_tensor(on(&bias, dev))),
            stride: [s, s],
            kernel_size: [k, k],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(p, p, p, p),
        };
        let out = (hw + 2 * p - k) / s + 1;
        let (x16, xf) = half(&Tensor::<4>::random([b, ci, hw, hw], Distribution::Normal(0.0, 1.0), &gpu), &cpu);
        let (r16, rf) = half(&Tensor::<4>::random([b, co, out, out], Distribution::Normal(0.0, 1.0), &gpu), &cpu);
        let (lg, lc) = (conv(&gpu), conv(&cpu));
        let xa = x16.clone().autodiff().require_grad();
        let y = lg.run(xa.clone());
        assert_eq!(y.dtype(), DType::F16);
        let ours = xa.grad(&(y * r16.autodiff()).sum().backward()).expect("x has a gradient");
        let reference = input_grad(&xf, &rf, |x| lc.forward(x));
        check(format!("conv {b}x{ci}x{hw}x{hw} -> {co} k{k}: input gradient"), values16(ours), reference);
    }
    let w = Tensor::<2>::random([96, 72], Distribution::Normal(0.0, 0.1), &gpu);
    let linear = |dev: &Device| Linear { weight: Param::from_tensor(on(&w, dev)), bias: None };
    let (lg, lc) = (linear(&gpu), linear(&cpu));
    for lead in [[2, 33], [1, 4]] {
        let (x16, xf) = half(&Tensor::<3>::random([lead[0], lead[1], 96], Distribution::Normal(0.0, 1.0), &gpu), &cpu);
        let (r16, rf) = half(&Tensor::<3>::random([lead[0], lead[1], 72], Distribution::Normal(0.0, 1.0), &gpu), &cpu);
        let xa = x16.autodiff().require_grad();
        let ours = xa.grad(&(lg.run(xa.clone()) * r16.autodiff()).sum().backward()).expect("x has a gradient");
        let reference = input_grad(&xf, &rf, |x| lc.forward(x));
        check(format!("linear {lead:?} x 96 -> 72: input gradient"), values16(ours), reference);
    }
    // GroupNorm (+ SiLU) with f32 scale and shift, LayerNorm, softmax (with a causal mask's -inf).
    for (shape, groups) in [([1, 320, 8, 8], 32), ([2, 48, 9, 7], 4), ([3, 64, 1, 2], 64)] {
        let (x16, xf) = half(&Tensor::<4>::random(shape, Distribution::Normal(1.0, 2.0), &gpu), &cpu);
        let gamma = Tensor::<1>::random([shape[1]], Distribution::Normal(1.0, 0.3), &gpu);
        let beta = Tensor::<1>::random([shape[1]], Distribution::Normal(0.0, 0.3), &gpu);
        let gn = group_norm_on(&cpu, &gamma, &beta, groups);
        for silu in [false, true] {
            let ours = kernels::group_norm(x16.clone(), &gamma, &beta, groups, 1e-6, silu).expect("our f16 group norm applies");
            let reference = if silu { gn.forward_silu(xf.clone()) } else { gn.forward(xf.clone()) };
            check(format!("group norm {shape:?} / {groups}, silu {silu}"), values16(ours), values(reference));
        }
    }
    // Their input gradients (learning through f16 activations: the fused norm step).
    {
        let _lock = FUSED_STEPS.lock().unwrap_or_else(|e| e.into_inner());
        visii_models::fused::set_steps_enabled(true);
        for (shape, groups) in [([1, 320, 8, 8], 32), ([2, 48, 9, 7], 4)] {
            let (x16, xf) = half(&Tensor::<4>::random(shape, Distribution::Normal(1.0, 2.0), &gpu), &cpu);
            let (r16, rf) = half(&Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &gpu), &cpu);
            let gamma = Tensor::<1>::random([shape[1]], Distribution::Normal(1.0, 0.3), &gpu);
            let beta = Tensor::<1>::random([shape[1]], Distribution::Normal(0.0, 0.3), &gpu);
            let (ng, nc) = (group_norm_on(&gpu, &gamma, &beta, groups), group_norm_on(&cpu, &gamma, &beta, groups));
            let probe = visii_models::fused::group_norm(x16.clone().autodiff(), &ng.gamma.val(), &ng.beta.val(), groups, 1e-6, true, false);
            assert!(probe.is_ok(), "the fused f16 norm step applies");
            let xa = x16.clone().autodiff().require_grad();
            let y = ng.forward_silu(xa.clone());
            assert_eq!(y.dtype(), DType::F16);
            let ours = xa.grad(&(y * r16.autodiff()).sum().backward()).expect("x has a gradient");
            let reference = input_grad(&xf, &rf, |x| nc.forward_silu(x));
            check(format!("group norm {shape:?} / {groups} + silu: input gradient"), values16(ours), reference);
        }
        let (x16, xf) = half(&Tensor::<3>::random([2, 77, 320], Distribution::Normal(0.5, 1.5), &gpu), &cpu);
        let (r16, rf) = half(&Tensor::<3>::random([2, 77, 320], Distribution::Normal(0.0, 1.0), &gpu), &cpu);
        let gamma = Tensor::<1>::random([320], Distribution::Normal(1.0, 0.3), &gpu);
        let beta = Tensor::<1>::random([320], Distribution::Normal(0.0, 0.3), &gpu);
        let (lg, lc) = (layer_norm_on(&gpu, &gamma, &beta), layer_norm_on(&cpu, &gamma, &beta));
        assert!(visii_models::fused::group_norm(x16.clone().autodiff(), &lg.gamma.val(), &lg.beta.val(), 1, 1e-5, false, true).is_ok());
        let xa = x16.autodiff().require_grad();
        let ours = xa.grad(&(lg.forward(xa.clone()) * r16.autodiff()).sum().backward()).expect("x has a gradient");
        let reference = input_grad(&xf, &rf, |x| lc.forward(x));
        check("layer norm [2, 77, 320]: input gradient".to_string(), values16(ours), reference);
        // GEGLU, forward and input gradient.
        let (h16, hf) = half(&Tensor::<3>::random([2, 9, 2 * 320], Distribution::Normal(0.0, 2.0), &gpu), &cpu);
        let (r16, rf) = half(&Tensor::<3>::random([2, 9, 320], Distribution::Normal(0.0, 1.0), &gpu), &cpu);
        let (h_host, r_host) = (values(hf.clone()), values(rf));
        let (y_truth, dh_truth) = geglu_f64(&h_host, &r_host, 320);
        check("geglu [2, 9, 2 x 320]".to_string(), values16(kernels::geglu(h16.clone()).expect("our f16 GEGLU applies")), y_truth);
        assert!(visii_models::fused::geglu(h16.clone().autodiff()).is_ok(), "the fused f16 GEGLU step applies");
        let ha = h16.autodiff().require_grad();
        let y = visii_models::nn::geglu(ha.clone());
        assert_eq!(y.dtype(), DType::F16);
        let ours = ha.grad(&(y * r16.autodiff()).sum().backward()).expect("h has a gradient");
        check("geglu [2, 9, 2 x 320]: input gradient".to_string(), values16(ours), dh_truth);
    }
    for [b, n, c] in [[2, 77, 320], [1, 3001, 32]] {
        let (x16, xf) = half(&Tensor::<3>::random([b, n, c], Distribution::Normal(0.5, 1.5), &gpu), &cpu);
        let gamma = Tensor::<1>::random([c], Distribution::Normal(1.0, 0.3), &gpu);
        let beta = Tensor::<1>::random([c], Distribution::Normal(0.0, 0.3), &gpu);
        let ours = kernels::layer_norm(x16, &gamma, &beta, 1e-5).expect("our f16 layer norm applies");
        let reference = burn::tensor::module::layer_norm(xf, on(&gamma, &cpu), Some(on(&beta, &cpu)), 1e-5);
        check(format!("layer norm [{b}, {n}, {c}]"), values16(ours), values(reference));
    }
    // An odd number of f16 values (1155): a buffer whose size is not a multiple of 4 bytes.
    for (shape, scale) in [([2, 8, 64, 64], 1.0), ([1, 8, 40, 77], 8.0), ([3, 7, 11, 5], 8.0)] {
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, scale), &gpu);
        let x = if shape[3] == 64 {
            x.mask_fill(Tensor::<2, burn::tensor::Bool>::tril_mask([64, 64], 0, &gpu).unsqueeze::<4>().expand(shape), f32::NEG_INFINITY)
        } else {
            x
        };
        let (x16, xf) = half(&x, &cpu);
        let ours = kernels::softmax(x16).expect("our f16 softmax applies");
        check(format!("softmax {shape:?} (scale {scale})"), values16(ours), values(burn::tensor::activation::softmax(xf, 3)));
    }
    // Fused attention: self-attention (8 heads of 40), CLIP's causal attention, sharp scores.
    for (b, n, m, heads, d, causal, spread) in [(2, 64, 64, 8, 40, false, 1.0), (1, 77, 77, 12, 64, true, 1.0), (1, 129, 50, 4, 40, false, 4.0)] {
        let t = |rows: usize, sd: f64| half(&Tensor::<3>::random([b, rows, heads * d], Distribution::Normal(0.0, sd), &gpu), &cpu);
        let ((q16, qf), (k16, kf), (v16, vf)) = (t(n, spread), t(m, 1.0), t(m, 1.0));
        let ours = kernels::attention(q16, k16, v16, heads, causal).unwrap_or_else(|_| panic!("our f16 attention applies"));
        let reference = visii_models::nn::attention(qf, kf, vf, heads, causal);
        check(format!("attention {b}x{n}x{m}, {heads} heads of {d}, causal {causal}, q spread {spread}"), values16(ours), values(reference));
    }
}

#[test]
fn int8_weights_read_in_place_match_their_dequantised_copy() {
    use burn::module::Param;
    use burn::nn::conv::Conv2d;
    use burn::nn::{Linear, PaddingConfig2d};
    use visii_models::resident::{resident_q8, Layer};
    let gpu = Device::wgpu(DeviceKind::DefaultDevice);
    let cpu = Device::ndarray();
    // The same layer with its weight int8 on the device, read in place by our GEMMs (dequantised in
    // the tile loads) and as a dequantised f32 copy (`VISII_Q8=off`), forward and input gradient,
    // and ndarray on the dequantised values. Only this test of the binary keeps weights int8.
    let both = |f: &dyn Fn() -> Vec<f32>| {
        kernels::set_q8(true);
        let a = f();
        kernels::set_q8(false);
        let b = f();
        kernels::set_q8(true);
        (a, b)
    };
    // (batch, c_in, c_out, size, k, stride, pad): a 3x3 conv (tiled), one pixel (skinny, centre
    // tap), stride 2 on an odd size, 1x1.
    for (b, ci, co, hw, k, s, p) in [(1, 64, 96, 8, 3, 1, 1), (1, 128, 64, 1, 3, 1, 1), (2, 32, 48, 9, 3, 2, 1), (1, 96, 160, 6, 1, 1, 0)] {
        let conv = Conv2d {
            weight: Param::from_tensor(Tensor::<4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.1), &gpu)),
            bias: Some(Param::from_tensor(Tensor::<1>::random([co], Distribution::Normal(0.0, 0.5), &gpu))),
            stride: [s, s],
            kernel_size: [k, k],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(p, p, p, p),
        };
        let (conv, quantised) = resident_q8(conv);
        assert_eq!(quantised, co * ci * k * k, "the weight is int8 on the device");
        let x = Tensor::<4>::random([b, ci, hw, hw], Distribution::Normal(0.0, 1.0), &gpu);
        let out = (hw + 2 * p - k) / s + 1;
        let r = Tensor::<4>::random([b, co, out, out], Distribution::Normal(0.0, 1.0), &gpu);
        // The in-place path applies (not the copy twice).
        let opts = ConvOptions::new([s, s], [p, p], [1, 1], 1);
        let bias = conv.bias.as_ref().map(|b| b.val());
        let direct = kernels::conv2d_q8(x.clone(), &conv.weight.base(), [co, ci, k, k], bias.as_ref(), None, &opts);
        assert!(direct.is_ok(), "int8 read in place for {b}x{ci}x{hw}x{hw} -> {co} k{k}");
        let (fwd, fwd_copy) = both(&|| values(conv.run(x.clone())));
        assert_eq!(values(direct.unwrap()), fwd);
        let (grad, grad_copy) = both(&|| input_grad(&x, &r, |x| conv.run(x)));
        // ndarray on the dequantised weight.
        let reference = Conv2d {
            weight: Param::from_tensor(on(&conv.weight.val(), &cpu)),
            bias: conv.bias.as_ref().map(|b| Param::from_tensor(on(&b.val(), &cpu))),
            stride: [s, s],
            kernel_size: [k, k],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(p, p, p, p),
        };
        let (e_copy, e_cpu) = (rel(&fwd, &fwd_copy), rel(&fwd, &values(reference.forward(on(&x, &cpu)))));
        let e_grad = rel(&grad, &grad_copy);
        println!("int8 conv {b}x{ci}x{hw}x{hw} -> {co} k{k} s{s}: in place vs copy {e_copy:.2e}, vs ndarray {e_cpu:.2e}; input gradient vs copy {e_grad:.2e}");
        assert!(e_copy < 1e-6 && e_cpu < 2.0 * order_tolerance(ci * k * k) && e_grad < 1e-6, "int8 conv k{k} s{s}");
        assert!(fwd.iter().any(|v| v.abs() > 0.1));
        // A skip added in the epilogue, the weight still read in place: outside autodiff and as the
        // learning step (the same sums, then `+ skip` in f32: equal to the last bit), whose input
        // gradient does not change.
        let skip = Tensor::<4>::random([b, co, out, out], Distribution::Normal(0.0, 1.0), &gpu);
        let added: Vec<f32> = fwd.iter().zip(values(skip.clone())).map(|(a, b)| a + b).collect();
        let direct = kernels::conv2d_q8(x.clone(), &conv.weight.base(), [co, ci, k, k], bias.as_ref(), Some(&skip), &opts);
        assert_eq!(values(direct.expect("int8 + skip read in place")), added);
        assert_eq!(values(conv.run_add(x.clone(), skip.clone())), added);
        let step = conv.run_add(x.clone().autodiff(), skip.clone().autodiff());
        assert_eq!(values(step.inner()), added);
        assert_eq!(input_grad(&x, &r, |x| conv.run_add(x, skip.clone().autodiff())), grad);
    }
    // Linear layers: 66 rows (tiled) and 4 (skinny), and f16 activations over int8 (tiled).
    let lin = Linear {
        weight: Param::from_tensor(Tensor::<2>::random([256, 96], Distribution::Normal(0.0, 0.1), &gpu)),
        bias: Some(Param::from_tensor(Tensor::<1>::random([96], Distribution::Normal(0.0, 0.5), &gpu))),
    };
    let (lin, quantised) = resident_q8(lin);
    assert_eq!(quantised, 256 * 96);
    let reference =
        Linear { weight: Param::from_tensor(on(&lin.weight.val(), &cpu)), bias: lin.bias.as_ref().map(|b| Param::from_tensor(on(&b.val(), &cpu))) };
    for lead in [[2, 33], [1, 4]] {
        let x = Tensor::<3>::random([lead[0], lead[1], 256], Distribution::Normal(0.0, 1.0), &gpu);
        let r = Tensor::<3>::random([lead[0], lead[1], 96], Distribution::Normal(0.0, 1.0), &gpu);
        let direct = kernels::linear_q8(x.clone(), &lin.weight.base(), [256, 96], lin.bias.as_ref().map(|b| b.val()).as_ref(), None);
        assert!(direct.is_ok(), "int8 read in place for {lead:?}");
        let (fwd, fwd_copy) = both(&|| values(lin.run(x.clone())));
        assert_eq!(values(direct.unwrap()), fwd);
        let (grad, grad_copy) = both(&|| input_grad(&x, &r, |x| lin.run(x)));
        let (e_copy, e_cpu, e_grad) = (rel(&fwd, &fwd_copy), rel(&fwd, &values(reference.forward(on(&x, &cpu)))), rel(&grad, &grad_copy));
        println!("int8 linear {lead:?} x 256 -> 96: in place vs copy {e_copy:.2e}, vs ndarray {e_cpu:.2e}; input gradient vs copy {e_grad:.2e}");
        assert!(e_copy < 1e-6 && e_cpu < 2.0 * order_tolerance(256) && e_grad < 1e-6, "int8 linear {lead:?}");
        let skip = Tensor::<3>::random([lead[0], lead[1], 96], Distribution::Normal(0.0, 1.0), &gpu);
        let added: Vec<f32> = fwd.iter().zip(values(skip.clone())).map(|(a, b)| a + b).collect();
        assert_eq!(values(lin.run_add(x.clone(), skip.clone())), added);
        assert_eq!(values(lin.run_add(x.clone().autodiff(), skip.clone().autodiff()).inner()), added);
        assert_eq!(input_grad(&x, &r, |x| lin.run_add(x, skip.clone().autodiff())), grad);
    }
    if gpu.supports_dtype(DType::F16) {
        let (x16, xf) = half(&Tensor::<3>::random([2, 33, 256], Distribution::Normal(0.0, 1.0), &gpu), &cpu);
        kernels::set_q8(true);
        let ours = values16(lin.run(x16));
        check_f16_int8(ours, values(reference.forward(xf)));
    }
}

fn check_f16_int8(ours: Vec<f32>, reference: Vec<f32>) {
    let e = rel(&ours, &reference);
    println!("int8 linear, f16 activations: vs ndarray f32 {e:.2e}");
    assert!(e < F16_TOL, "{e}");
}
