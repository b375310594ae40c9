#![allow(deprecated)]

//! Bounded GPU buffers: the models must run on a device whose buffer limits are smaller than the
//! tensors a naive implementation creates. The real model on WebGPU's default limits (128 MiB
//! storage bindings, 256 MiB buffers) meets 1.5 GB attention-score tensors at 512 px and a 152 MB
//! token-embedding table; here the tiny model meets the same situation on a wgpu device requested
//! with 8 MiB bindings / 16 MiB buffers, with our buffer budget at 4 MiB. Results must equal the
//! unconstrained ndarray run of the same seed.
//!
//! One test function: the budget is process-wide.

mod common;
use common::{fixtures, image};

use burn::tensor::wgpu::wgpu;
use burn::tensor::Device;
use visii_models::chunked::plan;
use visii_models::gpu::capped_device;
use visii_models::nn::{max_buffer_bytes, set_max_buffer_bytes};
use visii_models::{ClipFolder, Ip2pFolder, UNetConfig, VaeConfig};
use visii_pipeline::learn::{learn, LearnOptions};
use visii_pipeline::{ApplyOptions, Ip2p, Noise};

/// A wgpu device (lavapipe here) requested with these storage-binding and buffer limits; the
/// workgroup limits stay the adapter's.
fn limited_device(binding: u64, buffer: u64) -> Device {
    visii_pipeline::block_on(capped_device(wgpu::Backends::VULKAN, binding, buffer, false)).expect("a Vulkan device with lowered limits")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn tiny_model_runs_within_small_buffer_limits() {
    let ip2p = Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap();
    let clip = ClipFolder::open(fixtures().join("tiny-clip")).unwrap();
    let img = image("tall.png").resized(256, 256);
    let img512 = image("tall.png").resized(512, 512);
    let opts = ApplyOptions { steps: 2, ..ApplyOptions::default() };
    let pairs = vec![(image("before.png"), image("after.png"))];
    let lopts = LearnOptions { steps: 2, size: 256, seed: 4, patience: 0, ..LearnOptions::default() };
    let run = |dev: &Device| {
        let m = Ip2p::from_folder(&ip2p, dev).unwrap();
        let cond = m.encode_text("make it snowy").unwrap();
        let px: Vec<f32> = m.apply(&img, cond, &opts, &Noise::Seeded(3), &mut |_, _| true).unwrap().into_data().try_to_vec().unwrap();
        let parts = clip.vision(dev).unwrap().model;
        let pre = clip.preprocess_config().unwrap();
        let learned = learn(&m, &parts, &pre, &pairs, "a photo", &lopts, None, &mut |_, _| true).unwrap();
        // The VAE alone at 512 x 512: encode, decode.
        let z = m.encode_image(&img512);
        let round: Vec<f32> = m.decode(z.clone().mul_scalar(m.vae.scaling_factor)).into_data().try_to_vec().unwrap();
        let z: Vec<f32> = z.into_data().try_to_vec().unwrap();
        (m.text.token_embedding.len(), px, learned, z, round)
    };

    // Reference: ndarray, default budget (one table chunk, attention in one piece).
    assert_eq!(max_buffer_bytes(), 128 << 20);
    let (chunks_ref, px_ref, learned_ref, z_ref, round_ref) = run(&Device::ndarray());
    assert_eq!(chunks_ref, 1);

    // What a naive implementation would allocate at this size: the first attention's scores,
    // [3 guidance rows, heads, tokens, tokens] f32, are larger than the device's binding limit.
    let cfg: UNetConfig = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-ip2p/unet/config.json")).unwrap()).unwrap();
    let tokens = (256 / 8) * (256 / 8);
    let heads = cfg.heads(0);
    let naive = 3 * heads * tokens * tokens * 4;
    let binding = 8u64 << 20;
    assert!(naive > binding as usize, "the test must exceed the limit: {naive} bytes");

    // The VAE decoder's last upsampler at 512 px writes [1, 32, 512, 512] f32 = 32 MiB: kept as
    // slices of whole GroupNorm groups (8 groups of 4 channels: 4 MiB each).
    let vae: VaeConfig = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-ip2p/vae/config.json")).unwrap()).unwrap();
    let widest = vae.block_out_channels[1] * 512 * 512 * 4;
    assert!(widest > binding as usize, "the test must exceed the limit: {widest} bytes");

    set_max_buffer_bytes(4 << 20);
    assert_eq!(plan(1, 32, 512, 512, 4).len(), 8);
    let dev = limited_device(binding, 16 << 20);
    let (chunks, px, learned, z, round) = run(&dev);
    set_max_buffer_bytes(128 << 20);
    // 49408 x 32 f32 = 6.3 MB: four chunks of at most 2 MiB.
    assert_eq!(chunks, 4);
    let e = max_abs(&px, &px_ref);
    println!("apply 256x256, 2 steps, on 8 MiB bindings vs ndarray: max abs pixel difference {e:.2e}");
    assert!(e < 1e-3, "{e}");
    let rows_err = max_abs(&learned.rows, &learned_ref.rows) / learned_ref.rows.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!("learn 256 px, 2 steps: instruction rel err {rows_err:.2e}");
    assert!(rows_err < 1e-4, "{rows_err}");
    let ez = max_abs(&z, &z_ref);
    let er = max_abs(&round, &round_ref);
    println!("VAE 512x512 on 8 MiB bindings vs ndarray: latent max abs diff {ez:.2e}, decoded pixels {er:.2e}");
    assert!(ez < 1e-4 && er < 1e-4, "{ez} {er}");
    let t: Vec<usize> = learned.history.iter().map(|s| s.t).collect();
    assert_eq!(t, learned_ref.history.iter().map(|s| s.t).collect::<Vec<_>>());
}
