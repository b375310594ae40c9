//! visii-formats: every reader of bytes a stranger can hand us, without burn, so it builds in
//! seconds and can be fuzzed properly (`tests/fuzz.rs`).
//!
//! - [`safetensors`]: header, tensor-range and metadata validation (reasons kept);
//! - [`torch`]: PyTorch zip + pickle checkpoints, read (never run) within a memory budget;
//! - [`instruction`]: the `.visii.safetensors` instruction file;
//! - [`manifest`]: a weight pack's `manifest.json` and the checksums of every file it lists;
//! - [`config`], [`preprocess`]: model configs and CLIP preprocessing, every field validated;
//! - [`image`]: PNG / JPEG decoding within limits on size, pixels and aspect;
//! - [`files`]: regular files only, relative names that stay inside their folder;
//! - [`text`]: strings from files made safe to print on a terminal;
//! - [`source`]: random-access byte sources (memory, disk, the browser's blobs);
//! - [`zip`]: the one writer here: a stored zip of results, names checked.
//!
//! `visii-models` builds tensors from what these return.

pub mod config;
pub mod error;
pub mod files;
pub mod image;
pub mod instruction;
pub mod manifest;
pub mod preprocess;
pub mod safetensors;
pub mod source;
pub mod text;
pub mod torch;
pub mod zip;

pub use error::{FormatError, Result};
pub use source::{ByteSource, DiskFile, READ_STATS};
