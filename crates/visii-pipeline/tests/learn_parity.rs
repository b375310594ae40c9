//! Two inversion steps against the PyTorch reference of the intended math (fp32 AdamW, unscaled
//! gradients; tests/fixtures/generate.py), with the same timesteps and noises, on ndarray and wgpu.

#![allow(deprecated)]

use std::path::PathBuf;

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use visii_models::{ClipFolder, Ip2pFolder, WeightFile};
use visii_pipeline::learn::{AdamWConfig, Inversion, PairLatents};
use visii_pipeline::{Ip2p, RgbImage, SchedulerConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn check_learn(device: &Device) {
    let f = fixtures();
    let g = WeightFile::from_path(f.join("goldens/goldens.safetensors")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f.join("goldens/goldens.json")).unwrap()).unwrap();
    let m = &meta["learn"];
    let model = Ip2p::from_folder(&Ip2pFolder::open(f.join("tiny-ip2p")).unwrap(), device).unwrap();
    let clip = ClipFolder::open(f.join("tiny-clip")).unwrap();
    let parts = clip.vision(device).unwrap().model;
    let pre = clip.preprocess_config().unwrap();
    let load = |name: &str| RgbImage::decode(&std::fs::read(f.join("images").join(name)).unwrap()).unwrap();
    let (before, after) = (load(m["before"].as_str().unwrap()), load(m["after"].as_str().unwrap()));

    // CLIP direction: normalised difference of the image embeddings.
    let embed = |img: &RgbImage| {
        let (px, [c, h, w]) = pre.apply(&img.data, img.width, img.height).unwrap();
        parts.vision.image_embeds(Tensor::<4>::from_data(TensorData::new(px, [1, c, h, w]), device))
    };
    let d = (embed(&after) - embed(&before)).reshape([24]);
    let direction = d.clone().div_scalar(d.powi_scalar(2).sum().sqrt().into_scalar::<f32>());

    let pair = PairLatents { z_after: model.encode_image(&after).mul_scalar(model.vae.scaling_factor), z_before: model.encode_image(&before) };
    let ids = model.token_ids(m["init"].as_str().unwrap()).unwrap();
    let eos = model.tokenizer.eos_position(&ids);
    assert_eq!(eos as u64, m["eos"].as_u64().unwrap());
    let mut inv = Inversion::new(
        model.encode_text(m["init"].as_str().unwrap()).unwrap(),
        model.encode_text("").unwrap(),
        direction,
        eos,
        AdamWConfig::default(),
    )
    .unwrap();
    assert!((inv.clip_value - m["clip_value"].as_f64().unwrap() as f32).abs() < 1e-5);

    let sigmas = SchedulerConfig::default().train_sigmas().unwrap();
    let noises = g.read_f32("learn.noises").unwrap();
    let ts: Vec<usize> = m["timesteps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let per = noises.len() / ts.len();
    for (k, &t) in ts.iter().enumerate() {
        let n = Tensor::<4>::from_data(TensorData::new(noises[k * per..(k + 1) * per].to_vec(), [1, 4, 7, 10]), device);
        let s = inv.step(&model.unet, &parts.text_projection, &pair, t, sigmas[t], n).unwrap();
        let want = &m["stats_mse_cos_loss"][k];
        let (mse, cos, loss) = (want[0].as_f64().unwrap() as f32, want[1].as_f64().unwrap() as f32, want[2].as_f64().unwrap() as f32);
        println!("step {k} t={t}: mse {} vs {mse}, cos {} vs {cos}, loss {} vs {loss}", s.mse, s.cos, s.loss);
        assert!((s.mse - mse).abs() <= 1e-4 * mse.abs().max(1.0), "mse");
        assert!((s.cos - cos).abs() <= 1e-5, "cos");
        assert!((s.loss - loss).abs() <= 1e-4 * loss.abs().max(1.0), "loss");
    }
    let want = g.read_f32("learn.c_after").unwrap();
    let c0: Vec<f32> = inv.c0.clone().into_data().to_vec().unwrap();
    let ours: Vec<f32> = inv.c.clone().into_data().to_vec().unwrap();
    let err = ours.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    let moved = want.iter().zip(&c0).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    println!("instruction after {} steps: max abs error {err:.3e}; the reference moved it by up to {moved:.3e}", ts.len());
    assert!(moved > 1e-3, "the reference did not move c");
    assert!(err <= 0.01 * moved, "learned instruction differs from the reference by {err}");
    // Positions outside 1..eos are exactly the initial values.
    let hidden = 32;
    assert_eq!(&ours[..hidden], &c0[..hidden]);
    assert_eq!(&ours[eos * hidden..], &c0[eos * hidden..]);
}

#[test]
fn learn_steps_match_reference_ndarray() {
    check_learn(&Device::ndarray());
}

#[test]
fn learn_steps_match_reference_wgpu() {
    check_learn(&Device::wgpu(DeviceKind::DefaultDevice));
}
