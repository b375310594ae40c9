//! Bounded GPU buffers: the models must run on a device whose buffer limits are smaller than the
//! tensors a naive implementation creates. The real model on WebGPU's default limits (128 MiB
//! storage bindings, 256 MiB buffers) meets 1.5 GB attention-score tensors at 512 px and a 152 MB
//! token-embedding table; here the tiny model meets the same situation on a wgpu device requested
//! with 8 MiB bindings / 16 MiB buffers, with our buffer budget at 4 MiB. Results must equal the
//! unconstrained ndarray run of the same seed.
//!
//! One test function: the budget is process-wide.

#![allow(deprecated)]

use std::path::PathBuf;

use burn::tensor::wgpu::{wgpu, WgpuSetup};
use burn::tensor::Device;
use visii_models::nn::{max_buffer_bytes, set_max_buffer_bytes};
use visii_models::{ClipFolder, Ip2pFolder, UNetConfig};
use visii_pipeline::learn::{learn, LearnOptions};
use visii_pipeline::{ApplyOptions, Ip2p, Noise, RgbImage};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn image(name: &str) -> RgbImage {
    RgbImage::decode(&std::fs::read(fixtures().join("images").join(name)).unwrap()).unwrap()
}

/// A wgpu device (lavapipe here) requested with these storage-binding and buffer limits; the
/// workgroup limits stay the adapter's.
fn limited_device(binding: u64, buffer: u64) -> Device {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backend::Vulkan.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = burn_std::future::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).expect("a Vulkan adapter");
    let mut limits = adapter.limits();
    limits.max_storage_buffer_binding_size = binding;
    limits.max_buffer_size = buffer;
    let (device, queue) = burn_std::future::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: adapter.features() - wgpu::Features::MAPPABLE_PRIMARY_BUFFERS,
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device with lowered limits");
    let backend = adapter.get_info().backend;
    Device::wgpu_options().setup(WgpuSetup { instance, adapter, device, queue, backend }).init().expect("burn on the limited device")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn tiny_model_runs_within_small_buffer_limits() {
    let ip2p = Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap();
    let clip = ClipFolder::open(fixtures().join("tiny-clip")).unwrap();
    let img = image("tall.png").resized(256, 256);
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
        (m.text.token_embedding.len(), px, learned)
    };

    // Reference: ndarray, default budget (one table chunk, attention in one piece).
    assert_eq!(max_buffer_bytes(), 128 << 20);
    let (chunks_ref, px_ref, learned_ref) = run(&Device::ndarray());
    assert_eq!(chunks_ref, 1);

    // What a naive implementation would allocate at this size: the first attention's scores,
    // [3 guidance rows, heads, tokens, tokens] f32, are larger than the device's binding limit.
    let cfg: UNetConfig = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-ip2p/unet/config.json")).unwrap()).unwrap();
    let tokens = (256 / 8) * (256 / 8);
    let heads = cfg.heads(0);
    let naive = 3 * heads * tokens * tokens * 4;
    let binding = 8u64 << 20;
    assert!(naive > binding as usize, "the test must exceed the limit: {naive} bytes");

    set_max_buffer_bytes(4 << 20);
    let dev = limited_device(binding, 16 << 20);
    let (chunks, px, learned) = run(&dev);
    set_max_buffer_bytes(128 << 20);
    // 49408 x 32 f32 = 6.3 MB: four chunks of at most 2 MiB.
    assert_eq!(chunks, 4);
    let e = max_abs(&px, &px_ref);
    println!("apply 256x256, 2 steps, on 8 MiB bindings vs ndarray: max abs pixel difference {e:.2e}");
    assert!(e < 1e-3, "{e}");
    let rows_err = max_abs(&learned.rows, &learned_ref.rows) / learned_ref.rows.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!("learn 256 px, 2 steps: instruction rel err {rows_err:.2e}");
    assert!(rows_err < 1e-4, "{rows_err}");
    let t: Vec<usize> = learned.history.iter().map(|s| s.t).collect();
    assert_eq!(t, learned_ref.history.iter().map(|s| s.t).collect::<Vec<_>>());
}
