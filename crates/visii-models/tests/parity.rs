//! Parity of every network with diffusers / transformers on the tiny models of the real
//! architectures (`tests/fixtures/generate.py` wrote the models and the goldens). Each check runs on
//! the ndarray backend and on wgpu (lavapipe on CPU-only machines).
//!
//! Tolerances: max |ours - reference| / max |reference|, chosen from the measured f32 error
//! (printed by each test) with about 10x headroom; see the constants.

#![allow(deprecated)] // Device::ndarray is deprecated in burn 0.22 but is the reference CPU backend here.

use std::path::PathBuf;

use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};
use visii_models::loader::{text_encoder_from_parts, unet_from_parts, vae_from_parts, weight_files_in};
use visii_models::{ClipFolder, ClipTokenizer, Ip2pFolder, ModelError, WeightFile};

/// Relative tolerances, >= 10x the errors measured in f32 (ndarray / wgpu on lavapipe):
/// text 4.3e-7 / 4.2e-7, vision 2.5e-7 / 2.5e-7, VAE 3.8e-6 / 3.5e-6, UNet 1.1e-6 / 1.1e-6.
const TOL_TEXT: f32 = 1e-5;
const TOL_VISION: f32 = 1e-5;
const TOL_VAE: f32 = 5e-5;
const TOL_UNET: f32 = 2e-5;
/// Pixel values: PIL's fixed-point resample is reproduced exactly; only float rounding differs.
const TOL_PIXELS: f32 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn goldens() -> WeightFile {
    WeightFile::from_path(fixtures().join("goldens/goldens.safetensors")).expect("goldens (run tests/fixtures/generate.py)")
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("goldens/goldens.json")).unwrap()).unwrap()
}

