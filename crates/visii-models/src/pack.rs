//! Weight packs: a model converted for download. A pack is a folder in the diffusers layout (so every
//! loader reads it unchanged) whose weights are sharded safetensors files (at most `shard_mb` each)
//! with an index per component, plus `manifest.json` (every tensor with its shape, scheme, shard and
//! offset; every shard with its size and sha256; the sources; the pack's fingerprint) and the CLIP
//! side in `clip/` (only the vision tower and the two projections).
//!
//! Schemes: large matrices and kernels (>= 2 dims, >= 1024 values) in int8, symmetric, with one f32
//! scale per block of contiguous values (`{name}.__q8_scale`): per output channel (`q8`: a block is a
//! whole row) or per block of at most 64 values along the row (`q8-block`); everything else in f16
//! (or f32 with `--quant f32`, f16 everywhere with `--quant f16`). `q4` (the CLIP vision tower by
//! default in int8 packs: it only steers the learning direction) packs two 4-bit values per byte
//! (`U8`, low nibble first, value + 8) with an f16 scale per block of at most 32 values
//! (`{name}.__q4_scale`); the tensor's real shape is in the shard's metadata (`q4:{name}`).
//! Reading dequantises (see `WeightFile::read_f32`).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::loader::{weight_files, ClipFolder, Files, Ip2pFolder};
use crate::weights::WeightFile;

/// Suffix of a quantised tensor's scales.
pub const SCALE_SUFFIX: &str = ".__q8_scale";
/// Suffix of a 4-bit tensor's scales, and the metadata key prefix of its real shape.
pub const Q4_SCALE_SUFFIX: &str = ".__q4_scale";
pub const Q4_SHAPE_KEY: &str = "q4:";
pub const FORMAT: &str = "visii-pack";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quant {
    /// int8 with a scale per output channel.
    Q8,
    /// int8 with a scale per block of at most 64 values.
    Q8Block,
    /// 4-bit with an f16 scale per block of at most 32 values.
    Q4,
    F16,
    F32,
}

impl Quant {
    /// The CLIP vision tower's default scheme for a pack in `self`: 4-bit for int8 packs (it only
    /// steers the learning direction), else the same.
    pub fn default_clip(self) -> Quant {
        match self {
            Quant::Q8 | Quant::Q8Block => Quant::Q4,
            q => q,
        }
    }
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "q8" => Ok(Quant::Q8),
            "q8-block" => Ok(Quant::Q8Block),
            "q4" => Ok(Quant::Q4),
            "f16" => Ok(Quant::F16),
            "f32" => Ok(Quant::F32),
            _ => Err(format!("unknown quantisation {s:?} (q8, q8-block, q4, f16, f32)")),
        }
    }
}

#[derive(Serialize)]
struct TensorEntry {
    name: String,
    shape: Vec<usize>,
    scheme: &'static str,
    shard: String,
    offset: usize,
    bytes: usize,
}

#[derive(Serialize)]
struct ShardEntry {
    path: String,
    bytes: u64,
    sha256: String,
}

/// What a conversion produced.
#[derive(Debug, Clone, Serialize)]
pub struct PackReport {
    pub tensors: usize,
    pub params: usize,
    pub bytes: u64,
    pub shards: usize,
    pub fingerprint: String,
}

/// The largest block length <= `max` that divides `row` (a row's blocks never straddle rows).
fn block_len(row: usize, max: usize) -> usize {
    (1..=max.min(row)).rev().find(|d| row % d == 0).unwrap_or(1)
}

/// Symmetric quantisation to integers in -levels..=levels, one scale per block of `block`
/// values; `stored` rounds a scale to how it is stored, so values are quantised with the scale
/// that will be read back.
fn quantise_blocks(v: &[f32], block: usize, levels: f32, stored: impl Fn(f32) -> f32) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(v.len());
    let mut scales = Vec::with_capacity(v.len() / block);
    for chunk in v.chunks(block) {
        let m = chunk.iter().fold(0f32, |a, x| a.max(x.abs()));
        let s = stored(if m > 0.0 { m / levels } else { 1.0 });
        scales.push(s);
        q.extend(chunk.iter().map(|x| (x / s).round().clamp(-levels, levels) as i8));
    }
    (q, scales)
}

/// int8 quantisation of `v` in blocks of `block`: (values, one f32 scale per block).
pub fn quantise(v: &[f32], block: usize) -> (Vec<i8>, Vec<f32>) {
    quantise_blocks(v, block, 127.0, |s| s)
}

