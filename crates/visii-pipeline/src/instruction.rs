//! The instruction file `NAME.visii.safetensors`: data only. One f32 tensor `instruction`
//! [77, hidden] (the learned conditional rows) and `__metadata__` strings describing how it was
//! made and which text encoder it belongs to. Loading validates everything and never executes
//! anything from the file.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{PipelineError, Result};
use crate::learn::Learned;

pub const FORMAT: &str = "visii-instruction";
pub const FORMAT_VERSION: &str = "1";
/// Files larger than this are not instructions (a [77, 4096] f32 row is 1.2 MB).
pub const MAX_BYTES: usize = 16 << 20;

/// A loaded instruction.
#[derive(Clone, Debug)]
pub struct Instruction {
    pub rows: Vec<f32>,
    pub positions: usize,
    pub hidden: usize,
    pub eos: usize,
    pub metadata: HashMap<String, String>,
}

fn bad(m: impl Into<String>) -> PipelineError {
    PipelineError::Instruction(m.into())
}

/// Serialise a learned instruction with its metadata (`extra` adds fields such as the model name).
pub fn save(learned: &Learned, extra: &[(&str, String)]) -> Result<Vec<u8>> {
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
    ]);
    for (k, v) in extra {
        meta.insert((*k).into(), v.clone());
    }
    safetensors::serialize([("instruction", view)], Some(meta)).map_err(|e| bad(e.to_string()))
}

/// Parse and validate an instruction file without a model at hand (its own width is used).
pub fn peek(bytes: &[u8]) -> Result<Instruction> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|_| bad("this is not a visii instruction file (not safetensors data)"))?;
    let hidden = st.tensor("instruction").map(|t| t.shape().get(1).copied().unwrap_or(0)).unwrap_or(0);
    load(bytes, hidden)
}

/// Parse and validate an instruction file for a text encoder of width `hidden`.
pub fn load(bytes: &[u8], hidden: usize) -> Result<Instruction> {
    if bytes.len() > MAX_BYTES {
        return Err(bad(format!("{} bytes is far too large for an instruction file", bytes.len())));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|_| bad("this is not a visii instruction file (not safetensors data)"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    if metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad("this safetensors file is not a visii instruction (no `format: visii-instruction` in its metadata)"));
    }
    if metadata.get("format_version").map(String::as_str) != Some(FORMAT_VERSION) {
        return Err(bad(format!("instruction format version {:?} is not supported (this app reads version {FORMAT_VERSION})", metadata.get("format_version"))));
    }
    let t = st.tensor("instruction").map_err(|_| bad("the file has no `instruction` tensor"))?;
    if t.dtype() != Dtype::F32 || t.shape().len() != 2 {
        return Err(bad(format!("`instruction` must be a 2-D f32 tensor, found {:?} {:?}", t.dtype(), t.shape())));
    }
    let (positions, file_hidden) = (t.shape()[0], t.shape()[1]);
    if file_hidden != hidden {
        return Err(bad(format!(
            "this instruction was learned for a text encoder of width {file_hidden}, the loaded model's is {hidden}: load the model it was made with ({})",
            metadata.get("model").cloned().unwrap_or_else(|| "unnamed".into())
        )));
    }
    let eos: usize = metadata.get("eos").and_then(|v| v.parse().ok()).ok_or_else(|| bad("metadata `eos` is missing"))?;
    if positions == 0 || positions > 1024 || eos == 0 || eos >= positions {
        return Err(bad(format!("implausible instruction shape: {positions} positions, eos at {eos}")));
    }
    let rows: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if rows.iter().any(|v| !v.is_finite()) {
        return Err(bad("the instruction holds non-finite values"));
    }
    Ok(Instruction { rows, positions, hidden, eos, metadata })
}
