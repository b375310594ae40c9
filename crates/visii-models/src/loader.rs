//! Model folders in their published layouts: an InstructPix2Pix diffusers folder (`model_index.json`,
//! `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) and a transformers `CLIPModel` folder
//! (`config.json`, `model.safetensors`, `preprocessor_config.json`). Components load from config
//! text + weight files read by range, so the browser (bytes) and the CLI (files) share this code.
//! Weights are safetensors, or the PyTorch `.bin` checkpoints 2023's libraries wrote by default
//! (see [`weight_files`]).
//!
//! Name rules (source -> ours), all applied as aliases when the first spelling is missing:
//! | source | accepted as |
//! |---|---|
//! | `text_model.X` (2023 `CLIPTextModel`, `CLIPModel`) | `X` (transformers 5 `CLIPTextModel`) |
//! | VAE `attentions.0.to_q/to_k/to_v/to_out.0` (diffusers today) | `query/key/value/proj_attn` (2023) |
//! | Linear `[out, in]` | transposed to burn's `[in, out]`; `[out, in, 1, 1]` accepted |
//! Known buffers that are ignored: `*.position_ids`; in a `CLIPModel` file, the text tower and
//! `logit_scale` when only the vision side is loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
use visii_formats::manifest::Manifest;
use visii_formats::source::{ByteSource, DiskFile};

/// A loaded component with its config and the number of parameters read from the weights.
#[derive(Debug)]
pub struct Loaded<M, C> {
    pub model: M,
    pub config: C,
    pub params: usize,
    /// Weight values kept int8 on the device (`Ip2pFolder::resident_q8`), else 0.
    pub resident_values: usize,
}

/// Config files larger than this are not configs (a sharded index of a large model is ~100 kB).
pub const MAX_CONFIG_BYTES: usize = 4 << 20;
/// Any other whole file read (tokenizer files are a few MB).
pub const MAX_SMALL_FILE_BYTES: u64 = 32 << 20;

/// Parse a config from JSON text; `name` appears in errors.
pub fn parse_config<C: DeserializeOwned>(name: &str, text: &str) -> Result<C> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ModelError::Config { path: name.into(), message: format!("{} bytes is far too large for a config", text.len()) });
    }
    visii_formats::config::from_json(text).map_err(|message| ModelError::Config { path: name.into(), message })
}

/// A config's own validation (every field a network is built from), naming the file.
fn validated<C>(name: &str, cfg: C, check: impl Fn(&C) -> std::result::Result<(), String>) -> Result<C> {
    check(&cfg).map_err(|message| ModelError::Config { path: name.into(), message })?;
    Ok(cfg)
}

fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// The UNet from its config text and weight files.
pub fn unet_from_parts(config: &str, files: Vec<WeightFile>, device: &Device) -> Result<Loaded<UNet2DConditionModel, UNetConfig>> {
    unet_load(config, files, device, false)
}

fn unet_load(config: &str, files: Vec<WeightFile>, device: &Device, resident_q8: bool) -> Result<Loaded<UNet2DConditionModel, UNetConfig>> {
    let cfg: UNetConfig = validated("unet/config.json", parse_config("unet/config.json", config)?, UNetConfig::validate)?;
    let w = Weights::new(files, device).with_resident_q8(resident_q8);
    let model = UNet2DConditionModel::load(&w, &cfg)?;
    w.finish("UNet2DConditionModel", is_buffer)?;
    Ok(Loaded { model, config: cfg, params: w.param_count(), resident_values: w.resident_values() })
}

/// The VAE, accepting both attention spellings.
pub fn vae_from_parts(config: &str, files: Vec<WeightFile>, device: &Device) -> Result<Loaded<AutoencoderKL, VaeConfig>> {
    vae_load(config, files, device, false)
}

fn vae_load(config: &str, files: Vec<WeightFile>, device: &Device, resident_q8: bool) -> Result<Loaded<AutoencoderKL, VaeConfig>> {
    let cfg: VaeConfig = validated("vae/config.json", parse_config("vae/config.json", config)?, VaeConfig::validate)?;
    let w = Weights::new(files, device)
        .with_resident_q8(resident_q8)
        .with_alias(".to_q.", ".query.")
        .with_alias(".to_k.", ".key.")
        .with_alias(".to_v.", ".value.")
        .with_alias(".to_out.0.", ".proj_attn.");
    let model = AutoencoderKL::load(&w, &cfg)?;
    w.finish("AutoencoderKL", is_buffer)?;
    Ok(Loaded { model, config: cfg, params: w.param_count(), resident_values: w.resident_values() })
}