/// 4-bit quantisation in blocks of `block`: packed bytes (two values each, low nibble first,
/// stored as value + 8 in 1..=15) and one scale per block (stored in f16).
pub fn quantise4(v: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let (q, scales) = quantise_blocks(v, block, 7.0, |s| half::f16::from_f32(s).to_f32());
    let nibble = |x: Option<&i8>| (x.copied().unwrap_or(0) + 8) as u8;
    (q.chunks(2).map(|p| nibble(p.first()) | (nibble(p.get(1)) << 4)).collect(), scales)
}

/// Inverse of [`quantise4`] for `n` values.
pub fn dequantise4(packed: &[u8], scales: &[f32], n: usize) -> Vec<f32> {
    let block = n.div_ceil(scales.len().max(1)).max(1);
    (0..n)
        .map(|i| {
            let b = packed[i / 2];
            let q = if i % 2 == 0 { b & 15 } else { b >> 4 };
            (q as f32 - 8.0) * scales[i / block]
        })
        .collect()
}

struct ShardWriter {
    component: String,
    stem: String,
    limit: usize,
    current: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    /// The current shard's `__metadata__` (real shapes of 4-bit tensors).
    meta: std::collections::HashMap<String, String>,
    current_bytes: usize,
    count: usize,
    weight_map: BTreeMap<String, String>,
    shards: Vec<ShardEntry>,
    entries: Vec<TensorEntry>,
    /// Finished files (relative path, bytes) not yet handed out.
    out: Vec<(String, Vec<u8>)>,
}

fn rel_path(component: &str, name: &str) -> String {
    if component.is_empty() {
        name.to_string()
    } else {
        format!("{component}/{name}")
    }
}

impl ShardWriter {
    fn new(component: &str, stem: &str, limit: usize) -> Self {
        Self {
            component: component.into(),
            stem: stem.into(),
            limit,
            current: vec![],
            meta: Default::default(),
            current_bytes: 0,
            count: 0,
            weight_map: BTreeMap::new(),
            shards: vec![],
            entries: vec![],
            out: vec![],
        }
    }

    /// Add tensors that must share a shard (an int8 tensor and its scales): a new shard is
    /// started unless they all fit in the current one.
    fn add(&mut self, group: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> Result<()> {
        let bytes: usize = group.iter().map(|t| t.3.len()).sum();
        if self.current_bytes + bytes > self.limit && !self.current.is_empty() {
            self.flush()?;
        }
        self.current_bytes += bytes;
        self.current.extend(group);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let name = format!("{}-{:05}.safetensors", self.stem, self.count);
        let path = rel_path(&self.component, &name);
        let io = |e: String| ModelError::Io { path: path.clone(), message: e };
        let views: Vec<(String, TensorView)> = self
            .current
            .iter()
            .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)).map_err(|e| io(e.to_string())))
            .collect::<Result<_>>()?;
        let meta = if self.meta.is_empty() { None } else { Some(std::mem::take(&mut self.meta)) };
        let bytes = safetensors::serialize(views, meta).map_err(|e| io(e.to_string()))?;
        // Offsets of each tensor within the shard file (header included).
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| io(e.to_string()))?;
        for (n, info) in meta.tensors() {
            self.weight_map.insert(n.clone(), name.clone());
            let (a, b) = info.data_offsets;
            self.entries.push(TensorEntry {
                name: format!("{}/{}", self.component, n),
                shape: info.shape.clone(),
                scheme: match info.dtype {
                    Dtype::I8 => "q8",
                    Dtype::U8 => "q4",
                    Dtype::F16 => "f16",
                    _ => "f32",
                },
                shard: path.clone(),
                offset: 8 + header_len + a,
                bytes: b - a,
            });
        }
        use sha2::Digest;
        let sha = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        self.shards.push(ShardEntry { path: path.clone(), bytes: bytes.len() as u64, sha256: sha });
        self.out.push((path, bytes));
        self.current.clear();
        self.current_bytes = 0;
        self.count += 1;
        Ok(())
    }
}

fn convert_tensor(w: &mut ShardWriter, file: &WeightFile, name: &str, quant: Quant) -> Result<usize> {
    let shape = file.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
    let v = file.read_f32(name)?;
    let n = v.len();
    let big = shape.len() >= 2 && n >= 1024;
    match quant {
        Quant::Q8 | Quant::Q8Block if big => {
            let row = n / shape[0];
            let block = if quant == Quant::Q8 { row } else { block_len(row, 64) };
            let (q, scales) = quantise(&v, block);
            let s: Vec<u8> = scales.iter().flat_map(|x| x.to_le_bytes()).collect();
            // Values and scales in the same shard (the reader dequantises within one file).
            w.add(vec![
                (name.to_string(), Dtype::I8, shape, q.iter().map(|&x| x as u8).collect()),
                (format!("{name}{SCALE_SUFFIX}"), Dtype::F32, vec![scales.len()], s),
            ])?;
        }
        Quant::Q4 if big => {
            let row = n / shape[0];
            let (packed, scales) = quantise4(&v, block_len(row, 32));
            let s: Vec<u8> = scales.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
            let len = packed.len();
            w.add(vec![(name.to_string(), Dtype::U8, vec![len], packed), (format!("{name}{Q4_SCALE_SUFFIX}"), Dtype::F16, vec![scales.len()], s)])?;
            w.meta.insert(format!("{Q4_SHAPE_KEY}{name}"), serde_json::to_string(&shape).unwrap_or_default());
        }
        Quant::F32 => w.add(vec![(name.to_string(), Dtype::F32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())])?,
        _ => w.add(vec![(name.to_string(), Dtype::F16, shape, v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect())])?,
    }
    Ok(n)
}

