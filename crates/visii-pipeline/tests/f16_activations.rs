//! f16 activations (`UNet2DConditionModel::set_f16_activations`): the tiny model's UNet on wgpu
//! with its activations in f16 (weights f32 or int8 on the device, used as f16; norms and softmax
//! in f32) against the same model in f32: one UNet prediction (relative error), a 3-step apply
//! (PSNR), a 2-step learning run (per-step MSE) — the learned instruction's gradient flows back
//! through the f16 UNet into the f32 embedding. Where the device has no f16 arithmetic, asking
//! for it is refused with a message that says so (burn's ndarray backend, always).

mod common;
use common::{fixtures, image, psnr};

use burn::tensor::{DType, Device, DeviceKind, Tensor, TensorData};
use visii_models::{ClipFolder, Ip2pFolder, ModelError};
use visii_pipeline::learn::{learn, LearnOptions};
use visii_pipeline::{ApplyOptions, Ip2p, Noise};

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
#[allow(deprecated)] // burn's ndarray backend: the CPU reference of the other tests
fn ndarray_refuses_f16_activations() {
    let dev = Device::ndarray();
    let mut model = Ip2p::from_folder(&Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap(), &dev).unwrap();
    if dev.supports_dtype(DType::F16) {
        // A backend that can: then it must also work (covered on wgpu below).
        model.unet.set_f16_activations(true, &dev).unwrap();
        return;
    }
    let e = model.unet.set_f16_activations(true, &dev).unwrap_err();
    assert!(matches!(e, ModelError::DeviceLacks(_)), "{e:?}");
    assert!(e.to_string().contains("f16") && e.to_string().contains("f32 works"), "{e}");
    assert!(!model.unet.f16_activations, "the model is left as it was");
    model.unet.set_f16_activations(false, &dev).unwrap();
}

#[test]
fn f16_activations_predict_apply_and_learn() {
    let dev = Device::wgpu(DeviceKind::DefaultDevice);
    let folder = Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap();
    let mut model = Ip2p::from_folder(&folder, &dev).unwrap();
    if !dev.supports_dtype(DType::F16) {
        // This adapter cannot (e.g. SwiftShader): refused, not wrong results.
        let e = model.unet.set_f16_activations(true, &dev).unwrap_err();
        assert!(matches!(e, ModelError::DeviceLacks(_)), "{e:?}");
        eprintln!("this wgpu adapter has no f16: refused ({e}); nothing more to compare here");
        return;
    }
    let clip = ClipFolder::open(fixtures().join("tiny-clip")).unwrap();
    let parts = clip.vision(&dev).unwrap().model;
    let pre = clip.preprocess_config().unwrap();
    let img = image("tall.png");
    let opts = ApplyOptions { steps: 3, ..ApplyOptions::default() };
    let pairs = vec![(image("before.png"), image("after.png"))];
    let lopts = LearnOptions { steps: 2, size: 64, seed: 4, patience: 0, ..LearnOptions::default() };
    let cin = model.unet.conv_in.weight.dims()[1];
    let noise: Vec<f32> = (0..cin * 16 * 16).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5).collect();
    let run = |m: &Ip2p| {
        let cond = m.encode_text("make it snowy").unwrap();
        let x = Tensor::<4>::from_data(TensorData::new(noise.clone(), [1, cin, 16, 16]), &dev);
        let e = m.unet.forward(x, &[500.0], cond.clone());
        assert_eq!(e.dtype(), DType::F32, "the UNet answers in f32 whatever its activations");
        let e: Vec<f32> = e.into_data().try_to_vec().unwrap();
        let px: Vec<f32> = m.apply(&img, cond, &opts, &Noise::Seeded(3), &mut |_, _| true).unwrap().into_data().try_to_vec().unwrap();
        let learned = learn(m, &parts, &pre, &pairs, "a photo", &lopts, None, &mut |_, _| true).unwrap();
        (e, px, learned.history.iter().map(|s| s.mse).collect::<Vec<f32>>())
    };

    let (e_ref, px_ref, mse_ref) = run(&model);
    for resident in [false, true] {
        let mut m = Ip2p::from_folder(&folder.clone().with_resident_q8(resident), &dev).unwrap();
        m.unet.set_f16_activations(true, &dev).unwrap();
        let (e, px, mse) = run(&m);
        let (r, p) = (rel_err(&e, &e_ref), psnr(&px, &px_ref));
        let worst = mse.iter().zip(&mse_ref).map(|(a, b)| ((a - b) / b).abs()).fold(0f32, f32::max);
        println!(
            "f16 activations, weights {}: prediction rel. error {r:.2e}; apply 3 steps PSNR {p:.1} dB; learning mse {mse:?} vs {mse_ref:?} (max rel diff {worst:.2e})",
            if resident { "int8" } else { "f32" }
        );
        assert!(e.iter().all(|v| v.is_finite()));
        assert!(r > 0.0, "the f16 path ran in f16");
        assert!(r < 1.5e-2, "{r}");
        assert!(p >= 40.0, "{p}");
        assert!(worst < 1e-2, "{worst}");
    }
}
