//! Weights kept int8 on the device ("resident q8", `visii_models::resident`): the tiny model on wgpu
//! applies and learns with its UNet and VAE weights int8 at rest; device memory in use drops by
//! about 4 bytes -> 1.125 bytes per quantised value, results stay close to f32 (a 3-step apply:
//! PSNR, a 2-step learning run: per-step MSE). One test function: device memory readings are
//! process-wide.

mod common;
use common::{fixtures, image, psnr};

use burn::tensor::{Device, DeviceKind};
use visii_models::{ClipFolder, Ip2pFolder};
use visii_pipeline::learn::{learn, LearnOptions};
use visii_pipeline::{ApplyOptions, Ip2p, ModelIdentity, Noise};

#[test]
fn int8_resident_weights_apply_and_learn() {
    let dev = Device::wgpu(DeviceKind::DefaultDevice);
    let folder = Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap();
    let clip = ClipFolder::open(fixtures().join("tiny-clip")).unwrap();
    let parts = clip.vision(&dev).unwrap().model;
    let pre = clip.preprocess_config().unwrap();
    let img = image("tall.png");
    let opts = ApplyOptions { steps: 3, ..ApplyOptions::default() };
    let pairs = vec![(image("before.png"), image("after.png"))];
    let lopts = LearnOptions { steps: 2, size: 64, seed: 4, patience: 0, ..LearnOptions::default() };
    let in_use = || dev.memory_pool_usage().expect("wgpu reports its memory").bytes_in_use;
    let run = |m: &Ip2p| {
        let cond = m.encode_text("make it snowy").unwrap();
        let px: Vec<f32> = m.apply(&img, cond, &opts, &Noise::Seeded(3), &mut |_, _| true).unwrap().into_data().try_to_vec().unwrap();
        let learned = learn(m, &parts, &pre, &pairs, "a photo", &lopts, None, &mut |_, _| true).unwrap();
        (px, learned.history.iter().map(|s| s.mse).collect::<Vec<f32>>())
    };

    let base = in_use();
    let f32_model = Ip2p::from_folder(&folder, &dev).unwrap();
    let f32_bytes = in_use() - base;
    let (px_ref, mse_ref) = run(&f32_model);
    let id_ref = ModelIdentity::of(&f32_model).unwrap();
    drop(f32_model);

    let base = in_use();
    // Converted block by block while loading (the f32 copy never exists whole).
    let q_model = Ip2p::from_folder(&folder.clone().with_resident_q8(true), &dev).unwrap();
    let values = q_model.resident_values;
    let q_bytes = in_use() - base;
    let (px, mse) = run(&q_model);
    // Instructions learned with f32 weights still belong to this model.
    assert!(ModelIdentity::of(&q_model).unwrap().matches(&id_ref));

    let saved = f32_bytes as f64 - q_bytes as f64;
    println!(
        "resident q8: {values} values int8; model on the device {f32_bytes} -> {q_bytes} bytes (saved {saved:.0}, {:.2} per quantised value)",
        saved / values as f64
    );
    // 4 bytes -> 1 byte + a 4-byte scale per block of <= 32 (at least 4 values): >= 1.75 saved per value.
    assert!(values > 1_000_000, "{values}");
    assert!(saved >= 1.75 * values as f64, "saved {saved} bytes for {values} values");
    let p = psnr(&px, &px_ref);
    println!("apply 3 steps: PSNR {p:.1} dB vs f32 weights");
    assert!(p >= 40.0, "{p}");
    let worst = mse.iter().zip(&mse_ref).map(|(a, b)| ((a - b) / b).abs()).fold(0f32, f32::max);
    println!("learning 2 steps: mse {mse:?} vs {mse_ref:?} (max rel diff {worst:.2e})");
    assert!(worst < 2e-2, "{worst}");
}