/// One component to convert: its weight files and the tensors kept, in order.
struct Job {
    component: &'static str,
    stem: &'static str,
    files: Vec<WeightFile>,
    tensors: Vec<(usize, String)>,
    quant: Quant,
}

impl Job {
    fn new(component: &'static str, stem: &'static str, files: Vec<WeightFile>, keep: &dyn Fn(&str) -> bool, quant: Quant) -> Self {
        let mut tensors = vec![];
        for (i, f) in files.iter().enumerate() {
            let mut names: Vec<String> = f.names().filter(|n| keep(n)).map(String::from).collect();
            names.sort();
            tensors.extend(names.into_iter().map(|n| (i, n)));
        }
        Self { component, stem, files, tensors, quant }
    }
}

/// Converts a model into a pack one tensor at a time and hands out the pack's files as they are
/// finished ([`PackConverter::next_file`]), so the caller stores each where it wants (a folder
/// natively, OPFS in the browser) and at most one shard is held in memory.
pub struct PackConverter {
    ready: std::collections::VecDeque<(String, Vec<u8>)>,
    jobs: std::collections::VecDeque<Job>,
    current: Option<(Job, ShardWriter, usize)>,
    shard_bytes: usize,
    shards: Vec<ShardEntry>,
    entries: Vec<TensorEntry>,
    params: usize,
    header: serde_json::Value,
    /// Every file handed out that is not a weight shard (configs, tokenizer, indexes), with its checksum.
    listed: Vec<visii_formats::manifest::FileEntry>,
    report: Option<PackReport>,
    /// Tensors converted so far and in all, for progress.
    pub done_tensors: usize,
    pub total_tensors: usize,
}