/// The CLIP text transformer from a `CLIPTextModel` config (or a `CLIPModel` config's `text_config`).
pub fn text_encoder_from_parts(config: &str, files: Vec<WeightFile>, device: &Device) -> Result<Loaded<ClipTextTransformer, ClipTextConfig>> {
    text_load(config, files, device, false)
}

/// `text_encoder/config.json` (a `CLIPTextConfig`, or a `CLIPConfig`'s `text_config`), validated.
fn text_config(config: &str) -> Result<ClipTextConfig> {
    let value: serde_json::Value = parse_config("text_encoder/config.json", config)?;
    let cfg: ClipTextConfig = match value.get("text_config") {
        Some(t) => visii_formats::config::from_value(t.clone()),
        None => visii_formats::config::from_value(value),
    }
    .map_err(|message| ModelError::Config { path: "text_encoder/config.json".into(), message })?;
    validated("text_encoder/config.json", cfg, ClipTextConfig::validate)
}

/// The text encoder; with `resident_q8`, its layers but the last int8 on the device (the
/// embeddings and the last layer stay f32: the model's identity is read from them).
fn text_load(config: &str, files: Vec<WeightFile>, device: &Device, resident_q8: bool) -> Result<Loaded<ClipTextTransformer, ClipTextConfig>> {
    let cfg = text_config(config)?;
    let w = Weights::new(files, device).with_alias("text_model.", "").with_resident_q8(resident_q8);
    let model = ClipTextTransformer::load(&w, &cfg)?;
    // A CLIPModel file also holds the vision side: not part of the text encoder.
    w.finish("CLIPTextModel", |n| {
        is_buffer(n) || n.starts_with("vision_model.") || n.starts_with("visual_projection") || n.starts_with("text_projection") || n == "logit_scale"
    })?;
    Ok(Loaded { model, config: cfg, params: w.param_count(), resident_values: w.resident_values() })
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
    clip_vision_load(config, files, device, false)
}

/// The vision side; with `resident_q8`, the tower's layers and the visual projection int8 on the device.
fn clip_vision_load(config: &str, files: Vec<WeightFile>, device: &Device, resident_q8: bool) -> Result<Loaded<ClipVisionParts, ClipConfig>> {
    let cfg: ClipConfig = validated("config.json", parse_config("config.json", config)?, ClipConfig::validate)?;
    let proj = cfg.projection_dim.unwrap_or(cfg.vision_config.projection_dim);
    let w = Weights::new(files, device).with_resident_q8(resident_q8);
    let vision = ClipVision::load(&w, &cfg.vision_config, proj)?;
    let vision_params = w.param_count();
    let text_projection = linear(&w.root().pp("text_projection"), cfg.text_config.hidden_size, proj, false)?;
    let text_projection_params = w.param_count() - vision_params;
    w.finish("CLIPModel (vision side)", |n| is_buffer(n) || n.starts_with("text_model.") || n == "logit_scale")?;
    let params = w.param_count();
    let resident_values = w.resident_values();
    Ok(Loaded { model: ClipVisionParts { vision, text_projection, vision_params, text_projection_params }, config: cfg, params, resident_values })
}

// ------------------------------------------------------------------ model files: disk or memory

/// Where a model's files come from: a folder on disk (the CLI) or named byte sources (the browser:
/// stored or picked files read by range; tests: buffers). Paths are relative, `/`-separated
/// (`unet/config.json`). Weight files are opened by their header and read one tensor at a time.
#[derive(Clone)]
pub enum Files {
    Disk(PathBuf),
    Sources {
        name: String,
        files: Arc<HashMap<String, Arc<dyn ByteSource>>>,
    },
    /// A weight pack's files: every small file read is checked against the pack's `manifest.json`
    /// (size and sha256), every weight file too (its size when opened, its sha256 before its first
    /// tensor is read: a flipped byte anywhere is refused, not loaded). `prefix` places these files in the pack
    /// (`clip/` for the CLIP side).
    Checked {
        inner: Box<Files>,
        manifest: Arc<Manifest>,
        prefix: String,
    },
}

/// Where a weight pack keeps its CLIP vision tower's files.
const PACK_CLIP_DIR: &str = "clip/";

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", dir.trim_end_matches('/'))
    }
}

