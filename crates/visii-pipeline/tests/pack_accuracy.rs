//! Weight packs (int8 / f16) of the tiny models: conversion, loading through the same loaders,
//! accuracy against f32 (UNet prediction, CLIP embeddings, a 3-step apply with fixed noises; measured
//! q8 50.7 dB / UNet rel 1.2e-2, q8-block 52.1 dB / 1.1e-2, f16 75.6 dB / 7e-4; the issue targets 30 dB), the
//! model identity surviving quantisation, and the manifest's shard sizes and hashes.

#![allow(deprecated)]

mod common;
use common::{fixtures, psnr};

use burn::tensor::{Device, Tensor, TensorData};
use visii_models::pack::{convert, Quant};
use visii_models::{ClipFolder, Ip2pFolder, WeightFile};
use visii_pipeline::{ApplyOptions, Ip2p, ModelIdentity, Noise, RgbImage};

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    err / b.iter().fold(0f32, |m, y| m.max(y.abs()))
}

/// Cosine between the CLIP directions (image 1 - image 0) of two embedding sets: what the learning
/// loss uses from CLIP.
fn direction_cos(a: &[f32], b: &[f32]) -> f32 {
    let d = a.len() / 3;
    let da: Vec<f32> = (0..d).map(|i| a[d + i] - a[i]).collect();
    let db: Vec<f32> = (0..d).map(|i| b[d + i] - b[i]).collect();
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    dot(&da, &db) / (dot(&da, &da) * dot(&db, &db)).sqrt()
}

struct Outputs {
    unet: Vec<f32>,
    embeds: Vec<f32>,
    image: Vec<f32>,
    identity: ModelIdentity,
}

fn run(model_dir: &std::path::Path, clip_dir: &std::path::Path, dev: &Device) -> Outputs {
    let g = WeightFile::from_path(fixtures().join("goldens/goldens.safetensors")).unwrap();
    let model = Ip2p::from_folder(&Ip2pFolder::open(model_dir).unwrap(), dev).unwrap();
    let t = |k: &str, s: [usize; 4]| Tensor::<4>::from_data(TensorData::new(g.read_f32(k).unwrap(), s), dev);
    let sample = t("unet.sample", [3, 8, 12, 16]);
    let states = Tensor::<3>::from_data(TensorData::new(g.read_f32("unet.encoder_hidden_states").unwrap(), [3, 77, 32]), dev);
    let unet = model.unet.forward(sample, &[500.0; 3], states).into_data().try_to_vec::<f32>().unwrap();
    let clip = ClipFolder::open(clip_dir).unwrap();
    let parts = clip.vision(dev).unwrap().model;
    let px = Tensor::<4>::from_data(TensorData::new(g.read_f32("clip.pixel_values").unwrap(), [3, 3, 224, 224]), dev);
    let embeds = parts.vision.image_embeds(px).into_data().try_to_vec::<f32>().unwrap();
    let image = RgbImage::decode(&std::fs::read(fixtures().join("images/before.png")).unwrap()).unwrap();
    let all = g.read_f32("apply.step_noises").unwrap();
    let noise = Noise::Given { init: g.read_f32("apply.init_noise").unwrap(), steps: all.chunks(all.len() / 3).map(|c| c.to_vec()).collect() };
    let cond = model.encode_text("turn it into a watercolor painting").unwrap();
    let out = model.apply(&image, cond, &ApplyOptions { steps: 3, ..ApplyOptions::default() }, &noise, &mut |_, _| true).unwrap();
    Outputs { unet, embeds, image: out.into_data().try_to_vec::<f32>().unwrap(), identity: ModelIdentity::of(&model).unwrap() }
}

