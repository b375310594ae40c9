//! The CLIP BPE tokenizer through the `tokenizers` crate, from `tokenizer.json` or, as in the real
//! `timbrooks/instruct-pix2pix/tokenizer`, from `vocab.json` + `merges.txt` alone. Ids are padded to
//! 77 with the pad token (`<|endoftext|>` = 49407 for InstructPix2Pix) and truncated keeping EOS.

use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

/// CLIP's pre-tokenisation pattern (as in `CLIPTokenizer`).
const CLIP_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

/// A CLIP tokenizer producing fixed-length id rows.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_len: usize,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl ClipTokenizer {
    /// From a `tokenizer.json` string. `pad` names the pad token (default `<|endoftext|>`).
    pub fn from_tokenizer_json(text: &str, pad: Option<&str>, max_len: usize) -> Result<Self> {
        let mut inner = Tokenizer::from_str(text).map_err(tok_err)?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(tok_err)?;
        Self::wrap(inner, pad, max_len)
    }

    /// From the contents of `vocab.json` and `merges.txt`, building the pipeline `CLIPTokenizer` uses:
    /// NFC + whitespace collapse + lowercase, CLIP's split pattern, byte-level BPE with `</w>`,
    /// `<|startoftext|>` ... `<|endoftext|>` around the ids.
    pub fn from_vocab_merges(vocab_json: &str, merges_txt: &str, pad: Option<&str>, max_len: usize) -> Result<Self> {
        let vocab: Value = serde_json::from_str(vocab_json).map_err(|e| tok_err(format!("vocab.json: {e}")))?;
        let map = vocab.as_object().ok_or_else(|| tok_err("vocab.json is not an object"))?;
        let id_of = |t: &str| map.get(t).and_then(Value::as_u64).ok_or_else(|| tok_err(format!("vocab.json has no `{t}`")));
        let (bos, eos) = (id_of(BOS)?, id_of(EOS)?);
        let merges: Vec<&str> = merges_txt.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty()).collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": bos, "content": BOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": eos, "content": EOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos], "cls": [BOS, bos], "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner = Tokenizer::from_str(&spec.to_string()).map_err(tok_err)?;
        Self::wrap(inner, pad, max_len)
    }

    /// From a folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`; the pad token and
    /// maximum length from `tokenizer_config.json` when it has them.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_files(&crate::loader::Files::Disk(dir.as_ref().to_path_buf()), "")
    }

    /// The same from any file source, in folder `dir` of it.
    pub fn from_files(files: &crate::loader::Files, dir: &str) -> Result<Self> {
        let at = |name: &str| if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
        let read = |name: &str| files.read_text(&at(name));
        let cfg: Value = read("tokenizer_config.json").ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null);
        let pad = match &cfg["pad_token"] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        let max_len = cfg["model_max_length"].as_u64().filter(|&m| m > 0 && m <= 77).unwrap_or(77) as usize;
        // The tokenizers crate's messages name a line and column, not the file.
        let named = |file: String, made: Result<Self>| {
            made.map_err(|e| match e {
                ModelError::Tokenizer(m) => ModelError::Tokenizer(format!("{file}: {m}")),
                e => e,
            })
        };
        if files.exists(&at("tokenizer.json")) {
            named(files.display(&at("tokenizer.json")), Self::from_tokenizer_json(&read("tokenizer.json")?, pad.as_deref(), max_len))
        } else if files.exists(&at("vocab.json")) && files.exists(&at("merges.txt")) {
            let made = Self::from_vocab_merges(&read("vocab.json")?, &read("merges.txt")?, pad.as_deref(), max_len);
            named(format!("{} with merges.txt", files.display(&at("vocab.json"))), made)
        } else {
            Err(ModelError::NotAModel {
                path: files.display(dir),
                expected: "a CLIP tokenizer folder".into(),
                message: "it has neither tokenizer.json nor vocab.json + merges.txt".into(),
            })
        }
    }

    fn wrap(inner: Tokenizer, pad: Option<&str>, max_len: usize) -> Result<Self> {
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| tok_err(format!("the vocabulary has no `{t}`")));
        let (bos_id, eos_id) = (id(BOS)?, id(EOS)?);
        let pad_id = match pad {
            Some(p) => id(p)?,
            None => eos_id,
        };
        Ok(Self { inner, bos_id, eos_id, pad_id, max_len })
    }

    /// `BOS ids... EOS` without padding or truncation.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, true).map_err(tok_err)?.get_ids().to_vec())
    }

    /// Exactly `max_len` ids: truncated keeping the final EOS, then padded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_raw(text)?;
        if ids.len() > self.max_len {
            ids.truncate(self.max_len - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    /// Position of the first EOS in a padded row (the end of the prompt's own tokens).
    pub fn eos_position(&self, ids: &[u32]) -> usize {
        ids.iter().position(|&i| i == self.eos_id).unwrap_or(ids.len() - 1)
    }

    /// Text of ids, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Refuses a tokenizer that does not fit a text encoder with `rows` token embeddings and
    /// `positions` position embeddings (its `vocab_size` and `max_position_embeddings`): an id at
    /// or beyond `rows`, or more ids per prompt than there are positions, would index past the
    /// tables.
    pub fn check_fits(&self, rows: usize, positions: usize) -> Result<()> {
        let vocab = self.inner.get_vocab(true);
        if let Some((token, &id)) = vocab.iter().max_by_key(|(_, &id)| id) {
            if id as usize >= rows {
                return Err(tok_err(format!(
                    "the vocabulary gives `{}` the id {id}, but the text encoder has {rows} token embeddings (vocab_size in text_encoder/config.json): the tokenizer is not this model's",
                    visii_formats::text::printable_short(token, 40)
                )));
            }
        }
        if self.max_len > positions {
            return Err(tok_err(format!(
                "prompts are {} tokens long, but the text encoder has {positions} positions (max_position_embeddings in text_encoder/config.json)",
                self.max_len
            )));
        }
        Ok(())
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}