impl Files {
    /// Buffers by relative path; `name` labels the source in messages.
    pub fn memory(name: impl Into<String>, files: HashMap<String, Arc<[u8]>>) -> Self {
        let files = files.into_iter().map(|(k, v)| (k, Arc::new(v) as Arc<dyn ByteSource>)).collect();
        Files::Sources { name: name.into(), files: Arc::new(files) }
    }

    /// Byte sources by relative path.
    pub fn sources(name: impl Into<String>, files: HashMap<String, Arc<dyn ByteSource>>) -> Self {
        Files::Sources { name: name.into(), files: Arc::new(files) }
    }

    /// How a path is named in messages.
    pub fn display(&self, rel: &str) -> String {
        match self {
            Files::Disk(root) => root.join(rel).display().to_string(),
            Files::Sources { name, .. } => format!("{name}: {rel}"),
            Files::Checked { inner, .. } => inner.display(rel),
        }
    }

    /// These files checked against a pack manifest when `manifest_text` is one (see [`Files::Checked`]).
    /// Every small file the manifest lists under `prefix` is checked now, read or not: an edited
    /// pack is refused as a whole, whichever of its files was changed.
    pub fn checked_by(self, manifest_text: &[u8], prefix: &str) -> Result<Self> {
        let manifest =
            visii_formats::manifest::parse(manifest_text).map_err(|message| ModelError::Config { path: self.display("manifest.json"), message })?;
        let checked = Files::Checked { inner: Box::new(self), manifest: Arc::new(manifest), prefix: prefix.into() };
        if let Files::Checked { manifest, .. } = &checked {
            // The InstructPix2Pix side (prefix "") leaves the pack's `clip/` files to the CLIP side:
            // in the browser each side is given only its own files.
            for rel in manifest.small_files(prefix).filter(|rel| !(prefix.is_empty() && rel.starts_with(PACK_CLIP_DIR))) {
                checked.read(rel)?;
            }
        }
        Ok(checked)
    }

    /// Wrap in [`Files::Checked`] when `manifest` (within these files, or `None` for beside them) is
    /// a pack manifest. A `manifest.json` that is not even JSON is a damaged pack's: refused, since
    /// its files could not be checked (JSON with another `format` is some other tool's, ignored).
    fn with_pack_manifest(self, manifest_bytes: Option<Vec<u8>>, prefix: &str) -> Result<Self> {
        match manifest_bytes {
            Some(b) if visii_formats::manifest::is_manifest(&b) => self.checked_by(&b, prefix),
            Some(b) => match serde_json::from_slice::<serde_json::Value>(&b) {
                Ok(_) => Ok(self),
                Err(e) => Err(ModelError::Config {
                    path: if prefix.is_empty() { self.display("manifest.json") } else { "the pack's manifest.json".into() },
                    message: format!(
                        "not JSON ({e}): a damaged weight pack, whose files cannot be checked against it; convert or fetch the pack again"
                    ),
                }),
            },
            None => Ok(self),
        }
    }

    /// The source's own name (folder name or the label given).
    pub fn label(&self) -> String {
        match self {
            Files::Disk(root) => {
                root.canonicalize().unwrap_or(root.clone()).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            }
            Files::Sources { name, .. } => name.clone(),
            Files::Checked { inner, .. } => inner.label(),
        }
    }

    /// Whether something is there (reading a pipe, a device or a folder then fails, saying so).
    pub fn exists(&self, rel: &str) -> bool {
        match self {
            Files::Disk(root) => std::fs::metadata(root.join(rel)).is_ok(),
            Files::Sources { files, .. } => files.contains_key(rel),
            Files::Checked { inner, .. } => inner.exists(rel),
        }
    }

    /// Whether a folder exists (on disk) or any file lies under it (in memory).
    pub fn has_dir(&self, rel: &str) -> bool {
        match self {
            Files::Disk(root) => root.join(rel).is_dir(),
            Files::Sources { files, .. } => {
                let prefix = format!("{}/", rel.trim_end_matches('/'));
                files.keys().any(|k| k.starts_with(&prefix))
            }
            Files::Checked { inner, .. } => inner.has_dir(rel),
        }
    }

