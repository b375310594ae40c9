//! The instruction file `NAME.visii.safetensors`, as a stranger may have made it: one f32 tensor
//! `instruction` [positions, hidden] and `__metadata__` strings. Everything is validated here,
//! before anything is built from it; what depends on the loaded model (its width, its token
//! count) is checked by [`InstructionFile::check_fits`].

use std::collections::HashMap;

use safetensors::tensor::Dtype;

pub const FORMAT: &str = "visii-instruction";
pub const FORMAT_VERSION: &str = "1";
/// Files larger than this are not instructions (a [77, 4096] f32 tensor is 1.2 MB).
pub const MAX_BYTES: usize = 16 << 20;
/// Bounds on the tensor (CLIP text encoders have 77 positions and widths up to 1280).
pub const MAX_POSITIONS: usize = 4096;
pub const MAX_HIDDEN: usize = 16384;
/// Largest magnitude of an instruction's value. A text conditioning's values stay within tens, and
/// learning (a learning rate of at most 10 for at most 100,000 steps) moves them by at most about a
/// million; values beyond this only make sampling overflow.
pub const MAX_ABS_VALUE: f32 = 1e7;

/// A parsed and validated instruction file.
#[derive(Clone, Debug)]
pub struct InstructionFile {
    pub rows: Vec<f32>,
    pub positions: usize,
    pub hidden: usize,
    /// The end-of-text position: rows `1..eos` are the learned span.
    pub eos: usize,
    pub metadata: HashMap<String, String>,
}

/// Parse and validate an instruction file (everything that does not depend on a model).
pub fn parse(bytes: &[u8]) -> Result<InstructionFile, String> {
    if bytes.len() > MAX_BYTES {
        return Err(format!("{} bytes is far too large for an instruction file (at most {MAX_BYTES})", bytes.len()));
    }
    let (header, data) = crate::safetensors::read_bytes(bytes).map_err(|e| format!("not a readable instruction file: {e}"))?;
    let metadata = header.metadata;
    if metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err("this safetensors file is not a visii instruction (no `format: visii-instruction` in its metadata)".into());
    }
    if metadata.get("format_version").map(String::as_str) != Some(FORMAT_VERSION) {
        return Err(format!(
            "instruction format version {} is not supported (this app reads version {FORMAT_VERSION})",
            metadata.get("format_version").map_or("(none)".into(), |v| format!("{:?}", crate::text::printable_short(v, 32)))
        ));
    }
    let t = header.tensors.get("instruction").ok_or("the file has no `instruction` tensor")?;
    if t.dtype != Dtype::F32 || t.shape.len() != 2 {
        return Err(format!("`instruction` must be a 2-D F32 tensor, found {:?} {:?}", t.dtype, t.shape));
    }
    let (positions, hidden) = (t.shape[0], t.shape[1]);
    if !(2..=MAX_POSITIONS).contains(&positions) {
        return Err(format!(
            "the instruction has {positions} token positions (shape [{positions}, {hidden}]); an instruction has 2 to {MAX_POSITIONS} (start of text, the learned words, end of text)"
        ));
    }
    if !(1..=MAX_HIDDEN).contains(&hidden) {
        return Err(format!("the instruction's width (hidden size) is {hidden} (shape [{positions}, {hidden}]); expected 1 to {MAX_HIDDEN}"));
    }
    let eos_text = metadata.get("eos").ok_or("metadata `eos` is missing")?;
    let eos: usize =
        eos_text.trim().parse().map_err(|_| format!("metadata `eos` is {:?}, not a position", crate::text::printable_short(eos_text, 32)))?;
    if eos == 0 || eos >= positions {
        return Err(format!("metadata `eos` is {eos}, outside the instruction's positions 1..{positions}"));
    }
    if let Some(h) = metadata.get("hidden_size") {
        if h.trim().parse::<usize>().ok() != Some(hidden) {
            return Err(format!("metadata `hidden_size` {:?} disagrees with the tensor's width {hidden}", crate::text::printable_short(h, 32)));
        }
    }
    let (a, b) = t.data_offsets;
    let rows: Vec<f32> = data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if rows.iter().any(|v| !v.is_finite()) {
        return Err("the instruction holds non-finite values (NaN or infinity)".into());
    }
    if let Some(v) = rows.iter().find(|v| v.abs() > MAX_ABS_VALUE) {
        return Err(format!(
            "the instruction holds the value {v:e}, beyond ±{MAX_ABS_VALUE:e}: a text conditioning's values stay within tens and no learning run moves them that far; such values only make sampling overflow"
        ));
    }
    Ok(InstructionFile { rows, positions, hidden, eos, metadata })
}

impl InstructionFile {
    /// Whether the instruction fits a text encoder of width `hidden` and `positions` token positions.
    pub fn check_fits(&self, hidden: usize, positions: usize) -> Result<(), String> {
        let model = self.metadata.get("model").map(|m| crate::text::printable_short(m, 80)).unwrap_or_else(|| "unnamed".into());
        if self.hidden != hidden {
            return Err(format!(
                "this instruction was learned for a text encoder of width {}, the loaded model's is {hidden}: load the model it was made with ({model})",
                self.hidden
            ));
        }
        if self.positions != positions {
            return Err(format!(
                "this instruction has {} token positions, the loaded model's text encoder has {positions}: load the model it was made with ({model})",
                self.positions
            ));
        }
        Ok(())
    }
}
