//! Model folders in their published layouts: an InstructPix2Pix diffusers folder (`model_index.json`,
//! `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) and a transformers `CLIPModel` folder
//! (`config.json`, `model.safetensors`, `preprocessor_config.json`). Components load from config
//! text + safetensors buffers, so the browser (bytes) and the CLI (files) share this code.
//!
//! Name rules (source -> ours), all applied as aliases when the first spelling is missing:
//! | source | accepted as |
//! |---|---|
//! | `text_model.X` (2023 `CLIPTextModel`, `CLIPModel`) | `X` (transformers 5 `CLIPTextModel`) |
//! | VAE `attentions.0.to_q/to_k/to_v/to_out.0` (diffusers today) | `query/key/value/proj_attn` (2023) |
//! | Linear `[out, in]` | transposed to burn's `[in, out]`; `[out, in, 1, 1]` accepted |
//! Known buffers that are ignored: `*.position_ids`; in a `CLIPModel` file, the text tower and
//! `logit_scale` when only the vision side is loaded.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::de::DeserializeOwned;

use crate::clip::{ClipConfig, ClipTextConfig, ClipTextTransformer, ClipVision};
use crate::error::{ModelError, Result};
use crate::nn::linear;
use crate::preprocess::ClipPreprocessConfig;
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::{WeightFile, Weights};

/// A loaded component with its config and the number of parameters read from the weights.
#[derive(Debug)]
pub struct Loaded<M, C> {
    pub model: M,
    pub config: C,
    pub params: usize,
}

/// Parse a config from JSON text; `name` appears in errors.
pub fn parse_config<C: DeserializeOwned>(name: &str, text: &str) -> Result<C> {
    serde_json::from_str(text).map_err(|e| ModelError::Config { path: name.into(), message: e.to_string() })
}

fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// The UNet from its config text and weight files.
pub fn unet_from_parts(config: &str, files: Vec<WeightFile>, device: &Device) -> Result<Loaded<UNet2DConditionModel, UNetConfig>> {
    let cfg: UNetConfig = parse_config("unet/config.json", config)?;
    let w = Weights::new(files, device);
    let model = UNet2DConditionModel::load(&w, &cfg)?;
    w.finish("UNet2DConditionModel", is_buffer)?;
    Ok(Loaded { model, config: cfg, params: w.param_count() })
}

/// The VAE, accepting both attention spellings.
pub fn vae_from_parts(config: &str, files: Vec<WeightFile>, device: &Device) -> Result<Loaded<AutoencoderKL, VaeConfig>> {
    let cfg: VaeConfig = parse_config("vae/config.json", config)?;
    let w = Weights::new(files, device)
        .with_alias(".to_q.", ".query.")
        .with_alias(".to_k.", ".key.")
        .with_alias(".to_v.", ".value.")
        .with_alias(".to_out.0.", ".proj_attn.");
    let model = AutoencoderKL::load(&w, &cfg)?;
    w.finish("AutoencoderKL", is_buffer)?;
    Ok(Loaded { model, config: cfg, params: w.param_count() })
}

/// The CLIP text transformer from a `CLIPTextModel` config (or a `CLIPModel` config's `text_config`).
pub fn text_encoder_from_parts(config: &str, files: Vec<WeightFile>, device: &Device) -> Result<Loaded<ClipTextTransformer, ClipTextConfig>> {
    let value: serde_json::Value = parse_config("text_encoder/config.json", config)?;
    let cfg: ClipTextConfig = match value.get("text_config") {
        Some(t) => serde_json::from_value(t.clone()),
        None => serde_json::from_value(value),
    }
    .map_err(|e| ModelError::Config { path: "text_encoder/config.json".into(), message: e.to_string() })?;
    let w = Weights::new(files, device).with_alias("text_model.", "");
    let model = ClipTextTransformer::load(&w, &cfg)?;
    // A CLIPModel file also holds the vision side: not part of the text encoder.
    w.finish("CLIPTextModel", |n| {
        is_buffer(n) || n.starts_with("vision_model.") || n.starts_with("visual_projection") || n.starts_with("text_projection") || n == "logit_scale"
    })?;
    Ok(Loaded { model, config: cfg, params: w.param_count() })
}

/// The CLIP vision side used by the CLIP loss: vision tower + `visual_projection`, and `text_projection`.
#[derive(Debug)]
pub struct ClipVisionParts {
    pub vision: ClipVision,
    pub text_projection: burn::nn::Linear,
    pub vision_params: usize,
    pub text_projection_params: usize,
}

/// Vision tower + projections from a `CLIPModel` config and weights.
pub fn clip_vision_from_parts(config: &str, files: Vec<WeightFile>, device: &Device) -> Result<Loaded<ClipVisionParts, ClipConfig>> {
    let cfg: ClipConfig = parse_config("config.json", config)?;
    let proj = cfg.projection_dim.unwrap_or(cfg.vision_config.projection_dim);
    let w = Weights::new(files, device);
    let vision = ClipVision::load(&w, &cfg.vision_config, proj)?;
    let vision_params = w.param_count();
    let text_projection = linear(&w.root().pp("text_projection"), cfg.text_config.hidden_size, proj, false)?;
    let text_projection_params = w.param_count() - vision_params;
    w.finish("CLIPModel (vision side)", |n| is_buffer(n) || n.starts_with("text_model.") || n == "logit_scale")?;
    let params = w.param_count();
    Ok(Loaded { model: ClipVisionParts { vision, text_projection, vision_params, text_projection_params }, config: cfg, params })
}

