//! The instruction file `NAME.visii.safetensors`: data only. One f32 tensor `instruction`
//! [77, hidden] (the learned conditional rows) and `__metadata__` strings describing how it was
//! made and which text encoder it belongs to. Loading validates everything and never executes
//! anything from the file.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};

use base64::Engine;

use crate::error::{PipelineError, Result};
use crate::identity::ModelIdentity;
use crate::learn::Learned;

pub use visii_formats::instruction::{FORMAT, FORMAT_VERSION, MAX_BYTES};

/// A loaded instruction.
#[derive(Clone, Debug)]
pub struct Instruction {
    pub rows: Vec<f32>,
    pub positions: usize,
    pub hidden: usize,
    pub eos: usize,
    pub metadata: HashMap<String, String>,
    /// The model it was learned on (absent only in files written before identities existed).
    pub base_model: Option<ModelIdentity>,
    /// How to regenerate the learning noises (`None` when they came from a schedule file).
    pub noise_reuse: Option<NoiseReuse>,
}

/// What applying needs to regenerate the learning noises: the seed and the timestep of every step
/// that ran (step k used noise stream `LEARN_NOISE_STREAM + k`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoiseReuse {
    pub seed: u64,
    pub timesteps: Vec<usize>,
}

impl Instruction {
    /// The pair preview (PNG bytes), when the file has one.
    pub fn thumbnail_png(&self) -> Option<Vec<u8>> {
        let b64 = self.metadata.get("thumbnail_png_base64")?;
        base64::engine::general_purpose::STANDARD.decode(b64).ok()
    }

    /// Refuse a model other than the one the instruction was learned on, unless `allow_foreign`.
    pub fn check_model(&self, loaded: &ModelIdentity, allow_foreign: bool) -> Result<()> {
        match &self.base_model {
            Some(want) if !want.matches(loaded) && !allow_foreign => Err(PipelineError::ForeignModel(format!(
                "this instruction was learned on model {}, but the loaded model is {}: load the model it needs \
                 (or override the check if you know they are compatible)",
                want.describe(),
                loaded.describe()
            ))),
            _ => Ok(()),
        }
    }
}

/// What goes into a file besides the learned rows.
pub struct SaveInfo<'a> {
    pub model: &'a ModelIdentity,
    /// A small PNG of the pair(s), stored base64-encoded.
    pub thumbnail_png: Option<&'a [u8]>,
    /// Free-form fields (hyper-parameters, created-at, ...).
    pub extra: &'a [(&'a str, String)],
}

fn bad(m: impl Into<String>) -> PipelineError {
    PipelineError::Instruction(m.into())
}

/// Serialise a learned instruction with its metadata.
pub fn save(learned: &Learned, info: &SaveInfo) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = learned.rows.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![learned.positions, learned.hidden], &bytes).map_err(|e| bad(e.to_string()))?;
    let mut meta: HashMap<String, String> = HashMap::from([
        ("format".into(), FORMAT.into()),
        ("format_version".into(), FORMAT_VERSION.into()),
        ("app_version".into(), env!("CARGO_PKG_VERSION").into()),
        ("eos".into(), learned.eos.to_string()),
        ("hidden_size".into(), learned.hidden.to_string()),
        ("init_caption".into(), learned.init_caption.clone()),
        ("seed".into(), learned.seed.to_string()),
        ("steps_run".into(), learned.steps_run.to_string()),
        ("best_mse".into(), learned.best_mse.to_string()),
        ("final_loss".into(), learned.final_loss.to_string()),
        ("model".into(), info.model.name.clone()),
        ("model_fingerprint".into(), info.model.fingerprint()),
        ("base_model".into(), json(info.model)),
    ]);
    if learned.seeded_noise {
        let reuse = NoiseReuse { seed: learned.seed, timesteps: learned.history.iter().map(|s| s.t).collect() };
        meta.insert("noise_reuse".into(), json(&reuse));
    }
    if let Some(png) = info.thumbnail_png {
        meta.insert("thumbnail_png_base64".into(), base64::engine::general_purpose::STANDARD.encode(png));
    }
    let extra = info.extra;
    for (k, v) in extra {
        meta.entry((*k).into()).or_insert_with(|| v.clone());
    }
    safetensors::serialize([("instruction", view)], Some(meta)).map_err(|e| bad(e.to_string()))
}

/// Parse and validate an instruction file without a model at hand (its own width is used).
pub fn peek(bytes: &[u8]) -> Result<Instruction> {
    let file = visii_formats::instruction::parse(bytes).map_err(bad)?;
    from_file(file)
}

/// Parse and validate an instruction file for a text encoder of width `hidden` and `positions`
/// token positions: a file of another shape is refused here, before any tensor is built from it.
pub fn load(bytes: &[u8], hidden: usize, positions: usize) -> Result<Instruction> {
    let file = visii_formats::instruction::parse(bytes).map_err(bad)?;
    file.check_fits(hidden, positions).map_err(bad)?;
    from_file(file)
}

/// Most timesteps a `noise_reuse` may list (a learning run is at most this many steps).
pub const MAX_REUSE_STEPS: usize = crate::learn::MAX_STEPS;

fn from_file(f: visii_formats::instruction::InstructionFile) -> Result<Instruction> {
    let metadata: HashMap<String, String> = f.metadata.into_iter().collect();
    let base_model = match metadata.get("base_model") {
        Some(v) => Some(serde_json::from_str::<ModelIdentity>(v).map_err(|_| bad("metadata `base_model` is corrupt"))?),
        None => None,
    };
    let noise_reuse = match metadata.get("noise_reuse") {
        Some(v) => {
            let r = serde_json::from_str::<NoiseReuse>(v).map_err(|_| bad("metadata `noise_reuse` is corrupt"))?;
            if r.timesteps.is_empty()
                || r.timesteps.len() > MAX_REUSE_STEPS
                || r.timesteps.iter().any(|&t| t >= visii_formats::config::MAX_TRAIN_TIMESTEPS)
            {
                return Err(bad("metadata `noise_reuse` lists implausible timesteps"));
            }
            Some(r)
        }
        None => None,
    };
    Ok(Instruction { rows: f.rows, positions: f.positions, hidden: f.hidden, eos: f.eos, metadata, base_model, noise_reuse })
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