    fn source(&self, rel: &str) -> Result<Arc<dyn ByteSource>> {
        match self {
            Files::Disk(root) => {
                let p = root.join(rel);
                DiskFile::open(&p)
                    .map(|f| Arc::new(f) as Arc<dyn ByteSource>)
                    .map_err(|e| ModelError::Io { path: p.display().to_string(), message: e.to_string() })
            }
            Files::Sources { files, .. } => {
                files.get(rel).cloned().ok_or_else(|| ModelError::Io { path: self.display(rel), message: "the file was not provided".into() })
            }
            Files::Checked { inner, manifest, prefix } => {
                let s = inner.source(rel)?;
                let v = manifest.verified(&format!("{prefix}{rel}"), s).map_err(|message| ModelError::Io { path: self.display(rel), message })?;
                Ok(Arc::new(v))
            }
        }
    }

    /// A whole (small) file: configs, tokenizers.
    pub fn read(&self, rel: &str) -> Result<Vec<u8>> {
        let io = |message: String| ModelError::Io { path: self.display(rel), message };
        match self {
            Files::Disk(root) => visii_formats::files::read_regular(&root.join(rel), MAX_SMALL_FILE_BYTES).map_err(|e| io(e.to_string())),
            Files::Checked { inner, manifest, prefix } => {
                let bytes = inner.read(rel)?;
                manifest.verify(&format!("{prefix}{rel}"), &bytes).map_err(io)?;
                Ok(bytes)
            }
            Files::Sources { .. } => {
                let s = self.source(rel)?;
                if s.len() > MAX_SMALL_FILE_BYTES {
                    return Err(io(format!("{} bytes is far too large for this file", s.len())));
                }
                s.read_at(0, s.len() as usize).map_err(io)
            }
        }
    }

    pub fn read_text(&self, rel: &str) -> Result<String> {
        let bytes = self.read(rel)?;
        String::from_utf8(bytes).map_err(|_| ModelError::Io { path: self.display(rel), message: "not UTF-8 text".into() })
    }

    /// A safetensors file (its header is read; tensors later, one at a time).
    pub fn weight_file(&self, rel: &str) -> Result<WeightFile> {
        WeightFile::open(self.display(rel), self.source(rel)?)
    }

    /// A PyTorch checkpoint (its pickle is read, never run; tensors later, one at a time).
    pub fn torch_file(&self, rel: &str) -> Result<WeightFile> {
        WeightFile::open_torch(self.display(rel), self.source(rel)?)
    }
}

/// The weight files of a component folder on disk (see [`weight_files`]).
pub fn weight_files_in(dir: &Path, stem: &str) -> Result<Vec<WeightFile>> {
    weight_files(&Files::Disk(dir.to_path_buf()), "", stem)
}

/// The weight files of component folder `dir`, in the order transformers / diffusers look for them:
/// safetensors first (`{stem}.safetensors`, its sharded index `{stem}.safetensors.index.json`, then the
/// `fp16` variant: `{stem}.fp16.safetensors`, `{stem}.safetensors.index.fp16.json`), else the PyTorch
/// checkpoints 2023's libraries wrote by default, named alike (`pytorch_model.bin` for transformers'
/// `model`, `diffusion_pytorch_model.bin` for diffusers).
pub fn weight_files(files: &Files, dir: &str, stem: &str) -> Result<Vec<WeightFile>> {
    let chosen = chosen_weights(files, dir, stem)?;
    chosen.files.iter().map(|p| if chosen.torch { files.torch_file(p) } else { files.weight_file(p) }).collect()
}

/// The weight files [`weight_files`] opens (paths within `files`) and the sharded index naming them.
struct ChosenWeights {
    torch: bool,
    index: Option<String>,
    files: Vec<String>,
}

fn chosen_weights(files: &Files, dir: &str, stem: &str) -> Result<ChosenWeights> {
    let torch_stem = if stem == "model" { "pytorch_model" } else { stem };
    for (stem, ext, torch) in [(stem, "safetensors", false), (torch_stem, "bin", true)] {
        for (single, index) in
            [(format!("{stem}.{ext}"), format!("{stem}.{ext}.index.json")), (format!("{stem}.fp16.{ext}"), format!("{stem}.{ext}.index.fp16.json"))]
        {
            let p = join(dir, &single);
            if files.exists(&p) {
                return Ok(ChosenWeights { torch, index: None, files: vec![p] });
            }
            let index = join(dir, &index);
            if files.exists(&index) {
                let v: serde_json::Value = parse_config(&files.display(&index), &files.read_text(&index)?)?;
                let mut shards = Vec::new();
                for s in v["weight_map"].as_object().into_iter().flat_map(|m| m.values()) {
                    let s = s
                        .as_str()
                        .ok_or_else(|| ModelError::Config { path: files.display(&index), message: "a weight_map entry is not a file name".into() })?;
                    visii_formats::files::check_relative(s).map_err(|message| ModelError::Config { path: files.display(&index), message })?;
                    shards.push(join(dir, s));
                }
                shards.sort();
                shards.dedup();
                if shards.is_empty() {
                    return Err(ModelError::Config { path: files.display(&index), message: "its weight_map names no files".into() });
                }
                return Ok(ChosenWeights { torch, index: Some(index), files: shards });
            }
        }
    }
    Err(ModelError::NotAModel {
        path: files.display(dir),
        expected: "a model component folder".into(),
        message: format!("no {stem}.safetensors or {torch_stem}.bin"),
    })
}