// ------------------------------------------------------------------ folders on disk

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| ModelError::Io { path: path.display().to_string(), message: e.to_string() })
}

/// The safetensors files of a component folder: a sharded index, or one file by its usual names
/// (full precision first, then the `fp16` variant).
pub fn weight_files_in(dir: &Path, stem: &str) -> Result<Vec<WeightFile>> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.exists() {
        let v: serde_json::Value = parse_config(&index.display().to_string(), &read_text(&index)?)?;
        let mut shards: Vec<String> =
            v["weight_map"].as_object().map(|m| m.values().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default();
        shards.sort();
        shards.dedup();
        return shards.iter().map(|s| WeightFile::from_path(dir.join(s))).collect();
    }
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")] {
        let p = dir.join(&name);
        if p.exists() {
            return Ok(vec![WeightFile::from_path(p)?]);
        }
    }
    let bin = dir.join(format!("{stem}.bin"));
    let message = if bin.exists() {
        format!("only {} (PyTorch pickle) is present: convert it to safetensors", bin.display())
    } else {
        format!("no {stem}.safetensors")
    };
    Err(ModelError::NotAModel { path: dir.display().to_string(), expected: "a model component folder".into(), message })
}

/// An InstructPix2Pix folder in the diffusers layout.
#[derive(Clone, Debug)]
pub struct Ip2pFolder {
    pub root: PathBuf,
}

impl Ip2pFolder {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let not = |m: &str| ModelError::NotAModel {
            path: root.display().to_string(),
            expected: "an InstructPix2Pix diffusers folder".into(),
            message: m.into(),
        };
        if !root.is_dir() {
            return Err(not("no such folder"));
        }
        if !root.join("model_index.json").exists() {
            return Err(not("model_index.json is missing"));
        }
        for c in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !root.join(c).is_dir() {
                return Err(not(&format!("the `{c}/` folder is missing")));
            }
        }
        Ok(Self { root })
    }

    pub fn unet(&self, device: &Device) -> Result<Loaded<UNet2DConditionModel, UNetConfig>> {
        let d = self.root.join("unet");
        unet_from_parts(&read_text(&d.join("config.json"))?, weight_files_in(&d, "diffusion_pytorch_model")?, device)
    }

    pub fn vae(&self, device: &Device) -> Result<Loaded<AutoencoderKL, VaeConfig>> {
        let d = self.root.join("vae");
        vae_from_parts(&read_text(&d.join("config.json"))?, weight_files_in(&d, "diffusion_pytorch_model")?, device)
    }

    pub fn text_encoder(&self, device: &Device) -> Result<Loaded<ClipTextTransformer, ClipTextConfig>> {
        let d = self.root.join("text_encoder");
        text_encoder_from_parts(&read_text(&d.join("config.json"))?, weight_files_in(&d, "model")?, device)
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        ClipTokenizer::from_dir(self.root.join("tokenizer"))
    }

    pub fn scheduler_config(&self) -> Result<String> {
        read_text(&self.root.join("scheduler").join("scheduler_config.json"))
    }
}

/// A transformers `CLIPModel` folder (e.g. `openai/clip-vit-large-patch14`).
#[derive(Clone, Debug)]
pub struct ClipFolder {
    pub root: PathBuf,
}

impl ClipFolder {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let cfg = root.join("config.json");
        let text = read_text(&cfg).map_err(|_| ModelError::NotAModel {
            path: root.display().to_string(),
            expected: "a CLIP model folder".into(),
            message: "config.json is missing".into(),
        })?;
        let v: serde_json::Value = parse_config(&cfg.display().to_string(), &text)?;
        if v.get("vision_config").is_none() {
            return Err(ModelError::NotAModel {
                path: root.display().to_string(),
                expected: "a CLIP model folder".into(),
                message: "config.json has no vision_config (is this a CLIPModel?)".into(),
            });
        }
        Ok(Self { root })
    }

    pub fn vision(&self, device: &Device) -> Result<Loaded<ClipVisionParts, ClipConfig>> {
        clip_vision_from_parts(&read_text(&self.root.join("config.json"))?, weight_files_in(&self.root, "model")?, device)
    }

    pub fn text(&self, device: &Device) -> Result<Loaded<ClipTextTransformer, ClipTextConfig>> {
        text_encoder_from_parts(&read_text(&self.root.join("config.json"))?, weight_files_in(&self.root, "model")?, device)
    }

    pub fn preprocess_config(&self) -> Result<ClipPreprocessConfig> {
        let p = self.root.join("preprocessor_config.json");
        if !p.exists() {
            return Ok(ClipPreprocessConfig::default());
        }
        parse_config(&p.display().to_string(), &read_text(&p)?)
    }
}