fn golden<const D: usize>(g: &WeightFile, name: &str, device: &Device) -> Tensor<D> {
    let shape: [usize; D] = g.shape(name).unwrap_or_else(|| panic!("golden {name}")).try_into().unwrap();
    Tensor::from_data(TensorData::new(g.read_f32(name).unwrap(), shape), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Assert ours ~ reference; returns the relative error.
fn close<const D: usize>(what: &str, ours: Tensor<D>, reference: Tensor<D>, tol: f32) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let (a, b) = (values(ours), values(reference));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    println!("{what}: max rel error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
    err
}

fn ip2p() -> Ip2pFolder {
    Ip2pFolder::open(fixtures().join("tiny-ip2p")).unwrap()
}

fn clip() -> ClipFolder {
    ClipFolder::open(fixtures().join("tiny-clip")).unwrap()
}

fn text_ids(device: &Device) -> Tensor<2, Int> {
    let g = goldens();
    let ids: Vec<i64> = {
        let st = std::fs::read(fixtures().join("goldens/goldens.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let v = st.tensor("text.input_ids").unwrap();
        v.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
    };
    let shape: [usize; 2] = g.shape("text.input_ids").unwrap().try_into().unwrap();
    Tensor::from_data(TensorData::new(ids, shape), device)
}

// ------------------------------------------------------------------ checks (backend-generic)

fn check_text(device: &Device) {
    let g = goldens();
    let te = ip2p().text_encoder(device).unwrap();
    let hidden = te.model.forward(text_ids(device));
    close("text last_hidden_state", hidden.clone(), golden(&g, "text.last_hidden_state", device), TOL_TEXT);
    // The CLIP folder's text tower is the same network (and the CLIP loss projects the mean row).
    let parts = clip().vision(device).unwrap();
    let mean = hidden.mean_dim(1).squeeze_dim::<2>(1);
    close("text_projection(mean rows)", parts.model.text_projection.forward(mean), golden(&g, "text.projected_mean", device), TOL_TEXT);
}

fn check_vision(device: &Device) {
    let g = goldens();
    let parts = clip().vision(device).unwrap();
    let pix: Tensor<4> = golden(&g, "clip.pixel_values", device);
    close("clip pooled", parts.model.vision.pooled(pix.clone()), golden(&g, "clip.pooled", device), TOL_VISION);
    close("clip image_embeds", parts.model.vision.image_embeds(pix), golden(&g, "clip.image_embeds", device), TOL_VISION);
}

fn check_vae(device: &Device) {
    let g = goldens();
    let vae = ip2p().vae(device).unwrap();
    let (mean, logvar) = vae.model.encode(golden(&g, "vae.input", device));
    close("vae encode mean", mean, golden(&g, "vae.mean", device), TOL_VAE);
    close("vae encode logvar", logvar, golden(&g, "vae.logvar", device), TOL_VAE);
    let out = vae.model.decode(golden(&g, "vae.decode.input", device));
    close("vae decode", out, golden(&g, "vae.decode.output", device), TOL_VAE);
}

fn check_unet(device: &Device) {
    let g = goldens();
    let unet = ip2p().unet(device).unwrap();
    let m = meta();
    // Sampling projects the text once for all its steps: the same values as projecting per pass.
    let text = unet.model.project_text(golden(&g, "unet.encoder_hidden_states", device));
    for (name, t) in m["unet_timesteps"].as_object().unwrap() {
        let t = t.as_f64().unwrap() as f32;
        let out = unet.model.forward(golden(&g, "unet.sample", device), &[t, t, t], golden(&g, "unet.encoder_hidden_states", device));
        let projected = unet.model.forward_projected(golden(&g, "unet.sample", device), &[t, t, t], &text);
        assert_eq!(values(projected), values(out.clone()), "unet t={t}: forward on projected text states");
        close(&format!("unet t={t}"), out, golden(&g, &format!("unet.{name}"), device), TOL_UNET);
    }
}

/// Gradient of sum(w * unet(x, t, c)) w.r.t. the text states c, against torch autograd: the
/// learning loop's backward. Weights stay frozen on the plain device; only c is tracked.
fn check_unet_grad(device: &Device) {
    let g = goldens();
    let unet = ip2p().unet(device).unwrap();
    let sample: Tensor<4> = golden(&g, "unet.sample", device);
    let [_, c, h, w] = sample.dims();
    let sample = sample.slice([0..1, 0..c, 0..h, 0..w]);
    let states: Tensor<3> = golden(&g, "unet.encoder_hidden_states", device);
    let [_, n, d] = states.dims();
    let states = states.slice([0..1, 0..n, 0..d]).autodiff().require_grad();
    let out = unet.model.forward(sample.autodiff(), &[500.0], states.clone());
    let weight: Tensor<4> = golden(&g, "unet.grad.weight", device);
    let grads = (out * weight.autodiff()).sum().backward();
    let grad = states.grad(&grads).expect("gradient w.r.t. the text states");
    // Backward sums many products: measured 6.7e-5 (ndarray) / 6.8e-5 (wgpu) relative to the largest entry.
    close("unet d/d(text states)", grad, golden(&g, "unet.grad.states", device), 5e-4);
}

/// SD2.x-style UNet: linear proj_in/out and a per-block list of head counts.
fn check_unet_linear(device: &Device) {
    let g = goldens();
    let dir = fixtures().join("tiny-unet-linear");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let unet = unet_from_parts(&cfg, weight_files_in(&dir, "diffusion_pytorch_model").unwrap(), device).unwrap();
    assert!(unet.config.use_linear_projection);
    assert_eq!((unet.config.heads(0), unet.config.heads(2)), (2, 4));
    let out = unet.model.forward(golden(&g, "unet_linear.sample", device), &[999.0], golden(&g, "unet_linear.encoder_hidden_states", device));
    let text = unet.model.project_text(golden(&g, "unet_linear.encoder_hidden_states", device));
    let projected = unet.model.forward_projected(golden(&g, "unet_linear.sample", device), &[999.0], &text);
    assert_eq!(values(projected), values(out.clone()), "unet (linear projections): forward on projected text states");
    close("unet (linear projections, head list) t=999", out, golden(&g, "unet_linear.t999", device), TOL_UNET);
}

macro_rules! on_backends {
    ($($check:ident),*) => {
        mod ndarray {
            $( #[test] fn $check() { super::$check(&burn::tensor::Device::ndarray()); } )*
        }
        mod wgpu {
            $( #[test] fn $check() { super::$check(&burn::tensor::Device::wgpu(super::DeviceKind::DefaultDevice)); } )*
        }
    };
}
on_backends!(check_text, check_vision, check_vae, check_unet, check_unet_linear, check_unet_grad);

// ------------------------------------------------------------------ tokenizer and preprocessing (no backend)

#[test]
fn tokenizer_ids_match_transformers() {
    let m = meta();
    let prompts = m["prompts"].as_array().unwrap();
    let expected = m["token_ids"].as_array().unwrap();
    // The IP2P folder has only vocab.json + merges.txt; the CLIP folder has tokenizer.json.
    let from_merges = ip2p().tokenizer().unwrap();
    let from_json = ClipTokenizer::from_dir(fixtures().join("tiny-clip")).unwrap();
    assert_eq!(from_merges.pad_id, 49407);
    for (p, e) in prompts.iter().zip(expected) {
        let e: Vec<u32> = e.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let p = p.as_str().unwrap();
        assert_eq!(from_merges.encode(p).unwrap(), e, "vocab+merges tokenizer, prompt {p:?}");
        assert_eq!(from_json.encode(p).unwrap(), e, "tokenizer.json tokenizer, prompt {p:?}");
    }
    assert_eq!(from_merges.encode(&"word ".repeat(200)).unwrap().len(), 77);
}

#[test]
fn clip_pixel_values_match_pil_path() {
    let g = goldens();
    let cfg = clip().preprocess_config().unwrap();
    let want = g.read_f32("clip.pixel_values").unwrap();
    let per = want.len() / 3;
    for (i, name) in ["before.png", "after.png", "tall.png"].iter().enumerate() {
        let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
        let (rgb, w, h) = visii_models::preprocess::decode_rgb(&bytes).unwrap();
        let (px, shape) = cfg.apply(&rgb, w, h).unwrap();
        assert_eq!(shape, [3, 224, 224]);
        let err = px.iter().zip(&want[i * per..(i + 1) * per]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("pixel values {name}: max abs error {err:.3e}");
        assert!(err <= TOL_PIXELS, "{name}: pixel values differ by {err}");
    }
}

#[test]
fn bad_image_is_a_clear_error() {
    let err = visii_models::preprocess::decode_rgb(b"this is not an image").unwrap_err();
    assert!(err.to_string().contains("not a readable PNG or JPEG"), "{err}");
}

// ------------------------------------------------------------------ naming variants and loader errors

/// Rewrite a safetensors file: rename keys, optionally cast floats to f16.
fn rewrite(file: &std::path::Path, rename: impl Fn(&str) -> Option<String>, f16: bool) -> Vec<u8> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for (name, view) in st.tensors() {
        let Some(new) = rename(&name) else { continue };
        let (dtype, data) = if f16 && view.dtype() == Dtype::F32 {
            let d: Vec<u8> =
                view.data().chunks_exact(4).flat_map(|c| half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()).collect();
            (Dtype::F16, d)
        } else {
            (view.dtype(), view.data().to_vec())
        };
        owned.push((new, dtype, view.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = owned.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, None).unwrap()
}

fn cpu() -> Device {
    Device::ndarray()
}

#[test]
fn vae_loads_todays_attention_names() {
    let dir = fixtures().join("tiny-ip2p/vae");
    let modern = rewrite(
        &dir.join("diffusion_pytorch_model.safetensors"),
        |n| Some(n.replace(".query.", ".to_q.").replace(".key.", ".to_k.").replace(".value.", ".to_v.").replace(".proj_attn.", ".to_out.0.")),
        false,
    );
    assert!(!String::from_utf8_lossy(&modern[..4096.min(modern.len())]).contains(".query."));
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let vae = vae_from_parts(&cfg, vec![WeightFile::from_bytes("modern vae", modern).unwrap()], &cpu()).unwrap();
    let g = goldens();
    let out = vae.model.decode(golden(&g, "vae.decode.input", &cpu()));
    close("vae decode (today's names)", out, golden(&g, "vae.decode.output", &cpu()), TOL_VAE);
}

#[test]
fn text_encoder_loads_without_prefix_and_from_f16() {
    let dir = fixtures().join("tiny-ip2p/text_encoder");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let g = goldens();
    // transformers 5 layout: no `text_model.` prefix and no position_ids buffer.
    let bare = rewrite(
        &dir.join("model.safetensors"),
        |n| {
            if n.ends_with("position_ids") {
                None
            } else {
                Some(n.trim_start_matches("text_model.").to_string())
            }
        },
        false,
    );
    let te = text_encoder_from_parts(&cfg, vec![WeightFile::from_bytes("bare", bare).unwrap()], &cpu()).unwrap();
    close("text (no prefix)", te.model.forward(text_ids(&cpu())), golden(&g, "text.last_hidden_state", &cpu()), TOL_TEXT);
    // fp16 variant of the weights: f16 rounding of the weights bounds the error (~1e-3 relative).
    let half = rewrite(&dir.join("model.safetensors"), |n| Some(n.to_string()), true);
    let te = text_encoder_from_parts(&cfg, vec![WeightFile::from_bytes("fp16", half).unwrap()], &cpu()).unwrap();
    close("text (fp16 weights)", te.model.forward(text_ids(&cpu())), golden(&g, "text.last_hidden_state", &cpu()), 5e-3);
}

#[test]
fn missing_tensor_names_it_and_the_shape() {
    let dir = fixtures().join("tiny-ip2p/unet");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cut =
        rewrite(&dir.join("diffusion_pytorch_model.safetensors"), |n| (n != "mid_block.attentions.0.proj_in.weight").then(|| n.to_string()), false);
    let err = unet_from_parts(&cfg, vec![WeightFile::from_bytes("cut", cut).unwrap()], &cpu()).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("mid_block.attentions.0.proj_in.weight") && msg.contains("[48, 48, 1, 1]"), "{msg}");
}

#[test]
fn shape_mismatch_names_both_shapes() {
    let dir = fixtures().join("tiny-ip2p/unet");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["cross_attention_dim"] = 40.into();
    let files = weight_files_in(&dir, "diffusion_pytorch_model").unwrap();
    let err = unet_from_parts(&cfg.to_string(), files, &cpu()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{msg}");
    assert!(msg.contains("attn2.to_k.weight") && msg.contains("[32, 32]") && msg.contains("[32, 40]"), "{msg}");
}

#[test]
fn unexpected_tensor_is_an_error_but_buffers_are_not() {
    let dir = fixtures().join("tiny-ip2p/unet");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut cfgv: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    cfgv["layers_per_block"] = 1.into();
    let files = weight_files_in(&dir, "diffusion_pytorch_model").unwrap();
    let err = unet_from_parts(&cfgv.to_string(), files, &cpu()).unwrap_err();
    // With one layer per block, up blocks need other channel counts: a mismatch or an unexpected tensor.
    assert!(matches!(err, ModelError::UnexpectedTensor { .. } | ModelError::ShapeMismatch { .. }), "{err}");
    // position_ids in the 2023 text encoder is a known buffer: loads fine (checked by check_text).
}

#[test]
fn folders_that_are_not_models_are_refused() {
    let err = Ip2pFolder::open(fixtures().join("images")).unwrap_err();
    assert!(err.to_string().contains("model_index.json is missing"), "{err}");
    let err = ClipFolder::open(fixtures().join("tiny-ip2p")).unwrap_err();
    assert!(err.to_string().contains("not a CLIP model folder"), "{err}");
    let err = WeightFile::from_bytes("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}".to_vec()).err().unwrap();
    assert!(err.to_string().contains("not a valid safetensors file"), "{err}");
}

#[test]
fn parameter_counts_match_pytorch() {
    let m = meta();
    let c = &m["param_counts"];
    let f = ip2p();
    assert_eq!(f.unet(&cpu()).unwrap().params as u64, c["unet"].as_u64().unwrap());
    assert_eq!(f.vae(&cpu()).unwrap().params as u64, c["vae"].as_u64().unwrap());
    assert_eq!(f.text_encoder(&cpu()).unwrap().params as u64, c["text_encoder"].as_u64().unwrap());
    let v = clip().vision(&cpu()).unwrap();
    assert_eq!(v.model.vision_params as u64, c["clip_vision"].as_u64().unwrap());
    assert_eq!(v.model.text_projection_params as u64, c["text_projection"].as_u64().unwrap());
}

/// burn 0.22's wgpu `sum_dim` / `mean_dim` reduce only the first 262144 elements of a longer axis;
/// our GroupNorm reduces in slices. A VAE group at 512 px has 4 x 512 x 512 values: this checks a
/// group of 4 x 256 x 512 against the f64 statistics, on both backends.
#[test]
fn long_reductions() {
    use visii_models::nn::{mean_last, GroupNorm};
    let (c, h, w) = (8usize, 256usize, 512usize);
    let v: Vec<f32> = (0..c * h * w).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.3) * (1.0 + (i / (h * w)) as f32)).collect();
    for device in [cpu(), Device::wgpu(DeviceKind::DefaultDevice)] {
        let x = Tensor::<4>::from_data(TensorData::new(v.clone(), [1, c, h, w]), &device);
        let m = values(mean_last(x.clone().reshape([1, 2, c / 2 * h * w])));
        let gn = GroupNorm {
            gamma: burn::module::Param::from_tensor(Tensor::ones([c], &device)),
            beta: burn::module::Param::from_tensor(Tensor::zeros([c], &device)),
            num_groups: 2,
            epsilon: 1e-6,
        };
        let y = values(gn.forward(x));
        let n = c / 2 * h * w;
        for g in 0..2 {
            let part = &v[g * n..(g + 1) * n];
            let mean = part.iter().map(|&a| a as f64).sum::<f64>() / n as f64;
            let var = part.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            assert!((m[g] as f64 - mean).abs() < 1e-5 * mean.abs().max(1.0), "mean {} vs {mean}", m[g]);
            let k = g * n + n - 1; // the last value of the group, far past 262144
            let want = (part[n - 1] as f64 - mean) / (var + 1e-6).sqrt();
            assert!((y[k] as f64 - want).abs() < 1e-4, "group norm {} vs {want}", y[k]);
        }
    }
}