/// Component folders of an InstructPix2Pix folder with weights, and their weight files' stem.
pub const IP2P_WEIGHTS: [(&str, &str); 3] = [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")];
/// The same for a CLIP folder (its weights lie in the folder itself).
pub const CLIP_WEIGHTS: [(&str, &str); 1] = [("", "model")];

/// Weight files of any format (the original single-file checkpoint, PyTorch, safetensors, Flax,
/// TF, ONNX) and sharded indexes.
fn is_weight_file(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    [".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf"].iter().any(|e| p.ends_with(e))
        || [".safetensors.index.json", ".safetensors.index.fp16.json", ".bin.index.json", ".bin.index.fp16.json"].iter().any(|e| p.ends_with(e))
}

/// Of `paths` (a model folder's files, within `files`), those loading reads: every file that is not
/// a weight file and lies outside hidden folders (configs, tokenizer, `.revision`), and per
/// component folder of `components` ([`IP2P_WEIGHTS`], [`CLIP_WEIGHTS`]) the weight files
/// [`weight_files`] picks, with their index; where it picks none, the folder's weight files (the
/// loader then says what is wrong). What the page copies into storage from a picked folder: one
/// cloned from the hub also holds the 7.7 GB single-file checkpoint, the same weights in other
/// formats and `.git`.
pub fn needed_files(files: &Files, paths: &[String], components: &[(&str, &str)]) -> Vec<String> {
    let hidden = |p: &str| {
        let segs: Vec<&str> = p.split('/').collect();
        segs.iter().enumerate().any(|(i, s)| s.starts_with('.') && !(i + 1 == segs.len() && *s == ".revision"))
    };
    let mut keep: Vec<String> = paths.iter().filter(|p| !is_weight_file(p) && !hidden(p)).cloned().collect();
    for (dir, stem) in components {
        match chosen_weights(files, dir, stem) {
            Ok(c) => keep.extend(c.index.into_iter().chain(c.files).filter(|p| paths.contains(p))),
            Err(_) => {
                let in_dir = |p: &str| match dir.is_empty() {
                    true => !p.contains('/'),
                    false => p.strip_prefix(&format!("{dir}/")).is_some_and(|rest| !rest.contains('/')),
                };
                keep.extend(paths.iter().filter(|p| is_weight_file(p) && in_dir(p)).cloned());
            }
        }
    }
    keep
}

/// An InstructPix2Pix folder in the diffusers layout.
#[derive(Clone)]
pub struct Ip2pFolder {
    pub files: Files,
    /// Load the UNet, the VAE and the text encoder's layers (all but the last) with their large
    /// weights int8 on the device (`crate::resident`).
    pub resident_q8: bool,
}

impl std::fmt::Debug for Ip2pFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ip2pFolder({})", self.files.display(""))
    }
}