#[test]
fn packs_load_and_stay_close_to_f32() {
    let dev = Device::ndarray();
    let (ip2p, clip) = (fixtures().join("tiny-ip2p"), fixtures().join("tiny-clip"));
    let reference = run(&ip2p, &clip, &dev);
    println!("{:<16} {:>9} {:>7} {:>10} {:>10} {:>9} {:>10}", "scheme", "pack kB", "shards", "UNet rel", "CLIP rel", "CLIP dir", "apply PSNR");
    // (UNet / VAE / text scheme, CLIP vision scheme, least apply PSNR, largest CLIP embedding rel err)
    for (quant, clip_quant, min_psnr, clip_tol) in [
        (Quant::Q8, Quant::Q4, 40.0, 0.15),
        (Quant::Q8, Quant::Q8, 40.0, 0.03),
        (Quant::Q8Block, Quant::Q8Block, 40.0, 0.03),
        (Quant::F16, Quant::F16, 60.0, 0.03),
    ] {
        let dir = std::env::temp_dir().join(format!("visii-pack-{quant:?}-{clip_quant:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let report = convert(&Ip2pFolder::open(&ip2p).unwrap(), &ClipFolder::open(&clip).unwrap(), &dir, quant, clip_quant, 1).unwrap();
        let out = run(&dir, &dir.join("clip"), &dev);
        let (u, c, p) = (rel(&out.unet, &reference.unet), rel(&out.embeds, &reference.embeds), psnr(&out.image, &reference.image));
        let dir_cos = direction_cos(&out.embeds, &reference.embeds);
        println!(
            "{:<16} {:>9.0} {:>7} {:>10.2e} {:>10.2e} {:>9.4} {:>10.1}",
            format!("{quant:?}/{clip_quant:?}"),
            report.bytes as f64 / 1e3,
            report.shards,
            u,
            c,
            dir_cos,
            p
        );
        assert!(dir_cos > 1.0 - 10.0 * clip_tol * clip_tol, "{quant:?}/{clip_quant:?}: CLIP direction cosine {dir_cos}");
        assert!(p >= min_psnr, "{quant:?}: apply PSNR {p} dB < {min_psnr}");
        assert!(u < 0.03 && c < clip_tol, "{quant:?}/{clip_quant:?}: UNet {u}, CLIP {c}");
        // The same model as far as instruction files are concerned.
        assert!(out.identity.matches(&reference.identity), "{quant:?}: {:?} vs {:?}", out.identity, reference.identity);
        // The manifest: shards within the limit (a tensor larger than the limit gets its own shard),
        // sizes and hashes as written.
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(m["format"], "visii-pack");
        let shards = m["shards"].as_array().unwrap();
        assert_eq!(shards.len(), report.shards);
        for s in shards {
            let bytes = std::fs::read(dir.join(s["path"].as_str().unwrap())).unwrap();
            assert_eq!(bytes.len() as u64, s["bytes"].as_u64().unwrap());
            use sha2::Digest;
            let sha: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(sha, s["sha256"].as_str().unwrap());
        }
        let tensors = m["tensors"].as_array().unwrap();
        assert!(tensors.iter().any(|t| t["name"] == "clip/visual_projection.weight"));
        assert!(!tensors.iter().any(|t| t["name"].as_str().unwrap().starts_with("clip/text_model.")), "the CLIP text tower is not packed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Every file under `dir` by its `/`-separated path relative to `base`.
fn files_under(base: &std::path::Path, dir: &std::path::Path, out: &mut std::collections::HashMap<String, std::sync::Arc<[u8]>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(base, &p, out);
        } else {
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().replace('\\', "/");
            out.insert(rel, std::fs::read(&p).unwrap().into());
        }
    }
}

/// A pack as the page gives it to the engine: the InstructPix2Pix files without `clip/`, the
/// `clip/` files on their own with the pack's manifest beside them. Both load (the CI failure of
/// 2026-12-05: the InstructPix2Pix side asked for `clip/config.json`), and both sides are checked
/// against the manifest: an edited CLIP config or CLIP shard is refused, not loaded.
#[test]
fn a_pack_split_as_the_page_gives_it_loads_and_is_checked() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use visii_models::loader::Files;
    let dev = Device::ndarray();
    let dir = std::env::temp_dir().join(format!("visii-pack-split-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    convert(
        &Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap(),
        &ClipFolder::open(fixtures().join("tiny-clip")).unwrap(),
        &dir,
        Quant::Q8,
        Quant::Q8,
        1,
    )
    .unwrap();
    let mut all = HashMap::new();
    files_under(&dir, &dir, &mut all);
    let _ = std::fs::remove_dir_all(&dir);
    let ip2p: HashMap<String, Arc<[u8]>> = all.iter().filter(|(k, _)| !k.starts_with("clip/")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let clip_of = |all: &HashMap<String, Arc<[u8]>>| -> HashMap<String, Arc<[u8]>> {
        let mut c: HashMap<String, Arc<[u8]>> = all.iter().filter_map(|(k, v)| k.strip_prefix("clip/").map(|r| (r.to_string(), v.clone()))).collect();
        c.insert("manifest.json".into(), all["manifest.json"].clone());
        c
    };
    assert!(ip2p.contains_key("manifest.json") && !ip2p.keys().any(|k| k.starts_with("clip/")));
    let folder = Ip2pFolder::from_files(Files::memory("pack", ip2p)).expect("the InstructPix2Pix side of a pack, without clip/");
    Ip2p::from_folder(&folder, &dev).expect("its networks load");
    let clip = ClipFolder::from_files(Files::memory("clip", clip_of(&all))).expect("the CLIP side with the manifest beside it");
    clip.vision(&dev).expect("the CLIP vision tower loads");

    // Edited CLIP files, given the same way: refused, naming the checksum.
    let mut edited = all.clone();
    let mut cfg = edited["clip/config.json"].to_vec();
    cfg.push(b' ');
    edited.insert("clip/config.json".into(), cfg.into());
    let e = ClipFolder::from_files(Files::memory("clip", clip_of(&edited))).err().expect("an edited CLIP config is refused");
    assert!(e.to_string().contains("checksum"), "{e}");
    let shard = all.keys().find(|k| k.starts_with("clip/") && k.ends_with(".safetensors")).expect("a CLIP shard").clone();
    let mut edited = all.clone();
    let mut bytes = edited[&shard].to_vec();
    *bytes.last_mut().unwrap() ^= 1;
    edited.insert(shard.clone(), bytes.into());
    let clip = ClipFolder::from_files(Files::memory("clip", clip_of(&edited))).expect("configs intact");
    let e = clip.vision(&dev).err().expect("a CLIP shard with a flipped byte is refused");
    assert!(e.to_string().contains("checksum") || e.to_string().contains("sha256"), "{e}");
}