impl PackConverter {
    /// `quant` for the InstructPix2Pix networks, `clip_quant` for the CLIP vision side.
    pub fn new(ip2p: &Ip2pFolder, clip: &ClipFolder, quant: Quant, clip_quant: Quant, shard_mb: usize) -> Result<Self> {
        let f = &ip2p.files;
        let mut ready = std::collections::VecDeque::new();
        // Text files as they are.
        for rel in ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"] {
            ready.push_back((rel.to_string(), f.read(rel)?));
        }
        for rel in ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
            let r = format!("tokenizer/{rel}");
            if f.exists(&r) {
                ready.push_back((r.clone(), f.read(&r)?));
            }
        }
        for rel in ["config.json", "preprocessor_config.json"] {
            if clip.files.exists(rel) {
                ready.push_back((format!("clip/{rel}"), clip.files.read(rel)?));
            }
        }
        let all = |_: &str| true;
        let not_buffer = |n: &str| !n.ends_with("position_ids");
        // CLIP: only what the CLIP loss uses.
        let clip_used =
            |n: &str| (n.starts_with("vision_model.") || n.starts_with("visual_projection.") || n.starts_with("text_projection.")) && not_buffer(n);
        let jobs: std::collections::VecDeque<Job> = [
            Job::new("unet", "diffusion_pytorch_model", weight_files(f, "unet", "diffusion_pytorch_model")?, &all, quant),
            Job::new("vae", "diffusion_pytorch_model", weight_files(f, "vae", "diffusion_pytorch_model")?, &all, quant),
            Job::new("text_encoder", "model", weight_files(f, "text_encoder", "model")?, &not_buffer, quant),
            Job::new("clip", "model", weight_files(&clip.files, "", "model")?, &clip_used, clip_quant),
        ]
        .into();
        let total_tensors = jobs.iter().map(|j| j.tensors.len()).sum();
        let header = serde_json::json!({
            "format": FORMAT, "format_version": 1, "quant": quant, "clip_quant": clip_quant, "shard_mb": shard_mb,
            "sources": {
                "ip2p": { "name": ip2p.name(), "revision": revision_of(&ip2p.files) },
                "clip": { "name": clip.files.label(), "revision": revision_of(&clip.files) },
            },
        });
        Ok(Self {
            ready,
            jobs,
            current: None,
            shard_bytes: shard_mb.max(1) << 20,
            shards: vec![],
            entries: vec![],
            params: 0,
            header,
            listed: vec![],
            report: None,
            done_tensors: 0,
            total_tensors,
        })
    }

    /// The next finished file of the pack (relative path, bytes), or `None` when all are out
    /// (`manifest.json` is the last).
    pub fn next_file(&mut self) -> Result<Option<(String, Vec<u8>)>> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                // Shards (`.safetensors`) are listed with their checksums as `shards`.
                if f.0 != "manifest.json" && !f.0.ends_with(".safetensors") {
                    let (bytes, sha256) = (f.1.len() as u64, visii_formats::manifest::sha256_hex(&f.1));
                    self.listed.push(visii_formats::manifest::FileEntry { path: f.0.clone(), bytes, sha256 });
                }
                return Ok(Some(f));
            }
            if self.report.is_some() {
                return Ok(None);
            }
            match self.current.take() {
                None => match self.jobs.pop_front() {
                    Some(job) => {
                        let w = ShardWriter::new(job.component, job.stem, self.shard_bytes);
                        self.current = Some((job, w, 0));
                    }
                    None => self.finish(),
                },
                Some((job, mut w, i)) if i < job.tensors.len() => {
                    let (fi, name) = &job.tensors[i];
                    self.params += convert_tensor(&mut w, &job.files[*fi], name, job.quant)?;
                    self.done_tensors += 1;
                    self.ready.extend(w.out.drain(..));
                    self.current = Some((job, w, i + 1));
                }
                Some((job, mut w, _)) => {
                    w.flush()?;
                    self.ready.extend(w.out.drain(..));
                    let index = serde_json::json!({ "metadata": { "format": FORMAT }, "weight_map": w.weight_map });
                    let path = rel_path(job.component, &format!("{}.safetensors.index.json", job.stem));
                    self.ready.push_back((path, serde_json::to_string_pretty(&index).unwrap_or_default().into_bytes()));
                    self.shards.append(&mut w.shards);
                    self.entries.append(&mut w.entries);
                }
            }
        }
    }

    fn finish(&mut self) {
        let bytes: u64 = self.shards.iter().map(|s| s.bytes).sum();
        let joined: String = self.shards.iter().map(|s| s.sha256.as_str()).collect::<Vec<_>>().join(",");
        use sha2::Digest;
        let fingerprint: String = sha2::Sha256::digest(joined.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
        let mut manifest = self.header.clone();
        manifest["fingerprint"] = fingerprint.clone().into();
        manifest["params"] = self.params.into();
        manifest["bytes"] = bytes.into();
        manifest["shards"] = serde_json::to_value(&self.shards).unwrap_or_default();
        manifest["files"] = serde_json::to_value(&self.listed).unwrap_or_default();
        manifest["tensors"] = serde_json::to_value(&self.entries).unwrap_or_default();
        self.ready.push_back(("manifest.json".into(), serde_json::to_string_pretty(&manifest).unwrap_or_default().into_bytes()));
        self.report = Some(PackReport { tensors: self.entries.len(), params: self.params, bytes, shards: self.shards.len(), fingerprint });
    }

    /// What was produced (after the last file).
    pub fn report(&self) -> Option<&PackReport> {
        self.report.as_ref()
    }
}

/// Convert an InstructPix2Pix folder and a CLIP folder into a pack in folder `out`; the CLIP side
/// in `clip_quant`.
pub fn convert(ip2p: &Ip2pFolder, clip: &ClipFolder, out: &Path, quant: Quant, clip_quant: Quant, shard_mb: usize) -> Result<PackReport> {
    let mut c = PackConverter::new(ip2p, clip, quant, clip_quant, shard_mb)?;
    while let Some((rel, bytes)) = c.next_file()? {
        let dst = out.join(&rel);
        let io = |e: std::io::Error| ModelError::Io { path: dst.display().to_string(), message: e.to_string() };
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&dst, bytes).map_err(io)?;
    }
    Ok(c.report.take().expect("a finished conversion has a report"))
}

/// The hub revision of a model folder, where its path says it: a Hugging Face cache snapshot
/// (`.../snapshots/<40-hex commit>/`), or a `.revision` / `revision.txt` file beside the configs.
fn revision_of(files: &Files) -> Option<String> {
    for f in [".revision", "revision.txt"] {
        if let Ok(t) = files.read_text(f) {
            return Some(t.trim().to_string());
        }
    }
    let label = files.label();
    (label.len() == 40 && label.bytes().all(|b| b.is_ascii_hexdigit())).then_some(label)
}

/// Whether `dir` holds a pack (its `manifest.json` says so).
pub fn is_pack(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["format"] == FORMAT)
}