impl Ip2pFolder {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(ModelError::NotAModel {
                path: root.display().to_string(),
                expected: "an InstructPix2Pix diffusers folder".into(),
                message: "no such folder".into(),
            });
        }
        Self::from_files(Files::Disk(root))
    }

    /// The same layout from any file source (a pack's `manifest.json` among them: checked against it).
    pub fn from_files(files: Files) -> Result<Self> {
        let manifest =
            if files.exists("manifest.json") && !matches!(files, Files::Checked { .. }) { Some(files.read("manifest.json")?) } else { None };
        let files = files.with_pack_manifest(manifest, "")?;
        let not =
            |m: &str| ModelError::NotAModel { path: files.display(""), expected: "an InstructPix2Pix diffusers folder".into(), message: m.into() };
        if !files.exists("model_index.json") {
            return Err(not("model_index.json is missing"));
        }
        let index: serde_json::Value = parse_config(&files.display("model_index.json"), &files.read_text("model_index.json")?)?;
        if !index.is_object() {
            return Err(ModelError::Config { path: files.display("model_index.json"), message: "not a JSON object".into() });
        }
        for c in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !files.has_dir(c) {
                return Err(not(&format!("the `{c}/` folder is missing")));
            }
        }
        Ok(Self { files, resident_q8: false })
    }

    /// The same folder, loading the UNet, the VAE and the text encoder with int8 weights on the device or not.
    pub fn with_resident_q8(mut self, on: bool) -> Self {
        self.resident_q8 = on;
        self
    }

    /// `_name_or_path` of model_index.json when present, else the folder's (or source's) name.
    pub fn name(&self) -> String {
        self.files
            .read_text("model_index.json")
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("_name_or_path").and_then(|n| n.as_str()).map(String::from))
            .unwrap_or_else(|| self.files.label())
    }

    pub fn unet(&self, device: &Device) -> Result<Loaded<UNet2DConditionModel, UNetConfig>> {
        unet_load(&self.files.read_text("unet/config.json")?, weight_files(&self.files, "unet", "diffusion_pytorch_model")?, device, self.resident_q8)
    }

    pub fn vae(&self, device: &Device) -> Result<Loaded<AutoencoderKL, VaeConfig>> {
        vae_load(&self.files.read_text("vae/config.json")?, weight_files(&self.files, "vae", "diffusion_pytorch_model")?, device, self.resident_q8)
    }

    pub fn text_encoder(&self, device: &Device) -> Result<Loaded<ClipTextTransformer, ClipTextConfig>> {
        text_load(&self.files.read_text("text_encoder/config.json")?, weight_files(&self.files, "text_encoder", "model")?, device, self.resident_q8)
    }

    /// The tokenizer, checked against the text encoder's config (its ids and prompt length within
    /// the encoder's embedding tables: [`ClipTokenizer::check_fits`]).
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        let tokenizer = ClipTokenizer::from_files(&self.files, "tokenizer")?;
        let cfg = text_config(&self.files.read_text("text_encoder/config.json")?)?;
        tokenizer.check_fits(cfg.vocab_size, cfg.max_position_embeddings)?;
        Ok(tokenizer)
    }

    pub fn scheduler_config(&self) -> Result<String> {
        self.files.read_text("scheduler/scheduler_config.json")
    }
}

/// A transformers `CLIPModel` folder (e.g. `openai/clip-vit-large-patch14`).
#[derive(Clone)]
pub struct ClipFolder {
    pub files: Files,
    /// Load the vision tower's and the text encoder's layers int8 on the device (`crate::resident`).
    pub resident_q8: bool,
}

impl std::fmt::Debug for ClipFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClipFolder({})", self.files.display(""))
    }
}

