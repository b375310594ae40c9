//! Apply (InstructPix2Pix sampling) against diffusers' pipeline on the tiny model, with the same
//! injected noises (tests/fixtures/generate.py saved them), on ndarray and wgpu.

#![allow(deprecated)]

use std::path::PathBuf;

use burn::tensor::{Device, DeviceKind};
use visii_models::{Ip2pFolder, WeightFile};
use visii_pipeline::{ApplyOptions, Ip2p, Noise, RgbImage};

/// Measured max abs error in [0, 1] pixel units: see the test output (f32; 3 steps).
const TOL_APPLY: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn check_apply(device: &Device) {
    let g = WeightFile::from_path(fixtures().join("goldens/goldens.safetensors")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("goldens/goldens.json")).unwrap()).unwrap();
    let m = &meta["apply"];
    let model = Ip2p::from_folder(&Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap(), device).unwrap();
    let image = RgbImage::decode(&std::fs::read(fixtures().join("images").join(m["image"].as_str().unwrap())).unwrap()).unwrap();
    let steps = m["steps"].as_u64().unwrap() as usize;
    let all = g.read_f32("apply.step_noises").unwrap();
    let per = all.len() / steps;
    let noise = Noise::Given { init: g.read_f32("apply.init_noise").unwrap(), steps: all.chunks(per).map(|c| c.to_vec()).collect() };
    let opts = ApplyOptions {
        steps,
        guidance: m["guidance_scale"].as_f64().unwrap() as f32,
        image_guidance: m["image_guidance_scale"].as_f64().unwrap() as f32,
        seed: 0,
    };
    let cond = model.encode_text(m["prompt"].as_str().unwrap()).unwrap();
    let mut seen = vec![];
    let out = model
        .apply(&image, cond, &opts, &noise, &mut |i, n| {
            seen.push((i, n));
            true
        })
        .unwrap();
    assert_eq!(seen.last(), Some(&(steps, steps)));
    assert_eq!(out.dims(), [1, 3, 56, 80]);
    let ours: Vec<f32> = out.into_data().to_vec().unwrap();
    let want = g.read_f32("apply.output").unwrap();
    let err = ours.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("apply vs diffusers: max abs error {err:.3e} (tolerance {TOL_APPLY:.0e})");
    assert!(err <= TOL_APPLY, "apply differs from diffusers by {err}");
    let moved = ours.iter().zip(&image.to_unit_floats()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 0.05, "the edit left the image unchanged");
}

#[test]
fn apply_matches_diffusers_ndarray() {
    check_apply(&Device::ndarray());
}

#[test]
fn apply_matches_diffusers_wgpu() {
    check_apply(&Device::wgpu(DeviceKind::DefaultDevice));
}

#[test]
fn seeded_apply_is_reproducible_and_seed_dependent() {
    let device = Device::ndarray();
    let model = Ip2p::from_folder(&Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap(), &device).unwrap();
    let image = RgbImage::decode(&std::fs::read(fixtures().join("images/tall.png")).unwrap()).unwrap();
    let (w, h) = image.working_size(512);
    let image = image.resized(w, h);
    let opts = ApplyOptions { steps: 2, ..ApplyOptions::default() };
    let run = |seed: u64| -> Vec<f32> {
        let cond = model.encode_text("make it snowy").unwrap();
        model.apply(&image, cond, &opts, &Noise::Seeded(seed), &mut |_, _| true).unwrap().into_data().to_vec().unwrap()
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Cancelling stops with a clear error.
    let cond = model.encode_text("x").unwrap();
    let err = model.apply(&image, cond, &opts, &Noise::Seeded(1), &mut |i, _| i < 1).unwrap_err();
    assert!(err.to_string().contains("cancelled"));
}

#[test]
fn hybrid_writes_extra_rows_after_the_learned_span() {
    let device = Device::ndarray();
    let model = Ip2p::from_folder(&Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap(), &device).unwrap();
    let (cond, eos) = model.encode_text_with_eos("a watercolor painting").unwrap();
    let (extra, extra_eos) = model.encode_text_with_eos("a husky").unwrap();
    assert_eq!((eos, extra_eos), (4, 3));
    let mixed = visii_pipeline::hybrid(cond.clone(), eos, extra.clone(), extra_eos);
    let (c, e, m): (Vec<f32>, Vec<f32>, Vec<f32>) =
        (cond.into_data().to_vec().unwrap(), extra.into_data().to_vec().unwrap(), mixed.into_data().to_vec().unwrap());
    let row = |v: &[f32], i: usize| v[i * 32..(i + 1) * 32].to_vec();
    for i in 0..eos + 2 {
        assert_eq!(row(&m, i), row(&c, i), "row {i} keeps the learned instruction");
    }
    assert_eq!(row(&m, eos + 2), row(&e, 1), "first extra token");
    assert_eq!(row(&m, eos + 3), row(&e, 2), "second extra token");
    for i in eos + 4..77 {
        assert_eq!(row(&m, i), row(&c, i), "row {i} after the extra tokens");
    }
}