impl ClipFolder {
    /// A CLIP folder on disk; a pack's `clip/` folder is checked against the pack's manifest.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let files = Files::Disk(root.to_path_buf());
        let pack_manifest =
            root.canonicalize().ok().filter(|r| r.file_name().is_some_and(|n| n == "clip")).and_then(|r| r.parent().map(|p| p.join("manifest.json")));
        let manifest = match pack_manifest {
            Some(m) if m.exists() => Some(
                visii_formats::files::read_regular(&m, visii_formats::manifest::MAX_BYTES)
                    .map_err(|e| ModelError::Io { path: m.display().to_string(), message: e.to_string() })?,
            ),
            _ => None,
        };
        Self::from_files(files.with_pack_manifest(manifest, PACK_CLIP_DIR)?)
    }

    /// The same layout from any file source. A pack's `clip/` files come with the pack's
    /// `manifest.json` beside them (the page gives it so): they are checked against it.
    pub fn from_files(files: Files) -> Result<Self> {
        let manifest =
            if files.exists("manifest.json") && !matches!(files, Files::Checked { .. }) { Some(files.read("manifest.json")?) } else { None };
        let files = files.with_pack_manifest(manifest, PACK_CLIP_DIR)?;
        if !files.exists("config.json") {
            return Err(ModelError::NotAModel {
                path: files.display(""),
                expected: "a CLIP model folder".into(),
                message: "config.json is missing".into(),
            });
        }
        let text = files.read_text("config.json")?;
        let v: serde_json::Value = parse_config(&files.display("config.json"), &text)?;
        if v.get("vision_config").is_none() {
            return Err(ModelError::NotAModel {
                path: files.display(""),
                expected: "a CLIP model folder".into(),
                message: "config.json has no vision_config (is this a CLIPModel?)".into(),
            });
        }
        Ok(Self { files, resident_q8: false })
    }

    /// The same folder, loading the encoders' layers with int8 weights on the device or not.
    pub fn with_resident_q8(mut self, on: bool) -> Self {
        self.resident_q8 = on;
        self
    }

    pub fn vision(&self, device: &Device) -> Result<Loaded<ClipVisionParts, ClipConfig>> {
        clip_vision_load(&self.files.read_text("config.json")?, weight_files(&self.files, "", "model")?, device, self.resident_q8)
    }

    pub fn text(&self, device: &Device) -> Result<Loaded<ClipTextTransformer, ClipTextConfig>> {
        text_load(&self.files.read_text("config.json")?, weight_files(&self.files, "", "model")?, device, self.resident_q8)
    }

    pub fn preprocess_config(&self) -> Result<ClipPreprocessConfig> {
        let cfg = if self.files.exists("preprocessor_config.json") {
            let name = self.files.display("preprocessor_config.json");
            validated(&name, parse_config(&name, &self.files.read_text("preprocessor_config.json")?)?, ClipPreprocessConfig::validate)?
        } else {
            ClipPreprocessConfig::default()
        };
        // The crop is what the vision tower sees: it must be the tower's image size.
        let clip: ClipConfig = parse_config(&self.files.display("config.json"), &self.files.read_text("config.json")?)?;
        let want = clip.vision_config.image_size;
        if cfg.do_center_crop && cfg.crop().ok() != Some((want, want)) {
            return Err(ModelError::Config {
                path: self.files.display("preprocessor_config.json"),
                message: format!("`crop_size` {:?} differs from the vision tower's image_size {want} in config.json", cfg.crop()),
            });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_clone_keeps_only_what_loading_reads() {
        let index = r#"{"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}"#;
        let paths: Vec<String> = [
            "model_index.json",
            "instruct-pix2pix-00-22000.ckpt",
            "instruct-pix2pix-00-22000.safetensors",
            ".git/config",
            ".gitattributes",
            ".revision",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.bin",
            "text_encoder/config.json",
            "text_encoder/pytorch_model.bin.index.json",
            "text_encoder/pytorch_model-00001-of-00002.bin",
            "text_encoder/pytorch_model-00002-of-00002.bin",
            "text_encoder/flax_model.msgpack",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
            "safety_checker/config.json",
            "safety_checker/pytorch_model.bin",
        ]
        .map(String::from)
        .to_vec();
        let bytes = |p: &String| -> Arc<[u8]> {
            if p.ends_with(".index.json") {
                index.as_bytes().into()
            } else {
                Arc::from(&b"x"[..])
            }
        };
        let files = Files::memory("ip2p", paths.iter().map(|p| (p.clone(), bytes(p))).collect());
        let mut got = needed_files(&files, &paths, &IP2P_WEIGHTS);
        got.sort();
        let want = [
            ".revision",
            "model_index.json",
            "safety_checker/config.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/pytorch_model-00001-of-00002.bin",
            "text_encoder/pytorch_model-00002-of-00002.bin",
            "text_encoder/pytorch_model.bin.index.json",
            "tokenizer/merges.txt",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.bin",
        ];
        assert_eq!(got, want);

        let clip: Vec<String> = ["config.json", "pytorch_model.bin", "model.safetensors", "tf_model.h5", "tokenizer.json"].map(String::from).to_vec();
        let files = Files::memory("clip", clip.iter().map(|p| (p.clone(), Arc::from(&b"x"[..]))).collect());
        assert_eq!(needed_files(&files, &clip, &CLIP_WEIGHTS), ["config.json", "tokenizer.json", "model.safetensors"]);
        // Nothing the loader looks for: the folder's weight files stay, for the loader to explain.
        let odd: Vec<String> = ["config.json", "weird.safetensors"].map(String::from).to_vec();
        let files = Files::memory("odd", odd.iter().map(|p| (p.clone(), Arc::from(&b"x"[..]))).collect());
        assert_eq!(needed_files(&files, &odd, &CLIP_WEIGHTS), odd);
    }
}
